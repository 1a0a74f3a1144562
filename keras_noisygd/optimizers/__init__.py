"""Keras optimizers that carry the sampling noise: `NoiseMixin`, `NoisyGD`, `NoisyAdam`, `NoisyAdamW`.

`mixin.py` holds the draw (`NoiseMixin.noise_weights`) and its random state,
`validation.py` the argument checks, and one module per optimizer the thin
classes on Keras's own (`noisy_gd.py`, `noisy_adam.py`).
"""

from keras_noisygd.optimizers.mixin import NoiseMixin, find_noisy_optimizer
from keras_noisygd.optimizers.noisy_adam import NoisyAdam, NoisyAdamW
from keras_noisygd.optimizers.noisy_gd import NoisyGD

__all__ = ["NoiseMixin", "NoisyGD", "NoisyAdam", "NoisyAdamW", "find_noisy_optimizer"]
