"""The backend interface on TensorFlow: tapes, graphs, run-time assertions and `tf.distribute`.

See `keras_noisygd._backend` for the interface. A train step here is a
`tf.function` graph (with or without XLA), possibly one per replica of a
`tf.distribute` strategy, each traced in a thread of its own.
"""

from __future__ import annotations

import tensorflow as tf

from keras_noisygd._backend import tf_accumulation
from keras_noisygd._backend._common import DrawRecordBase, no_transforms

NAME = "tensorflow"
STATELESS = False
LAYER_ROWS = True
VMAP_FORWARD = True
SCALAR_SUMMARIES = True

COUNTER_DTYPE = "int64"
SEED_DTYPE = "int64"
WORD_DTYPE = "uint32"

_ZERO = tf.UnconnectedGradients.ZERO


def wide_float():
    return "float64"


# -- the generator's word arithmetic (uint32 words) ---------------------------


def wrap(x):
    return x  # uint32 arithmetic wraps by itself


def shift_left(x, r):
    return tf.bitwise.left_shift(x, tf.constant(r, x.dtype))


def shift_right(x, r):
    return tf.bitwise.right_shift(x, tf.constant(r, x.dtype))


def sort_keys(keys):
    return tf.cast(keys, tf.int64)  # TensorFlow sorts no uint32


def host_tensor(array):
    """A NumPy array as a tensor (no draw runs on the host here)."""
    return tf.convert_to_tensor(array)


def to_host(tensor):
    """An eager tensor's values as a NumPy array."""
    return tensor.numpy()


def draws_on_host(key):
    return False  # a traced or compiled step: the words stay in the graph


# -- gradients ------------------------------------------------------------------


def gradients(loss_fn, variables):
    """The gradients of `loss_fn()` with respect to `variables()` (a tape).

    `variables` is a function: a model that is not built yet creates its
    variables in the forward pass, so they are listed after it.
    """
    with tf.GradientTape() as tape:
        value = loss_fn()
    return tape.gradient(value, variables())


def apply_gradients(optimizer, gradients, variables):
    optimizer.apply_gradients(zip(gradients, variables))


def assign_add(variable, delta):
    """`variable.assign_add(delta)` (`delta` a NumPy array)."""
    variable.assign_add(delta)


def run_if(condition, function):
    """`function()` only where `condition` (a scalar bool) holds: a `tf.cond` in a graph of one replica.

    Under several replicas the update's cross-replica `merge_call` cannot sit
    inside a `tf.cond` (keras-team/keras#20582), so `function` runs there
    unconditionally; eagerly the condition is read.
    """
    if tf.executing_eagerly():
        if bool(condition):
            function()
        return
    if num_replicas() > 1:
        function()
        return

    def run():
        function()
        return tf.constant(True)

    tf.cond(tf.cast(condition, tf.bool), run, lambda: tf.constant(False))


def accumulate_across_replicas(optimizer, grads, variables):
    """Applies an accumulation micro-step where Keras's own cannot (several replicas; `tf_accumulation`).

    Returns whether it did; if not, Keras's `_backend_apply_gradients` runs.
    """
    if not tf_accumulation.applies(optimizer):
        return False
    tf_accumulation.apply_gradients(optimizer, grads, variables)
    return True


def gradients_at(forward, trainable):
    """`forward() -> (total, regularization or None, targets, kept)`; `(the gradients of total at targets,
    those of regularization at trainable or None, kept)`.

    `targets` are tensors computed inside `forward` (each first passed through
    `gradient_point` where it was made) or trainable values; `kept` is any nest
    of the pass's values the caller reads afterwards.
    """
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(trainable)
        total, regularization, targets, kept = forward()
    target_grads = tape.gradient(total, targets, unconnected_gradients=_ZERO)
    reg_grads = None
    if regularization is not None:
        reg_grads = tape.gradient(regularization, trainable, unconnected_gradients=_ZERO)
    return list(target_grads), reg_grads, kept


def gradient_point(value):
    return value  # a tape differentiates at any tensor it saw


def leaf(value):
    return value  # a tape watches what it is told to


def activation_gradient(activation, z, cotangent):
    """`cotangent * activation'(z)`."""
    with tf.GradientTape() as tape:
        tape.watch(z)
        activated = activation(z)
    return tape.gradient(activated, z, output_gradients=cotangent)


def vjp(f, primals):
    raise no_transforms("vjp")


def grad(f):
    raise no_transforms("grad")


def vmap(f, in_axes):
    raise no_transforms("vmap")


# -- run time -------------------------------------------------------------------


def asserted(value, conditions):
    """`value` after run-time assertions of `(condition, message)` pairs: they raise without XLA
    (`InvalidArgumentError`); XLA drops them."""
    asserts = [
        tf.debugging.Assert(ok, [message] if isinstance(message, str) else message) for ok, message in conditions
    ]
    with tf.control_dependencies(asserts):
        return tf.identity(value)


def is_traced(value):
    return not tf.executing_eagerly()


def compiled(function):
    """`function` as a graph (`tf.function`, no XLA), traced once per input signature."""
    return tf.function(function, jit_compile=False)


def sync_state(model):
    """Nothing to do: the variables hold the trained values."""


# -- graphs and tf.distribute -----------------------------------------------------

_EAGER = object()


def _current_graph():
    return _EAGER if tf.executing_eagerly() else tf.compat.v1.get_default_graph()


class DrawRecord(DrawRecordBase):
    """The graph in which each thread drew weights; a step applies them in it or in a graph nested in it."""

    def _where(self, token):
        return _current_graph()

    def _same_step(self, drawn, token):
        graph = _current_graph()  # the apply's graph: the draw's own, or a tf.cond branch inside it
        while graph is not None:
            if graph is drawn:
                return True
            graph = getattr(graph, "outer_graph", None)
        return False


def num_replicas():
    """The replicas in sync of the current `tf.distribute` strategy (1 without one)."""
    return tf.distribute.get_strategy().num_replicas_in_sync


def global_batch(batch_size, owner):
    """`(global batch size, this replica's offset in it)`; `(batch_size, None)` on one replica.

    The local sizes are all-gathered in replica order, the order in which
    `tf.distribute` splits a global batch into the replicas' batches (and
    `MultiWorkerMirroredStrategy` numbers the workers' replicas).
    """
    strategy = tf.distribute.get_strategy()
    if isinstance(strategy, tf.distribute.experimental.ParameterServerStrategy):
        raise ValueError(
            f"{owner} does not support `ParameterServerStrategy`: its workers step "
            "asynchronously, so they cannot share "
            "one noise draw per global batch. Use `MirroredStrategy` or "
            f"`MultiWorkerMirroredStrategy`. Received: strategy={type(strategy).__name__}"
        )
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return batch_size, None
    local = tf.cast(batch_size, tf.int32)
    sizes = context.all_gather(tf.reshape(local, [1]), axis=0)  # [replicas], in replica order
    before = tf.range(context.num_replicas_in_sync) < tf.cast(context.replica_id_in_sync_group, tf.int32)
    offset = tf.reduce_sum(tf.where(before, sizes, 0))
    return tf.reduce_sum(sizes), offset


# -- summaries ----------------------------------------------------------------------


def summary_writer(log_dir):
    return tf.summary.create_file_writer(log_dir)


def write_scalars(writer, step, values):
    with writer.as_default(step=step):
        for key, value in values.items():
            tf.summary.scalar(key, value)
    writer.flush()
