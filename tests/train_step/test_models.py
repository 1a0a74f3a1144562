"""NoisyModel / NoisySequential / noisy() in ordinary Keras workflows."""

import keras
import numpy as np
import pytest
from helpers import classification_data, mlp, to_numpy

import keras_noisygd as kn
from keras_noisygd import noise

pytestmark = pytest.mark.all_backends

LOSS = "sparse_categorical_crossentropy"


class BatchCounter(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        self.batches = getattr(self, "batches", 0) + 1


@pytest.mark.parametrize("jit_compile", [False, True])
def test_reported_loss_and_metrics_are_the_clean_ones(jit_compile):
    # With learning rate 0 the weights never move, so the training logs of a noisy
    # fit must equal `evaluate` on the same data and user sample weights exactly
    # (up to float32 summation order) -- the noisy loss would differ by ~std/sqrt(B).
    x, y = classification_data(64)
    s = np.linspace(0.2, 2.0, 64)
    model = mlp()
    model.compile(kn.NoisyGD(0.0, noise=noise.Gaussian(3.0), seed=1), LOSS, metrics=["accuracy"], weighted_metrics=["accuracy"], jit_compile=jit_compile)
    counter = BatchCounter()
    history = model.fit(x, y, sample_weight=s, batch_size=64, epochs=2, verbose=0, callbacks=[counter])
    evaluated = model.evaluate(x, y, sample_weight=s, batch_size=64, verbose=0, return_dict=True)
    assert counter.batches == 2
    for name in ("loss", "accuracy", "weighted_accuracy"):
        np.testing.assert_allclose(history.history[name], [evaluated[name]] * 2, rtol=1e-6)
    noisy_loss = model.compute_loss(x, y, model(x), sample_weight=s * to_numpy(model.optimizer.noise_weights(64)))
    assert abs(float(noisy_loss) - evaluated["loss"]) > 1e-3  # the check above can tell them apart


def test_per_output_losses_of_a_two_output_model_are_clean():
    x, y = classification_data(32)
    inputs = keras.Input((5,))
    model = kn.NoisyModel(inputs, {"a": keras.layers.Dense(3, name="a")(inputs), "b": keras.layers.Dense(3, name="b")(inputs)})
    losses = {"a": keras.losses.SparseCategoricalCrossentropy(from_logits=True), "b": keras.losses.SparseCategoricalCrossentropy(from_logits=True)}
    model.compile(kn.NoisyGD(0.0, noise=noise.Gaussian(2.0), seed=3), losses)
    history = model.fit(x, {"a": y, "b": y}, batch_size=32, epochs=1, verbose=0)
    evaluated = model.evaluate(x, {"a": y, "b": y}, batch_size=32, verbose=0, return_dict=True)
    for name in ("loss", "a_loss", "b_loss"):
        np.testing.assert_allclose(history.history[name][0], evaluated[name], rtol=1e-6)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_one_fit_step_is_the_noisy_gradient_step(jit_compile):
    x, y = classification_data(16)
    model = mlp()
    reference = mlp(model_class=keras.Model)
    reference.set_weights(model.get_weights())
    reference.compile(loss=LOSS)
    sampler = noise.Bernoulli(0.5)
    model.compile(kn.NoisyGD(0.5, noise=sampler, seed=11), LOSS, jit_compile=jit_compile)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    grads = kn.noisy_gradients(reference, x, y, sampler.sample([11, 0], 16))
    for w, w0, g in zip(model.trainable_weights, reference.trainable_weights, grads):
        # float32; graph/XLA vs eager differ by rounding only.
        np.testing.assert_allclose(to_numpy(w), to_numpy(w0) - 0.5 * to_numpy(g), rtol=1e-5, atol=1e-6)


class Subclassed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(7, activation="tanh")
        self.out = keras.layers.Dense(3, activation="softmax")

    def call(self, inputs, training=None):
        return self.out(self.hidden(inputs))


def make_sequential():
    return keras.Sequential([keras.Input((5,)), keras.layers.Dense(7, activation="tanh"), keras.layers.Dense(3, activation="softmax")])


def make_dict_functional():
    a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
    hidden = keras.layers.Dense(7, activation="tanh")(keras.layers.Concatenate()([a, b]))
    return keras.Model({"a": a, "b": b}, keras.layers.Dense(3, activation="softmax")(hidden))


def split(x):
    return {"a": x[:, :3], "b": x[:, 3:]}


@pytest.mark.parametrize(
    "make, inputs",
    [(make_sequential, None), (lambda: mlp(model_class=keras.Model), None), (Subclassed, None), (make_dict_functional, split)],
    ids=["sequential", "functional", "subclassed", "dict-input functional"],
)
def test_noisy_shares_layers_and_weights(make, inputs):
    x, y = classification_data(16)
    x = inputs(x) if inputs else x
    original = make()
    original(keras.tree.map_structure(lambda t: t[:1], x))
    wrapped = kn.noisy(original)
    assert wrapped.built or isinstance(original, Subclassed)  # a wrapper builds on first call
    assert isinstance(wrapped, kn.NoisyTrainStep) and kn.noisy(wrapped) is wrapped
    assert {id(v) for v in wrapped.trainable_variables} == {id(v) for v in original.trainable_variables}
    before = [to_numpy(v) for v in original.trainable_variables]
    wrapped.compile(kn.NoisyGD(0.1, noise="gaussian_centered", emulate_batch_size=4, seed=0), LOSS)
    wrapped.fit(x, y, batch_size=16, epochs=2, verbose=0)
    assert all(np.abs(to_numpy(v) - b).max() > 0 for v, b in zip(original.trainable_variables, before))
    np.testing.assert_allclose(wrapped.predict(x, verbose=0), original.predict(x, verbose=0), rtol=1e-6)


def test_a_stock_model_with_noisy_gd_fails_at_the_start_of_fit():
    x, y = classification_data(16)
    model = mlp(model_class=keras.Model)
    before = model.get_weights()
    model.compile(kn.NoisyGD(0.1, emulate_batch_size=4), LOSS)
    with pytest.raises(ValueError, match=r"would silently train without noise.*keras_noisygd.noisy\(model\)"):
        model.fit(x, y, verbose=0)
    if keras.backend.backend() == "jax":
        return  # Keras's JAX fit leaves the variables emptied after an error in the traced step
    for a, b in zip(model.get_weights(), before):
        np.testing.assert_array_equal(a, b)


def test_a_noisy_model_with_a_stock_optimizer_is_a_keras_model():
    x, y = classification_data(16)
    stock = mlp(model_class=keras.Model)
    model = mlp()
    model.set_weights(stock.get_weights())
    for m in (stock, model):
        m.compile(keras.optimizers.SGD(0.1, momentum=0.5), LOSS, metrics=["accuracy"])
    h1 = stock.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    h2 = model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    assert h1.history == h2.history
    for a, b in zip(model.get_weights(), stock.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_batch_smaller_than_the_emulated_one_is_refused():
    x, y = classification_data(16)
    model = mlp()
    model.compile(kn.NoisyGD(0.1, noise="gaussian_centered", emulate_batch_size=32), LOSS)
    with pytest.raises(ValueError, match=r"Argument `emulate_batch_size` must be <= the batch size B of every step. Received: emulate_batch_size=32, the batch size B of every step=16"):
        model.fit(x, y, batch_size=16, verbose=0)


def test_a_loss_that_divides_by_the_sum_of_weights_is_refused():
    x, y = classification_data(16)
    model = mlp()
    loss = keras.losses.SparseCategoricalCrossentropy(reduction="mean_with_sample_weight")
    model.compile(kn.NoisyGD(0.1, noise="bernoulli", emulate_batch_size=4), loss)
    with pytest.raises(ValueError, match=r"must reduce with one of .*Received: reduction='mean_with_sample_weight'"):
        model.fit(x, y, verbose=0)


def test_integer_sample_weights_do_not_truncate_the_noise():
    x, y = classification_data(16)
    float_model, int_model = mlp(), mlp()
    int_model.set_weights(float_model.get_weights())
    for model, weights in ((float_model, np.ones(16)), (int_model, np.ones(16, "int64"))):
        model.compile(kn.NoisyGD(0.1, noise=noise.Gaussian(1.0), seed=4), LOSS, jit_compile=False)
        model.fit(x, y, sample_weight=weights, batch_size=16, epochs=2, shuffle=False, verbose=0)
    for a, b in zip(int_model.get_weights(), float_model.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("model_kind, optimizer", [
    ("functional", lambda: kn.NoisyGD(0.1, noise="sparse_gaussian_centered", emulate_batch_size=4, momentum=0.5, seed=21)),
    ("sequential", lambda: kn.NoisyGD(0.1, noise="sgd", emulate_batch_size=4, seed=21)),
    ("functional", lambda: kn.NoisyAdam(0.01, noise="bernoulli", emulate_batch_size=4, seed=21)),
])
def test_keras_file_round_trip_keeps_weights_optimizer_and_noise_state(tmp_path, model_kind, optimizer):
    x, y = classification_data(32)
    model = mlp() if model_kind == "functional" else kn.noisy(make_sequential())
    model.compile(optimizer(), LOSS, metrics=["accuracy"])
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded) is type(model)
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    for a, b in zip(loaded.optimizer.variables, model.optimizer.variables):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))
    # Training on from the file gives exactly what training on in memory gives.
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    loaded.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.tensorflow_only
def test_tf_train_checkpoint_restores_the_noise_stream(tmp_path):
    import tensorflow as tf

    x, y = classification_data(32)
    model = mlp()
    model.compile(kn.NoisyGD(0.1, noise="gaussian", emulate_batch_size=4, seed=8), LOSS)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    path = tf.train.Checkpoint(model=model, optimizer=model.optimizer).save(str(tmp_path / "ckpt"))
    restored = mlp()
    restored.compile(kn.NoisyGD(0.1, noise="gaussian", emulate_batch_size=4, seed=999), LOSS)
    restored.optimizer.build(restored.trainable_variables)
    tf.train.Checkpoint(model=restored, optimizer=restored.optimizer).restore(path).assert_consumed()
    np.testing.assert_array_equal(to_numpy(restored.optimizer.noise_state), [8, 4])  # seed 999 overwritten
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    restored.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(restored.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.tensorflow_only  # counts TensorFlow traces of `train_step(data)`
@pytest.mark.parametrize("jit_compile", [False, True])
def test_no_retracing_after_the_first_step(jit_compile):
    class Counting(kn.NoisyModel):
        traces = 0

        def train_step(self, data):
            Counting.traces += 1  # Python runs once per trace
            return super().train_step(data)

    inputs = keras.Input((5,))
    model = Counting(inputs, keras.layers.Dense(3, activation="softmax")(inputs))
    model.compile(kn.NoisyGD(0.1, noise="sgd", emulate_batch_size=4, seed=0), LOSS, jit_compile=jit_compile)
    x, y = classification_data(32)
    model.fit(x, y, batch_size=8, epochs=5, verbose=0)
    assert Counting.traces == 1


def test_subclass_wrapper_round_trips(tmp_path):
    x, y = classification_data(16)
    model = kn.noisy(Subclassed())
    model.compile(kn.NoisyGD(0.1, noise="none"), LOSS)
    model.fit(x, y, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras", custom_objects={"Subclassed": Subclassed})
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)


def test_a_noisy_model_subclass_built_functionally_leaves_noisy_model_intact():
    class Functional(kn.NoisyModel):
        pass

    inputs = keras.Input((5,))
    first = Functional(inputs, keras.layers.Dense(3, activation="softmax")(inputs))
    assert isinstance(first, Functional) and isinstance(first, kn.NoisyModel)
    assert kn.NoisyModel.__bases__ == (kn.NoisyTrainStep, keras.Model)
    wrapped = kn.noisy(Subclassed())  # a subclass of NoisyModel built without inputs/outputs
    x, y = classification_data(16)
    for model in (first, wrapped):
        model.compile(kn.NoisyGD(0.1, noise="none"), LOSS)
        model.fit(x, y, verbose=0)


def test_functional_and_subclassed_noisy_models_coexist():
    # Keras grafts its functional base onto a Model subclass used functionally;
    # NoisyModel must stay subclassable after a functional NoisyModel exists.
    x, y = classification_data(16)
    functional = mlp()

    class Net(kn.NoisyModel):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(3, activation="softmax")

        def call(self, inputs):
            return self.dense(inputs)

    net = Net()
    for model in (functional, net, mlp()):
        assert isinstance(model, kn.NoisyModel)
        model.compile(kn.NoisyGD(0.1, noise="bernoulli", emulate_batch_size=4, seed=0), LOSS)
        assert np.isfinite(model.fit(x, y, verbose=0).history["loss"]).all()


def test_noisy_rejects_non_models():
    with pytest.raises(ValueError, match=r"Argument `model` must be a `keras.Model`. Received: model="):
        kn.noisy(keras.layers.Dense(3))
