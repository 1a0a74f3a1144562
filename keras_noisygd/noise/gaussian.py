"""Gaussian multiplicative noise, dense (`Gaussian`) and on a random subset of the batch (`SparseGaussian`)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

import numpy as np
from keras import ops

from keras_noisygd._checks import at_most, check_bool, check_int, check_real, is_static
from keras_noisygd.noise import threefry
from keras_noisygd.noise.sampler import Sampler, as_float, centering, constant, emulated, maximum, register, sqrt


@register
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
        make = lambda k0, k1s: self._host_rows(k0, k1s, n, dtype)  # noqa: E731
        on_host = threefry.host_rows(self, seed, n, dtype, make) if is_static(self.std) else None
        if on_host is not None:
            return on_host
        eps = threefry.normals(seed, n, 0, dtype)
        if self.centered:
            eps = eps - ops.mean(eps)
        return 1 + constant(self.std, dtype) * eps

    def _host_rows(self, k0, k1s, n, dtype):
        """`_sample` in NumPy for a block of keys (an eager step on a CPU): one crossing instead of ~6 operations."""
        eps = threefry.normal_rows(k0, k1s, n, 0, dtype)
        if self.centered:
            eps = eps - eps.mean(axis=1, keepdims=True)
        return 1 + np.asarray(self.std, dtype) * eps

    def covariance(self, num_examples):
        base = centering(num_examples) if self.centered else np.eye(num_examples)
        return self.std**2 * base

    def variance(self, num_examples):
        return self.std**2 * ((1 - 1 / num_examples) if self.centered else 1.0)

    @classmethod
    def emulating(cls, batch_size, num_examples, centered=False):
        """`std^2 = N/b` (uncentred) or `N(N-b)/(b(N-1))` (centred)."""
        b, n = emulated(batch_size, num_examples)
        if centered:
            # N = 1 forces b = 1, where SGD has no noise (0/0 otherwise).
            variance = n * (n - b) / (b * maximum(n - 1, 1.0))
        else:
            variance = n / b
        return cls(std=sqrt(variance), centered=centered)



@register
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
        mask = ops.cast(threefry.smallest(threefry.words(seed, n, 0)[0], self.num_noisy), dtype)
        eps = threefry.normals(seed, n, 1, dtype) * mask
        if self.centered:
            eps = (eps - ops.sum(eps) / constant(self.num_noisy, dtype)) * mask
        return 1 + constant(self.std, dtype) * eps

    def covariance(self, num_examples):
        N, k, s2 = num_examples, self.num_noisy, self.std**2
        if self.centered:
            return s2 * (k - 1) / (N - 1) * centering(N)
        return s2 * k / N * np.eye(N)

    def variance(self, num_examples):
        N, k, s2 = num_examples, self.num_noisy, self.std**2
        return s2 * (k - 1) / N if self.centered else s2 * k / N

    @classmethod
    def emulating(cls, batch_size, num_examples, num_noisy=None, centered=False):
        """`std = N / sqrt(b k)` (uncentred) or `std^2 = N(N-b)/(b(k-1))` (centred); `k` defaults to `b`."""
        b, n = emulated(batch_size, num_examples)
        k = check_int("num_noisy", batch_size if num_noisy is None else num_noisy, 2 if centered else 1)
        k_ = as_float(k)
        variance = n * (n - b) / (b * (k_ - 1)) if centered else n * n / (b * k_)
        return cls(num_noisy=k, std=sqrt(variance), centered=centered)
