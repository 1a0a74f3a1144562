"""Sampling-noise classes: per-example loss weights with mean 1.

Every sampler here draws a vector ``m`` of per-example *loss weights* with
``E[m_i] = 1``. Training on the re-weighted loss ``(1/B) sum_i m_i l_i`` takes
the step ``G W`` with ``W = m / B``: the paper's multiplicative noise, in one
backward pass. The docs' "The idea" page has the maths; the noise classes and
their calibration follow Wu et al., ICML 2020 (https://arxiv.org/abs/1906.07405).

Samplers are small frozen value objects. `sample(seed, batch_size, dtype)` is a
pure function of its seed, built on `tf.random.stateless_*`, and compiles with
XLA. `covariance(batch_size)` is the exact covariance of the weights in NumPy.

A sampler whose noise-size parameter is `None` (``Gaussian()``,
``Bernoulli()``, ``SGDSampling()``, ``SparseGaussian()``) is a *template*: the
optimizer's `emulate_batch_size=b` fills it in at every step through
`calibrated(b, N)`, with ``N`` the actual batch size of that step.

Conventions:
    * Noise is a per-example loss weight with mean 1, not an additive or a
      per-coordinate perturbation of the gradient.
    * ``N`` is the population the emulated SGD batch ``b`` is drawn from: the
      whole training set for full-batch noisy GD, the actual batch for the
      large-batch variant.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import ClassVar, Optional

import keras
import numpy as np
import tensorflow as tf

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
]

_register = keras.saving.register_keras_serializable(package="keras_noisygd")


# --------------------------------------------------------------------------
# Validation and scalar helpers (Python numbers at build time, tensors inside
# a traced step where the batch size is only known at run time).


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_real(name, value, rule, ok):
    if value is None or tf.is_tensor(value):
        return
    if not _is_number(value) or not math.isfinite(value) or not ok(value):
        raise ValueError(f"Argument `{name}` must be {rule}. Received: {name}={value!r}")


def _check_int(name, value, minimum):
    if value is None or tf.is_tensor(value):
        return
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise ValueError(
            f"Argument `{name}` must be an integer >= {minimum}. Received: {name}={value!r}"
        )


def _check_bool(name, value):
    if not isinstance(value, bool):
        raise ValueError(f"Argument `{name}` must be True or False. Received: {name}={value!r}")


def check_at_most(name, value, limit_name, limit):
    """`value <= limit`: raised now for Python ints; a list of run-time conditions for tensors."""
    if not tf.is_tensor(value) and not tf.is_tensor(limit):
        if value > limit:
            raise ValueError(
                f"Argument `{name}` must be <= {limit_name}. "
                f"Received: {name}={value}, {limit_name}={limit}"
            )
        return []
    ok = tf.cast(value, tf.int64) <= tf.cast(limit, tf.int64)
    message = [f"Argument `{name}` must be <= {limit_name}. Received: {name}=", value, f"{limit_name}=", limit]
    return [(ok, message)]


def guarded(weights, conditions):
    """`weights`, checked against run-time `(condition, message)` pairs.

    A message is a string or a list of strings and tensors (printed in turn).

    Without XLA a failed condition raises `InvalidArgumentError` with its
    message. XLA drops assertions, so the weights are also replaced by NaN:
    the loss turns NaN (which `keras.callbacks.TerminateOnNaN` stops on) rather
    than training silently with the wrong noise.
    """
    if not conditions:
        return weights
    asserts = [
        tf.debugging.Assert(ok, [message] if isinstance(message, str) else message) for ok, message in conditions
    ]
    all_ok = tf.reduce_all(tf.stack([ok for ok, _ in conditions]))
    with tf.control_dependencies(asserts):
        return tf.where(all_ok, weights, tf.constant(float("nan"), weights.dtype))


def _sqrt(x):
    return tf.sqrt(x) if tf.is_tensor(x) else math.sqrt(x)


def _maximum(x, y):
    return tf.maximum(x, y) if tf.is_tensor(x) else max(x, y)


def _as_tensor(x, dtype):
    """`x` in `dtype`; a Python float goes straight there (`tf.cast` would round it through float32)."""
    return tf.cast(x, dtype) if tf.is_tensor(x) else tf.constant(x, dtype)


def _as_float(n):
    return tf.cast(n, tf.float64) if tf.is_tensor(n) else float(n)


def _as_seed(seed) -> tf.Tensor:
    """A stateless seed: an int becomes ``[seed, 0]``; a shape-[2] tensor is kept."""
    if isinstance(seed, numbers.Integral):
        return tf.constant([int(seed), 0], tf.int64)
    seed = tf.convert_to_tensor(seed)
    if seed.shape.rank != 1 or seed.shape[0] != 2 or not seed.dtype.is_integer:
        raise ValueError(
            "Argument `seed` must be a Python int or an integer tensor of shape [2]. "
            f"Received: seed with dtype {seed.dtype.name} and shape {seed.shape}"
        )
    return seed


def _random_bits(seed, shape):
    """Full-range int64 random bits: the one stream all samplers draw from.

    TensorFlow's float kernels for stateless uniform and normal draw different
    numbers under XLA; this integer stream is the same with and without
    `jit_compile` as long as both seed entries lie in [0, 2**32) (seeds from
    `stateless_split` do not), so the weights agree across the two modes.
    Floats are derived from it below.
    """
    return tf.random.stateless_uniform(shape, seed, minval=None, maxval=None, dtype=tf.int64)


def _uniform(bits):
    """float64 uniforms in [0, 1) from the top 53 of each 64 random bits."""
    top53 = tf.bitwise.right_shift(bits, 11) + 2**52
    return tf.cast(top53, tf.float64) * 2.0**-53


def _normal(bits, dtype):
    """Standard normals by Box-Muller from a `[2, n]` block of random bits."""
    u = _uniform(bits)
    radius = tf.sqrt(-2.0 * tf.math.log1p(-u[0]))
    return tf.cast(radius * tf.cos(2.0 * math.pi * u[1]), dtype)


def _subset(keys, k):
    """A boolean mask of a uniform random k-subset (`1 <= k <= n`), from i.i.d. int64 keys (XLA-compilable).

    The k smallest keys form a uniform k-subset (ties have probability
    ~n^2/2^64): the mask is `keys <= ` the k-th smallest key. One sort (2-3x
    faster than ranking by a double argsort under XLA on CPU); sorting compiles
    under XLA, `stateless_shuffle` does not.
    """
    n = tf.shape(keys, out_type=tf.int64)[0]
    # Clamped, so that k > n reaches the sampler's own run-time check (`guarded`) instead of a gather error.
    threshold = tf.gather(tf.sort(keys), tf.clip_by_value(tf.cast(k, tf.int64), 1, n) - 1)
    return keys <= threshold


def _centering(n):
    return np.eye(n) - np.ones((n, n)) / n


# --------------------------------------------------------------------------
# The samplers.


class Sampler:
    """Base class of the noise samplers: per-example loss weights with mean 1.

    Subclasses are frozen dataclasses that implement `_sample` and
    `covariance`; templates also implement `emulating`. Any object with a
    `sample(seed, batch_size, dtype)` method can stand in for a `Sampler`.
    """

    name: ClassVar[str] = "sampler"
    _calibrated_field: ClassVar[Optional[str]] = None

    # -- public API -------------------------------------------------------
    def sample(self, seed, batch_size, dtype="float32") -> tf.Tensor:
        """Draws the loss weights of one step.

        Args:
            seed: A Python int or an integer tensor of shape `[2]` (a stateless
                seed). The same seed always gives the same weights.
            batch_size: Number of examples `N`: a Python int, or a scalar int
                tensor inside a traced step.
            dtype: Floating dtype of the weights. Defaults to `"float32"`.

        Returns:
            A `[batch_size]` tensor `m` with `E[m_i] = 1`.
        """
        if self.is_template:
            raise ValueError(
                f"{type(self).__name__}.{self._calibrated_field} is None, so this sampler is a "
                "template: pass `emulate_batch_size=b` to the optimizer or build it with "
                f"`{type(self).__name__}.emulating(b, N)`."
            )
        _check_int("batch_size", batch_size, 1)
        dtype = tf.as_dtype(dtype)
        if not dtype.is_floating:
            raise ValueError(f"Argument `dtype` must be a floating dtype. Received: dtype={dtype.name!r}")
        conditions = self._check_batch(batch_size)
        return guarded(self._sample(_as_seed(seed), batch_size, dtype), conditions)

    def covariance(self, batch_size: int) -> np.ndarray:
        """The exact `[batch_size, batch_size]` covariance matrix of the weights (NumPy)."""
        raise NotImplementedError

    @classmethod
    def emulating(cls, b, N, **kwargs) -> "Sampler":
        """This noise class calibrated to the covariance of SGD with batch `b` out of `N`.

        Args:
            b: The emulated SGD batch size, `1 <= b <= N` (checked here when `N`
                is a Python int; a tensor `N` is checked by the sampler's user,
                e.g. `NoiseMixin.noise_weights`).
            N: The population the batch is drawn from: the training-set size for
                full-batch noisy GD, the actual batch size for the large-batch variant.
            **kwargs: The class's structural arguments (`centered`, `replacement`,
                `num_noisy`).

        Returns:
            A sampler whose weights have the covariance given in the class docstring.
        """
        raise NotImplementedError

    def calibrated(self, b, N) -> "Sampler":
        """This template's class calibrated to emulate SGD(`b`) out of `N`; see `emulating`."""
        structure = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name != self._calibrated_field
        }
        return type(self).emulating(b, N, **structure)

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

    def _check_batch(self, n):
        return []


@_register
@dataclasses.dataclass(frozen=True)
class NoNoise(Sampler):
    """No noise: every weight is 1, so the step is plain (full-batch) gradient descent.

    Example:

    ```python
    keras_noisygd.noise.NoNoise().sample(0, 3)   # [1., 1., 1.]
    ```
    """

    name: ClassVar[str] = "none"

    def _sample(self, seed, n, dtype):
        return tf.ones([n], dtype)

    def covariance(self, batch_size):
        return np.zeros((batch_size, batch_size))

    @classmethod
    def emulating(cls, b, N):
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
    name: ClassVar[str] = "sgd"
    _calibrated_field: ClassVar[str] = "batch_size"

    def __post_init__(self):
        _check_int("batch_size", self.batch_size, 1)
        _check_bool("replacement", self.replacement)

    def _check_batch(self, n):
        if self.replacement:
            return []
        return check_at_most("batch_size", self.batch_size, "the number of examples N", n)

    def _sample(self, seed, n, dtype):
        scale = tf.cast(n, dtype) / tf.cast(self.batch_size, dtype)
        if self.replacement:
            draws = tf.random.stateless_uniform(
                [self.batch_size], seed, minval=0, maxval=tf.cast(n, tf.int64), dtype=tf.int64
            )
            counts = tf.tensor_scatter_nd_add(
                tf.zeros([n], dtype), draws[:, None], tf.ones([self.batch_size], dtype)
            )
            return scale * counts
        return scale * tf.cast(_subset(_random_bits(seed, [n]), self.batch_size), dtype)

    def covariance(self, batch_size):
        N, b = batch_size, self.batch_size
        if self.replacement:
            return (N / b) * _centering(N)
        if N == 1:
            return np.zeros((1, 1))
        return N * (N - b) / (b * (N - 1)) * _centering(N)

    @classmethod
    def emulating(cls, b, N, replacement=False):
        """`SGDSampling(b, replacement)`: exact by construction (checks `b <= N`)."""
        _check_int("b", b, 1)
        if not replacement:
            check_at_most("b", b, "N", N)
        return cls(batch_size=b, replacement=replacement)


@_register
@dataclasses.dataclass(frozen=True)
class Gaussian(Sampler):
    """Gaussian multiplicative noise: `m = 1 + std * eps`, `eps ~ N(0, I)`.

    Uncentred ("MSGD-Fisher"): `Cov[m] = std^2 I`; with `std^2 = N/b` the
    gradient noise has covariance `F/b` (empirical Fisher over `b`).
    Centred ("MSGD-Cov"): `eps` has its mean removed, so `sum(m) = N` and
    `Cov[m] = std^2 (I - 11^T/N)`; with `std^2 = N(N-b)/(b(N-1))` this is exactly
    SGD(`b`)'s covariance.

    Args:
        std: Standard deviation of each weight before centring. `None` makes a
            template filled in by the optimizer's `emulate_batch_size`.
            Defaults to `None`.
        centered: Whether to remove the mean of `eps`. Defaults to `False`.

    Example:

    ```python
    noise = keras_noisygd.noise.Gaussian.emulating(b=32, N=1000, centered=True)
    noise.std   # sqrt(1000 * 968 / (32 * 999)) = 5.503
    ```
    """

    std: Optional[float] = None
    centered: bool = False
    _calibrated_field: ClassVar[str] = "std"

    def __post_init__(self):
        _check_real("std", self.std, "a finite number >= 0", lambda v: v >= 0)
        _check_bool("centered", self.centered)

    @property
    def name(self):
        return "gaussian_centered" if self.centered else "gaussian"

    def _sample(self, seed, n, dtype):
        eps = _normal(_random_bits(seed, [2, n]), dtype)
        if self.centered:
            eps = eps - tf.reduce_mean(eps)
        return 1 + _as_tensor(self.std, dtype) * eps

    def covariance(self, batch_size):
        base = _centering(batch_size) if self.centered else np.eye(batch_size)
        return self.std**2 * base

    @classmethod
    def emulating(cls, b, N, centered=False):
        """`std^2 = N/b` (uncentred) or `N(N-b)/(b(N-1))` (centred)."""
        _check_int("b", b, 1)
        check_at_most("b", b, "N", N)
        n = _as_float(N)
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
    (SGD's examples are negatively correlated, these are independent).

    Args:
        p: Keep probability in `(0, 1]`; `p = 1` is no noise. `None` makes a
            template filled in by the optimizer's `emulate_batch_size`.
            Defaults to `None`.
    """

    p: Optional[float] = None
    name: ClassVar[str] = "bernoulli"
    _calibrated_field: ClassVar[str] = "p"

    def __post_init__(self):
        _check_real("p", self.p, "in (0, 1]", lambda v: 0 < v <= 1)

    def _sample(self, seed, n, dtype):
        keep = _uniform(_random_bits(seed, [n])) < _as_tensor(self.p, tf.float64)  # float64: p = 1 keeps all
        return tf.cast(keep, dtype) / _as_tensor(self.p, dtype)

    def covariance(self, batch_size):
        return (1 / self.p - 1) * np.eye(batch_size)

    @classmethod
    def emulating(cls, b, N):
        """`p = b / N`."""
        _check_int("b", b, 1)
        check_at_most("b", b, "N", N)
        return cls(p=b / _as_float(N))


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
        _check_bool("centered", self.centered)
        _check_int("num_noisy", self.num_noisy, 2 if self.centered else 1)
        _check_real("std", self.std, "a finite number >= 0", lambda v: v >= 0)
        if self.std is not None and self.num_noisy is None:
            raise ValueError(
                "Argument `num_noisy` is required when `std` is given. "
                f"Received: num_noisy=None, std={self.std!r}"
            )

    @property
    def name(self):
        return "sparse_gaussian_centered" if self.centered else "sparse_gaussian"

    def _check_batch(self, n):
        conditions = check_at_most("num_noisy", self.num_noisy, "the number of examples N", n)
        if self.centered and tf.is_tensor(self.num_noisy):  # k = b from a schedule: centring needs k >= 2
            message = ["Argument `num_noisy` must be >= 2 when centred. Received: num_noisy=", self.num_noisy]
            conditions.append((self.num_noisy >= 2, message))
        return conditions

    def _sample(self, seed, n, dtype):
        bits = _random_bits(seed, [3, n])
        mask = tf.cast(_subset(bits[0], self.num_noisy), dtype)
        eps = _normal(bits[1:], dtype) * mask
        if self.centered:
            eps = (eps - tf.reduce_sum(eps) / tf.cast(self.num_noisy, dtype)) * mask
        return 1 + _as_tensor(self.std, dtype) * eps

    def covariance(self, batch_size):
        N, k, s2 = batch_size, self.num_noisy, self.std**2
        if self.centered:
            return s2 * (k - 1) / (N - 1) * _centering(N)
        return s2 * k / N * np.eye(N)

    @classmethod
    def emulating(cls, b, N, num_noisy=None, centered=False):
        """`std = N / sqrt(b k)` (uncentred) or `std^2 = N(N-b)/(b(k-1))` (centred); `k` defaults to `b`."""
        _check_int("b", b, 1)
        k = b if num_noisy is None else num_noisy
        _check_int("num_noisy", k, 2 if centered else 1)
        check_at_most("b", b, "N", N)
        n = _as_float(N)
        variance = n * (n - b) / (b * (k - 1)) if centered else n * n / (b * k)
        return cls(num_noisy=k, std=_sqrt(variance), centered=centered)


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
            any object with a `sample(seed, batch_size, dtype)` method, returned
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
        "`sample(seed, batch_size, dtype)` method) or a sampler config. "
        f"Received: noise={identifier!r}"
    )


def serialize(sampler) -> dict:
    """The `keras.saving` config of a sampler; `get` turns it back into one."""
    return keras.saving.serialize_keras_object(sampler)
