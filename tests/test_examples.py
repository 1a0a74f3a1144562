"""Smoke tests: the examples run end to end on a tiny configuration."""

import importlib.util
from pathlib import Path

import keras
import numpy as np
import pytest

import keras_noisygd as kn
from keras_noisygd.experiments import architectures, data

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


def test_streamed_accumulated_updates_equal_the_in_memory_full_batch(float64, tmp_path):
    # The example's file-backed stream of micro-batches (k = 4 per update) against fit(x, y, batch_size=n) on
    # the same data in memory: the same per-example operations summed in another order, a relative rounding
    # of ~1e-16 per step in float64; 3 updates with momentum stay far inside rtol 1e-10 (a wrongly
    # calibrated or mis-sliced draw moves the weights by ~1e-2: tests/test_accumulation.py).
    example = load("streaming_full_batch")
    dataset = data.load("mnist1d", 200)
    n, shape = len(dataset.x_train), dataset.x_train.shape[1:]
    paths = example.write_shards(dataset.x_train, dataset.y_train, tmp_path, num_shards=3)
    settings = dict(lr=0.1, emulate_batch_size=8, seed=3, momentum=0.9)
    streamed = example.train("NoisyGD", paths, n, shape, dataset.num_classes, micro_batch_size=n // 4, updates=3,
                             **settings)
    assert int(streamed.optimizer.iterations.numpy()) == 3

    keras.utils.set_random_seed(settings["seed"])
    model = architectures.build("cnn", shape, dataset.num_classes)
    model.compile(
        kn.NoisyGD(0.1, momentum=0.9, noise="gaussian_centered", emulate_batch_size=8, seed=3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    initial = model.get_weights()  # the streamed run's initial weights too (same seed)
    model.fit(dataset.x_train, dataset.y_train, batch_size=n, epochs=3, shuffle=False, verbose=0)
    for u, v, w in zip(streamed.get_weights(), model.get_weights(), initial):
        assert u.dtype == np.float64
        np.testing.assert_allclose(u, v, rtol=1e-10, atol=1e-13)
        assert not np.allclose(u, w, rtol=0, atol=1e-6)  # every weight moved: the comparison is not vacuous


def test_streaming_example_trains_both_methods_one_update_per_pass(capsys):
    results = load("streaming_full_batch").main(
        ["--num-samples", "500", "--micro-batch-size", "100", "--updates", "6", "--batch-size", "8"]
    )
    assert set(results) == {"GD", "NoisyGD"}
    for r in results.values():
        assert r["updates"] == 6  # 6 passes of k = 4 micro-batches: 6 updates, not 24
        assert 0.0 <= r["test_acc"] <= 1.0 and r["seconds"] > 0
    out = capsys.readouterr().out
    assert "k = 4 micro-steps per update" in out and "NoisyGD gaussian_centered ~ SGD(8)" in out


def test_streaming_example_refuses_a_micro_batch_that_does_not_divide_n():
    with pytest.raises(ValueError, match=r"`--micro-batch-size` must divide the training set size 400.*=150"):
        load("streaming_full_batch").main(["--num-samples", "500", "--micro-batch-size", "150", "--updates", "1"])
