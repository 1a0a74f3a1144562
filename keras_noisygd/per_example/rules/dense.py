"""Dense: kernel rows `a_i d_i^T`, bias rows `d_i` (summed over positions on a sequence).

On `[B, features]` inputs `K_ij += (<a_i, a_j> + 1) <d_i, d_j>`; on a sequence
`[B, ..., features]` (a transformer's feed-forward block) the rows are
`sum_t a_i[t] d_i[t]^T` and `K` is their product.
"""

from __future__ import annotations

from keras import ops

from keras_noisygd.per_example.rules.base import Rule, f64, pre_activation_gradient


class DenseRule(Rule):
    """`z = a W + b` on `[B, features]` or `[B, ..., features]` inputs: kernel rows `sum_t a_i[t] d_i[t]^T`."""

    def __init__(self, layer, a, delta):
        self.layer = layer
        self.sequence = len(a.shape) > 2
        if self.sequence:  # the positions as one axis: [B, T, features]
            a = ops.reshape(a, (ops.shape(a)[0], -1, a.shape[-1]))
            delta = ops.reshape(delta, (ops.shape(delta)[0], -1, delta.shape[-1]))
        self.a, self.delta = a, delta

    @classmethod
    def capture(cls, layer, a, out, grads, values):
        return cls(layer, a, pre_activation_gradient(layer, a, out, grads, values))

    @staticmethod
    def covers(layer, input_shape):
        return len(input_shape) >= 2

    @staticmethod
    def variables(layer):
        return [layer.kernel, layer.bias] if layer.use_bias else [layer.kernel]

    @staticmethod
    def checked(layer):
        return layer.bias if layer.use_bias else layer.kernel

    def _bias_rows(self):
        return ops.sum(self.delta, axis=1) if self.sequence else self.delta

    def rebuilt(self):
        if self.layer.use_bias:
            return ops.sum(self._bias_rows(), axis=0)
        if self.sequence:
            return ops.einsum("bti,bto->io", self.a, self.delta)
        return ops.matmul(ops.transpose(self.a), self.delta)

    def rows(self):
        equation = "bti,bto->bio" if self.sequence else "bi,bo->bio"
        kernel_rows = ops.einsum(equation, self.a, self.delta)
        return [kernel_rows, self._bias_rows()] if self.layer.use_bias else [kernel_rows]

    def gram(self):
        if self.sequence:  # sum_{s,t} <a_is, a_jt> <d_is, d_jt> would hold B^2 T^2 products: the rows' instead
            return super().gram()
        # The B x B products in the model's dtype (float32: ~1e-6 relative, like the float32 rows of G),
        # summed in float64; float64 models stay float64 throughout.
        inputs = f64(ops.matmul(self.a, ops.transpose(self.a))) + (1.0 if self.layer.use_bias else 0.0)
        return inputs * f64(ops.matmul(self.delta, ops.transpose(self.delta)))

    def cross(self, shared):
        if self.sequence:
            return super().cross(shared)
        a, delta = f64(self.a), f64(self.delta)
        u = ops.sum(ops.matmul(a, f64(shared[id(self.layer.kernel)])) * delta, axis=1)  # a_i^T r_W d_i
        if self.layer.use_bias:
            u = u + ops.matmul(delta, f64(shared[id(self.layer.bias)]))
        return u
