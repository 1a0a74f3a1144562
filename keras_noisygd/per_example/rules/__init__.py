"""Per-example gradients of single layers from one batched pass: one rule per layer type.

After a batched forward and backward pass, a layer's trainable variables have
per-example gradients that follow from what the pass already holds: the
layer's input `a`, its output, and the loss's gradient there. With `d_i` the
gradient at example `i`'s (pre-activation) output:

    Dense               kernel a_i d_i^T, bias d_i; K_ij += (<a_i, a_j> + 1) <d_i, d_j>
    Conv1D / Conv2D     kernel sum_t a_i[t s + o] d_i[t]^T at each offset o (one batched matmul per
                        offset), bias sum_t d_i[t]
    Embedding           the table's row v: sum over the positions s with id_is = v of d_is (a scatter-add);
                        K_ij += sum_{s,t} [id_is = id_jt] <d_is, d_jt>
    LayerNormalization  gamma sum_t x_i[t] * d_i[t], beta sum_t d_i[t] over the positions t outside
                        `axis`, x the normalised input (x - mean) / sqrt(var + epsilon)

One module per layer type (`dense.py`, `convolution.py`, `embedding.py`,
`layer_normalization.py`); `base.py` has the contract (`Rule`) and what the
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

from keras_noisygd.per_example.rules.base import Gradients, Rule
from keras_noisygd.per_example.rules.convolution import ConvolutionRule
from keras_noisygd.per_example.rules.dense import DenseRule
from keras_noisygd.per_example.rules.embedding import EmbeddingRule
from keras_noisygd.per_example.rules.layer_normalization import LayerNormalizationRule

__all__ = ["RULES", "rule_for", "Rule", "Gradients"]

RULES = {
    keras.layers.Dense: DenseRule,
    keras.layers.Conv1D: ConvolutionRule,
    keras.layers.Conv2D: ConvolutionRule,
    keras.layers.Embedding: EmbeddingRule,
    keras.layers.LayerNormalization: LayerNormalizationRule,
}
"""The layer rules by exact layer type."""


def rule_for(layer, input_shape, rules=None):
    """The rule class for `layer` with inputs of `input_shape`, or `None` (not covered: the caller forms `G`).

    `rules` is a table `{layer class: rule class}`, `RULES` by default. Layer
    types match exactly: a subclass may compute something else. A layer with
    LoRA, quantization or a compute dtype other than its variables' dtype
    (mixed precision) is not covered.
    """
    rule = (RULES if rules is None else rules).get(type(layer))
    if rule is None or not rule.covers(layer, input_shape):
        return None
    plain = (
        not getattr(layer, "lora_enabled", False)
        and getattr(layer, "quantization_mode", None) is None
        and layer.compute_dtype == layer.variable_dtype
    )
    return rule if plain and len(layer.trainable_weights) == len(rule.variables(layer)) else None
