"""One noise draw per update across Keras's gradient accumulation (full-batch noisy GD in micro-batches).

The exact comparisons run in float64. The accumulated and the single-batch
runs do the same per-example operations and differ only in summation order
(k partial sums, then Keras's `(g + acc) / k`), a relative rounding of ~1e-16
per step; a few steps of lr 0.2 on O(1) weights keep the difference below
1e-14, so `rtol=1e-10` leaves ~10^4 headroom. A wrong draw (each micro-batch
calibrated to itself, another seed, a mis-placed slice) moves the weights by
~1e-2 or more: `test_the_comparison_tells_the_draws_apart` pins that.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf  # the TensorFlow-only tests (TensorFlow is installed for every run)
from helpers import classification_data, exact, mlp, to_numpy

import keras_noisygd as kn
from keras_noisygd import noise

pytestmark = pytest.mark.all_backends

LOSS = "sparse_categorical_crossentropy"
N, K, B_EMULATED, UPDATES, SEED = 12, 3, 3, 3, 11
# Every noise class, templates and configured samplers, sparse and centred ones included.
NOISES = {
    "gaussian": dict(noise="gaussian", emulate_batch_size=B_EMULATED),
    "gaussian_centered": dict(noise="gaussian_centered", emulate_batch_size=B_EMULATED),
    "bernoulli": dict(noise="bernoulli", emulate_batch_size=B_EMULATED),
    "sgd": dict(noise="sgd", emulate_batch_size=B_EMULATED),
    "sgd_replacement": dict(noise=noise.SGDSampling(replacement=True), emulate_batch_size=B_EMULATED),
    "sparse_gaussian": dict(noise="sparse_gaussian", emulate_batch_size=B_EMULATED),
    "sparse_gaussian_centered": dict(noise="sparse_gaussian_centered", emulate_batch_size=B_EMULATED),
    "configured": dict(noise=noise.SparseGaussian(5, 0.8, centered=True)),
}


def fit(noise_kwargs, batch_size, epochs, accumulation=None, n=N, engine="weighted", jit_compile=False, seed=SEED):
    """A float64 MLP (L2, momentum) from fixed weights, fitted in order; returns the model."""
    x, y = classification_data(n, dtype="float64")
    keras.utils.set_random_seed(0)
    model = mlp(dtype="float64")
    optimizer = kn.NoisyGD(
        0.2, momentum=0.5, seed=seed, engine=engine, gradient_accumulation_steps=accumulation, **noise_kwargs
    )
    model.compile(optimizer, LOSS, jit_compile=jit_compile)
    model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0)
    return model


def assert_same_weights(a, b):
    for u, v in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_allclose(u, v, **exact(1e-10, 1e-13))  # see the module docstring


@pytest.mark.parametrize("name", list(NOISES))
def test_micro_batches_take_the_full_batch_steps(float64, name):
    full = fit(NOISES[name], batch_size=N, epochs=UPDATES)
    micro = fit(NOISES[name], batch_size=N // K, epochs=UPDATES, accumulation=K)
    assert int(to_numpy(micro.optimizer.iterations)) == UPDATES
    assert_same_weights(micro, full)


@pytest.mark.parametrize("engine, jit_compile", [("weighted", True), ("per_example", False), ("per_example", True)])
def test_micro_batches_take_the_full_batch_steps_with_xla_and_the_per_example_engine(float64, engine, jit_compile):
    if jit_compile and keras.backend.backend() == "torch":
        pytest.skip("jit_compile=True is torch.compile on PyTorch: its compilation would dominate the suite")
    kwargs = NOISES["sgd"]
    full = fit(kwargs, batch_size=N, epochs=UPDATES, jit_compile=jit_compile)
    micro = fit(kwargs, batch_size=N // K, epochs=UPDATES, accumulation=K, engine=engine, jit_compile=jit_compile)
    assert_same_weights(micro, full)


@pytest.mark.parametrize("name", ["gaussian_centered", "sgd", "bernoulli"])
def test_large_batch_variant_in_micro_batches_takes_the_large_batch_steps(float64, name):
    # n = 24 in large batches of B = 12 (SGD(3) emulated inside each), built from 3 micro-batches of 4.
    large = fit(NOISES[name], batch_size=12, epochs=2, n=24)
    micro = fit(NOISES[name], batch_size=4, epochs=2, n=24, accumulation=3)
    assert int(to_numpy(micro.optimizer.iterations)) == 4
    assert_same_weights(micro, large)


def test_the_comparison_tells_the_draws_apart(float64):
    # What the comparison above would have to miss: another seed, or each micro-batch
    # drawing for itself (emulating SGD(1) out of its own 4, the closest per-micro-batch calibration).
    full = fit(NOISES["gaussian_centered"], batch_size=N, epochs=UPDATES)
    other_seed = fit(NOISES["gaussian_centered"], batch_size=N, epochs=UPDATES, seed=SEED + 1)
    per_micro_batch = fit(dict(noise="gaussian_centered", emulate_batch_size=1), batch_size=N // K, epochs=UPDATES)
    for other in (other_seed, per_micro_batch):
        distance = max(np.abs(u - v).max() for u, v in zip(full.get_weights(), other.get_weights()))
        assert distance > 1e-2


def one_update_weights(noise_kwargs, n=16, micro_batch=4, shuffle=True, seed=SEED):
    """The loss weights of one accumulated update, read off through `fit`.

    One-hot inputs and a zero-initialised linear model with targets -n/2: the
    MSE gradient on weight i is `(1/n) m_i 2 (0 - y_i) = m_i`, so one SGD step of
    learning rate 1 sets weight i to `-m_i`, whichever micro-batch example i
    lands in after shuffling.
    """
    x, y = np.eye(n), np.full((n, 1), -n / 2)
    model = kn.NoisySequential([keras.Input((n,)), keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")])
    optimizer = kn.NoisyGD(1.0, seed=seed, gradient_accumulation_steps=n // micro_batch, **noise_kwargs)
    model.compile(optimizer, "mse")
    model.fit(x, y, batch_size=micro_batch, epochs=1, shuffle=shuffle, verbose=0)
    assert int(to_numpy(optimizer.iterations)) == 1
    return -model.get_weights()[0][:, 0]


@pytest.mark.parametrize("name", ["sgd", "gaussian_centered", "sparse_gaussian_centered", "bernoulli", "gaussian"])
def test_shuffled_micro_batches_share_one_coupled_draw(float64, name):
    n, b = 16, 4
    m = one_update_weights(dict(noise=name, emulate_batch_size=b))
    # The update's weights are the draw for N = 16 at seed [SEED, 0], in the shuffled order.
    draw = to_numpy(noise.get(name).calibrated(b, n).sample([SEED, 0], n, "float64"))
    np.testing.assert_allclose(np.sort(m), np.sort(draw), **exact(1e-12, 1e-12))
    if name == "sgd":  # exactly SGD(4) out of 16: four examples weighted 16/4, the rest 0
        np.testing.assert_allclose(np.sort(m), [0.0] * 12 + [4.0] * 4, **exact(0, 1e-12))
    if name in ("sgd", "gaussian_centered", "sparse_gaussian_centered"):
        np.testing.assert_allclose(m.sum(), n, **exact(1e-12))  # coupled across the micro-batches
    assert np.abs(m - 1).max() > 0.5  # noise was injected (each micro-batch of 4 emulating SGD(4) injects none)


def test_one_hot_reading_is_the_unshuffled_draw(float64):
    m = one_update_weights(dict(noise="gaussian", emulate_batch_size=4), shuffle=False)
    np.testing.assert_allclose(m, to_numpy(noise.Gaussian.emulating(4, 16).sample([SEED, 0], 16, "float64")), **exact(1e-12))


@pytest.mark.tensorflow_only  # a run-time assertion
@pytest.mark.parametrize("jit_compile", [False, True])
def test_a_micro_batch_of_another_size_is_refused(jit_compile):
    # 10 examples in micro-batches of 4: 4, 4 | 2, then (epoch 2) 4 -> an update of a 2 and a 4.
    x, y = classification_data(10)
    model = mlp()
    optimizer = kn.NoisyGD(0.1, noise="gaussian_centered", emulate_batch_size=2, seed=1, gradient_accumulation_steps=2)
    model.compile(optimizer, LOSS, jit_compile=jit_compile)
    if not jit_compile:
        with pytest.raises(tf.errors.InvalidArgumentError, match=(
            r"With `gradient_accumulation_steps=2` every micro-batch of an update must have the same size.*"
            r"Pass a `batch_size` that divides the number of training examples.*"
            r"Received: a micro-batch of\] \[4\] \[examples in an update whose first micro-batch had\] \[2\]")):
            model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0)
        return
    # XLA drops assertions: the step skips its update and records the check, and fit raises its message.
    with pytest.raises(ValueError, match=(
        r"every micro-batch of an update must have the same size.*Received: a micro-batch of 4 examples in an "
        r"update whose first micro-batch had 2 \(the step that failed this check was skipped")):
        model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0)
    assert all(np.isfinite(w).all() for w in model.get_weights())


def test_equal_micro_batches_across_epochs_are_fine(float64):
    # 12 examples, micro-batches of 4, k = 2: updates straddle epochs, every micro-batch has 4 examples.
    model = fit(NOISES["sgd"], batch_size=4, epochs=2, accumulation=2)
    assert int(to_numpy(model.optimizer.iterations)) == 3
    assert all(np.isfinite(w).all() for w in model.get_weights())


def test_noise_state_counts_micro_steps_and_draws_per_update():
    x, y = classification_data(16)
    model = mlp()
    optimizer = kn.NoisyGD(0.1, noise="bernoulli", emulate_batch_size=2, seed=9, gradient_accumulation_steps=2)
    model.compile(optimizer, LOSS)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)  # 4 micro-steps, 2 updates
    np.testing.assert_array_equal(to_numpy(optimizer.noise_state), [9, 4])
    assert int(to_numpy(optimizer.iterations)) == 2


def test_noise_monitor_measures_per_update_and_leaves_training_alone(float64):
    x, y = classification_data(N, dtype="float64")
    monitor = kn.NoiseMonitor((x, y), every_n_steps=1)
    models = []
    for callbacks in ([], [monitor]):
        keras.utils.set_random_seed(0)
        model = mlp(dtype="float64")
        model.compile(kn.NoisyGD(0.2, seed=SEED, gradient_accumulation_steps=K, **NOISES["sgd"]), LOSS)
        model.fit(x, y, batch_size=N // K, epochs=UPDATES, shuffle=False, verbose=0, callbacks=callbacks)
        models.append(model)
    for u, v in zip(models[0].get_weights(), models[1].get_weights()):
        np.testing.assert_array_equal(u, v)
    assert [h["step"] for h in monitor.history] == list(range(UPDATES + 1))  # before training, then per update


def micro_batches(count, size=4, seed=3):
    x, y = classification_data(count * size, seed=seed, dtype="float64")
    return x, y


@pytest.mark.parametrize("how", ["keras_file", "checkpoint"])
def test_a_save_in_the_middle_of_an_update_continues_exactly(float64, tmp_path, how):
    # 7 micro-batches with k = 3: saved after micro-step 4 (one micro-batch into update 2).
    x, y = micro_batches(7)
    split = 4 * 4

    def build():
        keras.utils.set_random_seed(0)
        model = mlp(dtype="float64")
        model.compile(kn.NoisyGD(0.2, momentum=0.5, seed=SEED, gradient_accumulation_steps=3, **NOISES["sgd"]), LOSS)
        return model

    straight = build()
    straight.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    first = build()
    first.fit(x[:split], y[:split], batch_size=4, epochs=1, shuffle=False, verbose=0)
    if how == "keras_file":
        first.save(tmp_path / "mid.keras")
        resumed = keras.models.load_model(tmp_path / "mid.keras")
    else:
        if keras.backend.backend() != "tensorflow":
            pytest.skip("tf.train.Checkpoint needs the TensorFlow backend")
        path = tf.train.Checkpoint(model=first, optimizer=first.optimizer).save(str(tmp_path / "ckpt"))
        resumed = build()
        resumed.optimizer.build(resumed.trainable_variables)
        tf.train.Checkpoint(model=resumed, optimizer=resumed.optimizer).restore(path).assert_consumed()
    np.testing.assert_array_equal(to_numpy(resumed.optimizer.noise_state), [SEED, 4])
    resumed.fit(x[split:], y[split:], batch_size=4, epochs=1, shuffle=False, verbose=0)
    for u, v in zip(resumed.get_weights(), straight.get_weights()):
        np.testing.assert_array_equal(u, v)  # the same operations in the same order: bit for bit
    for u, v in zip(resumed.optimizer.variables, straight.optimizer.variables):
        np.testing.assert_array_equal(to_numpy(u), to_numpy(v))  # accumulators and the micro-batch size too


XLA_COMPILE_COUNT = """
import keras, numpy as np
import keras_noisygd as kn
x = np.random.default_rng(0).normal(size=(16, 4)).astype("float32"); y = np.arange(16) % 3
model = kn.NoisySequential([keras.Input((4,)), keras.layers.Dense(3)])
model.compile(kn.NoisyGD(0.1, noise="sgd", emulate_batch_size=2, gradient_accumulation_steps=2),
              "sparse_categorical_crossentropy", jit_compile=True)
model.fit(x, y, batch_size=4, epochs=3, shuffle=False, verbose=0)  # 12 micro-steps, 6 updates
"""


@pytest.mark.tensorflow_only  # counts TensorFlow compilations
def test_xla_compiles_the_accumulated_step_once():
    # The micro-step's offset into the update's draw comes from the noise-state variable. An op that needs
    # it at compile time (tf.slice's `begin`) made XLA recompile the step at every update (2.5 s a step on
    # the CLI's CNN); TensorFlow logs each compilation at VLOG 1 of device_compiler.
    import os
    import subprocess
    import sys

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="0", TF_CPP_VMODULE="device_compiler=1")
    result = subprocess.run([sys.executable, "-c", XLA_COMPILE_COUNT], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    compilations = result.stderr.count("Compilation of XLA executable")
    assert 1 <= compilations <= 2, result.stderr[-2000:]  # the step (and at most one more shape), not 12
