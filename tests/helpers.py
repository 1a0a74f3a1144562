"""Small models and data shared by the tests."""

import keras
import numpy as np

import keras_noisygd as kn


def to_numpy(x):
    """A tensor or variable of any backend as a NumPy array."""
    return keras.ops.convert_to_numpy(x)


def classification_data(n=16, features=5, classes=3, seed=0, dtype="float32"):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, features)).astype(dtype), rng.integers(0, classes, n)


def mlp(dtype="float32", model_class=kn.NoisyModel, l2=1e-2, features=5, classes=3):
    inputs = keras.Input((features,), dtype=dtype)
    hidden = keras.layers.Dense(
        7, activation="tanh", dtype=dtype, kernel_regularizer=keras.regularizers.L2(l2) if l2 else None
    )(inputs)
    outputs = keras.layers.Dense(classes, activation="softmax", dtype=dtype)(hidden)
    return model_class(inputs, outputs)


class FixedWeights:
    """A user sampler: always the given weights (an object with `sample`, nothing else)."""

    def __init__(self, weights):
        self.weights = np.asarray(weights)

    def sample(self, seed, batch_size, dtype="float32"):
        return keras.ops.convert_to_tensor(self.weights, dtype=dtype)
