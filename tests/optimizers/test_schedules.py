"""`emulate_batch_size` as a schedule of the update step (e.g. an emulated batch that grows, Smith et al. 2018)."""

import keras
import numpy as np
import pytest
import tensorflow as tf  # the TensorFlow-only tests (TensorFlow is installed for every run)
from helpers import classification_data, exact, mlp, to_numpy

import keras_noisygd as kn
from keras_noisygd import noise

pytestmark = pytest.mark.all_backends

N, UPDATES, SEED, LR = 8, 5, 23, 0.05
TEMPLATES = [n for n in noise.NAMES if n != "none"]


def growing():
    """b = 2 for updates 0 and 1, then b = 4 (PiecewiseConstantDecay: `step <= 1` takes the first value)."""
    return keras.optimizers.schedules.PiecewiseConstantDecay([1], [2.0, 4.0])


def linear_model():
    return kn.NoisySequential([keras.Input((3,)), keras.layers.Dense(1)])


@pytest.mark.parametrize("name", TEMPLATES)
@pytest.mark.parametrize("accumulation, jit_compile", [(None, False), (2, False), (2, True)])
def test_a_schedule_calibrates_each_update_to_its_own_b(float64, name, accumulation, jit_compile):
    if jit_compile and keras.backend.backend() == "torch" and name != "gaussian_centered":
        # torch.compile: ~80 s for its first compilation, ~12 s for each later one; one noise class covers it.
        pytest.skip("jit_compile=True is torch.compile on PyTorch: one noise class runs it")
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(N, 3)), rng.normal(size=(N, 1))
    model = linear_model()
    w, c = (to_numpy(v) for v in model.weights)
    optimizer = kn.NoisyGD(LR, noise=name, emulate_batch_size=growing(), seed=SEED,
                           gradient_accumulation_steps=accumulation)
    model.compile(optimizer, "mse", jit_compile=jit_compile)
    model.fit(x, y, batch_size=N // (accumulation or 1), epochs=UPDATES, shuffle=False, verbose=0)
    for update in range(UPDATES):
        b = 2 if update <= 1 else 4
        m = to_numpy(noise.get(name).calibrated(b, N).sample([SEED, update], N, "float64"))
        r = (x @ w + c - y) * m[:, None]
        w, c = w - LR * 2.0 / N * x.T @ r, c - LR * 2.0 / N * r.sum(0)
    # float64, same draws; only summation order and XLA's log/cos last bits differ (~1e-16 per step).
    np.testing.assert_allclose(to_numpy(model.weights[0]), w, **exact(1e-9, 1e-12))
    np.testing.assert_allclose(to_numpy(model.weights[1]), c, **exact(1e-9, 1e-12))
    assert optimizer.current_emulate_batch_size() == 4


def test_the_schedule_changes_the_draw(float64):
    # The test above could not pass with the schedule ignored: b = 2 and b = 4 draw different "sgd" weights.
    first, later = (to_numpy(noise.get("sgd").calibrated(b, N).sample([SEED, 2], N, "float64")) for b in (2, 4))
    assert np.count_nonzero(first) == 2 and np.count_nonzero(later) == 4


def test_exponential_growth_doubles_b_every_period():
    schedule = keras.optimizers.schedules.ExponentialDecay(4, decay_steps=3, decay_rate=2.0, staircase=True)
    optimizer = kn.NoisyGD(noise="sgd", emulate_batch_size=schedule, seed=0)
    values = []
    for _ in range(7):
        values.append(optimizer.current_emulate_batch_size())
        optimizer.noise_state.assign_add([0, 1])
    assert values == [4, 4, 4, 8, 8, 8, 16]


@pytest.mark.tensorflow_only  # a run-time assertion
def test_a_schedule_value_below_one_is_refused():
    x, y = classification_data(8)
    model = mlp()
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([0], [2.0, 0.4])  # rounds to 0 at update 1
    model.compile(kn.NoisyGD(0.1, noise="gaussian", emulate_batch_size=schedule, seed=1), "sparse_categorical_crossentropy",
                  jit_compile=False)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"Argument `emulate_batch_size` \(a schedule\) must give values >= 1"):
        model.fit(x, y, batch_size=8, epochs=2, verbose=0)


def test_a_schedule_beyond_the_batch_is_plain_gd(float64):
    # b > N at run time: SGD(b) out of fewer than b examples is GD, as for a partial batch (m = 1).
    x, y = classification_data(8, dtype="float64")
    runs = []
    for noise_kwargs in (dict(noise="gaussian", emulate_batch_size=keras.optimizers.schedules.PiecewiseConstantDecay([0], [9.0, 9.0])),
                         dict(noise="none")):
        keras.utils.set_random_seed(0)
        model = mlp(dtype="float64")
        model.compile(kn.NoisyGD(0.1, seed=1, **noise_kwargs), "sparse_categorical_crossentropy")
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        runs.append(model.get_weights())
    for a, b in zip(*runs):
        np.testing.assert_allclose(a, b, **exact(1e-12))


def test_sgd_with_replacement_needs_a_fixed_b():
    with pytest.raises(ValueError, match=r"can be a schedule for every noise class but SGD sampling with replacement"):
        kn.NoisyGD(noise=noise.SGDSampling(replacement=True), emulate_batch_size=growing())


def test_a_schedule_survives_config_and_keras_file_round_trips(tmp_path):
    optimizer = kn.NoisyGD(0.1, noise="bernoulli", emulate_batch_size=growing(), seed=3, gradient_accumulation_steps=2)
    config = optimizer.get_config()
    assert config["emulate_batch_size"]["class_name"] == "PiecewiseConstantDecay"
    assert kn.NoisyGD.from_config(config).get_config() == config
    x, y = classification_data(16)
    model = mlp()
    model.compile(optimizer, "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)  # 4 micro-steps: 2 updates
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    assert isinstance(loaded.optimizer.emulate_batch_size, keras.optimizers.schedules.PiecewiseConstantDecay)
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)  # updates 2, 3: b = 4
    loaded.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_noise_monitor_follows_the_schedule(float64):
    x, y = classification_data(N, dtype="float64")
    model = mlp(dtype="float64")
    model.compile(kn.NoisyGD(0.1, noise="sgd", emulate_batch_size=growing(), seed=2), "sparse_categorical_crossentropy")
    monitor = kn.NoiseMonitor((x, y), every_n_steps=1)
    model.fit(x, y, batch_size=N, epochs=3, shuffle=False, verbose=0, callbacks=[monitor])
    # SGD(b) out of the probe's N: sgd_cov_trace = (N - b)/(b (N - 1)) * (1/N) sum_i |G_i - g|^2, and the sum is
    # (N - 1) |g|^2 noise_scale, so each measurement tells the b it used: b(update) at the update it follows.
    assert [h["step"] for h in monitor.history] == [0, 1, 2, 3]
    for h, b in zip(monitor.history, [2, 2, 4, 4]):
        spread = (N - 1) * h["grad_norm"] ** 2 * h["noise_scale"] / N
        np.testing.assert_allclose(h["sgd_cov_trace"], (N - b) / (b * (N - 1)) * spread, rtol=1e-9)  # float64
