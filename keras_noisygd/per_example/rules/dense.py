"""Dense on `[B, features]` inputs: kernel rows `a_i d_i^T`, bias rows `d_i`; `K_ij += (<a_i, a_j> + 1) <d_i, d_j>`."""

from __future__ import annotations

from keras import ops

from keras_noisygd.per_example.rules.base import Rule, f64, pre_activation_gradient


class DenseRule(Rule):
    """`z = a W + b` on `[B, features]` inputs: kernel rows `a_i d_i^T`, bias rows `d_i`."""

    def __init__(self, layer, a, delta):
        self.layer, self.a, self.delta = layer, a, delta

    @classmethod
    def capture(cls, layer, a, out, grads, values):
        return cls(layer, a, pre_activation_gradient(layer, a, out, grads, values))

    @staticmethod
    def covers(layer, input_shape):
        return len(input_shape) == 2  # on a sequence it sums over positions: not one outer product

    @staticmethod
    def variables(layer):
        return [layer.kernel, layer.bias] if layer.use_bias else [layer.kernel]

    @staticmethod
    def checked(layer):
        return layer.bias if layer.use_bias else layer.kernel

    def rebuilt(self):
        if self.layer.use_bias:
            return ops.sum(self.delta, axis=0)
        return ops.matmul(ops.transpose(self.a), self.delta)

    def rows(self):
        kernel_rows = ops.einsum("bi,bo->bio", self.a, self.delta)
        return [kernel_rows, self.delta] if self.layer.use_bias else [kernel_rows]

    def gram(self):
        # The B x B products in the model's dtype (float32: ~1e-6 relative, like the float32 rows of G),
        # summed in float64; float64 models stay float64 throughout.
        inputs = f64(ops.matmul(self.a, ops.transpose(self.a))) + (1.0 if self.layer.use_bias else 0.0)
        return inputs * f64(ops.matmul(self.delta, ops.transpose(self.delta)))

    def cross(self, shared):
        a, delta = f64(self.a), f64(self.delta)
        u = ops.sum(ops.matmul(a, f64(shared[id(self.layer.kernel)])) * delta, axis=1)  # a_i^T r_W d_i
        if self.layer.use_bias:
            u = u + ops.matmul(delta, f64(shared[id(self.layer.bias)]))
        return u
