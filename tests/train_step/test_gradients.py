"""The weighted-loss engine against an explicit per-example loop, in float64 (paper-notes 6.2)."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import classification_data, mlp

import keras_noisygd as kn

B = 12


def per_example_gradients_by_loop(model, x, y):
    """d l_i / d theta for each example, one tape per example, regularization excluded."""
    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    rows = []
    for i in range(len(x)):
        with tf.GradientTape() as tape:
            loss = loss_fn(y[i : i + 1], model(x[i : i + 1], training=True))
        rows.append([g.numpy() for g in tape.gradient(loss, model.trainable_variables)])
    return rows


def regularization_gradients(model):
    with tf.GradientTape() as tape:
        model(tf.zeros((1, 5), "float64"))
        reg = tf.add_n(model.losses)
    return [g if g is None else g.numpy() for g in tape.gradient(reg, model.trainable_variables)]


@pytest.fixture
def setup(float64):
    model = mlp(dtype="float64", model_class=keras.Model, l2=0.05)
    model.compile(loss="sparse_categorical_crossentropy")
    x, y = classification_data(B, dtype="float64")
    m = np.random.default_rng(3).normal(1.0, 1.5, B)
    return model, x, y, m


@pytest.mark.parametrize("loss", [None, "sparse_categorical_crossentropy", "Loss instance"])
def test_weighted_gradient_equals_sum_of_weighted_per_example_gradients(setup, loss):
    model, x, y, m = setup
    if loss == "Loss instance":
        loss = keras.losses.SparseCategoricalCrossentropy()  # made under floatx float64
    rows = per_example_gradients_by_loop(model, x, y)
    reg = regularization_gradients(model)
    got = kn.noisy_gradients(model, x, y, tf.constant(m), loss=loss)
    for j, g in enumerate(got):
        expected = sum(m[i] * rows[i][j] for i in range(B)) / B
        if reg[j] is not None:
            expected = expected + reg[j]  # regularization is not noised
        # float64 throughout; the only difference is summation order: ~1e-15 relative.
        np.testing.assert_allclose(g.numpy(), expected, rtol=1e-10, atol=1e-12)


def test_user_sample_weight_multiplies_the_noise(setup):
    model, x, y, m = setup
    s = np.linspace(0.5, 2.0, B)
    rows = per_example_gradients_by_loop(model, x, y)
    reg = regularization_gradients(model)
    got = kn.noisy_gradients(model, x, y, tf.constant(m), sample_weight=tf.constant(s))
    for j, g in enumerate(got):
        expected = sum(m[i] * s[i] * rows[i][j] for i in range(B)) / B + (0 if reg[j] is None else reg[j])
        np.testing.assert_allclose(g.numpy(), expected, rtol=1e-10, atol=1e-12)


def test_unit_weights_give_the_batch_gradient(setup):
    model, x, y, _ = setup
    with tf.GradientTape() as tape:
        loss = model.compute_loss(x, y, model(x, training=True))
    expected = tape.gradient(loss, model.trainable_variables)
    got = kn.noisy_gradients(model, x, y, tf.ones(B, "float64"))
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-12, atol=1e-14)


def test_a_loss_without_per_example_values_is_refused(setup):
    model, x, y, m = setup

    def scalar_loss(y_true, y_pred):
        return tf.reduce_mean(y_pred)

    with pytest.raises(ValueError, match="Argument `loss` must return one loss value per example"):
        kn.noisy_gradients(model, x, y, tf.constant(m), loss=scalar_loss)
