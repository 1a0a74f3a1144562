"""A NumPy reference of `keras_noisygd._rng` and of every sampler's draw, written from the specification.

The backend tests compare the library's draws on the running Keras backend
with these, so that every backend is checked against one independent
implementation (and so against each other).
"""

import math

import numpy as np

MASK = 0xFFFFFFFF
ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def threefry2x32(key, x0, x1):
    """Threefry-2x32-20 in uint64 arithmetic masked to 32 bits (Salmon et al. 2011)."""
    k0, k1 = (np.uint64(k) for k in key)
    ks = (k0, k1, k0 ^ k1 ^ np.uint64(0x1BD11BDA))
    m = np.uint64(MASK)
    x0 = (np.asarray(x0, np.uint64) + ks[0]) & m
    x1 = (np.asarray(x1, np.uint64) + ks[1]) & m
    for group in range(5):
        for r in ROTATIONS[group % 2]:
            x0 = (x0 + x1) & m
            x1 = ((x1 << np.uint64(r)) | (x1 >> np.uint64(32 - r))) & m
            x1 = x1 ^ x0
        s = group + 1
        x0 = (x0 + ks[s % 3]) & m
        x1 = (x1 + ks[(s + 1) % 3] + np.uint64(s)) & m
    return x0, x1


def words(seed, n, stream):
    return threefry2x32(seed, np.arange(n), np.full(n, stream))


def uniform(w):
    return (w >> np.uint64(8)).astype(np.float32) * np.float32(2.0**-24)


def normal(w0, w1):
    u0, u1 = uniform(w0).astype(np.float64), uniform(w1).astype(np.float64)
    return np.sqrt(-2.0 * np.log1p(-u0)) * np.cos(2.0 * math.pi * u1)


def smallest(keys, k):
    order = np.lexsort((np.arange(len(keys)), keys))  # by key, ties by position
    mask = np.zeros(len(keys), bool)
    mask[order[:k]] = True
    return mask


def sgd(seed, n, b, replacement=False, dtype=np.float32):
    """In the weights' dtype, as the library computes them: (N / b) * counts."""
    w0, _ = words(seed, n if not replacement else b, 0)
    scale = dtype(n) / dtype(b)
    if replacement:
        draws = (w0 * np.uint64(n)) >> np.uint64(32)
        return scale * np.bincount(draws.astype(np.int64), minlength=n).astype(dtype)
    return scale * smallest(w0, b).astype(dtype)


def gaussian(seed, n, std, centered=False):
    eps = normal(*words(seed, n, 0))
    if centered:
        eps = eps - eps.mean()
    return 1 + std * eps


def bernoulli(seed, n, p, dtype=np.float32):
    w0, _ = words(seed, n, 0)
    return (uniform(w0) < np.float32(p)).astype(dtype) / dtype(p)


def sparse_gaussian(seed, n, k, std, centered=False):
    mask = smallest(words(seed, n, 0)[0], k)
    eps = normal(*words(seed, n, 1)) * mask
    if centered:
        eps = (eps - eps.sum() / k) * mask
    return 1 + std * eps
