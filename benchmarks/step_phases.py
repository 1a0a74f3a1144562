"""Where an eager noisy step's time goes: its phases against the stock step's, inside the same loop.

On PyTorch (no XLA) every operation of a step is dispatched from Python, so
the noisy step's extra cost is the extra work of its phases: the draw, the
optimizer's bookkeeping, the loss report. This script times them by wrapping
the functions the step calls (nothing of the step is copied), for the noisy
`NoisySequential` + `NoisyGD` and the stock `keras.Sequential` + `SGD` of
`benchmarks/step_time.py`, alternating one step of each so both see the same
caches. "forward, loss, backward" is the rest of the step: the total minus
the timed phases. Prints microseconds per step (medians over rounds), and
the draw timed alone, in a loop of draws with nothing between them (each of the
same key, which the host's block serves), and right after each of a loop of
stock steps (whose forward and backward pass evict what the draw uses from the
caches, as inside a noisy step).

    KERAS_BACKEND=torch python benchmarks/step_phases.py [--models mlp_784_256_256_10] [--steps 200] [--rounds 5]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import statistics
import time

import keras
import numpy as np
import step_time  # noqa: E402  (benchmarks/ is the script's folder)

import keras_noisygd as kn
from keras_noisygd import _backend
from keras_noisygd.train_step import stateful


class Phases:
    """Seconds spent in each wrapped function, summed since the last `reset`."""

    def __init__(self):
        self.seconds = collections.defaultdict(float)

    def wrap(self, name, function):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start

        return timed


@contextlib.contextmanager
def instrumented(noisy, stock):
    """Wraps the phases of both steps, yields their `Phases`, and restores the package's functions after."""
    ours, theirs = Phases(), Phases()
    optimizer = kn.find_noisy_optimizer(noisy.optimizer)
    saved = (_backend.apply_gradients, stateful.report_loss)
    optimizer.noise_weights = ours.wrap("draw", optimizer.noise_weights)
    _backend.apply_gradients = ours.wrap("apply (with the noise counter)", _backend.apply_gradients)
    stateful.report_loss = ours.wrap("loss report", stateful.report_loss)
    noisy.compute_metrics = ours.wrap("metrics", noisy.compute_metrics)
    stock.optimizer.apply = theirs.wrap("apply (with the noise counter)", stock.optimizer.apply)
    stock._loss_tracker.update_state = theirs.wrap("loss report", stock._loss_tracker.update_state)
    stock.compute_metrics = theirs.wrap("metrics", stock.compute_metrics)
    try:
        yield ours, theirs
    finally:
        _backend.apply_gradients, stateful.report_loss = saved


def phases(name, batch_size, steps, rounds):
    """`({phase: (noisy us, stock us)}, the draw alone, the draw after a stock step)`, in us: medians over
    `rounds` (the phases after a warm-up round)."""
    layers_fn, (x, y), _ = step_time.synthetic_batch(name, batch_size, np.random.default_rng(0))
    stock = step_time.build(layers_fn, keras.Sequential, keras.optimizers.SGD(0.01), False)
    noisy = step_time.build(
        layers_fn, kn.NoisySequential, kn.NoisyGD(0.01, noise="gaussian_centered", emulate_batch_size=32, seed=0), False
    )
    batch = tuple(keras.ops.convert_to_tensor(v) for v in (x, y))
    for model in (stock, noisy):
        model.make_train_function()
    draw = kn.find_noisy_optimizer(noisy.optimizer).noise_weights  # before `instrumented` wraps it
    rows = collections.defaultdict(lambda: ([], []))
    with instrumented(noisy, stock) as (ours, theirs):
        for _ in range(rounds + 1):  # the first round warms up
            totals = [0.0, 0.0]
            for timer in (ours, theirs):
                timer.seconds.clear()
            for _ in range(steps):
                for index, model in enumerate((noisy, stock)):
                    start = time.perf_counter()
                    model.train_step(batch)
                    totals[index] += time.perf_counter() - start
            for index, timer in enumerate((ours, theirs)):
                timed = dict(timer.seconds)
                timed["forward, loss, backward"] = totals[index] - sum(timed.values())
                timed["whole step"] = totals[index]
                for phase, seconds in timed.items():
                    rows[phase][index].append(1e6 * seconds / steps)
    alone = []
    for _ in range(rounds):  # the same draws without the step between them (warm caches)
        start = time.perf_counter()
        for _ in range(steps):
            draw(batch_size)
        alone.append(1e6 * (time.perf_counter() - start) / steps)
    after = []
    for _ in range(rounds):  # each draw right after a stock step, which evicts what the draw uses from the caches
        seconds = 0.0
        for _ in range(steps):
            stock.train_step(batch)
            start = time.perf_counter()
            draw(batch_size)
            seconds += time.perf_counter() - start
        after.append(1e6 * seconds / steps)
    medians = {p: tuple(statistics.median(v[1:]) if v[1:] else 0.0 for v in pair) for p, pair in rows.items()}
    return medians, statistics.median(alone), statistics.median(after)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(step_time.MODELS))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    print(f"backend {keras.backend.backend()}, batch {args.batch_size}, gaussian_centered ~ SGD(32), one step of each "
          f"alternately, {args.steps} steps x {args.rounds} rounds (median us per step)")
    for name in args.models.split(","):
        medians, alone, after = phases(name, args.batch_size, args.steps, args.rounds)
        print(f"{name}")
        print(f"  {'phase':<32} {'noisy us':>9} {'stock us':>9} {'extra us':>9}")
        for phase, (a, b) in medians.items():
            print(f"  {phase:<32} {a:>9.0f} {b:>9.0f} {a - b:>9.0f}")
        print(f"  {'the draw alone, in a loop':<32} {alone:>9.0f}")
        print(f"  {'the draw after each stock step':<32} {after:>9.0f}")


if __name__ == "__main__":
    main()
