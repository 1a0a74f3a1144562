"""keras_noisygd: multiplicative-noise gradient descent for Keras 3.

Noisy GD (Wu et al., ICML 2020, https://arxiv.org/abs/1906.07405) replaces
SGD's sampling noise by a freely chosen noise class with the same mean and
covariance, applied as per-example loss weights.
"""

from keras_noisygd import _launch

_launch.quiet_start()  # only when this process is the `keras-noisygd` command line

from keras_noisygd import layers, monitor, noise  # noqa: E402, F401  (keras_noisygd.monitor, as before)
from keras_noisygd.batching import micro_batches  # noqa: E402
from keras_noisygd.gradients import noisy_gradients  # noqa: E402
from keras_noisygd.models import NoisyModel, NoisySequential, NoisyTrainStep, noisy  # noqa: E402
from keras_noisygd.monitor import NoiseMonitor  # noqa: E402
from keras_noisygd.optimizers import NoiseMixin, NoisyAdam, NoisyAdamW, NoisyGD, find_noisy_optimizer  # noqa: E402
from keras_noisygd.per_example import per_example_gradients  # noqa: E402

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
    "micro_batches",
    "per_example_gradients",
    "NoiseMonitor",
]
