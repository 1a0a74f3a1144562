"""Per-example gradients: cost against the plain batch gradient, a Python loop, and JAX's vmap(grad).

For each model and batch size B, in one process on the same CPU:

- plain      : gradient of the mean loss over the batch (what a stock step differentiates);
- weighted   : `keras_noisygd.noisy_gradients` (the default engine: one backward pass of the re-weighted loss);
- per-example: `keras_noisygd.per_example_gradients` (the `[B, *shape]` gradient matrix), XLA off and on;
- loop       : a Python loop of single-example gradient calls, eager and through one compiled function;
- jax        : `jax.jit(jax.vmap(jax.grad(loss)))` on the same architecture in plain JAX (the peer);
- floor      : writing the `B x d` float32 values of `G` once (`tf.fill`), the memory-traffic floor of any
               per-example method.

Times are medians over repetitions; every ratio is to the plain step with the same XLA setting measured
in the same run. Peak memory is the process's peak resident set above its resident set when the
measurement starts (Linux `VmHWM`, reset through `/proc/self/clear_refs`; the script re-runs itself with a
fixed glibc mmap threshold so that freed blocks leave the resident set), and for model (c) the floor
of writing `B x d` float32 values once is printed next to it.

The last table compares two formulations of a convolution's per-example filter gradient (see
`conv_formulations`).

    python benchmarks/per_example.py [--batch-sizes 32 128 512] [--repeats 5] [--models paper_cnn mlp wide_cnn]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_noisygd as kn  # noqa: E402

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


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
    """(c) A wider Conv2D + Dense network: 598,786 parameters."""
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(64, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(360, activation="relu"),
            keras.layers.Dense(10),
        ]
    )


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
def _rss_mib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure(fn, repeats):
    """Median seconds per call after one warm-up call, and the peak RSS above the starting RSS (MiB)."""
    fn()
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # reset the peak resident set size
    except OSError:
        pass
    start_rss = _rss_mib("VmRSS")
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        fn()
        times.append(time.perf_counter() - begin)
    return statistics.median(times), _rss_mib("VmHWM") - start_rss


def _materialise(result):
    # A CPU tf.function call returns computed tensors; touch one value of each (no copy of G).
    for tensor in tf.nest.flatten(result):
        tf.reshape(tensor, [-1])[:1].numpy()


def methods(model, x, y, include_loop, chunk_size=None):
    """name -> zero-argument callable running that method on the batch."""
    weights = tf.ones([x.shape[0]])

    def plain(x, y):
        with tf.GradientTape() as tape:
            loss = LOSS(y, model(x, training=True))
        return tape.gradient(loss, model.trainable_variables)

    def weighted(x, y):
        return kn.noisy_gradients(model, x, y, weights, loss=LOSS)

    def per_example(x, y):
        return kn.per_example_gradients(model, x, y, loss=LOSS)

    def chunked(x, y):
        return kn.per_example_gradients(model, x, y, loss=LOSS, chunk_size=chunk_size)

    table = {}
    for xla in (False, True):
        suffix = " xla" if xla else ""
        for name, fn in (("plain", plain), ("weighted", weighted), ("per-example", per_example)):
            compiled = tf.function(fn, jit_compile=xla)
            table[name + suffix] = lambda compiled=compiled: _materialise(compiled(x, y))
        if chunk_size and chunk_size < x.shape[0]:
            compiled = tf.function(chunked, jit_compile=xla)
            table[f"per-example c={chunk_size}{suffix}"] = lambda compiled=compiled: _materialise(compiled(x, y))
    if include_loop:
        single = tf.function(plain, jit_compile=True)

        def loop():
            for i in range(x.shape[0]):
                _materialise(single(x[i : i + 1], y[i : i + 1]))

        table["loop xla"] = loop

        def eager_loop():
            for i in range(x.shape[0]):
                _materialise(plain(x[i : i + 1], y[i : i + 1]))

        table["loop eager"] = eager_loop
    sizes = [int(np.prod(v.shape)) for v in model.trainable_variables]
    # The fill value is an argument, so that grappler cannot fold the fill into a cached constant.
    floor = tf.function(lambda value: [tf.fill([x.shape[0], size], value) for size in sizes], autograph=False)
    value = tf.constant(1.0)
    table["floor: write B x d"] = lambda: _materialise(floor(value))
    per_example_jax, _, _ = jax_per_example(model)
    x_np, y_np = x.numpy(), y.numpy()
    table["jax vmap(grad)"] = lambda: per_example_jax(x_np, y_np)
    return table


def check_jax_agrees(model, x, y):
    """The JAX peer computes the same per-example gradients (else its time means nothing)."""
    per_example_jax, _, _ = jax_per_example(model)
    ours = kn.per_example_gradients(model, x[:4], y[:4], loss=LOSS)
    theirs = per_example_jax(x[:4].numpy(), y[:4].numpy())
    worst = max(float(np.max(np.abs(np.asarray(a) - b.numpy()))) for a, b in zip(theirs, ours))
    scale = max(float(np.max(np.abs(b.numpy()))) for b in ours)
    assert worst <= 1e-4 * scale, f"JAX peer disagrees with keras_noisygd: {worst} (scale {scale})"


def conv_formulations(batch_size, repeats, shape=(28, 28, 1), filters=10, kernel=5):
    """Per-example filter gradients of one Conv2D: TensorFlow's pfor fallback against im2col + einsum.

    `tf.vectorized_map` has no vectorised rule for `Conv2DBackpropFilter` with per-example inputs and
    falls back to a `while_loop` over the examples. The same values come from the input patches
    (`tf.image.extract_patches`, im2col) contracted with the output gradients in one einsum, which is what
    JAX's `vmap` rule amounts to. Both are timed against the batched (summed) filter gradient.
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

    np.testing.assert_allclose(pfor(x, dy), patches(x, dy), rtol=1e-4, atol=1e-4)
    print(f"\nConv2D {shape} -> {filters} filters {kernel}x{kernel}, B={batch_size}: per-example filter gradients")
    for xla in (False, True):
        times = {}
        for name, fn in (("batched (summed)", batched), ("pfor while_loop", pfor), ("im2col + einsum", patches)):
            compiled = tf.function(fn, jit_compile=xla)
            times[name] = measure(lambda compiled=compiled: compiled(x, dy).numpy(), repeats)[0]
        base = times["batched (summed)"]
        for name, seconds in times.items():
            print(f"  xla={xla!s:5} {name:18} {1e3 * seconds:8.2f} ms  x batched {seconds / base:6.2f}")


def _reexec_with_fixed_mmap_threshold():
    """Large blocks always mmap'd and unmapped on free (glibc), so each measurement's peak RSS is its own.

    With glibc's default dynamic threshold a freed multi-megabyte block is kept in the heap and reused,
    and later peaks would hide under earlier ones.
    """
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and sys.platform.startswith("linux"):
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
        os.execv(sys.executable, [sys.executable, *sys.argv])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--loop-up-to", type=int, default=512, help="skip the Python loop above this B")
    parser.add_argument("--chunk-size", type=int, default=32, help="also time per-example with this chunk_size")
    parser.add_argument("--conv-batch-size", type=int, default=128, help="B of the Conv2D formulation comparison")
    args = parser.parse_args(argv)

    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} CPUs")
    header = f"{'model':10} {'B':>4} {'method':18} {'ms':>9} {'x plain':>8} {'peak MiB':>9}"
    for model_name in args.models:
        build, shape = MODELS[model_name]
        keras.utils.set_random_seed(0)
        model = build()
        d = model.count_params()
        print(f"\n{model_name}: {d:,} parameters")
        print(header)
        rng = np.random.default_rng(0)
        for batch_size in args.batch_sizes:
            x = tf.constant(rng.normal(size=(batch_size, *shape)).astype("float32"))
            y = tf.constant(rng.integers(0, 10, batch_size))
            check_jax_agrees(model, x, y)
            results = {}
            for name, fn in methods(model, x, y, batch_size <= args.loop_up_to, args.chunk_size).items():
                results[name] = measure(fn, args.repeats if not name.startswith("loop") else 1)
            for name, (seconds, peak) in results.items():
                base = results["plain xla" if ("xla" in name or name.startswith(("jax", "floor"))) else "plain"][0]
                print(f"{model_name:10} {batch_size:>4} {name:18} {1e3 * seconds:9.2f} {seconds / base:8.2f} {peak:9.1f}")
            pe = results["per-example xla"][0]
            summary = (
                f"  -> per-example (xla) / jax = {pe / results['jax vmap(grad)'][0]:.2f}"
                f", per-example (xla) / floor = {pe / results['floor: write B x d'][0]:.1f}"
                + (
                    f", loop (xla) / per-example (xla) = {results['loop xla'][0] / pe:.1f}"
                    f", loop (eager) / per-example (xla) = {results['loop eager'][0] / pe:.1f}"
                    if "loop xla" in results
                    else ""
                )
            )
            if model_name == "wide_cnn":
                floor = batch_size * d * 4 / 2**20
                ratios = ", ".join(
                    f"{name} {peak / floor:.2f}" for name, (_, peak) in results.items() if name.startswith("per-example")
                )
                summary += f"\n  -> floor B x d float32 = {floor:.1f} MiB; peak / floor: {ratios}"
            print(summary)
    conv_formulations(args.conv_batch_size, args.repeats)


if __name__ == "__main__":
    _reexec_with_fixed_mmap_threshold()
    main()
