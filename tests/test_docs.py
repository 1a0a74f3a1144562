"""Every public name is documented and listed in the API reference."""

import inspect
from pathlib import Path

import pytest

import keras_noisygd as kn
from keras_noisygd import layers, noise

API = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
PUBLIC = [("keras_noisygd", name, getattr(kn, name)) for name in kn.__all__] + [
    ("keras_noisygd.noise", name, getattr(noise, name)) for name in noise.__all__
] + [("keras_noisygd.layers", name, getattr(layers, name)) for name in layers.__all__]


@pytest.mark.parametrize("module, name, obj", PUBLIC, ids=[f"{m}.{n}" for m, n, _ in PUBLIC])
def test_public_name_is_in_the_api_reference(module, name, obj):
    assert f"::: {module}.{name}" in API or (name == "noise" and "::: keras_noisygd.noise" in API)


@pytest.mark.parametrize("module, name, obj", [p for p in PUBLIC if p[1] != "NAMES"], ids=[f"{m}.{n}" for m, n, _ in PUBLIC if n != "NAMES"])
def test_public_name_has_a_docstring(module, name, obj):
    assert inspect.getdoc(obj) and len(inspect.getdoc(obj)) > 40


@pytest.mark.parametrize(
    "method",
    [noise.Sampler.sample, noise.Sampler.covariance, noise.Sampler.emulating, noise.Sampler.calibrated,
     kn.NoiseMixin.noise_weights, kn.NoisyTrainStep.train_step],
    ids=lambda m: m.__qualname__,
)
def test_public_methods_have_docstrings(method):
    assert inspect.getdoc(method)
