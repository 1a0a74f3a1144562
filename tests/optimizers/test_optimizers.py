"""NoisyGD / NoisyAdam update rules: Keras SGD when noise-free, a NumPy reference when noisy."""

import keras
import numpy as np
import pytest
from helpers import FixedWeights, classification_data, mlp, to_numpy

import keras_noisygd as kn
from keras_noisygd import noise

pytestmark = pytest.mark.all_backends

# LAM = 2**-5 is exact in float32, the precision Keras keeps regularizer factors in; so is LR (Keras on PyTorch
# keeps the learning rate in float32 even in a float64 model).
B, STEPS, SEED, LAM, LR = 8, 5, 17, 2.0**-5, 2.0**-4
# float64 model and reference differ by summation order only (~1e-15 a step), except on PyTorch, where a stock
# `keras.optimizers.SGD` step of a float64 Dense model is already off the float64 NumPy step (2e-9 after one
# step, 4e-8 after five: part of its computation is float32; measured):
# wrong noise would be off by O(1).
EXACT = dict(rtol=1e-6, atol=1e-7) if keras.backend.backend() == "torch" else dict(rtol=1e-9, atol=1e-12)


def linear_model():
    return kn.NoisySequential(
        [keras.Input((3,)), keras.layers.Dense(1, kernel_regularizer=keras.regularizers.L2(LAM))]
    )


def regression_data():
    rng = np.random.default_rng(1)
    return rng.normal(size=(B, 3)), rng.normal(size=(B, 1))


def numpy_reference(w, c, x, y, draws, lr, momentum, nesterov, sample_weight):
    """Keras SGD (momentum / Nesterov) on (1/B) sum_i m_i s_i (x_i w + c - y_i)^2 + LAM |w|^2."""
    vw, vc = np.zeros_like(w), np.zeros_like(c)
    for m in draws:
        r = x @ w + c - y  # [B, 1]
        mr = (m * sample_weight)[:, None] * r
        gw = 2.0 / B * x.T @ mr + 2 * LAM * w
        gc = 2.0 / B * mr.sum(0)
        if momentum == 0:
            w, c = w - lr * gw, c - lr * gc
            continue
        vw, vc = momentum * vw - lr * gw, momentum * vc - lr * gc
        if nesterov:
            w, c = w + momentum * vw - lr * gw, c + momentum * vc - lr * gc
        else:
            w, c = w + vw, c + vc
    return w, c


SAMPLERS = [noise.Gaussian(0.7), noise.Bernoulli(0.5), noise.SGDSampling(3), noise.SparseGaussian(3, 1.0, True)]
# 0.75 is exact in float32: Keras casts the Python momentum through a float32 tensor.
MOMENTA = [(0.0, False), (0.75, False), (0.75, True)]


@pytest.mark.parametrize("sampler", SAMPLERS, ids=repr)
@pytest.mark.parametrize("momentum, nesterov", MOMENTA)
@pytest.mark.parametrize("weighted", [False, True])
def test_fit_matches_a_numpy_reference_fed_the_same_weights(float64, sampler, momentum, nesterov, weighted):
    x, y = regression_data()
    s = np.linspace(0.5, 1.5, B) if weighted else np.ones(B)
    model = linear_model()
    w0, c0 = (to_numpy(v) for v in model.weights)
    # jit_compile=False: eager draws below use the same float32 kernels bit for bit.
    optimizer = kn.NoisyGD(LR, noise=sampler, momentum=momentum, nesterov=nesterov, seed=SEED)
    model.compile(optimizer, "mse", jit_compile=False)
    model.fit(x, y, sample_weight=s if weighted else None, batch_size=B, epochs=STEPS, shuffle=False, verbose=0)
    # The step-k weights are the sampler's draw at seed [SEED, k], in floatx (float64 here).
    draws = [to_numpy(sampler.sample([SEED, k], B, "float64")) for k in range(STEPS)]
    w, c = numpy_reference(w0, c0, x, y, draws, LR, momentum, nesterov, s)
    np.testing.assert_allclose(to_numpy(model.weights[0]), w, **EXACT)
    np.testing.assert_allclose(to_numpy(model.weights[1]), c, **EXACT)


def _one_torch_compile_run(jit_compile, chosen):
    """On PyTorch `jit_compile=True` is `torch.compile` (20-35 s per model here): only the `chosen` case runs it."""
    if jit_compile and keras.backend.backend() == "torch" and not chosen:
        pytest.skip("torch.compile: one parametrization of this test runs it on PyTorch")


@pytest.mark.parametrize("name", [n for n in noise.NAMES if n != "none"])
@pytest.mark.parametrize("b", [3, 6])
@pytest.mark.parametrize("jit_compile", [False, True])
def test_emulate_batch_size_calibrates_every_batch_to_its_own_size(float64, name, b, jit_compile):
    _one_torch_compile_run(jit_compile, name == "sgd")
    # 20 examples in batches of 8: B = 8, 8, 4 per epoch. Each step's weights are the
    # template calibrated to SGD(b) out of that batch's B; a run-time batch with
    # B < b (the last one, for b = 6) gets m = 1.
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(20, 3)), rng.normal(size=(20, 1))
    model = linear_model()
    w, c = (to_numpy(v) for v in model.weights)
    model.compile(kn.NoisyGD(LR, noise=name, emulate_batch_size=b, seed=SEED), "mse", jit_compile=jit_compile)
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    step = 0
    for _ in range(2):
        for start in (0, 8, 16):
            xb, yb = x[start : start + 8], y[start : start + 8]
            n = len(xb)
            template = noise.get(name)
            m = to_numpy(template.calibrated(b, n).sample([SEED, step], n, "float64")) if n >= b else np.ones(n)
            r = xb @ w + c - yb
            w, c = w - LR * (2.0 / n * xb.T @ (m[:, None] * r) + 2 * LAM * w), c - LR * 2.0 / n * (m[:, None] * r).sum(0)
            step += 1
    # float64; XLA's log/cos may differ from Eigen's in the last bits (~1e-16).
    np.testing.assert_allclose(to_numpy(model.weights[0]), w, **EXACT)
    np.testing.assert_allclose(to_numpy(model.weights[1]), c, **EXACT)


def test_one_hand_computed_noisy_step():
    # Model y = w x + c with w = 1, c = 0; x = [1, 2], y = [0, 0]; weights m = [1.5, 0.5].
    # Residuals r = [1, 2]; loss (1/2) sum m_i r_i^2, so
    # dL/dw = (2/2) (1.5*1*1 + 0.5*2*2) = 3.5 and dL/dc = (2/2) (1.5*1 + 0.5*2) = 2.5.
    # With learning rate 0.1: w = 1 - 0.35 = 0.65, c = 0 - 0.25 = -0.25.
    model = kn.NoisySequential([keras.Input((1,)), keras.layers.Dense(1, kernel_initializer="ones")])
    model.compile(kn.NoisyGD(0.1, noise=FixedWeights([1.5, 0.5])), "mse")
    model.fit(np.array([[1.0], [2.0]]), np.zeros((2, 1)), batch_size=2, epochs=1, shuffle=False, verbose=0)
    np.testing.assert_allclose(to_numpy(model.weights[0]), [[0.65]], rtol=1e-6)
    np.testing.assert_allclose(to_numpy(model.weights[1]), [-0.25], rtol=1e-6)


NOISE_FREE = [
    dict(noise="none"),
    dict(noise=noise.SGDSampling(16)),
    dict(noise=noise.Bernoulli(1.0)),
    dict(noise="sgd", emulate_batch_size=16),
    dict(noise="gaussian_centered", emulate_batch_size=16),
    dict(noise="sparse_gaussian_centered", emulate_batch_size=16),
]


def assert_sgd_step_for_step(noise_kwargs, momentum, nesterov, jit_compile):
    x, y = classification_data(16)
    stock = mlp(model_class=keras.Model)
    model = kn.noisy(mlp(model_class=keras.Model))
    model.set_weights(stock.get_weights())
    loss = "sparse_categorical_crossentropy"
    stock.compile(keras.optimizers.SGD(0.1, momentum=momentum, nesterov=nesterov), loss, jit_compile=jit_compile)
    model.compile(kn.NoisyGD(0.1, momentum=momentum, nesterov=nesterov, **noise_kwargs), loss, jit_compile=jit_compile)
    for _ in range(3):  # step for step, not only at the end
        stock.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
        for a, b in zip(model.get_weights(), stock.get_weights()):
            if jit_compile or keras.backend.backend() == "torch":
                # XLA fuses the multiply-by-one weights into different kernels, and PyTorch's weighted loss
                # reduces in another order than its mean: float32 rounding (eps 1.2e-7) over a few operations.
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
            else:
                # Unit loss weights multiply exactly: the same float32 kernels, bit for bit.
                np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("noise_kwargs", NOISE_FREE, ids=str)
@pytest.mark.parametrize("jit_compile", [False, True])
def test_noise_free_settings_are_keras_sgd_step_for_step(noise_kwargs, jit_compile):
    _one_torch_compile_run(jit_compile, noise_kwargs == NOISE_FREE[0])
    assert_sgd_step_for_step(noise_kwargs, 0.75, True, jit_compile)


@pytest.mark.parametrize("momentum, nesterov", MOMENTA)
def test_no_noise_is_keras_sgd_for_every_momentum(momentum, nesterov):
    assert_sgd_step_for_step(dict(noise="none"), momentum, nesterov, False)


@pytest.mark.parametrize("noisy_class, keras_class", [(kn.NoisyAdam, keras.optimizers.Adam), (kn.NoisyAdamW, keras.optimizers.AdamW)])
def test_adaptive_optimizers_carry_the_noise_the_same_way(noisy_class, keras_class):
    x, y = classification_data(16)
    sampler = noise.Gaussian(0.5)
    model = mlp()
    manual = mlp(model_class=keras.Model)
    manual.set_weights(model.get_weights())
    model.compile(noisy_class(0.01, noise=sampler, seed=SEED), "sparse_categorical_crossentropy", jit_compile=False)
    manual.compile(loss="sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
    reference = keras_class(0.01)
    for k in range(3):  # the same weights into a stock optimizer, by hand
        grads = kn.noisy_gradients(manual, x, y, sampler.sample([SEED, k], 16))
        reference.apply_gradients(zip(grads, manual.trainable_variables))
    for a, b in zip(model.get_weights(), manual.get_weights()):
        # float32 graph vs eager: same operations, possibly different fusion; ~1e-7 relative.
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_adam_without_noise_is_keras_adam():
    x, y = classification_data(16)
    stock = mlp(model_class=keras.Model)
    model = mlp()
    model.set_weights(stock.get_weights())
    stock.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy")
    model.compile(kn.NoisyAdam(0.01, noise="none"), "sparse_categorical_crossentropy")
    for m in (stock, model):
        m.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    for a, b in zip(model.get_weights(), stock.get_weights()):
        if keras.backend.backend() == "torch":  # its weighted loss reduces in another order: float32 rounding
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
        else:
            np.testing.assert_array_equal(a, b)


def trained_weights(seed, jit_compile=False):
    keras.utils.set_random_seed(0)
    x, y = classification_data(32)
    model = mlp()
    model.compile(kn.NoisyGD(0.2, emulate_batch_size=4, seed=seed), "sparse_categorical_crossentropy", jit_compile=jit_compile)
    model.fit(x, y, batch_size=16, epochs=3, verbose=0)
    return model.get_weights()


def test_same_seed_same_weights_different_seed_different_weights():
    first, again, other = trained_weights(5), trained_weights(5), trained_weights(6)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert max(np.abs(a - b).max() for a, b in zip(first, other)) > 1e-3


def test_xla_and_eager_draw_the_same_noise():
    for a, b in zip(trained_weights(5), trained_weights(5, jit_compile=True)):
        # Same weights m in both modes; XLA fuses float32 ops differently (~1e-7 per step).
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_noise_state_advances_once_per_step_and_micro_step():
    x, y = classification_data(16)
    model = mlp()
    optimizer = kn.NoisyGD(0.1, noise="bernoulli", emulate_batch_size=2, seed=9, gradient_accumulation_steps=2)
    model.compile(optimizer, "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)  # 4 micro-steps, 2 updates
    np.testing.assert_array_equal(to_numpy(optimizer.noise_state), [9, 4])
    assert int(to_numpy(optimizer.iterations)) == 2


@pytest.mark.parametrize(
    "optimizer",
    [
        lambda: kn.NoisyGD(0.05, noise="bernoulli", emulate_batch_size=4, momentum=0.9, nesterov=True, seed=3),
        lambda: kn.NoisyGD(noise=noise.SparseGaussian(3, 0.2, centered=True), seed=1, clipnorm=1.0),
        lambda: kn.NoisyAdam(noise="sparse_gaussian", emulate_batch_size=8, seed=2, weight_decay=1e-4),
        lambda: kn.NoisyAdamW(noise="none", seed=4),
    ],
)
def test_optimizer_config_round_trip(optimizer):
    optimizer = optimizer()
    config = optimizer.get_config()
    assert type(optimizer).from_config(config).get_config() == config
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert type(restored) is type(optimizer) and restored.get_config() == config
    assert restored.noise == optimizer.noise


BAD_OPTIMIZER_ARGS = [
    (dict(noise="brownian", emulate_batch_size=2), r"Argument `noise` must be one of .*Received: noise='brownian'"),
    (dict(noise=1.0, emulate_batch_size=2), r"Argument `noise` must be a noise name.*Received: noise=1.0"),
    (dict(emulate_batch_size=0), r"Argument `emulate_batch_size` must be None, an integer >= 1 or a `keras.optimizers.schedules.LearningRateSchedule` of the update step. Received: emulate_batch_size=0"),
    (dict(emulate_batch_size=2.0), r"Received: emulate_batch_size=2.0"),
    (dict(emulate_batch_size="32"), r"Received: emulate_batch_size='32'"),
    (dict(noise=noise.Gaussian(1.0), emulate_batch_size=4), r"`emulate_batch_size` calibrates a noise template, but `noise` is already configured"),
    (dict(noise="sparse_gaussian_centered", emulate_batch_size=1), r"Argument `num_noisy` must be an integer >= 2. Received: num_noisy=1"),
    (dict(noise="none", emulate_batch_size=4), r"`emulate_batch_size` calibrates a noise template, but `noise` is already configured: NoNoise\(\)"),
    (dict(noise="none", seed=-1), r"Argument `seed` must be None or an integer in \[0, 2147483647\]. Received: seed=-1"),
    (dict(noise="none", seed=2**31), r"Received: seed=2147483648"),
    (dict(noise="none", seed="7"), r"Received: seed='7'"),
    (dict(noise="none", learning_rate=1), r"Argument `learning_rate` should be float"),
]


@pytest.mark.parametrize("kwargs, message", BAD_OPTIMIZER_ARGS, ids=[m for _, m in BAD_OPTIMIZER_ARGS])
def test_bad_optimizer_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        kn.NoisyGD(**kwargs)


def test_weights_drawn_outside_the_training_graph_do_not_unlock_a_stock_model():
    if keras.backend.backend() == "torch":
        pytest.skip("PyTorch runs eagerly: a draw there counts for its thread's next apply (see keras_noisygd/_backend/torch.py)")
    x, y = classification_data(16)
    optimizer = kn.NoisyGD(0.1, noise="bernoulli", emulate_batch_size=4)
    optimizer.noise_weights(4)  # a peek, eagerly
    model = mlp(model_class=keras.Model)
    model.compile(optimizer, "sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match="would silently train without noise"):
        model.fit(x, y, verbose=0)


def test_mixed_precision_loss_scaling_finds_and_uses_the_noise():
    x, y = classification_data(16)
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = mlp()
        model.compile(kn.NoisyGD(0.1, noise="bernoulli", emulate_batch_size=4, seed=1), "sparse_categorical_crossentropy")
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        model.fit(x, y, batch_size=16, epochs=2, verbose=0)
        np.testing.assert_array_equal(to_numpy(model.optimizer.inner_optimizer.noise_state), [1, 2])
    finally:
        keras.config.set_dtype_policy("float32")


def test_find_noisy_optimizer_looks_inside_loss_scaling():
    inner = kn.NoisyGD(noise="none")
    assert kn.find_noisy_optimizer(keras.optimizers.LossScaleOptimizer(inner)) is inner
    assert kn.find_noisy_optimizer(inner) is inner
    assert kn.find_noisy_optimizer(keras.optimizers.SGD()) is None
