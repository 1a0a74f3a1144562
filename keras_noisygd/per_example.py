"""The per-example engine: the gradient matrix `G`, one row per example, on every Keras backend.

The methods below are TensorFlow's (`tf.vectorized_map`, in `_tf_per_example`);
JAX and PyTorch have the same methods with `jax.vmap`/`jax.vjp` and
`torch.func` (`_functional_per_example`), and PyTorch also the layer rows.

Two exact ways to form `G_i = d l_i / d theta`, both from `model.stateless_call`
(so computing `G` leaves the model's state alone):

* `"vectorized"`: `tf.vectorized_map` over the examples of a forward and
  backward pass on one example. Costs about one batched step, but it is only
  right for a model whose training-mode forward pass treats every example on
  its own.
* `"jacobian"`: one batched forward pass gives the `[B]` per-example losses,
  and `tf.vectorized_map` runs the backward pass once per example on them (the
  Jacobian of the loss vector). Exact for every model, BatchNormalization
  (whose batch statistics couple the examples) and Dropout (one mask per
  example, as in the batched step) included, at `O(B)` times the cost of the
  batched backward pass.

`"auto"` first takes the layer rows of `_gram` (a model without state whose
trainable layers are all Dense, Conv1D/Conv2D, Embedding or
LayerNormalization, and no `chunk_size`; BatchNormalization,
GhostBatchNormalization and Dropout models never take them): one
batched forward and backward pass, each layer's rows formed from its input and
output gradient, checked against the backward pass's batch gradient, the
general method where the check fails; the result's `method` is then
`"layers"`. Otherwise it picks `"jacobian"` exactly when the training-mode
forward pass updates model state (BatchNormalization's moving statistics, the
seed of Dropout, GaussianNoise or a random augmentation layer) and
`"vectorized"` otherwise. A custom layer that mixes examples without keeping
state must be given `method="jacobian"`.
"""

from __future__ import annotations

import collections

import keras
from keras import ops, tree

from keras_noisygd._checks import check_int

__all__ = ["per_example_gradients", "METHODS"]

METHODS = ("auto", "vectorized", "jacobian")

_MEAN_REDUCTIONS = ("sum_over_batch_size", "mean")

PerExample = collections.namedtuple(
    "PerExample", ["gradients", "regularization_gradients", "losses", "method", "y_pred", "state"]
)


def per_example_gradients(model, x, y, sample_weight=None, loss=None, chunk_size=None, method="auto"):
    """The gradient of every example's loss: one `[B, *variable.shape]` tensor per trainable variable.

    Row `i` is `d/d theta ( s_i l_i(theta) + R(theta) )`, with `l_i` example
    `i`'s loss, `s_i` its sample weight and `R` the model's regularization
    losses (`model.losses`), so the mean over `i` is the gradient of the batch
    loss `(1/B) sum_i s_i l_i + R` that `fit` descends. The training-mode
    forward pass is the batched one: BatchNormalization normalises with the
    batch's statistics and Dropout draws one mask per example, exactly as in a
    training step. The model's state is not changed (no moving-statistics
    update, no seed advance): two calls give the same result.

    Compiles with XLA (`tf.function(jit_compile=True)`).

    Args:
        model: A built Keras model.
        x: Inputs of the batch (a tensor or a nest of tensors).
        y: Targets of the batch.
        sample_weight: Optional `[B]` (or `[B, 1]`) weights `s_i`. Defaults to
            `None` (all 1).
        loss: A Keras loss (name, function or `keras.losses.Loss`) whose
            per-example values are `l_i`; a `Loss` object's reduction must be
            `"sum_over_batch_size"`, `"mean"` or `"sum"`. `None` uses the
            model's compiled loss (one per output, weighted by the compiled
            `loss_weights`). Defaults to `None`.
        chunk_size: Examples per vectorised chunk, or `None` for the whole
            batch at once. Bounds the peak memory of the intermediate values to
            `chunk_size` examples; the result is the same. Defaults to `None`.
        method: `"auto"`, `"vectorized"` or `"jacobian"` (see the module
            docstring). Defaults to `"auto"`.

    Returns:
        A list of tensors, one per `model.trainable_variables`, each of shape
        `[B, *variable.shape]`.

    Example:

    ```python
    grads = keras_noisygd.per_example_gradients(model, x, y)
    mean_gradient = [keras.ops.mean(g, axis=0) for g in grads]   # = the batch gradient
    ```
    """
    return _rows(_compute(model, x, y, sample_weight=sample_weight, loss=loss, chunk_size=chunk_size, method=method))


def _update(result):
    """`G W + grad R` of a `PerExample` computed with weights: the weighted rows plus the regularization gradient."""
    if result.regularization_gradients is None:
        return result.gradients
    return [g + r for g, r in zip(result.gradients, result.regularization_gradients)]


def _rows(result):
    """The rows `G_i` of a `PerExample`: its data-loss rows plus the shared regularization gradient."""
    if result.regularization_gradients is None:
        return result.gradients
    return [g + ops.expand_dims(r, 0) for g, r in zip(result.gradients, result.regularization_gradients)]


def _compute(
    model,
    x,
    y,
    sample_weight=None,
    loss=None,
    chunk_size=None,
    method="auto",
    weights=None,
    loss_scale=1.0,
    values=None,
):
    """The engine behind `per_example_gradients` and the `"per_example"` train step.

    Returns a `PerExample` tuple: `gradients` is the per-example data-loss
    gradients `d (s_i l_i) / d theta` (`[B, ...]` each), or with `weights` the
    weighted mean `(1/B) sum_i weights_i G_i` (never holding more than one
    chunk of `G`; the rows are formed with the `1/B` inside, `losses` too);
    `regularization_gradients` is `d R / d theta` or `None` when the model has
    no losses; `losses` is the `[B]` values `s_i l_i`; `method` the method
    used; `y_pred` and `state` are the predictions and the new non-trainable
    values (BN statistics, seeds; `None` where a value is unchanged) of the
    batched training-mode forward pass, which a train step can keep instead
    of running the model again. `loss_scale` multiplies every per-example loss
    and `R` (the train step's loss scaling and `tf.distribute` share).
    `values`: `(trainable, non_trainable)` values to use instead of the
    variables' own (JAX's stateless train step passes its state; not on
    TensorFlow).
    """
    _check_arguments(model, chunk_size, method)
    loss_fn = _loss_function(model, loss)
    if keras.backend.backend() == "tensorflow":
        from keras_noisygd import _tf_per_example

        return _tf_per_example.compute(model, x, y, sample_weight, loss, loss_fn, chunk_size, method, weights, loss_scale)
    from keras_noisygd import _functional_per_example

    return _functional_per_example.compute(
        model, x, y, sample_weight, loss, loss_fn, chunk_size, method, weights, loss_scale, values
    )


def choose_method(method, state_updated):
    """The method `"auto"` stands for (the general ones), or `method`, refused where it would be wrong."""
    if method == "auto":
        return "jacobian" if state_updated else "vectorized"
    if method == "vectorized" and state_updated:
        raise ValueError(
            "Argument `method='vectorized'` runs the model on one example at a time, but this model's "
            "training-mode forward pass updates its state (BatchNormalization statistics or the seed of "
            "Dropout/GaussianNoise/random layers), so each example would be normalised or masked on its own. "
            "Use method='jacobian' (exact, slower) or 'auto'. Received: method='vectorized'"
        )
    return method


def _check_arguments(model, chunk_size, method):
    if method not in METHODS:
        raise ValueError(f"Argument `method` must be one of {list(METHODS)}. Received: method={method!r}")
    check_int("chunk_size", chunk_size, 1, allow_none=True)
    if not model.built:
        raise ValueError(
            f"Argument `model` must be built (call it on a batch or give it an Input) before per-example "
            f"gradients can be computed. Received: model={model.name!r} (not built)"
        )
    if not model.trainable_variables:
        raise ValueError(f"Argument `model` has no trainable variables. Received: model={model.name!r}")


def _loss_function(model, loss):
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
            if not hasattr(model, "_noisy_loss_weights"):
                raise ValueError(
                    "Argument `loss` is None and the model's compiled loss has one loss per output; pass them "
                    "explicitly (with any loss weights applied) or build the model with keras_noisygd.NoisyModel, "
                    f"which records its loss weights. Received: loss=None, model.loss={loss!r}"
                )
            loss_weights = model._noisy_loss_weights
    loss_objects = tree.map_structure(_loss_object, loss)

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
            values = _per_example_values(loss_obj, y_true, pred, batch_size)
            if factor != 1.0:
                values = values * ops.cast(factor, values.dtype)
            total = values if total is None else total + values
        if sample_weight is not None:
            total = total * _per_example_weight(sample_weight, total.dtype)
        return total

    return per_example


def _per_example_weight(sample_weight, dtype):
    """A `[B]` or `[B, 1]` sample weight as `[B]`; per-timestep weights have no per-example value."""
    sample_weight = ops.convert_to_tensor(sample_weight)
    if any(d != 1 for d in sample_weight.shape[1:]):
        raise ValueError(
            "Argument `sample_weight` must have one value per example ([B] or [B, 1]) for per-example "
            f"gradients. Received: sample_weight with shape {sample_weight.shape}"
        )
    return ops.reshape(ops.cast(sample_weight, dtype), [-1])


def _loss_object(loss):
    if isinstance(loss, keras.losses.Loss):
        reduction = getattr(loss, "reduction", "sum_over_batch_size")
        if reduction not in (*_MEAN_REDUCTIONS, "sum"):
            raise ValueError(
                f"Argument `loss` {loss!r} must reduce with one of {[*_MEAN_REDUCTIONS, 'sum']} to have "
                f"per-example values whose mean is the batch loss. Received: reduction={reduction!r}"
            )
        return loss
    function = keras.losses.get(loss)
    if function is None or not callable(function):
        raise ValueError(f"Argument `loss` must be a Keras loss name, function or Loss. Received: loss={loss!r}")
    return _FunctionLoss(function)


class _FunctionLoss:
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


def _per_example_values(loss_obj, y_true, y_pred, batch_size):
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
    values = ops.reshape(values, [ops.shape(values)[0], -1])
    if loss_obj.reduction == "sum":
        return ops.sum(values, axis=1) * ops.cast(batch_size, values.dtype)
    return ops.mean(values, axis=1)
