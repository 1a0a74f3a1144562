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

A rule class says before any data whether it covers a layer (`covers`, on its
configuration and input shape); an instance, built from the captured values,
gives the rows `[B, *variable.shape]` of each variable, its share of
`K = G G^T`, its share of `u_i = <G_i, r>` for a gradient `r` shared by every
row (the regularizers'), and one variable's batch gradient rebuilt from the
same values, which the caller compares with the backward pass's own.
"""

from __future__ import annotations

import collections
import itertools

import keras
from keras import ops


def rule_for(layer, input_shape):
    """The rule class for `layer` with inputs of `input_shape`, or `None` (not covered: the caller forms `G`)."""
    rule = _RULES.get(type(layer))  # exact types: a subclass may compute something else
    if rule is None or not rule.covers(layer, input_shape):
        return None
    plain = (
        not getattr(layer, "lora_enabled", False)
        and getattr(layer, "quantization_mode", None) is None
        and layer.compute_dtype == layer.variable_dtype
    )
    return rule if plain and len(layer.trainable_weights) == len(rule.variables(layer)) else None


def _f64(t):
    return ops.cast(t, "float64")


def _flat(t):
    return ops.reshape(t, [ops.shape(t)[0], -1])


def _reduce_sum(t, axes):
    return ops.sum(t, axis=axes) if axes else t


class _Rule:
    """A layer's captured values: its rows, Gram share and cross terms (from the rows unless overridden)."""

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
        return sum(_f64(ops.matmul(_flat(r), ops.transpose(_flat(r)))) for r in self.rows())

    def cross(self, shared):
        """`[B]` float64 `<G_i, r>` over this layer's variables; `shared`: variable id -> `r`."""
        return sum(
            ops.matmul(_f64(_flat(rows)), ops.reshape(_f64(shared[id(v)]), [-1]))
            for v, rows in zip(self.variables(self.layer), self.rows())
        )


Gradients = collections.namedtuple("Gradients", ["output", "logits", "logits_gradient"])


def _pre_activation_gradient(layer, a, out, grads, values):
    """`d_i = dl_i / dz_i` at `z = conv_or_matmul(a, W) + b`, from the gradients at the output and its logits.

    `grads.logits` is the logits Keras keeps on a softmax or sigmoid output
    (`z` itself: TensorFlow's crossentropies read the loss from them), else
    the output itself. Where there are logits, the gradient there is already
    `d_i`, summed over every path from `z` to the loss (through the output
    too: PyTorch's crossentropies read the output).
    """
    out_grad, logit = grads.output, grads.logits
    if logit is not out:
        return grads.logits_gradient
    if layer.activation is keras.activations.linear:
        return out_grad
    if layer.activation is keras.activations.relu:
        return out_grad * ops.cast(out > 0, out_grad.dtype)  # relu'(z) from the output: no need for z
    kernel = values[id(layer.kernel)]
    z = ops.matmul(a, kernel) if type(layer) is keras.layers.Dense else layer.convolution_op(a, kernel)
    z = z + values[id(layer.bias)] if layer.use_bias else z
    return _activation_vjp(layer.activation, z, out_grad)  # the activation's derivative


def _activation_vjp(activation, z, cotangent):
    """`cotangent * activation'(z)`, with the backend's own autodiff."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(z)
            activated = activation(z)
        return tape.gradient(activated, z, output_gradients=cotangent)
    if backend == "jax":
        import jax

        return jax.vjp(activation, z)[1](cotangent)[0]
    import torch

    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        return torch.autograd.grad(activation(z), z, grad_outputs=cotangent)[0]


class DenseRule(_Rule):
    """`z = a W + b` on `[B, features]` inputs: kernel rows `a_i d_i^T`, bias rows `d_i`."""

    def __init__(self, layer, a, delta):
        self.layer, self.a, self.delta = layer, a, delta

    @classmethod
    def capture(cls, layer, a, out, grads, values):
        return cls(layer, a, _pre_activation_gradient(layer, a, out, grads, values))

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
        inputs = _f64(ops.matmul(self.a, ops.transpose(self.a))) + (1.0 if self.layer.use_bias else 0.0)
        return inputs * _f64(ops.matmul(self.delta, ops.transpose(self.delta)))

    def cross(self, shared):
        a, delta = _f64(self.a), _f64(self.delta)
        u = ops.sum(ops.matmul(a, _f64(shared[id(self.layer.kernel)])) * delta, axis=1)  # a_i^T r_W d_i
        if self.layer.use_bias:
            u = u + ops.matmul(delta, _f64(shared[id(self.layer.bias)]))
        return u


class ConvolutionRule(_Rule):
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
        rows = _convolution_rows(layer, a, _pre_activation_gradient(layer, a, out, grads, values))
        return None if rows is None else cls(layer, *rows)

    def rebuilt(self):
        return ops.sum(self.bias_rows if self.layer.use_bias else self.kernel_rows, axis=0)

    def rows(self):
        kernel_rows = ops.reshape(self.kernel_rows, [-1, *self.layer.kernel.shape])
        return [kernel_rows, self.bias_rows] if self.layer.use_bias else [kernel_rows]


def _convolution_rows(layer, a, delta):
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


class EmbeddingRule(_Rule):
    """An Embedding on integer ids of any rank: row `v` of example `i` sums `d_is` over its positions with id `v`.

    The rows are dense, `[B, input_dim, output_dim]` (a scatter-add). The Gram
    share needs no rows: `K_ij = sum_{s,t} [id_is = id_jt] <d_is, d_jt>`, a
    `[B S, B S]` product of the output gradients masked by id equality
    (`O(B^2 S^2 D)` for `S` positions per example), taken where it costs less
    than the rows' `O(B^2 V D)` (`S^2 < V`, the vocabulary size; both give the
    same `K`).
    """

    def __init__(self, layer, ids, out_grad):
        self.layer = layer
        batch = ops.shape(ids)[0]
        vocabulary = layer.input_dim
        if ids.dtype not in ("int32", "int64"):
            ids = ops.cast(ids, "int32")  # as Embedding.call
        ids = ops.where(ids < 0, ids + vocabulary, ids)  # as ops.take: -1 is the last row
        self.ids = ops.reshape(ids, [batch, -1])  # [B, S]
        self.d = ops.reshape(out_grad, [batch, -1, layer.output_dim])  # [B, S, D]

    @classmethod
    def capture(cls, layer, a, out, grads, values):
        return cls(layer, a, grads.output)

    @staticmethod
    def covers(layer, input_shape):
        return len(input_shape) >= 2  # ids of any rank >= 1 after the batch axis

    @staticmethod
    def variables(layer):
        return [layer.embeddings]

    @staticmethod
    def checked(layer):
        return layer.embeddings

    def rebuilt(self):
        d = ops.reshape(self.d, [-1, self.layer.output_dim])
        return ops.segment_sum(d, ops.reshape(self.ids, [-1]), num_segments=self.layer.input_dim)

    def rows(self):
        batch, vocabulary, dim = ops.shape(self.ids)[0], self.layer.input_dim, self.layer.output_dim
        offsets = ops.expand_dims(ops.arange(batch, dtype=self.ids.dtype) * vocabulary, 1)
        segments = ops.reshape(self.ids + offsets, [-1])  # example i's row v is segment i V + v
        table = ops.segment_sum(ops.reshape(self.d, [-1, dim]), segments, num_segments=batch * vocabulary)
        return [ops.reshape(table, [batch, vocabulary, dim])]

    def gram(self):
        positions = self.ids.shape[1]
        if positions is None or positions * positions >= self.layer.input_dim:
            return super().gram()
        batch = ops.shape(self.ids)[0]
        ids = ops.reshape(self.ids, [-1])
        d = ops.reshape(self.d, [-1, self.layer.output_dim])
        same = ops.cast(ops.equal(ops.expand_dims(ids, 1), ops.expand_dims(ids, 0)), "float64")
        products = _f64(ops.matmul(d, ops.transpose(d))) * same  # [B S, B S]
        return ops.sum(ops.reshape(products, [batch, positions, batch, positions]), axis=(1, 3))

    def cross(self, shared):
        r = ops.take(_f64(shared[id(self.layer.embeddings)]), self.ids, axis=0)  # [B, S, D]: r at each id
        return ops.sum(_f64(self.d) * r, axis=(1, 2))


class LayerNormalizationRule(_Rule):
    """`y = gamma x + beta` with `x` the normalised input: rows summed over the positions outside `axis`."""

    def __init__(self, layer, a, out_grad):
        self.layer = layer
        rank = len(a.shape)
        axes = sorted(k % rank for k in layer.axis)
        x = ops.cast(a, keras.backend.result_type(a.dtype, "float32"))  # as ops.layer_normalization
        mean, variance = ops.moments(x, axes=axes, keepdims=True)
        normalized = ops.cast((x - mean) * ops.rsqrt(variance + layer.epsilon), out_grad.dtype)
        positions = [k for k in range(1, rank) if k not in axes]  # the rows keep the batch axis and `axis`
        self.gamma_rows = _reduce_sum(normalized * out_grad, positions) if layer.scale else None
        self.beta_rows = _reduce_sum(out_grad, positions) if layer.center else None

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


_RULES = {
    keras.layers.Dense: DenseRule,
    keras.layers.Conv1D: ConvolutionRule,
    keras.layers.Conv2D: ConvolutionRule,
    keras.layers.Embedding: EmbeddingRule,
    keras.layers.LayerNormalization: LayerNormalizationRule,
}
