"""The Gram matrix `K = G G^T` of the per-example gradients without forming `G`: Dense and convolutions.

For a Dense layer `z = a W + b`, example `i`'s gradient is `W_i = a_i d_i^T`
and `b_i = d_i`, with `a_i` the layer's input and `d_i = dl_i / dz_i`. So

    <G_i, G_j> = sum over Dense layers of (<a_i, a_j> + [bias]) * <d_i, d_j>

(Goodfellow 2015, arXiv 1510.01799; the "ghost norm" of Li et al. 2022): one
batched forward and backward pass and `O(B^2 (p + q))` per layer, instead of
`B x d` rows. A convolution's rows are small (`kernel.size` values): they
are formed from its input and `d`, one batched matmul per kernel offset, and
multiplied out. This holds when every example's loss depends on its own row
only (no batch statistics) and each layer is applied once (a Dense layer to
a rank-2 input).

`plan(model)` checks what it can before any data (every trainable variable a
Dense or Conv1D/Conv2D layer's kernel or bias, one output, no mixed
precision) and builds a capture model with the same layers that also returns
each layer's input and output. `gram(...)` then checks the rest on the traced
step (no state update, rank-2 Dense inputs, known spatial sizes: otherwise it
returns `None` and the caller forms `G`), and returns, next to `K`, the
largest relative difference between the batch gradients rebuilt from the
captured values (the biases', or the kernel's for a layer without a bias)
and the backward pass's own: a layer applied twice, or one whose call is not
`activation(conv_or_matmul(a, W) + b)`, shows there, and the caller forms `G`
instead. Regularization losses enter as in `per_example_gradients`: one
shared gradient `r` added to every row.
"""

from __future__ import annotations

import collections
import itertools

import keras
import tensorflow as tf

from keras_noisygd import per_example
from keras_noisygd.gradients import batch_size_of

Plan = collections.namedtuple("Plan", ["capture", "layers"])


def plan(model):
    """A `Plan` for the Gram path of `model`, or `None` where it does not apply (forms `G` instead)."""
    layers = [layer for layer in model.layers if layer.trainable_weights]
    if not layers or not all(_supported(layer) for layer in layers):
        return None
    covered = {id(v) for layer in layers for v in layer.trainable_weights}
    if covered != {id(v) for v in model.trainable_variables} or len(getattr(model, "outputs", None) or []) != 1:
        return None
    try:
        capture = keras.Model(
            model.inputs, [model.outputs[0], *[(layer.input, layer.output) for layer in layers]]
        )
    except (AttributeError, ValueError, TypeError):  # not a graph of layers (a subclassed model), or disconnected
        return None
    return Plan(capture, layers)


def _supported(layer):
    """A Dense layer, or a Conv1D/Conv2D (channels last, no dilation or groups), computing as it says."""
    if type(layer) is keras.layers.Dense:
        kind_ok = True
    elif type(layer) in (keras.layers.Conv1D, keras.layers.Conv2D):
        kind_ok = (
            layer.data_format == "channels_last" and layer.padding in ("valid", "same")
            and all(d == 1 for d in layer.dilation_rate) and layer.groups == 1
        )
    else:
        return False
    return (
        kind_ok
        and not getattr(layer, "lora_enabled", False)
        and getattr(layer, "quantization_mode", None) is None
        and layer.compute_dtype == layer.variable_dtype
        and len(layer.trainable_weights) == (2 if layer.use_bias else 1)
    )


def gram(plan_, model, x, y, sample_weight=None, loss=None):
    """`(K, mismatch)` in float64 for the probe batch, or `None` if the model's examples are coupled.

    `K_ij = <G_i, G_j>` for the rows of `per_example_gradients`,
    `G_i = gamma_i + r` (`gamma_i` the gradient of `s_i l_i`, `r` that of the
    regularization losses), so `K = Gamma + u 1^T + 1 u^T + |r|^2` with
    `u_i = <gamma_i, r>`. `mismatch` is the largest relative difference
    between the rebuilt and the true batch gradients of the biases (of the
    kernel, for a layer without one; ~1e-7 in float32 when the path applies).
    """
    loss_fn = per_example._loss_function(model, loss)
    capture = plan_.capture
    values = {id(v): v.value for v in capture.trainable_variables}
    trainable = [values[id(v)] for v in capture.trainable_variables]
    non_trainable = [v.value for v in capture.non_trainable_variables]
    batch_size = batch_size_of(x)
    kernels = [values[id(layer.kernel)] for layer in plan_.layers]
    biases = [values[id(layer.bias)] if layer.use_bias else None for layer in plan_.layers]
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(trainable)
        outputs, new_state, reg_losses = capture.stateless_call(
            trainable, non_trainable, x, training=True, return_losses=True
        )
        y_pred, captured = outputs[0], outputs[1:]
        total = tf.reduce_sum(loss_fn(y, y_pred, sample_weight, batch_size))
        regularization = tf.add_n(reg_losses) if reg_losses else None
    if any(new is not old for new, old in zip(new_state, non_trainable)):
        return None  # batch statistics or random layers: the examples are coupled, form G
    if any(len(a.shape) != 2 for layer, (a, _) in zip(plan_.layers, captured) if type(layer) is keras.layers.Dense):
        return None  # a Dense layer on a sequence sums over positions: its rows are not one outer product
    zero = tf.UnconnectedGradients.ZERO
    outs = [out for _, out in captured]
    # Keras's softmax and sigmoid keep their input on the output, and its crossentropies read the loss from
    # those logits (the pre-activation z): the loss then reaches z directly, not through the output.
    logits = [getattr(out, "_keras_logits", out) for out in outs]
    n = len(outs)
    # The check compares each layer's bias gradient (its kernel's, without a bias: costlier) with the one
    # rebuilt from the captured values.
    checked = [bias if bias is not None else kernel for kernel, bias in zip(kernels, biases)]
    grads = tape.gradient(total, outs + logits + checked, unconnected_gradients=zero)
    out_grads, logit_grads, checked_grads = grads[:n], grads[n : 2 * n], grads[2 * n :]
    reg_grads = {}
    if regularization is not None:
        reg_vars = [v for v in kernels + biases if v is not None]
        reg_grads = dict(zip(map(id, reg_vars), tape.gradient(regularization, reg_vars, unconnected_gradients=zero)))
    del tape
    f64 = lambda t: tf.cast(t, tf.float64)  # noqa: E731
    k = tf.zeros([batch_size, batch_size], tf.float64)
    u = tf.zeros([batch_size], tf.float64)  # <gamma_i, r>
    r_sq = tf.constant(0.0, tf.float64)  # |r|^2
    mismatch = tf.constant(0.0, tf.float64)
    for layer, (a, out), out_grad, logit, logit_grad, kernel, bias, checked_grad in zip(
        plan_.layers, captured, out_grads, logits, logit_grads, kernels, biases, checked_grads
    ):
        delta = _pre_activation_gradient(layer, a, out, out_grad, logit, logit_grad, kernel, bias)
        if type(layer) is not keras.layers.Dense:
            rows = _convolution_rows(layer, a, delta)
            if rows is None:
                return None
            kernel_rows, bias_rows = rows
            rebuilt = tf.reduce_sum(bias_rows if bias is not None else kernel_rows, axis=0)
            error = tf.norm(f64(rebuilt - tf.reshape(checked_grad, [-1]))) / (
                tf.norm(f64(checked_grad)) + tf.constant(1e-30, tf.float64)
            )
            mismatch = tf.maximum(mismatch, error)
            k += f64(tf.matmul(kernel_rows, kernel_rows, transpose_b=True))
            if bias is not None:
                k += f64(tf.matmul(bias_rows, bias_rows, transpose_b=True))
            if reg_grads:
                u += tf.linalg.matvec(f64(kernel_rows), tf.reshape(f64(reg_grads[id(kernel)]), [-1]))
                r_sq += tf.reduce_sum(f64(reg_grads[id(kernel)]) ** 2)
                if bias is not None:
                    u += tf.linalg.matvec(f64(bias_rows), f64(reg_grads[id(bias)]))
                    r_sq += tf.reduce_sum(f64(reg_grads[id(bias)]) ** 2)
            continue
        rebuilt = tf.reduce_sum(delta, axis=0) if bias is not None else tf.matmul(a, delta, transpose_a=True)
        error = tf.norm(f64(rebuilt - checked_grad)) / (tf.norm(f64(checked_grad)) + tf.constant(1e-30, tf.float64))
        mismatch = tf.maximum(mismatch, error)
        # The B x B products in the model's dtype (float32: ~1e-6 relative, like the float32 rows of G),
        # summed in float64; float64 models stay float64 throughout.
        inputs_gram = f64(tf.matmul(a, a, transpose_b=True)) + (1.0 if bias is not None else 0.0)
        k += inputs_gram * f64(tf.matmul(delta, delta, transpose_b=True))
        if reg_grads:
            a64, d64 = f64(a), f64(delta)
            r_kernel = f64(reg_grads[id(kernel)])
            u += tf.reduce_sum(tf.matmul(a64, r_kernel) * d64, axis=1)  # a_i^T r_W d_i
            r_sq += tf.reduce_sum(r_kernel**2)
            if bias is not None:
                r_bias = f64(reg_grads[id(bias)])
                u += tf.linalg.matvec(d64, r_bias)
                r_sq += tf.reduce_sum(r_bias**2)
    if reg_grads:
        k += u[:, None] + u[None, :] + r_sq
    return k, mismatch


def _pre_activation_gradient(layer, a, out, out_grad, logit, logit_grad, kernel, bias):
    """`d_i = dl_i / dz_i` at `z = a W + b`, from the gradients at the layer's output and at its logits."""
    if layer.activation is keras.activations.linear:
        delta = out_grad
    elif layer.activation is keras.activations.relu:
        delta = out_grad * tf.cast(out > 0, out_grad.dtype)  # relu'(z) from the output: no need for z
    else:
        if logit is not out:
            z = logit
        else:
            z = tf.matmul(a, kernel) if type(layer) is keras.layers.Dense else layer.convolution_op(a, kernel)
            z = z + bias if bias is not None else z
        with tf.GradientTape() as inner:
            inner.watch(z)
            activated = layer.activation(z)
        delta = inner.gradient(activated, z, output_gradients=out_grad)
    return delta + logit_grad if logit is not out else delta


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
    if layer.padding == "same":  # TensorFlow's SAME: the extra row or column goes after
        pads = []
        for n, k, s, o in zip(in_size, layer.kernel_size, layer.strides, out_size):
            total = max((o - 1) * s + k - n, 0)
            pads.append([total // 2, total - total // 2])
        a = tf.pad(a, [[0, 0], *pads, [0, 0]])
    positions = 1
    for o in out_size:
        positions *= o
    d = tf.reshape(delta, [-1, positions, delta.shape[-1]])
    rows = []
    for offset in itertools.product(*[range(k) for k in layer.kernel_size]):
        begin = [0, *offset, 0]
        end = [0, *[o + (n - 1) * s + 1 for o, n, s in zip(offset, out_size, layer.strides)], 0]
        strides = [1, *layer.strides, 1]
        shifted = tf.strided_slice(a, begin, end, strides, begin_mask=1, end_mask=1 | (1 << (rank + 1)))
        patch = tf.reshape(shifted, [-1, positions, a.shape[-1]])
        rows.append(tf.matmul(patch, d, transpose_a=True))  # [B, in channels, filters]
    kernel_rows = tf.reshape(tf.stack(rows, axis=1), [tf.shape(delta)[0], -1])
    return kernel_rows, tf.reduce_sum(d, axis=1)
