"""The draw of one update's weights: the noise calibrated to SGD(`b`) out of the update's examples.

`update_weights(optimizer, state, update, size, dtype)` is `NoiseMixin.noise_weights`'s
draw, apart from slicing it into micro-steps and replicas: the seed of
update `update`, the emulated `b` (fixed or scheduled), the calibrated
sampler (made once per pair of static sizes) and the run-time conditions.
"""

from __future__ import annotations

from keras import ops

from keras_noisygd import _backend
from keras_noisygd._checks import at_most, is_static
from keras_noisygd.optimizers import checks


def update_weights(optimizer, state, update, size, dtype):
    """`(weights, run-time conditions)`: the draw of update `update`, of `size` examples in all, from the
    noise state's value `state`."""
    if (optimizer.gradient_accumulation_steps or 1) > 1:
        seed = ops.stack([state[0], ops.cast(update, _backend.COUNTER_DTYPE)])
    else:
        seed = state  # [seed, counter], and the counter is the update (two operations fewer)
    b, conditions = checks.emulated_batch_size(optimizer.emulate_batch_size, update)
    if b is None:
        return optimizer.noise.sample(seed, size, dtype), conditions
    if is_static(b) and is_static(size):
        if size >= b:
            optimizer._flags.full_update_seen = True
        elif optimizer._flags.full_update_seen:
            # A smaller update after full ones: a partial last batch, which JAX and PyTorch see with its
            # static size (TensorFlow's traced step sees it at run time, below). Drawing fewer than b
            # examples already carries at least SGD(b)'s noise.
            return ops.ones([size], dtype), conditions
    # Checked before calibrating, so that a static b > B names the user's argument.
    run_time_check = at_most("emulate_batch_size", b, "the batch size B of every step", size)
    sampler = calibrated(optimizer, b, size)
    if not run_time_check:
        return sampler.sample(seed, size, dtype), conditions
    (b_fits, _), = run_time_check
    weights = ops.cond(
        b_fits,
        lambda: sampler.sample(seed, size, dtype),
        lambda: ops.ones([size], dtype),
    )
    return weights, conditions


def calibrated(optimizer, b, size):
    """`optimizer.noise` calibrated to SGD(`b`) out of `size`, made once per pair of static sizes: an eager
    step would otherwise rebuild and re-validate it, and check for vanishing noise, at every update."""
    if not (is_static(b) and is_static(size)):
        optimizer.warn_if_noiseless(size)
        return optimizer.noise.calibrated(b, size)
    key = (optimizer.noise, b, size)  # the noise too: an attribute a user may set
    made = optimizer._calibrations
    if key not in made:
        made[key] = optimizer.noise.calibrated(b, size)
        optimizer.warn_if_noiseless(size)
    return made[key]
