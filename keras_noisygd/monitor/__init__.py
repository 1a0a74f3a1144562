"""`NoiseMonitor`: what the injected noise does, measured from the per-example gradients of a probe batch.

Everything is a function of the probe batch's Gram matrix `K = G G^T`
(`K_ij = <G_i, G_j>`, `n x n`) and a weight covariance `C` (`n x n`):

    g                 = (1/n) sum_i G_i                 |g|^2 = 1^T K 1 / n^2
    noise  xi         = (1/n) sum_i (m_i - 1) G_i        |xi|^2 = (m-1)^T K (m-1) / n^2
    tr Cov(xi)        = tr(C K) / n^2                   (C: the covariance of m)
    tr Sigma          = (tr K - n |g|^2) / (n - 1)       (per-example gradient covariance)
    noise scale       = tr Sigma / |g|^2                 (McCandlish et al. 2018, B_simple)

`statistics.py` computes them (NumPy); `callback.py` is the callback, which
forms `K` with `keras_noisygd.per_example.gram.ProbeGram`.
"""

from keras_noisygd.monitor.callback import NoiseMonitor
from keras_noisygd.monitor.statistics import STATISTICS, noise_statistics

__all__ = ["NoiseMonitor", "noise_statistics", "STATISTICS"]
