"""Memory over a long run: resident set size (RSS) every `--interval` steps of `fit`.

Trains a small MLP for `--steps` steps with NoisyModel + NoisyGD, then the same
with keras.Model + keras.optimizers.SGD as the baseline, in one `fit` call each
(`steps_per_epoch=--interval`, so every "epoch" end is a measuring point and
`fit` runs its callbacks and logs as in a real run). Prints the RSS at each
point and, per run, the growth from the first point (after tracing and warm-up)
to the last: the ratio and the MiB. Flat memory is a ratio close to 1.00 and a
growth of a few MiB at most, like the baseline's. No timings are involved.

    python benchmarks/long_run.py [--steps 10000] [--interval 1000] [--jit]
"""

from __future__ import annotations

import argparse
import os
import resource

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_noisygd as kn  # noqa: E402


def rss_mib():
    """Current resident set size in MiB (Linux /proc; else the peak from getrusage)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RecordRSS(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.points = []

    def on_epoch_end(self, epoch, logs=None):
        self.points.append(rss_mib())


def run(noisy, steps, interval, jit_compile, seed=0):
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(512, 20)).astype("float32")
    y = rng.integers(0, 10, 512)
    data = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(512, seed=seed).batch(64).repeat()
    model_class = kn.NoisyModel if noisy else keras.Model
    inputs = keras.Input((20,))
    hidden = keras.layers.Dense(64, activation="relu")(inputs)
    model = model_class(inputs, keras.layers.Dense(10, activation="softmax")(hidden))
    optimizer = (
        kn.NoisyGD(0.05, noise="gaussian_centered", emulate_batch_size=16, momentum=0.5, seed=seed)
        if noisy
        else keras.optimizers.SGD(0.05, momentum=0.5)
    )
    model.compile(optimizer, "sparse_categorical_crossentropy", metrics=["accuracy"], jit_compile=jit_compile)
    recorder = RecordRSS()
    model.fit(data, steps_per_epoch=interval, epochs=steps // interval, verbose=0, callbacks=[recorder])
    assert int(model.optimizer.iterations.numpy()) == steps // interval * interval
    return recorder.points


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10_000, help="training steps per run (default 10000)")
    parser.add_argument("--interval", type=int, default=1000, help="steps between measurements (default 1000)")
    parser.add_argument("--jit", action="store_true", help="compile the train step with XLA")
    args = parser.parse_args(argv)

    print(f"MLP 20-64-10, batch 64, {args.steps} steps, jit_compile={args.jit}; RSS at start {rss_mib():.1f} MiB")
    results = {}
    for name, noisy in (("NoisyModel+NoisyGD", True), ("keras.Model+SGD", False)):
        results[name] = run(noisy, args.steps, args.interval, args.jit)
    print(f"{'step':>8} " + " ".join(f"{name:>20}" for name in results))
    for i in range(len(next(iter(results.values())))):
        print(f"{(i + 1) * args.interval:>8} " + " ".join(f"{points[i]:>16.1f} MiB" for points in results.values()))
    for name, points in results.items():
        print(
            f"{name}: RSS growth from step {args.interval} to {len(points) * args.interval}: "
            f"ratio {points[-1] / points[0]:.3f}, {points[-1] - points[0]:+.1f} MiB"
        )
    return results


if __name__ == "__main__":
    main()
