"""What needs the TensorFlow backend for now: a clear error on JAX and PyTorch instead of an ImportError.

`per_example_gradients` and `NoiseMonitor` are built on `tf.vectorized_map`,
`tf.GradientTape` and `tf.function`; their JAX (`jax.vmap`) and PyTorch
(`torch.func`) versions are not written yet.
"""

from __future__ import annotations

import keras


def _refuse(what):
    raise ValueError(
        f"`keras_noisygd.{what}` needs the TensorFlow backend for now (it is built on `tf.vectorized_map`); "
        "noisy training itself (`NoisyModel`, `NoisyGD`, ...) runs on every backend. Set "
        "`KERAS_BACKEND=tensorflow` to use it. "
        f"Received: the {keras.backend.backend()!r} backend"
    )


def per_example_gradients(*args, **kwargs):
    """Refused off TensorFlow: see this module's docstring."""
    _refuse("per_example_gradients")


class NoiseMonitor(keras.callbacks.Callback):
    """Refused off TensorFlow: see this module's docstring."""

    def __init__(self, *args, **kwargs):
        _refuse("NoiseMonitor")
