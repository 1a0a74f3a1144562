"""`.keras` files saved by an earlier layout of the package load and continue their training exactly.

The files were written by `tests/support/make_saved_files.py` at commit a66655a (the flat layout, before the
subpackages) on TensorFlow: a functional `NoisyModel` with `GhostBatchNormalization` and `NoisyGD` saved
in the middle of a gradient-accumulation update, a `NoisySequential` with `NoisyAdamW` and a scheduled
emulated batch, and a `NoisyWrapper` with a configured `SGDSampling`. Loading checks the registered names
those files store; continuing checks that the weights, the optimizer's slots and the noise stream came back.
"""

from pathlib import Path

import keras
import make_saved_files
import numpy as np
import pytest

import keras_noisygd as kn

pytestmark = pytest.mark.all_backends

FOLDER = Path(__file__).parent / "data" / "saved_2026-12-04"


@pytest.mark.parametrize("name", sorted(make_saved_files.MODELS))
def test_a_file_saved_by_the_flat_layout_loads_and_continues_exactly(name):
    expected = np.load(FOLDER / f"{name}_expected.npz")
    model = keras.saving.load_model(FOLDER / f"{name}.keras")
    saved = make_saved_files.snapshot(model)
    # Loading copies the saved values: bit for bit. The predictions are recomputed, in another order of
    # float32 sums on JAX and PyTorch than TensorFlow's (a few ulps).
    for key, value in saved.items():
        if key == "predictions":
            np.testing.assert_allclose(value, expected["saved_predictions"], rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_array_equal(value, expected[f"saved_{key}"], err_msg=key)
    x, y = make_saved_files.data()
    make_saved_files.after_load(model, x, y)
    # Continuing draws the same noise on every backend (one generator); the float32 steps differ between
    # backends by the order of their reductions only: ~1e-7 per step, a few steps here. A lost slot, a reset
    # noise counter or a fresh seed changes the weights by O(lr) = O(1e-2).
    for key, value in make_saved_files.snapshot(model).items():
        np.testing.assert_allclose(value, expected[f"continued_{key}"], rtol=1e-5, atol=1e-5, err_msg=key)
    assert type(kn.find_noisy_optimizer(model.optimizer)).__name__ in ("NoisyGD", "NoisyAdamW")
