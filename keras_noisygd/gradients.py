"""The weighted-loss engine: `G W` as the gradient of a re-weighted loss, in one backward pass."""

from __future__ import annotations

import keras
from keras import ops

from keras_noisygd import _backend
from keras_noisygd._batch import combine_weights

__all__ = ["noisy_gradients"]


def noisy_gradients(model, x, y, weights, loss=None, sample_weight=None):
    """Gradients of the loss re-weighted per example by the noise weights `weights`.

    For custom training loops. With per-example losses `l_i` and regularization
    `R` this returns

        grad( (1/B) sum_i weights_i * sample_weight_i * l_i + R )  =  G W + grad R,

    one backward pass, never forming the gradient matrix `G`.

    Args:
        model: A Keras model, called with `training=True`.
        x: Inputs of the batch.
        y: Targets of the batch.
        weights: `[B]` loss weights, e.g. `optimizer.noise_weights(B)`.
        loss: `None` to use the model's compiled loss (`model.compute_loss`),
            or a Keras loss: a `keras.losses.Loss` (its own reduction applies;
            the default `"sum_over_batch_size"` is the `1/B` above), or a name or
            function giving per-example values, averaged over the batch.
            Under a `tf.distribute` strategy every loss is scaled as Keras
            scales it (divided by the number of replicas), so the summed
            gradients of the replicas are those of the global batch.
            Defaults to `None`.
        sample_weight: Optional user weights, multiplied with `weights`.
            Defaults to `None`.

    Works on every backend (on JAX through `jax.grad` over the variables'
    values; state updates of the forward pass, such as BatchNormalization's
    moving statistics, are then not kept).

    Returns:
        A list of gradients, one per `model.trainable_variables`. Under mixed
        precision, scale the loss yourself or use `NoisyModel.fit`, which goes
        through `optimizer.scale_loss`.

    Example:

    ```python
    weights = optimizer.noise_weights(batch_size)
    grads = keras_noisygd.noisy_gradients(model, x, y, weights)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    ```
    """
    weights = combine_weights(sample_weight, weights)

    def weighted_loss():
        y_pred = model(x, training=True)
        if loss is None:
            return model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=weights, training=True)
        value = _weighted_loss(keras.losses.get(loss), y, y_pred, weights)
        if model.losses:
            regularization = ops.sum(ops.stack([ops.cast(v, value.dtype) for v in model.losses]))
            value = value + _replica_share(regularization)
        return value

    return _backend.gradients(weighted_loss, lambda: model.trainable_variables)


def _replica_share(value):
    """`value / replicas` under a `tf.distribute` strategy, as Keras scales a loss.

    The optimizer sums the replicas' gradients, so each replica contributes its
    share: the batch mean over `R` replicas' equal batches is the sum of their
    means over `R`, and a regularization term is counted once.
    """
    replicas = _backend.num_replicas()
    return value / replicas if replicas > 1 else value


def _weighted_loss(loss_fn, y, y_pred, weights):
    if isinstance(loss_fn, keras.losses.Loss):
        return loss_fn(y, y_pred, sample_weight=weights)
    per_example = ops.convert_to_tensor(loss_fn(y, y_pred))
    if len(per_example.shape) == 0:
        raise ValueError(
            "Argument `loss` must return one loss value per example to be re-weighted by the "
            f"noise. Received: a loss {loss_fn!r} that returns a scalar"
        )
    weights = ops.cast(weights, per_example.dtype)
    if len(weights.shape) != len(per_example.shape):  # [B] weights on [B, T, ...] losses
        weights = ops.reshape(weights, [-1] + [1] * (len(per_example.shape) - 1))
    return _replica_share(ops.mean(weights * per_example))
