"""Sampling-noise classes: per-example loss weights with mean 1.

Every sampler here draws a vector ``m`` of per-example *loss weights* with
``E[m_i] = 1``. Training on the re-weighted loss ``(1/N) sum_i m_i l_i`` takes
the step ``G W`` with ``W = m / N``: the paper's multiplicative noise, in one
backward pass. The docs' "The idea" page has the maths; the noise classes and
their calibration follow Wu et al., ICML 2020 (https://arxiv.org/abs/1906.07405).

Samplers are small frozen value objects. `sample(seed, num_examples, dtype)`
is a pure function of its seed, written with `keras.ops` on the counter-based
generator of `keras_noisygd._rng`: the same seed gives the same weights on
TensorFlow, JAX and PyTorch, with or without XLA (bit for bit for the
discrete classes, to float32 rounding for the Gaussian ones).
`covariance(num_examples)` is the exact covariance of the weights in NumPy.

A sampler whose noise-size parameter is `None` (``Gaussian()``,
``Bernoulli()``, ``SGDSampling()``, ``SparseGaussian()``) is a *template*: the
optimizer's `emulate_batch_size=b` fills it in at every step through
`calibrated(b, N)`, with ``N`` the number of examples of that step.

Conventions:
    * Noise is a per-example loss weight with mean 1, not an additive or a
      per-coordinate perturbation of the gradient.
    * ``N`` (`num_examples`) is the population the emulated SGD batch ``b``
      (`batch_size`) is drawn from: the whole training set for full-batch noisy
      GD, the actual batch for the large-batch variant.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Optional

import keras
import numpy as np
from keras import ops

from keras_noisygd import _rng
from keras_noisygd._checks import at_most, check_bool, check_int, check_real, guarded, is_static

__all__ = [
    "Sampler",
    "NoNoise",
    "SGDSampling",
    "Gaussian",
    "Bernoulli",
    "SparseGaussian",
    "get",
    "serialize",
    "NAMES",
    "uniform",
]

_register = keras.saving.register_keras_serializable(package="keras_noisygd")


# --------------------------------------------------------------------------
# Scalar helpers: Python numbers at build time, tensors inside a traced step
# where the batch size or a scheduled `b` is only known at run time.


def _sqrt(x):
    return math.sqrt(x) if is_static(x) else ops.sqrt(x)


def _maximum(x, y):
    return max(x, y) if is_static(x) else ops.maximum(x, y)


# Run-time sizes are calibrated in float64 where the backend has it (JAX has not, by default).
_CALIBRATION_DTYPE = "float32" if keras.backend.backend() == "jax" else "float64"


def _as_float(n):
    return float(n) if is_static(n) else ops.cast(n, _CALIBRATION_DTYPE)


def _as_seed(seed):
    """A stateless seed: an int becomes ``[seed, 0]``; a shape-[2] integer tensor is kept."""
    if is_static(seed):
        if isinstance(seed, (bool, np.bool_)) or not float(seed).is_integer() or not 0 <= seed < 2**32:
            raise ValueError(
                "Argument `seed` must be a Python int in [0, 2**32) or an integer tensor of shape [2]. "
                f"Received: seed={seed!r}"
            )
        seed = int(seed)
        return ops.convert_to_tensor(np.array([seed, 0], np.uint32 if keras.backend.backend() == "jax" else np.int64))
    seed = ops.convert_to_tensor(seed)
    if len(seed.shape) != 1 or seed.shape[0] != 2 or "int" not in keras.backend.standardize_dtype(seed.dtype):
        raise ValueError(
            "Argument `seed` must be a Python int or an integer tensor of shape [2]. "
            f"Received: seed with dtype {keras.backend.standardize_dtype(seed.dtype)} and shape {tuple(seed.shape)}"
        )
    return seed


def _centering(n):
    return np.eye(n) - np.ones((n, n)) / n


# --------------------------------------------------------------------------
# The samplers.


class Sampler:
    """Base class of the noise samplers: per-example loss weights with mean 1.

    Subclasses are frozen dataclasses that implement `_sample` and
    `covariance`; templates also implement `emulating`. Any object with a
    `sample(seed, num_examples, dtype)` method can stand in for a `Sampler`.
    """

    _name: ClassVar[str] = "sampler"
    _calibrated_field: ClassVar[Optional[str]] = None

    # -- public API -------------------------------------------------------
    @property
    def name(self) -> str:
        """The noise class's name in `NAMES`."""
        return self._name

    def sample(self, seed, num_examples, dtype="float32"):
        """Draws the loss weights of one step.

        Args:
            seed: A Python int or an integer tensor of shape `[2]` (a stateless
                seed, entries in `[0, 2**32)`). The same seed always gives the
                same weights, on every backend.
            num_examples: Number of examples `N`: a Python int, or a scalar int
                tensor inside a traced step.
            dtype: Floating dtype of the weights. Defaults to `"float32"`.

        Returns:
            A `[num_examples]` tensor `m` with `E[m_i] = 1`.
        """
        if self.is_template:
            raise ValueError(
                f"{type(self).__name__}.{self._calibrated_field} is None, so this sampler is a "
                "template: pass `emulate_batch_size=b` to the optimizer or build it with "
                f"`{type(self).__name__}.emulating(batch_size=b, num_examples=N)`."
            )
        num_examples = check_int("num_examples", num_examples, 1)
        dtype = keras.backend.standardize_dtype(dtype)
        if not keras.backend.is_float_dtype(dtype):
            raise ValueError(f"Argument `dtype` must be a floating dtype. Received: dtype={dtype!r}")
        conditions = self._check_examples(num_examples)
        return guarded(self._sample(_as_seed(seed), num_examples, dtype), conditions)

    def covariance(self, num_examples: int) -> np.ndarray:
        """The exact `[num_examples, num_examples]` covariance matrix of the weights (NumPy)."""
        raise NotImplementedError

    @classmethod
    def emulating(cls, batch_size, num_examples, **kwargs) -> "Sampler":
        """This noise class calibrated to the covariance of SGD with batch `b` out of `N`.

        Args:
            batch_size: The emulated SGD batch size `b`, `1 <= b <= N` (checked
                here when `N` is a number; a tensor `N` is checked by the
                sampler's user, e.g. `NoiseMixin.noise_weights`).
            num_examples: The population `N` the batch is drawn from: the
                training-set size for full-batch noisy GD, the actual batch size
                for the large-batch variant.
            **kwargs: The class's structural arguments (`centered`, `replacement`,
                `num_noisy`).

        Returns:
            A sampler whose weights have the covariance given in the class docstring.
        """
        raise NotImplementedError

    def calibrated(self, batch_size, num_examples) -> "Sampler":
        """This template's class calibrated to emulate SGD(`batch_size`) out of `num_examples`; see `emulating`."""
        structure = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name != self._calibrated_field
        }
        return type(self).emulating(batch_size, num_examples, **structure)

    @property
    def is_template(self) -> bool:
        """Whether the noise size is left for `calibrated` to fill in."""
        field = self._calibrated_field
        return field is not None and getattr(self, field) is None

    def get_config(self) -> dict:
        """The constructor arguments, for `keras.saving` serialization."""
        return dataclasses.asdict(self)

    @classmethod
    def from_config(cls, config: dict) -> "Sampler":
        """Rebuilds a sampler from `get_config()`."""
        return cls(**config)

    # -- hooks --------------------------------------------------------------
    def _sample(self, seed, n, dtype):
        raise NotImplementedError

    def _check_examples(self, n):
        return []


def _emulated(batch_size, num_examples):
    """Checks `1 <= b <= N` (now for numbers); `(b, N)` as Python numbers or float tensors."""
    batch_size = check_int("batch_size", batch_size, 1)
    at_most("batch_size", batch_size, "num_examples", num_examples)
    return _as_float(batch_size), _as_float(num_examples)


def _constant(x, dtype):
    """`x` in `dtype`; a Python float goes straight there (not through float32)."""
    return ops.convert_to_tensor(x, dtype) if is_static(x) else ops.cast(x, dtype)


@_register
@dataclasses.dataclass(frozen=True)
class NoNoise(Sampler):
    """No noise: every weight is 1, so the step is plain (full-batch) gradient descent.

    Example:

    ```python
    keras_noisygd.noise.NoNoise().sample(0, 3)   # [1., 1., 1.]
    ```
    """

    _name: ClassVar[str] = "none"

    def _sample(self, seed, n, dtype):
        return ops.ones([n], dtype)

    def covariance(self, num_examples):
        return np.zeros((num_examples, num_examples))

    @classmethod
    def emulating(cls, batch_size, num_examples):
        """`NoNoise()`: there is nothing to calibrate."""
        return cls()


@_register
@dataclasses.dataclass(frozen=True)
class SGDSampling(Sampler):
    """SGD's own sampling noise: `m = (N/b) * counts`, the mini-batch as loss weights.

    Without replacement `S` is a uniform `b`-subset and `m_i = N/b` on `S`, else
    0, so `sum(m) = N` and the step is exactly an SGD(`b`) step. With
    replacement `m = (N/b) * Multinomial(b; 1/N, ..., 1/N)`.

        Cov[m] = N(N-b) / (b(N-1)) * (I - 11^T/N)      (without replacement)
        Cov[m] = (N/b) * (I - 11^T/N)                  (with replacement)

    Args:
        batch_size: The SGD batch size `b`. `None` makes a template filled in
            by the optimizer's `emulate_batch_size`. Defaults to `None`.
        replacement: Whether the `b` examples are drawn with replacement.
            Defaults to `False`.
    """

    batch_size: Optional[int] = None
    replacement: bool = False
    _name: ClassVar[str] = "sgd"
    _calibrated_field: ClassVar[str] = "batch_size"

    def __post_init__(self):
        object.__setattr__(self, "batch_size", check_int("batch_size", self.batch_size, 1, allow_none=True))
        check_bool("replacement", self.replacement)

    def _check_examples(self, n):
        if self.replacement:
            return []
        return at_most("batch_size", self.batch_size, "the number of examples N", n)

    def _sample(self, seed, n, dtype):
        scale = _constant(n, dtype) / _constant(self.batch_size, dtype)
        if self.replacement:
            w, _ = _rng.words(seed, self.batch_size, 0)
            draws = ops.cast(_rng.below(w, n), "int32")
            counts = ops.segment_sum(ops.ones([self.batch_size], dtype), draws, num_segments=n)
            return scale * counts
        w, _ = _rng.words(seed, n, 0)
        return scale * ops.cast(_rng.smallest(w, self.batch_size), dtype)

    def covariance(self, num_examples):
        N, b = num_examples, self.batch_size
        if self.replacement:
            return (N / b) * _centering(N)
        if N == 1:
            return np.zeros((1, 1))
        return N * (N - b) / (b * (N - 1)) * _centering(N)

    @classmethod
    def emulating(cls, batch_size, num_examples, replacement=False):
        """`SGDSampling(batch_size, replacement)`: exact by construction (checks `b <= N`)."""
        batch_size = check_int("batch_size", batch_size, 1)
        if not replacement:
            at_most("batch_size", batch_size, "num_examples", num_examples)
        return cls(batch_size=batch_size, replacement=replacement)


@_register
@dataclasses.dataclass(frozen=True)
class Gaussian(Sampler):
    """Gaussian multiplicative noise: `m = 1 + std * eps`, `eps ~ N(0, I)`.

    Uncentred ("MSGD-Fisher"): `Cov[m] = std^2 I`; with `std^2 = N/b` the
    gradient noise has covariance `F/b` (empirical Fisher over `b`).
    Centred ("MSGD-Cov"): `eps` has its mean removed, so `sum(m) = N` and
    `Cov[m] = std^2 (I - 11^T/N)`; with `std^2 = N(N-b)/(b(N-1))` this is exactly
    SGD(`b`)'s covariance.

    `eps` comes from Box-Muller on 24-bit uniforms in the weights' dtype, so
    `|eps| < 5.8`: the tail beyond 5.8 standard deviations (probability 7e-9)
    is cut.

    Args:
        std: Standard deviation of each weight before centring. `None` makes a
            template filled in by the optimizer's `emulate_batch_size`.
            Defaults to `None`.
        centered: Whether to remove the mean of `eps`. Defaults to `False`.

    Example:

    ```python
    noise = keras_noisygd.noise.Gaussian.emulating(batch_size=32, num_examples=1000, centered=True)
    noise.std   # sqrt(1000 * 968 / (32 * 999)) = 5.503
    ```
    """

    std: Optional[float] = None
    centered: bool = False
    _calibrated_field: ClassVar[str] = "std"

    def __post_init__(self):
        check_real("std", self.std, "a finite number >= 0", lambda v: v >= 0)
        check_bool("centered", self.centered)

    @property
    def name(self):
        return "gaussian_centered" if self.centered else "gaussian"

    def _sample(self, seed, n, dtype):
        eps = _rng.normal(*_rng.words(seed, n, 0), dtype)
        if self.centered:
            eps = eps - ops.mean(eps)
        return 1 + _constant(self.std, dtype) * eps

    def covariance(self, num_examples):
        base = _centering(num_examples) if self.centered else np.eye(num_examples)
        return self.std**2 * base

    @classmethod
    def emulating(cls, batch_size, num_examples, centered=False):
        """`std^2 = N/b` (uncentred) or `N(N-b)/(b(N-1))` (centred)."""
        b, n = _emulated(batch_size, num_examples)
        if centered:
            # N = 1 forces b = 1, where SGD has no noise (0/0 otherwise).
            variance = n * (n - b) / (b * _maximum(n - 1, 1.0))
        else:
            variance = n / b
        return cls(std=_sqrt(variance), centered=centered)


@_register
@dataclasses.dataclass(frozen=True)
class Bernoulli(Sampler):
    """Bernoulli noise: `m_i = 1/p` with probability `p`, else 0, independently.

    `Cov[m] = (1/p - 1) I`; `p = b/N` matches SGD(`b`)'s variance per example
    (SGD's examples are negatively correlated, these are independent). The
    draw compares a 24-bit uniform with `p` in float32, so the keep
    probability is `p` rounded up to a multiple of `2**-24`.

    Args:
        p: Keep probability in `(0, 1]`; `p = 1` is no noise. `None` makes a
            template filled in by the optimizer's `emulate_batch_size`.
            Defaults to `None`.
    """

    p: Optional[float] = None
    _name: ClassVar[str] = "bernoulli"
    _calibrated_field: ClassVar[str] = "p"

    def __post_init__(self):
        check_real("p", self.p, "in (0, 1]", lambda v: 0 < v <= 1)

    def _sample(self, seed, n, dtype):
        w, _ = _rng.words(seed, n, 0)
        keep = ops.less(_rng.uniform(w), _constant(self.p, "float32"))  # u < 1 = p keeps all
        return ops.cast(keep, dtype) / _constant(self.p, dtype)

    def covariance(self, num_examples):
        return (1 / self.p - 1) * np.eye(num_examples)

    @classmethod
    def emulating(cls, batch_size, num_examples):
        """`p = b / N`."""
        b, n = _emulated(batch_size, num_examples)
        return cls(p=b / n)


@_register
@dataclasses.dataclass(frozen=True)
class SparseGaussian(Sampler):
    """Sparse Gaussian noise: `m = 1 + std * eps` on a random `num_noisy`-subset, 1 elsewhere.

    Uncentred ("MSGD-[Fisher-B]"): `Cov[m] = std^2 (k/N) I`, calibrated by
    `std = N / sqrt(b k)`. Centred ("MSGD-[Cov-B]"): the `k` Gaussian values have
    their mean removed, so `sum(m) = N` and `Cov[m] = std^2 (k-1)/(N-1) (I - 11^T/N)`,
    calibrated by `std^2 = N(N-b)/(b(k-1))`. With `k = N` these are `Gaussian`.

    Args:
        num_noisy: Number `k` of examples that get noise each step (`k >= 2`
            when centred). `None` in a template means `k = b`. Defaults to `None`.
        std: Standard deviation of each noisy weight before centring. `None`
            makes a template filled in by the optimizer's `emulate_batch_size`.
            Defaults to `None`.
        centered: Whether to remove the mean of the `k` Gaussian values.
            Defaults to `False`.
    """

    num_noisy: Optional[int] = None
    std: Optional[float] = None
    centered: bool = False
    _calibrated_field: ClassVar[str] = "std"

    def __post_init__(self):
        check_bool("centered", self.centered)
        minimum = 2 if self.centered else 1
        object.__setattr__(self, "num_noisy", check_int("num_noisy", self.num_noisy, minimum, allow_none=True))
        check_real("std", self.std, "a finite number >= 0", lambda v: v >= 0)
        if self.std is not None and self.num_noisy is None:
            raise ValueError(
                "Argument `num_noisy` is required when `std` is given. "
                f"Received: num_noisy=None, std={self.std!r}"
            )

    @property
    def name(self):
        return "sparse_gaussian_centered" if self.centered else "sparse_gaussian"

    def _check_examples(self, n):
        conditions = at_most("num_noisy", self.num_noisy, "the number of examples N", n)
        if self.centered and not is_static(self.num_noisy):  # k = b from a schedule: centring needs k >= 2
            message = ["Argument `num_noisy` must be >= 2 when centred. Received: num_noisy=", self.num_noisy]
            conditions.append((ops.greater_equal(self.num_noisy, 2), message))
        return conditions

    def _sample(self, seed, n, dtype):
        mask = ops.cast(_rng.smallest(_rng.words(seed, n, 0)[0], self.num_noisy), dtype)
        eps = _rng.normal(*_rng.words(seed, n, 1), dtype) * mask
        if self.centered:
            eps = (eps - ops.sum(eps) / _constant(self.num_noisy, dtype)) * mask
        return 1 + _constant(self.std, dtype) * eps

    def covariance(self, num_examples):
        N, k, s2 = num_examples, self.num_noisy, self.std**2
        if self.centered:
            return s2 * (k - 1) / (N - 1) * _centering(N)
        return s2 * k / N * np.eye(N)

    @classmethod
    def emulating(cls, batch_size, num_examples, num_noisy=None, centered=False):
        """`std = N / sqrt(b k)` (uncentred) or `std^2 = N(N-b)/(b(k-1))` (centred); `k` defaults to `b`."""
        b, n = _emulated(batch_size, num_examples)
        k = check_int("num_noisy", batch_size if num_noisy is None else num_noisy, 2 if centered else 1)
        k_ = _as_float(k)
        variance = n * (n - b) / (b * (k_ - 1)) if centered else n * n / (b * k_)
        return cls(num_noisy=k, std=_sqrt(variance), centered=centered)

def uniform(seed, num_examples, dtype="float32", stream=0):
    """`[num_examples]` uniforms in `[0, 1)` from the samplers' generator, for your own noise classes.

    The same seed gives the same numbers on TensorFlow, JAX and PyTorch, with
    or without XLA (24-bit uniforms from Threefry-2x32; `keras.random` draws
    other numbers on each backend and refuses tensor seeds on some).

    Args:
        seed: A Python int or an integer tensor of shape `[2]`, as `Sampler.sample` receives it.
        num_examples: The number of uniforms (a Python int, or a scalar tensor in a traced
            TensorFlow step).
        dtype: Floating dtype. Defaults to `"float32"`.
        stream: An int in `[0, 2**32)` that selects an independent stream of the same seed
            (the built-in samplers use 0 and 1). Defaults to `0`.

    Returns:
        A `[num_examples]` tensor.
    """
    num_examples = check_int("num_examples", num_examples, 1)
    stream = check_int("stream", stream, 0, maximum=2**32 - 1)
    w, _ = _rng.words(_as_seed(seed), num_examples, stream)
    return _rng.uniform(w, keras.backend.standardize_dtype(dtype))


# --------------------------------------------------------------------------
# Names and (de)serialization.

_TEMPLATES = {
    "none": NoNoise(),
    "sgd": SGDSampling(),
    "gaussian": Gaussian(),
    "gaussian_centered": Gaussian(centered=True),
    "bernoulli": Bernoulli(),
    "sparse_gaussian": SparseGaussian(),
    "sparse_gaussian_centered": SparseGaussian(centered=True),
}

NAMES = tuple(_TEMPLATES)
"""The string names `get` accepts: `"none"`, `"sgd"`, `"gaussian"`, `"gaussian_centered"`,
`"bernoulli"`, `"sparse_gaussian"`, `"sparse_gaussian_centered"`."""


def get(identifier):
    """Resolves a noise name, config dict or sampler object to a sampler.

    Args:
        identifier: One of `NAMES` (which gives a template, to be calibrated by
            the optimizer's `emulate_batch_size`), a dict from `serialize`, or
            any object with a `sample(seed, num_examples, dtype)` method, returned
            as it is.

    Returns:
        A sampler.

    Example:

    ```python
    keras_noisygd.noise.get("gaussian_centered")   # Gaussian(std=None, centered=True)
    ```
    """
    if isinstance(identifier, str):
        if identifier not in _TEMPLATES:
            raise ValueError(
                f"Argument `noise` must be one of {list(NAMES)}, a sampler or a sampler config. "
                f"Received: noise={identifier!r}"
            )
        return _TEMPLATES[identifier]
    if isinstance(identifier, dict):
        return keras.saving.deserialize_keras_object(identifier)
    if callable(getattr(identifier, "sample", None)):
        return identifier
    raise ValueError(
        "Argument `noise` must be a noise name, a sampler (an object with a "
        "`sample(seed, num_examples, dtype)` method) or a sampler config. "
        f"Received: noise={identifier!r}"
    )


def serialize(sampler) -> dict:
    """The `keras.saving` config of a sampler; `get` turns it back into one."""
    return keras.saving.serialize_keras_object(sampler)
