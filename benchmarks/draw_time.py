"""Time of one eager noise draw's 32-bit words: NumPy on the host against the backend's own operations.

`threefry.words` computes Threefry-2x32's rounds in NumPy `uint32` where
`_backend.draws_on_host` says so (eager PyTorch on a CPU) and with the
backend's operations elsewhere; both give the same words (checked here too).
Prints the median ms of each way over rounds and their ratio, at each `B`.

With `--compiled` (PyTorch) it also times the backend's operations under
`torch.compile`: the seconds of the first call (the compilation) and the ms
of each call after it.

    KERAS_BACKEND=torch python benchmarks/draw_time.py [--sizes 128 1000] [--rounds 7] [--calls 200] [--compiled]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from keras import ops

from keras_noisygd.noise import threefry


def backend_words(seed, n, stream):
    """The words from the backend's own operations (the path an eager host draw skips)."""
    key = threefry.key_of(seed)
    index = ops.cast(ops.arange(n, dtype="int32"), key[0].dtype)
    return threefry.threefry2x32(key, index, ops.full(ops.shape(index), stream, key[0].dtype))


def ms_per_call(function, calls):
    for _ in range(20):
        function()
    start = time.perf_counter()
    for _ in range(calls):
        function()
    return 1e3 * (time.perf_counter() - start) / calls


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 1000])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--compiled", action="store_true", help="also time torch.compile of the backend's operations")
    args = parser.parse_args()
    seed = threefry.as_seed(3)
    print(f"{'B':>6} {'words() ms':>11} {'backend ops ms':>15} {'ratio':>7}")
    for n in args.sizes:
        ours = [ops.convert_to_numpy(w) for w in threefry.words(seed, n, 0)]
        theirs = [ops.convert_to_numpy(w) for w in backend_words(seed, n, 0)]
        assert all(np.array_equal(a, b) for a, b in zip(ours, theirs)), "the two ways must give the same words"
        pairs = [(ms_per_call(lambda: threefry.words(seed, n, 0), args.calls),
                  ms_per_call(lambda: backend_words(seed, n, 0), args.calls)) for _ in range(args.rounds)]
        host, backend = (statistics.median(p[i] for p in pairs) for i in (0, 1))
        ratio = statistics.median(a / b for a, b in pairs)
        print(f"{n:>6} {host:>11.3f} {backend:>15.3f} {ratio:>7.3f}")
        if args.compiled:
            import torch

            compiled = torch.compile(backend_words)
            start = time.perf_counter()
            words = [ops.convert_to_numpy(w) for w in compiled(seed, n, 0)]
            seconds = time.perf_counter() - start
            assert all(np.array_equal(a, b) for a, b in zip(ours, words)), "the compiled words must be the same"
            ms = statistics.median(ms_per_call(lambda: compiled(seed, n, 0), args.calls) for _ in range(args.rounds))
            print(f"{'':>6} torch.compile: {ms:.3f} ms a call, {seconds:.1f} s to compile")


if __name__ == "__main__":
    main()
