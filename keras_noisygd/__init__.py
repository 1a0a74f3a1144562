"""keras_noisygd: multiplicative-noise gradient descent for Keras 3.

Noisy GD (Wu et al., ICML 2020, https://arxiv.org/abs/1906.07405) replaces
SGD's sampling noise by a freely chosen noise class with the same mean and
covariance, applied as per-example loss weights.
"""

from keras_noisygd import _launch

_launch.quiet_start()  # only when this process is the `keras-noisygd` command line

import keras  # noqa: E402

from keras_noisygd import layers, noise  # noqa: E402
from keras_noisygd.gradients import noisy_gradients  # noqa: E402
from keras_noisygd.models import NoisyModel, NoisySequential, NoisyTrainStep, noisy  # noqa: E402
from keras_noisygd.optimizers import NoiseMixin, NoisyAdam, NoisyAdamW, NoisyGD, find_noisy_optimizer  # noqa: E402

if keras.backend.backend() == "tensorflow":
    from keras_noisygd import monitor  # noqa: E402, F401  (keras_noisygd.monitor, as before)
    from keras_noisygd.monitor import NoiseMonitor  # noqa: E402
    from keras_noisygd.per_example import per_example_gradients  # noqa: E402
else:  # built on tf.vectorized_map and tf.function for now: a clear error on the other backends
    from keras_noisygd._tf_only import NoiseMonitor, per_example_gradients  # noqa: E402

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
