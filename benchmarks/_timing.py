"""Timing training steps inside one `fit`, without `fit`'s own start and end; and the median of repeated calls.

A whole `fit` call costs more than its steps: on a 2-core CPU its start takes
~0.1 s and its end sometimes waits another 0.1-0.2 s (a `tf.data` input; up to
~1.8 s after long steps), so 100 steps of the paper's CNN measured as one `fit`
call took 4.2-6.3 ms a step against 4.2-5.0 ms between the steps, bimodally.
Timing from the end of a warm-up chunk to the end of the last step leaves both
out.
"""

from __future__ import annotations

import statistics
import time

import keras


class _Clock(keras.callbacks.Callback):
    """`(batch, time)` at the end of every batch callback (once per `steps_per_execution` steps)."""

    def __init__(self):
        super().__init__()
        self.marks = []

    def on_train_batch_end(self, batch, logs=None):
        self.marks.append((batch, time.perf_counter()))


def seconds_per_step(model, data, steps, warmup, callbacks=()):
    """Seconds per step of `model.fit(data)` over `steps` steps that follow `warmup` untimed ones.

    `warmup` must be a multiple of the model's `steps_per_execution` (a callback
    then ends it) and `steps` too (so the last callback ends the timed steps).
    The clock runs after `callbacks`, so their per-batch work is timed.
    """
    clock = _Clock()
    model.fit(data, steps_per_epoch=warmup + steps, epochs=1, verbose=0, shuffle=False, callbacks=[*callbacks, clock])
    marks = dict(clock.marks)
    if warmup - 1 not in marks or warmup + steps - 1 not in marks:
        raise ValueError(f"warmup={warmup} and steps={steps} must be multiples of steps_per_execution")
    return (marks[warmup + steps - 1] - marks[warmup - 1]) / steps


def median_seconds(fn, repeats):
    """Median seconds per call of `fn` over `repeats` calls after one warm-up call.

    `fn` must return once its work is done (wrap a JAX call in `block_until_ready`).
    """
    fn()
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        fn()
        times.append(time.perf_counter() - begin)
    return statistics.median(times)
