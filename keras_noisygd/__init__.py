"""keras_noisygd: multiplicative-noise gradient descent for Keras 3.

Noisy GD (Wu et al., ICML 2020, https://arxiv.org/abs/1906.07405) replaces
SGD's sampling noise by a freely chosen noise class with the same mean and
covariance, applied as per-example loss weights.
"""

from keras_noisygd import layers, monitor, noise
from keras_noisygd.monitor import NoiseMonitor
from keras_noisygd.gradients import noisy_gradients
from keras_noisygd.models import NoisyModel, NoisySequential, NoisyTrainStep, noisy
from keras_noisygd.per_example import per_example_gradients
from keras_noisygd.optimizers import NoiseMixin, NoisyAdam, NoisyAdamW, NoisyGD, find_noisy_optimizer

__version__ = "0.1.0"

__all__ = [
    "noise",
    "layers",
    "NoisyGD",
    "NoisyAdam",
    "NoisyAdamW",
    "NoiseMixin",
    "find_noisy_optimizer",
    "NoisyModel",
    "NoisySequential",
    "NoisyTrainStep",
    "noisy",
    "noisy_gradients",
    "per_example_gradients",
    "NoiseMonitor",
]
