"""The checks of the noise arguments every noisy optimizer takes, and the messages of its refusals."""

from __future__ import annotations

import keras

from keras_noisygd import noise as noise_lib
from keras_noisygd._checks import check_int
from keras_noisygd.optimizers.docs import DEFAULT_EMULATE_BATCH_SIZE

NO_NOISE_DRAWN = (
    "{name} received gradients for a step that drew no noise weights, so it would "
    "silently train without noise. A stock `keras.Model`'s train_step does not inject "
    "the sampling noise: build the model with `keras_noisygd.NoisyModel` / "
    "`keras_noisygd.NoisySequential`, or wrap it with `model = keras_noisygd.noisy(model)` "
    "before `compile`. In a custom training loop, call `weights = optimizer.noise_weights("
    "batch_size)` and `keras_noisygd.noisy_gradients(model, x, y, weights)` before "
    "`apply_gradients`. Received: gradients for {count} variables, with no noise weights drawn for their step."
)


def emulate_batch_size(b):
    """`None`, an int >= 1 (NumPy ints too) or a `LearningRateSchedule` (also from its config)."""
    if isinstance(b, dict):
        b = keras.optimizers.schedules.deserialize(b)
    if b is None or isinstance(b, keras.optimizers.schedules.LearningRateSchedule):
        return b
    try:
        return check_int("emulate_batch_size", b, 1)
    except ValueError:
        raise ValueError(
            "Argument `emulate_batch_size` must be None, an integer >= 1 or a "
            "`keras.optimizers.schedules.LearningRateSchedule` of the update step. "
            f"Received: emulate_batch_size={b!r}"
        ) from None


def noise(noise, emulate_batch_size):
    """`(sampler, b)`: the noise and the emulated batch size, `DEFAULT_EMULATE_BATCH_SIZE` for a template without one."""
    sampler = noise_lib.get(noise)
    b = emulate_batch_size
    template = getattr(sampler, "is_template", False)
    if b is None and template:
        b = DEFAULT_EMULATE_BATCH_SIZE
    if b is not None and not template:
        raise ValueError(
            f"Argument `emulate_batch_size` calibrates a noise template, but `noise` is already "
            f"configured: {sampler!r}. Pass one or the other. Received: emulate_batch_size={b}"
        )
    if isinstance(b, int):
        sampler.calibrated(b, b)  # raises now, not at the first step, if b cannot be emulated
    elif b is not None and getattr(sampler, "replacement", False):
        # Its b draws would be a tensor-sized array: no static shape for XLA.
        raise ValueError(
            "Argument `emulate_batch_size` can be a schedule for every noise class but SGD sampling with "
            f"replacement, which needs a fixed b. Received: noise={sampler!r}, emulate_batch_size={b!r}"
        )
    return sampler, b


ENGINES = ("weighted", "per_example")


def engine(engine, chunk_size):
    if engine not in ENGINES:
        raise ValueError(f"Argument `engine` must be one of {list(ENGINES)}. Received: engine={engine!r}")
    chunk_size = check_int("chunk_size", chunk_size, 1, allow_none=True)
    if chunk_size is not None:
        if engine != "per_example":
            raise ValueError(
                "Argument `chunk_size` only applies to engine='per_example' (the weighted engine never forms "
                f"the per-example gradients). Received: chunk_size={chunk_size}, engine={engine!r}"
            )
    return engine, chunk_size
