"""Markers, the per-backend selection of tests, and the fixtures every test shares.

`tests/support/` (shared helpers, NumPy references, worker scripts) is put on `sys.path`, so a test
module anywhere under `tests/` imports `helpers` or `rng_reference` by name.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))

import keras  # noqa: E402
import pytest  # noqa: E402

BACKEND = keras.backend.backend()


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "all_backends: runs on every Keras backend (unmarked tests need KERAS_BACKEND=tensorflow)"
    )
    config.addinivalue_line("markers", "tensorflow_only: needs TensorFlow's own APIs, in a module marked all_backends")
    config.addinivalue_line("markers", "slow: takes more than ~20 s (deselect with -m 'not slow')")


def pytest_collection_modifyitems(config, items):
    """Off TensorFlow, only the tests marked `all_backends` run; the rest need TensorFlow's own APIs."""
    if BACKEND == "tensorflow":
        return
    skip = pytest.mark.skip(reason=f"needs the TensorFlow backend; this run is on {BACKEND!r}")
    for item in items:
        if "all_backends" not in item.keywords or "tensorflow_only" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fixed_keras_seed():
    """Every test starts from the same Keras initialisation seed."""
    keras.utils.set_random_seed(1234)
    yield


@pytest.fixture
def float64():
    """Keras floatx float64 (Keras losses compute in floatx) for exact comparisons.

    JAX computes in float32 unless `jax_enable_x64` is set before it starts, so
    there a float64 test is skipped (its float32 twin, where there is one, runs).
    """
    if BACKEND == "jax":
        pytest.skip("float64 needs jax_enable_x64; the JAX run keeps JAX's default float32")
    previous = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")  # layers read the (cached) global policy
    yield
    keras.config.set_floatx(previous[0])
    keras.config.set_dtype_policy(previous[1])

