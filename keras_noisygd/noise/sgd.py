"""No noise and SGD's own sampling noise: the two ends every other class is calibrated between."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

import numpy as np
from keras import ops

from keras_noisygd._checks import at_most, check_bool, check_int
from keras_noisygd.noise import threefry
from keras_noisygd.noise.sampler import Sampler, centering, constant, register


@register
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

    def variance(self, num_examples):
        return 0.0

    @classmethod
    def emulating(cls, batch_size, num_examples):
        """`NoNoise()`: there is nothing to calibrate."""
        return cls()



@register
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
        scale = constant(n, dtype) / constant(self.batch_size, dtype)
        if self.replacement:
            w, _ = threefry.words(seed, self.batch_size, 0)
            draws = ops.cast(threefry.below(w, n), "int32")
            counts = ops.segment_sum(ops.ones([self.batch_size], dtype), draws, num_segments=n)
            return scale * counts
        w, _ = threefry.words(seed, n, 0)
        return scale * ops.cast(threefry.smallest(w, self.batch_size), dtype)

    def covariance(self, num_examples):
        N, b = num_examples, self.batch_size
        if self.replacement:
            return (N / b) * centering(N)
        if N == 1:
            return np.zeros((1, 1))
        return N * (N - b) / (b * (N - 1)) * centering(N)

    def variance(self, num_examples):
        N, b = num_examples, self.batch_size
        return (N / b) * (1 - 1 / N) if self.replacement else (N - b) / b

    @classmethod
    def emulating(cls, batch_size, num_examples, replacement=False):
        """`SGDSampling(batch_size, replacement)`: exact by construction (checks `b <= N`)."""
        batch_size = check_int("batch_size", batch_size, 1)
        if not replacement:
            at_most("batch_size", batch_size, "num_examples", num_examples)
        return cls(batch_size=batch_size, replacement=replacement)
