"""Learning curves, seeds, the progress bar and `--xla auto` of the comparison CLI."""

import csv
import json

import keras
import numpy as np
import pytest

from keras_noisygd.experiments import cli, report, runner

TINY = ["--dataset", "digits", "--train-size", "64", "--steps", "20", "--eval-every", "10", "-b", "8", "--no-xla"]


def test_evaluate_matches_keras_cross_entropy_and_an_explicit_accuracy():
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4)])
    x, y = rng.normal(size=(37, 5)).astype("float32"), rng.integers(0, 4, 37)
    loss, acc = runner.evaluate(model, x, y, batch_size=8)  # 5 batches, the last one partial
    logits = model.predict(x, verbose=0)
    expected = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, logits)
    # float32 logits: Keras's float32 log-softmax against the float64 one here, ~1e-7 relative
    assert loss == pytest.approx(float(expected), rel=1e-5)
    assert acc == sum(int(np.argmax(logits[i]) == y[i]) for i in range(37)) / 37


def test_the_curve_records_train_and_test_loss_and_accuracy_on_the_given_examples(tmp_path):
    args = ["compare", *TINY, "--seeds", "1", "--noise", "sgd", "--curve-size", "50", "--out", str(tmp_path)]
    assert cli.main(args) == 0
    run = json.loads((tmp_path / "results.json").read_text())["runs"][2]
    assert run["method"] == "GD+sgd" and [p["updates"] for p in run["curve"]] == [10, 20]
    # The curve's train metrics use the whole training set (the run's final ones), its test metrics the
    # first 50 test images only: the final test accuracy, on all of them, is its own number.
    assert run["curve"][-1]["train_acc"] == run["train_acc"]
    for point in run["curve"]:
        assert 0 <= point["train_acc"] <= 1 and point["test_loss"] > 0
        assert round(point["test_acc"] * 50) == pytest.approx(point["test_acc"] * 50)  # a share of 50 images
    rows = [r for r in csv.DictReader(open(tmp_path / "curves.csv")) if r["method"] == "GD+sgd"]
    assert [float(r["train_loss"]) for r in rows] == pytest.approx([p["train_loss"] for p in run["curve"]])


@pytest.mark.parametrize("given, seeds", [(["3"], [0, 1, 2]), (["2:4"], [2, 3]), (["5", "1"], [5, 1])])
def test_seeds_is_a_count_a_range_or_a_list(given, seeds):
    assert cli.seeds(given) == seeds


@pytest.mark.parametrize("given", [["0"], ["x"], ["3:3"], ["1", "1"], ["-1", "2"], ["1:x"]])
def test_bad_seeds_are_one_clear_line(given, capsys):
    assert cli.main(["compare", *TINY, "--seeds", *given]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Argument `seeds` must be a count N >= 1" in err
    assert f"Received: --seeds {' '.join(given)}" in err


def test_chosen_seeds_train_those_runs_with_a_progress_bar_each(tmp_path, capsys):
    assert cli.main(["compare", *TINY, "--seeds", "2:3", "--noise", "sgd", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert [r["seed"] for r in json.loads((tmp_path / "results.json").read_text())["runs"]] == [2, 2, 2]
    for i, label in enumerate(["GD", "SGD(b=8)", "GD+sgd"]):
        assert f"run {i + 1}/3: {label}, seed 2" in out
    assert "20/20" in out and "test_acc" in out  # Keras's Progbar over the 20 updates of each run
    assert cli.main(["compare", *TINY, "--seeds", "2", "3", "--noise", "sgd", "--resume", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "run 1/6: GD, seed 2: in " in out and "run 4/6: GD, seed 3\n" in out


def test_the_progress_bar_counts_updates_not_micro_steps(tmp_path, capsys):
    args = ["compare", *TINY, "--seeds", "1", "--noise", "sgd", "--micro-batch-size", "16", "--out", str(tmp_path)]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "20/20" in out and "80/20" not in out  # GD: 4 micro-batches of 16 per update


def test_xla_auto_is_off_for_convolutions_on_a_cpu_and_on_otherwise():
    # TensorFlow on this CPU (the suite's backend): benchmarks/main_job.py measured XLA ~4x slower for
    # ConvSmall there, and faster for the MLP.
    assert keras.distribution.list_devices() == ["cpu:0"]
    assert runner.fastest_jit_compile("convsmall") is False and runner.fastest_jit_compile("cnn") is False
    assert runner.fastest_jit_compile("mlp") is True
    assert cli.parse(["compare"]).xla == "auto" and cli.parse(["compare", "--no-xla"]).xla == "off"


def test_an_older_journal_without_train_curves_still_reports(tmp_path):
    # Journals written before the curves held train metrics have (updates, test_acc) pairs.
    runs = [dict(method=m, seed=s, train_acc=1.0, test_acc=0.5 + 0.1 * i, gap=0.5, steps=20, seconds=1.0,
                 curve=[[10, 0.4], [20, 0.5 + 0.1 * i]]) for i, m in enumerate(["GD", "SGD(b=8)"]) for s in (0, 1)]
    paths = report.write(tmp_path, {}, runs, "old", "GD", "SGD(b=8)")
    assert all(p.exists() for p in paths)
    rows = list(csv.DictReader(open(tmp_path / "curves.csv")))
    assert rows[1] == dict(method="GD", seed="0", updates="20", train_loss="", train_acc="", test_loss="", test_acc="0.5")
    assert "| GD | 0.5000 ± 0.0000 | 1.0000 | 0.5000 | 1.0 | - |" in (tmp_path / "summary.md").read_text()
