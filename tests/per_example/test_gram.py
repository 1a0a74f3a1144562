"""The layer path (`keras_noisygd/_gram.py`, `_layer_rules.py`) against `G G^T` from per-example rows, float64.

Tolerance 1e-10 relative (1e-12 absolute): the same float64 quantities summed in
a different order (layer-wise products of small Gram matrices, an Embedding's
id-equality products, against inner products of the flattened rows of the
general method or of an explicit loop over examples), ~1e-15 apart; a missing
bias term, regularizer cross term or activation derivative changes `K` at 1e-2
or more, a LayerNormalization row from the unnormalised input or an Embedding
Gram without the id-equality mask at 5e-3 or more (tried on these models).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import mlp

import keras_noisygd as kn
from keras_noisygd import per_example
from keras_noisygd.layers import GhostBatchNormalization
from keras_noisygd.per_example import gram as gram_lib
from keras_noisygd.per_example import layer_rows, rules

TOL = dict(rtol=1e-10, atol=1e-12)
B = 9


def _deep(model_class=kn.NoisyModel):
    """Flatten, a bias-free layer, gelu, a separate ReLU layer, logits; bias and activity regularizers."""
    keras.utils.set_random_seed(3)
    layers = [
        keras.layers.Flatten(),
        keras.layers.Dense(6, activation="relu", use_bias=False),
        keras.layers.Dense(5, activation="gelu", bias_regularizer=keras.regularizers.L2(0.02),
                           activity_regularizer=keras.regularizers.L1(0.01)),
        keras.layers.ReLU(),
        keras.layers.Dense(3, kernel_regularizer=keras.regularizers.L2(0.03)),
    ]
    if model_class is keras.Sequential:
        model = keras.Sequential([keras.Input((3, 4)), *layers])
    else:
        hidden = inputs = keras.Input((3, 4))
        for layer in layers:
            hidden = layer(hidden)
        model = model_class(inputs, hidden)
    model.compile(kn.NoisyGD(0.1, noise="none"), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _mlp(l2):
    keras.utils.set_random_seed(4)
    model = mlp(dtype="float64", l2=l2)
    model.compile(kn.NoisyGD(0.1, noise="none"), "sparse_categorical_crossentropy")
    return model


def _data(shape, seed=0):
    rng = np.random.default_rng(seed)
    return tf.constant(rng.normal(size=(B, *shape))), tf.constant(rng.integers(0, 3, B))


def _reference(model, x, y, sample_weight=None):
    # The general method ('auto' would take the layer rows this module tests): exact for every model.
    rows = kn.per_example_gradients(model, x, y, sample_weight=sample_weight, method="jacobian")
    flat = np.concatenate([np.reshape(g.numpy(), (B, -1)) for g in rows], axis=1)
    return flat @ flat.T


@pytest.mark.parametrize(
    "build, shape, weighted",
    [
        (lambda: _mlp(0.0), (5,), False),
        (lambda: _mlp(1e-2), (5,), True),  # kernel L2: the shared r enters every row
        (_deep, (3, 4), False),
        (lambda: _deep(keras.Sequential), (3, 4), True),
    ],
    ids=["mlp", "mlp-l2-weighted", "deep-functional", "deep-sequential-weighted"],
)
def test_dense_rows_give_the_gram_of_the_per_example_rows(float64, build, shape, weighted):
    model = build()
    x, y = _data(shape)
    sample_weight = tf.constant(np.linspace(0.5, 2.0, B)) if weighted else None
    plan = layer_rows.plan(model)
    assert plan is not None
    gram, mismatch = gram_lib.gram(plan, model, x, y, sample_weight=sample_weight)
    np.testing.assert_allclose(gram.numpy(), _reference(model, x, y, sample_weight), **TOL)
    assert float(mismatch) < 1e-12  # float64: the rebuilt batch gradients are the true ones


def _convolutional(kind):
    """Convolutions of each supported kind: strides, same/valid padding, no bias, activations, L2, pooling."""
    keras.utils.set_random_seed(10)
    layers = keras.layers
    if kind == "conv1d":
        inputs = keras.Input((11, 2))
        hidden = layers.Conv1D(3, 3, strides=2, activation="tanh", kernel_regularizer=keras.regularizers.L2(0.02))(inputs)
        hidden = layers.Conv1D(2, 2, padding="same", use_bias=False)(hidden)
    elif kind == "conv2d":
        inputs = keras.Input((7, 6, 2))
        hidden = layers.Conv2D(3, 3, strides=2, padding="same", activation="relu")(inputs)
        hidden = layers.Conv2D(2, (2, 3), padding="valid", use_bias=False, activation="gelu")(hidden)
    else:  # the paper's CNN, smaller: conv, pool, ReLU layers, dense
        inputs = keras.Input((12, 12, 1))
        hidden = layers.ReLU()(layers.MaxPooling2D()(layers.Conv2D(4, 5)(inputs)))
        hidden = layers.ReLU()(layers.MaxPooling2D()(layers.Conv2D(3, 3)(hidden)))
        hidden = layers.Dense(5, activation="relu")(layers.Flatten()(hidden))
    outputs = layers.Dense(3)(layers.Flatten()(hidden))
    model = kn.NoisyModel(inputs, outputs)
    model.compile(kn.NoisyGD(0.1, noise="none"), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


@pytest.mark.parametrize("kind, shape", [("conv1d", (11, 2)), ("conv2d", (7, 6, 2)), ("paper", (12, 12, 1))])
def test_convolution_rows_give_the_gram_of_the_per_example_rows(float64, kind, shape):
    model = _convolutional(kind)
    x, y = _data(shape)
    sample_weight = tf.constant(np.linspace(0.5, 2.0, B))
    gram, mismatch = gram_lib.gram(layer_rows.plan(model), model, x, y, sample_weight=sample_weight)
    np.testing.assert_allclose(gram.numpy(), _reference(model, x, y, sample_weight), **TOL)
    assert float(mismatch) < 1e-12


def _coupled(layer):
    keras.utils.set_random_seed(5)
    inputs = keras.Input((5,))
    outputs = keras.layers.Dense(3)(layer(keras.layers.Dense(4)(inputs)))
    model = kn.NoisyModel(inputs, outputs)
    model.compile(kn.NoisyGD(0.1, noise="none"), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _shared():
    keras.utils.set_random_seed(6)
    inputs = keras.Input((4,))
    shared = keras.layers.Dense(4, activation="tanh")
    outputs = keras.layers.Dense(3)(shared(shared(inputs)))  # the same layer twice
    model = kn.NoisyModel(inputs, outputs)
    model.compile(kn.NoisyGD(0.1, noise="none"), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _recurrent():
    keras.utils.set_random_seed(7)
    inputs = keras.Input((3, 4))
    outputs = keras.layers.Dense(3)(keras.layers.LSTM(2)(inputs))
    model = kn.NoisyModel(inputs, outputs)
    model.compile(kn.NoisyGD(0.1, noise="none"), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _io(layer):
    inputs = keras.Input((6, 2))
    return inputs, keras.layers.Dense(3)(keras.layers.Flatten()(layer(inputs)))


def _conv():
    keras.utils.set_random_seed(8)
    model = kn.NoisyModel(*_io(keras.layers.Conv1D(2, 3)))
    model.compile(kn.NoisyGD(0.1, noise="none"), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


class _Subclassed(keras.Model):
    def __init__(self, own_weight=False):
        super().__init__()
        self.hidden = keras.layers.Dense(4, activation="tanh")
        self.dense = keras.layers.Dense(3)
        self.scale = self.add_weight(shape=(), initializer="ones") if own_weight else None

    def call(self, inputs):
        outputs = self.dense(self.hidden(inputs))
        return outputs * self.scale if self.scale is not None else outputs


def test_models_outside_the_rule_are_refused_before_any_data(float64):
    own_weight = _Subclassed(own_weight=True)  # a variable of its own, in no layer with a rule
    own_weight(tf.zeros([1, 5]))
    dilated = kn.NoisyModel(*_io(keras.layers.Conv1D(2, 2, dilation_rate=2)))
    causal = kn.NoisyModel(*_io(keras.layers.Conv1D(2, 2, padding="causal")))
    for model in (own_weight, _coupled(keras.layers.BatchNormalization()), dilated, causal):  # BN: gamma, beta
        assert layer_rows.plan(model) is None


def test_a_subclassed_model_gets_the_layer_rows_of_the_layers_it_calls(float64):
    keras.utils.set_random_seed(16)
    model = _Subclassed()
    model.compile(kn.NoisyGD(0.1, noise="none"), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = _data((5,))
    model(x)
    plan = layer_rows.plan(model)
    assert plan is not None and not plan.layers and len(plan.nested) == 2  # no graph: both reached in `call`
    assert per_example.compute(model, x, y).method == "layers"
    gram, mismatch = gram_lib.gram(plan, model, x, y)
    loop = _loop_rows(model, x, y, np.ones(B))
    np.testing.assert_allclose(gram.numpy(), loop @ loop.T, **TOL)
    assert float(mismatch) < 1e-12
    rows = kn.per_example_gradients(model, x, y)
    flat = np.concatenate([np.reshape(g.numpy(), (B, -1)) for g in rows], axis=1)
    np.testing.assert_allclose(flat, loop, **TOL)


@pytest.mark.parametrize(
    "build, shape",
    [(lambda: _coupled(keras.layers.BatchNormalization(center=False, scale=False)), (5,)),  # statistics only
     (lambda: _coupled(keras.layers.Dropout(0.3)), (5,)), (_recurrent, (3, 4))],
    ids=["batchnorm", "dropout", "recurrent"],
)
def test_coupled_or_sequence_models_give_no_layer_gram(float64, build, shape):
    model = build()
    x, y = _data(shape)
    # Refused before any data: state (BN statistics, a Dropout seed), or a layer whose variables no rule
    # holds (an LSTM's are its cell's, which has no rule and no sublayers).
    assert layer_rows.plan(model) is None


def test_a_nested_layer_applied_twice_falls_back_to_g_and_stays_exact(float64):
    model = _nested("twice")
    x, y = _data((3, 4))
    plan = layer_rows.plan(model)
    assert plan is not None and len(plan.nested) == 6  # query, key, value, output, the norm, the Dense
    # The block's Dense runs on two inputs: no one (input, output) pair describes it, so no layer rows.
    assert layer_rows.capture(plan, model, x, y) is None
    result = per_example.compute(model, x, y)
    assert result.method == "jacobian"
    flat = np.concatenate([np.reshape(g.numpy(), (B, -1)) for g in result.rows()], axis=1)
    np.testing.assert_allclose(flat, _loop_rows(model, x, y, np.ones(B)), **TOL)


def test_monitor_builds_the_gram_of_an_attention_model_from_the_layers(float64):
    model = _nested("attention")
    x, y = _inputs(("ids", (4,), 9), seed=2)
    probe = gram_lib.ProbeGram(model)
    k = probe(x, y)
    assert probe.source == "layers"  # not G: the projections inside MultiHeadAttention are captured
    loop = _loop_rows(model, x, y, np.ones(B))
    np.testing.assert_allclose(k, loop @ loop.T, **TOL)


def test_a_layer_applied_twice_shows_in_the_mismatch(float64):
    model = _shared()
    x, y = _data((4,))
    _, mismatch = gram_lib.gram(layer_rows.plan(model), model, x, y)
    assert float(mismatch) > 1e-2  # only the first call's input and output are captured


def _assert_monitor_statistics(model, x, y, gram, auto_source):
    """NoiseMonitor's statistics on the probe (x, y) equal those of `gram` = G G^T, with either method."""
    expected = kn.monitor.noise_statistics(gram, np.ones(B), np.zeros((B, B)), kn.noise.SGDSampling(3).covariance(B))
    for option, source in (("auto", auto_source), ("per_example", "per_example")):
        monitor = kn.NoiseMonitor((x, y), every_n_steps=1, sgd_batch_size=3, method=option)
        monitor.set_model(model)
        monitor.on_train_begin()
        assert monitor.gram_source == source
        for key in ("grad_norm", "sgd_cov_trace", "noise_scale"):
            np.testing.assert_allclose(monitor.history[-1][key], expected[key], **TOL, err_msg=key)


@pytest.mark.parametrize(
    "build, shape, method",
    [(lambda: _mlp(1e-2), (5,), "layers"), (_shared, (4,), "per_example"),
     (lambda: _coupled(keras.layers.BatchNormalization()), (5,), "per_example"), (_conv, (6, 2), "layers")],
    ids=["mlp", "shared", "batchnorm", "conv"],
)
def test_monitor_uses_the_gram_path_where_it_applies_and_agrees_with_g(float64, build, shape, method):
    model = build()
    x, y = _data(shape)
    _assert_monitor_statistics(model, x, y, _reference(model, x, y), auto_source=method)


def test_float32_model_is_within_float32_rounding_and_passes_the_check():
    # float32 products of up to 784-term sums: ~1e-6 relative; 1e-4 leaves room and still catches a missing
    # term (1e-2 or more, see the float64 tests). The monitor keeps the Gram path below 1e-4 mismatch.
    keras.utils.set_random_seed(9)
    inputs = keras.Input((784,))
    hidden = keras.layers.Dense(256, activation="relu")(inputs)
    outputs = keras.layers.Dense(10, activation="softmax")(keras.layers.Dense(256, activation="relu")(hidden))
    model = kn.NoisyModel(inputs, outputs)
    model.compile(kn.NoisyGD(0.1, noise="none"), "sparse_categorical_crossentropy")
    rng = np.random.default_rng(1)
    x, y = tf.constant(rng.normal(size=(B, 784)).astype("float32")), tf.constant(rng.integers(0, 10, B))
    gram, mismatch = gram_lib.gram(layer_rows.plan(model), model, x, y)
    np.testing.assert_allclose(gram.numpy(), _reference(model, x, y), rtol=1e-4, atol=1e-6 * np.abs(gram).max())
    assert float(mismatch) < layer_rows.TOLERANCE


# ---------------------------------------------------------------- Embedding and LayerNormalization rules
L2 = keras.regularizers.L2


def _compiled(inputs, outputs):
    model = kn.NoisyModel(inputs, outputs)
    model.compile(kn.NoisyGD(0.1, noise="none"), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _embedding(kind):
    """Embedding -> Dense, with the table regularized; `kind` picks the ids' shape and what follows the table."""
    keras.utils.set_random_seed(12)
    positions, vocabulary = {"rows": ((4,), 11), "equality": ((2, 3), 50), "pooled": ((5,), 7)}[kind]
    inputs = keras.Input(positions, dtype="int32")
    hidden = keras.layers.Embedding(vocabulary, 3, embeddings_regularizer=L2(0.02))(inputs)
    if kind == "pooled":
        hidden = keras.layers.GlobalAveragePooling1D()(hidden)
    else:
        hidden = keras.layers.Flatten()(hidden)
    hidden = keras.layers.Dense(4, activation="tanh", kernel_regularizer=L2(0.01))(hidden)
    return _compiled(inputs, keras.layers.Dense(3)(hidden))


def _layernorm(kind):
    """LayerNormalization between Dense layers, on a sequence, over two axes, or after an Embedding."""
    keras.utils.set_random_seed(13)
    layers = keras.layers
    if kind == "dense":  # gamma and beta regularized: their shared gradient enters every row
        inputs = keras.Input((5,))
        hidden = layers.Dense(6, activation="tanh")(inputs)
        hidden = layers.LayerNormalization(gamma_regularizer=L2(0.05), beta_regularizer=L2(0.03))(hidden)
        hidden = layers.Dense(4, activation="relu")(hidden)
    elif kind == "sequence":  # rows summed over the 3 positions
        inputs = keras.Input((3, 4))
        hidden = layers.Flatten()(layers.LayerNormalization(epsilon=0.1, gamma_regularizer=L2(0.05))(inputs))
    elif kind == "axes":  # gamma [3, 4], no beta
        inputs = keras.Input((3, 4))
        hidden = layers.Flatten()(layers.LayerNormalization(axis=(1, 2), center=False)(inputs))
    else:  # after an Embedding, beta only
        inputs = keras.Input((4,), dtype="int32")
        hidden = layers.LayerNormalization(scale=False)(layers.Embedding(9, 3)(inputs))
        hidden = layers.Flatten()(hidden)
    return _compiled(inputs, layers.Dense(3)(hidden))


def _einsum(kind):
    """Dense on a sequence and EinsumDense in the shapes of a transformer's projections, between the others."""
    keras.utils.set_random_seed(14)
    layers = keras.layers
    inputs = keras.Input((3, 4))
    bias = dict(bias_initializer=keras.initializers.RandomNormal(stddev=0.5))  # a zero bias would hide one left out
    if kind == "dense-sequence":  # a feed-forward block: Dense on [B, T, F], kernel L2 in every row
        hidden = layers.Dense(5, activation="gelu", kernel_regularizer=L2(0.02), **bias)(inputs)
        hidden = layers.Dense(4, use_bias=False)(hidden)
    elif kind == "heads":  # MultiHeadAttention's query/key/value shape, then its output projection
        hidden = layers.EinsumDense("abc,cde->abde", (None, 2, 3), bias_axes="de", activation="tanh", **bias)(inputs)
        hidden = layers.EinsumDense("abde,dec->abc", (None, 4), bias_axes="c",
                                    kernel_regularizer=L2(0.03))(hidden)
    elif kind == "ellipsis":  # `...` for the batch and positions, a bias along one of two output axes
        hidden = layers.EinsumDense("...b,bcd->...cd", (2, 3), bias_axes="c", activation="relu", **bias)(inputs)
        hidden = layers.Reshape((3, 6))(hidden)
    else:  # no bias, a contraction over the positions
        hidden = layers.EinsumDense("abc,bcd->ad", 5, activation="sigmoid")(inputs)
    if kind != "contraction":
        hidden = layers.GlobalAveragePooling1D()(hidden)
    return _compiled(inputs, layers.Dense(3)(hidden))


class _Block(keras.layers.Layer):
    """A transformer block as a layer of its own: attention, then a feed-forward Dense, each with a residual."""

    def __init__(self, twice=False, **kwargs):
        super().__init__(**kwargs)
        self.twice = twice
        self.attention = keras.layers.MultiHeadAttention(2, 3)
        self.norm = keras.layers.LayerNormalization()
        self.dense = keras.layers.Dense(4, activation="gelu", bias_initializer=keras.initializers.RandomNormal(0.5))

    def call(self, x):
        x = self.norm(x + self.attention(x, x))
        x = x + self.dense(x)
        return x + self.dense(x) if self.twice else x  # twice: one Dense applied to two inputs


def _nested(kind):
    """Layers reached inside another layer's call: MultiHeadAttention's projections, a block's layers."""
    keras.utils.set_random_seed(15)
    layers = keras.layers
    if kind == "attention":  # Embedding -> self-attention -> LayerNormalization, as in a text encoder
        inputs = keras.Input((4,), dtype="int32")
        hidden = layers.Embedding(9, 6)(inputs)
        hidden = layers.LayerNormalization()(layers.MultiHeadAttention(2, 3)(hidden, hidden))
    else:
        inputs = keras.Input((3, 4))
        hidden = _Block(twice=kind == "twice")(inputs)
    return _compiled(inputs, layers.Dense(3)(layers.GlobalAveragePooling1D()(hidden)))


NEW_RULES = {
    "nested-attention": (lambda: _nested("attention"), ("ids", (4,), 9)),
    "nested-block": (lambda: _nested("block"), (3, 4)),
    "dense-sequence": (lambda: _einsum("dense-sequence"), (3, 4)),
    "einsum-heads": (lambda: _einsum("heads"), (3, 4)),
    "einsum-ellipsis": (lambda: _einsum("ellipsis"), (3, 4)),
    "einsum-contraction": (lambda: _einsum("contraction"), (3, 4)),
    "embedding-rows": (lambda: _embedding("rows"), ("ids", (4,), 11)),
    "embedding-equality": (lambda: _embedding("equality"), ("ids", (2, 3), 50)),
    "embedding-pooled": (lambda: _embedding("pooled"), ("ids", (5,), 7)),
    "layernorm-dense": (lambda: _layernorm("dense"), (5,)),
    "layernorm-sequence": (lambda: _layernorm("sequence"), (3, 4)),
    "layernorm-axes": (lambda: _layernorm("axes"), (3, 4)),
    "layernorm-embedding": (lambda: _layernorm("embedding"), ("ids", (4,), 9)),
}


def _inputs(spec, seed=0):
    if spec[0] != "ids":
        return _data(spec, seed)
    _, shape, vocabulary = spec
    rng = np.random.default_rng(seed)
    # -1 is the table's last row (keras.ops.take wraps negative ids): the rows must wrap them the same way.
    ids = rng.integers(-1, vocabulary, (B, *shape)).astype("int32")
    return tf.constant(ids), tf.constant(rng.integers(0, 3, B))


def _general(name):
    """The general method to compare with: "jacobian" for attention (tf.vectorized_map aborts on it)."""
    return "jacobian" if name.startswith("nested") else "vectorized"


def _loop_rows(model, x, y, sample_weight):
    """Explicit loop: each example's `s_i l_i + R` on a batch of one (no layer here couples the batch)."""
    rows = []
    for i in range(B):
        with tf.GradientTape() as tape:
            logits = model(x[i : i + 1], training=True)
            value = keras.losses.sparse_categorical_crossentropy(y[i : i + 1], logits, from_logits=True)[0]
            value = value * float(sample_weight[i]) + sum(model.losses)
        grads = tape.gradient(value, model.trainable_variables)
        rows.append(np.concatenate([np.reshape(tf.convert_to_tensor(g).numpy(), -1) for g in grads]))
    return np.stack(rows)


@pytest.mark.parametrize("name", list(NEW_RULES))
def test_embedding_and_layernorm_rules_give_the_gram_of_the_loop_and_of_the_general_path(float64, name):
    build, spec = NEW_RULES[name]
    model = build()
    x, y = _inputs(spec)
    sample_weight = tf.constant(np.linspace(0.5, 2.0, B))
    plan = layer_rows.plan(model)
    assert plan is not None
    gram, mismatch = gram_lib.gram(plan, model, x, y, sample_weight=sample_weight)
    loop = _loop_rows(model, x, y, sample_weight)
    np.testing.assert_allclose(gram.numpy(), loop @ loop.T, **TOL)
    general = kn.per_example_gradients(model, x, y, sample_weight=sample_weight, method=_general(name))
    flat = np.concatenate([np.reshape(g.numpy(), (B, -1)) for g in general], axis=1)
    np.testing.assert_allclose(gram.numpy(), flat @ flat.T, **TOL)
    assert float(mismatch) < 1e-12


@pytest.mark.parametrize("name", list(NEW_RULES))
def test_embedding_and_layernorm_rows_equal_the_loop_and_the_general_path(float64, name):
    build, spec = NEW_RULES[name]
    model = build()
    x, y = _inputs(spec, seed=1)
    sample_weight = tf.constant(np.linspace(2.0, 0.5, B))
    assert per_example.compute(model, x, y, sample_weight=sample_weight).method == "layers"
    # The layer rows themselves (not the tf.cond's fallback): their check passes and they equal the loop.
    data_rows, captured = layer_rows.rows(layer_rows.plan(model), model, x, y, sample_weight=sample_weight)
    assert float(captured.mismatch) < 1e-12
    shared = captured.regularization_gradients or [tf.zeros_like(g[0]) for g in data_rows]
    rows = [g + r[None] for g, r in zip(data_rows, shared)]
    flat = np.concatenate([np.reshape(g.numpy(), (B, -1)) for g in rows], axis=1)
    np.testing.assert_allclose(flat, _loop_rows(model, x, y, sample_weight), **TOL)
    public = kn.per_example_gradients(model, x, y, sample_weight=sample_weight)
    for fast, chosen in zip(rows, public):
        np.testing.assert_allclose(fast, chosen, **TOL)
    general = kn.per_example_gradients(model, x, y, sample_weight=sample_weight, method=_general(name))
    for fast, slow in zip(rows, general):
        np.testing.assert_allclose(fast, slow, **TOL)


def test_embedding_gram_by_id_equality_equals_the_gram_of_its_rows(float64):
    # The rule takes id equality where positions^2 < vocabulary (here 6^2 < 50) and the rows' products
    # otherwise: both must give the same K on the same captured values.
    model = _embedding("equality")
    x, y = _inputs(NEW_RULES["embedding-equality"][1])
    embedding = layer_rows.capture(layer_rows.plan(model), model, x, y).layers[0]
    assert embedding.ids.shape[1] ** 2 < model.layers[1].input_dim
    np.testing.assert_allclose(embedding.gram().numpy(), rules.Rule.gram(embedding).numpy(), **TOL)


@pytest.mark.parametrize("name", ["embedding-rows", "layernorm-dense"])
def test_monitor_takes_the_layer_path_for_embedding_and_layernorm(float64, name):
    build, spec = NEW_RULES[name]
    model = build()
    x, y = _inputs(spec)
    loop = _loop_rows(model, x, y, np.ones(B))
    _assert_monitor_statistics(model, x, y, loop @ loop.T, auto_source="layers")


def _with(layer, inputs=None):
    """Embedding -> LayerNormalization -> `layer` -> Dense: covered but for `layer`."""
    keras.utils.set_random_seed(14)
    inputs = keras.Input((4,), dtype="int32") if inputs is None else inputs
    hidden = keras.layers.LayerNormalization()(keras.layers.Embedding(9, 3)(inputs))
    return _compiled(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(layer(hidden))))


def test_layers_outside_the_new_rules_are_refused_before_any_data(float64):
    with pytest.warns(UserWarning, match="rms_scaling"):
        rms = keras.layers.LayerNormalization(rms_scaling=True)  # deprecated: another function than its name
    fixed = keras.Input((4,), batch_size=B, dtype="int32")
    over_the_batch = keras.layers.LayerNormalization(axis=(0, 2))  # couples the examples
    assert layer_rows.plan(_with(keras.layers.Identity())) is not None  # the rest of the model is covered
    for model in (_with(rms), _with(over_the_batch, fixed)):
        assert layer_rows.plan(model) is None


@pytest.mark.parametrize(
    "layer",
    [lambda: keras.layers.BatchNormalization(), lambda: GhostBatchNormalization(4), lambda: keras.layers.Dropout(0.4)],
    ids=["batchnorm", "ghost-batchnorm", "dropout"],
)
def test_batch_coupled_models_fall_back_and_stay_exact(float64, layer):
    # BatchNormalization couples the examples through the batch statistics, Dropout needs the step's own masks:
    # plan() refuses them (they hold state) and 'auto' takes the general, exact method.
    model = _with(layer())
    x, y = _inputs(("ids", (4,), 9))
    assert layer_rows.plan(model) is None
    result = per_example.compute(model, x, y)
    assert result.method == "jacobian"
    trainable = [v.value for v in model.trainable_variables]
    state = [v.value for v in model.non_trainable_variables]
    for i in range(B):  # example i's loss through the batched forward pass (same statistics, same masks)
        with tf.GradientTape() as tape:
            tape.watch(trainable)
            logits, _ = model.stateless_call(trainable, state, x, training=True)
            value = keras.losses.sparse_categorical_crossentropy(y[i : i + 1], logits[i : i + 1], from_logits=True)[0]
        for row, expected in zip(result.gradients, tape.gradient(value, trainable)):
            np.testing.assert_allclose(row[i], tf.convert_to_tensor(expected), **TOL)
    monitor = kn.NoiseMonitor((x, y), every_n_steps=1, sgd_batch_size=3)
    monitor.set_model(model)
    monitor.on_train_begin()
    assert monitor.gram_source == "per_example"


def test_float32_embedding_and_layernorm_pass_the_check_within_float32_rounding():
    # float32: the recomputed normalised input and the scatter-added rows differ from Keras's own at ~1e-7
    # relative; the check's 1e-4 must keep the layer path, and K agree with G G^T to 1e-4 (as for Dense above).
    keras.utils.set_random_seed(15)
    inputs = keras.Input((6,), dtype="int32")
    hidden = keras.layers.LayerNormalization()(keras.layers.Embedding(40, 16)(inputs))
    hidden = keras.layers.Dense(32, activation="relu")(keras.layers.Flatten()(hidden))
    model = _compiled(inputs, keras.layers.Dense(3)(hidden))
    rng = np.random.default_rng(2)
    x, y = tf.constant(rng.integers(0, 40, (B, 6)).astype("int32")), tf.constant(rng.integers(0, 3, B))
    gram, mismatch = gram_lib.gram(layer_rows.plan(model), model, x, y)
    assert float(mismatch) < layer_rows.TOLERANCE
    np.testing.assert_allclose(gram.numpy(), _reference(model, x, y), rtol=1e-4, atol=1e-6 * np.abs(gram).max())
