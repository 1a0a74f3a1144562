"""`per_example_gradients` and `compute`, the entry point of the engines: argument checks, then the engine.

The engine is TensorFlow's (`tape_engine.py`: `tf.vectorized_map` over a
tape) or JAX's and PyTorch's (`vjp_engine.py`: `vmap` over a VJP), chosen once
at import. Both take the layer rows (`layer_rows.py`) where `"auto"` allows.
"""

from __future__ import annotations

from keras_noisygd import _backend
from keras_noisygd._checks import check_int
from keras_noisygd.per_example.losses import loss_function
from keras_noisygd.per_example.result import METHODS

if _backend.NAME == "tensorflow":  # the one choice of an engine, made once at import
    from keras_noisygd.per_example import tape_engine as _engine
else:
    from keras_noisygd.per_example import vjp_engine as _engine


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
    return compute(model, x, y, sample_weight=sample_weight, loss=loss, chunk_size=chunk_size, method=method).rows()


def compute(
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
    """The engine behind `per_example_gradients`, the `"per_example"` train step and `NoiseMonitor`.

    Returns a `PerExample`: the per-example data-loss gradients, or with
    `weights` their weighted mean `(1/B) sum_i weights_i G_i` (never holding
    more than one chunk of `G`; the rows are formed with the `1/B` inside,
    `losses` too), the regularization gradient, the losses, the method used,
    and the predictions and new non-trainable values of the batched
    training-mode forward pass, which a train step can keep instead of
    running the model again. `loss_scale` multiplies every per-example loss
    and `R` (the train step's loss scaling and `tf.distribute` share).
    `values`: `(trainable, non_trainable)` values to use instead of the
    variables' own (JAX's stateless train step passes its state; not on
    TensorFlow).
    """
    check_arguments(model, chunk_size, method)
    loss_fn = loss_function(model, loss)
    return _engine.compute(model, x, y, sample_weight, loss, loss_fn, chunk_size, method, weights, loss_scale, values)


def check_arguments(model, chunk_size, method):
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
