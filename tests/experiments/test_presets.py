"""The CLI's presets, noise specs with a sparse size, and resuming a comparison from its journal."""

import json

import pytest

from keras_noisygd import noise as noise_lib
from keras_noisygd.experiments import cli, runner

TINY = ["--dataset", "digits", "--train-size", "64", "--steps", "10", "--eval-every", "10", "-b", "8", "--no-xla"]


def test_the_paper_preset_is_the_reference_protocol():
    args = cli.parse(["compare", "--preset", "fashion-mnist-paper"])
    expected = dict(dataset="fashion_mnist", split="paper", pixels="raw", model="convsmall", train_size=1000,
                    steps=10000, lr=0.01, batch_size=50, momentum=0.0, seeds=["3"], random_labels=0)
    assert {k: getattr(args, k) for k in expected} == expected
    assert args.noise == cli.NOISES  # every noise class
    assert cli.parse(["compare", "--preset", "fashion-mnist-corrupted"]).random_labels == 200
    sparse = cli.parse(["compare", "--preset", "fashion-mnist-sparse"]).noise
    assert sparse == [f"{n}:{k}" for n in ("sparse_gaussian", "sparse_gaussian_centered") for k in (10, 50, 100, 1000)]


def test_flags_override_a_preset_and_each_command_keeps_its_own_defaults():
    args = cli.parse(["compare", "--lr", "0.1", "--preset", "fashion-mnist-paper", "--steps", "400"])
    assert (args.lr, args.steps, args.model) == (0.1, 400, "convsmall")
    plain = cli.parse(["compare"])
    assert (plain.dataset, plain.model, plain.lr, plain.split) == ("mnist1d", "cnn", 0.2, "standard")
    assert cli.parse(["large-batch"]).large_batch_size == 256


def test_a_preset_of_the_other_command_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse(["large-batch", "--preset", "fashion-mnist-paper"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'fashion-mnist-paper'" in capsys.readouterr().err


def test_sparse_noise_specs():
    assert runner.noise_template("sparse_gaussian_centered:10") == noise_lib.SparseGaussian(num_noisy=10, centered=True)
    assert runner.noise_template("sparse_gaussian:1") == noise_lib.SparseGaussian(num_noisy=1)
    assert runner.noise_template("bernoulli") == "bernoulli"
    for bad, message in [("gaussian:10", "a sparse one optionally followed by ':k'"),
                         ("sparse_gaussian_centered:1", "integer k >= 2 for sparse_gaussian_centered"),
                         ("sparse_gaussian:x", "integer k >= 1")]:
        with pytest.raises(ValueError, match=message):
            runner.noise_template(bad)


def test_a_sparse_size_trains_with_that_many_noisy_examples(tmp_path, monkeypatch):
    seen = []
    original = runner.noise_template
    monkeypatch.setattr(runner, "noise_template", lambda spec: seen.append(original(spec)) or seen[-1])
    args = ["compare", *TINY, "--seeds", "1", "--noise", "sparse_gaussian_centered:4", "--out", str(tmp_path)]
    assert cli.main(args) == 0
    assert noise_lib.SparseGaussian(num_noisy=4, centered=True) in seen
    summary = json.loads((tmp_path / "results.json").read_text())["summary"]
    assert [r["method"] for r in summary] == ["GD", "SGD(b=8)", "GD+sparse_gaussian_centered:4"]


def test_resume_trains_only_the_missing_runs(tmp_path, monkeypatch, capsys):
    trained = []
    original = runner.train
    monkeypatch.setattr(runner, "train", lambda d, m, c, s, **kw: trained.append((m.label, s)) or original(d, m, c, s, **kw))
    out = ["--noise", "sgd", "--out", str(tmp_path)]
    assert cli.main(["compare", *TINY, "--seeds", "1", *out]) == 0
    first = json.loads((tmp_path / "results.json").read_text())["runs"]
    trained.clear()
    assert cli.main(["compare", *TINY, "--seeds", "2", "--resume", *out]) == 0
    assert trained == [("GD", 1), ("SGD(b=8)", 1), ("GD+sgd", 1)]  # seed 0 came from the journal
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert runs[:3] == first and len(runs) == 6
    journal = (tmp_path / "runs.jsonl").read_text().splitlines()
    assert len(journal) == 1 + 6 and "settings" in json.loads(journal[0])


def test_resume_refuses_other_settings(tmp_path, capsys):
    out = ["--seeds", "1", "--noise", "sgd", "--out", str(tmp_path)]
    assert cli.main(["compare", *TINY, *out]) == 0
    capsys.readouterr()
    assert cli.main(["compare", *TINY, "--lr", "0.5", "--resume", *out]) == 2
    err = capsys.readouterr().err
    assert "Argument `--resume` needs the settings of" in err and "lr=0.2 there, 0.5 now" in err


def test_missing_fashion_mnist_is_one_clear_line(tmp_path, monkeypatch, capsys):
    import keras

    from keras_noisygd.experiments import idx

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.delenv(idx.ENV_VAR, raising=False)
    monkeypatch.setattr(idx, "SYSTEM_DIR", tmp_path)

    def offline():
        raise OSError("no network")

    monkeypatch.setattr(keras.datasets.fashion_mnist, "load_data", offline)
    assert cli.main(["compare", "--preset", "fashion-mnist-paper", "--data-dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("keras-noisygd compare: error: Could not find fashion_mnist's IDX files"), err
    assert len(err.strip().splitlines()) == 1


def test_every_flag_is_documented_in_docs_cli_md():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "cli.md").read_text()
    for command in ("compare", "large-batch"):
        sub = cli.parser()._subparsers._group_actions[0].choices[command]
        for action in sub._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}`" in text, f"{command} {flag} is not in docs/cli.md"
    for name in cli.PRESETS:
        assert f"`{name}`" in text, name
