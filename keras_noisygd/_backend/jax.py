"""The backend interface on JAX: function transforms, traces and the stateless trainer.

See `keras_noisygd._backend` for the interface. JAX's `fit` compiles
`train_step(state, data)` with every variable's value passed in and out, and
traces it with static shapes, so batch sizes are Python ints here. A
multi-device step (`keras.distribution.DataParallel`) sees the global batch
as one sharded array: one draw over it is already the global draw.
"""

from __future__ import annotations

import contextlib
import threading

import jax
import jax.numpy as jnp
import keras
import numpy as np

from keras_noisygd._backend._common import DrawRecordBase, no_summaries

NAME = "jax"
STATELESS = True
LAYER_ROWS = True  # gradients at intermediate values: zero perturbations there (`gradient_point`)
VMAP_FORWARD = True
SCALAR_SUMMARIES = False

COUNTER_DTYPE = "int32"  # no 64-bit integers unless jax_enable_x64 is set
SEED_DTYPE = "uint32"
WORD_DTYPE = "uint32"


def wide_float():
    """float64 only where `jax_enable_x64` is set; float32 otherwise."""
    return "float64" if jax.config.jax_enable_x64 else "float32"


# -- the generator's word arithmetic (uint32 words) ---------------------------


def wrap(x):
    return x


def shift_left(x, r):
    return x << r


def shift_right(x, r):
    return x >> r


def sort_keys(keys):
    return keys


def host_tensor(array):
    """A NumPy array as a tensor (no draw runs on the host here)."""
    return jnp.asarray(array)


def to_host(tensor):
    """An eager tensor's values as a NumPy array."""
    return np.asarray(tensor)


def draws_on_host(key):
    return False  # a traced or compiled step: the words stay in the graph


# -- gradients ------------------------------------------------------------------


def gradients(loss_fn, variables):
    """`jax.grad` of `loss_fn()` over the values of `variables()`, mapped in a `StatelessScope`."""
    listed = variables()  # JAX needs them before the forward pass: the model must be built

    def of_values(values):
        with keras.StatelessScope(state_mapping=list(zip(listed, values))):
            return loss_fn()

    return jax.grad(of_values)([v.value for v in listed])


def apply_gradients(optimizer, gradients, variables):
    optimizer.apply_gradients(zip(gradients, variables))


def accumulate_across_replicas(optimizer, grads, variables):
    return False  # Keras's own accumulation runs (several devices included: the step sees the global batch)


def assign_add(variable, delta):
    """`variable.assign_add(delta)` (`delta` a NumPy array)."""
    variable.assign_add(delta)


def run_if(condition, function):
    """`function()` where `condition` holds. Inside `jax.jit` it always runs: the step that called the
    optimizer keeps its old values where the condition fails (`train_step.jax`)."""
    if is_traced(condition):
        function()
    elif bool(condition):
        function()


class _Points:
    """The gradient points of one pass of `gradients_at`: their shapes, and the zero perturbation at each."""

    def __init__(self, perturbations=None):
        self.perturbations = perturbations  # None: the abstract pass that finds their shapes
        self.shapes, self.index, self.alive = [], {}, []

    def add(self, value):
        k = len(self.shapes)
        self.shapes.append(jax.ShapeDtypeStruct(value.shape, value.dtype))
        point = value if self.perturbations is None else value + self.perturbations[k]
        self.index[id(value)] = self.index[id(point)] = k
        self.alive.extend((value, point))  # kept alive: no other array takes their ids during the pass
        return point


_ACTIVE = threading.local()


@contextlib.contextmanager
def _pass(perturbations=None):
    previous = getattr(_ACTIVE, "points", None)
    _ACTIVE.points = points = _Points(perturbations)
    try:
        yield points
    finally:
        _ACTIVE.points = previous


def gradient_point(value):
    """`value` plus the zero perturbation of its place in the pass `gradients_at` runs (`value` outside one).

    JAX differentiates with respect to a function's inputs only; the gradient
    with respect to a zero perturbation added at an intermediate value is the
    gradient at that value.
    """
    points = getattr(_ACTIVE, "points", None)
    return value if points is None else points.add(value)


def gradients_at(forward, trainable):
    """See the TensorFlow module. Every target and trainable value must be a `gradient_point` of `forward`,
    and `forward` must use a trainable value only through its point (as `stateless_call` does with the
    values it is passed).

    An abstract pass (`jax.eval_shape`: no computation) finds the points'
    shapes; one `jax.vjp` with respect to a zero perturbation at each gives
    the gradients of the total, and of the regularization, at all of them.
    `kept` comes out of the VJP's trace as its auxiliary outputs, one array
    per distinct array (the rules tell a logit from an output by identity).
    """

    def find_shapes():
        with _pass() as points:
            forward()
        found.extend(points.shapes)

    found, layout = [], {}
    jax.eval_shape(find_shapes)

    def of_perturbations(perturbations):
        with _pass(perturbations) as points:
            total, regularization, targets, kept = forward()
            layout["targets"] = [points.index[id(t)] for t in targets]
            layout["trainable"] = [points.index.get(id(t)) for t in trainable]
        leaves = keras.tree.flatten(kept)
        distinct = {}
        layout["kept"] = (kept, [distinct.setdefault(id(leaf), (len(distinct), leaf))[0] for leaf in leaves])
        layout["regularized"] = regularization is not None
        regularization = jnp.zeros((), total.dtype) if regularization is None else regularization
        return (total, regularization), [leaf for _, leaf in distinct.values()]

    zeros = [jnp.zeros(shape.shape, shape.dtype) for shape in found]
    (total, regularization), backward, distinct = jax.vjp(of_perturbations, zeros, has_aux=True)
    (at_points,) = backward((jnp.ones_like(total), jnp.zeros_like(regularization)))
    target_grads = [at_points[k] for k in layout["targets"]]
    reg_grads = None
    if layout["regularized"]:
        (at_points,) = backward((jnp.zeros_like(total), jnp.ones_like(regularization)))
        reg_grads = [jnp.zeros_like(t) if k is None else at_points[k] for k, t in zip(layout["trainable"], trainable)]
    structure, positions = layout["kept"]
    kept = keras.tree.pack_sequence_as(structure, [distinct[p] for p in positions])
    return target_grads, reg_grads, kept


def leaf(value):
    return value


def activation_gradient(activation, z, cotangent):
    return jax.vjp(activation, z)[1](cotangent)[0]


def vjp(f, primals):
    """`(outputs, vjp_fn, aux)` of `f(primals) -> (outputs, aux)`."""
    return jax.vjp(f, primals, has_aux=True)


grad = jax.grad


def vmap(f, in_axes):
    return jax.vmap(f, in_axes=in_axes)


# -- run time -------------------------------------------------------------------


def asserted(value, conditions):
    """`value`, or a ValueError with the first failed condition's message where the values are concrete
    (eager JAX); a `jax.jit` step cannot raise (the caller's NaN weights and `noise_check` stand in)."""
    for ok, message in conditions:
        if is_traced(ok):
            continue
        if not bool(ok):
            parts = [message] if isinstance(message, str) else message
            raise ValueError(" ".join(str(p if isinstance(p, str) else jax.device_get(p)) for p in parts))
    return value


def is_traced(value):
    return isinstance(value, jax.core.Tracer)


compiled = jax.jit


def sync_state(model):
    """The values `fit` holds outside the model back into its variables (between steps, in callbacks)."""
    if hasattr(model, "jax_state_sync"):
        model.jax_state_sync()


# -- traces and distribution -------------------------------------------------------


class DrawRecord(DrawRecordBase):
    """Whether each thread drew inside a trace (the compiled step) or eagerly; `apply` must match."""

    def _where(self, token):
        return is_traced(token)

    def _same_step(self, drawn, token):
        return drawn == is_traced(token)


def num_replicas():
    """1: a `DataParallel` step's batch is the global batch, one sharded array."""
    return 1


def global_batch(batch_size, owner):
    return batch_size, None


# -- summaries ----------------------------------------------------------------------


def summary_writer(log_dir):
    raise no_summaries(NAME, log_dir)


def write_scalars(writer, step, values):
    raise no_summaries(NAME, None)
