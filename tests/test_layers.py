"""GhostBatchNormalization against keras.layers.BatchNormalization applied ghost batch by ghost batch.

Tolerances: the exactness checks run in float64 on the same values, combined
in a different order (a masked sum divided by the count against
`reduce_mean`, a per-example Jacobian against a loop), so they differ by a few
ulps of the largest intermediate, ~1e-15 here. 1e-10 relative (1e-12
absolute) leaves room for that and still catches any wrong statistic: the
batch's statistics instead of a ghost batch's, or a moving average of the
wrong variance, differ at 1e-2 or more on these inputs.
"""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_noisygd as kn
from keras_noisygd import per_example
from keras_noisygd.experiments import architectures
from keras_noisygd.layers import GhostBatchNormalization

TOL = dict(rtol=1e-10, atol=1e-12)
MOMENTUM, EPSILON = 0.75, 1e-3

# (shape, ghost_batch_size, axis): 2-D, an image batch, channels first, a batch that is not a multiple of
# the ghost batch size (ghosts of 4, 4, 2), and one ghost batch larger than the batch.
CASES = {
    "dense": ((12, 5), 4, -1),
    "image": ((12, 3, 4, 2), 4, -1),
    "channels_first": ((12, 2, 3, 4), 3, 1),
    "ragged": ((10, 5), 4, -1),
    "larger_than_batch": ((6, 5), 8, -1),
}


@pytest.fixture
def mixed_float16():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    yield
    keras.config.set_dtype_policy(previous)


def _inputs(shape, seed=0):
    return tf.constant(np.random.default_rng(seed).normal(2.0, 3.0, size=shape))


def _layer(shape, ghost_batch_size, axis, **kwargs):
    """A built layer with non-trivial gamma, beta and moving statistics."""
    layer = GhostBatchNormalization(ghost_batch_size, axis=axis, momentum=MOMENTUM, epsilon=EPSILON, **kwargs)
    layer.build(shape)
    rng = np.random.default_rng(1)
    channels = shape[axis]
    layer.set_weights([rng.uniform(0.5, 1.5, channels), rng.normal(size=channels), rng.normal(size=channels),
                       rng.uniform(0.5, 2.0, channels)])
    return layer


def _batch_norm_like(layer, shape):
    """A keras.layers.BatchNormalization with the layer's configuration and weights."""
    config = {k: v for k, v in layer.get_config().items() if k not in ("ghost_batch_size", "name")}
    reference = keras.layers.BatchNormalization.from_config(config)
    reference.build(shape)
    reference.set_weights(layer.get_weights())
    return reference


def _ghost_by_ghost(reference, x, ghost_batch_size):
    """BatchNormalization in training mode on each ghost batch, concatenated (moving statistics not used)."""
    starts = range(0, len(x), ghost_batch_size)
    return tf.concat([reference(x[s : s + ghost_batch_size], training=True) for s in starts], 0)


def _expected_moving_statistics(x, ghost_batch_size, axis, moving_mean, moving_variance):
    """The documented update in NumPy: the size-weighted mean of the ghost batches' (biased) moments."""
    x = np.asarray(x)
    reduce = tuple(a for a in range(x.ndim) if a != axis % x.ndim)
    ghosts = [x[s : s + ghost_batch_size] for s in range(0, len(x), ghost_batch_size)]
    mean = sum(len(g) * g.mean(axis=reduce) for g in ghosts) / len(x)
    variance = sum(len(g) * g.var(axis=reduce) for g in ghosts) / len(x)
    return (MOMENTUM * moving_mean + (1 - MOMENTUM) * mean, MOMENTUM * moving_variance + (1 - MOMENTUM) * variance)


@pytest.mark.parametrize("jit_compile", [False, True], ids=["eager", "xla"])
@pytest.mark.parametrize("case", list(CASES))
def test_training_equals_batch_normalization_ghost_batch_by_ghost_batch(float64, case, jit_compile):
    shape, ghost_batch_size, axis = CASES[case]
    x = _inputs(shape)
    layer = _layer(shape, ghost_batch_size, axis)
    reference = _batch_norm_like(layer, shape)
    moving_mean, moving_variance = layer.moving_mean.numpy(), layer.moving_variance.numpy()
    call = tf.function(lambda x: layer(x, training=True), jit_compile=True) if jit_compile else (
        lambda x: layer(x, training=True)
    )
    np.testing.assert_allclose(call(x), _ghost_by_ghost(reference, x, ghost_batch_size), **TOL)
    expected = _expected_moving_statistics(x, ghost_batch_size, axis, moving_mean, moving_variance)
    np.testing.assert_allclose(layer.moving_mean, expected[0], **TOL)
    np.testing.assert_allclose(layer.moving_variance, expected[1], **TOL)


@pytest.mark.parametrize("case", ["dense", "image", "channels_first"])
def test_inference_is_batch_normalization_with_the_same_moving_statistics(float64, case):
    shape, ghost_batch_size, axis = CASES[case]
    x = _inputs(shape)
    layer = _layer(shape, ghost_batch_size, axis)
    layer(_inputs(shape, seed=5), training=True)  # moves the statistics away from their initial values
    reference = _batch_norm_like(layer, shape)
    np.testing.assert_array_equal(layer(x, training=False), reference(x, training=False))  # the same code
    # As BatchNormalization: a frozen layer runs in inference mode, even with training=True, and keeps its state.
    before = layer.get_weights()
    layer.trainable = False
    np.testing.assert_array_equal(layer(x, training=True), reference(x, training=False))
    for old, new in zip(before, layer.get_weights()):
        np.testing.assert_array_equal(old, new)


@pytest.mark.parametrize("ghost_batch_size", [12, 40])
def test_one_ghost_batch_is_batch_normalization(float64, ghost_batch_size):
    shape = (12, 3, 4, 2)
    x = _inputs(shape)
    layer = _layer(shape, ghost_batch_size, -1)
    reference = _batch_norm_like(layer, shape)
    np.testing.assert_allclose(layer(x, training=True), reference(x, training=True), **TOL)
    for ours, theirs in zip(layer.get_weights(), reference.get_weights()):  # moving statistics included
        np.testing.assert_allclose(ours, theirs, **TOL)


def test_dynamic_batch_size_in_a_traced_function(float64):
    layer = _layer((12, 5), 4, -1)
    reference = _batch_norm_like(layer, (12, 5))
    for jit_compile in (False, True):
        signature = [tf.TensorSpec([None, 5], tf.float64)]
        traced = tf.function(lambda x: layer(x, training=True), input_signature=signature, jit_compile=jit_compile)
        for n in (12, 10, 3):  # a multiple of 4, two full ghosts and one of 2, a single short ghost
            x = _inputs((n, 5), seed=n)
            out = traced(x)
            assert out.shape == (n, 5)
            np.testing.assert_allclose(out, _ghost_by_ghost(reference, x, 4), **TOL)
        assert traced.experimental_get_tracing_count() == 1


@pytest.mark.parametrize("case", ["image", "ragged"])
def test_gradients_equal_the_ghost_by_ghost_reference(float64, case):
    shape, ghost_batch_size, axis = CASES[case]
    x = _inputs(shape)
    cotangent = _inputs(shape, seed=9)  # a loss that weighs every output differently
    layer = _layer(shape, ghost_batch_size, axis)
    reference = _batch_norm_like(layer, shape)

    def gradients(forward, variables):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(forward(x) * cotangent)
        return tape.gradient(loss, [x, *variables])

    ours = gradients(lambda x: layer(x, training=True), layer.trainable_variables)
    theirs = gradients(lambda x: _ghost_by_ghost(reference, x, ghost_batch_size), reference.trainable_variables)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, **TOL)


def _model(ghost_batch_size=4):
    keras.utils.set_random_seed(7)
    inputs = keras.Input((5,))
    hidden = keras.layers.Dense(6)(inputs)
    hidden = GhostBatchNormalization(ghost_batch_size, momentum=0.5)(hidden)
    hidden = keras.layers.ReLU()(hidden)
    outputs = keras.layers.Dense(3, activation="softmax")(hidden)
    model = kn.NoisyModel(inputs, outputs)
    model.compile(kn.NoisyGD(0.1, noise="none"), "sparse_categorical_crossentropy")
    return model


def _data(n, seed=0):
    rng = np.random.default_rng(seed)
    return tf.constant(rng.normal(size=(n, 5))), tf.constant(rng.integers(0, 3, n))


@pytest.mark.parametrize("n", [12, 10])
def test_per_example_gradients_go_through_each_rows_ghost_batch(float64, n):
    # Reference: row i is d l_i / d theta through the batched forward pass (each example normalized with its
    # ghost batch's statistics), one tape.gradient per example.
    model = _model()
    x, y = _data(n)
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(trainable)
        y_pred, _ = model.stateless_call(trainable, non_trainable, x, training=True)
        losses = keras.losses.sparse_categorical_crossentropy(y, y_pred)
        per_row = [losses[i] for i in range(n)]  # indexed on the tape
    loop = [np.stack(rows) for rows in zip(*(tape.gradient(loss, trainable) for loss in per_row))]

    before = model.get_weights()
    result = per_example.compute(model, x, y)
    assert result.method == "jacobian"  # the layer updates state in training, so "auto" picks the Jacobian
    for g, expected, variable in zip(result.gradients, loop, model.trainable_variables):
        assert g.shape == (n, *variable.shape)
        np.testing.assert_allclose(g, expected, **TOL)
    for old, new in zip(before, model.get_weights()):  # computing G leaves the moving statistics alone
        np.testing.assert_array_equal(old, new)

    with tf.GradientTape() as tape:
        loss = model.compute_loss(x=x, y=y, y_pred=model(x, training=True))
    for g, expected in zip(kn.per_example_gradients(model, x, y), tape.gradient(loss, model.trainable_variables)):
        np.testing.assert_allclose(np.mean(g, axis=0), expected, **TOL)


def _trained(engine, jit_compile):
    model = _model()
    x, y = _data(12)
    model.compile(
        kn.NoisyGD(0.5, momentum=0.5, noise="gaussian_centered", emulate_batch_size=2, seed=5, engine=engine),
        "sparse_categorical_crossentropy",
        jit_compile=jit_compile,
        steps_per_execution=2,
    )
    # Batches of 6: a ghost batch of 4 and one of 2 per step.
    history = model.fit(x, y, batch_size=6, epochs=2, shuffle=False, verbose=0)
    return model, history.history["loss"]


@pytest.mark.parametrize("jit_compile", [False, True], ids=["eager", "xla"])
def test_per_example_engine_trains_like_the_weighted_engine(float64, jit_compile):
    # Same seed, same noise weights, four steps: G W must equal the re-weighted loss's gradient, and the
    # moving statistics must take the same values (momentum 0.5 is exact in binary).
    weighted, weighted_loss = _trained("weighted", jit_compile)
    engine, engine_loss = _trained("per_example", jit_compile)
    for a, b in zip(engine.get_weights(), weighted.get_weights()):
        np.testing.assert_allclose(a, b, **TOL)
    np.testing.assert_allclose(engine_loss, weighted_loss, **TOL)
    moving_mean = engine.layers[2].moving_mean.numpy()
    assert np.all(moving_mean != 0.0)  # the statistics were updated (they start at 0)


def test_mixed_precision_normalizes_in_float32(mixed_float16):
    # Inputs of size ~300: x**2 overflows float16 (max 65504), so float16 statistics would be inf.
    x = np.random.default_rng(0).normal(300.0, 30.0, size=(12, 3, 3, 2)).astype("float16")
    mixed = GhostBatchNormalization(4)
    full = GhostBatchNormalization(4, dtype="float32")
    out = mixed(x, training=True)
    expected = full(x.astype("float32"), training=True)  # the same float16-representable inputs
    assert out.dtype == "float16" and mixed.compute_dtype == "float16"
    assert all(v.dtype == "float32" for v in mixed.weights)
    assert np.all(np.isfinite(out))
    # The output is the float32 result rounded to float16: half an ulp is 2**-11 ~ 4.9e-4 relative; the
    # normalized values are at most ~3 in size, so 1e-3 relative plus 2e-3 absolute is ~4 half-ulps.
    np.testing.assert_allclose(out.numpy().astype("float32"), expected, rtol=1e-3, atol=2e-3)
    # The statistics are float32 computations on the same values: equal to float32 rounding (~1e-7 relative).
    np.testing.assert_allclose(mixed.moving_mean, full.moving_mean, rtol=1e-6)
    np.testing.assert_allclose(mixed.moving_variance, full.moving_variance, rtol=1e-6)


def test_mixed_precision_fit_stays_finite_where_float16_squares_overflow(mixed_float16):
    # Inputs of size ~300 give Dense outputs whose squares exceed float16's maximum (65504).
    model = _model()
    x, y = _data(12)
    model.compile(kn.NoisyGD(0.1, noise="sgd", emulate_batch_size=2, seed=1), "sparse_categorical_crossentropy")
    history = model.fit(x * 300.0, y, batch_size=6, epochs=2, verbose=0)
    layer = model.layers[2]
    assert layer.compute_dtype == "float16" and layer.moving_variance.dtype == "float32"
    assert np.all(np.isfinite(history.history["loss"])) and all(np.all(np.isfinite(w)) for w in model.get_weights())


def test_save_and_load_round_trip(float64, tmp_path):
    keras.utils.set_random_seed(3)
    inputs = keras.Input((4, 3))
    layer = GhostBatchNormalization(np.int64(4), axis=1, momentum=0.8, epsilon=1e-4,
                                    gamma_regularizer=keras.regularizers.L2(0.01), name="ghost")
    model = keras.Model(inputs, layer(inputs))
    x = _inputs((12, 4, 3))
    model(x, training=True)  # moving statistics away from their initial values
    path = tmp_path / "ghost.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    restored = loaded.get_layer("ghost")
    assert type(restored) is GhostBatchNormalization
    config = restored.get_config()
    assert config == layer.get_config()
    assert config["ghost_batch_size"] == 4 and type(config["ghost_batch_size"]) is int
    assert config["axis"] == 1 and config["momentum"] == 0.8 and config["epsilon"] == 1e-4
    for a, b in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(loaded(x, training=False), model(x, training=False))
    np.testing.assert_array_equal(loaded(x, training=True), model(x, training=True))


BAD_SIZE = re.escape("Argument `ghost_batch_size` must be an integer >= 1. Received: ghost_batch_size=")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(ghost_batch_size=0), BAD_SIZE + "0$"),
        (dict(ghost_batch_size=-1), BAD_SIZE + "-1$"),
        (dict(ghost_batch_size=2.5), BAD_SIZE + r"2\.5$"),
        (dict(ghost_batch_size=True), BAD_SIZE + "True$"),
        (dict(ghost_batch_size="4"), BAD_SIZE + "'4'$"),
        (dict(ghost_batch_size=4, synchronized=True), r"`synchronized` must be False.*Received: synchronized=True$"),
        (dict(ghost_batch_size=4, renorm=True), r"Argument `renorm` must be False.*Received: renorm=True$"),
    ],
    ids=["zero", "negative", "float", "bool", "string", "synchronized", "renorm"],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GhostBatchNormalization(**kwargs)


def test_numpy_integers_are_accepted():
    layer = GhostBatchNormalization(np.int32(8))
    assert layer.ghost_batch_size == 8 and type(layer.ghost_batch_size) is int


def test_batch_axis_and_masks_are_refused():
    with pytest.raises(ValueError, match=re.escape("Argument `axis` must not be the batch axis 0")):
        GhostBatchNormalization(4, axis=0).build((8, 3))
    layer = GhostBatchNormalization(4)
    x = np.ones((8, 5, 3), "float32")
    mask = np.ones((8, 5), bool)
    with pytest.raises(ValueError, match=r"does not support masks in training.*mask of shape \(8, 5\)"):
        layer(x, training=True, mask=mask)
    layer(x, training=False, mask=mask)  # inference is BatchNormalization, masks and all


def test_layer_is_exported():
    assert kn.layers.GhostBatchNormalization is GhostBatchNormalization and "layers" in kn.__all__
    assert kn.layers.__all__ == ["GhostBatchNormalization"]


def test_experiment_models_use_the_layer_with_their_defaults():
    model = architectures.build("cnn", (16,), 3, width=4, ghost_batch_size=8)
    ghosts = [layer for layer in model.layers if isinstance(layer, GhostBatchNormalization)]
    assert len(ghosts) == 2
    assert all((g.ghost_batch_size, g.momentum, g.epsilon) == (8, 0.9, 1e-5) for g in ghosts)
