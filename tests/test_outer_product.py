"""benchmarks/outer_product.py at a tiny size: every runtime returns the same Dense rows, and each is timed."""

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("jax")  # in the `bench` and `test` extras

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_every_runtime_gives_the_same_rows_and_a_time():
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / "outer_product.py"), "--batch-size", "3", "--inputs", "5", "--outputs", "4",
         "--repeats", "1"],
        capture_output=True, text=True, timeout=300, check=True,  # the script asserts the rows are equal first
    ).stdout
    rows = [line for line in out.splitlines() if line.startswith(("TensorFlow", "JAX", "NumPy"))]
    assert len(rows) == 8
    assert all(float(line.split()[-3]) >= 0 for line in rows)  # ms (a tiny NumPy call prints 0.00)
    assert rows[0].split()[-1] == "1.00"  # the baseline is TensorFlow's tf.einsum itself
