"""What the train steps share: the loss reductions that keep the noise, the clean loss report, the metrics guard."""

from __future__ import annotations

import contextlib

from keras import ops, tree

from keras_noisygd import _backend
from keras_noisygd.per_example.losses import REDUCTIONS


def check_reductions(loss):
    """The noisy loss must be `sum_i m_i l_i` over a constant: no division by `sum_i m_i`."""
    for loss_fn in tree.flatten(loss):
        reduction = getattr(loss_fn, "reduction", "sum_over_batch_size")
        if reduction not in REDUCTIONS:
            raise ValueError(
                f"The compiled loss {loss_fn!r} must reduce with one of {list(REDUCTIONS)} "
                "so that the noise weights enter as G W (a reduction that divides by the sum of the "
                f"weights, or none, changes the noise). Received: reduction={reduction!r}"
            )


def report_loss(model, loss, batch_size, weights, checked=False):
    """Updates `model`'s `"loss"` metric with the step's clean `loss` (NaN where the draw failed).

    As in the keras.io custom-train-step guide: the "loss" metric tracks the
    loss, un-scaled from tf.distribute's per-replica scaling like
    `Model.train_step` does. Weights that are NaN (a compiled step's stand-in
    for a failed run-time check, `_checks.guarded`) or empty (an empty batch)
    make the reported loss NaN. The step itself is skipped and
    `FailedNoiseCheck` stops `fit`; with several `tf.distribute` replicas,
    where it cannot be skipped, `keras.callbacks.TerminateOnNaN` stops on it.
    `checked=True` (the draw's checks passed, read back on the host) skips that guard.
    """
    if not checked:
        usable = ops.logical_and(ops.size(weights) > 0, ops.all(ops.isfinite(weights)))
        loss = ops.where(usable, loss, ops.cast(float("nan"), loss.dtype))
    replicas = _backend.num_replicas()
    for metric in model.metrics:
        if metric.name == "loss":
            metric.update_state(loss * replicas, sample_weight=batch_size)
            return


@contextlib.contextmanager
def per_output_loss_metrics_untouched(model, y_pred):
    """Restores the per-output loss metrics on exit: `compute_loss` updates them, with the noisy loss.

    Keras keeps one `"<output>_loss"` metric per output of a multi-output
    model; a single output has none, and then this costs nothing.
    """
    single_output = len(tree.flatten(y_pred)) == 1
    metrics = [] if single_output else [m for m in model.metrics if m.name.endswith("_loss")]
    variables = [v for m in metrics for v in m.variables]
    saved = [ops.copy(v.value) for v in variables]
    try:
        yield
    finally:
        for variable, value in zip(variables, saved):
            variable.assign(value)
