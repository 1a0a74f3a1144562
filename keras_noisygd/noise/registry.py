"""The noise classes by name, and their (de)serialization for `keras.saving`."""

from __future__ import annotations

import keras

from keras_noisygd.noise.bernoulli import Bernoulli
from keras_noisygd.noise.gaussian import Gaussian, SparseGaussian
from keras_noisygd.noise.sgd import NoNoise, SGDSampling

_TEMPLATES = {
    "none": NoNoise(),
    "sgd": SGDSampling(),
    "gaussian": Gaussian(),
    "gaussian_centered": Gaussian(centered=True),
    "bernoulli": Bernoulli(),
    "sparse_gaussian": SparseGaussian(),
    "sparse_gaussian_centered": SparseGaussian(centered=True),
}

NAMES = tuple(_TEMPLATES)
"""The string names `get` accepts: `"none"`, `"sgd"`, `"gaussian"`, `"gaussian_centered"`,
`"bernoulli"`, `"sparse_gaussian"`, `"sparse_gaussian_centered"`."""


def get(identifier):
    """Resolves a noise name, config dict or sampler object to a sampler.

    Args:
        identifier: One of `NAMES` (which gives a template, to be calibrated by
            the optimizer's `emulate_batch_size`), a dict from `serialize`, or
            any object with a `sample(seed, num_examples, dtype)` method, returned
            as it is.

    Returns:
        A sampler.

    Example:

    ```python
    keras_noisygd.noise.get("gaussian_centered")   # Gaussian(std=None, centered=True)
    ```
    """
    if isinstance(identifier, str):
        if identifier not in _TEMPLATES:
            raise ValueError(
                f"Argument `noise` must be one of {list(NAMES)}, a sampler or a sampler config. "
                f"Received: noise={identifier!r}"
            )
        return _TEMPLATES[identifier]
    if isinstance(identifier, dict):
        return keras.saving.deserialize_keras_object(identifier)
    if callable(getattr(identifier, "sample", None)):
        return identifier
    raise ValueError(
        "Argument `noise` must be a noise name, a sampler (an object with a "
        "`sample(seed, num_examples, dtype)` method) or a sampler config. "
        f"Received: noise={identifier!r}"
    )


def serialize(sampler) -> dict:
    """The `keras.saving` config of a sampler; `get` turns it back into one."""
    return keras.saving.serialize_keras_object(sampler)
