"""Training-step time of NoisyModel + NoisyGD against keras.Model + keras.optimizers.SGD.

Same architecture, initial weights, batch, loss and metrics; XLA on and off. Both
are timed inside `fit` on a repeated in-memory batch (steps_per_execution keeps
Python out of the loop), between the steps of one `fit` call (`_timing.py`:
a whole call adds its start and a sometimes-slow end), alternating A/B rounds
so machine noise hits both alike. `--engine per_example` times the noisy model
with the per-example engine (it forms every example's gradient). Prints the
median per-step times, the median of the per-round ratios noisy/stock, and the
25th-75th percentile of those ratios: on a shared machine the spread between
rounds is often larger than the difference being measured.

On every Keras backend: `KERAS_BACKEND=jax python benchmarks/step_time.py` (XLA only: JAX without
`jit_compile` runs eagerly) or `KERAS_BACKEND=torch ...` (no XLA). The data are a `tf.data` repetition of
one batch on TensorFlow and a `keras.utils.PyDataset` of it elsewhere (the same for both models).

    python benchmarks/step_time.py [--rounds 15] [--steps 100] [--engine per_example] [--batch-size 512]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from _timing import seconds_per_step as _in_fit  # noqa: E402  (benchmarks/ is the script's folder)

import keras_noisygd as kn  # noqa: E402

EXECUTION = 1 if keras.backend.backend() == "torch" else 20  # steps_per_execution (PyTorch allows only 1)


def paper_cnn():
    """The paper's small Fashion-MNIST network (11,330 parameters)."""
    return [
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(10, 5),
        keras.layers.MaxPooling2D(),
        keras.layers.ReLU(),
        keras.layers.Conv2D(10, 5),
        keras.layers.MaxPooling2D(),
        keras.layers.ReLU(),
        keras.layers.Flatten(),
        keras.layers.Dense(50, activation="relu"),
        keras.layers.Dense(10),
    ]


def mlp():
    return [keras.Input((784,)), keras.layers.Dense(256, activation="relu"), keras.layers.Dense(256, activation="relu"), keras.layers.Dense(10)]


def wide_cnn():
    """The wider Conv2D + Dense network of the per-example benchmarks (598,786 parameters)."""
    return [
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(32, 3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(64, 3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(360, activation="relu"),
        keras.layers.Dense(10),
    ]


MODELS = {"paper_cnn": (paper_cnn, (28, 28, 1)), "mlp_784_256_256_10": (mlp, (784,))}


def synthetic_batch(name, batch_size, rng):
    """`(layers_fn, (x, y), dataset repeating that batch)`: one random batch for the model `name`."""
    layers_fn, shape = MODELS[name]
    x = rng.normal(size=(batch_size, *shape)).astype("float32")
    y = rng.integers(0, 10, batch_size)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return layers_fn, (x, y), tf.data.Dataset.from_tensors((x, y)).repeat()
    return layers_fn, (x, y), _RepeatedBatch(x, y)


class _RepeatedBatch(keras.utils.PyDataset):
    """The same batch, `10**6` times: the input of JAX and PyTorch runs."""

    def __init__(self, x, y):
        super().__init__()
        self.batch = (x, y)

    def __len__(self):
        return 10**6

    def __getitem__(self, index):
        return self.batch


# The XLA settings that run compiled code on each backend: JAX without jit_compile runs op by op.
XLA_MODES = {"tensorflow": "both", "jax": "on", "torch": "off"}


def build(layers_fn, model_class, optimizer, jit_compile):
    keras.utils.set_random_seed(0)
    model = model_class(layers_fn())
    model.compile(
        optimizer,
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=jit_compile,
        steps_per_execution=EXECUTION,
    )
    return model


def train_gflop(model, batch_size):
    """GFLOP of one training step: 3x the multiply-adds of the forward pass (forward, input and weight
    gradients), counted from the Conv2D and Dense layers (pooling, activations and the loss are <1% here)."""
    macs = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            kh, kw, cin, cout = layer.kernel.shape
            macs += int(np.prod(layer.output.shape[1:])) * kh * kw * cin
        elif isinstance(layer, keras.layers.Dense):
            macs += int(np.prod(layer.kernel.shape))
    return 3 * 2 * macs * batch_size / 1e9


def matmul_gflops(size=2048, repeats=10):
    """This CPU's practical float32 peak: GFLOP/s of a NumPy (BLAS) `size x size` matmul on every core."""
    a = np.random.default_rng(0).random((size, size), dtype=np.float32)
    a @ a
    start = time.perf_counter()
    for _ in range(repeats):
        a @ a
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def seconds_per_step(model, data, steps):
    return _in_fit(model, data, steps, warmup=20)  # a multiple of EXECUTION on every backend


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--noise", default="gaussian_centered", help="noise name (default %(default)s)")
    parser.add_argument("--emulate-batch-size", type=int, default=32, help="the SGD batch b the noise emulates (default 32)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ", ".join(MODELS))
    parser.add_argument("--engine", default="weighted", choices=["weighted", "per_example"], help="the noisy model's engine")
    parser.add_argument("--xla", default=None, choices=["both", "on", "off"],
                        help="default: both on TensorFlow, on for JAX, off for PyTorch")
    args = parser.parse_args(argv)
    args.xla = args.xla or XLA_MODES[keras.backend.backend()]
    if args.steps % EXECUTION:
        parser.error(f"--steps must be a multiple of {EXECUTION} (steps_per_execution). Received: {args.steps}")

    peak = matmul_gflops()
    print(f"backend {keras.backend.backend()}, batch {args.batch_size}, noise {args.noise} ~ SGD({args.emulate_batch_size}), "
          f"engine {args.engine}, {args.steps} steps x {args.rounds} rounds (median); float32 matmul peak {peak:.0f} GFLOP/s")
    print(f"{'model':<20} {'xla':<5} {'stock ms':>9} {'noisy ms':>9} {'ratio':>7} {'ratio p25-p75':>14} "
          f"{'noisy GFLOP/s':>13} {'% peak':>6}")
    rng = np.random.default_rng(0)
    for name in args.models.split(","):
        layers_fn, (x, y), data = synthetic_batch(name, args.batch_size, rng)
        for jit_compile in {"both": (False, True), "on": (True,), "off": (False,)}[args.xla]:
            stock = build(layers_fn, keras.Sequential, keras.optimizers.SGD(0.01), jit_compile)
            noisy = build(
                layers_fn, kn.NoisySequential,
                kn.NoisyGD(0.01, noise=args.noise, emulate_batch_size=args.emulate_batch_size, seed=0, engine=args.engine), jit_compile,
            )
            for model in (stock, noisy):  # trace and compile outside the timing
                seconds_per_step(model, data, 20)
            times = {"stock": [], "noisy": []}
            for round_ in range(args.rounds):  # ABBA order: neither runs first every time
                order = ("stock", "noisy") if round_ % 2 == 0 else ("noisy", "stock")
                for key in order:
                    times[key].append(seconds_per_step(stock if key == "stock" else noisy, data, args.steps))
            ratios = [n / s for n, s in zip(times["noisy"], times["stock"])]
            quartiles = statistics.quantiles(ratios, n=4)
            gflops = train_gflop(stock, args.batch_size) / statistics.median(times["noisy"])
            print(
                f"{name:<20} {str(jit_compile):<5} {1e3 * statistics.median(times['stock']):>9.3f} "
                f"{1e3 * statistics.median(times['noisy']):>9.3f} {statistics.median(ratios):>7.3f} "
                f"{quartiles[0]:>7.3f}-{quartiles[2]:.3f} {gflops:>13.1f} {100 * gflops / peak:>6.1f}"
            )


if __name__ == "__main__":
    main()
