"""The small models the comparisons train, shared by every experiment."""

from __future__ import annotations

import keras

from keras_noisygd.layers import GhostBatchNormalization
from keras_noisygd.models import NoisySequential

MODELS = ("mlp", "cnn", "convsmall")
DEFAULT_WIDTH = {"mlp": 128, "cnn": 16, "convsmall": 10}


def build(name, input_shape, num_classes, width=None, ghost_batch_size=None):
    """A `NoisySequential` model: `"mlp"` (one hidden layer of `width` units) or `"cnn"`.

    The CNN (two blocks of 5-wide convolutions with `width` channels, ReLU and
    2x max-pooling, then a linear classifier) is 1-D for inputs of shape
    `[length]` (MNIST-1D) and 2-D for images `[height, width, channels]`.
    `ghost_batch_size` adds ghost-batch normalisation after each hidden layer
    (`keras_noisygd.layers.GhostBatchNormalization` with momentum 0.9 and
    epsilon `1e-5`, PyTorch's BatchNorm defaults).
    `width` defaults to `DEFAULT_WIDTH[name]`.

    `"convsmall"` is the reference code's Fashion-MNIST CNN (11,330 parameters
    on 28x28x1 inputs): conv 1->10 5x5 valid, max-pool 2, ReLU; conv 10->10 5x5
    valid, max-pool 2, ReLU; dense 160->50, ReLU; dense 50->10 (pooling before
    the ReLU, as there). Every weight and bias is drawn from N(0, 0.02^2).
    """
    if name not in MODELS:
        raise ValueError(f"Argument `model` must be one of {list(MODELS)}. Received: model={name!r}")

    def norm():
        return [GhostBatchNormalization(ghost_batch_size, momentum=0.9, epsilon=1e-5)] if ghost_batch_size else []

    width = width or DEFAULT_WIDTH[name]
    layers = [keras.Input(input_shape)]
    if name == "convsmall":
        return _convsmall(input_shape, num_classes, width, norm)
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


def _convsmall(input_shape, num_classes, width, norm):
    init = dict(kernel_initializer=keras.initializers.RandomNormal(0.0, 0.02),
                bias_initializer=keras.initializers.RandomNormal(0.0, 0.02))
    layers = [keras.Input(input_shape)]
    for _ in range(2):
        layers += [keras.layers.Conv2D(width, 5, **init), keras.layers.MaxPooling2D(), *norm(), keras.layers.ReLU()]
    layers += [keras.layers.Flatten(), keras.layers.Dense(50, **init), *norm(), keras.layers.ReLU(),
               keras.layers.Dense(num_classes, **init)]
    return NoisySequential(layers)
