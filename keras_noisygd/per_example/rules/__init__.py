"""Per-example gradients of single layers from one batched pass: one rule per layer type.

After a batched forward and backward pass, a layer's trainable variables have
per-example gradients that follow from what the pass already holds: the
layer's input `a`, its output, and the loss's gradient there. With `d_i` the
gradient at example `i`'s (pre-activation) output:

    Dense               kernel a_i d_i^T, bias d_i; K_ij += (<a_i, a_j> + 1) <d_i, d_j>
                        (on a sequence: sum_t a_i[t] d_i[t]^T, sum_t d_i[t])
    EinsumDense         kernel einsum("<a>,<z>-><batch><W>", a_i, d_i), bias d_i summed over the axes
                        it broadcasts along
    Conv1D / Conv2D     kernel sum_t a_i[t s + o] d_i[t]^T at each offset o (one batched matmul per
                        offset), bias sum_t d_i[t]
    Embedding           (and ReversibleEmbedding called forward) the table's row v: sum over the positions s with id_is = v of d_is (a scatter-add);
                        K_ij += sum_{s,t} [id_is = id_jt] <d_is, d_jt>
    LayerNormalization  gamma sum_t x_i[t] * d_i[t], beta sum_t d_i[t] over the positions t outside
                        `axis`, x the normalised input (x - mean) / sqrt(var + epsilon)

One module per layer type (`dense.py`, `einsum_dense.py`, `convolution.py`,
`embedding.py`, `layer_normalization.py`; `keras_hub.py` for KerasHub's
`PositionEmbedding`, loaded with the first KerasHub layer met); `base.py` has the contract (`Rule`) and what the
rules share. `RULES` is the explicit table the layer path takes (a caller
may pass its own). A rule class says before any data whether it covers a layer (`covers`, on its
configuration and input shape); an instance, built from the captured values,
gives the rows `[B, *variable.shape]` of each variable, its share of
`K = G G^T`, its share of `u_i = <G_i, r>` for a gradient `r` shared by every
row (the regularizers'), and one variable's batch gradient rebuilt from the
same values, which the caller compares with the backward pass's own.
"""

from __future__ import annotations

import keras

from keras_noisygd.per_example.rules import keras_hub as keras_hub_rules
from keras_noisygd.per_example.rules.base import Gradients, Rule
from keras_noisygd.per_example.rules.convolution import ConvolutionRule
from keras_noisygd.per_example.rules.dense import DenseRule
from keras_noisygd.per_example.rules.einsum_dense import EinsumDenseRule
from keras_noisygd.per_example.rules.embedding import EmbeddingRule, ReversibleEmbeddingRule
from keras_noisygd.per_example.rules.layer_normalization import LayerNormalizationRule

__all__ = ["RULES", "register_rule", "rule_for", "Rule", "Gradients"]

RULES = {
    keras.layers.Dense: DenseRule,
    keras.layers.EinsumDense: EinsumDenseRule,
    keras.layers.Conv1D: ConvolutionRule,
    keras.layers.Conv2D: ConvolutionRule,
    keras.layers.Embedding: EmbeddingRule,
    keras.layers.LayerNormalization: LayerNormalizationRule,
}
"""The layer rules by layer type (`register_rule` adds to it)."""
if hasattr(keras.layers, "ReversibleEmbedding"):  # Keras >= 3.13; KerasHub's models use it
    RULES[keras.layers.ReversibleEmbedding] = ReversibleEmbeddingRule

_KERAS_HUB = []  # non-empty once KerasHub's rules are in `RULES`


def register_rule(layer_type, rule):
    """Makes `rule` the per-example rule of `layer_type`, so the layer path (rows, `NoiseMonitor`'s Gram
    matrix) covers models with it instead of forming `G`.

    `rule` is a `Rule` subclass: the class methods `covers(layer, input_shape)`,
    `variables(layer)`, `checked(layer)` and `capture(layer, a, out, grads,
    values)`, and the instance methods `rows()` (one `[B, *variable.shape]`
    tensor per variable, in `variables` order) and `rebuilt()` (the batch
    gradient of `checked(layer)` from the same values, compared with the
    backward pass's at every use; a mismatch above `layer_rows.TOLERANCE`
    makes the caller form `G`); `gram()` and `cross(shared)` default to
    products of the rows. See `DenseRule` for a complete one.

    A subclass of `layer_type` is covered too when it keeps `layer_type`'s
    `call` (not overridden), the only case where the rule still describes
    what the layer computes.

    Raises:
        ValueError: `layer_type` is not a `keras.layers.Layer` class or `rule`
            not a `Rule` subclass.
    """
    if not (isinstance(layer_type, type) and issubclass(layer_type, keras.layers.Layer)):
        raise ValueError(f"Argument `layer_type` must be a keras.layers.Layer subclass. Received: layer_type={layer_type!r}")
    if not (isinstance(rule, type) and issubclass(rule, Rule)):
        raise ValueError(
            f"Argument `rule` must be a subclass of keras_noisygd.per_example.rules.Rule. Received: rule={rule!r}"
        )
    RULES[layer_type] = rule


def lookup(table, layer):
    """The rule of `layer`'s type, else of a registered base class whose `call` it keeps.

    The first KerasHub layer met adds KerasHub's embedding rules to `RULES`
    (`rules/keras_hub.py`; KerasHub stays optional).
    """
    if table is RULES and type(layer).__module__.startswith("keras_hub") and not _KERAS_HUB:
        _KERAS_HUB.append(True)
        for layer_type, rule in keras_hub_rules.table().items():
            RULES.setdefault(layer_type, rule)  # a user's own registration comes first
    rule = table.get(type(layer))
    if rule is not None:
        return rule
    for base, candidate in table.items():
        if isinstance(layer, base) and type(layer).call is base.call:
            return candidate
    return None


def rule_for(layer, input_shape, rules=None):
    """The rule class for `layer` with inputs of `input_shape`, or `None` (not covered: the caller forms `G`).

    `input_shape=None` (a layer called inside another's `call`, with no graph
    to read it from) leaves `covers` to the caller, on the input it meets.

    `rules` is a table `{layer class: rule class}`, `RULES` by default. A
    subclass of a listed type matches only where it keeps that type's `call`
    (it may compute something else otherwise). A layer with
    LoRA, quantization or a compute dtype other than its variables' dtype
    (mixed precision) is not covered.
    """
    rule = lookup(RULES if rules is None else rules, layer)
    if rule is None or (input_shape is not None and not rule.covers(layer, input_shape)):
        return None
    plain = (
        not getattr(layer, "lora_enabled", False)
        and getattr(layer, "quantization_mode", None) is None
        and layer.compute_dtype == layer.variable_dtype
    )
    return rule if plain and len(layer.trainable_weights) == len(rule.variables(layer)) else None
