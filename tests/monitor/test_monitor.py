"""NoiseMonitor's statistics against NumPy computed from an explicit per-example gradient loop (float64).

Tolerance 1e-9 relative: the same float64 quantities computed two ways (a Gram
matrix against direct sums over the flattened per-example gradients); the
differences are rounding, ~1e-15 relative.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import classification_data, mlp

import keras_noisygd as kn
from keras_noisygd import noise

N_PROBE = 10


def _explicit_G(model, x, y):
    rows = []
    for i in range(len(x)):
        with tf.GradientTape() as tape:
            pred = model(x[i : i + 1], training=True)
            loss = keras.losses.sparse_categorical_crossentropy(y[i : i + 1], pred)[0] + sum(model.losses)
        grads = tape.gradient(loss, model.trainable_variables)
        rows.append(np.concatenate([np.ravel(g) for g in grads]))
    return np.stack(rows)


def _fit_with_monitor(noise_name, b=4, steps=4, **monitor_args):
    x, y = classification_data(n=16, dtype="float64")
    model = mlp(dtype="float64")
    model.compile(kn.NoisyGD(0.3, noise=noise_name, emulate_batch_size=b, seed=2), "sparse_categorical_crossentropy")
    monitor = kn.NoiseMonitor((x[:N_PROBE], y[:N_PROBE]), every_n_steps=2, **monitor_args)
    history = model.fit(x, y, batch_size=16, epochs=steps, verbose=0, callbacks=[monitor])
    return model, monitor, history, (x[:N_PROBE], y[:N_PROBE])


@pytest.mark.parametrize("noise_name", ["gaussian_centered", "sgd", "bernoulli", "sparse_gaussian"])
def test_statistics_equal_numpy_from_the_explicit_gradient_matrix(float64, noise_name):
    b = 4
    model, monitor, history, (x, y) = _fit_with_monitor(noise_name, b)
    assert [entry["step"] for entry in monitor.history] == [0, 2, 4]
    assert monitor.gram_source == "layers"  # an MLP: K from the layers' inputs and output gradients, no G
    last = monitor.history[-1]  # measured after the last step: the model's final weights
    G = _explicit_G(model, x, y)
    n = len(G)
    g = G.mean(0)
    population = np.sum((G - g) ** 2) / n  # (1/n) sum_i |G_i - g|^2
    sgd_trace = (n - b) / (b * (n - 1)) * population  # SGD(b) without replacement out of n
    sampler = noise.get(noise_name).calibrated(b, n)
    weights = sampler.sample(np.array([0, 4]), n, "float64").numpy()
    xi = ((weights - 1.0) @ G) / n
    expected = {
        "grad_norm": np.linalg.norm(g),
        "noise_norm": np.linalg.norm(xi),
        "noise_to_grad": np.linalg.norm(xi) / np.linalg.norm(g),
        "sgd_cov_trace": sgd_trace,
        "noise_cov_trace": np.trace(sampler.covariance(n) @ G @ G.T) / n**2,
        "noise_scale": np.sum((G - g) ** 2) / (n - 1) / np.dot(g, g),
    }
    for key, value in expected.items():
        np.testing.assert_allclose(last[key], value, rtol=1e-9, err_msg=key)
    if noise_name in ("gaussian_centered", "sgd"):  # centred classes match SGD(b)'s covariance exactly
        np.testing.assert_allclose(last["noise_cov_trace"], sgd_trace, rtol=1e-9)
    # The last measurement is in fit's logs, so History has it per epoch.
    assert history.history["noise/grad_norm"][-1] == last["grad_norm"]
    assert set(history.history) >= {f"noise/{k}" for k in kn.monitor.STATISTICS}


def test_uncalibrated_noise_trace_differs_from_sgd(float64):
    # A Gaussian of fixed std 1 (not calibrated): tr Cov = tr(K)/n^2, not SGD's value.
    x, y = classification_data(n=16, dtype="float64")
    model = mlp(dtype="float64")
    model.compile(kn.NoisyGD(0.1, noise=noise.Gaussian(std=1.0), seed=1), "sparse_categorical_crossentropy")
    monitor = kn.NoiseMonitor((x[:N_PROBE], y[:N_PROBE]), every_n_steps=1, sgd_batch_size=2)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[monitor])
    G = _explicit_G(model, x[:N_PROBE], y[:N_PROBE])
    np.testing.assert_allclose(monitor.history[-1]["noise_cov_trace"], np.sum(G**2) / N_PROBE**2, rtol=1e-9)


def test_monitor_leaves_training_unchanged(float64):
    # Same seed with and without the monitor: identical weights (it draws from its own stream, changes no state).
    x, y = classification_data(n=16, dtype="float64")
    results = []
    for callbacks in ([], [kn.NoiseMonitor((x[:N_PROBE], y[:N_PROBE]), every_n_steps=1)]):
        keras.utils.set_random_seed(1)
        model = mlp(dtype="float64")
        model.compile(kn.NoisyGD(0.3, emulate_batch_size=4, seed=2), "sparse_categorical_crossentropy")
        model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=callbacks)
        results.append(model.get_weights())
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_tensorboard_scalars_are_written(float64, tmp_path):
    _fit_with_monitor("gaussian_centered", log_dir=str(tmp_path))
    events = list(tmp_path.glob("events.out.tfevents.*"))
    assert events
    tags = {
        value.tag
        for event in tf.compat.v1.train.summary_iterator(str(events[0]))
        for value in event.summary.value
    }
    assert tags == {f"noise/{k}" for k in kn.monitor.STATISTICS}


def test_bad_arguments():
    x, y = classification_data(n=16)
    with pytest.raises(ValueError, match=r"`every_n_steps` must be an integer >= 1. Received: every_n_steps=0"):
        kn.NoiseMonitor((x, y), every_n_steps=0)
    with pytest.raises(ValueError, match=r"`probe_batch` must be a tuple"):
        kn.NoiseMonitor(x)
    with pytest.raises(ValueError, match=r"`method` must be 'auto' or 'per_example'. Received: method='gram'$"):
        kn.NoiseMonitor((x, y), method="gram")
    model = mlp()
    model.compile(kn.NoisyGD(0.1, noise=noise.Gaussian(std=1.0)), "sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match=r"`sgd_batch_size` is needed.*Received: sgd_batch_size=None"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[kn.NoiseMonitor((x, y))])
