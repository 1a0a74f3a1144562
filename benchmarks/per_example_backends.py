"""`per_example_gradients` on each Keras backend, against that backend's own plain batch gradient.

For the paper's CNN and the MLP 784-256-256-10 of `step_time.py` and the wide CNN (c) of
`per_example.py` at each batch size B, on the backend this process runs (`KERAS_BACKEND`):

- plain      : the gradient of the mean loss over the batch through `model.stateless_call`, compiled
               the way the backend compiles a training step (TensorFlow `tf.function(jit_compile=True)`,
               JAX `jax.jit(jax.grad)`, PyTorch eager autograd);
- per-example: `keras_noisygd.per_example_gradients`: the layer rows of one batched pass on every
               backend (TensorFlow: inside `tf.function(jit_compile=True)`; JAX: compiled once by the
               package, `jax.jit`; PyTorch: eager).

The last column is the floor of returning `G`: a compiled function that writes a fresh `[B, d]` float32
array. Medians over repetitions after one warm-up call; the ratio per-example / plain is measured in the same
process, so it holds on a noisy machine where the absolute times do not. `--all-backends` runs the script
once per backend, each in a process of its own, one after the other, and prints the tables together.

    python benchmarks/per_example_backends.py [--batch-sizes 32 128 512] [--repeats 7] [--all-backends]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import _timing  # noqa: E402  (benchmarks/ is the script's folder)
import keras  # noqa: E402
import numpy as np  # noqa: E402
from step_time import MODELS as STEP_MODELS  # noqa: E402
from step_time import wide_cnn  # noqa: E402

import keras_noisygd as kn  # noqa: E402

BACKEND = keras.backend.backend()


MODELS = {**STEP_MODELS, "wide_cnn": (wide_cnn, (28, 28, 1))}
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _ready(result):
    """Waits for the backend's asynchronous work (JAX dispatches before it computes)."""
    for leaf in keras.tree.flatten(result):
        if hasattr(leaf, "block_until_ready"):
            leaf.block_until_ready()
    return result


def median_seconds(fn, repeats):
    return _timing.median_seconds(lambda: _ready(fn()), repeats)


def plain_gradient(model, x, y):
    """`fn()` computing the batch gradient of `model` on `(x, y)`, compiled as the backend's steps are."""
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    def loss(values):
        y_pred, _ = model.stateless_call(values, non_trainable, x, training=True)
        return LOSS(y, y_pred)

    if BACKEND == "tensorflow":
        import tensorflow as tf

        @tf.function(jit_compile=True)
        def step():
            with tf.GradientTape() as tape:
                tape.watch(trainable)
                value = loss(trainable)
            return tape.gradient(value, trainable)

        return step
    if BACKEND == "jax":
        import jax

        step = jax.jit(jax.grad(loss))
        return lambda: step(trainable)
    import torch

    def step():
        values = [t.detach().requires_grad_(True) for t in trainable]
        return torch.autograd.grad(loss(values), values)

    return step


def per_example(model, x, y):
    if BACKEND == "tensorflow":
        import tensorflow as tf

        compiled = tf.function(lambda: kn.per_example_gradients(model, x, y), jit_compile=True)
        return compiled
    return lambda: kn.per_example_gradients(model, x, y)


def write_floor(batch_size, size):
    """`fn()` that writes a fresh `[B, d]` float32 array in a compiled function: the floor of returning `G`.

    Each call returns a new buffer, as `per_example_gradients` does; a runtime
    whose allocator hands back fresh pages (JAX on a CPU) pays their first
    touch here too.
    """
    shape = (batch_size, size)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        fill = tf.function(lambda s: tf.fill(shape, s), jit_compile=True)
        return lambda: fill(tf.constant(1.5))
    if BACKEND == "jax":
        import jax
        import jax.numpy as jnp

        fill = jax.jit(lambda s: jnp.full(shape, s, "float32"))
        return lambda: fill(1.5)
    import torch

    return lambda: torch.full(shape, 1.5, dtype=torch.float32)


def run(batch_sizes, repeats):
    print(f"backend {BACKEND}: median seconds over {repeats} calls")
    print(f"{'model':20s} {'B':>5s} {'plain ms':>9s} {'per-ex ms':>10s} {'ratio':>7s} {'write B x d ms':>15s}")
    rng = np.random.default_rng(0)
    for name, (layers_fn, shape) in MODELS.items():
        for batch_size in batch_sizes:
            keras.utils.set_random_seed(0)
            model = keras.Sequential(layers_fn())
            model.compile(loss=LOSS)
            x = keras.ops.convert_to_tensor(rng.normal(size=(batch_size, *shape)).astype("float32"))
            y = keras.ops.convert_to_tensor(rng.integers(0, 10, batch_size))
            plain = median_seconds(plain_gradient(model, x, y), repeats)
            rows = median_seconds(per_example(model, x, y), repeats)
            floor = median_seconds(write_floor(batch_size, model.count_params()), repeats)
            print(f"{name:20s} {batch_size:5d} {plain * 1e3:9.2f} {rows * 1e3:10.2f} {rows / plain:7.2f} "
                  f"{floor * 1e3:15.2f}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--all-backends", action="store_true", help="one process per backend, one after the other")
    args = parser.parse_args(argv)
    if not args.all_backends:
        run(args.batch_sizes, args.repeats)
        return
    for backend in ("tensorflow", "jax", "torch"):
        command = [sys.executable, __file__, "--batch-sizes", *map(str, args.batch_sizes), "--repeats", str(args.repeats)]
        subprocess.run(command, env={**os.environ, "KERAS_BACKEND": backend}, check=True)


if __name__ == "__main__":
    main()
