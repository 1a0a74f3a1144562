"""The backend interface on PyTorch: autograd, `torch.func`, eager steps, a refusal of DDP.

See `keras_noisygd._backend` for the interface. PyTorch runs a train step
eagerly (or under `torch.compile`), so a batch size is a Python int and a
run-time check can raise at once.
"""

from __future__ import annotations

import torch
import torch.func
from keras import ops

from keras_noisygd._backend._common import DrawRecordBase, no_summaries

NAME = "torch"
STATELESS = False
LAYER_ROWS = True
VMAP_FORWARD = False  # torch.func.vmap cannot run Keras's Conv2D forward ("NYI: Tensor.clone(memory_format)")
SCALAR_SUMMARIES = False

COUNTER_DTYPE = "int64"
SEED_DTYPE = "int64"
WORD_DTYPE = "int64"  # no uint32 arithmetic: int64 words masked to 32 bits

_MASK = 0xFFFFFFFF


def wide_float():
    return "float64"


# -- the generator's word arithmetic (int64 words in [0, 2**32)) ------------------


def wrap(x):
    return x & _MASK


def shift_left(x, r):
    return x << r


def shift_right(x, r):
    return x >> r


def sort_keys(keys):
    return keys


def host_tensor(array):
    """A NumPy array of a host draw as a CPU tensor, sharing its memory (without `ops.convert_to_tensor`'s checks)."""
    return torch.from_numpy(array)


def to_host(tensor):
    """A CPU tensor's values as a NumPy array, sharing its memory (without `ops.convert_to_numpy`'s tree walk)."""
    return tensor.detach().numpy()


def draws_on_host(key):
    """NumPy on the host for an eager draw on a CPU: ~150 small operations cost ~3 us each as PyTorch
    dispatches, under 1 us in NumPy; the bits are the same (integer arithmetic)."""
    return key.device.type == "cpu" and not torch.compiler.is_compiling()


# -- gradients ------------------------------------------------------------------


def gradients(loss_fn, variables):
    """Autograd of `loss_fn()` at the values of `variables()` (zeros for unused ones)."""
    value = loss_fn()
    tensors = [v.value for v in variables()]
    return list(torch.autograd.grad(value, tensors, allow_unused=True, materialize_grads=True))


def apply_gradients(optimizer, gradients, variables):
    """`optimizer.apply_gradients`, outside autograd, as `TorchTrainer` does."""
    with torch.no_grad():
        optimizer.apply_gradients(zip(gradients, variables))


def accumulate_across_replicas(optimizer, grads, variables):
    return False  # Keras's own accumulation runs (distributed data parallel is refused)


def assign_add(variable, delta):
    """`variable.assign_add(delta)` (`delta` a NumPy array): in place on its tensor in an eager step, as
    Keras's own PyTorch optimizers update their variables (Keras's `assign_add` dispatches several operations)."""
    if torch.compiler.is_compiling():
        variable.assign_add(ops.convert_to_tensor(delta))
        return
    with torch.no_grad():
        variable.value.add_(torch.as_tensor(delta, device=variable.value.device))


def run_if(condition, function):
    """`function()` where `condition` holds (the step is eager)."""
    if bool(condition):
        function()


def gradients_at(forward, trainable):
    """See the TensorFlow module; the caller detaches what `forward` kept."""
    with torch.enable_grad():
        total, regularization, targets, kept = forward()
        target_grads = torch.autograd.grad(
            total, targets, retain_graph=regularization is not None, allow_unused=True, materialize_grads=True
        )
        reg_grads = None
        if regularization is not None:
            reg_grads = list(torch.autograd.grad(regularization, trainable, allow_unused=True, materialize_grads=True))
    return list(target_grads), reg_grads, kept


def gradient_point(value):
    return value  # autograd differentiates at any tensor of the graph


def leaf(value):
    """`value` as a leaf of its own autograd graph: what a pass computes from it stays out of the caller's."""
    return value.detach().requires_grad_(True)


def activation_gradient(activation, z, cotangent):
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        return torch.autograd.grad(activation(z), z, grad_outputs=cotangent)[0]


def vjp(f, primals):
    return torch.func.vjp(f, primals, has_aux=True)


grad = torch.func.grad


def vmap(f, in_axes):
    return torch.func.vmap(f, in_dims=in_axes)


# -- run time -------------------------------------------------------------------


def asserted(value, conditions):
    """`value`, or a ValueError with the first failed condition's message (the step is eager)."""
    for ok, message in conditions:
        if not bool(ops.convert_to_numpy(ok)):
            parts = [message] if isinstance(message, str) else message
            raise ValueError(" ".join(str(p if isinstance(p, str) else ops.convert_to_numpy(p)) for p in parts))
    return value


def is_traced(value):
    return False


def compiled(function):
    return function  # eager


def sync_state(model):
    """Nothing to do: the variables hold the trained values."""


# -- eager steps and distribution -----------------------------------------------------


class DrawRecord(DrawRecordBase):
    """A draw counts for the next `apply` of its thread (steps run eagerly)."""

    def _where(self, token):
        return True

    def _same_step(self, drawn, token):
        return True


def num_replicas():
    return 1


def global_batch(batch_size, owner):
    """`(batch_size, None)`; under `torch.distributed` with several processes, a ValueError."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise ValueError(
            f"{owner} does not support PyTorch distributed data parallel yet: each process would draw "
            "the noise of its own batch instead of one draw for the global batch. Train on one process, or "
            "use the JAX backend with `keras.distribution.DataParallel`, or TensorFlow with "
            f"`tf.distribute`. Received: torch.distributed world size {dist.get_world_size()}"
        )
    return batch_size, None


# -- summaries ----------------------------------------------------------------------


def summary_writer(log_dir):
    raise no_summaries(NAME, log_dir)


def write_scalars(writer, step, values):
    raise no_summaries(NAME, None)
