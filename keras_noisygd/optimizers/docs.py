"""The noise arguments' docs, shared by every noisy optimizer as Keras shares `base_optimizer_keyword_args`.

A class docstring writes `{{noise_args}}` where the arguments go; `with_noise_args` fills it in.
"""

from __future__ import annotations

DEFAULT_EMULATE_BATCH_SIZE = 32  # Keras's default `fit` batch size: the SGD a Keras user would otherwise run

NOISE_ARGS = """noise: A name from `keras_noisygd.noise.NAMES`, a sampler, or a sampler
            config. A name, or a sampler whose noise size is `None`, is a
            *template* calibrated by `emulate_batch_size`. Defaults to
            `"gaussian_centered"`: Gaussian weights with exactly SGD's
            covariance (the paper's MSGD-Cov), the class that emulates SGD most
            closely while drawing no discrete subset.
        emulate_batch_size: The SGD batch size `b` a template noise emulates:
            an int, or a `keras.optimizers.schedules.LearningRateSchedule` of the
            update step (rounded to the nearest integer). At every update the
            class is calibrated to SGD(`b`) drawn out of that update's `B`
            examples (`B` = the training set for full-batch noisy GD). `None`
            means 32 for a template, Keras's default batch size, and nothing
            for a configured sampler. A class calibrated with `b >= B` injects
            no noise (SGD(`B`) out of `B` is GD); the optimizer warns once when
            that happens (see "Choosing b" in docs/idea.md). Defaults to `None`.
        seed: Int seed of the noise stream, in `[0, 2**31)`. `None` draws one,
            recorded in the config. The same seed draws the same weights on
            every backend. Defaults to `None`.
        engine: How the train step forms `G W`. `"weighted"`: the gradient of
            the re-weighted loss, one backward pass, `G` never formed.
            `"per_example"`: forms `G` with `keras_noisygd.per_example_gradients`
            and contracts it with the weights (the same update to float
            rounding; slower). Defaults to `"weighted"`.
        chunk_size: With `engine="per_example"`, examples per vectorised chunk
            (bounds the memory of `G` to `chunk_size` rows); `None` forms all
            `B` rows at once. Defaults to `None`."""


def with_noise_args(cls):
    """Fills `{{noise_args}}` in `cls.__doc__` with `NOISE_ARGS`."""
    if cls.__doc__ and "{{noise_args}}" in cls.__doc__:
        cls.__doc__ = cls.__doc__.replace("{{noise_args}}", NOISE_ARGS)
    return cls
