"""Keras's gradient accumulation under several `tf.distribute` replicas, where Keras's own cannot run.

Keras 3 applies an accumulated update inside `ops.cond` in replica context,
and that branch reduces the gradients across replicas with a `merge_call`,
which TensorFlow refuses inside a replica's `tf.cond`
(keras-team/keras#20582; keras-team/keras#23592 proposes this same fix).
Here the condition is taken in cross-replica context instead, the pattern of
Keras's `LossScaleOptimizer`: one `merge_call`, then a `tf.cond` whose
branches run the replicas' own update (or accumulation) with
`call_for_each_replica`. The branches are Keras's, word for word: average
the accumulated gradients, clip, weight decay, the update step, reset.

The whole module is the workaround: drop it (and `accumulate_across_replicas`)
when Keras fixes #20582.
"""

from __future__ import annotations

import tensorflow as tf

NO_EMA = (
    "`use_ema=True` cannot be combined with `gradient_accumulation_steps` under a tf.distribute strategy of "
    "several replicas: Keras's accumulation needs a workaround there (keras-team/keras#20582) that does not "
    "cover the moving average. Received: use_ema=True, gradient_accumulation_steps={k}, {replicas} replicas"
)


def applies(optimizer):
    """Whether `optimizer`'s update needs this path: accumulation, in the replica context of several replicas."""
    if not optimizer.gradient_accumulation_steps:
        return False
    context = tf.distribute.get_replica_context()
    return context is not None and context.num_replicas_in_sync > 1


def apply_gradients(optimizer, grads, variables):
    """What `BaseOptimizer._backend_apply_gradients` does with accumulation, its `tf.cond` in cross-replica context."""
    context = tf.distribute.get_replica_context()
    k = optimizer.gradient_accumulation_steps
    if optimizer.use_ema:
        raise ValueError(NO_EMA.format(k=k, replicas=context.num_replicas_in_sync))
    accumulators = [optimizer._accumulated_gradients[optimizer._get_variable_index(v)] for v in variables]

    def update(grads):
        grads = [(g + a) / k for g, a in zip(grads, accumulators)]
        grads = optimizer._clip_gradients(grads)
        optimizer._apply_weight_decay(variables)
        optimizer._backend_update_step(grads, variables, optimizer.learning_rate)
        optimizer._backend_reset_gradient_accumulators()

    def accumulate(grads):
        optimizer._backend_increment_gradient_accumulators(grads, accumulators)

    def cross_replica(strategy, grads):
        # Keras's micro-step counter (`iterations` counts updates): mirrored, one value for every replica.
        is_update = tf.equal((optimizer._iterations + 1) % k, 0)
        tf.cond(
            is_update,
            lambda: _on_each_replica(strategy, update, grads),
            lambda: _on_each_replica(strategy, accumulate, grads),
        )

    context.merge_call(cross_replica, args=(grads,))


def _on_each_replica(strategy, function, grads):
    strategy.extended.call_for_each_replica(function, args=(grads,))
    return tf.constant(True)  # a tf.cond branch returns a tensor
