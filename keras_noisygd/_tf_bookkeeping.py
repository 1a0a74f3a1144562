"""TensorFlow bookkeeping of the noise draw: graphs, run-time batch checks, `tf.distribute` replicas.

Kept apart from the optimizers so that their update logic reads on its own;
everything here is specific to TensorFlow's graphs and `tf.distribute`.
"""

from __future__ import annotations

import threading

import tensorflow as tf

from keras_noisygd._checks import check_int


def asserted(weights, conditions):
    """`weights` after run-time assertions of `(condition, message)` pairs (raise without XLA; XLA drops them)."""
    asserts = [
        tf.debugging.Assert(ok, [message] if isinstance(message, str) else message) for ok, message in conditions
    ]
    with tf.control_dependencies(asserts):
        return tf.identity(weights)


def gradients(loss_fn, variables):
    """The gradients of `loss_fn()` with respect to `variables()` (a tape).

    `variables` is a function: a model that is not built yet creates its
    variables in the forward pass, so they are listed after it.
    """
    with tf.GradientTape() as tape:
        value = loss_fn()
    return tape.gradient(value, variables())


def apply_gradients(optimizer, gradients, variables):
    """`optimizer.apply_gradients` of the step."""
    optimizer.apply_gradients(zip(gradients, variables))


def num_replicas():
    """The replicas in sync of the current `tf.distribute` strategy (1 without one)."""
    return tf.distribute.get_strategy().num_replicas_in_sync


def checked_batch_size(batch_size):
    """`batch_size`, refused if empty: now for a Python int, at run time (without XLA) for a tensor.

    XLA drops the run-time assertion; `NoisyTrainStep` then reports the loss of
    an empty batch as NaN, so `keras.callbacks.TerminateOnNaN` stops.
    """
    if not tf.is_tensor(batch_size):
        return check_int("batch_size", batch_size, 1)
    message = ["Argument `batch_size` must be >= 1: an empty batch has no examples to weight. Received: batch_size=",
               batch_size]
    with tf.control_dependencies([tf.debugging.Assert(batch_size >= 1, message)]):
        return tf.identity(batch_size)


_EAGER = object()


class DrawnGraphs:
    """The graph in which each thread last drew weights, until its `apply`.

    Keyed by thread: `MirroredStrategy` runs (and traces) each replica's step
    in a thread of its own, interleaved at every cross-replica call, so one
    replica's `apply` must not see or clear another's mark.
    """

    def __init__(self):
        self._graphs = {}

    def mark(self, token=None):
        self._graphs[threading.get_ident()] = _current_graph()

    def pop(self):
        return self._graphs.pop(threading.get_ident(), None)


def global_batch(batch_size, optimizer_name):
    """`(global batch size, this replica's offset in it)`; `(batch_size, None)` on one replica.

    The local sizes are all-gathered in replica order, the order in which
    `tf.distribute` splits a global batch into the replicas' batches (and
    `MultiWorkerMirroredStrategy` numbers the workers' replicas).
    """
    strategy = tf.distribute.get_strategy()
    if isinstance(strategy, tf.distribute.experimental.ParameterServerStrategy):
        raise ValueError(
            f"{optimizer_name} does not support `ParameterServerStrategy`: its workers step "
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


def _current_graph():
    return _EAGER if tf.executing_eagerly() else tf.compat.v1.get_default_graph()


def drawn_in_enclosing_graph(drawn, token=None):
    """Whether the weights were drawn in the current graph or one it is nested in (tf.cond)."""
    if drawn is None:
        return False
    graph = _current_graph()
    while graph is not None:
        if graph is drawn:
            return True
        graph = getattr(graph, "outer_graph", None)
    return False
