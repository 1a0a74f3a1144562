"""The main job's step: the paper protocol's full-batch step (n = 1,000, ConvSmall) on each backend, XLA on and off.

Runs `benchmarks/step_time.py --models paper_cnn --batch-size 1000` once per
backend in its own process (`KERAS_BACKEND` is fixed per process), noisy
(`gaussian_centered` emulating SGD(50), as `compare --preset fashion-mnist-paper`)
against the stock Keras step on the same backend, with the achieved GFLOP/s of
the noisy step against this CPU's float32 matmul peak. "XLA" is `jit_compile`:
XLA on TensorFlow and JAX (JAX without it runs op by op), `torch.compile` on
PyTorch; `torch.compile` is left out unless `--torch-compile` asks for it: on 2026-12-06
it had not finished compiling the step (Dynamo tracing Keras's dtype lattice) after 5 minutes on this
2-core CPU, against 0.06 s a step without it. Each table's ratios are within one process, so they compare; the
absolute times between backends compare only when the machine was equally quiet.

    python benchmarks/main_job.py [--backends tensorflow,jax,torch] [--rounds 5] [--steps 20] [--torch-compile]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
XLA = {"tensorflow": "both", "jax": "both", "torch": "off"}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="tensorflow,jax,torch")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="a multiple of 20 (steps_per_execution)")
    parser.add_argument("--torch-compile", action="store_true", help="also time PyTorch with jit_compile=True")
    args = parser.parse_args(argv)
    if args.torch_compile:
        XLA["torch"] = "both"
    code = 0
    for backend in args.backends.split(","):
        command = [
            sys.executable, str(HERE / "step_time.py"), "--models", "paper_cnn", "--batch-size", "1000",
            "--emulate-batch-size", "50", "--xla", XLA[backend], "--rounds", str(args.rounds), "--steps", str(args.steps),
        ]
        print(f"$ KERAS_BACKEND={backend} {' '.join(command[1:])}", flush=True)
        code |= subprocess.call(command, env={**os.environ, "KERAS_BACKEND": backend})
    return code


if __name__ == "__main__":
    sys.exit(main())
