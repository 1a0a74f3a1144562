"""The noisy and the clean loss from one vector of per-example losses, against Keras's own `compute_loss`.

`one_pass.losses` replaces the step's two `compute_loss` calls where it provably computes the same: these
tests compare both of its losses with `compute_loss` on the same predictions, and check that every case it
does not cover falls back to `compute_loss` (`None`).
"""

import keras
import numpy as np
import pytest
from helpers import classification_data, mlp, to_numpy

import keras_noisygd as kn
from keras_noisygd.train_step import one_pass

pytestmark = pytest.mark.all_backends

B = 24


def compiled(loss, model=None, **kwargs):
    model = model or mlp()
    model.compile(kn.NoisyGD(0.1, noise="gaussian", emulate_batch_size=4, seed=0), loss, **kwargs)
    return model


def keras_losses(model, x, y, y_pred, sample_weight, weights):
    """`(noisy, clean)` as the step computed them before: `compute_loss` with and without the noise weights."""
    s = np.ones(B, "float32") if sample_weight is None else sample_weight.reshape(B, -1)
    noisy_weight = (s * weights.reshape(B, *([1] * (s.ndim - 1)))).reshape(sample_weight.shape if sample_weight is not None else (B,))
    noisy = model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=noisy_weight)
    clean = model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight)
    return float(to_numpy(noisy)), float(to_numpy(clean))


class WithAddLoss(keras.layers.Layer):
    def call(self, x):
        self.add_loss(0.25 * keras.ops.mean(x * x))
        return x


CASES = {
    "crossentropy + L2": (lambda: compiled("sparse_categorical_crossentropy"), None),
    "user weights [B]": (lambda: compiled("sparse_categorical_crossentropy"), "flat"),
    "user weights [B, 1]": (lambda: compiled("sparse_categorical_crossentropy"), "column"),
    "sum reduction": (lambda: compiled(keras.losses.SparseCategoricalCrossentropy(reduction="sum")), None),
    "add_loss": (
        lambda: compiled(
            "sparse_categorical_crossentropy",
            kn.NoisySequential([keras.Input((5,)), keras.layers.Dense(7), WithAddLoss(), keras.layers.Dense(3, activation="softmax")]),
        ),
        None,
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_both_losses_equal_compute_loss(case):
    build, weighting = CASES[case]
    model = build()
    x, y = classification_data(B)
    rng = np.random.default_rng(1)
    weights = rng.uniform(0.0, 3.0, B).astype("float32")  # any noise weights, far from 1
    sample_weight = {None: None, "flat": rng.uniform(0.5, 2.0, B), "column": rng.uniform(0.5, 2.0, (B, 1))}[weighting]
    sample_weight = None if sample_weight is None else sample_weight.astype("float32")
    y_pred = model(x, training=True)  # the forward pass sets the add_loss values both read
    tensor = None if sample_weight is None else keras.ops.convert_to_tensor(sample_weight)
    both = one_pass.losses(model, keras.ops.convert_to_tensor(y), y_pred, tensor, keras.ops.convert_to_tensor(weights), B)
    assert both is not None
    noisy, clean = (float(to_numpy(v)) for v in both)
    want_noisy, want_clean = keras_losses(model, x, keras.ops.convert_to_tensor(y), y_pred, sample_weight, weights)
    # float32 sums of 24 terms in another order (mean of per-example values vs Keras's sum / B): ~1e-7 relative.
    np.testing.assert_allclose([noisy, clean], [want_noisy, want_clean], rtol=2e-6)
    assert abs(noisy - clean) > 1e-2  # the weights matter, so the comparison can tell the two losses apart


class OwnLoss(kn.NoisyModel):
    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        return super().compute_loss(x, y, y_pred, sample_weight, training) * 2.0


def two_outputs():
    inputs = keras.Input((5,))
    return kn.NoisyModel(inputs, [keras.layers.Dense(3, activation="softmax")(inputs), keras.layers.Dense(3, activation="softmax")(inputs)])


def masked():
    inputs = keras.Input((4,))
    hidden = keras.layers.Masking()(keras.layers.Reshape((4, 1))(inputs))
    return kn.NoisyModel(inputs, keras.layers.Dense(3, activation="softmax")(hidden))


class OwnCall(keras.losses.SparseCategoricalCrossentropy):
    def __call__(self, y_true, y_pred, sample_weight=None):
        return super().__call__(y_true, y_pred, sample_weight) + 1.0


FALLBACKS = {
    "own compute_loss": lambda: compiled("sparse_categorical_crossentropy", mlp(model_class=OwnLoss)),
    "a Loss with its own __call__": lambda: compiled(OwnCall()),
    "loss_weights": lambda: compiled("sparse_categorical_crossentropy", loss_weights=2.0),
    "two outputs": lambda: compiled(["sparse_categorical_crossentropy"] * 2, two_outputs()),
}


@pytest.mark.parametrize("case", FALLBACKS)
def test_what_it_does_not_cover_falls_back_to_compute_loss(case):
    model = FALLBACKS[case]()
    x, y = classification_data(B)
    y_pred = model(x, training=True)
    weights = keras.ops.ones((B,))
    assert one_pass.losses(model, keras.ops.convert_to_tensor(y), y_pred, None, weights, B) is None


def test_per_timestep_weights_and_masks_fall_back_to_compute_loss():
    model = compiled("sparse_categorical_crossentropy")
    x, y = classification_data(B)
    y_pred, weights, y = model(x), keras.ops.ones((B,)), keras.ops.convert_to_tensor(y)
    assert one_pass.losses(model, y, y_pred, keras.ops.ones((B, 3)), weights, B) is None
    model = compiled("sparse_categorical_crossentropy", masked())
    y_pred = model(np.where(np.arange(4) < 2, 1.0, 0.0)[None].repeat(B, 0).astype("float32"))
    assert one_pass.losses(model, keras.ops.zeros((B, 4), "int32"), y_pred, None, weights, B) is None


def test_a_recompiled_loss_is_the_one_used():
    model = compiled("sparse_categorical_crossentropy", mlp(l2=0))  # no regularizer: "sum" scales the whole loss
    x, y = classification_data(B)
    y, weights = keras.ops.convert_to_tensor(y), keras.ops.ones((B,))
    first = float(to_numpy(one_pass.losses(model, y, model(x), None, weights, B)[1]))
    model.compile(kn.NoisyGD(0.1, noise="gaussian", emulate_batch_size=4, seed=0), keras.losses.SparseCategoricalCrossentropy(reduction="sum"))
    second = float(to_numpy(one_pass.losses(model, y, model(x), None, weights, B)[1]))
    np.testing.assert_allclose(second, B * first, rtol=1e-6)  # "sum" is B times the mean
