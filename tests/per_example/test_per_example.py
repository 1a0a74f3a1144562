"""The per-example engine against explicit per-example loops and the batch gradient, in float64.

Tolerances: every comparison is float64 arithmetic on the same values summed in
a different order (vectorised vs looped, batched vs per example), so the
differences are a few ulps of the largest intermediate, ~1e-15 here; 1e-10
relative (1e-12 absolute) leaves room for that and still catches any wrong
term (a missing regularizer, a shared Dropout mask, single-example BatchNorm
statistics all differ at 1e-2 or more).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_noisygd as kn
from keras_noisygd import per_example

B = 8
TOL = dict(rtol=1e-10, atol=1e-12)


def _model(kind):
    """A small float64 model of each supported layer kind, compiled with a per-example-capable loss."""
    keras.utils.set_random_seed(7)
    layers = keras.layers
    if kind == "conv1d":
        inputs = keras.Input((9, 2))
        hidden = layers.Flatten()(layers.Conv1D(3, 3, strides=2, activation="tanh")(inputs))
    elif kind == "conv2d":
        inputs = keras.Input((6, 6, 2))
        hidden = layers.Conv2D(3, 3, padding="same", activation="tanh")(inputs)
        hidden = layers.Flatten()(layers.Conv2D(2, 3, strides=2)(hidden))
    elif kind == "embedding":
        inputs = keras.Input((4,), dtype="int32")
        hidden = layers.Flatten()(layers.Embedding(11, 3)(inputs))
    elif kind == "embedding_l2":  # ids of rank 2, the table regularized, then Dense layers
        inputs = keras.Input((2, 2), dtype="int32")
        hidden = layers.Embedding(11, 3, embeddings_regularizer=keras.regularizers.L2(0.05))(inputs)
        hidden = layers.Dense(4, activation="tanh")(layers.Flatten()(hidden))
    else:
        inputs = keras.Input((5,))
        regularizer = keras.regularizers.L2(0.05) if kind == "regularized" else None
        activity = keras.regularizers.L2(0.03) if kind == "activity" else None
        hidden = layers.Dense(6, activation="tanh", kernel_regularizer=regularizer, activity_regularizer=activity)(
            inputs
        )
        if kind == "layernorm":
            hidden = layers.LayerNormalization()(hidden)
        if kind == "layernorm_l2":
            hidden = layers.LayerNormalization(
                gamma_regularizer=keras.regularizers.L2(0.05), beta_regularizer=keras.regularizers.L2(0.02)
            )(hidden)
        if kind == "batchnorm":
            hidden = layers.BatchNormalization()(hidden)
        if kind == "dropout":
            hidden = layers.Dropout(0.5)(hidden)
    outputs = layers.Dense(3, activation="softmax")(hidden)
    model = kn.NoisyModel(inputs, outputs)
    model.compile(kn.NoisyGD(0.1, noise="none"), "sparse_categorical_crossentropy")
    return model


def _data(kind, n=B, seed=0):
    rng = np.random.default_rng(seed)
    shapes = {"conv1d": (9, 2), "conv2d": (6, 6, 2)}
    if kind == "embedding":
        x = rng.integers(0, 11, (n, 4)).astype("int32")
    elif kind == "embedding_l2":
        x = rng.integers(0, 11, (n, 2, 2)).astype("int32")
    else:
        x = rng.normal(size=(n, *shapes.get(kind, (5,))))
    return tf.constant(x), tf.constant(rng.integers(0, 3, n))


def _state(model):
    return [v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables]


def _example_loss(model, y_true, y_pred):
    return keras.losses.sparse_categorical_crossentropy(y_true, y_pred)


def _loop_independent(model, x, y):
    """Explicit loop: the gradient of each example's loss on its own (a batch of one) plus the regularizer."""
    rows = []
    for i in range(B):
        with tf.GradientTape() as tape:
            y_pred = model(x[i : i + 1], training=True)
            loss = _example_loss(model, y[i : i + 1], y_pred)[0] + sum(model.losses)
        rows.append(_dense(tape.gradient(loss, model.trainable_variables)))
    return [np.stack(g) for g in zip(*rows)]


def _loop_batched(model, x, y):
    """Explicit loop for batch-coupled models: d l_i / d theta through the batched forward pass, per i."""
    trainable, non_trainable = _state(model)
    rows = []
    for i in range(B):
        with tf.GradientTape() as tape:
            tape.watch(trainable)
            y_pred, _, losses = model.stateless_call(trainable, non_trainable, x, training=True, return_losses=True)
            loss = _example_loss(model, y[i : i + 1], y_pred[i : i + 1])[0] + sum(losses)
        rows.append(_dense(tape.gradient(loss, trainable)))
    return [np.stack(g) for g in zip(*rows)]


def _batch_gradient(model, x, y, sample_weight=None):
    """Keras's own batch gradient: the compiled loss through `compute_loss`."""
    with tf.GradientTape() as tape:
        y_pred = model(x, training=True)
        loss = model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight)
    return _dense(tape.gradient(loss, model.trainable_variables))


def _dense(gradients):
    # An Embedding's gradient is IndexedSlices; the per-example engine returns it dense.
    return [tf.convert_to_tensor(g) for g in gradients]


INDEPENDENT = ["dense", "regularized", "conv1d", "conv2d", "embedding", "embedding_l2", "layernorm", "layernorm_l2"]
COUPLED = ["batchnorm", "dropout"]


@pytest.mark.parametrize("kind", INDEPENDENT + COUPLED)
def test_rows_equal_an_explicit_loop_and_average_to_the_batch_gradient(float64, kind):
    model = _model(kind)
    x, y = _data(kind)
    grads = kn.per_example_gradients(model, x, y)
    loop = _loop_batched(model, x, y) if kind in COUPLED else _loop_independent(model, x, y)
    for g, expected, variable in zip(grads, loop, model.trainable_variables):
        assert g.shape == (B, *variable.shape)
        np.testing.assert_allclose(g, expected, **TOL)
    # The batch gradient is taken with a real (stateful) call: same Dropout seed state, so the same masks.
    for g, expected in zip(grads, _batch_gradient(model, x, y)):
        np.testing.assert_allclose(np.mean(g, axis=0), expected, **TOL)


def test_activity_regularizer_enters_through_the_batch_regularization_gradient(float64):
    # Keras divides an activity penalty by the batch size; each row carries the batch's R, so the mean is exact.
    model = _model("activity")
    x, y = _data("activity")
    grads = kn.per_example_gradients(model, x, y)
    for g, expected in zip(grads, _batch_gradient(model, x, y)):
        np.testing.assert_allclose(np.mean(g, axis=0), expected, **TOL)


@pytest.mark.parametrize(
    "kind,expected",
    [("dense", "layers"), ("conv2d", "layers"), ("embedding", "layers"), ("layernorm", "layers"),
     ("batchnorm", "jacobian"), ("dropout", "jacobian")],
)
def test_auto_picks_the_jacobian_exactly_when_training_updates_state(float64, kind, expected):
    model = _model(kind)
    x, y = _data(kind)
    before = [np.array(v) for v in model.non_trainable_variables]
    assert per_example.compute(model, x, y).method == expected
    # Computing G leaves the model alone: BatchNorm statistics and the Dropout seed are unchanged.
    for old, variable in zip(before, model.non_trainable_variables):
        np.testing.assert_array_equal(old, variable)


@pytest.mark.parametrize("method", ["auto", "vectorized"])
def test_frozen_batchnorm_runs_vectorized(float64, method):
    model = _model("batchnorm")
    model.layers[2].trainable = False  # inference mode: no batch coupling, no state update
    x, y = _data("batchnorm")
    result = per_example.compute(model, x, y, method=method)
    assert result.method == "vectorized"  # no layer rows for a model with state, even frozen
    for g, expected in zip(result.gradients, _loop_independent(model, x, y)):
        np.testing.assert_allclose(g, expected, **TOL)


def _shared_dense():
    keras.utils.set_random_seed(11)
    inputs = keras.Input((5,))
    shared = keras.layers.Dense(5, activation="tanh")
    model = kn.NoisyModel(inputs, keras.layers.Dense(3, activation="softmax")(shared(shared(inputs))))
    model.compile(kn.NoisyGD(0.1, noise="none"), "sparse_categorical_crossentropy")
    return model


@pytest.mark.parametrize("jit_compile", [False, True])
def test_layer_rows_fall_back_where_their_check_fails(float64, jit_compile):
    # A layer applied twice: its captured input and output are the first call's only, so its rows would be
    # wrong; the rebuilt bias gradient differs from the backward pass's and the general path runs instead.
    model = _shared_dense()
    x, y = _data("dense")
    rows = tf.function(lambda: kn.per_example_gradients(model, x, y), jit_compile=jit_compile)()
    for g, expected in zip(rows, _loop_independent(model, x, y)):
        np.testing.assert_allclose(g, expected, **TOL)


@pytest.mark.parametrize(
    "kind", ["dense", "regularized", "conv1d", "conv2d", "activity", "embedding_l2", "layernorm_l2"]
)
def test_layer_rows_equal_the_vectorized_method(float64, kind):
    model = _model(kind)
    x, y = _data(kind)
    assert per_example.compute(model, x, y).method == "layers"
    fast = kn.per_example_gradients(model, x, y)
    general = kn.per_example_gradients(model, x, y, method="vectorized")
    for a, b in zip(fast, general):
        np.testing.assert_allclose(a, b, **TOL)


@pytest.mark.parametrize("kind", ["batchnorm", "dropout"])
def test_vectorized_method_refuses_a_model_that_couples_the_batch(float64, kind):
    model = _model(kind)
    with pytest.raises(ValueError, match=r"method='vectorized'.*updates its state.*Received: method='vectorized'"):
        kn.per_example_gradients(model, *_data(kind), method="vectorized")


def test_jacobian_method_equals_vectorized_on_an_independent_model(float64):
    model = _model("conv1d")
    x, y = _data("conv1d")
    for a, b in zip(
        kn.per_example_gradients(model, x, y, method="jacobian"), kn.per_example_gradients(model, x, y, method="vectorized")
    ):
        np.testing.assert_allclose(a, b, **TOL)


@pytest.mark.parametrize("kind,chunk_size", [("conv2d", 3), ("batchnorm", 1), ("batchnorm", 3), ("dense", 20)])
def test_chunked_equals_unchunked(float64, kind, chunk_size):
    # 3 does not divide 8 (a padded last chunk), 20 > B (one padded chunk).
    model = _model(kind)
    x, y = _data(kind)
    for a, b in zip(kn.per_example_gradients(model, x, y, chunk_size=chunk_size), kn.per_example_gradients(model, x, y)):
        np.testing.assert_allclose(a, b, **TOL)


@pytest.mark.parametrize("kind,chunk_size", [("conv2d", None), ("embedding", 3), ("batchnorm", 3)])
def test_xla_equals_eager(float64, kind, chunk_size):
    # Dropout is left out: TensorFlow's stateless dropout draws other masks under XLA (Keras's behaviour too).
    model = _model(kind)
    x, y = _data(kind)
    compiled = tf.function(lambda x, y: kn.per_example_gradients(model, x, y, chunk_size=chunk_size), jit_compile=True)
    for a, b in zip(compiled(x, y), kn.per_example_gradients(model, x, y, chunk_size=chunk_size)):
        np.testing.assert_allclose(a, b, **TOL)


def test_dynamic_batch_size_in_a_traced_function(float64):
    model = _model("dense")
    spec = (tf.TensorSpec([None, 5], tf.float64), tf.TensorSpec([None], tf.int64))
    traced = tf.function(lambda x, y: kn.per_example_gradients(model, x, y, chunk_size=3), input_signature=spec)
    for n in (8, 5):
        x, y = _data("dense", n=n)
        for a, b in zip(traced(x, y), kn.per_example_gradients(model, x, y)):
            np.testing.assert_allclose(a, b, **TOL)


def test_sample_weight_scales_each_row(float64):
    model = _model("dense")
    x, y = _data("dense")
    sample_weight = np.linspace(0.0, 2.0, B)
    weighted = kn.per_example_gradients(model, x, y, sample_weight=sample_weight)
    plain = kn.per_example_gradients(model, x, y)
    for a, b in zip(weighted, plain):
        np.testing.assert_allclose(a, b * sample_weight.reshape([-1] + [1] * (b.ndim - 1)), **TOL)
    for g, expected in zip(weighted, _batch_gradient(model, x, y, sample_weight=sample_weight)):
        np.testing.assert_allclose(np.mean(g, axis=0), expected, **TOL)


@pytest.mark.parametrize(
    "loss",
    [
        lambda: "mse",
        lambda: keras.losses.MeanSquaredError(),  # made inside the test: Loss objects take floatx's dtype
        lambda: keras.losses.MeanSquaredError(reduction="sum"),
        lambda: keras.losses.CategoricalCrossentropy(),
    ],
    ids=["name", "mean", "sum", "categorical"],
)
def test_explicit_loss_rows_average_to_that_loss_gradient(float64, loss):
    loss = loss()
    model = _model("dense")
    x, _ = _data("dense")
    targets = tf.constant(np.eye(3)[np.arange(B) % 3])
    grads = kn.per_example_gradients(model, x, targets, loss=loss)
    with tf.GradientTape() as tape:
        value = keras.losses.get(loss)(targets, model(x, training=True))
        value = tf.reduce_mean(value) if value.shape.rank else value
    for g, expected in zip(grads, tape.gradient(value, model.trainable_variables)):
        np.testing.assert_allclose(np.mean(g, axis=0), expected, **TOL)


def test_multi_output_model_uses_the_compiled_losses_and_loss_weights(float64):
    keras.utils.set_random_seed(3)
    inputs = keras.Input((5,))
    hidden = keras.layers.Dense(4, activation="tanh")(inputs)
    first = keras.layers.Dense(3, activation="softmax", name="first")(hidden)
    second = keras.layers.Dense(1, name="second")(hidden)
    model = kn.NoisyModel(inputs, [first, second])
    model.compile(kn.NoisyGD(0.1, noise="none"), ["sparse_categorical_crossentropy", "mse"], loss_weights=[0.25, 2.0])
    x, y = _data("dense")
    targets = (y, tf.constant(np.linspace(-1, 1, B)))
    grads = kn.per_example_gradients(model, x, targets)
    for g, expected in zip(grads, _batch_gradient(model, x, targets)):
        np.testing.assert_allclose(np.mean(g, axis=0), expected, **TOL)


def test_bad_arguments_are_named(float64):
    model = _model("dense")
    x, y = _data("dense")
    with pytest.raises(ValueError, match=r"`method`.*Received: method='loop'"):
        kn.per_example_gradients(model, x, y, method="loop")
    with pytest.raises(ValueError, match=r"`chunk_size`.*Received: chunk_size=0"):
        kn.per_example_gradients(model, x, y, chunk_size=0)
    with pytest.raises(ValueError, match=r"one value per example.*scalar"):
        kn.per_example_gradients(model, x, y, loss=_ScalarLoss())
    with pytest.raises(ValueError, match=r"`sample_weight`.*one value per example.*\(8, 2\)"):
        kn.per_example_gradients(model, x, y, sample_weight=np.ones((B, 2)))
    with pytest.raises(ValueError, match=r"reduce with one of.*Received: reduction='mean_with_sample_weight'"):
        kn.per_example_gradients(
            model, x, y, loss=keras.losses.SparseCategoricalCrossentropy(reduction="mean_with_sample_weight")
        )
    unbuilt = keras.Sequential([keras.layers.Dense(2)])
    with pytest.raises(ValueError, match=r"`model` must be built"):
        kn.per_example_gradients(unbuilt, x, y, loss="mse")


def test_masked_outputs_are_refused_not_ignored(float64):
    inputs = keras.Input((4,), dtype="int32")
    hidden = keras.layers.Embedding(5, 3, mask_zero=True)(inputs)  # the mask reaches the per-step output
    model = kn.NoisyModel(inputs, keras.layers.Dense(2, activation="softmax")(hidden))
    model.compile(kn.NoisyGD(0.1, noise="none"), "sparse_categorical_crossentropy")
    x = tf.constant([[1, 2, 0, 0], [3, 0, 0, 0]])
    with pytest.raises(ValueError, match=r"masked outputs.*Received: an output with a Keras mask"):
        kn.per_example_gradients(model, x, tf.zeros([2, 4], tf.int64))


class _ScalarLoss(keras.losses.Loss):
    def __init__(self):
        super().__init__()

    def call(self, y_true, y_pred):
        return tf.reduce_sum(y_pred)


def _trained(engine, kind, jit_compile, chunk_size=None, optimizer=kn.NoisyGD, **kwargs):
    model = _model(kind)
    x, y = _data(kind, n=12)
    model.compile(
        optimizer(
            0.5, noise="gaussian_centered", emulate_batch_size=2, seed=5, engine=engine, chunk_size=chunk_size, **kwargs
        ),
        "sparse_categorical_crossentropy",
        jit_compile=jit_compile,
        steps_per_execution=2,
    )
    history = model.fit(x, y, batch_size=6, epochs=2, verbose=0, sample_weight=np.linspace(0.5, 1.5, 12))
    return model, history.history["loss"]


@pytest.mark.parametrize(
    "kind,jit_compile,chunk_size",
    [("regularized", False, None), ("batchnorm", True, None), ("dropout", False, 4), ("conv1d", True, 4),
     ("conv2d", True, None), ("embedding_l2", False, None), ("embedding_l2", True, None),
     ("layernorm_l2", False, None), ("layernorm_l2", True, None)],
    # the layer rows (regularized, conv2d, embedding and layernorm, with and without XLA) and the general methods
)
def test_per_example_engine_trains_like_the_weighted_engine(float64, kind, jit_compile, chunk_size):
    # Same seed, same noise weights: four steps (2 per execution) of G W + grad R must equal the re-weighted
    # loss's gradient steps, BatchNorm statistics and Dropout masks included (momentum 0.5 is float32-exact).
    weighted, weighted_loss = _trained("weighted", kind, jit_compile, momentum=0.5)
    engine, engine_loss = _trained("per_example", kind, jit_compile, chunk_size, momentum=0.5)
    for a, b in zip(engine.get_weights(), weighted.get_weights()):  # BatchNorm moving statistics too
        np.testing.assert_allclose(a, b, **TOL)
    np.testing.assert_allclose(engine_loss, weighted_loss, **TOL)
    assert int(engine.optimizer.noise_state[1]) == 4


class _CallCounter(keras.layers.Layer):
    """The identity, recording the batch size of every call (Python-level: once per eager step)."""

    def __init__(self, calls, **kwargs):
        super().__init__(**kwargs)
        self.record = calls.append  # not the list itself: Keras would track a copy of it

    def call(self, inputs):
        self.record(inputs.shape[0])  # None while Keras infers the output shape of the symbolic model
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape


def _counted_fit(kind, engine, calls):
    base = _model(kind)
    model = kn.NoisyModel(base.inputs, _CallCounter(calls)(base.outputs[0]))
    model.compile(kn.NoisyGD(0.1, noise="sgd", emulate_batch_size=2, seed=3, engine=engine),
                  "sparse_categorical_crossentropy", metrics=["accuracy"], run_eagerly=True)
    x, y = _data(kind, n=12)
    return model.fit(x, y, batch_size=6, epochs=3, verbose=0, shuffle=False).history


@pytest.mark.parametrize("kind", ["dense", "batchnorm", "dropout"])  # the vectorized and the jacobian method
def test_per_example_step_runs_one_batched_forward_pass(float64, kind):
    # The engine's own batched forward pass gives the step's predictions and state: the step must not run the
    # model on the batch a second time (it did: `self(x)` before the engine). The vectorized method also runs
    # the model on single examples (batch 1), which are not counted here.
    calls = []
    history = _counted_fit(kind, "per_example", calls)
    assert calls.count(6) == 6, calls  # 3 epochs x 2 steps, one batched pass each (12 before)
    # Metrics and loss come from that pass: the same as the weighted engine's (same masks, same statistics).
    weighted = _counted_fit(kind, "weighted", [])
    np.testing.assert_allclose(history["loss"], weighted["loss"], **TOL)
    assert history["accuracy"] == weighted["accuracy"]


def test_per_example_engine_with_adam(float64):
    weighted, _ = _trained("weighted", "dense", False, optimizer=kn.NoisyAdam)
    engine, _ = _trained("per_example", "dense", False, optimizer=kn.NoisyAdam)
    for a, b in zip(engine.get_weights(), weighted.get_weights()):
        np.testing.assert_allclose(a, b, **TOL)


def test_engine_arguments_are_checked_and_serialized():
    optimizer = kn.NoisyGD(0.1, emulate_batch_size=4, engine="per_example", chunk_size=16, seed=1)
    restored = kn.NoisyGD.from_config(optimizer.get_config())
    assert (restored.engine, restored.chunk_size) == ("per_example", 16)
    with pytest.raises(ValueError, match=r"`engine` must be one of \['weighted', 'per_example'\]. Received: engine='pfor'"):
        kn.NoisyGD(0.1, emulate_batch_size=4, engine="pfor")
    with pytest.raises(ValueError, match=r"`chunk_size` only applies to engine='per_example'.*chunk_size=8"):
        kn.NoisyGD(0.1, emulate_batch_size=4, chunk_size=8)
    with pytest.raises(ValueError, match=r"`chunk_size` must be None or an integer >= 1. Received: chunk_size=-1"):
        kn.NoisyAdam(emulate_batch_size=4, engine="per_example", chunk_size=-1)


@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "sum"])
@pytest.mark.parametrize("shape", [(6, 3), (6, 4, 3)], ids=["one value per example", "four values per example"])
def test_per_example_values_average_to_the_keras_loss(reduction, shape):
    # [B] values are returned as they are (or times B under "sum"), [B, T] values reduce over T first: both
    # must average to what Keras's loss reduces the same values to, each value being NumPy's mean or sum.
    rng = np.random.default_rng(0)
    y_true, y_pred = rng.normal(size=shape), rng.normal(size=shape)
    loss = keras.losses.MeanSquaredError(reduction=reduction, dtype="float64")
    values = keras.ops.convert_to_numpy(per_example.losses.per_example_values(loss, y_true, y_pred, shape[0]))
    elements = ((y_true - y_pred) ** 2).mean(-1).reshape(shape[0], -1)  # MSE's per-element values
    want = elements.sum(1) * shape[0] if reduction == "sum" else elements.mean(1)
    np.testing.assert_allclose(values, want, rtol=1e-12)  # float64 throughout
    np.testing.assert_allclose(values.mean(), keras.ops.convert_to_numpy(loss(y_true, y_pred)), rtol=1e-12)
