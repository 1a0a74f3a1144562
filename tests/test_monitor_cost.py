"""benchmarks/monitor_cost.py's KerasHub entry at a tiny size: it runs, and `auto` takes the layer path on it."""

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("keras_hub")  # in the `test` extra

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_the_keras_hub_bert_row_says_the_monitor_builds_k_from_the_layers():
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / "monitor_cost.py"), "--models", "bert_tiny", "--rounds", "1", "--steps",
         "2", "--batch-size", "4", "--no-memory", "--fit-steps", "2"],
        capture_output=True, text=True, timeout=600, check=True,
    ).stdout
    steps, whole_fit = (line.split() for line in out.splitlines() if line.startswith("bert_tiny"))
    # model, step ms, auto ms, source, ratio (range), per_example ms, ratio (range)
    assert steps[3] == "layers"  # the projections inside each block's attention are reached: no G
    assert float(steps[1]) > 0 and float(steps[2]) > 0 and float(steps[6]) > 0
    # model, fit s, with monitor s, ratio (range): whole fit calls
    assert float(whole_fit[1]) > 0 and float(whole_fit[2]) > 0
