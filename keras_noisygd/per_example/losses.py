"""The loss adapter: a model's compiled loss (or a given one) as `[B]` per-example values.

`loss_function(model, loss)` gives `f(y, y_pred, sample_weight, batch_size)`,
whose values `s_i l_i` have the batch loss `fit` descends as their mean: one
loss per output weighted by the compiled `loss_weights`, a `"sum"`
reduction scaled by `B`, Keras's broadcasting rules of `[B]` against `[B, 1]`.
The train steps share `REDUCTIONS`: the reductions under which a weighted
loss is `(1/B) sum_i m_i l_i`, so that loss weights enter as `G W`.
"""

from __future__ import annotations

import keras
from keras import ops, tree

REDUCTIONS = ("sum_over_batch_size", "mean", "sum")
"""Loss reductions that keep per-example weights as `G W` (no division by the sum of the weights)."""


def loss_function(model, loss):
    """`f(y, y_pred, sample_weight, batch_size) -> [B]` per-example losses, weighted by `sample_weight`."""
    loss_weights = None
    if loss is None:
        loss = getattr(model, "loss", None)
        if loss is None:
            raise ValueError(
                "Argument `loss` is None and the model has no compiled loss: pass `loss=` or compile the "
                f"model first. Received: loss=None, model.loss={loss!r}"
            )
        if len(tree.flatten(loss)) > 1:
            if not hasattr(model, "noisy_loss_weights"):
                raise ValueError(
                    "Argument `loss` is None and the model's compiled loss has one loss per output; pass them "
                    "explicitly (with any loss weights applied) or build the model with keras_noisygd.NoisyModel, "
                    f"which records its loss weights. Received: loss=None, model.loss={loss!r}"
                )
            loss_weights = model.noisy_loss_weights
    loss_objects = tree.map_structure(loss_object, loss)

    def per_example(y, y_pred, sample_weight, batch_size):
        flat_losses = tree.flatten(loss_objects)
        if len(flat_losses) == 1:
            pairs = [(flat_losses[0], y, y_pred, 1.0)]
        else:
            try:
                tree.assert_same_structure(tree.lists_to_tuples(loss_objects), tree.lists_to_tuples(y_pred))  # lists = tuples
            except (ValueError, TypeError) as error:
                raise ValueError(
                    "Argument `loss` must be one loss, or one loss per model output in the structure of the "
                    f"outputs. Received: loss={loss!r} for outputs {tree.map_structure(lambda t: t.shape, y_pred)}"
                ) from error
            flat_weights = tree.flatten(loss_weights) if loss_weights is not None else [1.0] * len(flat_losses)
            pairs = zip(flat_losses, tree.flatten(y), tree.flatten(y_pred), flat_weights)
        total = None
        for loss_obj, y_true, pred, factor in pairs:
            values = per_example_values(loss_obj, y_true, pred, batch_size)
            if factor != 1.0:
                values = values * ops.cast(factor, values.dtype)
            total = values if total is None else total + values
        if sample_weight is not None:
            total = total * per_example_weight(sample_weight, total.dtype)
        return total

    return per_example


def per_example_weight(sample_weight, dtype):
    """A `[B]` or `[B, 1]` sample weight as `[B]`; per-timestep weights have no per-example value."""
    sample_weight = ops.convert_to_tensor(sample_weight)
    if any(d != 1 for d in sample_weight.shape[1:]):
        raise ValueError(
            "Argument `sample_weight` must have one value per example ([B] or [B, 1]) for per-example "
            f"gradients. Received: sample_weight with shape {sample_weight.shape}"
        )
    return ops.reshape(ops.cast(sample_weight, dtype), [-1])


def loss_object(loss):
    if isinstance(loss, keras.losses.Loss):
        reduction = getattr(loss, "reduction", "sum_over_batch_size")
        if reduction not in REDUCTIONS:
            raise ValueError(
                f"Argument `loss` {loss!r} must reduce with one of {list(REDUCTIONS)} to have "
                f"per-example values whose mean is the batch loss. Received: reduction={reduction!r}"
            )
        return loss
    function = keras.losses.get(loss)
    if function is None or not callable(function):
        raise ValueError(f"Argument `loss` must be a Keras loss name, function or Loss. Received: loss={loss!r}")
    return FunctionLoss(function)


class FunctionLoss:
    """A loss function as `compile` wraps it: unreduced values, mean over the batch, floatx."""

    reduction = "sum_over_batch_size"

    def __init__(self, function):
        self.function = function
        self.dtype = keras.config.floatx()

    def call(self, y_true, y_pred):
        # As Keras's wrapper: a [B] target against a [B, 1] prediction (or the reverse) is not broadcast.
        if len(y_true.shape) == len(y_pred.shape) - 1 and y_pred.shape[-1] == 1:
            y_true = y_true[..., None]
        elif len(y_true.shape) == len(y_pred.shape) + 1 and y_true.shape[-1] == 1:
            y_true = y_true[..., 0]
        return self.function(y_true, y_pred)

    def __repr__(self):
        return f"<loss {getattr(self.function, '__name__', self.function)!r}>"


def per_example_values(loss_obj, y_true, y_pred, batch_size):
    """`[B]` values whose mean over the batch is `loss_obj(y_true, y_pred)` (as `fit` reduces it)."""
    if getattr(y_pred, "_keras_mask", None) is not None:
        # Keras would weight the loss by the mask and divide by its sum; refuse rather than ignore it.
        raise ValueError(
            "Argument `model` produces masked outputs (a Masking layer or `mask_zero=True`), which the "
            "per-example engine does not support: per-example losses would ignore the mask. "
            "Received: an output with a Keras mask"
        )
    # As `keras.losses.Loss.__call__`: both in the loss's dtype (integer labels too).
    y_pred = keras.ops.convert_to_tensor(y_pred, dtype=loss_obj.dtype)
    y_true = keras.ops.convert_to_tensor(y_true, dtype=loss_obj.dtype)
    values = ops.convert_to_tensor(loss_obj.call(y_true, y_pred))
    if len(values.shape) == 0:
        raise ValueError(
            f"Argument `loss` must give one value per example; {loss_obj!r} returns a scalar. "
            "Received: a loss with scalar values"
        )
    if len(values.shape) == 1:  # [B] values (the usual case): no reduction over one element, two operations fewer
        return values * ops.cast(batch_size, values.dtype) if loss_obj.reduction == "sum" else values
    values = ops.reshape(values, [ops.shape(values)[0], -1])
    if loss_obj.reduction == "sum":
        return ops.sum(values, axis=1) * ops.cast(batch_size, values.dtype)
    return ops.mean(values, axis=1)
