"""Per-example gradients of Dense and convolution layers from one batched pass: their rows and `G G^T`.

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
precision, no state, rank-2 Dense inputs, known spatial sizes) and builds a
capture model with the same layers that also returns each layer's input and
output. `gram(...)` and `rows(...)` return `None` (the caller forms `G`) only
where a traced step lost a convolution's spatial sizes. Next to `K` (or the
rows) they return the largest relative difference between the batch gradients rebuilt from the
captured values (the biases', or the kernel's for a layer without a bias)
and the backward pass's own: a layer applied twice, or one whose call is not
`activation(conv_or_matmul(a, W) + b)`, shows there, and the caller forms `G`
instead. Regularization losses enter as in `per_example_gradients`: one
shared gradient `r` added to every row.
"""

from __future__ import annotations

import collections
import itertools
import weakref

import keras
import tensorflow as tf

from keras_noisygd import per_example
from keras_noisygd.gradients import batch_size_of

Plan = collections.namedtuple("Plan", ["capture", "layers"])

# The layer path is used while the batch gradients it rebuilds match the backward pass's to this relative
# error: float32 rounding gives ~1e-7, a layer applied twice or a call the rules do not describe O(1).
TOLERANCE = 1e-4

_PLANS = weakref.WeakKeyDictionary()  # model -> (its trainable variables, its plan)


def cached_plan(model):
    """`plan(model)`, built once per model and set of trainable variables."""
    key = tuple(id(v) for v in model.trainable_variables)
    cached = _PLANS.get(model)
    if cached is None or cached[0] != key:
        cached = _PLANS[model] = (key, plan(model))
    return cached[1]


def plan(model):
    """A `Plan` for the Gram path of `model`, or `None` where it does not apply (forms `G` instead)."""
    layers = [layer for layer in model.layers if layer.trainable_weights]
    if not layers or not all(_supported(layer) for layer in layers):
        return None
    if model.non_trainable_variables:
        return None  # BatchNormalization statistics, seeds of random layers: their batch pass may couple
    covered = {id(v) for layer in layers for v in layer.trainable_weights}
    if covered != {id(v) for v in model.trainable_variables} or len(getattr(model, "outputs", None) or []) != 1:
        return None
    try:
        captured = [(layer.input, layer.output) for layer in layers]
        capture = keras.Model(model.inputs, [model.outputs[0], *captured])
    except (AttributeError, ValueError, TypeError):  # not a graph of layers (a subclassed model), or disconnected
        return None
    for layer, (a, _) in zip(layers, captured):
        if type(layer) is keras.layers.Dense and len(a.shape) != 2:
            return None  # a Dense layer on a sequence sums over positions: its rows are not one outer product
        if None in a.shape[1:]:
            return None  # the convolution rows need the spatial sizes
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


Captured = collections.namedtuple(
    "Captured", ["y_pred", "losses", "layers", "mismatch", "regularization_gradients", "trainable"]
)


def capture(plan_, model, x, y, sample_weight=None, loss=None, data_scale=1.0, regularization_scale=1.0):
    """One batched training-mode pass of the capture model, or `None` (a convolution's sizes unknown).

    Returns a `Captured`: the predictions, the `[B]` per-example losses
    `s_i l_i * data_scale`, for each layer of the plan `(layer, a, d, rows)`
    (`rows`: a convolution's `(kernel rows, bias rows)`, `None` for Dense),
    the `mismatch` of the rebuilt batch gradients, the gradients of the
    regularization losses times `regularization_scale` (one per trainable
    variable, or `None` without regularization) and the trainable values.
    """
    loss_fn = per_example._loss_function(model, loss)
    capture_model = plan_.capture
    values = {id(v): v.value for v in capture_model.trainable_variables}
    trainable = [values[id(v)] for v in model.trainable_variables]
    non_trainable = [v.value for v in capture_model.non_trainable_variables]
    batch_size = batch_size_of(x)
    kernels = [values[id(layer.kernel)] for layer in plan_.layers]
    biases = [values[id(layer.bias)] if layer.use_bias else None for layer in plan_.layers]
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(trainable)
        outputs, _, reg_losses = capture_model.stateless_call(  # no state: `plan` refuses models with any
            [values[id(v)] for v in capture_model.trainable_variables], non_trainable, x, training=True,
            return_losses=True,
        )
        y_pred, captured = outputs[0], outputs[1:]
        dtype = trainable[0].dtype
        losses = tf.cast(loss_fn(y, y_pred, sample_weight, batch_size), dtype) * tf.cast(data_scale, dtype)
        total = tf.reduce_sum(losses)
        regularization = (
            tf.add_n([tf.cast(r, dtype) for r in reg_losses]) * tf.cast(regularization_scale, dtype)
            if reg_losses else None
        )
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
    reg_grads = None
    if regularization is not None:
        reg_grads = tape.gradient(regularization, trainable, unconnected_gradients=zero)
    del tape
    layers = []
    mismatch = tf.constant(0.0, tf.float64)
    for layer, (a, out), out_grad, logit, logit_grad, kernel, bias, checked_grad in zip(
        plan_.layers, captured, out_grads, logits, logit_grads, kernels, biases, checked_grads
    ):
        delta = _pre_activation_gradient(layer, a, out, out_grad, logit, logit_grad, kernel, bias)
        rows = None
        if type(layer) is keras.layers.Dense:
            rebuilt = tf.reduce_sum(delta, axis=0) if bias is not None else tf.matmul(a, delta, transpose_a=True)
        else:
            rows = _convolution_rows(layer, a, delta)
            if rows is None:
                return None
            rebuilt = tf.reduce_sum(rows[1] if bias is not None else rows[0], axis=0)
        error = tf.norm(_f64(rebuilt) - tf.reshape(_f64(checked_grad), tf.shape(rebuilt))) / (
            tf.norm(_f64(checked_grad)) + tf.constant(1e-30, tf.float64)
        )
        mismatch = tf.maximum(mismatch, error)
        layers.append((layer, a, delta, rows))
    return Captured(y_pred, losses, layers, mismatch, reg_grads, trainable)


def _f64(t):
    return tf.cast(t, tf.float64)


def gram(plan_, model, x, y, sample_weight=None, loss=None):
    """`(K, mismatch)` in float64 for the probe batch, or `None` (a convolution's sizes unknown here).

    `K_ij = <G_i, G_j>` for the rows of `per_example_gradients`,
    `G_i = gamma_i + r` (`gamma_i` the gradient of `s_i l_i`, `r` that of the
    regularization losses), so `K = Gamma + u 1^T + 1 u^T + |r|^2` with
    `u_i = <gamma_i, r>`. `mismatch` is the largest relative difference
    between the rebuilt and the true batch gradients of the biases (of the
    kernel, for a layer without one; ~1e-7 in float32 when the path applies).
    """
    captured = capture(plan_, model, x, y, sample_weight, loss)
    if captured is None:
        return None
    batch_size = batch_size_of(x)
    reg = {}  # by variable
    if captured.regularization_gradients is not None:
        reg = {id(v): g for v, g in zip(model.trainable_variables, captured.regularization_gradients)}
    k = tf.zeros([batch_size, batch_size], tf.float64)
    u = tf.zeros([batch_size], tf.float64)  # <gamma_i, r>
    for layer, a, delta, rows in captured.layers:
        kernel, bias = layer.kernel, (layer.bias if layer.use_bias else None)
        if rows is not None:
            kernel_rows, bias_rows = rows
            k += _f64(tf.matmul(kernel_rows, kernel_rows, transpose_b=True))
            if bias is not None:
                k += _f64(tf.matmul(bias_rows, bias_rows, transpose_b=True))
            if reg:
                u += tf.linalg.matvec(_f64(kernel_rows), tf.reshape(_f64(reg[id(kernel)]), [-1]))
                if bias is not None:
                    u += tf.linalg.matvec(_f64(bias_rows), _f64(reg[id(bias)]))
            continue
        # The B x B products in the model's dtype (float32: ~1e-6 relative, like the float32 rows of G),
        # summed in float64; float64 models stay float64 throughout.
        inputs_gram = _f64(tf.matmul(a, a, transpose_b=True)) + (1.0 if bias is not None else 0.0)
        k += inputs_gram * _f64(tf.matmul(delta, delta, transpose_b=True))
        if reg:
            u += tf.reduce_sum(tf.matmul(_f64(a), _f64(reg[id(kernel)])) * _f64(delta), axis=1)  # a_i^T r_W d_i
            if bias is not None:
                u += tf.linalg.matvec(_f64(delta), _f64(reg[id(bias)]))
    if reg:
        r_sq = tf.add_n([tf.reduce_sum(_f64(g) ** 2) for g in reg.values()])
        k += u[:, None] + u[None, :] + r_sq
    return k, captured.mismatch


def rows(plan_, model, x, y, sample_weight=None, loss=None, data_scale=1.0, regularization_scale=1.0):
    """`(G as one [B, *shape] tensor per trainable variable, Captured)`, or `None` (a convolution's sizes unknown)."""
    captured = capture(plan_, model, x, y, sample_weight, loss, data_scale, regularization_scale)
    if captured is None:
        return None
    by_variable = {}
    for layer, a, delta, conv_rows in captured.layers:
        if conv_rows is None:
            kernel_rows, bias_rows = tf.einsum("bi,bo->bio", a, delta), delta
        else:
            kernel_rows = tf.reshape(conv_rows[0], [-1, *layer.kernel.shape])
            bias_rows = conv_rows[1]
        by_variable[id(layer.kernel)] = kernel_rows
        if layer.use_bias:
            by_variable[id(layer.bias)] = bias_rows
    return [by_variable[id(v)] for v in model.trainable_variables], captured


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
