"""Samplers against paper-notes sections 3 and 6: mean, covariance, calibration, purity.

Tests marked `all_backends` run on every backend; the moments from 40,000 draws run on TensorFlow (on the
others, test_backends.py checks every sampler's draws against the NumPy reference, which carries them over).
"""

import numpy as np
import pytest
import rng_reference
import tensorflow as tf
from helpers import to_numpy

from keras_noisygd import noise

N = 8
DRAWS = 40_000

CONFIGURED = [
    noise.NoNoise(),
    noise.SGDSampling(3),
    noise.SGDSampling(3, replacement=True),
    noise.Gaussian(1.3),
    noise.Gaussian(1.3, centered=True),
    noise.Bernoulli(0.3),
    noise.SparseGaussian(3, 1.1),
    noise.SparseGaussian(3, 1.1, centered=True),
    noise.Gaussian.emulating(2, N, centered=True),
    noise.SparseGaussian.emulating(2, N, centered=True),
    noise.Bernoulli.emulating(2, N),
]
IDS = [repr(s) for s in CONFIGURED]


def draws(sampler, n=N, count=DRAWS, seed=7):
    seeds = tf.stack([tf.fill([count], tf.constant(seed, tf.int64)), tf.range(count, dtype=tf.int64)], 1)
    fn = tf.function(lambda s: tf.vectorized_map(lambda one: sampler.sample(one, n, "float64"), s))
    return fn(seeds).numpy()


@pytest.mark.parametrize("sampler", CONFIGURED, ids=IDS)
def test_mean_and_covariance_match_the_analytic_ones(sampler):
    m = draws(sampler)
    centred = m - m.mean(0)
    products = centred[:, :, None] * centred[:, None, :]
    # Standard errors from the draws themselves: SE(mean_i) = sd_i/sqrt(D) and
    # SE(cov_ij) = sd(products_ij)/sqrt(D). At D = 40,000 that is ~0.5% of the
    # variance for the Gaussian classes. Five SE leaves a false alarm at < 1e-6 per
    # entry (the seed is fixed anyway), while a calibration error of 5% in a
    # variance is ~10 SE. 1e-12 absorbs rounding where the noise is exactly zero.
    mean_se = m.std(0) / np.sqrt(DRAWS)
    np.testing.assert_array_less(np.abs(m.mean(0) - 1.0), 5 * mean_se + 1e-12)
    cov_se = products.std(0) / np.sqrt(DRAWS)
    np.testing.assert_array_less(np.abs(products.mean(0) - sampler.covariance(N)), 5 * cov_se + 1e-12)


@pytest.mark.parametrize(
    "sampler",
    [noise.SGDSampling(3), noise.SGDSampling(3, True), noise.Gaussian(2.0, True), noise.SparseGaussian(4, 2.0, True)],
    ids=repr,
)
def test_centred_classes_sum_to_n_exactly(sampler):
    m = draws(sampler, count=200)
    # float64 rounding of a sum of 8 numbers of size ~10: 1e-12 is ~1000 ulps.
    np.testing.assert_allclose(m.sum(1), N, rtol=0, atol=1e-12)


def test_sgd_sampling_picks_exactly_b_examples():
    m = draws(noise.SGDSampling(3), count=500)
    np.testing.assert_array_equal(np.sort(m, 1)[:, :-3], 0.0)
    np.testing.assert_allclose(np.sort(m, 1)[:, -3:], N / 3, rtol=1e-15)


def test_sgd_with_replacement_weights_are_counts():
    counts = draws(noise.SGDSampling(5, True), count=500) * 5 / N
    np.testing.assert_allclose(counts, np.round(counts), atol=1e-12)
    assert (counts > 1.5).any()  # with 5 draws out of 8, repeats must occur in 500 tries


def test_sparse_gaussian_touches_exactly_k_examples():
    m = draws(noise.SparseGaussian(3, 1.0), count=500)
    np.testing.assert_array_equal((m != 1.0).sum(1), 3)


@pytest.mark.parametrize("sampler", CONFIGURED, ids=IDS)
def test_sample_is_a_pure_function_of_the_seed(sampler):
    seed = tf.constant([3, 11], tf.int64)
    eager = sampler.sample(seed, N).numpy()
    np.testing.assert_array_equal(sampler.sample(seed, N).numpy(), eager)
    xla = tf.function(lambda s, n: sampler.sample(s, n), jit_compile=True)
    # Same random bits under XLA (dynamic N); log/cos may differ by an ulp or two.
    np.testing.assert_allclose(xla(seed, tf.constant(N)).numpy(), eager, rtol=1e-6, atol=1e-6)
    if not isinstance(sampler, noise.NoNoise) and not (isinstance(sampler, noise.Bernoulli) and sampler.p == 1):
        other = sampler.sample(tf.constant([3, 12], tf.int64), N).numpy()
        assert not np.array_equal(other, eager)


def sgd_cov(b, n):
    return n * (n - b) / (b * (n - 1)) * (np.eye(n) - 1.0 / n)


@pytest.mark.all_backends
@pytest.mark.parametrize("b", [1, 2, 5, 8])
def test_calibration_formulas(b):
    # Hand-written formulas of paper-notes section 3, N = 8.
    n = N
    np.testing.assert_allclose(noise.Gaussian.emulating(b, n, centered=True).covariance(n), sgd_cov(b, n), atol=1e-12)
    np.testing.assert_allclose(noise.SGDSampling.emulating(b, n).covariance(n), sgd_cov(b, n), atol=1e-12)
    np.testing.assert_allclose(noise.Gaussian.emulating(b, n).covariance(n), n / b * np.eye(n), atol=1e-12)
    np.testing.assert_allclose(noise.Bernoulli.emulating(b, n).covariance(n), (n / b - 1) * np.eye(n), atol=1e-12)
    for k in (2, 4, 8):
        sparse = noise.SparseGaussian.emulating(b, n, num_noisy=k)
        assert sparse.std == pytest.approx(n / np.sqrt(b * k), rel=1e-14)
        np.testing.assert_allclose(sparse.covariance(n), n / b * np.eye(n), atol=1e-12)
        sparse_c = noise.SparseGaussian.emulating(b, n, num_noisy=k, centered=True)
        assert sparse_c.std**2 == pytest.approx(n * (n - b) / (b * (k - 1)), rel=1e-14, abs=1e-14)
        np.testing.assert_allclose(sparse_c.covariance(n), sgd_cov(b, n), atol=1e-12)


@pytest.mark.all_backends
def test_sparse_classes_reduce_to_the_full_ones_when_k_is_n():
    for centered in (False, True):
        full = noise.Gaussian.emulating(3, N, centered=centered)
        sparse = noise.SparseGaussian.emulating(3, N, num_noisy=N, centered=centered)
        np.testing.assert_allclose(sparse.covariance(N), full.covariance(N), atol=1e-12)
    m = to_numpy(noise.SparseGaussian(N, 1.0).sample(5, N))
    assert (m != 1.0).all()


def test_calibration_with_a_tensor_batch_size_matches_python():
    fn = tf.function(lambda n: noise.Gaussian(centered=True).calibrated(3, n).std)
    assert fn(tf.constant(N)).numpy() == pytest.approx(noise.Gaussian.emulating(3, N, centered=True).std, rel=1e-15)


@pytest.mark.all_backends
@pytest.mark.parametrize(
    "sampler", [noise.SGDSampling(N), noise.Bernoulli(1.0), noise.Gaussian.emulating(N, N, centered=True),
                noise.SparseGaussian.emulating(N, N, centered=True)], ids=repr
)
def test_degenerate_settings_are_plain_gd(sampler):
    np.testing.assert_array_equal(to_numpy(sampler.sample(9, N, "float32")), np.ones(N))


@pytest.mark.all_backends
@pytest.mark.parametrize("name", noise.NAMES)
def test_names_give_templates_and_round_trip(name):
    sampler = noise.get(name)
    assert sampler.name == name
    assert sampler.is_template == (name != "none")
    assert noise.get(noise.serialize(sampler)) == sampler
    calibrated = sampler.calibrated(2, N)
    assert not calibrated.is_template and calibrated.name == name
    assert noise.get(noise.serialize(calibrated)) == calibrated


@pytest.mark.all_backends
@pytest.mark.parametrize("sampler", CONFIGURED, ids=IDS)
def test_config_round_trip(sampler):
    restored = noise.get(noise.serialize(sampler))
    assert restored == sampler and type(restored) is type(sampler)


BAD = [
    (lambda: noise.Gaussian(-1.0), r"Argument `std` must be a finite number >= 0. Received: std=-1.0"),
    (lambda: noise.Gaussian(float("nan")), r"Argument `std` must be .* Received: std=nan"),
    (lambda: noise.Gaussian(float("inf")), r"Received: std=inf"),
    (lambda: noise.Gaussian("1"), r"Received: std='1'"),
    (lambda: noise.Gaussian(1.0, centered="yes"), r"Argument `centered` must be True or False"),
    (lambda: noise.Bernoulli(1.5), r"Argument `p` must be in \(0, 1\]. Received: p=1.5"),
    (lambda: noise.Bernoulli(0.0), r"Received: p=0.0"),
    (lambda: noise.SGDSampling(0), r"Argument `batch_size` must be None or an integer >= 1. Received: batch_size=0"),
    (lambda: noise.SGDSampling(2.5), r"Received: batch_size=2.5"),
    (lambda: noise.SGDSampling(True), r"Received: batch_size=True"),
    (lambda: noise.SparseGaussian(0, 1.0), r"Argument `num_noisy` must be None or an integer >= 1. Received: num_noisy=0"),
    (lambda: noise.SparseGaussian(1, 1.0, centered=True), r"`num_noisy` must be None or an integer >= 2. Received: num_noisy=1"),
    (lambda: noise.SparseGaussian(None, 1.0), r"`num_noisy` is required when `std` is given"),
    (lambda: noise.SGDSampling(9).sample(0, N), r"`batch_size` must be <= the number of examples N. Received: batch_size=9"),
    (lambda: noise.SparseGaussian(9, 1.0).sample(0, N), r"`num_noisy` must be <= the number of examples N"),
    (lambda: noise.Gaussian(1.0).sample(0, 0), r"`num_examples` must be an integer >= 1. Received: num_examples=0"),
    (lambda: noise.Gaussian(1.0).sample([1, 2, 3], N), r"`seed` must be a Python int or an integer tensor of shape \[2\]"),
    (lambda: noise.Gaussian().sample(0, N), r"Gaussian.std is None, so this sampler is a template"),
    (lambda: noise.Gaussian.emulating(9, N), r"Argument `batch_size` must be <= num_examples. Received: batch_size=9, num_examples=8"),
    (lambda: noise.Bernoulli.emulating(0, N), r"Argument `batch_size` must be an integer >= 1. Received: batch_size=0"),
    (lambda: noise.get("gausian"), r"Argument `noise` must be one of \['none', 'sgd'.*Received: noise='gausian'"),
    (lambda: noise.get(3), r"Argument `noise` must be a noise name.*Received: noise=3"),
]


@pytest.mark.all_backends
@pytest.mark.parametrize("make, message", BAD, ids=[m for _, m in BAD])
def test_bad_arguments_raise_clear_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("sampler", [noise.SGDSampling(5), noise.SparseGaussian(5, 1.0)], ids=repr)
def test_too_small_dynamic_batch_fails_at_run_time(sampler):
    graph = tf.function(lambda n: sampler.sample(0, n))
    with pytest.raises(tf.errors.InvalidArgumentError, match="must be <= the number of examples N"):
        graph(tf.constant(4))
    # XLA drops assertions; the weights are NaN instead of silently wrong.
    xla = tf.function(lambda n: sampler.sample(0, n), jit_compile=True)
    assert np.isnan(xla(tf.constant(4)).numpy()).all()
    np.testing.assert_array_equal(xla(tf.constant(8)).numpy(), sampler.sample(0, 8).numpy())


@pytest.mark.all_backends
def test_float64_weights_keep_full_precision(float64):
    # The weights are 1 + std * eps with eps computed in float64; a Python std must enter in float64 (rounded
    # through float32 it would be off by ~1e-8 relative), so (m - 1) / std is the same eps for any std.
    seed = [17, 2]
    eps = [(to_numpy(noise.Gaussian(std).sample(seed, N, "float64")) - 1) / std for std in (0.3, 0.7)]
    np.testing.assert_allclose(eps[0], eps[1], rtol=1e-14)
    reference = rng_reference.gaussian(seed, N, 1.0) - 1  # NumPy Box-Muller on the same bits, float64
    np.testing.assert_allclose(eps[0], reference, rtol=1e-13, atol=1e-13)  # float64 log/cos on both sides
    keep = rng_reference.uniform(rng_reference.words(seed, N, 0)[0]) < np.float32(0.3)
    np.testing.assert_array_equal(to_numpy(noise.Bernoulli(0.3).sample(seed, N, "float64")), keep / 0.3)
