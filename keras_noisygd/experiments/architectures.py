"""The small models the comparisons train, shared by every experiment, and ghost-batch normalisation."""

from __future__ import annotations

import keras
import tensorflow as tf

from keras_noisygd.models import NoisySequential

MODELS = ("mlp", "cnn")


@keras.saving.register_keras_serializable(package="keras_noisygd")
class GhostBatchNormalization(keras.layers.Layer):
    """Batch normalisation with statistics per "ghost batch" of `ghost_batch_size` examples.

    Training splits the batch into chunks of `ghost_batch_size` and normalises each
    with its own mean and variance, as small-batch SGD would see them (Hoffer et al.
    2017, https://arxiv.org/abs/1705.08741); the moving statistics average the
    chunks'. Inference uses the moving statistics. The batch size must be a multiple
    of `ghost_batch_size`.

    Args:
        ghost_batch_size: Examples per ghost batch.
        momentum: Momentum of the moving statistics. Defaults to `0.9`.
        epsilon: Added to the variance. Defaults to `1e-5`.
    """

    def __init__(self, ghost_batch_size, momentum=0.9, epsilon=1e-5, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(ghost_batch_size, int) or ghost_batch_size < 1:
            raise ValueError(
                f"Argument `ghost_batch_size` must be an integer >= 1. Received: ghost_batch_size={ghost_batch_size!r}"
            )
        self.ghost_batch_size, self.momentum, self.epsilon = ghost_batch_size, momentum, epsilon

    def build(self, input_shape):
        channels = (input_shape[-1],)
        self.gamma = self.add_weight(shape=channels, initializer="ones", name="gamma")
        self.beta = self.add_weight(shape=channels, initializer="zeros", name="beta")
        self.moving_mean = self.add_weight(shape=channels, initializer="zeros", trainable=False, name="moving_mean")
        self.moving_variance = self.add_weight(shape=channels, initializer="ones", trainable=False, name="moving_variance")

    def call(self, inputs, training=False):
        if not training:
            return self._normalize(inputs, self.moving_mean, self.moving_variance)
        g = self.ghost_batch_size
        batch = tf.shape(inputs)[0]
        checks = [tf.debugging.assert_equal(batch % g, 0, message=f"The batch size must be a multiple of ghost_batch_size={g}.")]
        with tf.control_dependencies(checks):
            ghosts = tf.reshape(inputs, tf.concat([[batch // g, g], tf.shape(inputs)[1:]], 0))
        axes = list(range(1, len(inputs.shape)))  # within a ghost batch, all but the channels
        mean, variance = tf.nn.moments(ghosts, axes=axes, keepdims=True)
        normalized = self._normalize(ghosts, mean, variance)
        for moving, value in ((self.moving_mean, mean), (self.moving_variance, variance)):
            value = tf.reshape(tf.reduce_mean(value, axis=0), [-1])
            moving.assign(self.momentum * moving + (1 - self.momentum) * value)
        return tf.reshape(normalized, tf.shape(inputs))

    def _normalize(self, x, mean, variance):
        return (x - mean) * tf.math.rsqrt(variance + self.epsilon) * self.gamma + self.beta

    def get_config(self):
        return {**super().get_config(), "ghost_batch_size": self.ghost_batch_size, "momentum": self.momentum, "epsilon": self.epsilon}


DEFAULT_WIDTH = {"mlp": 128, "cnn": 16}


def build(name, input_shape, num_classes, width=None, ghost_batch_size=None):
    """A `NoisySequential` model: `"mlp"` (one hidden layer of `width` units) or `"cnn"`.

    The CNN (two blocks of 5-wide convolutions with `width` channels, ReLU and
    2x max-pooling, then a linear classifier) is 1-D for inputs of shape
    `[length]` (MNIST-1D) and 2-D for images `[height, width, channels]`.
    `ghost_batch_size` adds ghost-batch normalisation after each hidden layer.
    `width` defaults to `DEFAULT_WIDTH[name]`.
    """
    if name not in MODELS:
        raise ValueError(f"Argument `model` must be one of {list(MODELS)}. Received: model={name!r}")

    def norm():
        return [GhostBatchNormalization(ghost_batch_size)] if ghost_batch_size else []

    width = width or DEFAULT_WIDTH[name]
    layers = [keras.Input(input_shape)]
    if name == "mlp":
        layers += [keras.layers.Flatten(), keras.layers.Dense(width), *norm(), keras.layers.ReLU()]
    elif len(input_shape) == 1:
        layers += [keras.layers.Reshape((input_shape[0], 1))]
        for _ in range(2):
            layers += [keras.layers.Conv1D(width, 5, padding="same"), *norm(), keras.layers.ReLU(), keras.layers.MaxPooling1D()]
        layers += [keras.layers.Flatten()]
    else:
        for _ in range(2):
            layers += [keras.layers.Conv2D(width, 5, padding="same"), *norm(), keras.layers.ReLU(), keras.layers.MaxPooling2D()]
        layers += [keras.layers.Flatten()]
    layers += [keras.layers.Dense(num_classes)]
    return NoisySequential(layers)
