"""NoiseMonitor's Gram path (`keras_noisygd/_gram.py`) against `G G^T` from `per_example_gradients`, float64.

Tolerance 1e-10 relative (1e-12 absolute): the same float64 quantities summed in
a different order (layer-wise products of small Gram matrices against inner
products of the flattened rows), ~1e-15 apart; a missing bias term, regularizer
cross term or activation derivative changes `K` at 1e-2 or more.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_noisygd as kn
from keras_noisygd import _gram
from tests.helpers import mlp

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
    rows = kn.per_example_gradients(model, x, y, sample_weight=sample_weight)
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
    plan = _gram.plan(model)
    assert plan is not None
    gram, mismatch = _gram.gram(plan, model, x, y, sample_weight=sample_weight)
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
    gram, mismatch = _gram.gram(_gram.plan(model), model, x, y, sample_weight=sample_weight)
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


def _sequence():
    keras.utils.set_random_seed(7)
    inputs = keras.Input((3, 4))
    outputs = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling1D()(keras.layers.Dense(4)(inputs)))
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
    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(3)

    def call(self, inputs):
        return self.dense(inputs)


def test_models_outside_the_rule_are_refused_before_any_data(float64):
    subclassed = _Subclassed()
    subclassed(tf.zeros([1, 5]))
    dilated = kn.NoisyModel(*_io(keras.layers.Conv1D(2, 2, dilation_rate=2)))
    causal = kn.NoisyModel(*_io(keras.layers.Conv1D(2, 2, padding="causal")))
    for model in (subclassed, _coupled(keras.layers.BatchNormalization()), dilated, causal):  # BN: gamma, beta
        assert _gram.plan(model) is None


@pytest.mark.parametrize(
    "build, shape",
    [(lambda: _coupled(keras.layers.BatchNormalization(center=False, scale=False)), (5,)),  # statistics only
     (lambda: _coupled(keras.layers.Dropout(0.3)), (5,)), (_sequence, (3, 4))],
    ids=["batchnorm", "dropout", "dense-on-a-sequence"],
)
def test_coupled_or_sequence_models_give_no_layer_gram(float64, build, shape):
    model = build()
    x, y = _data(shape)
    # Refused before any data: state (BN statistics, a Dropout seed) or a Dense layer on a sequence.
    assert _gram.plan(model) is None


def test_a_layer_applied_twice_shows_in_the_mismatch(float64):
    model = _shared()
    x, y = _data((4,))
    _, mismatch = _gram.gram(_gram.plan(model), model, x, y)
    assert float(mismatch) > 1e-2  # only the first call's input and output are captured


@pytest.mark.parametrize(
    "build, shape, method",
    [(lambda: _mlp(1e-2), (5,), "layers"), (_shared, (4,), "per_example"),
     (lambda: _coupled(keras.layers.BatchNormalization()), (5,), "per_example"), (_conv, (6, 2), "layers")],
    ids=["mlp", "shared", "batchnorm", "conv"],
)
def test_monitor_uses_the_gram_path_where_it_applies_and_agrees_with_g(float64, build, shape, method):
    model = build()
    x, y = _data(shape)
    expected = kn.monitor.noise_statistics(
        _reference(model, x, y), np.ones(B), np.zeros((B, B)), kn.noise.SGDSampling(3).covariance(B)
    )
    for option, source in (("auto", method), ("per_example", "per_example")):
        monitor = kn.NoiseMonitor((x, y), every_n_steps=1, sgd_batch_size=3, method=option)
        monitor.set_model(model)
        monitor.on_train_begin()
        assert monitor.gram_source == source
        for key in ("grad_norm", "sgd_cov_trace", "noise_scale"):
            np.testing.assert_allclose(monitor.history[-1][key], expected[key], **TOL, err_msg=key)


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
    gram, mismatch = _gram.gram(_gram.plan(model), model, x, y)
    np.testing.assert_allclose(gram.numpy(), _reference(model, x, y), rtol=1e-4, atol=1e-6 * np.abs(gram).max())
    assert float(mismatch) < _gram.TOLERANCE
