"""The generator and every sampler's draw against a NumPy reference, the same on every Keras backend.

`rng_reference.py` (tests/support/) is written from the specification (Random123's Threefry-2x32-20 and each
class's draw), so every backend is checked against one implementation and so against each other. CI runs this
file on TensorFlow, JAX and PyTorch.
"""

import keras
import numpy as np
import pytest
import rng_reference as ref
from helpers import to_numpy

from keras_noisygd import _backend, noise
from keras_noisygd.noise import threefry

pytestmark = pytest.mark.all_backends

SEEDS = [[0, 0], [5, 7], [2**31 - 1, 123_456]]


def words(values):
    return keras.ops.convert_to_tensor(np.asarray(values, np.int64 if keras.backend.backend() == "torch" else np.uint32))


# Known-answer vectors of Threefry-2x32-20 from Random123 (kat_vectors): key, counter, output.
KNOWN_ANSWERS = [
    ((0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6B200159, 0x99BA4EFE)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
    ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)),
]


@pytest.mark.parametrize("key, counter, expected", KNOWN_ANSWERS)
def test_threefry_known_answers(key, counter, expected):
    k = words(key)
    y0, y1 = threefry.threefry2x32((k[0], k[1]), words([counter[0]]), words([counter[1]]))
    assert (int(to_numpy(y0)[0]), int(to_numpy(y1)[0])) == expected
    assert tuple(int(v[0]) for v in ref.threefry2x32(key, [counter[0]], [counter[1]])) == expected
    # The NumPy rounds that eager PyTorch on a CPU draws with (`draws_on_host`).
    y0, y1 = threefry.threefry2x32_numpy(key, np.array([counter[0]], np.uint32), np.array([counter[1]], np.uint32))
    assert (int(y0[0]), int(y1[0])) == expected


def test_words_are_drawn_on_the_host_only_for_an_eager_step_on_a_cpu():
    key = threefry.key_of(keras.ops.convert_to_tensor([3, 4]))
    # PyTorch's eager CPU step takes the NumPy rounds (test_words_equal_the_reference checks their bits);
    # TensorFlow and JAX keep them in the traced or compiled step.
    assert _backend.draws_on_host(key[0]) == (keras.backend.backend() == "torch")


@pytest.mark.parametrize("seed", SEEDS)
def test_words_equal_the_reference(seed):
    got = [to_numpy(w) for w in threefry.words(keras.ops.convert_to_tensor(seed), 1000, 3)]
    want = ref.words(seed, 1000, 3)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g.astype(np.uint64), w)


def test_integers_below_n_are_the_high_word_of_the_product():
    w = np.random.default_rng(0).integers(0, 2**32, 5000, dtype=np.uint64)
    for n in (1, 7, 60_000, 2**31 - 1):
        got = to_numpy(threefry.below(words(w), n)).astype(np.uint64)
        np.testing.assert_array_equal(got, (w * np.uint64(n)) >> np.uint64(32))


def test_smallest_breaks_ties_by_position_and_sets_exactly_k():
    keys = np.array([5, 1, 3, 3, 3, 0, 9, 3], np.uint32)  # the 3rd-5th smallest tie at 3
    for k in range(1, 9):
        got = to_numpy(threefry.smallest(words(keys), k))
        np.testing.assert_array_equal(got, ref.smallest(keys.astype(np.uint64), k))
        assert got.sum() == k


# Discrete classes are bit-identical to the reference; Gaussian ones go through float32 log/cos on the backend
# and float64 in NumPy: |eps| < 6 with float32 rounding ~1e-7 relative, so 1e-5 absolute on std * eps.
DRAWS = [
    (noise.SGDSampling(3), lambda s, n: ref.sgd(s, n, 3), 0),
    (noise.SGDSampling(3, replacement=True), lambda s, n: ref.sgd(s, n, 3, replacement=True), 0),
    (noise.Bernoulli(0.3), lambda s, n: ref.bernoulli(s, n, 0.3), 0),
    (noise.Gaussian(1.5), lambda s, n: ref.gaussian(s, n, 1.5), 1e-5),
    (noise.Gaussian(1.5, centered=True), lambda s, n: ref.gaussian(s, n, 1.5, centered=True), 1e-5),
    (noise.SparseGaussian(3, 1.5), lambda s, n: ref.sparse_gaussian(s, n, 3, 1.5), 1e-5),
    (noise.SparseGaussian(3, 1.5, centered=True), lambda s, n: ref.sparse_gaussian(s, n, 3, 1.5, True), 1e-5),
]


@pytest.mark.parametrize("sampler, reference, atol", DRAWS, ids=[repr(d[0]) for d in DRAWS])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n", [3, 8, 1000])
def test_draws_equal_the_numpy_reference(sampler, reference, atol, seed, n):
    got = to_numpy(sampler.sample(keras.ops.convert_to_tensor(seed), n))
    np.testing.assert_allclose(got, reference(seed, n), rtol=0, atol=atol)


def test_subsets_are_distinct_at_real_sizes():
    # 32-bit keys tie often at N = 60,000 (probability ~0.34 per draw); exactly b examples are still chosen.
    m = to_numpy(noise.SGDSampling(64).sample([3, 1], 60_000))
    assert (m > 0).sum() == 64 and np.isclose(m.sum(), 60_000, rtol=1e-6)


def test_public_uniform_is_the_samplers_generator():
    got = to_numpy(noise.uniform([5, 7], 1000, stream=2))
    np.testing.assert_array_equal(got, ref.uniform(ref.words([5, 7], 1000, 2)[0]))
    assert 0 <= got.min() and got.max() < 1
    with pytest.raises(ValueError, match=r"Argument `stream` must be an integer in \[0, 4294967295\]"):
        noise.uniform(0, 3, stream=-1)


# The reference is float64: float32 normals are within a few ulps of |eps| < 5.8 (1e-5), float16 ones within
# half an ulp of float16 at 5.8 (2e-3) plus float32's error.
@pytest.mark.parametrize("dtype, atol, reference_atol", [("float32", 2e-6, 1e-5), ("float64", 1e-12, 1e-5), ("float16", 0, 3e-3)])
def test_normals_are_box_muller_of_the_words(dtype, atol, reference_atol):
    # `normals` is `normal(*words(...))`; on PyTorch's eager CPU step its Box-Muller runs in NumPy, whose float32
    # log1p and cos may differ from PyTorch's by a few ulps: |eps| < 5.8, an ulp there is 4.8e-7 (float16 stays
    # on the backend, so it is exact). JAX without x64 gives float32 for float64 in both.
    seed = keras.ops.convert_to_tensor([5, 7])
    got = to_numpy(threefry.normals(seed, 1000, 1, dtype))
    want = to_numpy(threefry.normal(*threefry.words(seed, 1000, 1), dtype))
    assert got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=0, atol=atol)
    np.testing.assert_allclose(got, ref.normal(*ref.words([5, 7], 1000, 1)), rtol=0, atol=reference_atol)
