"""Smoke tests: the examples run end to end on a tiny configuration."""

import importlib.util
from pathlib import Path

import numpy as np


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_full_batch_digits_example_runs_and_reports_every_method(capsys):
    results = load("full_batch_digits").main(["--steps", "40", "--seeds", "1", "--train-size", "200", "--batch-size", "8"])
    assert set(results) == {"GD", "SGD", "NoisyGD"}
    for runs in results.values():
        assert runs.shape == (1, 3)
        train_acc, test_acc, seconds = runs[0]
        assert 0.3 < train_acc <= 1.0 and 0.3 < test_acc <= 1.0  # 40 steps already beat chance (0.1) by far
        assert seconds > 0
    out = capsys.readouterr().out
    assert "NoisyGD gaussian_centered ~ SGD(8)" in out and "GD (full batch)" in out


def test_noise_monitor_example_plots_both_runs(tmp_path, capsys):
    out = tmp_path / "monitor.png"
    runs = load("noise_monitor").main(["--steps", "12", "--every", "4", "--train-size", "100", "--out", str(out)])
    assert [h["step"] for h in runs["NoisyGD"]] == [0, 4, 8, 12]
    assert runs["GD"][-1]["noise_cov_trace"] == 0.0  # no noise injected
    assert runs["NoisyGD"][-1]["noise_cov_trace"] > 0.0
    assert out.stat().st_size > 10_000  # a real PNG with three panels
    assert "NoisyGD" in capsys.readouterr().out


def test_export_savedmodel_example_serves_the_trained_predictions(tmp_path, capsys):
    results = load("export_savedmodel").main(["--steps", "20", "--train-size", "300", "--out", str(tmp_path / "sm")])
    assert results["accuracy"] > 0.5  # 20 full-batch steps: ~0.7 on the held-out digits, chance is 0.1
    np.testing.assert_array_equal(results["served"], results["expected"])  # the example also checks both loaders
    assert (tmp_path / "sm" / "saved_model.pb").exists()
    out = capsys.readouterr().out
    assert "keras.layers.TFSMLayer   max |prediction difference| = 0.0e+00" in out
