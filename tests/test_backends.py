"""The same noisy training on every Keras backend: the JAX statelessness trap, cross-backend training, distribution.

Each test here runs on the backend of the pytest run (`KERAS_BACKEND`), and CI
runs this file on TensorFlow, JAX and PyTorch (the generator and the draws
against their NumPy reference are `tests/noise/test_threefry.py`);
`test_every_backend_trains_to_the_same_weights` also trains one model on each
installed backend in a process of its own.
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from helpers import to_numpy

import keras_noisygd as kn
from keras_noisygd import noise

pytestmark = pytest.mark.all_backends

# ---------------------------------------------------------------- the draws through `fit`: the JAX trap
N, STEPS = 8, 60


def weights_through_fit(seed, noise_kwargs, steps=STEPS):
    """The loss weights of each step, read back from training.

    One-hot inputs, a bias-free Dense(1) and the loss `y_pred` make example i's
    loss the weight w_i, so SGD with learning rate N moves w_i by -m_i: the
    weights of step k are w_k - w_{k+1}. One epoch per step, so the weights are
    read back from the trainer's state on every backend (JAX syncs at epoch end).
    """
    model = kn.NoisySequential([keras.Input((N,)), keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")])
    model.compile(kn.NoisyGD(float(N), seed=seed, **noise_kwargs), loss=lambda y_true, y_pred: y_pred[:, 0])
    history = []
    record = keras.callbacks.LambdaCallback(on_epoch_end=lambda *_: history.append(model.get_weights()[0][:, 0]))
    model.fit(np.eye(N, dtype="float32"), np.zeros(N, "float32"), batch_size=N, epochs=steps, shuffle=False,
              verbose=0, callbacks=[record])
    w = np.stack([np.zeros(N, "float32")] + history)
    return w[:-1] - w[1:]


def test_fit_draws_fresh_weights_each_step_from_the_seed():
    # The trap: a naive JAX port reads the optimizer's noise state as its initial value inside the compiled
    # step, so it draws the weights of seed [0, 0] at every step and ignores the user's seed, with no error.
    sampler = noise.Gaussian.emulating(2, N, centered=True)
    got = weights_through_fit(seed=11, noise_kwargs=dict(noise="gaussian_centered", emulate_batch_size=2), steps=4)
    for k in range(4):  # w_i grows to |sum of draws| ~ 10: float32 rounding of the differences ~1e-6
        np.testing.assert_allclose(got[k], to_numpy(sampler.sample([11, k], N)), rtol=0, atol=1e-5)
    assert np.abs(got[1] - got[0]).max() > 0.1  # the draws differ between steps
    other = weights_through_fit(seed=12, noise_kwargs=dict(noise="gaussian_centered", emulate_batch_size=2), steps=1)
    assert np.abs(other[0] - got[0]).max() > 0.1  # and between seeds


def test_weights_through_fit_have_sgds_mean_and_covariance():
    b = 3
    m = weights_through_fit(seed=5, noise_kwargs=dict(noise="sgd", emulate_batch_size=b))
    np.testing.assert_allclose(np.sort(m, axis=1)[:, -b:], N / b, rtol=1e-6)  # b examples weighted N/b
    np.testing.assert_allclose(np.sort(m, axis=1)[:, :-b], 0, atol=1e-6)  # the rest 0
    m = weights_through_fit(seed=5, noise_kwargs=dict(noise="gaussian_centered", emulate_batch_size=b), steps=400)
    sgd = noise.SGDSampling(b).covariance(N)
    # 400 draws: the sample covariance's entries have standard error ~ var * sqrt(2 / 400) ~ 0.07 * var.
    np.testing.assert_allclose(m.mean(0), 1, atol=0.4)
    np.testing.assert_allclose(np.cov(m.T), sgd, atol=0.3 * sgd[0, 0])


# ---------------------------------------------------------------- one model trained on each backend
CROSS_BACKEND_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import keras
    import keras_noisygd as kn

    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 5)).astype("float32")
    y = (x[:, 0] + x[:, 1] > 0).astype("int32")
    result = {}
    for name in kn.noise.NAMES:
        inputs = keras.Input((5,))
        hidden = keras.layers.Dense(8, activation="tanh", kernel_regularizer=keras.regularizers.L2(1e-2))(inputs)
        model = kn.NoisyModel(inputs, keras.layers.Dense(2, activation="softmax")(hidden))
        model.set_weights([np.random.default_rng(i).normal(size=w.shape).astype("float32") * 0.5
                           for i, w in enumerate(model.get_weights())])
        b = None if name == "none" else 4
        model.compile(kn.NoisyGD(0.1, noise=name, emulate_batch_size=b, momentum=0.9, seed=3),
                      "sparse_categorical_crossentropy", metrics=["accuracy"])
        history = model.fit(x, y, batch_size=16, epochs=4, shuffle=False, verbose=0).history
        result[name] = {"weights": np.concatenate([w.ravel() for w in model.get_weights()]).tolist(),
                        "loss": history["loss"]}
    print("RESULT" + json.dumps(result))
    """
)


def _train_on(backend):
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", CROSS_BACKEND_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


@pytest.mark.slow
def test_every_backend_trains_to_the_same_weights():
    if keras.backend.backend() != "tensorflow":
        pytest.skip("run once, from the TensorFlow run: it starts a process per backend")
    backends = [b for b, module in (("tensorflow", "tensorflow"), ("jax", "jax"), ("torch", "torch"))
                if importlib.util.find_spec(module)]
    results = {backend: _train_on(backend) for backend in backends}
    first = results[backends[0]]
    for backend in backends[1:]:
        for name in first:
            # float32 on every backend; 12 steps with momentum through a small MLP: rounding differences
            # (summation order, float32 log/cos in the Gaussian draws) stay below 1e-5 on O(1) weights.
            np.testing.assert_allclose(results[backend][name]["weights"], first[name]["weights"], rtol=0, atol=1e-5,
                                       err_msg=f"{backend} vs {backends[0]}, noise={name}")
            np.testing.assert_allclose(results[backend][name]["loss"], first[name]["loss"], rtol=1e-5)


# ---------------------------------------------------------------- the scale issue's parts, in float32 (JAX's default)
def fit_mlp(batch_size, accumulation, noise_kwargs, epochs=3):
    x, y = np.random.default_rng(0).normal(size=(24, 5)).astype("float32"), np.arange(24) % 3
    inputs = keras.Input((5,))
    model = kn.NoisyModel(inputs, keras.layers.Dense(3, activation="softmax")(keras.layers.Dense(7, "tanh")(inputs)))
    model.set_weights([np.random.default_rng(i).normal(size=w.shape).astype("float32") * 0.5
                       for i, w in enumerate(model.get_weights())])
    optimizer = kn.NoisyGD(0.2, momentum=0.5, seed=4, gradient_accumulation_steps=accumulation, **noise_kwargs)
    model.compile(optimizer, "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0)
    return model


@pytest.mark.parametrize("name", ["sgd", "gaussian_centered", "sparse_gaussian_centered"])
def test_micro_batches_take_the_full_batch_steps_in_float32(name):
    kwargs = dict(noise=name, emulate_batch_size=4)
    full, micro = fit_mlp(24, None, kwargs), fit_mlp(8, 3, kwargs)
    assert int(to_numpy(micro.optimizer.iterations)) == 3
    np.testing.assert_array_equal(to_numpy(micro.optimizer.noise_state), [4, 9])  # 9 micro-steps, 3 draws
    for a, b in zip(micro.get_weights(), full.get_weights()):
        # float32: a sum of 3 micro-batch means against one mean of 24 rounds differently, ~1e-7 per step.
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    other = fit_mlp(8, None, kwargs)  # three separate updates of 8 with their own draws: not the same steps
    assert max(np.abs(a - b).max() for a, b in zip(other.get_weights(), full.get_weights())) > 1e-3


def test_ghost_batch_normalization_is_batch_normalization_ghost_by_ghost():
    x = np.random.default_rng(0).normal(2.0, 3.0, size=(10, 4)).astype("float32")
    layer = kn.layers.GhostBatchNormalization(4, momentum=0.5)
    out = to_numpy(layer(x, training=True))
    expected = []
    for start in range(0, 10, 4):  # ghost batches of 4, 4 and 2 examples
        bn = keras.layers.BatchNormalization(momentum=0.5)
        expected.append(to_numpy(bn(x[start:start + 4], training=True)))
    # float32 moments of values ~3: rounding ~1e-6.
    np.testing.assert_allclose(out, np.concatenate(expected), rtol=1e-5, atol=1e-5)
    ghosts = [x[s:s + 4] for s in range(0, 10, 4)]
    mean = sum(len(g) * g.mean(0) for g in ghosts) / 10
    np.testing.assert_allclose(to_numpy(layer.moving_mean), 0.5 * mean, rtol=1e-5)


# ---------------------------------------------------------------- keras.distribution on JAX
DATA_PARALLEL_SCRIPT = textwrap.dedent(
    """
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import json
    import jax
    import keras
    import numpy as np
    import keras_noisygd as kn

    assert len(jax.devices()) == 2, jax.devices()
    x = np.random.default_rng(0).normal(size=(32, 5)).astype("float32")
    y = np.arange(32) % 3

    def train():
        inputs = keras.Input((5,))
        model = kn.NoisyModel(inputs, keras.layers.Dense(3, activation="softmax")(keras.layers.Dense(6, "tanh")(inputs)))
        model.set_weights([np.random.default_rng(i).normal(size=w.shape).astype("float32") * 0.5
                           for i, w in enumerate(model.get_weights())])
        model.compile(kn.NoisyGD(0.2, noise="sgd", emulate_batch_size=4, seed=6), "sparse_categorical_crossentropy")
        model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
        devices = len(model.trainable_variables[0].value.sharding.device_set)  # replicated over the mesh
        return [w.tolist() for w in model.get_weights()], model.optimizer.noise_state.numpy().tolist(), devices

    single = train()
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()))
    parallel = train()
    print("RESULT" + json.dumps({"single": single, "parallel": parallel}))
    """
)


@pytest.mark.slow
def test_jax_data_parallel_over_two_devices_is_the_single_device_fit():
    if keras.backend.backend() != "jax":
        pytest.skip("keras.distribution.DataParallel runs on JAX")
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", DATA_PARALLEL_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT"))[6:])
    (single, single_state, one), (parallel, parallel_state, two) = result["single"], result["parallel"]
    assert (one, two) == (1, 2)  # the second run is on both devices
    assert single_state == parallel_state == [6, 6]  # one draw per global batch of 16, 6 steps
    for a, b in zip(single, parallel):
        # The step sees the global batch (sharded over the two devices) and draws its weights once, as one
        # device does; only the cross-device reduction's float32 summation order differs (~1e-7).
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-6)


DATA_PARALLEL_ACCUMULATION_SCRIPT = textwrap.dedent(
    """
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import json
    import jax
    import keras
    import numpy as np
    import keras_noisygd as kn

    x = np.random.default_rng(0).normal(size=(32, 5)).astype("float32")
    y = np.arange(32) % 3
    NOISES = ["sgd", "gaussian", "gaussian_centered", "bernoulli", "sparse_gaussian", "sparse_gaussian_centered"]

    def train(noise, k):
        inputs = keras.Input((5,))
        model = kn.NoisyModel(inputs, keras.layers.Dense(3, activation="softmax")(keras.layers.Dense(6, "tanh")(inputs)))
        model.set_weights([np.random.default_rng(i).normal(size=w.shape).astype("float32") * 0.5
                           for i, w in enumerate(model.get_weights())])
        optimizer = kn.NoisyGD(0.2, noise=noise, emulate_batch_size=4, seed=6, gradient_accumulation_steps=k)
        model.compile(optimizer, "sparse_categorical_crossentropy")
        model.fit(x, y, batch_size=16 // (k or 1), epochs=3, shuffle=False, verbose=0)
        return [w.tolist() for w in model.get_weights()]

    whole = {noise: train(noise, None) for noise in NOISES}  # one device, updates of 16 in one batch
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()))
    split = {noise: train(noise, 2) for noise in NOISES}  # two devices, updates of 16 in 2 micro-batches of 8
    print("RESULT" + json.dumps({"whole": whole, "split": split}))
    """
)


@pytest.mark.slow
def test_jax_data_parallel_with_accumulation_is_the_single_device_whole_batch_fit():
    if keras.backend.backend() != "jax":
        pytest.skip("keras.distribution.DataParallel runs on JAX")
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", DATA_PARALLEL_ACCUMULATION_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT"))[6:])
    assert len(result["whole"]) == 6
    for name, whole in result["whole"].items():
        # One draw per update of 16, sliced over 2 micro-batches x 2 devices: the same update as one batch of
        # 16 on one device. JAX runs float32 here (no x64); accumulation and the cross-device sum only change
        # the summation order (~1e-7), while a second draw or a wrong slice would move the weights by ~1e-2.
        for a, b in zip(whole, result["split"][name]):
            np.testing.assert_allclose(np.array(b), np.array(a), rtol=1e-5, atol=1e-6, err_msg=name)


def test_a_micro_batch_of_another_size_raises_with_its_message():
    # 10 examples in micro-batches of 4: 4, 4 | 2, then (epoch 2) 4 -> an update of a 2 and a 4.
    x, y = np.random.default_rng(0).normal(size=(10, 5)).astype("float32"), np.arange(10) % 3
    inputs = keras.Input((5,))
    model = kn.NoisyModel(inputs, keras.layers.Dense(3, activation="softmax")(inputs))
    optimizer = kn.NoisyGD(0.1, noise="gaussian_centered", emulate_batch_size=2, seed=1, gradient_accumulation_steps=2)
    torch = keras.backend.backend() == "torch"
    # Compiled on TensorFlow too (XLA; without it TensorFlow raises, tested in test_accumulation.py). PyTorch
    # runs eagerly and the check raises itself; a compiled step skips its update and fit raises the message.
    model.compile(optimizer, "sparse_categorical_crossentropy", jit_compile=not torch)
    with pytest.raises(ValueError, match=r"every micro-batch of an update must have the same size.*"
                                         r"Received: a micro-batch of 4 examples in an update whose first "
                                         r"micro-batch had 2"):
        model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0, callbacks=[keras.callbacks.TerminateOnNaN()])
    assert all(np.isfinite(w).all() for w in model.get_weights())  # the failed step was skipped, not applied


# ---------------------------------------------------------------- PyTorch distributed data parallel: refused
DDP_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=int(sys.argv[1]), world_size=2)
    import keras
    import numpy as np
    import keras_noisygd as kn

    inputs = keras.Input((5,))
    model = kn.NoisyModel(inputs, keras.layers.Dense(3, activation="softmax")(inputs))
    model.compile(kn.NoisyGD(0.1, noise="sgd", emulate_batch_size=2, seed=1), "sparse_categorical_crossentropy")
    try:
        model.fit(np.zeros((8, 5), "float32"), np.zeros(8), batch_size=4, verbose=0)
    except ValueError as error:
        print("REFUSED", error)
    dist.destroy_process_group()
    """
)


@pytest.mark.slow
def test_torch_distributed_data_parallel_is_refused_clearly():
    if keras.backend.backend() != "torch":
        pytest.skip("PyTorch's torch.distributed")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = dict(os.environ, KERAS_BACKEND="torch")
    workers = [subprocess.Popen([sys.executable, "-c", DDP_SCRIPT, str(rank), port], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE) for rank in (0, 1)]
    outputs = [worker.communicate(timeout=300) for worker in workers]
    for worker, (out, err) in zip(workers, outputs):
        assert worker.returncode == 0, err[-3000:]
        assert "REFUSED NoisyGD does not support PyTorch distributed data parallel" in out, out + err[-2000:]
        assert "world size 2" in out
