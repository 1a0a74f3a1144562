"""EinsumDense (`z = einsum(equation, a, W) + b`): kernel rows `einsum("<a>,<z>-><batch><W>", a_i, d_i)`.

The kernel's gradient for one example contracts that example's input with the
gradient at its pre-activation output over every index but the kernel's: the
equation with the roles of output and kernel swapped. The bias's rows are `d_i`
summed over the output axes the bias broadcasts along. This covers the
projections of `MultiHeadAttention` and KerasHub's transformer blocks where
they are layers of the model's graph (see `layer_rows.plan`).
"""

from __future__ import annotations

import string

from keras import ops

from keras_noisygd.per_example.rules.base import Rule, pre_activation_gradient, reduce_sum


def split(equation, input_rank):
    """`(input, kernel, output)` index strings of `equation` with any `...` spelled out, or `None`.

    `None` where the rule does not describe it: not `"<a>,<W>-><z>"`, an
    ellipsis on the kernel, a first (batch) index that is not the output's
    first or that the kernel carries, or a kernel index in neither the input
    nor the output (the layer would sum the kernel over it).
    """
    if equation.count(",") != 1 or equation.count("->") != 1:
        return None
    inputs, output = equation.replace(" ", "").split("->")
    lhs, kernel = inputs.split(",")
    if "..." in kernel:
        return None
    if "..." in lhs:
        spare = [c for c in string.ascii_letters if c not in equation]
        filled = "".join(spare[: input_rank - (len(lhs) - 3)])
        lhs, output = lhs.replace("...", filled), output.replace("...", filled)
    if len(lhs) != input_rank or not lhs or not output or lhs[0] != output[0] or lhs[0] in kernel:
        return None
    if any(k not in lhs and k not in output for k in kernel):
        return None
    return lhs, kernel, output


class EinsumDenseRule(Rule):
    """`z = einsum(equation, a, W) + b`, then the activation: rows from one einsum over the captured values."""

    def __init__(self, layer, a, delta):
        self.layer, self.a, self.delta = layer, a, delta
        self.lhs, self.kernel, self.out = split(layer.equation, len(a.shape))

    @classmethod
    def capture(cls, layer, a, out, grads, values):
        lhs, kernel, output = split(layer.equation, len(a.shape))

        def linear(a_, kernel_):
            return ops.einsum(f"{lhs},{kernel}->{output}", a_, kernel_)

        return cls(layer, a, pre_activation_gradient(layer, a, out, grads, values, linear))

    @staticmethod
    def covers(layer, input_shape):
        return split(layer.equation, len(input_shape)) is not None

    @staticmethod
    def variables(layer):
        return [layer.kernel, layer.bias] if layer.bias is not None else [layer.kernel]

    @staticmethod
    def checked(layer):
        # The kernel, not the bias: the bias of an attention's key projection has a gradient of exactly zero in
        # theory (a constant per query cancels in the softmax), float noise in practice, whose relative error
        # says nothing.
        return layer.kernel

    def _bias_rows(self):
        """`d_i` summed over the output axes the bias broadcasts along (`x + bias`, aligned on the right)."""
        bias_shape = tuple(self.layer.bias.shape)
        rank = len(self.delta.shape)  # the batch axis and the output's
        lead = rank - len(bias_shape)
        rows = reduce_sum(self.delta, list(range(1, lead)))  # axes before the bias's: summed away
        ones = [1 + k for k, size in enumerate(bias_shape) if size == 1 and rows.shape[1 + k] != 1]
        return ops.sum(rows, axis=ones, keepdims=True) if ones else rows

    def rebuilt(self):
        return ops.einsum(f"{self.lhs},{self.out}->{self.kernel}", self.a, self.delta)

    def rows(self):
        batch = self.lhs[0]
        kernel_rows = ops.einsum(f"{self.lhs},{self.out}->{batch}{self.kernel}", self.a, self.delta)
        return [kernel_rows, self._bias_rows()] if self.layer.bias is not None else [kernel_rows]
