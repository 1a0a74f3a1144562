"""Bernoulli noise: each example kept with probability `p` and weighted `1/p`, independently."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

import numpy as np
from keras import ops

from keras_noisygd._checks import check_real
from keras_noisygd.noise import threefry
from keras_noisygd.noise.sampler import Sampler, constant, emulated, register


@register
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
        w, _ = threefry.words(seed, n, 0)
        keep = ops.less(threefry.to_uniform(w), constant(self.p, "float32"))  # u < 1 = p keeps all
        return ops.cast(keep, dtype) / constant(self.p, dtype)

    def covariance(self, num_examples):
        return (1 / self.p - 1) * np.eye(num_examples)

    def variance(self, num_examples):
        return 1 / self.p - 1

    @classmethod
    def emulating(cls, batch_size, num_examples):
        """`p = b / N`."""
        b, n = emulated(batch_size, num_examples)
        return cls(p=b / n)
