"""Bad inputs: every case raises the expected error type with a message that names
the argument, the rule and the value received; then the documented behaviours of
inputs that are not errors (partial batches, NaN losses, integer seeds, ragged
batches). docs/production.md lists the decisions. The table runs on every backend (`tf.data` feeds
`fit` on each); what needs TensorFlow's own APIs is marked `tensorflow_only`.
"""

import collections
import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import FixedWeights, classification_data, mlp

import keras_noisygd as kn
from keras_noisygd import noise

pytestmark = pytest.mark.all_backends

LOSS = "sparse_categorical_crossentropy"

Case = collections.namedtuple("Case", "id make error argument rule received")


def fit(optimizer, data=None, loss=LOSS, model_class=kn.NoisyModel, **fit_kwargs):
    """Compiles a small model with `optimizer` and fits it on `data` (16 examples, batch 16 by default)."""
    model = mlp(model_class=model_class)
    model.compile(optimizer, loss, jit_compile=False)
    if data is None:
        data = classification_data(16)
    if isinstance(data, tf.data.Dataset):
        return model.fit(data, verbose=0, **fit_kwargs)
    return model.fit(*data, verbose=0, **fit_kwargs)


def batches(n, batch_size, drop_remainder=False, extra=None):
    """A dataset of `n` examples in batches (static sizes with `drop_remainder`), then `extra`."""
    x, y = classification_data(n)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size, drop_remainder=drop_remainder)
    return ds if extra is None else ds.concatenate(extra)


def empty_batch():
    x, y = classification_data(16)
    return tf.data.Dataset.from_tensors((x[:0], y[:0]))


def scalar_loss(y_true, y_pred):
    return keras.ops.mean(keras.losses.sparse_categorical_crossentropy(y_true, y_pred))


def noisy_gradients_with_scalar_loss():
    x, y = classification_data(8)
    model = mlp()
    kn.noisy_gradients(model, x, y, tf.ones([8]), loss=scalar_loss)


def opt(**kwargs):
    kwargs.setdefault("seed", 0)
    return kn.NoisyGD(0.1, **kwargs)


V = ValueError
if keras.backend.backend() == "tensorflow":  # a batch size known only when the step runs: tf.debugging's message
    RUN_TIME = tf.errors.InvalidArgumentError
    B_GREATER = "Received: batch_size=] [8] [the number of examples N=] [4]"
    EMPTY = ("must be >= 1: an empty batch", "Received: batch_size=] [0]")
else:  # JAX traces each batch shape and PyTorch runs eagerly: the sizes are Python ints, checked at once
    RUN_TIME = ValueError
    B_GREATER = "Received: batch_size=8, the number of examples N=4"
    EMPTY = ("an integer >= 1", "Received: batch_size=0")
NAN, INF = float("nan"), float("inf")

BAD = [
    # -- noise parameters ----------------------------------------------------------------------
    Case("std negative", lambda: noise.Gaussian(-1.0), V, "`std`", "a finite number >= 0", "std=-1.0"),
    Case("std NaN", lambda: noise.Gaussian(NAN), V, "`std`", "a finite number >= 0", "std=nan"),
    Case("std inf", lambda: noise.Gaussian(INF), V, "`std`", "a finite number >= 0", "std=inf"),
    Case("std -inf", lambda: noise.Gaussian(-INF), V, "`std`", "a finite number >= 0", "std=-inf"),
    Case("std string", lambda: noise.Gaussian("1"), V, "`std`", "a finite number >= 0", "std='1'"),
    Case("std bool", lambda: noise.Gaussian(True), V, "`std`", "a finite number >= 0", "std=True"),
    Case("centered string", lambda: noise.Gaussian(1.0, centered="yes"), V, "`centered`", "True or False", "centered='yes'"),
    Case("p > 1", lambda: noise.Bernoulli(1.5), V, "`p`", "in (0, 1]", "p=1.5"),
    Case("p = 0", lambda: noise.Bernoulli(0.0), V, "`p`", "in (0, 1]", "p=0.0"),
    Case("p negative", lambda: noise.Bernoulli(-0.1), V, "`p`", "in (0, 1]", "p=-0.1"),
    Case("p NaN", lambda: noise.Bernoulli(NAN), V, "`p`", "in (0, 1]", "p=nan"),
    Case("p bool", lambda: noise.Bernoulli(True), V, "`p`", "in (0, 1]", "p=True"),
    Case("num_noisy 0", lambda: noise.SparseGaussian(0, 1.0), V, "`num_noisy`", "an integer >= 1", "num_noisy=0"),
    Case("num_noisy 1 centred", lambda: noise.SparseGaussian(1, 1.0, centered=True), V, "`num_noisy`", "an integer >= 2", "num_noisy=1"),
    Case("num_noisy float", lambda: noise.SparseGaussian(2.0, 1.0), V, "`num_noisy`", "an integer >= 1", "num_noisy=2.0"),
    Case("sparse std negative", lambda: noise.SparseGaussian(4, -1.0), V, "`std`", "a finite number >= 0", "std=-1.0"),
    Case("std without num_noisy", lambda: noise.SparseGaussian(None, 1.0), V, "`num_noisy`", "is required when `std` is given", "num_noisy=None, std=1.0"),
    Case("sgd batch 0", lambda: noise.SGDSampling(0), V, "`batch_size`", "an integer >= 1", "batch_size=0"),
    Case("sgd batch bool", lambda: noise.SGDSampling(True), V, "`batch_size`", "an integer >= 1", "batch_size=True"),
    Case("replacement int", lambda: noise.SGDSampling(4, replacement=1), V, "`replacement`", "True or False", "replacement=1"),
    Case("num_noisy > batch", lambda: noise.SparseGaussian(9, 1.0).sample(0, 8), V, "`num_noisy`", "<= the number of examples N", "num_noisy=9, the number of examples N=8"),
    Case("sgd b > batch", lambda: noise.SGDSampling(9).sample(0, 8), V, "`batch_size`", "<= the number of examples N", "batch_size=9, the number of examples N=8"),
    Case("sample batch 0", lambda: noise.Gaussian(1.0).sample(0, 0), V, "`num_examples`", "an integer >= 1", "num_examples=0"),
    Case("sample batch float", lambda: noise.Gaussian(1.0).sample(0, 2.5), V, "`num_examples`", "an integer >= 1", "num_examples=2.5"),
    Case("sample int dtype", lambda: noise.Gaussian(1.0).sample(0, 4, "int32"), V, "`dtype`", "a floating dtype", "dtype='int32'"),
    Case("emulating b > N", lambda: noise.Gaussian.emulating(9, 8), V, "`batch_size`", "<= num_examples", "batch_size=9, num_examples=8"),
    Case("emulating b 0", lambda: noise.Bernoulli.emulating(0, 8), V, "`batch_size`", "an integer >= 1", "batch_size=0"),
    Case("emulating b float", lambda: noise.SGDSampling.emulating(2.0, 8), V, "`batch_size`", "an integer >= 1", "batch_size=2.0"),
    Case("template sampled", lambda: noise.Gaussian().sample(0, 8), V, "Gaussian.std", "template", "std is None"),
    # -- seeds -----------------------------------------------------------------------------------
    Case("sample seed float", lambda: noise.Gaussian(1.0).sample(1.5, 4), V, "`seed`", "a Python int in [0, 2**32) or an integer tensor of shape [2]", "seed=1.5"),
    Case("sample seed shape", lambda: noise.Gaussian(1.0).sample([1, 2, 3], 4), V, "`seed`", "an integer tensor of shape [2]", "shape (3,)"),
    Case("seed negative", lambda: opt(noise="none", seed=-1), V, "`seed`", "None or an integer in [0, 2147483647]", "seed=-1"),
    Case("seed too large", lambda: opt(noise="none", seed=2**31), V, "`seed`", "None or an integer in [0, 2147483647]", "seed=2147483648"),
    Case("seed string", lambda: opt(noise="none", seed="7"), V, "`seed`", "None or an integer in [0, 2147483647]", "seed='7'"),
    Case("seed float", lambda: opt(noise="none", seed=1.0), V, "`seed`", "None or an integer in [0, 2147483647]", "seed=1.0"),
    Case("seed bool", lambda: opt(noise="none", seed=True), V, "`seed`", "None or an integer in [0, 2147483647]", "seed=True"),
    # -- noise names -----------------------------------------------------------------------------
    Case("unknown name", lambda: noise.get("gausian"), V, "`noise`", "must be one of ['none', 'sgd'", "noise='gausian'"),
    Case("names are case-sensitive", lambda: opt(noise="Gaussian", emulate_batch_size=2), V, "`noise`", "must be one of", "noise='Gaussian'"),
    Case("noise a number", lambda: opt(noise=1.0, emulate_batch_size=2), V, "`noise`", "a noise name, a sampler", "noise=1.0"),
    # -- optimizer arguments -----------------------------------------------------------------------
    Case("emulate 0", lambda: opt(emulate_batch_size=0), V, "`emulate_batch_size`", "None, an integer >= 1 or a `keras.optimizers.schedules.LearningRateSchedule`", "emulate_batch_size=0"),
    Case("emulate negative", lambda: opt(emulate_batch_size=-3), V, "`emulate_batch_size`", "None, an integer >= 1 or a `keras.optimizers.schedules.LearningRateSchedule`", "emulate_batch_size=-3"),
    Case("emulate float", lambda: opt(emulate_batch_size=2.0), V, "`emulate_batch_size`", "None, an integer >= 1 or a `keras.optimizers.schedules.LearningRateSchedule`", "emulate_batch_size=2.0"),
    Case("emulate bool", lambda: opt(emulate_batch_size=True), V, "`emulate_batch_size`", "None, an integer >= 1 or a `keras.optimizers.schedules.LearningRateSchedule`", "emulate_batch_size=True"),
    Case("emulate string", lambda: opt(emulate_batch_size="32"), V, "`emulate_batch_size`", "None, an integer >= 1 or a `keras.optimizers.schedules.LearningRateSchedule`", "emulate_batch_size='32'"),
    Case("configured noise and b", lambda: opt(noise=noise.Gaussian(1.0), emulate_batch_size=4), V, "`emulate_batch_size`", "calibrates a noise template, but `noise` is already configured", "emulate_batch_size=4"),
    Case("b cannot be emulated", lambda: opt(noise="sparse_gaussian_centered", emulate_batch_size=1), V, "`num_noisy`", "an integer >= 2", "num_noisy=1"),
    # Keras 3 refuses integer learning rates (keras.optimizers.SGD(1) too); the noisy optimizers follow it.
    Case("integer learning rate", lambda: kn.NoisyGD(1, noise="none"), V, "`learning_rate`", "should be float", "learning_rate=1"),
    Case("integer learning rate Adam", lambda: kn.NoisyAdam(learning_rate=1, noise="none"), V, "`learning_rate`", "should be float", "learning_rate=1"),
    Case("noise_weights of 0", lambda: opt(noise="bernoulli", emulate_batch_size=2).noise_weights(0), V, "`batch_size`", "an integer >= 1", "batch_size=0"),
    Case("noise_weights negative", lambda: opt(noise=noise.Gaussian(1.0)).noise_weights(-2), V, "`batch_size`", "an integer >= 1", "batch_size=-2"),
    # -- models and losses -------------------------------------------------------------------------
    Case("stock keras.Model", lambda: fit(opt(noise="bernoulli", emulate_batch_size=4), model_class=keras.Model), V, "NoisyGD", "drew no noise weights", "Received: gradients for 4 variables"),
    Case("reduction divides by sum of weights", lambda: fit(opt(noise="bernoulli", emulate_batch_size=4), loss=keras.losses.SparseCategoricalCrossentropy(reduction="mean_with_sample_weight")), V, "compiled loss", "must reduce with one of", "reduction='mean_with_sample_weight'"),
    Case("reduction none", lambda: fit(opt(noise="bernoulli", emulate_batch_size=4), loss=keras.losses.SparseCategoricalCrossentropy(reduction=None)), V, "compiled loss", "must reduce with one of", "reduction=None"),
    Case("scalar loss in noisy_gradients", noisy_gradients_with_scalar_loss, V, "`loss`", "must return one loss value per example", "returns a scalar"),
    Case("noisy of a layer", lambda: kn.noisy(keras.layers.Dense(3)), V, "`model`", "must be a `keras.Model`", "model=<Dense"),
    # -- batches: static sizes raise while tracing, run-time sizes when the step runs (no XLA) ------
    Case("static batch < emulated", lambda: fit(opt(noise="gaussian_centered", emulate_batch_size=32), batches(32, 16, drop_remainder=True)), V, "`emulate_batch_size`", "<= the batch size B of every step", "emulate_batch_size=32, the batch size B of every step=16"),
    Case("static batch < num_noisy", lambda: fit(opt(noise=noise.SparseGaussian(9, 1.0)), batches(32, 8, drop_remainder=True)), V, "`num_noisy`", "<= the number of examples N", "num_noisy=9, the number of examples N=8"),
    Case("run-time batch < configured b", lambda: fit(opt(noise=noise.SGDSampling(8)), batches(20, 8)), RUN_TIME, "`batch_size`", "<= the number of examples N", B_GREATER),
    Case("run-time empty batch", lambda: fit(opt(noise="bernoulli", emulate_batch_size=4), batches(16, 8, extra=empty_batch())), RUN_TIME, "`batch_size`", *EMPTY),
]


def test_the_table_is_large_and_its_ids_unique():
    assert len(BAD) >= 40 and len({case.id for case in BAD}) == len(BAD)


@pytest.mark.parametrize("case", BAD, ids=[case.id for case in BAD])
def test_bad_input_names_the_argument_the_rule_and_the_value(case):
    with pytest.raises(case.error) as info:
        case.make()
    message = str(info.value) if case.error is V else info.value.message
    for part in (case.argument, case.rule, case.received):
        assert part in message, f"{part!r} is not in the message: {message}"


# --------------------------------------------------------------------------
# Inputs that are not errors: what happens, pinned.


def test_a_run_time_batch_smaller_than_the_emulated_one_gets_weights_one():
    # 20 examples in batches of 8: the last batch (4 < b = 6) only shows its size at run
    # time, and its weights are m = 1 (plain gradient descent on those 4 examples).
    x, y = classification_data(20)
    noisy = mlp()
    reference = mlp()
    reference.set_weights(noisy.get_weights())
    noisy.compile(opt(noise="gaussian_centered", emulate_batch_size=6, seed=5), LOSS, jit_compile=False)
    noisy.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    # The reference: the same two noisy full batches, then a noise-free step on the last 4.
    reference.compile(opt(noise="gaussian_centered", emulate_batch_size=6, seed=5), LOSS, jit_compile=False)
    reference.fit(x[:16], y[:16], batch_size=8, epochs=1, shuffle=False, verbose=0)
    plain = mlp()
    plain.set_weights(reference.get_weights())
    plain.compile(opt(noise="none"), LOSS, jit_compile=False)
    plain.fit(x[16:], y[16:], batch_size=4, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(noisy.get_weights(), plain.get_weights()):
        np.testing.assert_array_equal(a, b)  # the same float ops in the same order: exact
    np.testing.assert_array_equal(noisy.optimizer.noise_state.numpy(), [5, 3])  # the counter still advances


def _nan_from_batch(n=32, batch_size=8, bad_batch=1):
    x, y = classification_data(n)
    x[bad_batch * batch_size + 3, 0] = np.nan
    return x, y


@pytest.mark.parametrize("jit_compile", [False, True])
def test_nan_loss_stops_training_with_terminate_on_nan(jit_compile):
    # The reported loss is the clean loss: NaN when any example's loss is NaN.
    # Keras applies that step's (NaN) update, then TerminateOnNaN stops: this is
    # `keras.Model`'s behaviour; the noise does not hide it.
    x, y = _nan_from_batch()
    model = mlp()
    model.compile(opt(noise="bernoulli", emulate_batch_size=4, seed=2), LOSS, jit_compile=jit_compile)
    history = model.fit(x, y, batch_size=8, epochs=5, shuffle=False, verbose=0, callbacks=[keras.callbacks.TerminateOnNaN()])
    assert int(model.optimizer.iterations.numpy()) == 2  # batch 0, then the NaN batch 1
    np.testing.assert_array_equal(model.optimizer.noise_state.numpy(), [2, 2])
    assert len(history.history["loss"]) == 1 and math.isnan(history.history["loss"][0])
    assert all(np.isnan(w).any() for w in model.get_weights()[:1])


@pytest.mark.tensorflow_only  # batch sizes known only at run time: elsewhere they are static (the table above)
@pytest.mark.parametrize("data", ["configured b > run-time batch", "empty batch"])
def test_under_xla_failed_run_time_checks_skip_the_step_and_stop_fit(data):
    # XLA drops run-time assertions: the step skips its update instead, records the check, and fit raises
    # its message at the end of that step, so no run ends with silently bad weights.
    if data == "empty batch":
        optimizer, dataset = opt(noise="bernoulli", emulate_batch_size=4), batches(16, 8, extra=empty_batch())
        message = r"Argument `batch_size` must be >= 1: an empty batch has no examples to weight. Received: batch_size= 0"
    else:
        optimizer, dataset = opt(noise=noise.SGDSampling(8)), batches(20, 8)
        message = r"The noise sampler's run-time check failed"
    model = mlp()
    model.compile(optimizer, LOSS, jit_compile=True)
    with pytest.raises(ValueError, match=message):
        model.fit(dataset, epochs=4, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 2  # the two good steps; the failed third was skipped
    np.testing.assert_array_equal(model.optimizer.noise_state.numpy()[1], 2)
    assert all(np.isfinite(w).all() for w in model.get_weights())


def test_numpy_integer_seed_is_a_python_int_seed():
    optimizer = kn.NoisyGD(0.1, noise="none", seed=np.int64(3))
    assert optimizer.seed == 3 and type(optimizer.seed) is int
    assert kn.NoisyGD.from_config(optimizer.get_config()).seed == 3


@pytest.mark.tensorflow_only  # stock Keras refuses zero examples on JAX (StopIteration) and PyTorch (ValueError)
def test_fit_on_zero_examples_changes_no_weight_like_keras():
    # Keras warns ("Your input ran out of data") and returns an empty History; no
    # weight changes, as for `keras.Model`. Keras's `iterations` still counts one
    # (it does so for `keras.Model` too) and the noise counter stays in step with it.
    x, y = classification_data(16)
    model = mlp()
    before = model.get_weights()
    model.compile(opt(noise="bernoulli", emulate_batch_size=4), LOSS, jit_compile=False)
    assert model.fit(x[:0], y[:0], verbose=0).history == {}
    for a, b in zip(model.get_weights(), before):
        np.testing.assert_array_equal(a, b)
    assert model.optimizer.noise_state.numpy()[1] == model.optimizer.iterations.numpy()


class _RowMean(keras.layers.Layer):
    def call(self, x):
        return tf.reduce_mean(x, axis=1, keepdims=True)


def _ragged_model(model_class):
    inputs = keras.Input((None,), ragged=True)
    return model_class(inputs, keras.layers.Dense(3, activation="softmax")(_RowMean()(inputs)))


@pytest.mark.tensorflow_only  # ragged tensors are TensorFlow's
def test_ragged_batches_train_with_one_weight_per_row():
    x = tf.ragged.constant([[1.0, 2.0], [3.0], [4.0, 5.0, 6.0], [7.0], [1.0], [2.0, 2.0], [0.5], [3.0, 1.0]])
    y = np.array([0, 1, 2, 0, 1, 1, 2, 0])
    stock, noisy = _ragged_model(keras.Model), _ragged_model(kn.NoisyModel)
    noisy.set_weights(stock.get_weights())
    stock.compile(keras.optimizers.SGD(0.1), LOSS, jit_compile=False)
    noisy.compile(opt(noise="none"), LOSS, jit_compile=False)
    for model in (stock, noisy):
        model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0)
    for a, b in zip(noisy.get_weights(), stock.get_weights()):
        np.testing.assert_array_equal(a, b)  # no noise on ragged rows is exactly Keras SGD
    # With noise, the weights have one entry per row (4 rows, ragged lengths 1 to 3).
    weighted = _ragged_model(kn.NoisyModel)
    weighted.compile(opt(noise=FixedWeights([2.0, 0.0, 2.0, 0.0])), LOSS, jit_compile=False)
    reference = _ragged_model(kn.NoisyModel)
    reference.set_weights(weighted.get_weights())
    reference.compile(opt(noise="none"), LOSS, jit_compile=False)
    weighted.fit(x[:4], y[:4], batch_size=4, epochs=1, shuffle=False, verbose=0)
    # m = [2, 0, 2, 0]: (1/4)(2 l_0 + 2 l_2) = the mean loss of rows 0 and 2.
    reference.fit(tf.gather(x[:4], [0, 2]), y[[0, 2]], batch_size=2, epochs=1, verbose=0)
    for a, b in zip(weighted.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)  # float32 sums in another order
