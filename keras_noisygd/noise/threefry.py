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
independent numbers. The word arithmetic that differs by backend (masking,
shifts, sortable keys) is `keras_noisygd._backend`'s.

Also here: `as_seed`, the one rule for what a seed is, and `uniform`, the
generator's uniforms for user samplers (`keras_noisygd.noise.uniform`).
"""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops

from keras_noisygd import _backend
from keras_noisygd._checks import check_int, is_static
from keras_noisygd.noise import host

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = 0x1BD11BDA


def _add(x, y):
    return _backend.wrap(x + y)


def _rotate_left(x, r):
    return _backend.wrap(_backend.shift_left(x, r)) | _backend.shift_right(x, 32 - r)


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


def threefry2x32_numpy(key, x0, x1):
    """`threefry2x32` on NumPy `uint32` arrays (whose `+` and `<<` wrap modulo `2**32`): the same words."""
    # Arrays (wrapping without overflow warnings): scalars, or `[count, 1]` columns of keys for `[count, n]` words.
    k0, k1 = (np.asarray(k, np.uint32).reshape(np.shape(k) or (1,)) for k in key)
    ks = (k0, k1, k0 ^ k1 ^ np.uint32(_PARITY))
    x0, x1 = x0 + ks[0], x1 + ks[1]
    for group in range(5):
        for r in _ROTATIONS[group % 2]:
            x0 = x0 + x1
            x1 = ((x1 << np.uint32(r)) | (x1 >> np.uint32(32 - r))) ^ x0
        s = group + 1
        x0 = x0 + ks[s % 3]
        x1 = x1 + (ks[(s + 1) % 3] + np.uint32(s))
    return x0, x1


def key_of(seed):
    """The key words of a stateless seed `[seed, update]` (integers in `[0, 2**32)`)."""
    seed = ops.convert_to_tensor(seed)
    words = _backend.wrap(ops.cast(seed, _backend.WORD_DTYPE))
    return words[0], words[1]


def words(seed, n, stream):
    """Two arrays of `n` random 32-bit words: Threefry of the counters `(i, stream)`, `i < n`.

    `n` may be a scalar integer tensor on TensorFlow (a batch size known at run time).
    """
    dtype = _backend.WORD_DTYPE
    on_host = _host_words(seed, n, stream)
    if on_host is not None:
        return tuple(ops.convert_to_tensor(w.astype(dtype)) for w in on_host)  # copies: the rows are shared
    key = key_of(seed)
    index = ops.arange(n, dtype="int32")  # JAX has no int64; batch sizes stay far below 2**31
    index = ops.cast(index, dtype)
    return threefry2x32(key, index, ops.full(ops.shape(index), stream, dtype))


def normals(seed, n, stream, dtype="float32"):
    """`normal(*words(seed, n, stream), dtype)`: `n` standard normals of the stream `stream` of `seed`.

    Where the words are drawn on the host, Box-Muller runs there too, in NumPy
    `dtype` (float32 or float64), a block of updates ahead (`noise/host.py`),
    and the normals cross to the backend once instead of as ~8 `keras.ops`
    calls, each dispatched from Python in eager PyTorch
    (`benchmarks/step_phases.py` times the whole draw). NumPy's `log1p` and
    `cos` may differ from the backend's by a few ulps, as the backends differ
    from each other.
    """
    rows = host_rows(("normals", stream), seed, n, dtype, lambda k0, k1s: normal_rows(k0, k1s, n, stream, dtype))
    return normal(*words(seed, n, stream), dtype) if rows is None else rows


def host_rows(what, seed, n, dtype, make):
    """The row of `seed` of the host draw `make(k0, k1s)` (NumPy rows, `noise/host.py`), or `None` off the host.

    For a sampler's own NumPy draw of a block of keys: `what` names the draw
    (the sampler itself), `make` returns one row of `n` values in `dtype` for
    each key `(k0, k1)`, `k1` in `k1s`. `None` where the step does not draw
    on the host, or `dtype` is not float32 or float64.
    """
    key = _host_key(seed) if dtype in ("float32", "float64") else None
    if key is None:
        return None
    row = host.BLOCKS.draw((what, dtype), key, n, 0, make)
    return _backend.host_tensor(row.copy())  # a copy: the block's rows are shared


def normal_rows(k0, k1s, n, stream, dtype):
    """`normals` of the keys `(k0, k1)`, `k1` in `k1s`, in NumPy `dtype`: a `[len(k1s), n]` array."""
    w0, w1 = _word_rows(k0, k1s, n, stream)
    u0, u1 = _host_uniform(w0, dtype), _host_uniform(w1, dtype)  # as `to_uniform`: the top 24 bits, exact
    return np.sqrt(-2.0 * np.log1p(-u0)) * np.cos((2.0 * math.pi) * u1)


def _host_uniform(w, dtype):
    return (w >> np.uint32(8)).astype(dtype) * np.asarray(2.0**-24, dtype)


def _host_key(seed):
    """The key words of `seed` as NumPy `int64` where an eager step on a CPU draws on the host, else `None`."""
    seed = seed if ops.is_tensor(seed) else ops.convert_to_tensor(seed)
    if not _backend.draws_on_host(seed):
        return None
    return _backend.to_host(seed).astype(np.int64) & 0xFFFFFFFF  # `n` is a Python int there (an eager step)


def _host_words(seed, n, stream):
    """`words(seed, n, stream)` as NumPy `uint32` arrays where an eager step on a CPU draws on the host, else `None`."""
    key = _host_key(seed)
    if key is None:
        return None
    return host.BLOCKS.draw("words", key, n, stream, lambda k0, k1s: np.stack(_word_rows(k0, k1s, n, stream), 1))


def _word_rows(k0, k1s, n, stream):
    """The words of the keys `(k0, k1)` for each `k1` in `k1s`: two `[len(k1s), n]` `uint32` arrays."""
    column = np.full((len(k1s), 1), k0, np.uint32), k1s.reshape(-1, 1)
    return threefry2x32_numpy(column, np.arange(n, dtype=np.uint32), np.full(n, stream, np.uint32))


def to_uniform(w, dtype="float32"):
    """Uniforms in `[0, 1)` from the top 24 bits of each word: exact in any float dtype, on every backend."""
    return ops.cast(_backend.shift_right(w, 8), dtype) * (2.0**-24)


def normal(w0, w1, dtype="float32"):
    """Standard normals by Box-Muller from two word arrays, computed in `dtype` (float32 for a narrower one).

    The uniforms are exact; `log1p` and `cos` differ between backends and XLA by
    a few ulps of `dtype`. A 16-bit float cannot hold the 24-bit uniforms (they
    would round to 1 and give infinite normals), so those normals are float32's, rounded.
    """
    work = dtype if keras.backend.standardize_dtype(dtype) in ("float32", "float64") else "float32"
    radius = ops.sqrt(-2.0 * ops.log1p(-to_uniform(w0, work)))  # 1 - u >= 2**-24: finite
    return ops.cast(radius * ops.cos((2.0 * math.pi) * to_uniform(w1, work)), dtype)


def below(w, n):
    """Integers in `[0, n)` from words: `floor(w * n / 2**32)` (Lemire), bias below `n / 2**32`.

    The 64-bit product is formed from 16-bit halves, so it also runs in `uint32`.
    `n` is a positive integer below `2**31` (a Python int or a scalar tensor).
    """
    n = ops.cast(n, w.dtype)
    low = ops.cast(0xFFFF, w.dtype)
    right = _backend.shift_right
    a, b = right(w, 16), w & low
    c, d = right(n, 16), n & low
    ad, bc = a * d, b * c  # each < 2**32
    middle = right(b * d, 16) + (ad & low) + (bc & low)  # < 3 * 2**16
    return a * c + right(ad, 16) + right(bc, 16) + right(middle, 16)


def smallest(keys, k):
    """A boolean mask of the `k` smallest `keys` (`1 <= k <= n`), ties broken by position.

    With i.i.d. uniform 32-bit keys the mask is a uniform random `k`-subset, up
    to ties at the threshold (probability below `n / 2**32`), which go to the
    lower index; exactly `k` entries are set in any case. One sort, no argsort
    (whose stability differs between backends); `k` may be a tensor.
    """
    keys = _backend.sort_keys(keys)
    n = ops.shape(keys)[0]
    k = ops.clip(ops.cast(k, "int32"), 1, n)  # k > n reaches the sampler's own run-time check instead
    threshold = ops.take(ops.sort(keys), k - 1)
    below_threshold = ops.less(keys, threshold)
    at_threshold = ops.equal(keys, threshold)
    room = k - ops.sum(ops.cast(below_threshold, "int32"))
    first_ties = ops.less_equal(ops.cumsum(ops.cast(at_threshold, "int32")), room)
    return ops.logical_or(below_threshold, ops.logical_and(at_threshold, first_ties))


def as_seed(seed):
    """A stateless seed: an int becomes ``[seed, 0]``; a shape-[2] integer tensor is kept."""
    if is_static(seed):
        if isinstance(seed, (bool, np.bool_)) or not float(seed).is_integer() or not 0 <= seed < 2**32:
            raise ValueError(
                "Argument `seed` must be a Python int in [0, 2**32) or an integer tensor of shape [2]. "
                f"Received: seed={seed!r}"
            )
        return ops.convert_to_tensor(np.array([int(seed), 0], _backend.SEED_DTYPE))
    seed = seed if ops.is_tensor(seed) else ops.convert_to_tensor(seed)
    if len(seed.shape) != 1 or seed.shape[0] != 2 or "int" not in keras.backend.standardize_dtype(seed.dtype):
        raise ValueError(
            "Argument `seed` must be a Python int or an integer tensor of shape [2]. "
            f"Received: seed with dtype {keras.backend.standardize_dtype(seed.dtype)} and shape {tuple(seed.shape)}"
        )
    return seed


def uniform(seed, num_examples, dtype="float32", stream=0):
    """`[num_examples]` uniforms in `[0, 1)` from the samplers' generator, for your own noise classes.

    The same seed gives the same numbers on TensorFlow, JAX and PyTorch, with
    or without XLA (24-bit uniforms from Threefry-2x32; `keras.random` draws
    other numbers on each backend and refuses tensor seeds on some).

    Args:
        seed: A Python int or an integer tensor of shape `[2]`, as `Sampler.sample` receives it.
        num_examples: The number of uniforms (a Python int, or a scalar tensor in a traced
            TensorFlow step).
        dtype: Floating dtype. Defaults to `"float32"`.
        stream: An int in `[0, 2**32)` that selects an independent stream of the same seed
            (the built-in samplers use 0 and 1). Defaults to `0`.

    Returns:
        A `[num_examples]` tensor.
    """
    num_examples = check_int("num_examples", num_examples, 1)
    stream = check_int("stream", stream, 0, maximum=2**32 - 1)
    w, _ = words(as_seed(seed), num_examples, stream)
    return to_uniform(w, keras.backend.standardize_dtype(dtype))
