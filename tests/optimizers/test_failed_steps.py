"""A compiled step whose run-time check fails keeps the weights, slots and noise counter, and fit says why."""

import keras
import numpy as np
import pytest
from helpers import classification_data, mlp, to_numpy

import keras_noisygd as kn

pytestmark = pytest.mark.all_backends

COMPILED = keras.backend.backend() != "torch"  # XLA on TensorFlow, jax.jit on JAX; PyTorch runs eagerly and raises


def trained(x, y, batch_size, jit_compile):
    keras.utils.set_random_seed(0)
    model = mlp()
    optimizer = kn.NoisyGD(0.1, momentum=0.9, emulate_batch_size=2, seed=1, gradient_accumulation_steps=2)
    model.compile(optimizer, "sparse_categorical_crossentropy", jit_compile=jit_compile)
    error = None
    try:
        model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
    except Exception as e:  # noqa: BLE001 - the test looks at which error it is
        error = e
    return model, error


@pytest.mark.parametrize("jit_compile", [True, False] if COMPILED else [False])
def test_a_micro_batch_of_the_wrong_size_skips_its_step_and_stops_fit(jit_compile):
    x, y = classification_data(14)
    # Batches of 4: micro-batches 4, 4 (update 1), 4, 2 (update 2: its second micro-batch has the wrong size).
    model, error = trained(x, y, 4, jit_compile)
    assert error is not None
    assert "every micro-batch of an update must have the same size" in str(error)
    if jit_compile:  # the compiled step could not raise: the callback reads the recorded values
        assert "Received: a micro-batch of 2 examples in an update whose first micro-batch had 4" in str(error)
    # The reference: the same training on the first 12 examples, which never meets the bad micro-batch.
    reference, clean = trained(x[:12], y[:12], 4, jit_compile)
    assert clean is None
    for a, b in zip(model.trainable_weights, reference.trainable_weights):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))  # not NaN, not updated: exactly as before
    for a, b in zip(model.optimizer.variables, reference.optimizer.variables):
        if a.name != "noise_check":
            np.testing.assert_array_equal(to_numpy(a), to_numpy(b), err_msg=a.name)  # slots, iterations, counter
    assert to_numpy(model.optimizer.noise_state)[1] == 3  # micro-steps 1-3 counted, not the failed 4th


def test_the_record_is_reset_by_the_next_fit():
    x, y = classification_data(14)
    model, error = trained(x, y, 4, COMPILED)
    assert error is not None
    model.fit(x[:8], y[:8], batch_size=4, epochs=1, shuffle=False, verbose=0)  # a good run afterwards trains
    assert model.optimizer.failed_check_message() is None


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="eager JAX: the checks raise like PyTorch's")
def test_eager_jax_raises_the_check():
    x, y = classification_data(14)
    model = mlp()
    model.compile(kn.NoisyGD(0.1, emulate_batch_size=2, gradient_accumulation_steps=2), "sparse_categorical_crossentropy",
                  run_eagerly=True)
    with pytest.raises(ValueError, match="every micro-batch of an update must have the same size"):
        model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
