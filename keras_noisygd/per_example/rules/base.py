"""The contract of a layer rule and what the rules share: the gradient at a layer's pre-activation output.

See `keras_noisygd.per_example.rules` for the rules and the table of them.
"""

from __future__ import annotations

import collections

import keras
from keras import ops

from keras_noisygd import _backend


def f64(t):
    """`t` in float64 (float32 on JAX without `jax_enable_x64`, which would truncate float64 with a warning)."""
    return ops.cast(t, _backend.wide_float())


def flat(t):
    """`t` as `[B, -1]`."""
    return ops.reshape(t, [ops.shape(t)[0], -1])


def reduce_sum(t, axes):
    """The sum over `axes`; `t` itself for no axes."""
    return ops.sum(t, axis=axes) if axes else t


Gradients = collections.namedtuple("Gradients", ["output", "logits", "logits_gradient"])


def pre_activation_gradient(layer, a, out, grads, values, linear=None):
    """`d_i = dl_i / dz_i` at `z = linear(a, W) + b`, from the gradients at the output and its logits.

    `linear(a, kernel)` is the layer's product (Dense's matmul or a
    convolution's `convolution_op` when not given); it is evaluated only for
    an activation other than linear and ReLU.

    `grads.logits` is the logits Keras keeps on a softmax or sigmoid output
    (`z` itself: TensorFlow's crossentropies read the loss from them), else
    the output itself. Where there are logits, the gradient there is already
    `d_i`, summed over every path from `z` to the loss (through the output
    too: PyTorch's crossentropies read the output).
    """
    out_grad, logit = grads.output, grads.logits
    if logit is not out:
        return grads.logits_gradient
    if layer.activation is None or layer.activation is keras.activations.linear:
        return out_grad
    if layer.activation is keras.activations.relu:
        return out_grad * ops.cast(out > 0, out_grad.dtype)  # relu'(z) from the output: no need for z
    kernel = values[id(layer.kernel)]
    if linear is None:
        linear = ops.matmul if isinstance(layer, keras.layers.Dense) else layer.convolution_op
    z = linear(a, kernel)
    bias = getattr(layer, "bias", None)
    z = z + values[id(bias)] if bias is not None else z
    return _backend.activation_gradient(layer.activation, z, out_grad)  # the activation's derivative


class Rule:
    """The contract of a layer rule: a class that covers a layer type, and an instance of captured values.

    Class methods, before any data: `covers(layer, input_shape)` (whether the
    rule describes this layer's call on inputs of this shape), `variables(layer)`
    (its trainable variables, in the order of `rows`), `checked(layer)` (the
    variable whose batch gradient `rebuilt` returns) and
    `capture(layer, a, out, grads, values)` (an instance from the layer's input,
    output and `Gradients` there). An instance gives `rows()` (one `[B,
    *variable.shape]` tensor per variable), `rebuilt()`, and, from the rows
    unless it overrides them, `gram()` (its share of `K`) and `cross(shared)`.
    """

    @classmethod
    def capture(cls, layer, a, out, grads, values):
        """The rule's values from the layer's input `a`, output `out`, `Gradients` there and the trainable
        `values` (variable id -> value), or `None` where they do not suffice (a traced step lost sizes)."""
        raise NotImplementedError

    @staticmethod
    def covers(layer, input_shape):
        raise NotImplementedError

    @staticmethod
    def variables(layer):
        """The layer's trainable variables, in the order `rows` returns them."""
        raise NotImplementedError

    @staticmethod
    def checked(layer):
        """The variable whose batch gradient `rebuilt` returns."""
        raise NotImplementedError

    def rebuilt(self):
        raise NotImplementedError

    def rows(self):
        raise NotImplementedError

    def gram(self):
        """This layer's share of `K` in float64: the products of its rows (in their dtype, summed in float64)."""
        return sum(f64(ops.matmul(flat(r), ops.transpose(flat(r)))) for r in self.rows())

    def cross(self, shared):
        """`[B]` float64 `<G_i, r>` over this layer's variables; `shared`: variable id -> `r`."""
        return sum(
            ops.matmul(f64(flat(rows)), ops.reshape(f64(shared[id(v)]), [-1]))
            for v, rows in zip(self.variables(self.layer), self.rows())
        )
