"""The noise draw's bookkeeping on JAX and PyTorch (TensorFlow's is `_tf_bookkeeping`).

Same functions as `_tf_bookkeeping`. On JAX a train step is traced once with
static shapes, so the batch size is a Python int; PyTorch runs eagerly. A
JAX multi-device step (`keras.distribution.DataParallel`) sees the global
batch as one sharded array, so one draw over it is already the global draw.
"""

from __future__ import annotations

import threading

import keras

from keras_noisygd._checks import check_int


def gradients(loss_fn, variables):
    """The gradients of `loss_fn()` with respect to `variables()`: PyTorch autograd, or `jax.grad`."""
    if keras.backend.backend() == "jax":
        import jax

        listed = variables()  # JAX needs them before the forward pass: the model must be built

        def of_values(values):
            with keras.StatelessScope(state_mapping=list(zip(listed, values))):
                return loss_fn()

        return jax.grad(of_values)([v.value for v in listed])
    import torch

    value = loss_fn()
    tensors = [v.value for v in variables()]
    return list(torch.autograd.grad(value, tensors, allow_unused=True, materialize_grads=True))


def apply_gradients(optimizer, gradients, variables):
    """`optimizer.apply_gradients` of the step (PyTorch: outside autograd, as `TorchTrainer` does)."""
    import torch

    with torch.no_grad():
        optimizer.apply_gradients(zip(gradients, variables))


def num_replicas():
    """Replicas that each see a part of the batch and sum their gradients: 1 (see `global_batch`)."""
    return 1


def checked_batch_size(batch_size):
    """`batch_size`, refused now if empty (it is a Python int on JAX and PyTorch)."""
    return check_int("batch_size", batch_size, 1)


class DrawnGraphs:
    """What each thread drew weights in since its last `apply`: a JAX trace or eager code.

    `mark(token)` records the noise state's value read by the draw: a tracer
    inside JAX's compiled step, a concrete array outside it. PyTorch runs
    eagerly, so there a draw counts for the next `apply` of its thread.
    """

    def __init__(self):
        self._drawn = {}

    def mark(self, token):
        self._drawn[threading.get_ident()] = _traced(token)

    def pop(self):
        return self._drawn.pop(threading.get_ident(), None)


def _traced(value):
    if keras.backend.backend() != "jax":
        return False
    import jax

    return isinstance(value, jax.core.Tracer)


def drawn_in_enclosing_graph(drawn, token):
    """Whether the weights were drawn in the step that applies them (the same JAX trace, or eagerly)."""
    return drawn is not None and drawn == _traced(token)


def global_batch(batch_size, optimizer_name):
    """`(batch_size, None)`: the step's batch is the global batch (PyTorch DDP is refused)."""
    if keras.backend.backend() == "torch":
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise ValueError(
                f"{optimizer_name} does not support PyTorch distributed data parallel yet: each process would draw "
                "the noise of its own batch instead of one draw for the global batch. Train on one process, or "
                "use the JAX backend with `keras.distribution.DataParallel`, or TensorFlow with "
                f"`tf.distribute`. Received: torch.distributed world size {dist.get_world_size()}"
            )
    return batch_size, None
