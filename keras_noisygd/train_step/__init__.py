"""The noisy train step: one form for the stateful backends, one for JAX, and what they share.

`stateful.py` is the step of TensorFlow and PyTorch (they differ only in how a
gradient is taken and applied: `keras_noisygd._backend`), `jax.py` the step of
JAX, whose trainer passes the state in and out, and `common.py` what both use:
the loss check, the clean loss report, the per-output loss metrics guard.
`keras_noisygd.NoisyTrainStep.train_step` calls `step(model, ...)` of the
form this backend needs.
"""

from keras_noisygd import _backend

if _backend.STATELESS:  # the one choice of a step form, made once at import
    from keras_noisygd.train_step.jax import train_step as step
else:
    from keras_noisygd.train_step.stateful import train_step as step

__all__ = ["step"]
