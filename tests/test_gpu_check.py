"""`benchmarks/gpu_check.py` at its tiny size on the CPU: every check runs and fills its row."""

import argparse
import sys
from pathlib import Path

import keras
import pytest

pytestmark = pytest.mark.all_backends

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_check  # noqa: E402


def test_every_check_of_the_gpu_script_runs_at_the_tiny_size(tmp_path):
    args = argparse.Namespace(size="tiny", budget=600.0, data_dir=None)
    rows = gpu_check.run_checks(args)
    errors = [r for r in rows if isinstance(r["value"], str) and r["value"].startswith(("error", "skipped"))]
    assert errors == []
    checks = [r["check"] for r in rows]
    for name in ("device", "weighted step / stock", "per_example step / stock", "monitor fit / fit", "draw",
                 "paper run"):
        assert name in checks
    assert checks.count("weighted step / stock") == 2 and checks.count("paper run") == 3
    for row in rows:
        assert row["backend"] == keras.backend.backend()
        if row.get("ratio") is not None:  # noisy time / baseline time, both measured: positive and finite
            assert 0 < row["ratio"] < 1e3 and row["ratio"] == pytest.approx(row["value"] / row["baseline"], rel=0.5)
    assert all("synthetic" in r["setting"] for r in rows if r["check"] == "paper run")
    table = gpu_check.table(rows)
    assert table.count("\n") == len(rows) + 1 and "| paper run |" in table
