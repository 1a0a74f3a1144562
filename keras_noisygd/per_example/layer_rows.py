"""The layer path: per-example gradients from one batched pass, for the rows of `G` and for `K = G G^T`.

Where every trainable layer has a rule in `rules.RULES` (Dense, EinsumDense,
Conv1D, Conv2D, Embedding, LayerNormalization), example `i`'s gradient follows from
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
`capture(...)` and `rows(...)` here and `gram.gram(...)` return `None` (the
caller forms `G`) only where a traced step lost a convolution's spatial sizes. Next to `K` (or the rows)
they return the largest relative difference between one batch gradient per
layer rebuilt from the captured values (a bias or beta where there is one)
and the backward pass's own: a layer applied twice, or one whose call the
rule does not describe, shows there, and the caller forms `G` instead.
Regularization losses enter as in `per_example_gradients`: one shared
gradient `r` added to every row.
"""

from __future__ import annotations

import collections
import inspect
import weakref

import keras
from keras import ops

from keras_noisygd import _backend
from keras_noisygd._batch import batch_size_of
from keras_noisygd.per_example import nested
from keras_noisygd.per_example import rules as rules_lib
from keras_noisygd.per_example.losses import loss_function
from keras_noisygd.per_example.result import weighted_sum
from keras_noisygd.per_example.rules.base import Gradients, f64

# `layers` and `rules`: the model's own layers with a rule, captured from its graph; `nested`: `(layer, rule)`
# of the layers with a rule called inside another layer's `call` (`nested.py`), recorded while the pass runs.
Plan = collections.namedtuple("Plan", ["capture", "layers", "rules", "nested"])

# The layer path is used while the batch gradients it rebuilds match the backward pass's to this relative
# error: float32 rounding gives ~1e-7, a layer applied twice or a call the rules do not describe O(1).
TOLERANCE = 1e-4

_PLANS = weakref.WeakKeyDictionary()  # model -> (its trainable variables, its plan)


def cached_plan(model, rules=None):
    """`plan(model, rules)`, built once per model, set of trainable variables and table of rules."""
    rules = rules_lib.RULES if rules is None else rules
    key = (tuple(id(v) for v in model.trainable_variables), id(rules), tuple(rules.items()))  # registrations too
    cached = _PLANS.get(model)
    if cached is None or cached[0] != key:
        cached = _PLANS[model] = (key, plan(model, rules))
    return cached[1]


def plan(model, rules=None):
    """A `Plan` for the layer path of `model`, or `None` where it does not apply (the caller forms `G`).

    `rules` is the table of layer rules, `{layer class: rule class}`
    (`rules.RULES` by default). `None` where the backend has no gradient at
    an intermediate output (`_backend.LAYER_ROWS`), for a model with any
    non-trainable variable (BatchNormalization's and
    GhostBatchNormalization's statistics couple the examples in training;
    Dropout, GaussianNoise and random layers keep a seed and need the batch
    step's own masks), a trainable layer without a rule (or, for a layer
    without one, sublayers with rules that hold all its variables: a
    `MultiHeadAttention`'s projections, a block's layers, `nested.py`), a
    trainable variable outside the rules' layers, or more than one output of
    a graph. A model that is not a graph of layers (a subclassed model, the
    wrapper of `noisy()`) is covered through the layers it calls.
    """
    if not _backend.LAYER_ROWS:
        return None
    rules = rules_lib.RULES if rules is None else rules
    layers = [layer for layer in model.layers if layer.trainable_weights]
    if not layers or model.non_trainable_variables:
        return None
    covered = {id(v) for layer in layers for v in layer.trainable_weights}
    if covered != {id(v) for v in model.trainable_variables}:
        return None
    if not getattr(model, "outputs", None):  # not a graph of layers (a subclassed model, `noisy()`'s wrapper)
        pairs = nested.covered(model, rules)  # every layer it calls is reached inside its `call`
        return None if pairs is None else Plan(model, [], [], tuple(pairs))
    if len(model.outputs) != 1:
        return None
    direct, direct_rules, inner = [], [], []
    for layer in layers:
        # A layer with a rule is captured from the graph; one without, through the sublayers it calls.
        rule = rules_lib.lookup(rules, layer) and _graph_rule(layer, rules)
        if rule is not None:
            direct.append(layer)
            direct_rules.append(rule)
            continue
        pairs = nested.covered(layer, rules) if rules_lib.lookup(rules, layer) is None else None
        if pairs is None:
            return None
        inner.extend(pairs)
    try:
        captured = [(layer.input, layer.output) for layer in direct]
        capture_model = keras.Model(model.inputs, [model.outputs[0], *captured])
    except (AttributeError, ValueError, TypeError):  # disconnected
        return None
    if len({id(layer) for layer, _ in inner}) != len(inner):  # a sublayer shared by two layers
        return None
    return Plan(capture_model, direct, direct_rules, tuple(inner))


def _graph_rule(layer, rules):
    """The rule of a layer of the model's graph, from its one input's shape, or `None`."""
    try:
        a, out = layer.input, layer.output
    except (AttributeError, ValueError):  # called more than once in the graph, or not in it
        return None
    if not (hasattr(a, "shape") and hasattr(out, "shape")):  # several inputs or outputs: no rule's
        return None
    return rules_lib.rule_for(layer, tuple(a.shape), rules)


Captured = collections.namedtuple(
    "Captured", ["y_pred", "losses", "layers", "mismatch", "regularization_gradients", "trainable"]
)


def capture(plan_, model, x, y, sample_weight=None, loss=None, data_scale=1.0, regularization_scale=1.0,
            trainable_values=None):
    """One batched training-mode pass of the capture model, or `None` (the caller forms `G`).

    Returns a `Captured`: the predictions, the `[B]` per-example losses
    `s_i l_i * data_scale`, one rule instance per layer of the plan (its rows,
    Gram share and cross terms; the graph's layers, then the nested ones), the
    `mismatch` of the rebuilt batch gradients, the gradients of the
    regularization losses times `regularization_scale` (one per trainable
    variable, or `None` without regularization) and the trainable values.
    `None` where a traced step lost a convolution's spatial sizes, or a
    nested layer did not run exactly once or meets an input its rule does
    not cover. `trainable_values`: the values of `model.trainable_variables`
    to use instead of the variables' own (a compiled JAX function passes them in).
    """
    loss_fn = loss_function(model, loss)
    capture_model = plan_.capture
    inner = [layer for layer, _ in plan_.nested]
    layers_ = [*plan_.layers, *inner]
    rules_ = [*plan_.rules, *(rule for _, rule in plan_.nested)]
    # Leaves of their own (PyTorch): the pass's graph stays out of the caller's.
    if trainable_values is None:
        trainable_values = [v.value for v in model.trainable_variables]
    values = {id(v): _backend.leaf(value) for v, value in zip(model.trainable_variables, trainable_values)}
    trainable = [values[id(v)] for v in model.trainable_variables]
    non_trainable = [v.value for v in capture_model.non_trainable_variables]
    batch_size = batch_size_of(x)
    # The check compares one variable's batch gradient per layer (a bias where there is one: cheap) with the
    # one rebuilt from the captured values.
    checked = [values[id(rule.checked(layer))] for layer, rule in zip(layers_, rules_)]
    dtype = trainable[0].dtype
    # `stateless_call` hands its keywords to `call`: a subclassed model's may not take `training`.
    takes = inspect.signature(capture_model.call).parameters
    training = {"training": True} if "training" in takes or any(p.kind is p.VAR_KEYWORD for p in takes.values()) else {}

    def forward():
        records = {}
        # Every layer of the plan returns its output as a gradient point (JAX differentiates there), and
        # so is every trainable value (the checked ones and the regularization's gradients are taken there).
        with nested.intercepting(layers_, records, _backend.gradient_point):
            outputs, _, reg_losses = capture_model.stateless_call(  # no state: `plan` refuses models with any
                [_backend.gradient_point(values[id(v)]) for v in capture_model.trainable_variables], non_trainable,
                x, return_losses=True, **training,
            )
        if any(len(records.get(id(layer), ())) != 1 for layer in inner):
            raise _NotOnce
        # The capture model returns the predictions and the graph's pairs; a model without a graph, its own.
        y_pred, graph_pairs = (outputs, []) if capture_model is model else (outputs[0], outputs[1:])
        captured = [*graph_pairs, *(records[id(layer)][0] for layer in inner)]
        losses = ops.cast(loss_fn(y, y_pred, sample_weight, batch_size), dtype) * ops.cast(data_scale, dtype)
        regularization = (
            sum(ops.cast(r, dtype) for r in reg_losses) * ops.cast(regularization_scale, dtype) if reg_losses else None
        )
        # Keras's softmax and sigmoid keep their input on the output, and its crossentropies read the loss from
        # those logits (the pre-activation z): the loss then reaches z directly, not through the output.
        logits = [getattr(out, "_keras_logits", out) for _, out in captured]
        kept = dict(y_pred=y_pred, captured=captured, losses=losses, logits=logits)
        return ops.sum(losses), regularization, [out for _, out in captured] + logits + checked, kept

    try:
        grads, reg_grads, found = _backend.gradients_at(forward, trainable)
    except _NotOnce:  # a nested layer applied twice, or not at all: its input and output are not one pair
        return None
    n = len(layers_)
    out_grads, logit_grads, checked_grads = grads[:n], grads[n : 2 * n], grads[2 * n :]
    _detach(found)
    captured_rules = []
    mismatch = ops.convert_to_tensor(0.0, _backend.wide_float())  # float64 where the backend has it (not JAX without x64)
    for index, (layer, rule, (a, out), out_grad, logit, logit_grad, checked_grad) in enumerate(zip(
        layers_, rules_, found["captured"], out_grads, found["logits"], logit_grads, checked_grads
    )):
        if index >= len(plan_.layers) and not rule.covers(layer, tuple(a.shape)):  # `plan` checked the graph's
            return None
        grads_there = Gradients(out_grad, logit, logit_grad)
        values_there = rule.capture(layer, a, out, grads_there, values)
        if values_there is None:
            return None
        mismatch = ops.maximum(mismatch, _relative_error(values_there.rebuilt(), checked_grad))
        captured_rules.append(values_there)
    return Captured(found["y_pred"], found["losses"], captured_rules, mismatch, reg_grads, trainable)


class _NotOnce(Exception):
    """A nested layer of the plan did not run exactly once in the pass."""


def _detach(found):
    """The captured values out of the pass's graph (PyTorch), one detached tensor per tensor: the rules tell
    logits from outputs by identity."""
    detached = {}

    def detach(t):
        return detached.setdefault(id(t), ops.stop_gradient(t))

    found["captured"] = [tuple(keras.tree.map_structure(detach, pair)) for pair in found["captured"]]
    found["logits"] = [detach(t) for t in found["logits"]]
    found["y_pred"] = keras.tree.map_structure(detach, found["y_pred"])
    found["losses"] = detach(found["losses"])


def _relative_error(rebuilt, true):
    true = f64(ops.convert_to_tensor(true))  # an Embedding's gradient is IndexedSlices on TensorFlow
    rebuilt = f64(rebuilt)
    return ops.norm(ops.reshape(rebuilt - ops.reshape(true, ops.shape(rebuilt)), [-1])) / (
        ops.norm(ops.reshape(true, [-1])) + 1e-30
    )


def rows(plan_, model, x, y, sample_weight=None, loss=None, data_scale=1.0, regularization_scale=1.0,
         trainable_values=None):
    """`(G as one [B, *shape] tensor per trainable variable, Captured)`, or `None` (a convolution's sizes unknown)."""
    captured = capture(plan_, model, x, y, sample_weight, loss, data_scale, regularization_scale, trainable_values)
    if captured is None:
        return None
    by_variable = {}
    for layer, rule in zip([*plan_.layers, *(layer for layer, _ in plan_.nested)], captured.layers):
        for variable, variable_rows in zip(rule.variables(layer), rule.rows()):
            by_variable[id(variable)] = variable_rows
    return [by_variable[id(v)] for v in model.trainable_variables], captured


def per_example_rows(plan_, model, x, y, sample_weight, loss, weights, loss_scale, trainable_values=None):
    """`(gradients, Captured)` for `per_example.compute`, or `None` (a convolution's sizes unknown).

    `gradients` are the rows of `G` (each loss times `loss_scale`), or with
    `weights` their weighted mean `(1/B) sum_i weights_i G_i` (the `1/B` in
    the backward pass, as in the general methods). The caller checks
    `Captured.mismatch` and forms `G` the general way where it fails.
    `trainable_values`: as for `capture`.
    """
    dtype = model.trainable_variables[0].dtype
    scale = ops.cast(loss_scale, dtype)
    data_scale = scale if weights is None else scale / ops.cast(batch_size_of(x), dtype)
    fast = rows(plan_, model, x, y, sample_weight, loss, data_scale, scale, trainable_values)
    if fast is None:
        return None
    data_rows, captured = fast
    if weights is not None:
        data_rows = weighted_sum(weights, data_rows)
    return data_rows, captured
