"""benchmarks/cifar10_recipe.py reads XLA's FLOPs and memory of a micro-step: checked on a model counted by hand."""

import importlib.util
from pathlib import Path

import keras
import pytest

import keras_noisygd as kn

pytestmark = pytest.mark.all_backends


def test_the_analysis_counts_a_dense_step_as_three_forward_passes():
    if keras.backend.backend() != "jax":
        pytest.skip("the recipe compiles its micro-step with JAX")
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "cifar10_recipe.py"
    spec = importlib.util.spec_from_file_location("cifar10_recipe", path)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    inputs = keras.Input((32, 32, 3))
    model = kn.NoisyModel(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(inputs)))
    flops, used = recipe.analyse(model, 64)
    # Forward 2*B*3072*10 multiply-adds, backward twice that (input and weight gradients; XLA drops the
    # unused input gradient, so 2x to 3x forward); softmax, loss and bias add < 2% here.
    forward = 2 * 64 * 3072 * 10
    assert 1.9 * forward <= flops <= 3.1 * forward
    # At least the batch (64 x 3072 float32), the kernel and its gradient.
    assert used >= 4 * (64 * 3072 + 2 * 3072 * 10)
