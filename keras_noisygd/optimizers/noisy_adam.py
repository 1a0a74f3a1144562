"""`NoisyAdam` and `NoisyAdamW`: Adam and AdamW on the multiplicative-noise gradient."""

from __future__ import annotations

import keras

from keras_noisygd.optimizers.mixin import NoiseMixin

_register = keras.saving.register_keras_serializable(package="keras_noisygd")


@_register
class NoisyAdam(NoiseMixin, keras.optimizers.Adam):
    """`keras.optimizers.Adam` on the multiplicative-noise gradient.

    Same noise contract as `NoisyGD` (`noise`, `emulate_batch_size`, `seed`,
    `engine`, `chunk_size`);
    every other argument is Adam's. Adam's moments see the noisy gradient `G W`.

    Args:
        learning_rate: Defaults to `0.001`.
        noise: Defaults to `"gaussian_centered"`.
        emulate_batch_size: Defaults to `None`.
        seed: Defaults to `None`.
        **kwargs: Other `keras.optimizers.Adam` arguments.
    """

    def __init__(self, learning_rate=0.001, noise="gaussian_centered", emulate_batch_size=None, seed=None, **kwargs):
        super().__init__(
            learning_rate=learning_rate, noise=noise, emulate_batch_size=emulate_batch_size, seed=seed, **kwargs
        )


@_register
class NoisyAdamW(NoiseMixin, keras.optimizers.AdamW):
    """`keras.optimizers.AdamW` on the multiplicative-noise gradient (decoupled decay is not noised).

    Args:
        learning_rate: Defaults to `0.001`.
        noise: Defaults to `"gaussian_centered"`.
        emulate_batch_size: Defaults to `None`.
        seed: Defaults to `None`.
        **kwargs: Other `keras.optimizers.AdamW` arguments.
    """

    def __init__(self, learning_rate=0.001, noise="gaussian_centered", emulate_batch_size=None, seed=None, **kwargs):
        super().__init__(
            learning_rate=learning_rate, noise=noise, emulate_batch_size=emulate_batch_size, seed=seed, **kwargs
        )
