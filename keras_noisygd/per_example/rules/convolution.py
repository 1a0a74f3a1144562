"""Conv1D/Conv2D: kernel rows `sum_t a_i[t s + o] d_i[t]^T` at each offset `o`, one batched matmul per offset."""

from __future__ import annotations

import itertools

from keras import ops

from keras_noisygd.per_example.rules.base import Rule, pre_activation_gradient
from keras_noisygd.per_example.rules.dense import DenseRule


class ConvolutionRule(Rule):
    """Conv1D/Conv2D, channels last, no dilation or groups: rows from one batched matmul per kernel offset."""

    def __init__(self, layer, kernel_rows, bias_rows):
        self.layer, self.kernel_rows, self.bias_rows = layer, kernel_rows, bias_rows

    @staticmethod
    def covers(layer, input_shape):
        return (
            layer.data_format == "channels_last" and layer.padding in ("valid", "same")
            and all(d == 1 for d in layer.dilation_rate) and layer.groups == 1
            and None not in input_shape[1:]  # the rows need the spatial sizes
        )

    variables = staticmethod(DenseRule.variables)
    checked = staticmethod(DenseRule.checked)

    @classmethod
    def capture(cls, layer, a, out, grads, values):
        """The rule's values, or `None` where a traced step lost the spatial sizes."""
        rows = convolution_rows(layer, a, pre_activation_gradient(layer, a, out, grads, values))
        return None if rows is None else cls(layer, *rows)

    def rebuilt(self):
        return ops.sum(self.bias_rows if self.layer.use_bias else self.kernel_rows, axis=0)

    def rows(self):
        kernel_rows = ops.reshape(self.kernel_rows, [-1, *self.layer.kernel.shape])
        return [kernel_rows, self.bias_rows] if self.layer.use_bias else [kernel_rows]


def convolution_rows(layer, a, delta):
    """`(kernel rows [B, kernel.size], bias rows [B, filters])` of a convolution, or `None` (unknown sizes).

    Example `i`'s kernel gradient at offset `o` is `sum_t a_i[t s + o] d_i[t]^T`
    over the output positions `t`: one batched matmul per kernel offset (the
    input shifted by `o` and strided, against `d`), in the kernel's layout.
    """
    rank = len(layer.kernel_size)
    out_size = delta.shape[1 : 1 + rank]
    in_size = a.shape[1 : 1 + rank]
    if None in out_size or None in in_size:
        return None
    if layer.padding == "same":  # TensorFlow's SAME (Keras's on every backend): the extra row or column goes after
        pads = []
        for n, k, s, o in zip(in_size, layer.kernel_size, layer.strides, out_size):
            total = max((o - 1) * s + k - n, 0)
            pads.append((total // 2, total - total // 2))
        a = ops.pad(a, [(0, 0), *pads, (0, 0)])
    positions = 1
    for o in out_size:
        positions *= o
    d = ops.reshape(delta, [-1, positions, delta.shape[-1]])
    rows = []
    for offset in itertools.product(*[range(k) for k in layer.kernel_size]):
        window = tuple(slice(o, o + (n - 1) * s + 1, s) for o, n, s in zip(offset, out_size, layer.strides))
        patch = ops.reshape(a[(slice(None), *window)], [-1, positions, a.shape[-1]])
        rows.append(ops.matmul(ops.transpose(patch, (0, 2, 1)), d))  # [B, in channels, filters]
    kernel_rows = ops.reshape(ops.stack(rows, axis=1), [ops.shape(delta)[0], -1])
    return kernel_rows, ops.sum(d, axis=1)
