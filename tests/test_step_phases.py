"""`benchmarks/step_phases.py` at a tiny size: every phase is timed, and the package's functions come back unwrapped."""

import sys
from pathlib import Path

import keras
import pytest

from keras_noisygd import _backend
from keras_noisygd.train_step import stateful

pytestmark = [
    pytest.mark.all_backends,
    pytest.mark.skipif(keras.backend.backend() == "jax", reason="JAX's train_step takes the state in and out: no eager phases"),
]

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import step_phases  # noqa: E402


def test_the_phases_add_up_to_the_step_and_the_functions_are_restored():
    before = (_backend.apply_gradients, stateful.report_loss)
    medians, alone, after = step_phases.phases("mlp_784_256_256_10", batch_size=64, steps=2, rounds=1)
    assert (_backend.apply_gradients, stateful.report_loss) == before
    assert set(medians) == {"draw", "apply (with the noise counter)", "loss report", "metrics", "forward, loss, backward", "whole step"}
    for phase, (noisy, stock) in medians.items():
        assert noisy > 0 and (stock > 0) == (phase != "draw"), phase
    # The timed phases are part of the step, not double-counted: what they leave (the pass) is positive above.
    assert all(medians["whole step"][i] > medians["forward, loss, backward"][i] for i in (0, 1))
    assert alone > 0 and after > 0
