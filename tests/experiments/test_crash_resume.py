"""A comparison killed mid-way keeps its finished runs, and `--resume` trains only the rest (through `python -m`)."""

import json
import signal
import subprocess
import sys
import time

ARGS = ["compare", "--dataset", "digits", "--train-size", "64", "--steps", "200", "--eval-every", "100", "-b", "8",
        "--noise", "sgd", "--seeds", "2"]


def test_a_killed_comparison_resumes_from_its_journal(tmp_path):
    command = [sys.executable, "-m", "keras_noisygd", *ARGS, "--out", str(tmp_path)]
    journal = tmp_path / "runs.jsonl"
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if journal.exists() and len(journal.read_text().splitlines()) >= 3:  # settings + two finished runs
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # a crash: no clean-up code runs
    process.communicate(timeout=60)
    lines = journal.read_text().splitlines()
    finished = [json.loads(line) for line in lines[1:]]  # each line is whole: runs are appended as they end
    assert 2 <= len(finished) < 6, "the comparison must be killed with runs left to train"
    assert not (tmp_path / "results.json").exists()

    result = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    for i, run in enumerate(finished):
        assert f"run {i + 1}/6: {run['method']}, seed {run['seed']}: in {journal}" in result.stdout
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert [(r["method"], r["seed"]) for r in runs] == [(m, s) for s in (0, 1) for m in ("GD", "SGD(b=8)", "GD+sgd")]
    assert runs[: len(finished)] == finished  # the journal's runs, not retrained
    assert len(journal.read_text().splitlines()) == 1 + 6


def test_a_journal_line_cut_short_by_a_crash_is_dropped(tmp_path):
    from keras_noisygd.experiments import report

    settings = {"lr": 0.1}
    journal = report.Journal(tmp_path, settings)
    journal.add(dict(method="GD", seed=0, test_acc=0.5))
    with open(journal.path, "a") as f:
        f.write('{"method": "SGD", "seed": 0, "test_a')  # the process died inside this write
    resumed = report.Journal(tmp_path, settings, resume=True)
    assert list(resumed.runs) == [("GD", 0)]
    assert journal.path.read_text().endswith('"test_acc": 0.5}\n')  # the torn line is gone; appends stay valid
    resumed.add(dict(method="SGD", seed=0, test_acc=0.6))
    assert list(report.Journal(tmp_path, settings, resume=True).runs) == [("GD", 0), ("SGD", 0)]
