"""A progress bar inside one run: its updates, their ETA, the loss and the curve's last test accuracy."""

from __future__ import annotations

import sys

import keras


class Progress(keras.callbacks.Callback):
    """Keras's `Progbar` over a run's `steps` updates, moved at every batch callback of `fit`.

    `micro_steps` is the number of `fit` steps per update (gradient
    accumulation); the bar counts updates. It shows `fit`'s `loss` and the
    `test_acc` that `runner.Curve` puts into the logs at its points (when it
    runs first). A terminal redraws at most twice a second, a log file every
    10 s.
    """

    def __init__(self, steps, micro_steps=1):
        super().__init__()
        self.micro_steps = micro_steps
        interval = 0.5 if sys.stdout.isatty() else 10.0
        self.bar = keras.utils.Progbar(steps, unit_name="update", stateful_metrics=["loss", "test_acc"], interval=interval)

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        values = [(key, float(keras.ops.convert_to_numpy(logs[key]))) for key in ("loss", "test_acc") if key in logs]
        self.bar.update((batch + 1) // self.micro_steps, values=values)
