"""Small models and data shared by the tests."""

import keras
import numpy as np

import keras_noisygd as kn


def to_numpy(x):
    """A tensor or variable of any backend as a NumPy array."""
    return keras.ops.convert_to_numpy(x)


def exact(rtol, atol=0.0):
    """A float64 comparison's tolerances, loosened on PyTorch.

    Keras's own float64 training on PyTorch is not float64 throughout: a stock
    `keras.optimizers.SGD` step of a float64 Dense model lands ~2e-9 off the
    float64 NumPy step (measured with Keras 3.15 / torch 2.14), ~4e-8 after a
    few steps. There the bound is float32-sized; a wrong draw is off by O(1).
    """
    if keras.backend.backend() == "torch":
        return dict(rtol=max(rtol, 1e-6), atol=max(atol, 1e-7))
    return dict(rtol=rtol, atol=atol)


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


def gradient(function, values):
    """NumPy gradients of the scalar `function(values)` with respect to the list of tensors `values`, on any backend.

    The reference for per-example tests: TensorFlow's tape, `jax.grad`, or
    PyTorch autograd on copies of the values.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        values = [tf.convert_to_tensor(v) for v in values]
        with tf.GradientTape() as tape:
            tape.watch(values)
            value = function(values)
        grads = tape.gradient(value, values, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return [to_numpy(tf.convert_to_tensor(g)) for g in grads]
    if backend == "jax":
        import jax

        return [np.asarray(g) for g in jax.grad(function)(list(values))]
    import torch

    values = [v.detach().clone().requires_grad_(True) for v in values]
    grads = torch.autograd.grad(function(values), values, allow_unused=True, materialize_grads=True)
    return [g.detach().cpu().numpy() for g in grads]
