"""Argument checks shared by every module: one rule per kind of argument, one message format.

Python and NumPy numbers are checked when they are given; a tensor (a batch
size known only inside a traced step) is checked at run time through
`run_time_at_most` and `guarded`.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
from keras import ops

from keras_noisygd import _backend


def is_static(value) -> bool:
    """Whether `value` is a Python or NumPy number (known now), not a tensor."""
    return isinstance(value, (numbers.Number, np.generic))


def _is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def check_int(name, value, minimum=None, *, maximum=None, allow_none=False):
    """`value` as a Python int if it is an integer in `[minimum, maximum]` (NumPy ints too), else ValueError.

    A tensor is returned as it is (checked at run time by the caller). `None`
    passes when `allow_none`.
    """
    if value is None and allow_none:
        return None
    if ops.is_tensor(value):
        return value
    if not _is_integer(value) or (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        if minimum is not None and maximum is not None:
            rule = f"an integer in [{minimum}, {maximum}]"
        elif minimum is not None:
            rule = f"an integer >= {minimum}"
        else:
            rule = "an integer"
        if allow_none:
            rule = "None or " + rule
        raise ValueError(f"Argument `{name}` must be {rule}. Received: {name}={value!r}")
    return int(value)


def check_real(name, value, rule, ok):
    """A finite real number with `ok(value)`; `None` and tensors pass."""
    if value is None or ops.is_tensor(value):
        return
    if not is_static(value) or isinstance(value, (bool, np.bool_)) or not math.isfinite(value) or not ok(value):
        raise ValueError(f"Argument `{name}` must be {rule}. Received: {name}={value!r}")


def check_bool(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"Argument `{name}` must be True or False. Received: {name}={value!r}")


def at_most(name, value, limit_name, limit):
    """`value <= limit`: raised now for numbers; a list of run-time `(condition, message)` pairs for tensors."""
    if is_static(value) and is_static(limit):
        if value > limit:
            raise ValueError(
                f"Argument `{name}` must be <= {limit_name}. Received: {name}={value}, {limit_name}={limit}"
            )
        return []
    ok = ops.less_equal(ops.cast(value, "float32"), ops.cast(limit, "float32"))  # exact below 2**24
    message = [f"Argument `{name}` must be <= {limit_name}. Received: {name}=", value, f"{limit_name}=", limit]
    return [(ok, message)]


def guarded(weights, conditions):
    """`weights`, checked against run-time `(condition, message)` pairs.

    A message is a string or a list of strings and tensors. Where the backend
    can stop at run time it raises with the message: `InvalidArgumentError` on
    TensorFlow without XLA, `ValueError` on PyTorch. A compiled step cannot
    raise (XLA, `jax.jit`), so the weights are also replaced by NaN; the
    noisy optimizers record the failed condition (`checks.record`) and skip
    the step's update, and `FailedNoiseCheck` stops `fit` with the message,
    rather than training silently with the wrong noise.
    """
    if not conditions:
        return weights
    weights = _backend.asserted(weights, conditions)
    all_ok = ops.all(ops.stack([ops.cast(ok, "bool") for ok, _ in conditions]))
    return ops.where(all_ok, weights, ops.cast(float("nan"), weights.dtype))


EMPTY_BATCH = "Argument `batch_size` must be >= 1: an empty batch has no examples to weight. Received: batch_size="


def check_batch_size(batch_size):
    """`batch_size`, refused if empty: now for a Python int, at run time for a tensor (`_backend.asserted`).

    A compiled step cannot raise; there the noisy optimizers' draw records an
    empty batch as a failed check and skips the step, like any other.
    """
    if not ops.is_tensor(batch_size):
        return check_int("batch_size", batch_size, 1)
    message = [EMPTY_BATCH, batch_size]
    return _backend.asserted(batch_size, [(batch_size >= 1, message)])
