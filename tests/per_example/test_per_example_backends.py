"""The per-example engine and NoiseMonitor on every backend, against explicit per-example loops.

TensorFlow's own engine (tf.vectorized_map, the layer rows) has the fuller
suite in test_per_example.py / test_gram.py; these tests run the same checks
on JAX (jax.vmap, jax.vjp) and PyTorch (torch.func) too.

Precision: float64 where the backend has it (TensorFlow, PyTorch), float32 on
JAX (no x64). In float64 the comparisons are the same values summed in another
order (~1e-15 relative; `helpers.exact` loosens PyTorch to 1e-6, see there);
in float32 the same sums differ by a few ulps of the largest term, ~1e-7
relative, so 2e-5 relative / 1e-6 absolute. A wrong term (a missing
regularizer, another Dropout mask, per-example BatchNorm statistics, stale
weights in a compiled step) is off by 1e-2 or more.
"""

import keras
import numpy as np
import pytest
from helpers import exact, gradient, to_numpy
from keras import ops

import keras_noisygd as kn
from keras_noisygd import noise, per_example

pytestmark = pytest.mark.all_backends

BACKEND = keras.backend.backend()
B = 8
KINDS = ["dense", "regularized", "conv1d", "conv2d", "embedding", "layernorm", "einsum", "attention", "batchnorm",
         "dropout"]
COUPLED = ["batchnorm", "dropout"]


@pytest.fixture
def precision():
    """`(dtype, tolerances)`: float64 where the backend has it, float32 on JAX."""
    if BACKEND == "jax":
        yield "float32", dict(rtol=2e-5, atol=1e-6)
        return
    previous = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    yield "float64", exact(1e-10, 1e-12)
    keras.config.set_floatx(previous[0])
    keras.config.set_dtype_policy(previous[1])


def _model(kind):
    keras.utils.set_random_seed(7)
    layers = keras.layers
    if kind == "conv1d":
        inputs = keras.Input((9, 2))
        hidden = layers.Flatten()(layers.Conv1D(3, 3, strides=2, activation="tanh")(inputs))
    elif kind == "conv2d":
        inputs = keras.Input((6, 6, 2))
        hidden = layers.Flatten()(layers.Conv2D(3, 3, padding="same", activation="tanh")(inputs))
    elif kind == "embedding":
        inputs = keras.Input((4,), dtype="int32")
        hidden = layers.Flatten()(layers.Embedding(11, 3)(inputs))
    elif kind == "attention":  # MultiHeadAttention: its projections are reached inside its own call
        inputs = keras.Input((3, 4))
        hidden = layers.Flatten()(layers.MultiHeadAttention(2, 3)(inputs, inputs))
    elif kind == "einsum":  # a transformer's projections: EinsumDense to heads and back, Dense on the sequence
        inputs = keras.Input((3, 4))
        bias = keras.initializers.RandomNormal(stddev=0.5)
        hidden = layers.EinsumDense("abc,cde->abde", (3, 2, 3), bias_axes="de", activation="tanh",
                                    bias_initializer=bias)(inputs)
        hidden = layers.EinsumDense("abde,dec->abc", (3, 4), bias_axes="c")(hidden)
        hidden = layers.Flatten()(layers.Dense(5, activation="gelu", bias_initializer=bias)(hidden))
    else:
        inputs = keras.Input((5,))
        regularizer = keras.regularizers.L2(0.05) if kind == "regularized" else None
        hidden = layers.Dense(6, activation="tanh", kernel_regularizer=regularizer)(inputs)
        if kind == "layernorm":
            hidden = layers.LayerNormalization()(hidden)
        if kind == "batchnorm":
            hidden = layers.BatchNormalization()(hidden)
        if kind == "dropout":
            # Seeded: an unseeded Keras Dropout on PyTorch draws from torch's global generator, so two calls
            # with the same state would draw other masks and no reference could repeat them.
            hidden = layers.Dropout(0.5, seed=3)(hidden)
    outputs = layers.Dense(3, activation="softmax")(hidden)
    model = kn.NoisyModel(inputs, outputs)
    model.compile(kn.NoisyGD(0.1, noise="none"), "sparse_categorical_crossentropy")
    return model


def _data(kind, dtype, n=B, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "embedding":
        x = rng.integers(0, 11, (n, 4)).astype("int32")
    else:
        shapes = {"conv1d": (9, 2), "conv2d": (6, 6, 2), "einsum": (3, 4), "attention": (3, 4)}
        x = rng.normal(size=(n, *shapes.get(kind, (5,)))).astype(dtype)
    return x, rng.integers(0, 3, n)


def _values(model):
    return [v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables]


def _loop(model, x, y, batched):
    """Row i: d/d theta of example i's loss plus the regularization, each by its own gradient call.

    `batched`: through the batched forward pass (BatchNorm's batch statistics, Dropout's batch mask);
    otherwise on the example alone.
    """
    trainable, non_trainable = _values(model)
    rows = []
    for i in range(len(y)):

        def loss(values, i=i):
            inputs = x if batched else x[i : i + 1]
            y_pred, _, reg = model.stateless_call(values, non_trainable, inputs, training=True, return_losses=True)
            y_pred = y_pred[i : i + 1] if batched else y_pred
            value = keras.losses.sparse_categorical_crossentropy(y[i : i + 1], y_pred)[0]
            return value + sum(reg) if reg else value

        rows.append(gradient(loss, trainable))
    return [np.stack(g) for g in zip(*rows)]


def _batch_gradient(model, x, y, sample_weight=None):
    """Keras's own batch gradient through `compute_loss`."""
    trainable, non_trainable = _values(model)

    def loss(values):
        mapping = [*zip(model.trainable_variables, values), *zip(model.non_trainable_variables, non_trainable)]
        with keras.StatelessScope(state_mapping=mapping, collect_losses=True):
            y_pred = model(x, training=True)
            return model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight)

    return gradient(loss, trainable)


@pytest.mark.parametrize("kind", KINDS)
def test_rows_equal_an_explicit_loop_and_average_to_the_batch_gradient(precision, kind):
    dtype, tol = precision
    model = _model(kind)
    x, y = _data(kind, dtype)
    before = [to_numpy(v) for v in model.non_trainable_variables]
    result = per_example.compute(model, x, y)
    if kind in COUPLED:
        assert result.method == "jacobian"
    else:  # the layer rows (JAX: the gradients at zero perturbations of the layers' outputs)
        assert result.method == "layers"
    grads = kn.per_example_gradients(model, x, y)
    for g, expected, variable in zip(grads, _loop(model, x, y, batched=kind in COUPLED), model.trainable_variables):
        assert tuple(g.shape) == (B, *variable.shape)
        np.testing.assert_allclose(to_numpy(g), expected, **tol)
    for g, expected in zip(grads, _batch_gradient(model, x, y)):
        np.testing.assert_allclose(np.mean(to_numpy(g), axis=0), expected, **tol)
    # Computing G leaves the model alone: BatchNorm statistics and the Dropout seed are unchanged.
    for old, variable in zip(before, model.non_trainable_variables):
        np.testing.assert_array_equal(old, to_numpy(variable))


@pytest.mark.parametrize("chunk_size", [None, 3, 20])  # 3 does not divide 8; 20 > B
def test_methods_chunks_and_weights_agree(precision, chunk_size):
    dtype, tol = precision
    model = _model("conv1d")
    x, y = _data("conv1d", dtype)
    reference = [to_numpy(g) for g in kn.per_example_gradients(model, x, y, method="vectorized")]
    for method in ("vectorized", "jacobian"):
        grads = kn.per_example_gradients(model, x, y, method=method, chunk_size=chunk_size)
        for g, expected in zip(grads, reference):
            np.testing.assert_allclose(to_numpy(g), expected, **tol)
        # With weights, the engine returns (1/B) sum_i w_i G_i without holding G.
        weights = np.linspace(-1.0, 2.0, B).astype(dtype)
        weighted = per_example.compute(model, x, y, method=method, chunk_size=chunk_size, weights=weights)
        for g, rows in zip(weighted.gradients, reference):
            np.testing.assert_allclose(to_numpy(g), np.tensordot(weights, rows, axes=1) / B, **tol)


def test_sample_weight_scales_each_row(precision):
    dtype, tol = precision
    model = _model("regularized")
    x, y = _data("regularized", dtype)
    sample_weight = np.linspace(0.0, 2.0, B).astype(dtype)
    weighted = per_example.compute(model, x, y, sample_weight=sample_weight)
    plain = per_example.compute(model, x, y)
    for a, b in zip(weighted.gradients, plain.gradients):
        b = to_numpy(b)
        np.testing.assert_allclose(to_numpy(a), b * sample_weight.reshape([-1] + [1] * (b.ndim - 1)), **tol)
    rows = kn.per_example_gradients(model, x, y, sample_weight=sample_weight)
    for g, expected in zip(rows, _batch_gradient(model, x, y, sample_weight=sample_weight)):
        np.testing.assert_allclose(np.mean(to_numpy(g), axis=0), expected, **tol)


@pytest.mark.parametrize("kind", COUPLED)
def test_vectorized_method_refuses_a_model_that_couples_the_batch(precision, kind):
    model = _model(kind)
    with pytest.raises(ValueError, match=r"method='vectorized'.*updates its state.*Received: method='vectorized'"):
        kn.per_example_gradients(model, *_data(kind, precision[0]), method="vectorized")


@pytest.mark.skipif(BACKEND != "torch", reason="torch.func.vmap cannot run Keras's PyTorch Conv2D forward pass")
def test_vectorized_method_names_what_torch_vmap_cannot_run(precision):
    model = _model("conv2d")
    with pytest.raises(ValueError, match=r"method='vectorized'.*torch.func.vmap.*NYI.*Received: method='vectorized'"):
        kn.per_example_gradients(model, *_data("conv2d", precision[0]), method="vectorized")


def _trained(engine, kind, dtype, chunk_size=None, jit_compile="auto"):
    model = _model(kind)
    x, y = _data(kind, dtype, n=12)
    model.compile(
        kn.NoisyGD(
            0.5, noise="gaussian_centered", emulate_batch_size=2, seed=5, engine=engine, chunk_size=chunk_size,
            momentum=0.5,
        ),
        "sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=jit_compile,
        steps_per_execution=2 if BACKEND != "torch" else 1,
    )
    history = model.fit(x, y, batch_size=6, epochs=2, verbose=0, sample_weight=np.linspace(0.5, 1.5, 12))
    return model, history.history


@pytest.mark.parametrize(
    "kind,chunk_size", [("regularized", None), ("batchnorm", None), ("dropout", 4), ("conv1d", 4), ("embedding", None)]
)
def test_per_example_engine_trains_like_the_weighted_engine(precision, kind, chunk_size):
    # Same seed, same noise weights: four steps of G W + grad R equal the re-weighted loss's gradient steps,
    # BatchNorm statistics and Dropout masks included. On JAX the engine runs inside the compiled stateless
    # step: weights read from the variables instead of the state would stay at their initial values there.
    dtype, tol = precision
    if BACKEND == "torch":
        # Four steps at lr 0.5 amplify the float32-sized rounding of Keras's float64 on PyTorch (helpers.exact):
        # measured 1.4e-5 relative (4e-7 absolute) on a BatchNorm weight; a wrong mask or statistic is 1e-2 off.
        tol = dict(rtol=1e-4, atol=1e-6)
    weighted, weighted_history = _trained("weighted", kind, dtype)
    engine, engine_history = _trained("per_example", kind, dtype, chunk_size)
    for a, b in zip(engine.get_weights(), weighted.get_weights()):  # BatchNorm moving statistics too
        np.testing.assert_allclose(a, b, **tol)
    np.testing.assert_allclose(engine_history["loss"], weighted_history["loss"], **tol)
    assert engine_history["accuracy"] == weighted_history["accuracy"]
    assert int(to_numpy(engine.optimizer.noise_state)[1]) == 4
    initial = _model(kind).get_weights()
    assert max(np.max(np.abs(a - b)) for a, b in zip(engine.get_weights(), initial)) > 1e-3  # it trained


def _explicit_rows(model, x, y):
    return np.concatenate([r.reshape(len(y), -1) for r in _loop(model, x, y, batched=False)], axis=1)


@pytest.mark.parametrize("noise_name", ["gaussian_centered", "bernoulli"])
def test_monitor_statistics_equal_numpy_from_the_explicit_gradient_matrix(precision, noise_name):
    dtype, tol = precision
    rtol = max(tol["rtol"], 1e-9) if dtype == "float64" else 1e-4  # float32 Gram sums on JAX
    b, n = 4, 10
    x, y = _data("regularized", dtype, n=16)
    model = _model("regularized")
    model.compile(kn.NoisyGD(0.3, noise=noise_name, emulate_batch_size=b, seed=2), "sparse_categorical_crossentropy")
    monitor = kn.NoiseMonitor((x[:n], y[:n]), every_n_steps=2)
    history = model.fit(x, y, batch_size=16, epochs=4, verbose=0, callbacks=[monitor])
    assert [entry["step"] for entry in monitor.history] == [0, 2, 4]
    last = monitor.history[-1]  # after the last step: the final weights (on JAX, synced from fit's state)
    G = _explicit_rows(model, x[:n], y[:n]).astype("float64")
    g = G.mean(0)
    sampler = noise.get(noise_name).calibrated(b, n)
    weights = to_numpy(sampler.sample(ops.convert_to_tensor([0, 4], "int32"), n, "float32")).astype("float64")
    xi = ((weights - 1.0) @ G) / n
    population = np.sum((G - g) ** 2) / n
    expected = {
        "grad_norm": np.linalg.norm(g),
        "noise_norm": np.linalg.norm(xi),
        "sgd_cov_trace": (n - b) / (b * (n - 1)) * population,  # SGD(b) without replacement out of n
        "noise_cov_trace": np.trace(sampler.covariance(n) @ G @ G.T) / n**2,
        "noise_scale": np.sum((G - g) ** 2) / (n - 1) / np.dot(g, g),
    }
    # The monitor draws in float64 where it can: the float32 draw above is the same to 1e-7 (Gaussian) or exactly.
    for key, value in expected.items():
        np.testing.assert_allclose(last[key], value, rtol=max(rtol, 1e-6) if key == "noise_norm" else rtol, err_msg=key)
    assert history.history["noise/grad_norm"][-1] == last["grad_norm"]
    assert monitor.gram_source == "layers"


def test_monitor_keeps_its_compiled_probe_across_fits_and_rebuilds_it_for_another_optimizer_or_model(precision):
    # A second `fit` keeps the probe's compiled functions (tracing them at every `fit` cost 0.3 s on JAX's MLP);
    # a recompiled optimizer or another model builds them anew. Each fit's last measurement must still be the
    # explicit loop's at that fit's final weights (a kept JAX function must not keep its first weights).
    dtype, tol = precision
    rtol = max(tol["rtol"], 1e-9) if dtype == "float64" else 1e-4  # float32 Gram sums on JAX
    n = 10
    x, y = _data("regularized", dtype, n=16)
    monitor = kn.NoiseMonitor((x[:n], y[:n]), every_n_steps=1)

    def fit_and_check(model):
        model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[monitor])
        G = _explicit_rows(model, x[:n], y[:n]).astype("float64")
        np.testing.assert_allclose(monitor.history[-1]["grad_norm"], np.linalg.norm(G.mean(0)), rtol=rtol)
        np.testing.assert_allclose(monitor.history[-1]["noise_scale"],
                                   np.sum((G - G.mean(0)) ** 2) / (n - 1) / np.sum(G.mean(0) ** 2), rtol=rtol)
        return monitor._probe

    model = _model("regularized")
    model.compile(kn.NoisyGD(0.3, emulate_batch_size=4, seed=2), "sparse_categorical_crossentropy")
    first = fit_and_check(model)
    assert fit_and_check(model) is first
    model.compile(kn.NoisyGD(0.1, emulate_batch_size=2, seed=3), "sparse_categorical_crossentropy")
    second = fit_and_check(model)
    assert second is not first
    other = _model("regularized")
    other.compile(kn.NoisyGD(0.3, emulate_batch_size=4, seed=2), "sparse_categorical_crossentropy")
    assert fit_and_check(other) is not second


@pytest.mark.skipif(BACKEND == "tensorflow", reason="TensorBoard summaries are written on TensorFlow")
def test_monitor_log_dir_is_refused_with_the_backend_named(tmp_path):
    with pytest.raises(ValueError, match=rf"`log_dir`.*TensorFlow.*Received: log_dir=.* with the '{BACKEND}' backend"):
        kn.NoiseMonitor((np.zeros((4, 5)), np.zeros(4)), log_dir=str(tmp_path))


def test_rows_follow_the_weights_between_calls(precision):
    # On JAX the function is compiled once per model and arguments: it must take the weights as arguments, not
    # keep the values of its first call (the statelessness trap).
    dtype, tol = precision
    model = _model("regularized")
    x, y = _data("regularized", dtype)
    first = [to_numpy(g) for g in kn.per_example_gradients(model, x, y)]
    model.set_weights([w * 1.5 for w in model.get_weights()])
    second = [to_numpy(g) for g in kn.per_example_gradients(model, x, y)]
    assert max(np.max(np.abs(a - b)) for a, b in zip(first, second)) > 1e-3
    for g, expected in zip(second, _loop(model, x, y, batched=False)):
        np.testing.assert_allclose(g, expected, **tol)


@pytest.mark.parametrize("kind", ["regularized", "conv1d", "conv2d", "embedding", "layernorm"])
def test_gram_from_the_layers_equals_the_gram_of_G(precision, kind):
    from keras_noisygd.per_example import gram as gram_lib
    from keras_noisygd.per_example import layer_rows

    dtype, tol = precision
    model = _model(kind)
    x, y = _data(kind, dtype)
    gram, mismatch = gram_lib.gram(layer_rows.cached_plan(model), model, x, y)
    assert float(to_numpy(mismatch)) < 1e-6
    rows = kn.per_example_gradients(model, x, y, method="jacobian")
    G = np.concatenate([to_numpy(r).reshape(B, -1) for r in rows], axis=1).astype("float64")
    if BACKEND == "torch" and dtype == "float64":
        # Keras 3.15.1 computes `ops.matmul` of float64 tensors in float32 off TensorFlow
        # (`BIT64_TO_BIT32_DTYPE` in keras/src/backend/common/dtypes.py), so a float64 model's forward pass and
        # this Gram carry float32 products there: ~1e-7 of the Gram's largest entry, not 1e-12. A wrong layer
        # share is off by O(1) of it.
        tol = dict(rtol=1e-5, atol=1e-6 * float(np.abs(G @ G.T).max()))
    np.testing.assert_allclose(to_numpy(gram), G @ G.T, **tol)
