"""`NoisyAdam` and `NoisyAdamW`: Adam and AdamW on the multiplicative-noise gradient."""

from __future__ import annotations

import keras

from keras_noisygd.optimizers.bases import keras_class
from keras_noisygd.optimizers.docs import with_noise_args
from keras_noisygd.optimizers.mixin import NoiseMixin

_register = keras.saving.register_keras_serializable(package="keras_noisygd")


@_register
@with_noise_args
class NoisyAdam(NoiseMixin, keras_class(keras.optimizers.Adam)):
    """`keras.optimizers.Adam` on the multiplicative-noise gradient.

    The noise contract is `NoisyGD`'s; Adam's moments see the noisy gradient
    `G W`. Positional arguments are `keras.optimizers.Adam`'s
    (`NoisyAdam(1e-3, 0.8)` is `beta_1=0.8`); the noise arguments are
    keyword-only. `NoisyAdam()` builds: Adam's defaults, centred Gaussian
    noise emulating SGD(32).

    Args:
        learning_rate: Defaults to `0.001`.
        beta_1: Defaults to `0.9`.
        beta_2: Defaults to `0.999`.
        epsilon: Defaults to `1e-7`.
        amsgrad: Defaults to `False`.
        {{noise_args}}
        **kwargs: Other `keras.optimizers.Adam` arguments.
    """

    def __init__(
        self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7, amsgrad=False, *,
        noise="gaussian_centered", emulate_batch_size=None, seed=None, engine="weighted", chunk_size=None, **kwargs,
    ):
        super().__init__(
            learning_rate=learning_rate, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon, amsgrad=amsgrad,
            noise=noise, emulate_batch_size=emulate_batch_size, seed=seed, engine=engine, chunk_size=chunk_size,
            **kwargs,
        )


@_register
@with_noise_args
class NoisyAdamW(NoiseMixin, keras_class(keras.optimizers.AdamW)):
    """`keras.optimizers.AdamW` on the multiplicative-noise gradient (decoupled decay is not noised).

    Positional arguments are `keras.optimizers.AdamW`'s (`NoisyAdamW(1e-3,
    1e-2)` is `weight_decay=1e-2`); the noise arguments are keyword-only, as in
    `NoisyGD`.

    Args:
        learning_rate: Defaults to `0.001`.
        weight_decay: Defaults to `0.004`.
        beta_1: Defaults to `0.9`.
        beta_2: Defaults to `0.999`.
        epsilon: Defaults to `1e-7`.
        amsgrad: Defaults to `False`.
        {{noise_args}}
        **kwargs: Other `keras.optimizers.AdamW` arguments.
    """

    def __init__(
        self, learning_rate=0.001, weight_decay=0.004, beta_1=0.9, beta_2=0.999, epsilon=1e-7, amsgrad=False, *,
        noise="gaussian_centered", emulate_batch_size=None, seed=None, engine="weighted", chunk_size=None, **kwargs,
    ):
        super().__init__(
            learning_rate=learning_rate, weight_decay=weight_decay, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon,
            amsgrad=amsgrad, noise=noise, emulate_batch_size=emulate_batch_size, seed=seed, engine=engine,
            chunk_size=chunk_size, **kwargs,
        )
