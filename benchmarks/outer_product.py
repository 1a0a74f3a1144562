"""The Dense rule's per-example rows, `einsum("bi,bo->bio", a, g)`, on each runtime: what bounds JAX's MLP rows.

`per_example_gradients` on JAX takes 2-3x TensorFlow's time on the MLP 784-256-256-10
(`per_example_backends.py`), although both run the same layer rows. This script times the one operation
that dominates it, the first layer's rows (`a`: `[B, 784]` inputs, `g`: `[B, 256]` output gradients), in one
process:

- TensorFlow `tf.einsum` in a `tf.function`, without and with XLA;
- JAX `jnp.einsum` under `jax.jit`, the same product written as a broadcast multiply, and `jnp.full` of the
  same shape (the floor of writing a fresh output);
- `x + 1` over an array of the rows' shape, compiled by each runtime's XLA: any elementwise pass that writes
  as much, so that the product's cost can be told from a loop fusion's;
- NumPy's broadcast product into a buffer written before (one thread, no page faults).

Medians over `--repeats` calls after a warm-up call, and each one's ratio to TensorFlow's `tf.einsum`. The
script first checks that every runtime returns the same rows. On a CPU, run it also under glibc's
`MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184` (large blocks kept in the heap): a JAX output then
no longer comes from fresh pages, which shows whether the allocator or the computation is the cost.

    python benchmarks/outer_product.py [--batch-size 128] [--inputs 784] [--outputs 256] [--repeats 9]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from _timing import median_seconds  # noqa: E402  (benchmarks/ is the script's folder)


def methods(a, g):
    """`{name: fn}`: each returns the `[B, I, O]` rows (the floor: an array of their shape), computed when it returns
    (TensorFlow's CPU functions return when their result is ready; JAX's `block_until_ready`)."""
    ta, tg = tf.constant(a), tf.constant(g)
    ja, jg = jnp.asarray(a), jnp.asarray(g)
    tf_einsum = tf.function(lambda x, y: tf.einsum("bi,bo->bio", x, y))
    tf_xla = tf.function(lambda x, y: tf.einsum("bi,bo->bio", x, y), jit_compile=True)
    jax_einsum = jax.jit(lambda x, y: jnp.einsum("bi,bo->bio", x, y))
    shape = (a.shape[0], a.shape[1], g.shape[1])
    jax_fill = jax.jit(lambda s: jnp.full(shape, s, "float32"))
    jax_broadcast = jax.jit(lambda x, y: x[:, :, None] * y[:, None, :])
    rows = np.asarray(jax_einsum(ja, jg))
    tr, jr = tf.constant(rows), jnp.asarray(rows)
    tf_plus_one = tf.function(lambda x: x + 1.0, jit_compile=True)
    jax_plus_one = jax.jit(lambda x: x + 1.0)
    out = np.empty(shape, np.float32)
    return {
        "TensorFlow tf.einsum": lambda: tf_einsum(ta, tg),
        "TensorFlow tf.einsum, XLA": lambda: tf_xla(ta, tg),
        "JAX jnp.einsum, jax.jit": lambda: jax_einsum(ja, jg).block_until_ready(),
        "JAX broadcast multiply, jax.jit": lambda: jax_broadcast(ja, jg).block_until_ready(),
        "JAX jnp.full (write floor)": lambda: jax_fill(1.5).block_until_ready(),
        "TensorFlow rows + 1, XLA (pass)": lambda: tf_plus_one(tr),
        "JAX rows + 1, jax.jit (pass)": lambda: jax_plus_one(jr).block_until_ready(),
        "NumPy into a written buffer": lambda: np.multiply(a[:, :, None], g[:, None, :], out=out),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--inputs", type=int, default=784)
    parser.add_argument("--outputs", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(args.batch_size, args.inputs)).astype(np.float32)
    g = rng.normal(size=(args.batch_size, args.outputs)).astype(np.float32)
    table = methods(a, g)
    want = a[:, :, None] * g[:, None, :]
    for name, fn in table.items():
        if "floor" in name:
            continue
        # The same rows everywhere (float32 products, each exactly rounded); a pass adds 1 to them.
        np.testing.assert_array_equal(np.asarray(fn()), want + np.float32(1) if "(pass)" in name else want)
    mb = want.nbytes / 2**20
    print(f"rows [{args.batch_size}, {args.inputs}, {args.outputs}] float32 ({mb:.0f} MiB); median ms over {args.repeats} calls; "
          f"MALLOC_MMAP_MAX_={os.environ.get('MALLOC_MMAP_MAX_', 'unset')}")
    times = {name: 1e3 * median_seconds(fn, args.repeats) for name, fn in table.items()}
    base = times["TensorFlow tf.einsum"]
    print(f"{'method':34s} {'ms':>8s} {'GB/s':>6s} {'/ tf.einsum':>12s}")
    for name, ms in times.items():
        print(f"{name:34s} {ms:8.2f} {want.nbytes / ms / 1e6:6.1f} {ms / base:12.2f}")
    return times


if __name__ == "__main__":
    main()
