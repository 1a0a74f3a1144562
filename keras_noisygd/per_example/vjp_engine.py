"""The per-example engine on JAX (`jax.vmap`, `jax.vjp`) and PyTorch (`torch.func`), after the layer rows.

`compute` is `per_example.compute` on these backends; TensorFlow's is
`tape_engine.py`. The transforms are `keras_noisygd._backend`'s. Both methods start from one batched training-mode
`model.stateless_call` under a vector-Jacobian product, which gives the
predictions, the new state, the `[B]` losses and the regularization gradient:

* `"vectorized"`: `vmap(grad(loss of one example))` over the examples
  (`"auto"` on JAX, for a model whose training pass changes no state);
* `"jacobian"`: `vmap` of the batched pass's VJP over one-hot cotangents (one
  backward pass per example through the batched forward pass: exact where
  BatchNormalization or Dropout couple the examples; `"auto"` on PyTorch
  always, since `torch.func.vmap` cannot run some Keras forward passes, e.g.
  Conv2D's, while it runs their backward passes).

`chunk_size` runs the `vmap` over that many examples at a time (a Python loop:
the shapes are static). The functions transform values, never variables, so
JAX's stateless train step passes its state in as `values`; called from eager
code on JAX, the computation is compiled once (`jax.jit`) per model and
arguments, with the variables' current values passed in.
"""

from __future__ import annotations

import functools
import re
import weakref

from keras import ops, tree

from keras_noisygd import _backend
from keras_noisygd._batch import batch_size_of
from keras_noisygd.per_example import layer_rows
from keras_noisygd.per_example.result import PerExample, choose_method, weighted_sum


def compute(model, x, y, sample_weight, loss, loss_fn, chunk_size, method, weights, loss_scale, values=None):
    """`per_example.compute` on JAX and PyTorch (see there); `loss` is the user's argument behind `loss_fn`."""
    arguments = (model, x, y, sample_weight, loss_fn, chunk_size, method, weights, loss_scale)
    if values is not None:  # JAX's stateless train step: the layer rows where their check holds (a `cond`)
        if _backend.LAYER_ROWS and method == "auto" and chunk_size is None:
            plan = layer_rows.cached_plan(model)
            fast = None if plan is None else _rows(model, plan, loss, list(values[0]), x, y, sample_weight, weights,
                                                   loss_scale)
            if fast is not None:
                return _checked(model, fast, lambda: _compute(*arguments, values))
        return _compute(*arguments, values)
    values = ([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables])
    traced = _backend.is_traced(values[0][0])  # inside a caller's jax.jit: no host read of the layer path's check
    if _backend.LAYER_ROWS and method == "auto" and chunk_size is None and not traced:
        rows = _layer_rows(model, x, y, sample_weight, loss, weights, loss_scale)
        if rows is not None:
            return rows
    if not _backend.STATELESS or traced:
        return _compute(*arguments, values)
    # JAX, called from eager code: compiled once per model and arguments, with the values passed in (a compiled
    # function that read the variables would keep the values it was traced with).
    compiled, found = _compiled(model, loss, chunk_size, method, weights is None, sample_weight is None, loss_fn)
    outputs = compiled(values, x, y, sample_weight, weights, loss_scale)
    return PerExample(*outputs[:3], found["method"], *outputs[3:])


_COMPILED = weakref.WeakKeyDictionary()  # model -> {arguments: (loss, compiled loss, variables, function, found)}


def _compiled(model, loss, chunk_size, method, no_weights, no_sample_weight, loss_fn):
    """A `jax.jit` of `_compute` for these arguments, and the dict its trace records the method in."""
    cache = _COMPILED.setdefault(model, {})
    key = (chunk_size, method, no_weights, no_sample_weight)
    variables = tuple(id(v) for v in model.variables)
    entry = cache.get(key)
    if entry is None or entry[0] is not loss or entry[1] is not getattr(model, "loss", None) or entry[2] != variables:
        found = {}

        def function(values, x, y, sample_weight, weights, loss_scale):
            result = _compute(model, x, y, sample_weight, loss_fn, chunk_size, method, weights, loss_scale, values)
            found["method"] = result.method
            return (result.gradients, result.regularization_gradients, result.losses, result.y_pred, result.state)

        entry = cache[key] = (loss, getattr(model, "loss", None), variables, _backend.compiled(function), found)
    return entry[3], entry[4]


def _layer_rows(model, x, y, sample_weight, loss, weights, loss_scale):
    """The `PerExample` of the layer rows, or `None` where they do not apply or their check fails (eager code).

    On JAX the pass is compiled once per model and arguments (`jax.jit`), with
    the trainable values passed in; on PyTorch it runs eagerly.
    """
    plan = layer_rows.cached_plan(model)
    if plan is None:
        return None
    trainable = [v.value for v in model.trainable_variables]
    if _backend.STATELESS:
        function = _compiled_rows(model, plan, loss, weights is None, sample_weight is None)
    else:
        function = functools.partial(_rows, model, plan, loss)
    fast = function(trainable, x, y, sample_weight, weights, loss_scale)
    if fast is None or float(fast[-1]) > layer_rows.TOLERANCE:  # one host read of the check
        return None  # a layer applied twice, say: the general method
    gradients, regularization_gradients, losses, y_pred, _ = fast
    unchanged = [None] * len(model.non_trainable_variables)  # the rows exist only where no state changes
    return PerExample(gradients, regularization_gradients, losses, "layers", y_pred, unchanged)


def _checked(model, fast, general):
    """The `PerExample` of the layer rows `fast`, or of `general()` where their check fails (`ops.cond`)."""

    def slow():
        result = general()
        return result.gradients, result.regularization_gradients, result.losses, result.y_pred

    chosen = ops.cond(fast[-1] <= layer_rows.TOLERANCE, lambda: fast[:4], slow)
    unchanged = [None] * len(model.non_trainable_variables)  # the rows exist only where no state changes
    return PerExample(*chosen[:3], "layers", chosen[3], unchanged)


def _rows(model, plan, loss, trainable, x, y, sample_weight, weights, loss_scale):
    """`(rows or their weighted sum, regularization gradients, losses, predictions, mismatch)`, or `None`."""
    fast = layer_rows.per_example_rows(plan, model, x, y, sample_weight, loss, weights, loss_scale, trainable)
    if fast is None:
        return None
    gradients, captured = fast
    return gradients, captured.regularization_gradients, captured.losses, captured.y_pred, captured.mismatch


_COMPILED_ROWS = weakref.WeakKeyDictionary()  # model -> {arguments: (plan, loss, compiled loss, function)}


def _compiled_rows(model, plan, loss, no_weights, no_sample_weight):
    cache = _COMPILED_ROWS.setdefault(model, {})
    key = (no_weights, no_sample_weight)
    entry = cache.get(key)
    if entry is None or entry[0] is not plan or entry[1] is not loss or entry[2] is not getattr(model, "loss", None):
        function = _backend.compiled(functools.partial(_rows, model, plan, loss))
        entry = cache[key] = (plan, loss, getattr(model, "loss", None), function)
    return entry[3]


def _compute(model, x, y, sample_weight, loss_fn, chunk_size, method, weights, loss_scale, values):
    vjp, grad, vmap = _backend.vjp, _backend.grad, _backend.vmap
    trainable, non_trainable = list(values[0]), list(values[1])
    x, y = tree.map_structure(ops.convert_to_tensor, (x, y))  # vmap takes tensors
    sample_weight = None if sample_weight is None else ops.convert_to_tensor(sample_weight)
    batch_size = batch_size_of(x)  # a Python int: static shapes on both backends
    dtype = trainable[0].dtype
    scale = ops.cast(loss_scale, dtype)
    # With weights, the 1/B of the weighted mean goes into the backward pass (as on TensorFlow).
    data_scale = scale if weights is None else scale / batch_size
    found = {}

    def batched(trainable):
        y_pred, new_state, reg_losses = model.stateless_call(
            trainable, non_trainable, x, training=True, return_losses=True
        )
        losses = ops.cast(loss_fn(y, y_pred, sample_weight, batch_size), dtype) * data_scale
        found["regularized"] = bool(reg_losses)
        regularization = sum(ops.cast(r, dtype) for r in reg_losses) * scale if reg_losses else ops.zeros((), dtype)
        # The values a step does not change come back as the very objects passed in (here, not under the VJP).
        found["changed"] = [new is not old for new, old in zip(new_state, non_trainable)]
        return (losses, regularization), (y_pred, new_state)

    (losses, regularization), backward, (y_pred, new_state) = vjp(batched, trainable)
    new_state = [new if changed else None for new, changed in zip(new_state, found["changed"])]
    if method == "auto" and not _backend.VMAP_FORWARD:
        # `torch.func.vmap` cannot run some of Keras's PyTorch forward passes (Conv2D clones its input to
        # channels_last: "NYI ... inside vmap"); it runs every backward pass, so PyTorch takes the Jacobian.
        method = "jacobian"
    method = choose_method(method, any(found["changed"]))
    regularization_gradients = None
    if found["regularized"]:
        regularization_gradients = list(backward((ops.zeros_like(losses), ops.ones_like(regularization)))[0])

    if method == "jacobian":
        zero = ops.zeros_like(regularization)

        def run(start, stop):
            cotangents = ops.one_hot(ops.arange(start, stop), batch_size, dtype=losses.dtype)
            return vmap(lambda c: list(backward((c, zero))[0]), 0)(cotangents)

    else:

        def one_example(trainable, xi, yi, si):
            xi, yi, si = tree.map_structure(lambda t: ops.expand_dims(t, 0), (xi, yi, si))  # a batch of one
            pred, _ = model.stateless_call(trainable, non_trainable, xi, training=True)
            return ops.cast(loss_fn(yi, pred, si, batch_size)[0], dtype) * data_scale

        weights_of_rows = sample_weight if sample_weight is not None else ops.ones([batch_size], dtype)
        per_row = vmap(grad(one_example), (None, 0, 0, 0))

        def run(start, stop):
            rows = tree.map_structure(lambda t: t[start:stop], (x, y, weights_of_rows))
            try:
                return list(per_row(trainable, *rows))
            except RuntimeError as error:
                lines = [line for line in str(error).splitlines() if "vmap" in line]
                if not lines:
                    raise
                reason = re.sub(r"\x1b\[[0-9;]*m", "", lines[0]).strip()  # Keras wraps the message in bold
                raise ValueError(
                    "Argument `method='vectorized'` runs the model's forward pass under `torch.func.vmap`, which "
                    f"does not support an operation of this model ({reason}). Use "
                    "method='jacobian' or 'auto'. Received: method='vectorized'"
                ) from error

    gradients = _over_chunks(run, batch_size, chunk_size, weights)
    return PerExample(gradients, regularization_gradients, losses, method, y_pred, new_state)


def _over_chunks(run, batch_size, chunk_size, weights):
    """`G`, or `sum_i weights_i G_i`, from `run(start, stop)` (the rows of examples `start:stop`)."""
    step = batch_size if chunk_size is None else chunk_size
    total = None
    parts = []
    for start in range(0, batch_size, step):
        stop = min(start + step, batch_size)
        rows = run(start, stop)
        if weights is None:
            parts.append(rows)
            continue
        part = weighted_sum(weights[start:stop], rows)
        total = part if total is None else [a + b for a, b in zip(total, part)]
    if weights is not None:
        return total
    return parts[0] if len(parts) == 1 else [ops.concatenate(chunk, axis=0) for chunk in zip(*parts)]
