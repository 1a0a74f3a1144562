"""Keras's conventions: defaults that build, Keras's positional arguments, shared docs, no silent loss of noise."""

import inspect
import warnings

import keras
import numpy as np
import pytest
from helpers import classification_data, mlp, to_numpy

import keras_noisygd as kn
from keras_noisygd import _backend, noise
from keras_noisygd.optimizers.docs import NOISE_ARGS

pytestmark = pytest.mark.all_backends

NOISE_KWARGS = {"noise", "emulate_batch_size", "seed", "engine", "chunk_size"}
OPTIMIZERS = [kn.NoisyGD, kn.NoisyAdam, kn.NoisyAdamW]


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_each_optimizer_builds_with_its_defaults_and_trains_with_noise(cls):
    optimizer = cls()
    assert optimizer.emulate_batch_size == 32 and optimizer.noise == noise.Gaussian(centered=True)
    stock = getattr(keras.optimizers, {"NoisyGD": "SGD"}.get(cls.__name__, cls.__name__[5:]))()
    assert float(optimizer.learning_rate) == float(stock.learning_rate)
    x, y = classification_data(64)
    noisy_model, plain = mlp(), mlp(model_class=keras.Model)
    plain.set_weights(noisy_model.get_weights())
    noisy_model.compile(optimizer, "sparse_categorical_crossentropy")
    plain.compile(stock, "sparse_categorical_crossentropy")
    noisy_model.fit(x, y, batch_size=64, epochs=2, shuffle=False, verbose=0)
    plain.fit(x, y, batch_size=64, epochs=2, shuffle=False, verbose=0)
    # b = 32 out of B = 64: centred Gaussian weights of std sqrt(64*32/(32*63)) ~ 1, so the two runs part by far
    # more than float rounding (1e-6) after two steps.
    moved = max(np.abs(a - b).max() for a, b in zip(noisy_model.get_weights(), plain.get_weights()))
    assert moved > 1e-4


def test_positional_arguments_are_the_keras_base_class_ones():
    gd = kn.NoisyGD(0.1, 0.9, True)
    assert (float(gd.learning_rate), gd.momentum, gd.nesterov) == (pytest.approx(0.1), 0.9, True)
    adam = kn.NoisyAdam(0.01, 0.8, 0.99, 1e-6, True)
    assert (adam.beta_1, adam.beta_2, adam.epsilon, adam.amsgrad) == (0.8, 0.99, 1e-6, True)
    assert kn.NoisyAdamW(1e-3, 1e-2).weight_decay == 1e-2
    with pytest.raises(TypeError):
        kn.NoisyGD(0.1, 0.0, False, "sgd")  # the noise is keyword-only: no positional slot to land in


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_the_three_optimizers_take_the_same_keyword_only_noise_arguments(cls):
    parameters = inspect.signature(cls.__init__).parameters.values()
    assert {p.name for p in parameters if p.kind is p.KEYWORD_ONLY} == NOISE_KWARGS
    optimizer = cls(engine="per_example", chunk_size=4, seed=3, noise="bernoulli", emulate_batch_size=8)
    assert (optimizer.engine, optimizer.chunk_size, optimizer.seed) == ("per_example", 4, 3)
    # The docs of those arguments are one shared text, as Keras shares its base optimizer arguments'.
    assert "{{noise_args}}" not in cls.__doc__ and NOISE_ARGS in cls.__doc__
    assert NOISE_ARGS in kn.NoiseMixin.__doc__


def test_a_configured_sampler_takes_no_emulated_batch():
    optimizer = kn.NoisyGD(noise=noise.Gaussian(std=1.0))
    assert optimizer.emulate_batch_size is None
    assert kn.NoisyGD.from_config(optimizer.get_config()).emulate_batch_size is None


def fit_warnings(optimizer, batch_size, n=64, fits=2, **fit_kwargs):
    x, y = classification_data(n)
    model = mlp()
    model.compile(optimizer, "sparse_categorical_crossentropy")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(fits):
            model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0, **fit_kwargs)
    return [str(w.message) for w in caught if "injects no noise" in str(w.message)]


def test_noise_that_vanishes_warns_once_with_what_to_change():
    # Keras's default batch of 32 with the default b = 32: SGD(32) out of 32 is GD.
    found = fit_warnings(kn.NoisyGD(), batch_size=None)
    assert len(found) == 1, found
    assert "emulate SGD(b=32) out of the B=32 examples" in found[0] and "batch_size=len(x)" in found[0]
    assert "Choosing b" in found[0]


@pytest.mark.parametrize(
    "optimizer, batch_size",
    [
        (lambda: kn.NoisyGD(), 64),  # b = 32 < B = 64: noise
        (lambda: kn.NoisyGD(noise="gaussian", emulate_batch_size=32), 32),  # uncentred: variance N/b = 1 at b = B
        (lambda: kn.NoisyGD(noise=noise.Gaussian(std=0.5)), 32),  # a configured sampler: the user's own size
        (lambda: kn.NoisyGD(emulate_batch_size=16, gradient_accumulation_steps=2), 16),  # update of 32 > 16
    ],
)
def test_no_warning_where_there_is_noise(optimizer, batch_size):
    assert fit_warnings(optimizer(), batch_size) == []


@pytest.mark.parametrize("name", [n for n in noise.NAMES if n not in ("none",)])
@pytest.mark.parametrize("b, n", [(1, 7), (3, 7), (7, 7), (2, 2)])
def test_variance_is_the_covariance_trace_per_example(name, b, n):
    if name == "sparse_gaussian_centered" and b == 1:
        pytest.skip("centring k = b = 1 noisy example is refused (k >= 2)")
    sampler = noise.get(name).calibrated(b, n)
    np.testing.assert_allclose(sampler.variance(n), np.trace(sampler.covariance(n)) / n, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(
    "n, c, expected",
    [(50_000, 4096, (3125, 16)), (1000, 1000, (1000, 1)), (1000, 64, (50, 20)), (97, 10, (1, 97)), (12, 5, (4, 3))],
)
def test_micro_batches_split_the_set_into_equal_parts(n, c, expected):
    batch_size, steps = kn.micro_batches(n, c)
    assert (batch_size, steps) == expected and batch_size * steps == n and batch_size <= max(c, 1)
    # The largest such divisor: brute force over every size up to c.
    assert batch_size == max(d for d in range(1, min(n, c) + 1) if n % d == 0)


def test_micro_batches_refuses_bad_sizes():
    with pytest.raises(ValueError, match=r"Argument `max_batch_size` must be an integer >= 1. Received: max_batch_size=0"):
        kn.micro_batches(10, 0)
    with pytest.raises(ValueError, match=r"Received: num_examples=2.5"):
        kn.micro_batches(2.5, 4)


def test_noise_check_is_not_saved_so_older_files_still_load(tmp_path):
    x, y = classification_data(16)
    model = mlp()
    model.compile(kn.NoisyGD(0.1, seed=5, emulate_batch_size=4), "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    store = {}
    model.optimizer.save_own_variables(store)
    assert len(store) == len(model.optimizer.variables) - 1
    path = tmp_path / "m.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    np.testing.assert_array_equal(to_numpy(restored.optimizer.noise_state), to_numpy(model.optimizer.noise_state))
    assert to_numpy(restored.optimizer.noise_state).tolist() == [5, 2]


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_the_update_rule_is_the_one_keras_builds_on_this_backend(cls):
    stock = getattr(keras.optimizers, {"NoisyGD": "SGD"}.get(cls.__name__, cls.__name__[5:]))(0.05)
    noisy = cls(0.05, seed=0)
    # On PyTorch Keras builds a fused (`torch._foreach`) subclass for `SGD()`, `Adam()`, `AdamW()`.
    assert isinstance(noisy, type(stock))
    rng = np.random.default_rng(0)
    start = [rng.normal(size=(3, 2)).astype("float32"), rng.normal(size=(2,)).astype("float32")]
    ours, theirs = ([keras.Variable(v) for v in start] for _ in range(2))
    for _ in range(3):
        grads = [keras.ops.convert_to_tensor(rng.normal(size=v.shape).astype("float32")) for v in start]
        noisy.noise_weights(64)  # `apply` refuses a step that drew no weights
        _backend.apply_gradients(noisy, grads, ours)
        _backend.apply_gradients(stock, grads, theirs)
    # The same class's arithmetic on the same inputs: equal to the bit.
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))
