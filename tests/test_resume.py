"""Checkpoint and resume across processes (the workers are in tests/support/resume_worker.py).

Every comparison is exact: each process runs the same float32 ops on the same
inputs in the same order on the CPU, and the noise weights come from the
restored `[seed, counter]` state, so there is no rounding to allow for.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "support" / "resume_worker.py"


def run_worker(mode, directory):
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, str(WORKER), mode, str(directory)], env=env, capture_output=True,
                          text=True, timeout=300)


def load(directory, name):
    with np.load(Path(directory) / f"{name}.npz") as f:
        return dict(f)


def assert_same_state(actual, expected, keys=None):
    keys = sorted(expected) if keys is None else keys
    for key in keys:
        np.testing.assert_array_equal(actual[key], expected[key], err_msg=key)


def trained_state(state):
    """Weights and optimizer variables (slots, iterations, noise state), without the history."""
    return sorted(k for k in state if not k.startswith("history:"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two processes: the first saves (.keras, checkpoint) and is then SIGKILLed mid-run under
    BackupAndRestore; the second restores and resumes everything."""
    directory = tmp_path_factory.mktemp("resume")
    first = run_worker("first", directory)
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]  # really killed, mid-epoch
    assert (directory / "uninterrupted.npz").exists()  # the save part finished before
    assert (directory / "backup_steps" / "training_metadata.json").read_text() == '{"epoch": 1, "batch": 1}'
    second = run_worker("second", directory)
    assert second.returncode == 0, second.stderr[-3000:]
    return directory


@pytest.mark.parametrize("restored", ["from_keras", "from_checkpoint"])
def test_restore_in_a_fresh_process_continues_exactly(runs, restored):
    # 8 NoisyAdam steps, save, restore in another process, 4 more steps == 12 uninterrupted steps:
    # weights, Adam's moments, `iterations` and the noise state, all bit for bit.
    expected = load(runs, "uninterrupted")
    actual = load(runs, restored)
    keys = trained_state(expected)
    # iterations, learning rate, noise state, and Adam's 2 moments of 4 variables, at least.
    assert sum(k.startswith("opt") for k in keys) >= 11
    assert sorted(trained_state(actual)) == keys
    assert_same_state(actual, expected, keys)
    np.testing.assert_array_equal(expected["noise_state"], [11, 12])
    # The last epoch's logged loss and accuracy agree too.
    assert_same_state(actual, expected, ["history:loss", "history:accuracy"])


def test_backup_at_epoch_end_resumes_a_killed_run_exactly(runs):
    # Killed during epoch 1; the epoch-end backup restarts epoch 1 from the state after
    # epoch 0: the same 12 steps, the same noise draws, the same weights as a run never killed.
    expected = load(runs, "uninterrupted_gd")
    actual = load(runs, "resumed_epoch")
    assert_same_state(actual, expected, trained_state(expected))
    np.testing.assert_array_equal(actual["noise_state"], [11, 12])
    np.testing.assert_array_equal(actual["history:loss"], expected["history:loss"][1:])  # epochs 1 and 2


def test_backup_mid_epoch_replays_the_epoch_start(runs):
    # Keras's BackupAndRestore records the batch of a mid-epoch backup but resumes at the
    # start of that epoch: the state after step 6 (epoch 1, batch 1) trains epoch 1 from its
    # batch 0 again. 14 steps in all, not 12: it is not the uninterrupted run ...
    uninterrupted = load(runs, "uninterrupted_gd")
    actual = load(runs, "resumed_steps")
    assert int(actual["iterations"]) == 14 and int(uninterrupted["iterations"]) == 12
    assert np.abs(actual["w0"] - uninterrupted["w0"]).max() > 1e-3
    # ... but it is exactly that replay, noise counter included (the noise stream goes on
    # from the backup, it is not rewound with the data).
    assert_same_state(actual, load(runs, "replayed_gd"))
    np.testing.assert_array_equal(actual["noise_state"], [11, 14])


def test_backup_every_epochs_worth_of_steps_replays_the_whole_epoch(runs):
    # save_freq=4 = steps per epoch: the backup after step 4 is written at the last batch of
    # epoch 0, before the epoch counter moves on, so it records epoch 0 and the resumed run
    # trains epoch 0 again: 4 + 12 = 16 steps, exactly that replay.
    actual = load(runs, "resumed_epoch_steps")
    assert int(actual["iterations"]) == 16
    assert_same_state(actual, load(runs, "replayed_epoch_gd"))
