"""`NoisyGD`: the paper's multiplicative-noise gradient descent, on `keras.optimizers.SGD`."""

from __future__ import annotations

import keras

from keras_noisygd.optimizers.bases import keras_class
from keras_noisygd.optimizers.docs import with_noise_args
from keras_noisygd.optimizers.mixin import NoiseMixin


@keras.saving.register_keras_serializable(package="keras_noisygd")
@with_noise_args
class NoisyGD(NoiseMixin, keras_class(keras.optimizers.SGD)):
    """Multiplicative-noise gradient descent (the paper's MSGD), on `keras.optimizers.SGD`.

    Each step draws per-example loss weights `m` with `E[m_i] = 1` from the
    noise class and descends the re-weighted loss, i.e. the gradient matrix
    times the sampling noise `W = m / B`:

    ```
    m ~ noise calibrated to SGD(b) out of B          # fresh each step
    g = grad( (1/B) sum_i m_i l_i(theta) + reg(theta) )   # = G W + grad reg
    velocity = momentum * velocity - learning_rate * g
    theta = theta + velocity                          # (Nesterov as in SGD)
    ```

    With `noise="none"` (or SGD sampling with `b = B`) it is
    `keras.optimizers.SGD`, step for step.

    Conventions: the noise is a per-example *loss weight* with mean 1, not an
    additive or per-coordinate perturbation; the learning rate multiplies the
    noisy gradient; `emulate_batch_size=b` calibrates to the batch `B` the step
    actually sees. Train with `keras_noisygd.NoisyModel` (or `noisy(model)`);
    a stock `keras.Model` raises at the start of `fit` rather than train without noise.

    Positional arguments are `keras.optimizers.SGD`'s (`NoisyGD(0.1, 0.9)` is
    momentum 0.9); the noise arguments are keyword-only. `NoisyGD()` builds:
    learning rate 0.01, no momentum, centred Gaussian noise emulating SGD(32).

    Args:
        learning_rate: A float, a schedule or a callable. Defaults to `0.01`.
        momentum: Momentum, as in `keras.optimizers.SGD`. Defaults to `0.0`.
        nesterov: Nesterov momentum. Defaults to `False`.
        {{noise_args}}
        **kwargs: Other `keras.optimizers.SGD` arguments (`weight_decay`,
            `clipnorm`, `use_ema`, `gradient_accumulation_steps`, `name`, ...).

    Example:

    ```python
    model = keras_noisygd.NoisyModel(inputs, outputs)
    model.compile(
        optimizer=keras_noisygd.NoisyGD(0.1, noise="bernoulli", emulate_batch_size=32),
        loss="sparse_categorical_crossentropy",
    )
    model.fit(x, y, batch_size=len(x), epochs=1000)   # full-batch noisy GD ~ SGD(32)
    ```

    References:
        Wu et al., "On the Noisy Gradient Descent that Generalizes as SGD",
        ICML 2020, https://arxiv.org/abs/1906.07405
    """

    def __init__(
        self,
        learning_rate=0.01,
        momentum=0.0,
        nesterov=False,
        *,
        noise="gaussian_centered",
        emulate_batch_size=None,
        seed=None,
        engine="weighted",
        chunk_size=None,
        **kwargs,
    ):
        super().__init__(
            learning_rate=learning_rate,
            momentum=momentum,
            nesterov=nesterov,
            noise=noise,
            emulate_batch_size=emulate_batch_size,
            seed=seed,
            engine=engine,
            chunk_size=chunk_size,
            **kwargs,
        )
