"""Per-example gradients: cost against the plain batch gradient, a Python loop, and JAX's vmap(grad).

For each model and batch size B, on the same CPU:

- plain      : gradient of the mean loss over the batch (what a stock step differentiates);
- weighted   : `keras_noisygd.noisy_gradients` (the default engine: one backward pass of the re-weighted loss);
- per-example: `keras_noisygd.per_example_gradients` (the `[B, *shape]` gradient matrix), XLA off and on,
               and with `chunk_size`;
- loop       : a Python loop of single-example gradient calls, eager and through one compiled function;
- jax        : `jax.jit(jax.vmap(jax.grad(loss)))` on the same architecture in plain JAX (the peer, at every
               B given: 32, 128 and 512 by default, for all three models);
- floor      : writing the `B x d` float32 values of `G` once (`tf.fill`), the memory-traffic floor of any
               per-example method.

Two passes, so that the allocator setting that memory needs does not distort the times:

1. Times: every method in this process, with glibc's default allocator (the script re-runs itself
   without `MALLOC_MMAP_THRESHOLD_` if it was set). Medians over repetitions after one warm-up call;
   every ratio is to the plain gradient with the same XLA setting measured in the same run.
2. Memory: one fresh subprocess per model, batch size and method, whose allocators give freed memory
   back (a fixed glibc mmap threshold and oneDNN's pooling CPU allocator off, see `_memory.py`). The
   child warms the method up, resets the peak and reports the peak resident set above the resident
   set at that point, over the same repetitions: the method's own working memory, not its tracing or
   compilation. For model (c) the floor of writing `B x d` float32 values once is printed next to it.

The last table compares two formulations of a convolution's per-example filter gradient (see
`conv_formulations`), timed in the first pass.

    python benchmarks/per_example.py [--batch-sizes 32 128 512] [--repeats 5] [--models paper_cnn mlp wide_cnn]
        [--memory-methods plain per-example ...] [--no-memory]
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import step_time  # noqa: E402  (benchmarks/ is the script's folder)
import tensorflow as tf  # noqa: E402
from _memory import child_peak, peak_mib, report, settings  # noqa: E402
from _timing import median_seconds  # noqa: E402

import keras_noisygd as kn  # noqa: E402
from keras_noisygd.per_example.rules.convolution import convolution_rows  # noqa: E402

tf.get_logger().setLevel("ERROR")  # every method is a new tf.function of the same code: no retracing warnings
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
LOOPS = ("loop xla", "loop eager")


# ---------------------------------------------------------------- the three architectures, in Keras and in JAX

def paper_cnn():
    """(a) The paper's Fashion-MNIST network: 11,330 parameters."""
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(10, 5),
            keras.layers.MaxPooling2D(),
            keras.layers.ReLU(),
            keras.layers.Conv2D(10, 5),
            keras.layers.MaxPooling2D(),
            keras.layers.ReLU(),
            keras.layers.Flatten(),
            keras.layers.Dense(50),
            keras.layers.Dense(10),
        ]
    )


def mlp():
    """(b) A Dense MLP 784-256-256-10: 269,322 parameters."""
    return keras.Sequential(
        [
            keras.Input((784,)),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(10),
        ]
    )


def wide_cnn():
    """(c) A wider Conv2D + Dense network: 598,786 parameters (`step_time.wide_cnn`)."""
    return keras.Sequential(step_time.wide_cnn())


MODELS = {"paper_cnn": (paper_cnn, (28, 28, 1)), "mlp": (mlp, (784,)), "wide_cnn": (wide_cnn, (28, 28, 1))}


def jax_forward(model):
    """The Keras Sequential `model` as a pure JAX function `f(params, x)` (the layers used above only)."""
    import jax
    import jax.numpy as jnp

    steps = []
    for layer in model.layers:
        name = type(layer).__name__
        activation = getattr(layer, "activation", None)
        relu = activation is not None and getattr(activation, "__name__", "") == "relu"
        steps.append((name, relu, getattr(layer, "pool_size", None)))

    def forward(params, x):
        params = list(params)
        for name, relu, pool in steps:
            if name == "Conv2D":
                kernel, bias = params.pop(0), params.pop(0)
                x = jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
                x = x + bias
            elif name == "Dense":
                kernel, bias = params.pop(0), params.pop(0)
                x = x @ kernel + bias
            elif name == "MaxPooling2D":
                x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, *pool, 1), (1, *pool, 1), "VALID")
            elif name == "ReLU":
                x = jax.nn.relu(x)
            elif name == "Flatten":
                x = x.reshape(x.shape[0], -1)
            if relu and name in ("Conv2D", "Dense"):
                x = jax.nn.relu(x)
        return x

    return forward


def jax_per_example(model):
    import jax
    import jax.numpy as jnp

    forward = jax_forward(model)

    def loss(params, x, y):
        logits = forward(params, x[None])
        return -jax.nn.log_softmax(logits)[0, y]

    per_example = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0, 0)))
    params = [jnp.asarray(v.numpy()) for v in model.trainable_variables]
    return lambda x, y: jax.block_until_ready(per_example(params, x, y)), forward, params


# ---------------------------------------------------------------- measurement helpers
def _materialise(result):
    # A CPU tf.function call returns computed tensors; touch one value of each (no copy of G).
    for tensor in tf.nest.flatten(result):
        tf.reshape(tensor, [-1])[:1].numpy()


def batch(model_name, batch_size):
    """The model (seed 0) and a random float32 batch for it, the same in every process."""
    build, shape = MODELS[model_name]
    keras.utils.set_random_seed(0)
    model = build()
    rng = np.random.default_rng(batch_size)
    x = tf.constant(rng.normal(size=(batch_size, *shape)).astype("float32"))
    return model, x, tf.constant(rng.integers(0, 10, batch_size))


def method_names(include_loop, chunk_size, batch_size):
    names = []
    for suffix in ("", " xla"):
        names += [f"plain{suffix}", f"weighted{suffix}", f"per-example{suffix}"]
        if chunk_size and chunk_size < batch_size:
            names.append(f"per-example c={chunk_size}{suffix}")
    return names + (list(LOOPS) if include_loop else []) + ["floor: write B x d", "jax vmap(grad)"]


def method(name, model, x, y, chunk_size=None):
    """A zero-argument callable running the method `name` (see `method_names`) on the batch."""
    xla = name.endswith(" xla")
    base = name[: -len(" xla")] if xla else name
    weights = tf.ones([x.shape[0]])

    def plain(x, y):
        with tf.GradientTape() as tape:
            loss = LOSS(y, model(x, training=True))
        return tape.gradient(loss, model.trainable_variables)

    def compiled(fn):
        traced = tf.function(fn, jit_compile=xla)
        return lambda: _materialise(traced(x, y))

    if base == "plain":
        return compiled(plain)
    if base == "weighted":
        return compiled(lambda x, y: kn.noisy_gradients(model, x, y, weights, loss=LOSS))
    if base == "per-example":
        return compiled(lambda x, y: kn.per_example_gradients(model, x, y, loss=LOSS))
    if base == f"per-example c={chunk_size}":
        return compiled(lambda x, y: kn.per_example_gradients(model, x, y, loss=LOSS, chunk_size=chunk_size))
    if name in LOOPS:
        single = tf.function(plain, jit_compile=True) if name == "loop xla" else plain

        def loop():
            for i in range(x.shape[0]):
                _materialise(single(x[i : i + 1], y[i : i + 1]))

        return loop
    if name == "floor: write B x d":
        sizes = [int(np.prod(v.shape)) for v in model.trainable_variables]
        # The fill value is an argument, so that grappler cannot fold the fill into a cached constant.
        floor = tf.function(lambda value: [tf.fill([x.shape[0], size], value) for size in sizes], autograph=False)
        value = tf.constant(1.0)
        return lambda: _materialise(floor(value))
    if name == "jax vmap(grad)":
        per_example_jax, _, _ = jax_per_example(model)
        x_np, y_np = x.numpy(), y.numpy()
        return lambda: per_example_jax(x_np, y_np)
    raise ValueError(f"Argument `name` must be one of the benchmark's methods. Received: name={name!r}")


def check_jax_agrees(model, x, y):
    """The JAX peer computes the same per-example gradients (else its time means nothing)."""
    per_example_jax, _, _ = jax_per_example(model)
    ours = kn.per_example_gradients(model, x[:4], y[:4], loss=LOSS)
    theirs = per_example_jax(x[:4].numpy(), y[:4].numpy())
    worst = max(float(np.max(np.abs(np.asarray(a) - b.numpy()))) for a, b in zip(theirs, ours))
    scale = max(float(np.max(np.abs(b.numpy()))) for b in ours)
    assert worst <= 1e-4 * scale, f"JAX peer disagrees with keras_noisygd: {worst} (scale {scale})"


def conv_formulations(batch_size, repeats, shape=(28, 28, 1), filters=10, kernel=5):
    """Per-example filter gradients of one Conv2D: TensorFlow's pfor fallback, im2col + einsum, and the layer rule.

    `tf.vectorized_map` has no vectorised rule for `Conv2DBackpropFilter` with per-example inputs and
    falls back to a `while_loop` over the examples. The same values come from the input patches
    (`tf.image.extract_patches`, im2col) contracted with the output gradients in one einsum, which is what
    JAX's `vmap` rule amounts to. The layer rule of `per_example_gradients` (`_layer_rules`) takes one
    batched matmul per kernel offset instead. All are timed against the batched (summed) filter gradient.
    """
    rng = np.random.default_rng(0)
    h, w, c = shape
    x = tf.constant(rng.normal(size=(batch_size, h, w, c)).astype("float32"))
    dy = tf.constant(rng.normal(size=(batch_size, h - kernel + 1, w - kernel + 1, filters)).astype("float32"))
    sizes = tf.constant([kernel, kernel, c, filters])

    def batched(x, dy):
        return tf.raw_ops.Conv2DBackpropFilter(
            input=x, filter_sizes=sizes, out_backprop=dy, strides=[1, 1, 1, 1], padding="VALID"
        )

    def pfor(x, dy):
        return tf.vectorized_map(lambda a: batched(a[0][None], a[1][None]), (x, dy))

    def patches(x, dy):
        columns = tf.image.extract_patches(x, [1, kernel, kernel, 1], [1, 1, 1, 1], [1, 1, 1, 1], "VALID")
        return tf.reshape(tf.einsum("bhwk,bhwo->bko", columns, dy), [batch_size, kernel, kernel, c, filters])

    layer = keras.layers.Conv2D(filters, kernel)
    layer.build((None, h, w, c))

    def offsets(x, dy):  # what per_example_gradients uses: the layer rule's batched matmul per kernel offset
        kernel_rows, _ = convolution_rows(layer, x, dy)
        return tf.reshape(kernel_rows, [batch_size, kernel, kernel, c, filters])

    np.testing.assert_allclose(pfor(x, dy), patches(x, dy), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(offsets(x, dy), patches(x, dy), rtol=1e-4, atol=1e-4)
    print(f"\nConv2D {shape} -> {filters} filters {kernel}x{kernel}, B={batch_size}: per-example filter gradients")
    for xla in (False, True):
        times = {}
        for name, fn in (("batched (summed)", batched), ("pfor while_loop", pfor), ("im2col + einsum", patches),
                         ("offset matmuls", offsets)):
            compiled = tf.function(fn, jit_compile=xla)
            times[name] = median_seconds(lambda compiled=compiled: compiled(x, dy).numpy(), repeats)
        base = times["batched (summed)"]
        for name, seconds in times.items():
            print(f"  xla={xla!s:5} {name:18} {1e3 * seconds:8.2f} ms  x batched {seconds / base:6.2f}")


# ---------------------------------------------------------------- the two passes
def time_pass(args):
    """Times of every method, in this process (default allocator); prints one table per model."""
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} CPUs")
    print("\nTimes (this process, default allocator), ratio to the plain gradient with the same XLA setting")
    for model_name in args.models:
        print(f"\n{model_name}: {batch(model_name, 1)[0].count_params():,} parameters")
        print(f"{'model':10} {'B':>4} {'method':24} {'ms':>9} {'x plain':>8}")
        for batch_size in args.batch_sizes:
            model, x, y = batch(model_name, batch_size)
            check_jax_agrees(model, x, y)
            results = {}
            for name in method_names(batch_size <= args.loop_up_to, args.chunk_size, batch_size):
                repeats = 1 if name in LOOPS else args.repeats
                results[name] = median_seconds(method(name, model, x, y, args.chunk_size), repeats)
            for name, seconds in results.items():
                base = results["plain xla" if ("xla" in name or name.startswith(("jax", "floor"))) else "plain"]
                print(f"{model_name:10} {batch_size:>4} {name:24} {1e3 * seconds:9.2f} {seconds / base:8.2f}")
            pe = results["per-example xla"]
            summary = (
                f"  -> per-example (xla) / jax = {pe / results['jax vmap(grad)']:.2f}"
                f", per-example (xla) / floor = {pe / results['floor: write B x d']:.1f}"
            )
            if "loop xla" in results:
                summary += (
                    f", loop (xla) / per-example (xla) = {results['loop xla'] / pe:.1f}"
                    f", loop (eager) / per-example (xla) = {results['loop eager'] / pe:.1f}"
                )
            print(summary)


def memory_pass(args):
    """Peak memory of each method, one fresh subprocess each (`_memory.py`); prints one table per model."""
    print(f"\nPeak memory (MiB above the resident set after warm-up; one process per method and B, {settings()})")
    for model_name in args.models:
        d = batch(model_name, 1)[0].count_params()
        print(f"\n{model_name}: {d:,} parameters")
        print(f"{'method':24} " + " ".join(f"{f'B={b}':>9}" for b in args.batch_sizes))
        peaks = {}
        for batch_size in args.batch_sizes:
            for name in method_names(batch_size <= args.loop_up_to, args.chunk_size, batch_size):
                if _in_memory_pass(name, args.memory_methods):
                    peaks[name, batch_size] = _child_peak(model_name, batch_size, name, args)
        for name in dict.fromkeys(name for name, _ in peaks):
            cells = [peaks.get((name, b)) for b in args.batch_sizes]
            print(f"{name:24} " + " ".join(f"{'-':>9}" if c is None else f"{c:9.1f}" for c in cells))
        if model_name == "wide_cnn":
            for b in args.batch_sizes:
                floor = b * d * 4 / 2**20
                ratios = ", ".join(
                    f"{name} {peak / floor:.2f}" for (name, size), peak in peaks.items()
                    if size == b and name.startswith("per-example") and peak == peak
                )
                print(f"  -> B={b}: floor B x d float32 = {floor:.1f} MiB; peak / floor: {ratios}")


def _in_memory_pass(name, wanted):
    if wanted is None:
        return name not in LOOPS  # a loop holds one example at a time; at B = 512 it takes minutes
    return wanted == ["all"] or name in wanted


def _child_peak(model_name, batch_size, name, args):
    """`peak_mib` of one method, measured by this script in a fresh process (`_memory.MEMORY_ENV`)."""
    repeats = 1 if name in LOOPS else args.repeats
    child_args = ["--memory-child", model_name, str(batch_size), name, "--repeats", str(repeats),
                  "--chunk-size", str(args.chunk_size)]
    return child_peak(__file__, child_args, f"{name}, B={batch_size}")


def memory_child(args):
    """The body of one memory subprocess: print `{"peak_mib": ...}` for one model, batch size and method."""
    model_name, batch_size, name = args.memory_child
    model, x, y = batch(model_name, int(batch_size))
    report(peak_mib(method(name, model, x, y, args.chunk_size), args.repeats))


def _reexec_with_default_allocator():
    """The times are taken with the default allocators: drop an inherited fixed mmap threshold."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--loop-up-to", type=int, default=512, help="skip the Python loop above this B")
    parser.add_argument("--chunk-size", type=int, default=32, help="also time per-example with this chunk_size")
    parser.add_argument("--conv-batch-size", type=int, default=128, help="B of the Conv2D formulation comparison")
    parser.add_argument(
        "--memory-methods", nargs="+", default=None,
        help="methods of the memory pass (names as in the time table, or 'all'); default: all but the loops",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the memory pass")
    parser.add_argument("--no-times", action="store_true", help="skip the time pass (memory needs no quiet machine)")
    parser.add_argument("--conv-only", action="store_true", help="only the Conv2D formulation table")
    parser.add_argument("--memory-child", nargs=3, metavar=("MODEL", "B", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        memory_child(args)
        return
    if args.conv_only:
        conv_formulations(args.conv_batch_size, args.repeats)
        return
    if not args.no_times:
        time_pass(args)
        conv_formulations(args.conv_batch_size, args.repeats)
    if not args.no_memory:
        memory_pass(args)


if __name__ == "__main__":
    if "--memory-child" not in sys.argv:
        _reexec_with_default_allocator()
    main()
