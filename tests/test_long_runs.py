"""Long runs: one trace for the whole run, and a fixed seed fixes the whole run.

(Flat memory over 10,000 steps is measured by benchmarks/long_run.py, not asserted here.)
"""

import keras
import numpy as np
import tensorflow as tf
from helpers import classification_data, mlp

import keras_noisygd as kn

LOSS = "sparse_categorical_crossentropy"


def counting(base):
    """A functional `base` model (NoisyModel or keras.Model) that counts its train-step traces."""

    class Counting(base):
        traces = 0

        def train_step(self, data):
            Counting.traces += 1  # Python runs once per trace
            return super().train_step(data)

    inputs = keras.Input((5,))
    return Counting(inputs, keras.layers.Dense(3, activation="softmax")(inputs))


def traces_per_fit(model, optimizer, jit_compile, fits):
    model.compile(optimizer, LOSS, metrics=["accuracy"], jit_compile=jit_compile)
    x, y = classification_data(20)
    counts = []
    for batch_size, epochs, extra in fits:
        model.fit(x, y, batch_size=batch_size, epochs=epochs, verbose=0, **extra)
        counts.append(type(model).traces)
    return counts


FITS = [
    (8, 3, {}),  # batches 8, 8, 4: the partial last batch relaxes the traced batch size to None
    (8, 2, {}),  # a second fit reuses the train function
    (6, 2, {"validation_split": 0.2}),  # another batch size, and validation
]


def test_traces_across_fit_calls_epochs_partial_batches_are_keras_own():
    # keras.Model traces its train step twice in the first fit with a partial batch (static
    # batch 8 first, then a relaxed unknown batch size) and never again; so does NoisyModel.
    # One trace then serves every batch size: the noise is calibrated at run time.
    noisy = counting(kn.NoisyModel)
    stock = counting(keras.Model)
    noisy_traces = traces_per_fit(noisy, kn.NoisyGD(0.1, noise="sgd", emulate_batch_size=4, momentum=0.5, seed=0),
                                  False, FITS)
    stock_traces = traces_per_fit(stock, keras.optimizers.SGD(0.1, momentum=0.5), False, FITS)
    assert noisy_traces == stock_traces == [2, 2, 2]
    assert int(noisy.optimizer.iterations.numpy()) == 3 * 3 + 2 * 3 + 2 * 3
    np.testing.assert_array_equal(noisy.optimizer.noise_state.numpy(), [0, 21])


def test_traces_under_xla():
    noisy = counting(kn.NoisyModel)
    optimizer = kn.NoisyGD(0.1, noise="gaussian_centered", emulate_batch_size=4, seed=0)
    assert traces_per_fit(noisy, optimizer, True, FITS[:2]) == [2, 2]


def test_a_new_static_batch_shape_is_one_more_trace_like_keras():
    # A dataset batched with drop_remainder=True has a static batch size: a second size
    # traces the step again (as it does `keras.Model.train_step`); repeats do not.
    model = counting(kn.NoisyModel)
    model.compile(kn.NoisyGD(0.1, noise="bernoulli", emulate_batch_size=4, seed=0), LOSS, jit_compile=False)
    x, y = classification_data(32)
    for batch_size in (8, 16, 8, 16):
        model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size, drop_remainder=True), verbose=0)
    assert type(model).traces == 2


def full_run(noise_seed=3):
    keras.utils.set_random_seed(42)  # initialisation and fit's shuffling
    x, y = classification_data(40)
    model = mlp()
    model.compile(kn.NoisyAdam(0.01, noise="gaussian_centered", emulate_batch_size=4, seed=noise_seed), LOSS,
                  metrics=["accuracy"], jit_compile=False)
    history = model.fit(x, y, batch_size=8, epochs=2, shuffle=True, validation_split=0.2, verbose=0)
    return model.get_weights(), history.history


def test_a_fixed_seed_fixes_the_whole_run():
    # Shuffling, initialisation (Keras's seed) and noise (the optimizer's seed) all fixed.
    (weights_a, history_a), (weights_b, history_b) = full_run(), full_run()
    assert history_a == history_b and set(history_a) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    for a, b in zip(weights_a, weights_b):
        np.testing.assert_array_equal(a, b)
    # Not vacuous: the same run with another noise seed ends elsewhere.
    other_weights, _ = full_run(noise_seed=4)
    assert np.abs(other_weights[0] - weights_a[0]).max() > 1e-3
