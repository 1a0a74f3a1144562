"""Per-example gradients from one batched pass: the rows of `G` and `K = G G^T` without the general engine.

Where every trainable layer has a rule in `_layer_rules` (Dense, Conv1D,
Conv2D, Embedding, LayerNormalization), example `i`'s gradient follows from
the layer's input `a_i` and the loss's gradient `d_i` at its (pre-activation)
output. For a Dense layer `z = a W + b`, `W_i = a_i d_i^T` and `b_i = d_i`, so

    <G_i, G_j> = sum over Dense layers of (<a_i, a_j> + [bias]) * <d_i, d_j>

(Goodfellow 2015, arXiv 1510.01799; the "ghost norm" of Li et al. 2022): one
batched forward and backward pass and `O(B^2 (p + q))` per layer, instead of
`B x d` rows. The other rules form their (small) rows, or for an Embedding
the Gram share from id equality. This holds when every example's loss
depends on its own row only (no batch statistics, no shared random masks)
and each layer is applied once.

`plan(model)` checks what it can before any data (every trainable variable a
covered layer's, each layer's configuration and input shape, one output, no
mixed precision, no state: BatchNormalization, GhostBatchNormalization,
Dropout and other random layers make it `None`) and builds a capture model
with the same layers that also returns each layer's input and output.
`gram(...)` and `rows(...)` return `None` (the caller forms `G`) only where a
traced step lost a convolution's spatial sizes. Next to `K` (or the rows)
they return the largest relative difference between one batch gradient per
layer rebuilt from the captured values (a bias or beta where there is one)
and the backward pass's own: a layer applied twice, or one whose call the
rule does not describe, shows there, and the caller forms `G` instead.
Regularization losses enter as in `per_example_gradients`: one shared
gradient `r` added to every row.
"""

from __future__ import annotations

import collections
import weakref

import keras
import tensorflow as tf

from keras_noisygd import _layer_rules, per_example
from keras_noisygd.gradients import _batch_size_of

Plan = collections.namedtuple("Plan", ["capture", "layers", "rules"])

# The layer path is used while the batch gradients it rebuilds match the backward pass's to this relative
# error: float32 rounding gives ~1e-7, a layer applied twice or a call the rules do not describe O(1).
TOLERANCE = 1e-4

_PLANS = weakref.WeakKeyDictionary()  # model -> (its trainable variables, its plan)


def cached_plan(model):
    """`plan(model)`, built once per model and set of trainable variables."""
    key = tuple(id(v) for v in model.trainable_variables)
    cached = _PLANS.get(model)
    if cached is None or cached[0] != key:
        cached = _PLANS[model] = (key, plan(model))
    return cached[1]


def plan(model):
    """A `Plan` for the layer path of `model`, or `None` where it does not apply (the caller forms `G`).

    `None` for a model with any non-trainable variable (BatchNormalization's and
    GhostBatchNormalization's statistics couple the examples in training;
    Dropout, GaussianNoise and random layers keep a seed and need the batch
    step's own masks), a trainable layer without a rule (`_layer_rules`), a
    trainable variable outside the rules' layers, more than one output, or a
    model that is not a graph of layers.
    """
    layers = [layer for layer in model.layers if layer.trainable_weights]
    if not layers or model.non_trainable_variables:
        return None
    covered = {id(v) for layer in layers for v in layer.trainable_weights}
    if covered != {id(v) for v in model.trainable_variables} or len(getattr(model, "outputs", None) or []) != 1:
        return None
    try:
        captured = [(layer.input, layer.output) for layer in layers]
        capture_model = keras.Model(model.inputs, [model.outputs[0], *captured])
    except (AttributeError, ValueError, TypeError):  # not a graph of layers (a subclassed model), or disconnected
        return None
    rules = [_layer_rules.rule_for(layer, tuple(a.shape)) for layer, (a, _) in zip(layers, captured)]
    if None in rules:
        return None
    return Plan(capture_model, layers, rules)


Captured = collections.namedtuple(
    "Captured", ["y_pred", "losses", "layers", "mismatch", "regularization_gradients", "trainable"]
)


def capture(plan_, model, x, y, sample_weight=None, loss=None, data_scale=1.0, regularization_scale=1.0):
    """One batched training-mode pass of the capture model, or `None` (a convolution's sizes unknown).

    Returns a `Captured`: the predictions, the `[B]` per-example losses
    `s_i l_i * data_scale`, one rule instance per layer of the plan (its rows,
    Gram share and cross terms), the `mismatch` of the rebuilt batch
    gradients, the gradients of the regularization losses times
    `regularization_scale` (one per trainable variable, or `None` without
    regularization) and the trainable values.
    """
    loss_fn = per_example._loss_function(model, loss)
    capture_model = plan_.capture
    values = {id(v): v.value for v in capture_model.trainable_variables}
    trainable = [values[id(v)] for v in model.trainable_variables]
    non_trainable = [v.value for v in capture_model.non_trainable_variables]
    batch_size = _batch_size_of(x)
    # The check compares one variable's batch gradient per layer (a bias where there is one: cheap) with the
    # one rebuilt from the captured values.
    checked = [values[id(rule.checked(layer))] for layer, rule in zip(plan_.layers, plan_.rules)]
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(trainable)
        outputs, _, reg_losses = capture_model.stateless_call(  # no state: `plan` refuses models with any
            [values[id(v)] for v in capture_model.trainable_variables], non_trainable, x, training=True,
            return_losses=True,
        )
        y_pred, captured = outputs[0], outputs[1:]
        dtype = trainable[0].dtype
        losses = tf.cast(loss_fn(y, y_pred, sample_weight, batch_size), dtype) * tf.cast(data_scale, dtype)
        total = tf.reduce_sum(losses)
        regularization = (
            tf.add_n([tf.cast(r, dtype) for r in reg_losses]) * tf.cast(regularization_scale, dtype)
            if reg_losses else None
        )
    zero = tf.UnconnectedGradients.ZERO
    outs = [out for _, out in captured]
    # Keras's softmax and sigmoid keep their input on the output, and its crossentropies read the loss from
    # those logits (the pre-activation z): the loss then reaches z directly, not through the output.
    logits = [getattr(out, "_keras_logits", out) for out in outs]
    n = len(outs)
    grads = tape.gradient(total, outs + logits + checked, unconnected_gradients=zero)
    out_grads, logit_grads, checked_grads = grads[:n], grads[n : 2 * n], grads[2 * n :]
    reg_grads = None
    if regularization is not None:
        reg_grads = tape.gradient(regularization, trainable, unconnected_gradients=zero)
    del tape
    layers = []
    mismatch = tf.constant(0.0, tf.float64)
    for layer, rule, (a, out), out_grad, logit, logit_grad, checked_grad in zip(
        plan_.layers, plan_.rules, captured, out_grads, logits, logit_grads, checked_grads
    ):
        grads_there = _layer_rules.Gradients(out_grad, logit, logit_grad)
        values_there = rule.capture(layer, a, out, grads_there, values)
        if values_there is None:
            return None
        mismatch = tf.maximum(mismatch, _relative_error(values_there.rebuilt(), checked_grad))
        layers.append(values_there)
    return Captured(y_pred, losses, layers, mismatch, reg_grads, trainable)


def _relative_error(rebuilt, true):
    true = _f64(tf.convert_to_tensor(true))  # an Embedding's gradient is IndexedSlices
    rebuilt = _f64(rebuilt)
    return tf.norm(rebuilt - tf.reshape(true, tf.shape(rebuilt))) / (tf.norm(true) + tf.constant(1e-30, tf.float64))


def _f64(t):
    return tf.cast(t, tf.float64)


def gram(plan_, model, x, y, sample_weight=None, loss=None):
    """`(K, mismatch)` in float64 for the probe batch, or `None` (a convolution's sizes unknown here).

    `K_ij = <G_i, G_j>` for the rows of `per_example_gradients`,
    `G_i = gamma_i + r` (`gamma_i` the gradient of `s_i l_i`, `r` that of the
    regularization losses), so `K = Gamma + u 1^T + 1 u^T + |r|^2` with
    `u_i = <gamma_i, r>`. `mismatch` is the largest relative difference
    between the rebuilt and the true batch gradients of the checked variables
    (~1e-7 in float32 when the path applies).
    """
    captured = capture(plan_, model, x, y, sample_weight, loss)
    if captured is None:
        return None
    k = tf.add_n([_f64(rule.gram()) for rule in captured.layers])
    if captured.regularization_gradients is not None:
        shared = {id(v): g for v, g in zip(model.trainable_variables, captured.regularization_gradients)}
        u = tf.add_n([_f64(rule.cross(shared)) for rule in captured.layers])
        r_sq = tf.add_n([tf.reduce_sum(_f64(g) ** 2) for g in shared.values()])
        k += u[:, None] + u[None, :] + r_sq
    return k, captured.mismatch


def rows(plan_, model, x, y, sample_weight=None, loss=None, data_scale=1.0, regularization_scale=1.0):
    """`(G as one [B, *shape] tensor per trainable variable, Captured)`, or `None` (a convolution's sizes unknown)."""
    captured = capture(plan_, model, x, y, sample_weight, loss, data_scale, regularization_scale)
    if captured is None:
        return None
    by_variable = {}
    for layer, rule in zip(plan_.layers, captured.layers):
        for variable, variable_rows in zip(rule.variables(layer), rule.rows()):
            by_variable[id(variable)] = variable_rows
    return [by_variable[id(v)] for v in model.trainable_variables], captured
