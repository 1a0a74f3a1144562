"""LayerNormalization: gamma rows `sum_t x_i[t] d_i[t]`, beta rows `sum_t d_i[t]`, `x` the normalised input."""

from __future__ import annotations

import keras
from keras import ops

from keras_noisygd.per_example.rules.base import Rule, reduce_sum


class LayerNormalizationRule(Rule):
    """`y = gamma x + beta` with `x` the normalised input: rows summed over the positions outside `axis`."""

    def __init__(self, layer, a, out_grad):
        self.layer = layer
        rank = len(a.shape)
        axes = sorted(k % rank for k in layer.axis)
        x = ops.cast(a, keras.backend.result_type(a.dtype, "float32"))  # as ops.layer_normalization
        mean, variance = ops.moments(x, axes=axes, keepdims=True)
        normalized = ops.cast((x - mean) * ops.rsqrt(variance + layer.epsilon), out_grad.dtype)
        positions = [k for k in range(1, rank) if k not in axes]  # the rows keep the batch axis and `axis`
        self.gamma_rows = reduce_sum(normalized * out_grad, positions) if layer.scale else None
        self.beta_rows = reduce_sum(out_grad, positions) if layer.center else None

    @classmethod
    def capture(cls, layer, a, out, grads, values):
        return cls(layer, a, grads.output)

    @staticmethod
    def covers(layer, input_shape):
        rank = len(input_shape)
        # The deprecated rms_scaling computes another function; normalising over the batch couples examples.
        return not layer.rms_scaling and all(k % rank != 0 for k in layer.axis)

    @staticmethod
    def variables(layer):
        return [v for v in (layer.gamma, layer.beta) if v is not None]

    @staticmethod
    def checked(layer):
        return layer.beta if layer.beta is not None else layer.gamma

    def rebuilt(self):
        return ops.sum(self.beta_rows if self.beta_rows is not None else self.gamma_rows, axis=0)

    def rows(self):
        return [r for r in (self.gamma_rows, self.beta_rows) if r is not None]
