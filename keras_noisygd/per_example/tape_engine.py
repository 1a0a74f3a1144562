"""The per-example engine on TensorFlow: `tf.vectorized_map` over a `tf.GradientTape`, after the layer rows.

`compute` is `per_example.compute` on TensorFlow (the package docstring of
`keras_noisygd.per_example` describes the methods). The layer rows' check is
a `tf.cond`, so a traced step falls back to the general method at run time.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from keras_noisygd._batch import batch_size_of
from keras_noisygd.per_example import layer_rows
from keras_noisygd.per_example.result import PerExample, choose_method, weighted_sum

_ZERO = tf.UnconnectedGradients.ZERO


def compute(model, x, y, sample_weight, loss, loss_fn, chunk_size, method, weights, loss_scale, values=None):
    """`per_example.compute` on TensorFlow: the layer rows where `method="auto"` allows, else `_general`.

    `loss` is the user's argument, `loss_fn` its per-example function
    (`losses.loss_function`). `values` must be `None`: this engine reads the
    variables (a `tf.function` sees their current values).
    """
    if values is not None:
        raise ValueError("Argument `values` is for the stateless (JAX) engine; TensorFlow reads the variables.")
    arguments = (model, x, y, sample_weight, loss_fn, chunk_size, method, weights, loss_scale)
    if method == "auto" and chunk_size is None:
        plan = layer_rows.cached_plan(model)
        if plan is not None:
            fast = layer_rows.per_example_rows(plan, model, x, y, sample_weight, loss, weights, loss_scale)
            if fast is not None:
                return _from_layer_rows(model, *fast, lambda: _general(*arguments))
    return _general(*arguments)


def _from_layer_rows(model, gradients, captured, general):
    """The `PerExample` of the layer rows, or of `general()` where their check fails (a `tf.cond`)."""
    fast = (gradients, captured.regularization_gradients, captured.losses, captured.y_pred)

    def slow():
        result = general()
        return (result.gradients, result.regularization_gradients, result.losses, result.y_pred)

    chosen = tf.cond(captured.mismatch <= layer_rows.TOLERANCE, lambda: fast, slow)
    unchanged = [None] * len(model.non_trainable_variables)  # the rows exist only where no state changes
    return PerExample(*chosen[:3], "layers", chosen[3], unchanged)


def _general(model, x, y, sample_weight, loss_fn, chunk_size, method, weights, loss_scale):
    trainable = [v.value for v in model.trainable_variables]
    non_trainable_values = [v.value for v in model.non_trainable_variables]
    batch_size = batch_size_of(x)
    dtype = trainable[0].dtype
    scale = tf.cast(loss_scale, dtype)
    # With weights, the 1/B of the weighted mean goes into the backward pass: each row then has the size of
    # its share of the batch gradient, as in the weighted engine (under loss scaling, B times larger rows
    # would overflow float16 activations' gradients).
    data_scale = scale if weights is None else scale / tf.cast(batch_size, dtype)

    with tf.GradientTape(persistent=True) as tape:
        tape.watch(trainable)
        y_pred, new_state, reg_losses = model.stateless_call(
            trainable, non_trainable_values, x, training=True, return_losses=True
        )
        losses = tf.cast(loss_fn(y, y_pred, sample_weight, batch_size), dtype) * data_scale
        regularization = tf.add_n([tf.cast(r, dtype) for r in reg_losses]) * scale if reg_losses else None
    new_state = [None if new is old else new for new, old in zip(new_state, non_trainable_values)]
    method = _without_crashing_pfor(model, choose_method(method, any(new is not None for new in new_state)), method)
    regularization_gradients = None
    if regularization is not None:
        regularization_gradients = tape.gradient(regularization, trainable, unconnected_gradients=_ZERO)

    if method == "jacobian":
        gradients = _jacobian(tape, losses, trainable, batch_size, chunk_size, weights)
    else:
        del tape

        def one_example(xi, yi, si):
            # The batch of one: add a leading axis of 1 to every input, target and weight.
            xi, yi, si = tf.nest.map_structure(lambda t: t[None], (xi, yi, si))
            with tf.GradientTape() as inner:
                inner.watch(trainable)
                pred, _ = model.stateless_call(trainable, non_trainable_values, xi, training=True)
                value = tf.cast(loss_fn(yi, pred, si, batch_size)[0], dtype) * data_scale
            return inner.gradient(value, trainable, unconnected_gradients=_ZERO)

        gradients = _vectorized(one_example, (x, y, sample_weight), batch_size, chunk_size, weights, trainable)
    return PerExample(gradients, regularization_gradients, losses, method, y_pred, new_state)


# Layers whose training-mode pass `tf.vectorized_map` crashes the process on (TensorFlow 2.21: "free(): invalid
# pointer" on Keras's MultiHeadAttention and so on every KerasHub transformer; the jacobian method is exact there).
PFOR_CRASHES = ("MultiHeadAttention",)


def _without_crashing_pfor(model, chosen, asked):
    """`chosen`, or "jacobian" where "vectorized" would run a layer of `PFOR_CRASHES` (refused if asked for)."""
    if chosen != "vectorized":
        return chosen
    found = sorted({type(layer).__name__ for layer in _sublayers(model)} & set(PFOR_CRASHES))
    if not found:
        return chosen
    if asked == "vectorized":
        raise ValueError(
            f"Argument `method='vectorized'` would crash TensorFlow {tf.__version__} on this model's {found[0]} "
            "layer (tf.vectorized_map over it aborts the process). Use method='jacobian' or 'auto'. "
            "Received: method='vectorized'"
        )
    return "jacobian"


def _sublayers(layer, seen=None):
    """`layer` and every layer inside it: a model's `layers` and the layers a layer holds as attributes."""
    seen = set() if seen is None else seen
    if id(layer) in seen:
        return
    seen.add(id(layer))
    yield layer
    children = list(getattr(layer, "layers", None) or [])
    for value in vars(layer).values():
        children += [v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, keras.layers.Layer)]
    for child in children:
        yield from _sublayers(child, seen)


def _vectorized(one_example, batch, batch_size, chunk_size, weights, trainable):
    x, y, sample_weight = batch
    if sample_weight is None:
        sample_weight = tf.ones([batch_size], trainable[0].dtype)

    def run(rows):
        # Rows past the batch (padding of the last chunk) repeat real examples; they are cut or zero-weighted.
        xs, ys, ss = tf.nest.map_structure(lambda t: tf.gather(t, rows % batch_size), (x, y, sample_weight))
        return tf.vectorized_map(lambda e: one_example(*e), (xs, ys, ss))

    return _over_chunks(run, batch_size, chunk_size, weights, trainable)


def _jacobian(tape, losses, trainable, batch_size, chunk_size, weights):
    def run(rows):
        # One backward pass per example: the cotangent of example i is the one-hot row e_i (0 past the batch).
        cotangents = tf.one_hot(rows, batch_size, dtype=losses.dtype)
        return tf.vectorized_map(
            lambda v: tape.gradient(losses, trainable, output_gradients=v, unconnected_gradients=_ZERO), cotangents
        )

    return _over_chunks(run, batch_size, chunk_size, weights, trainable)


def _over_chunks(run, batch_size, chunk_size, weights, trainable):
    """`G`, or `sum_i weights_i G_i`, computed `chunk_size` rows at a time."""
    if weights is not None:
        weights = tf.convert_to_tensor(weights)
    if chunk_size is None:
        grads = run(tf.range(batch_size))
        return grads if weights is None else weighted_sum(weights, grads)
    chunks = (batch_size + chunk_size - 1) // chunk_size
    rows = tf.reshape(tf.range(chunks * chunk_size), [chunks, chunk_size])
    if weights is None:
        signature = [tf.TensorSpec([chunk_size, *v.shape], v.dtype) for v in trainable]
        stacked = tf.map_fn(run, rows, fn_output_signature=signature)
        grads = [tf.reshape(g, [-1, *v.shape]) for g, v in zip(stacked, trainable)]
        if isinstance(batch_size, int) and batch_size % chunk_size == 0:
            return grads  # no padding rows to cut (and no copy of G to cut them)
        return [g[:batch_size] for g in grads]
    padded = tf.concat([weights, tf.zeros([chunks * chunk_size - batch_size], weights.dtype)], 0)
    padded = tf.reshape(padded, [chunks, chunk_size])
    signature = [tf.TensorSpec(v.shape, v.dtype) for v in trainable]
    stacked = tf.map_fn(lambda a: weighted_sum(a[1], run(a[0])), (rows, padded), fn_output_signature=signature)
    return [tf.reduce_sum(g, 0) for g in stacked]
