"""Counter-based random numbers from integer operations: the same bits on TensorFlow, JAX and PyTorch.

The samplers draw from Threefry-2x32 with 20 rounds (Salmon et al., SC 2011,
"Parallel random numbers: as easy as 1, 2, 3"; JAX's default generator): a
pure function of a 64-bit key and a 64-bit counter made of additions, xors
and rotations of 32-bit words, so every backend computes the same bits, with
or without XLA. `keras.random` cannot give that: each backend has its own
generator and seed dtype.

Words are `uint32` on TensorFlow and JAX (which has no 64-bit integers
unless `jax_enable_x64` is set) and `int64` masked to 32 bits after every
addition and shift on PyTorch (which has no `uint32` arithmetic); the values,
always in `[0, 2**32)`, are the same. The rounds use the backends' own
operators (`+`, `^`, `|`, shifts) rather than `keras.ops`: in eager PyTorch a
`keras.ops` call costs several times the operation itself, and a draw is
~150 of them.

Key: the sampler's stateless seed `[seed, update]`. Counter: `(i, stream)`
for example `i`, so each use (`stream`) of a step's key has its own
independent numbers.
"""

from __future__ import annotations

import math

import keras
from keras import ops

MASK = 0xFFFFFFFF
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = 0x1BD11BDA


_BACKEND = keras.backend.backend()


def word_dtype():
    """`"int64"` on PyTorch, `"uint32"` elsewhere."""
    return "int64" if _BACKEND == "torch" else "uint32"


def _wrap(x):
    """`x mod 2**32`: a mask on PyTorch's `int64` words, nothing on `uint32`."""
    return x & MASK if _BACKEND == "torch" else x


if _BACKEND == "tensorflow":
    import tensorflow as tf

    def _shift_left(x, r):
        return tf.bitwise.left_shift(x, tf.constant(r, x.dtype))

    def _shift_right(x, r):
        return tf.bitwise.right_shift(x, tf.constant(r, x.dtype))

else:  # JAX arrays and PyTorch tensors have the shift operators

    def _shift_left(x, r):
        return x << r

    def _shift_right(x, r):
        return x >> r


def _add(x, y):
    return _wrap(x + y)


def _rotate_left(x, r):
    return _wrap(_shift_left(x, r)) | _shift_right(x, 32 - r)


def threefry2x32(key, x0, x1):
    """Threefry-2x32-20 of the counters `(x0, x1)` under `key = (k0, k1)`: two arrays of words.

    Args:
        key: A pair of scalar words.
        x0, x1: Word arrays of one shape (the two halves of each counter).

    Returns:
        The pair of output word arrays, each of the counters' shape.
    """
    k0, k1 = key
    ks = (k0, k1, k0 ^ k1 ^ ops.cast(_PARITY, k0.dtype))
    x0, x1 = _add(x0, ks[0]), _add(x1, ks[1])
    for group in range(5):  # 5 x 4 = 20 rounds, a key injection after every 4
        for r in _ROTATIONS[group % 2]:
            x0 = _add(x0, x1)
            x1 = _rotate_left(x1, r) ^ x0
        s = group + 1
        x0 = _add(x0, ks[s % 3])
        x1 = _add(x1, _add(ks[(s + 1) % 3], ops.cast(s, x1.dtype)))
    return x0, x1


def key_of(seed):
    """The key words of a stateless seed `[seed, update]` (integers in `[0, 2**32)`)."""
    seed = ops.convert_to_tensor(seed)
    words = _wrap(ops.cast(seed, word_dtype()))
    return words[0], words[1]


def words(seed, n, stream):
    """Two arrays of `n` random 32-bit words: Threefry of the counters `(i, stream)`, `i < n`.

    `n` may be a scalar integer tensor on TensorFlow (a batch size known at run time).
    """
    dtype = word_dtype()
    index = ops.arange(n, dtype="int32")  # JAX has no int64; batch sizes stay far below 2**31
    index = ops.cast(index, dtype)
    return threefry2x32(key_of(seed), index, ops.full(ops.shape(index), stream, dtype))


def uniform(w, dtype="float32"):
    """Uniforms in `[0, 1)` from the top 24 bits of each word: exact in any float dtype, on every backend."""
    return ops.cast(_shift_right(w, 8), dtype) * (2.0**-24)


def normal(w0, w1, dtype="float32"):
    """Standard normals by Box-Muller from two word arrays, computed in `dtype`.

    The uniforms are exact; `log1p` and `cos` differ between backends and XLA by
    a few ulps of `dtype`.
    """
    radius = ops.sqrt(-2.0 * ops.log1p(-uniform(w0, dtype)))  # 1 - u >= 2**-24: finite
    return radius * ops.cos((2.0 * math.pi) * uniform(w1, dtype))


def below(w, n):
    """Integers in `[0, n)` from words: `floor(w * n / 2**32)` (Lemire), bias below `n / 2**32`.

    The 64-bit product is formed from 16-bit halves, so it also runs in `uint32`.
    `n` is a positive integer below `2**31` (a Python int or a scalar tensor).
    """
    n = ops.cast(n, w.dtype)
    low = ops.cast(0xFFFF, w.dtype)
    a, b = _shift_right(w, 16), w & low
    c, d = _shift_right(n, 16), n & low
    ad, bc = a * d, b * c  # each < 2**32
    middle = _shift_right(b * d, 16) + (ad & low) + (bc & low)  # < 3 * 2**16
    return a * c + _shift_right(ad, 16) + _shift_right(bc, 16) + _shift_right(middle, 16)


def smallest(keys, k):
    """A boolean mask of the `k` smallest `keys` (`1 <= k <= n`), ties broken by position.

    With i.i.d. uniform 32-bit keys the mask is a uniform random `k`-subset, up
    to ties at the threshold (probability below `n / 2**32`), which go to the
    lower index; exactly `k` entries are set in any case. One sort, no argsort
    (whose stability differs between backends); `k` may be a tensor.
    """
    if _BACKEND == "tensorflow":
        keys = ops.cast(keys, "int64")  # TensorFlow sorts no uint32
    n = ops.shape(keys)[0]
    k = ops.clip(ops.cast(k, "int32"), 1, n)  # k > n reaches the sampler's own run-time check instead
    threshold = ops.take(ops.sort(keys), k - 1)
    below_threshold = ops.less(keys, threshold)
    at_threshold = ops.equal(keys, threshold)
    room = k - ops.sum(ops.cast(below_threshold, "int32"))
    first_ties = ops.less_equal(ops.cumsum(ops.cast(at_threshold, "int32")), room)
    return ops.logical_or(below_threshold, ops.logical_and(at_threshold, first_ties))
