"""Sampling-noise classes: per-example loss weights with mean 1.

Every sampler here draws a vector ``m`` of per-example *loss weights* with
``E[m_i] = 1``. Training on the re-weighted loss ``(1/N) sum_i m_i l_i`` takes
the step ``G W`` with ``W = m / N``: the paper's multiplicative noise, in one
backward pass. The docs' "The idea" page has the maths; the noise classes and
their calibration follow Wu et al., ICML 2020 (https://arxiv.org/abs/1906.07405).

Samplers are small frozen value objects. `sample(seed, num_examples, dtype)`
is a pure function of its seed, written with `keras.ops` on the counter-based
generator of `threefry.py`: the same seed gives the same weights on
TensorFlow, JAX and PyTorch, with or without XLA (bit for bit for the
discrete classes, to float32 rounding for the Gaussian ones).
`covariance(num_examples)` is the exact covariance of the weights in NumPy.

A sampler whose noise-size parameter is `None` (``Gaussian()``,
``Bernoulli()``, ``SGDSampling()``, ``SparseGaussian()``) is a *template*: the
optimizer's `emulate_batch_size=b` fills it in at every step through
`calibrated(b, N)`, with ``N`` the number of examples of that step.

Conventions:
    * Noise is a per-example loss weight with mean 1, not an additive or a
      per-coordinate perturbation of the gradient.
    * ``N`` (`num_examples`) is the population the emulated SGD batch ``b``
      (`batch_size`) is drawn from: the whole training set for full-batch noisy
      GD, the actual batch for the large-batch variant.

The package: `sampler.py` the contract (`Sampler`) and the helpers its classes
share, `sgd.py` (`NoNoise`, `SGDSampling`), `gaussian.py` (`Gaussian`,
`SparseGaussian`), `bernoulli.py`, `threefry.py` the generator (and
`uniform`), `host.py` an eager CPU step's NumPy draws, `registry.py` the names and (de)serialization. A new noise class
goes into a module of its family and into `registry.py`'s table if it has a
name (docs/contributing.md).
"""

from keras_noisygd.noise.bernoulli import Bernoulli
from keras_noisygd.noise.gaussian import Gaussian, SparseGaussian
from keras_noisygd.noise.registry import NAMES, get, serialize
from keras_noisygd.noise.sampler import Sampler
from keras_noisygd.noise.sgd import NoNoise, SGDSampling
from keras_noisygd.noise.threefry import uniform

__all__ = [
    "Sampler",
    "NoNoise",
    "SGDSampling",
    "Gaussian",
    "Bernoulli",
    "SparseGaussian",
    "get",
    "serialize",
    "NAMES",
    "uniform",
]
