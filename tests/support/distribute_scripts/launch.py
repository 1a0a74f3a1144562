"""Starts the tf.distribute scripts in processes of their own and loads what they wrote.

Used by `tests/test_distribute.py` and `benchmarks/distributed_equality.py`.
A strategy needs its devices (or `TF_CONFIG`) before TensorFlow starts, hence
the subprocesses.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[3]
SCRIPTS = Path(__file__).resolve().parent


def environment(**extra):
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, PYTHONPATH=path, TF_CPP_MIN_LOG_LEVEL="3", **extra)


def mirrored(out_dir):
    """Runs mirrored.py (two logical CPUs); its results as a dict."""
    out = Path(out_dir) / "mirrored.npz"
    run = subprocess.run([sys.executable, str(SCRIPTS / "mirrored.py"), str(out)], env=environment(),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    return dict(np.load(out))


def workers(out_dir, free_ports):
    """Runs two multi_worker.py processes on 127.0.0.1 (ports from `free_ports(2)`); each one's results."""
    out_dir = Path(out_dir)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    processes = [
        subprocess.Popen(
            [sys.executable, str(SCRIPTS / "multi_worker.py"), str(out_dir)],
            env=environment(TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    try:
        errors = [p.communicate(timeout=300)[1] for p in processes]
    finally:
        for p in processes:  # a worker whose peer died waits forever for it
            if p.poll() is None:
                p.kill()
    for p, error in zip(processes, errors):
        assert p.returncode == 0, error[-4000:]
    return [dict(np.load(out_dir / f"worker_{i}.npz")) for i in range(2)]
