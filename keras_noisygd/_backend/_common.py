"""What the backend modules share: the per-thread record of noise draws and the messages of refusals."""

from __future__ import annotations

import threading


class DrawRecordBase:
    """Where each thread last drew noise weights, until the optimizer's `apply` of that step.

    Keyed by thread: `MirroredStrategy` runs (and traces) each replica's step
    in a thread of its own, interleaved at every cross-replica call, so one
    replica's `apply` must not see or clear another's mark. A backend module
    subclasses it with `_where(token)` (what identifies the graph, trace or
    eager code of a draw; `token` is the noise state's value the draw read)
    and `_same_step(drawn, token)`.
    """

    def __init__(self):
        self._marks = {}

    def mark(self, token):
        """Records that this thread drew weights, in the graph or trace `token` belongs to."""
        self._marks[threading.get_ident()] = self._where(token)

    def drawn_in_step(self, token):
        """Whether this thread drew weights in the step that now applies gradients; clears the record."""
        drawn = self._marks.pop(threading.get_ident(), None)
        return drawn is not None and self._same_step(drawn, token)

    def _where(self, token):
        raise NotImplementedError

    def _same_step(self, drawn, token):
        raise NotImplementedError


def no_transforms(name):
    """The error of a function transform (`vjp`, `grad`, `vmap`) asked of TensorFlow."""
    return NotImplementedError(
        f"`_backend.{name}` is a JAX/PyTorch function transform; TensorFlow's per-example engine uses "
        "`tf.vectorized_map` over a `tf.GradientTape` (per_example/tape_engine.py)."
    )


def no_summaries(backend, log_dir):
    return ValueError(
        "Argument `log_dir` writes TensorBoard summaries with `tf.summary`, which needs the TensorFlow "
        "backend; on the others the values are in `fit`'s logs and `history` (a `keras.callbacks.CSVLogger` "
        f"after this callback records them). Received: log_dir={log_dir!r} with the {backend!r} backend"
    )
