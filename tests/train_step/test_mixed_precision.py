"""Mixed precision: under `mixed_float16` Keras wraps the optimizer in a LossScaleOptimizer;
the noisy step still finds the noise, draws it in float32, and trains like float32."""

import keras
import numpy as np
import pytest
from helpers import classification_data, mlp, to_numpy

import keras_noisygd as kn
from keras_noisygd import noise

pytestmark = pytest.mark.all_backends

LOSS = "sparse_categorical_crossentropy"
STEPS = 10


class RecordingGaussian:
    """A user sampler that records the dtype the train step asks for."""

    def __init__(self):
        self.dtypes = []

    def sample(self, seed, batch_size, dtype="float32"):
        self.dtypes.append(keras.backend.standardize_dtype(dtype))
        return noise.Gaussian(0.5).sample(seed, batch_size, dtype)


@pytest.fixture
def mixed_float16():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    yield
    keras.config.set_dtype_policy(previous)


def train(optimizer, init, policy_model):
    x, y = classification_data(32)
    model = policy_model()
    model.set_weights(init)
    model.compile(optimizer, LOSS, jit_compile=False)
    # shuffle=False: the noise weights are positional, so the data order must match too.
    history = model.fit(x, y, batch_size=32, epochs=STEPS, shuffle=False, verbose=0)
    return model, history.history["loss"]


def relative_distance(a, b, reference):
    return max(np.linalg.norm(u - v) / np.linalg.norm(r) for u, v, r in zip(a, b, reference))


def test_mixed_precision_draws_float32_noise_and_trains_like_float32(mixed_float16):
    keras.config.set_dtype_policy("float32")
    float32_model = mlp(dtype=None)
    init = float32_model.get_weights()
    keras.config.set_dtype_policy("mixed_float16")

    sampler = RecordingGaussian()
    mixed, mixed_loss = train(kn.NoisyGD(0.1, noise=sampler, momentum=0.5, seed=7), init, lambda: mlp(dtype=None))
    assert mixed.layers[1].compute_dtype == "float16" and mixed.layers[1].variable_dtype == "float32"
    assert isinstance(mixed.optimizer, keras.optimizers.LossScaleOptimizer)
    # Weights in float32, not the float16 compute dtype. Two traces: a stock `keras.Model`
    # under mixed_float16 also traces its train step twice (the loss-scale variables are
    # created in the first trace); the float32 run traces once (tests/test_long_runs.py).
    assert sampler.dtypes and set(sampler.dtypes) == {"float32"}  # asked once per trace (every step if eager)
    assert int(to_numpy(mixed.optimizer.iterations)) == STEPS  # no step skipped for overflow ...
    np.testing.assert_array_equal(to_numpy(mixed.optimizer.inner_optimizer.noise_state), [7, STEPS])  # ... or noise lost

    keras.config.set_dtype_policy("float32")
    same_noise, float32_loss = train(kn.NoisyGD(0.1, noise=noise.Gaussian(0.5), momentum=0.5, seed=7), init, lambda: mlp(dtype=None))
    other_noise, _ = train(kn.NoisyGD(0.1, noise=noise.Gaussian(0.5), momentum=0.5, seed=8), init, lambda: mlp(dtype=None))
    moved = [w - w0 for w, w0 in zip(same_noise.get_weights(), init)]
    # float16 rounds each activation and gradient to 2**-11 = 4.9e-4 relative; over 10 steps the
    # weight updates agree to 3e-4..5e-4 of their size (measured over 3 inits). 1e-2 leaves a 20x
    # margin and is still 25x below what another noise draw changes (0.26..0.48, measured).
    assert relative_distance(mixed.get_weights(), same_noise.get_weights(), moved) < 1e-2
    assert relative_distance(other_noise.get_weights(), same_noise.get_weights(), moved) > 0.1
    # The clean losses: measured 1.2e-4 relative apart; 5e-3 is ~10 float16 epsilons.
    np.testing.assert_allclose(mixed_loss, float32_loss, rtol=5e-3)


def test_steps_skipped_for_overflow_draw_no_noise(mixed_float16):
    # An initial loss scale of 2**40 overflows float16 gradients: the LossScaleOptimizer skips
    # those steps (halving the scale each time) without calling the noisy optimizer, so the
    # noise counter counts applied steps only, and the applied steps draw [seed, 0], [seed, 1], ...
    # exactly as a float32 run of that many steps does.
    keras.config.set_dtype_policy("float32")
    init = mlp(dtype=None).get_weights()
    keras.config.set_dtype_policy("mixed_float16")
    x, y = classification_data(32)
    mixed = mlp(dtype=None)
    mixed.set_weights(init)
    optimizer = keras.optimizers.LossScaleOptimizer(kn.NoisyGD(0.1, noise=noise.Gaussian(0.5), seed=7), initial_scale=2.0**40)
    mixed.compile(optimizer, LOSS, jit_compile=False)
    mixed.fit(x, y, batch_size=32, epochs=30, shuffle=False, verbose=0)
    skipped = 40 - int(np.log2(to_numpy(optimizer.dynamic_scale)))  # one halving per skipped step
    assert 10 < skipped < 30 and int(to_numpy(optimizer.iterations)) == 30 - skipped
    np.testing.assert_array_equal(to_numpy(optimizer.inner_optimizer.noise_state), [7, 30 - skipped])

    keras.config.set_dtype_policy("float32")
    reference = mlp(dtype=None)
    reference.set_weights(init)
    reference.compile(kn.NoisyGD(0.1, noise=noise.Gaussian(0.5), seed=7), LOSS, jit_compile=False)
    reference.fit(x, y, batch_size=32, epochs=30 - skipped, shuffle=False, verbose=0)
    moved = [w - w0 for w, w0 in zip(reference.get_weights(), init)]
    assert relative_distance(mixed.get_weights(), reference.get_weights(), moved) < 1e-2  # as above


def test_the_policy_is_restored_after_the_mixed_precision_tests():
    assert keras.config.dtype_policy().name == "float32"


def test_per_example_engine_under_mixed_precision_trains_like_the_weighted_engine(mixed_float16):
    # engine="per_example" applies the LossScaleOptimizer's scale to every per-example loss itself; it must
    # give the weighted engine's float16 run (same noise) within float16 precision, with no step skipped.
    keras.config.set_dtype_policy("float32")
    init = mlp(dtype=None).get_weights()
    keras.config.set_dtype_policy("mixed_float16")
    runs = {}
    for engine in ("weighted", "per_example"):
        optimizer = kn.NoisyGD(0.1, noise="gaussian_centered", emulate_batch_size=8, momentum=0.5, seed=7, engine=engine)
        runs[engine], _ = train(optimizer, init, lambda: mlp(dtype=None))
        assert int(to_numpy(runs[engine].optimizer.iterations)) == STEPS
    moved = [w - w0 for w, w0 in zip(runs["weighted"].get_weights(), init)]
    # Both runs round activations to float16 (2**-11 relative) in differently ordered sums: measured 8.5e-4
    # of the update; 1e-2 is the bound used for float16 against float32 above. A first version formed the
    # rows without the 1/B and overflowed float16 (3 of 10 steps skipped), which the step count catches.
    assert relative_distance(runs["per_example"].get_weights(), runs["weighted"].get_weights(), moved) < 1e-2


def test_micro_batches_under_mixed_precision_take_the_full_batch_steps(mixed_float16):
    # gradient_accumulation_steps=4 on batches of 8: the LossScaleOptimizer's inner NoisyGD draws one update's
    # weights for all 32 examples; each micro-step trains on its slice, as the full batch of 32 does.
    keras.config.set_dtype_policy("float32")
    init = mlp(dtype=None).get_weights()
    keras.config.set_dtype_policy("mixed_float16")
    x, y = classification_data(32)
    runs = {}
    for batch, accumulation in ((32, None), (8, 4)):
        model = mlp(dtype=None)
        model.set_weights(init)
        optimizer = kn.NoisyGD(0.1, noise="sgd", emulate_batch_size=8, momentum=0.5, seed=7,
                               gradient_accumulation_steps=accumulation)
        # SGD(8) out of 32 weights examples by 4: Keras's initial scale 2**15 overflows the first float16 step.
        model.compile(keras.optimizers.LossScaleOptimizer(optimizer, initial_scale=2.0**10), LOSS, jit_compile=False)
        model.fit(x, y, batch_size=batch, epochs=STEPS, shuffle=False, verbose=0)
        assert int(to_numpy(model.optimizer.iterations)) == STEPS  # no update skipped for overflow
        runs[batch] = model.get_weights()
    moved = [w - w0 for w, w0 in zip(runs[32], init)]
    # float16 activations in differently ordered sums, as for the engines above: 1e-2 of the update.
    # Per-micro-batch draws ("sgd" out of 8 with b = 8) would inject no noise at all: far more than 1e-2.
    assert relative_distance(runs[8], runs[32], moved) < 1e-2
