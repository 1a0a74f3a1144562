#!/usr/bin/env python3
"""Set up `.venv` and run one of the project's jobs. Needs only Python 3.10+ and pip.

    python3 tasks.py demo    # the demo: GD vs SGD vs noisy GD, the paper's protocol on Fashion-MNIST (else MNIST-1D)
    python3 tasks.py test    # ruff, the test suite on TensorFlow, its all_backends part on JAX and PyTorch, the docs
    python3 tasks.py bench   # benchmarks/step_time.py; `bench per_example` runs benchmarks/per_example.py
    python3 tasks.py docs    # build the docs site into site/

The virtual environment is (re)installed when setup.cfg or the extras change. `demo` and `test` first fetch
Fashion-MNIST into ~/.cache/keras_noisygd from Debian's package where apt-get exists (the tests that read it skip
elsewhere).
"""

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PYTHON = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
EXTRAS = {"demo": "examples", "test": "test,examples,docs", "bench": "examples,bench", "docs": "docs"}
BENCHMARKS = ("step_time", "main_job", "per_example", "long_run", "full_batch", "monitor_cost")
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3"))


def run(*command):
    print("+", " ".join(str(c) for c in command), flush=True)
    return subprocess.call([str(c) for c in command], cwd=ROOT, env=ENV)


def ensure_venv(extras):
    stamp_file = VENV / "keras_noisygd-setup.stamp"
    installed = set(stamp_file.read_text().split()) if stamp_file.exists() else set()
    config_hash = hashlib.sha256((ROOT / "setup.cfg").read_bytes()).hexdigest()
    wanted = {config_hash, *extras.split(",")}
    if wanted <= installed:
        return
    if not PYTHON.exists():
        print(f"creating {VENV}", flush=True)
        venv.create(VENV, with_pip=True)
    if run(PYTHON, "-m", "pip", "install", "--quiet", "--upgrade", "pip") != 0:
        sys.exit("pip upgrade failed")
    if run(PYTHON, "-m", "pip", "install", "--quiet", "-e", f".[{extras}]") != 0:
        sys.exit("installing the package failed")
    keep = installed if config_hash in installed else set()
    stamp_file.write_text(" ".join(sorted(keep | wanted)))


def fetch_fashion_mnist():
    """Fashion-MNIST into the package's cache from Debian's `dataset-fashion-mnist` (apt-get download, no root).

    Where apt-get is missing or fails, the tests that read the real files skip and say why.
    """
    if shutil.which("apt-get"):
        run(PYTHON, "-c", "from keras_noisygd.experiments import idx; idx.fetch_debian()")


def demo_preset():
    """The paper's protocol on Fashion-MNIST where its files are at hand, else the MNIST-1D comparison (said so)."""
    check = "from keras_noisygd.experiments import idx; raise SystemExit(0 if idx.available('fashion_mnist') else 1)"
    if subprocess.call([str(PYTHON), "-c", check], cwd=ROOT, env=ENV) == 0:
        return ["--preset", "fashion-mnist-demo"]
    print("Fashion-MNIST is not on this machine (no apt-get, or the download failed): "
          "the demo runs the MNIST-1D comparison instead (docs/results.md).", flush=True)
    return []


def main(argv):
    job = argv[0] if argv else ""
    if job not in EXTRAS:
        sys.exit(__doc__)
    ensure_venv(EXTRAS[job])
    if job in ("demo", "test"):
        fetch_fashion_mnist()
    if job == "demo":
        return run(PYTHON, "-m", "keras_noisygd", "compare", *(argv[1:] or demo_preset()))
    if job == "test":
        code = run(PYTHON, "-m", "ruff", "check", "keras_noisygd", "tests", "benchmarks", "examples", "tasks.py")
        ENV["KERAS_BACKEND"] = "tensorflow"  # the whole suite; then what runs on every backend, on each other one
        code = code or run(PYTHON, "-m", "pytest", "-q", *argv[1:])
        for backend in ("jax", "torch"):
            ENV["KERAS_BACKEND"] = backend
            code = code or run(PYTHON, "-m", "pytest", "-q", "-m", "all_backends", *argv[1:])
        del ENV["KERAS_BACKEND"]
        return code or run(PYTHON, "-m", "mkdocs", "build", "--strict", "--quiet")
    if job == "bench":
        name, rest = (argv[1], argv[2:]) if len(argv) > 1 and argv[1] in BENCHMARKS else ("step_time", argv[1:])
        return run(PYTHON, f"benchmarks/{name}.py", *rest)
    return run(PYTHON, "-m", "mkdocs", "build", "--strict")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
