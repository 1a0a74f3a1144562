"""The run-time checks of a draw that a compiled step cannot raise: recorded in `noise_check`, read after.

Under XLA or `jax.jit` a failed check (a micro-batch of the wrong size, a
schedule value below 1, an empty batch, a sampler's own bound) cannot stop
the step. The draw records the first failure as `[code, value, value]` in the
optimizer variable `noise_check`, the optimizer skips its update while one is
recorded, and `message` turns the record back into the check's text.
"""

from __future__ import annotations

import warnings

import keras
import numpy as np
from keras import ops

from keras_noisygd import _backend
from keras_noisygd._checks import is_static

MICRO_BATCH = (
    "With `gradient_accumulation_steps={k}` every micro-batch of an update must have the same size: the "
    "update's noise is drawn once for {k} x that many examples. Pass a `batch_size` that divides the "
    "number of training examples (`keras_noisygd.micro_batches(len(x), max_batch_size)` finds one), or "
    "batch a dataset with `drop_remainder=True`."
)
SAMPLER_CHECK = (
    "The noise sampler's run-time check failed (its weights were not finite), e.g. a sparse class's "
    "`num_noisy` or SGD sampling's `batch_size` larger than the step's batch"
)
NOISELESS = (
    "{name}: noise {noise!r} calibrated to emulate SGD(b={b}) out of the B={B} examples of an update injects no "
    "noise (SGD of the whole batch is GD), so training is plain gradient descent. For full-batch noisy GD pass "
    "`batch_size=len(x)` to `fit` (or micro-batches with `gradient_accumulation_steps`); for the large-batch "
    "variant use a batch B larger than b; or lower `emulate_batch_size`. See \"Choosing b\" in docs/idea.md."
)


def record(variable, messages, conditions, weights):
    """Stores the first failing `(condition, message)` of `conditions` (or non-finite `weights`) in `variable`.

    `messages` maps each code to its message parts (recorded while tracing);
    a failure already recorded is kept. Returns whether the host read back
    that every check passed (then nothing is recorded), else `False`.
    """
    if _backend.draws_on_host(weights) and _passed_on_host(conditions, weights):
        return True  # an eager step on a CPU, where reading the values back is cheaper than ~20 small operations
    code = ops.where(ops.all(ops.isfinite(weights)), 0, len(conditions) + 1)
    values = [ops.zeros((), _backend.COUNTER_DTYPE)] * 2
    for index in reversed(range(len(conditions))):
        ok, message = conditions[index]
        messages[index + 1] = message
        tensors = [ops.cast(p, _backend.COUNTER_DTYPE) for p in message if not isinstance(p, str)][:2]
        tensors += values[len(tensors):]
        failed = ops.logical_not(ops.cast(ok, "bool"))
        code = ops.where(failed, index + 1, code)
        values = [ops.where(failed, t, v) for t, v in zip(tensors, values)]
    messages[len(conditions) + 1] = [SAMPLER_CHECK]
    new = ops.stack([ops.cast(code, _backend.COUNTER_DTYPE), *values])
    old = variable.value
    variable.assign(ops.where(ops.equal(old[0], 0), new, old))
    return False


def _passed_on_host(conditions, weights):
    """Whether every condition holds and every weight is finite, read back to the host."""
    # The weights read back whole and checked in NumPy: one crossing instead of two backend operations and one.
    return all(bool(ops.convert_to_numpy(ok)) for ok, _ in conditions) and bool(
        np.isfinite(_backend.to_host(weights)).all()
    )


def message(record_value, messages):
    """The text of a `noise_check` value (NumPy `[code, value, value]`), or `None` when no check failed."""
    code, *values = (int(v) for v in record_value)
    if code == 0:
        return None
    parts, filled = messages.get(code, [SAMPLER_CHECK]), iter(values)
    return " ".join(p if isinstance(p, str) else str(next(filled, "?")) for p in parts)


def same_micro_batch(first_size, step_size, micro_step, k):
    """Records the first micro-batch's size in `first_size`; the run-time condition that this one has the same size."""
    size = ops.cast(step_size, _backend.COUNTER_DTYPE)
    expected = ops.where(ops.equal(micro_step, 0), size, first_size.value)
    first_size.assign(expected)
    message = [MICRO_BATCH.format(k=k), "Received: a micro-batch of", size,
               "examples in an update whose first micro-batch had", expected]
    return [(ops.equal(size, expected), message)]


def emulated_batch_size(b, update):
    """`(b, run-time conditions)` at `update`: `None`, an int, or a schedule's rounded value (float32)."""
    if not isinstance(b, keras.optimizers.schedules.LearningRateSchedule):
        return b, []
    value = ops.round(ops.cast(b(update), "float32"))
    message = ["Argument `emulate_batch_size` (a schedule) must give values >= 1. Received: emulate_batch_size=",
               value, "at update", update]
    return value, [(ops.greater_equal(value, 1), message)]


def is_noiseless(noise, b, update_size):
    """Whether the template `noise` calibrated to SGD(`b`) out of `update_size` examples draws `m = 1`."""
    if not (isinstance(b, int) and is_static(update_size)) or b > update_size:
        return False  # unknown now, or b > B: an error of its own, raised at the draw
    if not getattr(noise, "is_template", False):
        return False
    return noise.calibrated(b, int(update_size)).variance(int(update_size)) == 0


def save_variables(optimizer, store, skipped):
    """`Optimizer.save_own_variables` (by position, as Keras writes them), without `skipped`."""
    for i, variable in enumerate(v for v in optimizer.variables if v is not skipped):
        store[str(i)] = ops.convert_to_numpy(variable)


def load_variables(optimizer, store, skipped):
    """`Optimizer.load_own_variables` without `skipped`; as there, a count that differs warns and loads nothing."""
    variables = [v for v in optimizer.variables if v is not skipped]
    if len(store.keys()) != len(variables):
        warnings.warn(
            f"Skipping variable loading for optimizer '{optimizer.name}', because it has {len(variables)} variables "
            f"whereas the saved optimizer has {len(store.keys())} variables.", stacklevel=3,
        )
        return
    for i, variable in enumerate(variables):
        variable.assign(store[str(i)])
