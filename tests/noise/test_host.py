"""The host draws of an eager CPU step, a block of updates ahead: each row is its key's draw alone.

`noise/host.py` makes the draws of the next updates together once a stream is read in order. Nothing but
the per-call cost may change: every row must equal the reference words of its own key, whatever the order
of the requests (in order, a jump back, another seed, size or stream), and the Gaussian's NumPy rows must
equal its `keras.ops` draw. The NumPy parts run on every backend; the eager PyTorch step uses them.
"""

import keras
import numpy as np
import pytest
import rng_reference as ref
from helpers import to_numpy

from keras_noisygd import _backend, noise
from keras_noisygd.noise import host, threefry

pytestmark = pytest.mark.all_backends


def counting_words(n, stream, calls):
    def make(k0, k1s):
        calls.append(len(k1s))
        return np.stack(threefry._word_rows(k0, k1s, n, stream), 1)
    return make


def test_rows_made_ahead_equal_each_keys_own_words():
    blocks, calls = host.Blocks(), []
    requests = [(7, c, 50, 3) for c in range(40)]  # in order: from the second key on, blocks of AHEAD
    requests += [(7, 5, 50, 3), (7, 6, 50, 3), (9, 6, 50, 3), (7, 7, 50, 3), (7, 6, 20, 3), (7, 8, 50, 0)]
    requests += [(7, 2**32 - 2, 50, 3), (7, 2**32 - 1, 50, 3)]  # the last keys: the block stops at 2**32 - 1
    for k0, k1, n, stream in requests:
        got = blocks.draw("words", np.array([k0, k1]), n, stream, counting_words(n, stream, calls))
        want = ref.words([k0, k1], n, stream)
        np.testing.assert_array_equal(got.astype(np.uint64), np.stack(want))
    # One row for a first key; AHEAD once read in order (keys 1-32, 33-64); a jump back, another seed, size or
    # stream draws one row, and a jump read on in order a block again (6-37, which then serves key 7); the
    # last key, read in order, still gets one row: none lies beyond 2**32 - 1.
    a = host.AHEAD
    assert calls == [1, a, a, 1, a, 1, 1, 1, 1, 1]


def test_large_rows_are_not_drawn_ahead():
    blocks, calls = host.Blocks(), []
    n = 2**17  # beyond _AHEAD_ELEMENTS: a block of one row, memory of one draw only
    for c in range(3):
        blocks.draw("words", np.array([1, c]), n, 0, counting_words(n, 0, calls))
    assert calls == [1, 1, 1]


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("dtype, atol", [("float32", 2e-5), ("float64", 1e-12)])
def test_gaussian_host_rows_equal_its_draw(centered, dtype, atol):
    # NumPy's log1p, cos and mean against the backend's: a few ulps of |1 + std eps| < 1 + 5.5 * 5.8 (float32
    # ulp there 4e-6).
    if dtype == "float64" and _backend.wide_float() != "float64":
        pytest.skip("JAX without jax_enable_x64 has no float64 draw to compare")
    sampler = noise.Gaussian.emulating(batch_size=32, num_examples=1000, centered=centered)
    rows = sampler._host_rows(5, np.arange(10, 14, dtype=np.uint32), 1000, dtype)
    assert rows.shape == (4, 1000) and rows.dtype == np.dtype(dtype)
    for i, k1 in enumerate(range(10, 14)):
        np.testing.assert_allclose(rows[i], to_numpy(sampler.sample([5, k1], 1000, dtype)), rtol=0, atol=atol)
    if centered:
        np.testing.assert_allclose(rows.sum(1), 1000, rtol=1e-5 if dtype == "float32" else 1e-12)


def test_an_eager_step_draws_the_same_weights_in_order_and_alone():
    # On PyTorch the optimizer's draws go through the blocks; elsewhere this is the ops path both times.
    sampler = noise.Gaussian.emulating(batch_size=8, num_examples=64, centered=True)
    in_order = [to_numpy(sampler.sample(keras.ops.convert_to_tensor([3, c]), 64)) for c in range(40)]
    alone = [to_numpy(sampler.sample(keras.ops.convert_to_tensor([3, c]), 64)) for c in (39, 0, 17)]
    for got, c in zip(alone, (39, 0, 17)):
        np.testing.assert_array_equal(got, in_order[c])
    np.testing.assert_allclose(in_order[17], sampler._host_rows(3, np.array([17], np.uint32), 64, "float32")[0],
                               rtol=0, atol=2e-5)


def test_changing_a_drawn_tensor_in_place_leaves_the_next_draw_alone():
    # On PyTorch the weights share memory with a copy of the block's row (`torch.from_numpy`), never the row.
    sampler = noise.Gaussian.emulating(batch_size=8, num_examples=64, centered=True)
    seed = keras.ops.convert_to_tensor([3, 5])
    first = sampler.sample(seed, 64)
    want = to_numpy(first).copy()
    if keras.backend.backend() == "torch":
        first.mul_(0.0)
    np.testing.assert_array_equal(to_numpy(sampler.sample(seed, 64)), want)
