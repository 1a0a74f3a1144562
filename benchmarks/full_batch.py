"""Full-batch noisy GD at dataset scale: one update over n examples in micro-batches of c.

A ResNet-20-style CNN (3 stages of 3 basic blocks, 16/32/64 channels, ghost batch normalisation) on
CIFAR-10-shaped data (32x32x3, 10 classes). One *update* is one pass over all n training examples in
k = n / c micro-batches, through Keras's own `gradient_accumulation_steps=k`:

- noisy : `NoisyModel` + `NoisyGD(noise="gaussian_centered", emulate_batch_size=b)`: one noise draw of
          n weights per update, each micro-step trains on its slice;
- stock : `keras.Model` + `keras.optimizers.SGD` with the same accumulation: Keras's own accumulated
          full-batch GD update, the baseline.

Printed:

1. time of one update, noisy / stock, on the same data (both models in one process, alternating rounds,
   each round a few updates timed inside one `fit`; median of the per-round ratios and their range);
2. peak resident memory (Linux `ru_maxrss` of a fresh process) of one noisy update at two values of n:
   it must grow with the micro-batch c, not with n;
3. for contrast, the peak of `fit(batch_size=n)` (the whole set in one forward and backward pass).

The synthetic data is made micro-batch by micro-batch from a stateless seed inside `tf.data`, so no
array of n examples ever exists; `--data file.npz` (arrays `x_train`, `y_train`) uses your own data
(then held in memory, which adds its size to the peak).

    python benchmarks/full_batch.py                      # everything (~15 min on a 2-core CPU)
    python benchmarks/full_batch.py --part time --n 5000 --rounds 5 [--xla]
    python benchmarks/full_batch.py --part memory --memory-n 2500 50000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from _timing import seconds_per_step  # noqa: E402  (benchmarks/ is the script's folder)

import keras_noisygd as kn  # noqa: E402

CLASSES, SHAPE = 10, (32, 32, 3)
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def resnet20(model_class, ghost_batch_size):
    """ResNet-20 (He et al. 2016, CIFAR variant): 3 x 3 basic blocks, ghost BN after every convolution."""

    def norm():
        return kn.layers.GhostBatchNormalization(ghost_batch_size)

    def conv(filters, strides=1):
        return keras.layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False)

    inputs = keras.Input(SHAPE)
    x = keras.layers.ReLU()(norm()(conv(16)(inputs)))
    for stage, filters in enumerate((16, 32, 64)):
        for block in range(3):
            strides = 2 if stage > 0 and block == 0 else 1
            shortcut = x
            x = keras.layers.ReLU()(norm()(conv(filters, strides)(x)))
            x = norm()(conv(filters)(x))
            if strides != 1:
                shortcut = norm()(keras.layers.Conv2D(filters, 1, strides=2, use_bias=False)(shortcut))
            x = keras.layers.ReLU()(keras.layers.Add()([x, shortcut]))
    x = keras.layers.GlobalAveragePooling2D()(x)
    return model_class(inputs, keras.layers.Dense(CLASSES)(x))


def micro_batches(n, c, npz=None):
    """A `tf.data.Dataset` of n / c micro-batches of c examples, repeated."""
    if npz is not None:
        data = np.load(npz)
        x, y = data["x_train"][:n].astype("float32") / 255.0, data["y_train"][:n].reshape(-1)
        return tf.data.Dataset.from_tensor_slices((x, y)).batch(c, drop_remainder=True).repeat().prefetch(2)

    def make(i):  # micro-batch i, the same every pass
        seed = tf.stack([tf.constant(0, tf.int64), i])
        images = tf.random.stateless_uniform([c, *SHAPE], seed)
        labels = tf.random.stateless_uniform([c], seed + 1, maxval=CLASSES, dtype=tf.int64)
        return images, labels

    return tf.data.Dataset.range(n // c).map(make).repeat().prefetch(2)


def compiled(kind, n, c, ghost, b, jit_compile):
    keras.utils.set_random_seed(0)
    k = n // c
    accumulation = k if k > 1 else None
    if kind == "noisy":
        model = resnet20(kn.NoisyModel, ghost)
        optimizer = kn.NoisyGD(0.1, noise="gaussian_centered", emulate_batch_size=b, momentum=0.9, seed=0,
                               gradient_accumulation_steps=accumulation)
    else:
        model = resnet20(keras.Model, ghost)
        optimizer = keras.optimizers.SGD(0.1, momentum=0.9, gradient_accumulation_steps=accumulation)
    model.compile(optimizer, LOSS, jit_compile=jit_compile)
    return model


def one_update(model, data, k):
    model.fit(data, steps_per_epoch=k, epochs=1, verbose=0, shuffle=False)


def check_sizes(n, c, ghost, b):
    if n % c or c % ghost or not 1 <= b <= n:
        raise SystemExit(f"need c | n, ghost | c and 1 <= b <= n. Received: n={n}, c={c}, ghost={ghost}, b={b}")


def time_part(args):
    """Noisy / stock time of one full-batch update, alternating models, median of per-round ratios."""
    n, c = args.n, args.micro_batch
    check_sizes(n, c, args.ghost, args.b)
    data, k = micro_batches(n, c, args.data), n // c
    models = {kind: compiled(kind, n, c, args.ghost, args.b, args.xla) for kind in ("stock", "noisy")}
    for model in models.values():
        one_update(model, data, k)  # trace, compile, warm the input pipeline
    times = {kind: [] for kind in models}
    for round_ in range(args.rounds):
        order = list(models) if round_ % 2 == 0 else list(reversed(list(models)))
        for kind in order:
            times[kind].append(k * seconds_per_step(models[kind], data, k * args.updates_per_round, warmup=k))
    ratios = [a / b for a, b in zip(times["noisy"], times["stock"])]
    print(f"\n1. One full-batch update: n={n} in {k} micro-batches of c={c} (ghost batches of {args.ghost}), "
          f"XLA {'on' if args.xla else 'off'}, {args.rounds} rounds of {args.updates_per_round} timed updates "
          f"per model")
    print(f"   stock keras.Model + SGD(gradient_accumulation_steps={k}): median {statistics.median(times['stock']):.2f} s")
    print(f"   NoisyModel + NoisyGD (one draw of {n} weights per update): median {statistics.median(times['noisy']):.2f} s")
    print(f"   ratio noisy/stock: median {statistics.median(ratios):.3f} (range {min(ratios):.3f}-{max(ratios):.3f})")
    print("   per round (s/update): " + "  ".join(f"{a:.2f}/{b:.2f}" for a, b in zip(times["noisy"], times["stock"]))
          + "  (noisy/stock)")


def peak_of(n, c, args, full_batch=False):
    """Peak RSS (MiB) of a fresh process that builds the model and runs one update."""
    command = [sys.executable, __file__, "--part", "_one", "--n", str(n), "--micro-batch", str(n if full_batch else c),
               "--ghost", str(args.ghost), "--b", str(args.b)] + (["--xla"] if args.xla else [])
    if args.data:
        command += ["--data", args.data]
    result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    if result.returncode != 0:
        return None, result.stderr.strip().splitlines()[-1:] or [f"exit {result.returncode}"]
    return json.loads(result.stdout.strip().splitlines()[-1]), None


def one_part(args):
    """(child) One noisy update; prints the process's peak RSS before and after it, in MiB."""
    check_sizes(args.n, args.micro_batch, args.ghost, args.b)
    model = compiled("noisy", args.n, args.micro_batch, args.ghost, args.b, args.xla)
    data = micro_batches(args.n, args.micro_batch, args.data)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    one_update(model, data, args.n // args.micro_batch)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_mib": peak, "before_mib": before, "seconds": seconds}))


def memory_part(args):
    print(f"\n2. Peak RSS of one full-batch noisy update (fresh process each; micro-batches of c={args.micro_batch})")
    print(f"   {'n':>7} {'k':>5} {'peak MiB':>9} {'s/update':>9}")
    for n in args.memory_n:
        check_sizes(n, args.micro_batch, args.ghost, args.b)
        result, error = peak_of(n, args.micro_batch, args)
        row = f"{result['peak_mib']:9.0f} {result['seconds']:9.1f}" if result else f"failed: {error}"
        print(f"   {n:>7} {n // args.micro_batch:>5} {row}", flush=True)
    print("\n3. For contrast: fit(batch_size=n), the whole set in one forward and backward pass")
    for n in args.full_batch_n:
        check_sizes(n, n, args.ghost, args.b)
        result, error = peak_of(n, n, args, full_batch=True)
        row = f"{result['peak_mib']:9.0f} {result['seconds']:9.1f}" if result else f"failed: {error}"
        print(f"   {n:>7} {1:>5} {row}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["all", "time", "memory", "_one"], default="all")
    parser.add_argument("--n", type=int, default=5000, help="training examples for the time part (default %(default)s)")
    parser.add_argument("--micro-batch", type=int, default=250, help="c (default %(default)s)")
    parser.add_argument("--ghost", type=int, default=50, help="ghost batch size (default %(default)s)")
    parser.add_argument("--b", type=int, default=128, help="emulated SGD batch (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per model, alternating (default %(default)s)")
    parser.add_argument("--updates-per-round", type=int, default=2, help="timed updates per round (default %(default)s)")
    parser.add_argument("--memory-n", type=int, nargs="+", default=[5000, 50000], help="n for the peak (default %(default)s)")
    parser.add_argument("--full-batch-n", type=int, nargs="*", default=[1000, 2000], help="n for fit(batch_size=n)")
    parser.add_argument("--data", help="a .npz with x_train (uint8 images) and y_train, instead of synthetic data")
    parser.add_argument("--xla", action="store_true", help="jit_compile=True (default off: faster convolutions on CPU)")
    args = parser.parse_args(argv)
    if args.part == "_one":
        return one_part(args)
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} CPUs; "
          f"ResNet-20 ({resnet20(keras.Model, args.ghost).count_params():,} parameters)")
    if args.part in ("all", "time"):
        time_part(args)
    if args.part in ("all", "memory"):
        memory_part(args)


if __name__ == "__main__":
    main()
