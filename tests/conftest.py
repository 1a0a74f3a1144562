import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fixed_keras_seed():
    """Every test starts from the same Keras initialisation seed."""
    keras.utils.set_random_seed(1234)
    yield


@pytest.fixture
def float64():
    """Keras floatx float64 (Keras losses compute in floatx) for exact comparisons."""
    previous = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")  # layers read the (cached) global policy
    yield
    keras.config.set_floatx(previous[0])
    keras.config.set_dtype_policy(previous[1])
