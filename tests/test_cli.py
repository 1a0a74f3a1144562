"""The comparison CLI: smoke runs of both commands, their files, and bad inputs."""

import csv
import re
import json

import keras
import numpy as np
import pytest

from keras_noisygd.experiments import cli

TINY = ["--dataset", "digits", "--train-size", "64", "--steps", "20", "--eval-every", "10", "--seeds", "2", "-b", "8", "--no-xla"]


def test_compare_writes_a_table_csv_json_and_plot(tmp_path, capsys):
    assert cli.main(["compare", *TINY, "--noise", "gaussian_centered", "bernoulli", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for label in ("GD ", "SGD(b=8)", "GD+gaussian_centered", "GD+bernoulli"):
        assert label in out
    rows = list(csv.DictReader(open(tmp_path / "runs.csv")))
    assert len(rows) == 4 * 2 and {r["seed"] for r in rows} == {"0", "1"}
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["n"] == 64 and len(results["summary"]) == 4
    for run in results["runs"]:
        assert [step for step, _ in run["curve"]] == [10, 20]
        assert 0.0 <= run["test_acc"] <= 1.0 and run["curve"][-1][1] == run["test_acc"]
        assert run["gap"] == pytest.approx(run["train_acc"] - run["test_acc"])
    assert (tmp_path / "test_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    summary = (tmp_path / "summary.md").read_text()
    acc = {r["method"]: r["test_acc"] for r in results["summary"]}
    share = 100 * (acc["GD+bernoulli"] - acc["GD"]) / (acc["SGD(b=8)"] - acc["GD"])
    assert f"| GD+bernoulli | {acc['GD+bernoulli']:.4f}" in summary and f"| {share:.0f}% |" in summary


def test_large_batch_with_ghost_batch_norm_and_momentum(tmp_path, capsys):
    args = ["large-batch", *TINY, "-B", "32", "--ghost-batch-size", "8", "--momentum", "0.9", "--weight-decay", "1e-4",
            "--noise", "sgd", "--model", "cnn", "--out", str(tmp_path)]
    assert cli.main(args) == 0
    assert "SGD(B)+sgd" in capsys.readouterr().out
    rows = list(csv.DictReader(open(tmp_path / "runs.csv")))
    assert [r["method"] for r in rows[:3]] == ["SGD(b=8)", "SGD(B=32)", "SGD(B)+sgd"]


def test_npz_data(tmp_path, capsys):
    rng = np.random.default_rng(0)
    path = tmp_path / "toy.npz"
    np.savez(path, x_train=rng.normal(size=(40, 6)), y_train=rng.integers(0, 2, 40), x_test=rng.normal(size=(10, 6)), y_test=rng.integers(0, 2, 10))
    # XLA on (the default) here; the other smoke tests use --no-xla to save compile time.
    assert cli.main(["compare", "--data", str(path), "--train-size", "40", "--steps", "10", "--eval-every", "10", "--seeds", "1", "-b", "4", "--noise", "sgd", "--out", str(tmp_path / "out")]) == 0
    assert "toy, n=40" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["compare", "--dataset", "imagenet"], r"Argument `dataset` must be one of \['mnist1d', 'digits'.*Received: dataset='imagenet'"),
        (["compare", "--dataset", "digits", "--noise", "brownian"], r"Argument `noise` must be among .*Received: noise='brownian'"),
        (["compare", "--dataset", "digits", "--noise", "none"], r"Received: noise='none'"),
        (["large-batch", "--dataset", "digits", "--train-size", "500", "-b", "64", "-B", "32"], r"Argument `batch_size` must be in \[1, large_batch_size=32\]. Received: batch_size=64"),
        (["large-batch", "--dataset", "digits", "--train-size", "100", "-B", "200"], r"Argument `large_batch_size` must be in \[1, the training-set size=100\]. Received: large_batch_size=200"),
        (["compare", "--dataset", "digits", "--train-size", "5000"], r"Argument `train_size` must be in \[1, 1000\] for digits. Received: train_size=5000"),
        (["compare", "--data", "missing.npz"], r"Argument `data` must be an existing .npz file. Received: data='missing.npz'"),
        (["compare", "--dataset", "digits", "--num-samples", "10"], r"Argument `num_samples` only applies to mnist1d"),
    ],
)
def test_bad_inputs_give_one_clear_line(args, message, capsys):
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("keras-noisygd ") and len(err.strip().splitlines()) == 1
    assert re.search(message, err)


def test_npz_without_the_expected_keys(tmp_path, capsys):
    path = tmp_path / "bad.npz"
    np.savez(path, x_train=np.zeros((4, 2)), y_train=np.zeros(4))
    assert cli.main(["compare", "--data", str(path)]) == 2
    assert "lacks ['x_test', 'y_test']" in capsys.readouterr().err


def test_unknown_command_exits_with_usage():
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["benchmark"])
    assert exit_info.value.code == 2


def test_keras_datasets_loader_on_small_arrays(monkeypatch):
    # The real loading code, fed small arrays instead of a download.
    from keras_noisygd.experiments import data

    rng = np.random.default_rng(0)
    fake = ((rng.integers(0, 256, (6, 4, 4)), rng.integers(0, 3, 6)), (rng.integers(0, 256, (2, 4, 4)), rng.integers(0, 3, (2, 1))))
    monkeypatch.setattr(keras.datasets.fashion_mnist, "load_data", lambda: fake)
    dataset = data.load("fashion_mnist")
    assert dataset.x_train.shape == (6, 4, 4, 1) and dataset.x_train.max() <= 1.0 and dataset.x_train.dtype == np.float32
    assert dataset.y_test.shape == (2,) and dataset.num_classes == 3


def test_python_dash_m_entry_point():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "keras_noisygd", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "compare" in result.stdout and "large-batch" in result.stdout
