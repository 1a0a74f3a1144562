"""The sampler contract: per-example loss weights with mean 1, and the helpers its classes share.

Every sampler draws a vector ``m`` of per-example *loss weights* with
``E[m_i] = 1``. Training on the re-weighted loss ``(1/N) sum_i m_i l_i`` takes
the step ``G W`` with ``W = m / N``: the paper's multiplicative noise, in one
backward pass.

The scalar helpers below take Python numbers at build time and tensors inside
a traced step, where the batch size or a scheduled ``b`` is only known at run
time; the noise classes (`sgd.py`, `gaussian.py`, `bernoulli.py`) use them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Optional

import keras
import numpy as np
from keras import ops

from keras_noisygd import _backend
from keras_noisygd._checks import at_most, check_int, guarded, is_static
from keras_noisygd.noise import threefry

register = keras.saving.register_keras_serializable(package="keras_noisygd")
"""Registers a sampler class under `keras_noisygd>Name`, the name `.keras` files store."""


def sqrt(x):
    return math.sqrt(x) if is_static(x) else ops.sqrt(x)


def maximum(x, y):
    return max(x, y) if is_static(x) else ops.maximum(x, y)


def as_float(n):
    """`n` as a Python float, or a tensor in the widest float of the backend (sizes known at run time)."""
    return float(n) if is_static(n) else ops.cast(n, _backend.wide_float())


def constant(x, dtype):
    """`x` in `dtype`; a Python float goes straight there (not through float32)."""
    return ops.convert_to_tensor(x, dtype) if is_static(x) else ops.cast(x, dtype)


def centering(n):
    """The `[n, n]` centring matrix `I - 11^T/n` (NumPy)."""
    return np.eye(n) - np.ones((n, n)) / n


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
        return guarded(self._sample(threefry.as_seed(seed), num_examples, dtype), conditions)

    def covariance(self, num_examples: int) -> np.ndarray:
        """The exact `[num_examples, num_examples]` covariance matrix of the weights (NumPy)."""
        raise NotImplementedError

    def variance(self, num_examples: int) -> float:
        """The mean variance of one weight, `trace(Cov[m]) / N`, without forming the matrix.

        `0.0` means the weights are all 1: no noise. The classes give closed
        forms; this fallback forms `covariance(num_examples)`.
        """
        return float(np.trace(self.covariance(num_examples))) / num_examples

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


def emulated(batch_size, num_examples):
    """Checks `1 <= b <= N` (now for numbers); `(b, N)` as Python numbers or float tensors."""
    batch_size = check_int("batch_size", batch_size, 1)
    at_most("batch_size", batch_size, "num_examples", num_examples)
    return as_float(batch_size), as_float(num_examples)
