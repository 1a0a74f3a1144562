"""The comparison CLI: smoke runs of both commands, their files, and bad inputs."""

import csv
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from keras_noisygd import _launch
from keras_noisygd.experiments import cli, data, runner

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
        assert [p["updates"] for p in run["curve"]] == [10, 20]
        # The last point is the trained model on the same examples (no --curve-size: all of them).
        last = run["curve"][-1]
        assert last["test_acc"] == run["test_acc"] and last["train_acc"] == run["train_acc"]
        assert last["test_loss"] == pytest.approx(run["test_loss"]) and last["train_loss"] == pytest.approx(run["train_loss"])
        assert run["gap"] == pytest.approx(run["train_acc"] - run["test_acc"])
        assert run["seconds"] > 0 and run["compile_seconds"] >= 0  # two chunks: the first one's excess is compilation
    curves = list(csv.DictReader(open(tmp_path / "curves.csv")))
    assert len(curves) == 4 * 2 * 2 and set(curves[0]) == {"method", "seed", "updates", "train_loss", "train_acc", "test_loss", "test_acc"}
    first = results["runs"][0]
    assert float(curves[0]["test_loss"]) == pytest.approx(first["curve"][0]["test_loss"])
    for name in ("test_accuracy.png", "train_test.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    summary = (tmp_path / "summary.md").read_text()
    acc = {r["method"]: r["test_acc"] for r in results["summary"]}
    assert f"| GD+bernoulli | {acc['GD+bernoulli']:.4f}" in summary
    std = {r["method"]: r["test_acc_std"] for r in results["summary"]}
    if abs(acc["SGD(b=8)"] - acc["GD"]) > max(std["GD"], std["SGD(b=8)"]):
        share = 100 * (acc["GD+bernoulli"] - acc["GD"]) / (acc["SGD(b=8)"] - acc["GD"])
        assert f"| {share:.0f}% |" in summary
    else:
        assert "| no gap |" in summary


def summary_row(method, test_acc, test_acc_std):
    return dict(method=method, test_acc=test_acc, test_acc_std=test_acc_std, train_acc=1.0, gap=1.0 - test_acc, seconds=1.0)


@pytest.mark.parametrize(
    "gd, sgd, gd_std, sgd_std, expected",
    [
        (0.5, 0.7, 0.01, 0.005, "| 50% |"),   # gap 0.2, the noisy run (0.6) closes half
        (0.5, 0.53, 0.01, 0.01, "| 333% |"),  # a small gap, but above both spreads: the share is printed
        (0.5, 0.505, 0.01, 0.002, "| no gap |"),  # gap 0.005 within GD's seed std
        (0.5, 0.505, 0.002, 0.01, "| no gap |"),  # ... or within SGD's
    ],
)
def test_share_of_the_gap_needs_a_gap_beyond_the_seed_spread(gd, sgd, gd_std, sgd_std, expected):
    from keras_noisygd.experiments import report

    summary = [summary_row("GD", gd, gd_std), summary_row("SGD", sgd, sgd_std), summary_row("GD+x", 0.6, 0.0)]
    lines = report.markdown(summary, "GD", "SGD").splitlines()
    assert lines[-1].endswith(expected), lines[-1]
    assert lines[2].endswith("|  |") and lines[3].endswith("|  |")  # no share for the two ends themselves


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
    # The real loading code, fed small arrays instead of a download (Fashion-MNIST: tests/experiments).
    from keras_noisygd.experiments import data

    rng = np.random.default_rng(0)
    fake = ((rng.integers(0, 256, (6, 4, 4, 3)), rng.integers(0, 3, (6, 1))), (rng.integers(0, 256, (2, 4, 4, 3)), rng.integers(0, 3, (2, 1))))
    monkeypatch.setattr(keras.datasets.cifar10, "load_data", lambda: fake)
    dataset = data.load("cifar10")
    assert dataset.x_train.shape == (6, 4, 4, 3) and dataset.x_train.max() <= 1.0 and dataset.x_train.dtype == np.float32
    assert dataset.y_test.shape == (2,) and dataset.num_classes == 3


def _trained_weights(method, config, dataset, seed=0):
    model, curve = runner.fit(dataset, method, config, seed)
    # Trainable weights only: batch norm's moving statistics (inference only) move once per forward
    # pass, so k times per update in micro-batches (docs/scale.md).
    return [w.numpy() for w in model.trainable_weights], curve.points


@pytest.mark.parametrize(
    "method, ghost",
    [
        (runner.Method("GD+sgd", 64, "sgd", 8), None),  # full-batch noisy GD: 4 micro-batches of 16
        (runner.Method("GD+gaussian_centered", 64, "gaussian_centered", 8), None),
        (runner.Method("SGD(B=32)", 32), 8),  # shuffled large batches of stock SGD, ghost batch norm
        (runner.Method("SGD(B)+bernoulli", 32, "bernoulli", 8), 8),
    ],
    ids=lambda value: getattr(value, "label", str(value)),
)
def test_micro_batches_train_the_same_updates_as_whole_batches(method, ghost):
    dataset = data.load("digits").subset(64)
    config = runner.Config("mlp", steps=6, lr=0.2, momentum=0.9, ghost_batch_size=ghost, eval_every=3,
                           width=16, jit_compile=False)
    whole, whole_curve = _trained_weights(method, config, dataset)
    split, split_curve = _trained_weights(method, dataclasses.replace(config, micro_batch_size=16), dataset)
    # float32: the accumulated mean of 2-4 micro-batch gradients differs from the whole batch's by rounding
    # (~1e-7 relative per step); after 6 momentum steps that stays far below 1e-4, while one different noise
    # draw, data order or batch-norm grouping would move the weights by ~1e-2.
    for a, b in zip(whole, split):
        np.testing.assert_allclose(b, a, atol=1e-4)
    assert [p["updates"] for p in split_curve] == [p["updates"] for p in whole_curve] == [3, 6]  # the curve counts updates
    if ghost is None:  # with batch norm the test accuracy also depends on the moving statistics
        for key in ("test_acc", "train_acc"):
            assert [p[key] for p in split_curve] == pytest.approx([p[key] for p in whole_curve], abs=0.02)


def test_compare_with_micro_batches_records_them(tmp_path, capsys):
    args = ["compare", *TINY, "--noise", "gaussian", "--micro-batch-size", "16", "--out", str(tmp_path)]
    assert cli.main(args) == 0
    assert "digits, n=64: GD vs SGD(b=8) vs noisy GD, micro-batches of 16" in capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["config"]["micro_batch_size"] == 16
    for run in results["runs"]:
        assert [p["updates"] for p in run["curve"]] == [10, 20] and run["steps"] == 20


@pytest.mark.parametrize(
    "args, message",
    [
        (["compare", "--micro-batch-size", "24"], r"Argument `micro_batch_size` must divide the batch of every method "
         r"it splits: GD trains on batches of 64. Pass a divisor of 64 \(the largest below 24 is 16\) or at least 64. "
         r"Received: micro_batch_size=24"),
        (["compare", "--micro-batch-size", "0"], r"Argument `micro_batch_size` must be an integer >= 1. Received: micro_batch_size=0"),
        (["compare", "--steps", "25"], r"Argument `eval_every` must divide `steps`. Received: eval_every=10, steps=25"),
    ],
)
def test_bad_micro_batch_sizes_give_one_clear_line(args, message, capsys):
    assert cli.main([*args[:1], *TINY, *args[1:]]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(message, err), err


# A TensorFlow C++ log line ("I0000 00:00:... cudart_stub.cc:31] ...") or absl's pre-init warning.
CPP_LOG_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:|absl::InitializeLog|cpu_feature_guard|rebuild TensorFlow", re.M)


def test_python_dash_m_prints_the_table_and_no_tensorflow_log_lines(tmp_path):
    # XLA on (the default), so its service.cc / device_compiler.h lines would show if the log level were not set.
    args = ["compare", *TINY[:-1], "--seeds", "1", "--noise", "sgd", "--out", str(tmp_path)]
    result = subprocess.run([sys.executable, "-m", "keras_noisygd", *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "GD+sgd" in result.stdout
    assert not CPP_LOG_LINE.search(result.stdout + result.stderr), result.stderr


def test_console_script_prints_no_tensorflow_log_lines():
    script = Path(sys.executable).with_name("keras-noisygd")
    assert script.exists(), "tasks.py installs the package (and its console script) into the environment"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "compare" in result.stdout and "large-batch" in result.stdout
    assert not CPP_LOG_LINE.search(result.stdout + result.stderr), result.stderr


def test_a_library_import_keeps_tensorflow_s_own_logging():
    # Only the command line is quieted: `import keras_noisygd` in a user's program leaves the log level
    # where `import tensorflow` alone leaves it (TensorFlow sets its own default).
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    levels = []
    for module in ("tensorflow", "keras_noisygd"):
        code = f"import os, {module}; print(os.environ.get('TF_CPP_MIN_LOG_LEVEL'))"
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
        assert result.returncode == 0, result.stderr
        levels.append(result.stdout.strip())
    assert levels[1] == levels[0] != "3"


@pytest.mark.parametrize(
    "orig_argv, argv0, expected",
    [
        (["python", "-m", "keras_noisygd", "compare"], "-m", True),
        (["python", "-X", "dev", "-m", "keras_noisygd.experiments.cli"], "-m", True),
        (["/venv/bin/python", "/venv/bin/keras-noisygd", "compare"], "/venv/bin/keras-noisygd", True),
        (["python", "-m", "pytest", "tests"], "/venv/bin/pytest", False),
        (["python", "-m", "keras_noisygd_extra"], "-m", False),
        (["python", "train.py"], "train.py", False),
        (["python", "-c", "import keras_noisygd"], "-c", False),
    ],
)
def test_which_processes_count_as_the_command_line(orig_argv, argv0, expected):
    assert _launch.launched_as_command(orig_argv, argv0) is expected


def test_quiet_start_drops_only_the_start_up_lines(tmp_path):
    # A stand-in `tensorflow` that writes to file descriptor 2 like the native libraries do, imported
    # by `_launch.quiet_start()` in a process whose script is named like the console script.
    fake = tmp_path / "fake" / "tensorflow"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "import os\n"
        "os.write(2, b'WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\\n')\n"
        "os.write(2, b'I0000 00:00:1.0 1 cudart_stub.cc:31] Could not find cuda drivers on your machine.\\n')\n"
        "os.write(2, b'something that matters\\n')\n"
    )
    script = tmp_path / "keras-noisygd"
    script.write_text(
        "import importlib.util, os, sys\n"
        f"spec = importlib.util.spec_from_file_location('_launch', {_launch.__file__!r})\n"
        "launch = importlib.util.module_from_spec(spec); spec.loader.exec_module(launch)\n"
        "launch.quiet_start()\n"
        "print('level', os.environ['TF_CPP_MIN_LOG_LEVEL'], 'tensorflow' in sys.modules, file=sys.stderr)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = str(fake.parent)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "something that matters\nlevel 3 True\n"
