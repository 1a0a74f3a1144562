"""Cost of `NoiseMonitor(every_n_steps=1)`: a `fit` step with the monitor / the same step without it.

The monitor measures at every step on a probe batch of the training batch's
size. Three ways, alternating rounds in one process (median of the per-round
ratios, with their range): no monitor, the monitor with `method="auto"` (the
Gram matrix from the layers' inputs and output gradients, where the
model allows it: both models here) and with `method="per_example"` (the Gram matrix
from `G`, as before the Gram path). Steps are timed inside one `fit`
(`_timing.py`), `steps_per_execution=1` so that the monitor runs at every step.

    python benchmarks/monitor_cost.py [--rounds 5] [--steps 20] [--batch-size 128]
"""

from __future__ import annotations

import argparse
import os
import statistics

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_noisygd as kn  # noqa: E402
from _timing import seconds_per_step  # noqa: E402  (benchmarks/ is the script's folder)
from step_time import MODELS, synthetic_batch  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ", ".join(MODELS))
    args = parser.parse_args(argv)
    print(f"batch = probe = {args.batch_size}, monitor every step, {args.steps} steps x {args.rounds} rounds, XLA off")
    print(f"{'model':<20} {'step ms':>8} {'auto ms':>8} {'source':>11} {'ratio':>14} {'per_ex ms':>10} {'ratio':>14}")
    rng = np.random.default_rng(0)
    for name in args.models.split(","):
        layers_fn, (x, y), data = synthetic_batch(name, args.batch_size, rng)
        keras.utils.set_random_seed(0)
        model = kn.NoisySequential(layers_fn())
        model.compile(
            kn.NoisyGD(0.01, noise="gaussian_centered", emulate_batch_size=32, seed=0),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=False,
        )
        monitors = {method: kn.NoiseMonitor((x, y), every_n_steps=1, method=method) for method in ("auto", "per_example")}
        runs = {"none": [], "auto": [], "per_example": []}
        for key in runs:  # trace outside the timing
            seconds_per_step(model, data, 2, 2, [monitors[key]] if key in monitors else [])
        for round_ in range(args.rounds):
            order = list(runs) if round_ % 2 == 0 else list(reversed(runs))
            for key in order:
                callbacks = [monitors[key]] if key in monitors else []
                runs[key].append(seconds_per_step(model, data, args.steps, 2, callbacks))
        ratio = {k: [a / b for a, b in zip(runs[k], runs["none"])] for k in monitors}

        def show(key):
            return f"{statistics.median(ratio[key]):.2f} ({min(ratio[key]):.2f}-{max(ratio[key]):.2f})"

        print(
            f"{name:<20} {1e3 * statistics.median(runs['none']):>8.2f} {1e3 * statistics.median(runs['auto']):>8.2f} "
            f"{monitors['auto'].gram_source:>11} {show('auto'):>14} {1e3 * statistics.median(runs['per_example']):>10.2f} "
            f"{show('per_example'):>14}"
        )


if __name__ == "__main__":
    main()
