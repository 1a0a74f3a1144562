"""A model with its own train_step adds the noise itself (the documented recipes), on every backend;
`noisy()` refuses what it cannot keep and passes a subclassed model's own call arguments."""

import keras
import numpy as np
import pytest
from helpers import classification_data

import keras_noisygd as kn

pytestmark = pytest.mark.all_backends
BACKEND = keras.backend.backend()
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


class Net(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(8, activation="relu")
        self.out = keras.layers.Dense(3)

    def call(self, x, training=None):
        return self.out(self.hidden(x))


class OwnStep(Net):
    """The recipe of docs/quickstart.md, "Your own train_step"."""

    if BACKEND == "jax":

        def train_step(self, state, data):
            import jax

            trainable, non_trainable, optimizer_variables, metrics_variables = state
            x, y = data
            weights, optimizer_variables = self.optimizer.stateless_noise_weights(optimizer_variables, x.shape[0])

            def loss_fn(trainable):
                y_pred, new_non_trainable = self.stateless_call(trainable, non_trainable, x, training=True)
                loss, _ = self.stateless_compute_loss(
                    trainable, new_non_trainable, metrics_variables, x=x, y=y, y_pred=y_pred, sample_weight=weights
                )
                return loss, new_non_trainable

            gradients, non_trainable = jax.grad(loss_fn, has_aux=True)(trainable)
            trainable, optimizer_variables = self.optimizer.stateless_apply(optimizer_variables, gradients, trainable)
            logs = {"mean_noise_weight": keras.ops.mean(weights)}
            return logs, (trainable, non_trainable, optimizer_variables, metrics_variables)

    else:

        def train_step(self, data):
            x, y = data
            weights = self.optimizer.noise_weights(keras.ops.shape(x)[0])
            gradients = kn.noisy_gradients(self, x, y, weights)  # = grad of compute_loss(sample_weight=weights)
            if BACKEND == "torch":
                import torch

                with torch.no_grad():  # as keras.io's PyTorch train_step guide applies
                    self.optimizer.apply(gradients, self.trainable_variables)
            else:
                self.optimizer.apply(gradients, self.trainable_variables)
            return {"mean_noise_weight": keras.ops.mean(weights)}  # logs: TensorFlow's fit needs at least one


class Reference(kn.NoisyTrainStep, Net):
    pass


def trained(cls, optimizer, x, y):
    keras.utils.set_random_seed(0)  # the same initialisation for every class
    model = cls()
    model(x[:1])  # builds the layers
    model.compile(optimizer, LOSS)
    model.fit(x, y, batch_size=len(x), epochs=3, shuffle=False, verbose=0)
    return [keras.ops.convert_to_numpy(w) for w in model.trainable_weights]


def test_own_train_step_recipe_takes_the_noisy_models_steps():
    x, y = classification_data(16)
    own = trained(OwnStep, kn.NoisyGD(0.1, emulate_batch_size=4, seed=3), x, y)
    reference = trained(Reference, kn.NoisyGD(0.1, emulate_batch_size=4, seed=3), x, y)
    stock = trained(Net, keras.optimizers.SGD(0.1), x, y)
    for a, b in zip(own, reference):
        # float32, the same loss through two code paths: rounding only (~1e-7 per op over 3 steps).
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # ...and those steps are noisy: b = 4 out of 16 moves them far from plain GD.
    assert max(np.abs(a - b).max() for a, b in zip(own, stock)) > 1e-3


def test_noisy_refuses_a_model_with_its_own_train_step():
    with pytest.raises(ValueError, match=r"overrides \['train_step'\], which a wrapper would drop.*noise_weights"):
        kn.noisy(OwnStep())


class Masked(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(2)

    def call(self, x, mask=None, training=None):
        y = self.dense(x)
        return y if mask is None else y * keras.ops.cast(mask, y.dtype)


def test_the_wrapper_passes_the_models_own_call_arguments():
    model = Masked()
    x = np.ones((3, 4), "float32")
    model(x)
    mask = np.array([[1, 0], [0, 1], [1, 1]], "float32")
    wrapped = kn.noisy(model)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(wrapped(x, mask=mask)), keras.ops.convert_to_numpy(model(x, mask=mask)))
    assert (keras.ops.convert_to_numpy(wrapped(x, mask=mask)) * (1 - mask) == 0).all()
