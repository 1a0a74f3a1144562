"""The model, data and training run shared by the tf.distribute scripts and `tests/test_distribute.py`.

Pure Keras, no strategy set-up: the scripts configure devices (or `TF_CONFIG`)
before TensorFlow starts and pass their strategy in; the test runs the same
function without one as the single-device reference.
"""

import argparse
import contextlib
import importlib.util
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

import keras_noisygd as kn

# (noise, emulate_batch_size): two classes whose weights are coupled across the batch
# (centred Gaussian: the mean of eps is removed; SGD sampling: a b-subset) and one that is not.
NOISES = {"gaussian_centered": 4, "sgd": 4, "bernoulli": 4}
# Every noise class, for the full-batch runs in micro-batches (gradient accumulation) on several replicas.
ALL_NOISES = {name: 4 for name in kn.noise.NAMES if name != "none"}
ACCUMULATION = 2  # micro-batches of BATCH // 2 per update of BATCH examples
DECAY = {"weight_decay": 0.05}  # Keras's decoupled weight decay, applied inside an accumulated update
CLIP = {"clipnorm": 0.5}  # Keras clips each replica's gradient before the all-reduce (docs/distributed.md)

# A tiny run of examples/multi_worker.py's training function (float32).
EXAMPLE_ARGS = argparse.Namespace(steps=3, batch_size=32, emulate_batch_size=4, noise="sgd")


def load_example():
    path = Path(__file__).resolve().parents[3] / "examples" / "multi_worker.py"
    spec = importlib.util.spec_from_file_location("multi_worker_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def use_float64():
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")


def data(n, features=5, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, features)), rng.integers(0, classes, n)


def initial_weights(features=5, hidden=7, classes=3, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(features, hidden)) / 2, rng.normal(size=hidden) / 10,
            rng.normal(size=(hidden, classes)) / 2, rng.normal(size=classes) / 10]


def build(noise, emulate_batch_size, seed, strategy=None, engine="weighted", accumulation=None, **optimizer_kwargs):
    """A compiled float64 `NoisyModel` (L2 regularizer, momentum) with fixed initial weights."""
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        inputs = keras.Input((5,))
        hidden = keras.layers.Dense(7, activation="tanh", kernel_regularizer=keras.regularizers.L2(1e-2))(inputs)
        model = kn.NoisyModel(inputs, keras.layers.Dense(3, activation="softmax")(hidden))
        model.set_weights(initial_weights())
        optimizer = kn.NoisyGD(
            0.2, noise=noise, emulate_batch_size=emulate_batch_size, momentum=0.5, seed=seed, engine=engine,
            gradient_accumulation_steps=accumulation, **optimizer_kwargs,
        )
        model.compile(optimizer, "sparse_categorical_crossentropy")
        optimizer.build(model.trainable_variables)
    return model


def train(
    noise, emulate_batch_size, n, batch_size, epochs, seed=7, strategy=None, sample_weight=None, engine="weighted",
    accumulation=None, **optimizer_kwargs,
):
    """Fits in order (`shuffle=False`) and returns the model; `accumulation` micro-batches per update."""
    model = build(noise, emulate_batch_size, seed, strategy, engine, accumulation, **optimizer_kwargs)
    x, y = data(n)
    model.fit(x, y, sample_weight=sample_weight, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0)
    return model


def train_loop(noise, emulate_batch_size, n, batch_size, epochs, seed=7, strategy=None, loss=None, accumulation=None):
    """The same run as `train`, in a custom training loop (`noise_weights`, `noisy_gradients`).

    Under a strategy every replica passes its own batch size to `noise_weights`
    and gets its slice of the global batch's weights. `loss=None` takes the
    compiled loss; a loss function gives the same maths through the other path
    of `noisy_gradients`.
    """
    strategy = strategy or tf.distribute.get_strategy()
    model = build(noise, emulate_batch_size, seed, strategy, accumulation=accumulation)
    optimizer = model.optimizer
    x, y = data(n)
    batches = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size).repeat(epochs)

    def replica_step(x, y):
        weights = optimizer.noise_weights(tf.shape(x)[0], keras.config.floatx())
        gradients = kn.noisy_gradients(model, x, y, weights, loss=loss)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))

    step = tf.function(lambda batch: strategy.run(replica_step, args=batch))
    for batch in strategy.experimental_distribute_dataset(batches):
        step(batch)
    return model
