"""The noise statistics `NoiseMonitor` logs, from a probe batch's Gram matrix (NumPy, float64).

Everything is a function of the probe batch's Gram matrix `K = G G^T`
(`K_ij = <G_i, G_j>`, `n x n`) and a weight covariance `C` (`n x n`):

    g                 = (1/n) sum_i G_i                 |g|^2 = 1^T K 1 / n^2
    noise  xi         = (1/n) sum_i (m_i - 1) G_i        |xi|^2 = (m-1)^T K (m-1) / n^2
    tr Cov(xi)        = tr(C K) / n^2                   (C: the covariance of m)
    tr Sigma          = (tr K - n |g|^2) / (n - 1)       (per-example gradient covariance)
    noise scale       = tr Sigma / |g|^2                 (McCandlish et al. 2018, B_simple)
"""

from __future__ import annotations

import numpy as np

STATISTICS = (
    "grad_norm",
    "noise_norm",
    "noise_to_grad",
    "noise_cov_trace",
    "sgd_cov_trace",
    "noise_scale",
)


def noise_statistics(gram, weights, noise_covariance, sgd_covariance):
    """The monitor's statistics from the Gram matrix of the per-example gradients (NumPy, float64).

    Args:
        gram: `[n, n]` matrix `K_ij = <G_i, G_j>`.
        weights: `[n]` one draw `m` of the noise weights.
        noise_covariance: `[n, n]` covariance of `m` for the injected noise.
        sgd_covariance: `[n, n]` covariance of SGD(b)'s weights out of `n`.

    Returns:
        A dict with the `STATISTICS` keys (floats).
    """
    gram = np.asarray(gram, np.float64)
    n = gram.shape[0]
    ones = np.ones(n)
    grad_sq = ones @ gram @ ones / n**2
    deviation = np.asarray(weights, np.float64) - 1.0
    noise_sq = deviation @ gram @ deviation / n**2
    per_example_trace = (np.trace(gram) - n * grad_sq) / (n - 1) if n > 1 else 0.0
    grad_norm = np.sqrt(max(grad_sq, 0.0))
    noise_norm = np.sqrt(max(noise_sq, 0.0))
    return {
        "grad_norm": float(grad_norm),
        "noise_norm": float(noise_norm),
        "noise_to_grad": float(noise_norm / grad_norm) if grad_norm > 0 else float("inf"),
        "noise_cov_trace": float(np.sum(noise_covariance * gram) / n**2),  # tr(C K), both symmetric
        "sgd_cov_trace": float(np.sum(sgd_covariance * gram) / n**2),
        "noise_scale": float(per_example_trace / grad_sq) if grad_sq > 0 else float("inf"),
    }
