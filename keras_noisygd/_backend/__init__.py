"""The only place that asks which Keras backend runs: one interface, one module per backend.

Everything the package does differently on TensorFlow, JAX and PyTorch sits
behind the names of `INTERFACE`, which `tensorflow.py`, `jax.py` and
`torch.py` each define (a test checks it). Importing this package imports
the module of the backend Keras runs (`keras.backend.backend()`), and only
that one, so the package imports without TensorFlow on JAX and PyTorch.
Code elsewhere writes `_backend.gradients(...)`, never
`if keras.backend.backend() == ...`.

The interface, by concern:

* **What the backend is and can do.** `NAME`; `STATELESS`: the trainer passes
  the variables' values in and out of a compiled step (JAX), so a compiled
  function must take values, never read variables; `LAYER_ROWS`: one
  batched pass gives the gradient at each layer's output (all three);
  `VMAP_FORWARD`: `vmap` runs every Keras forward pass (not PyTorch's
  `torch.func.vmap`, which cannot run Conv2D's); `SCALAR_SUMMARIES`:
  `tf.summary` writers (TensorFlow).
* **Dtypes.** `COUNTER_DTYPE` of integer optimizer state (the noise
  counter; JAX has no 64-bit integers unless `jax_enable_x64`);
  `SEED_DTYPE` of a stateless seed's words; `WORD_DTYPE` of the generator's
  32-bit words (`int64` masked on PyTorch, which has no `uint32`
  arithmetic); `wide_float()`, float64 where the backend has it.
* **The generator's word arithmetic.** `wrap(x)` (`x mod 2**32`),
  `shift_left(x, r)`, `shift_right(x, r)`, `sort_keys(keys)` (a dtype the
  backend sorts); `draws_on_host(key)`: whether the words are cheaper in
  NumPy (eager PyTorch on a CPU, where each of the ~150 small operations of a
  draw costs its dispatch), `host_tensor(array)` its result as a tensor and
  `to_host(tensor)` an eager CPU tensor's values (both without a copy on PyTorch).
* **Gradients.** `gradients(loss_fn, variables)` and
  `apply_gradients(optimizer, gradients, variables)` of a train step;
  `assign_add(variable, delta)`: the noise counter's advance (in place on
  PyTorch's eager step); `run_if(condition, function)`: an update skipped
  where a check failed;
  `accumulate_across_replicas(optimizer, grads, variables)`: a gradient
  accumulation micro-step where Keras's own cannot run (several
  `tf.distribute` replicas, keras-team/keras#20582), `False` elsewhere;
  `gradients_at(forward, trainable)`: the gradients at tensors computed
  inside one pass (the layer rows), each marked `gradient_point(t)` where it
  is made (JAX adds a zero perturbation there), whose trainable values are
  `leaf(value)`s; `activation_gradient(fn, z, cotangent)`;
  the function transforms `vjp(f, primals)`, `grad(f)`, `vmap(f, in_axes)`
  of JAX and `torch.func` (TensorFlow's engine uses `tf.vectorized_map`
  over a tape instead, in `per_example/tape_engine.py`).
* **Run time.** `asserted(value, conditions)`: `value` after run-time checks
  (raised where the backend can stop at run time); `is_traced(value)`;
  `compiled(function)`; `sync_state(model)`: the trained values back into
  the model's variables (JAX keeps them outside during `fit`).
* **Graph and trace bookkeeping, distribution.** `DrawRecord`: in which
  graph or trace each thread drew noise weights, so that `apply` can tell a
  step that drew none; `global_batch(batch_size, owner)`: the global batch
  size and this replica's offset (`tf.distribute`; PyTorch DDP is refused);
  `num_replicas()`: the replicas whose gradients the optimizer sums.
* **Summaries.** `summary_writer(log_dir)`, `write_scalars(writer, step, values)`.
"""

from __future__ import annotations

import keras

INTERFACE = (
    "NAME", "STATELESS", "LAYER_ROWS", "VMAP_FORWARD", "SCALAR_SUMMARIES",
    "COUNTER_DTYPE", "SEED_DTYPE", "WORD_DTYPE", "wide_float",
    "wrap", "shift_left", "shift_right", "sort_keys", "draws_on_host", "host_tensor", "to_host",
    "gradients", "apply_gradients", "assign_add", "run_if", "accumulate_across_replicas",
    "gradients_at", "gradient_point", "leaf", "activation_gradient", "vjp", "grad", "vmap",
    "asserted", "is_traced", "compiled", "sync_state",
    "DrawRecord", "global_batch", "num_replicas",
    "summary_writer", "write_scalars",
)

_NAME = keras.backend.backend()
if _NAME == "tensorflow":
    from keras_noisygd._backend import tensorflow as _current
elif _NAME == "jax":
    from keras_noisygd._backend import jax as _current
elif _NAME == "torch":
    from keras_noisygd._backend import torch as _current
else:
    raise ImportError(
        "keras_noisygd runs on the TensorFlow, JAX and PyTorch backends of Keras. "
        f"Received: KERAS_BACKEND={_NAME!r}"
    )

NAME = _current.NAME
STATELESS = _current.STATELESS
LAYER_ROWS = _current.LAYER_ROWS
VMAP_FORWARD = _current.VMAP_FORWARD
SCALAR_SUMMARIES = _current.SCALAR_SUMMARIES
COUNTER_DTYPE = _current.COUNTER_DTYPE
SEED_DTYPE = _current.SEED_DTYPE
WORD_DTYPE = _current.WORD_DTYPE
wide_float = _current.wide_float
wrap = _current.wrap
shift_left = _current.shift_left
shift_right = _current.shift_right
sort_keys = _current.sort_keys
draws_on_host = _current.draws_on_host
host_tensor = _current.host_tensor
to_host = _current.to_host
gradients = _current.gradients
apply_gradients = _current.apply_gradients
assign_add = _current.assign_add
run_if = _current.run_if
accumulate_across_replicas = _current.accumulate_across_replicas
gradients_at = _current.gradients_at
gradient_point = _current.gradient_point
leaf = _current.leaf
activation_gradient = _current.activation_gradient
vjp = _current.vjp
grad = _current.grad
vmap = _current.vmap
asserted = _current.asserted
is_traced = _current.is_traced
compiled = _current.compiled
sync_state = _current.sync_state
DrawRecord = _current.DrawRecord
global_batch = _current.global_batch
num_replicas = _current.num_replicas
summary_writer = _current.summary_writer
write_scalars = _current.write_scalars
