"""Peak resident memory of one measurement, taken in a fresh process whose allocators give freed memory back.

Times are taken with the default allocators; memory in a separate pass, one
child process per measurement, started with `MEMORY_ENV`:

- `MALLOC_MMAP_THRESHOLD_=131072`: glibc mmaps every block from 128 KiB up and
  unmaps it on free (its default dynamic threshold keeps freed multi-megabyte
  blocks in the heap, so later peaks hide under earlier ones);
- `TF_ENABLE_ONEDNN_OPTS=0`: TensorFlow allocates with malloc instead of
  oneDNN's CPU allocator, which pools freed blocks (with it, a method's peak
  after warm-up reads ~0 MiB: the MLP's `B x d` write at B = 128 read 0.01 MiB
  with it and 131 MiB without).

The child warms the measurement up (tracing, compilation, the first
allocation), resets the peak (`/proc/self/clear_refs`) and reports the peak
resident set (Linux `VmHWM`) above the resident set at that point: the
measurement's own working memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "TF_ENABLE_ONEDNN_OPTS": "0"}


def rss_mib(field):
    """`VmRSS` or `VmHWM` of this process, in MiB (NaN off Linux)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def peak_mib(fn, repeats):
    """Peak resident set (MiB) above the resident set after one warm-up call, over `repeats` calls of `fn`."""
    fn()
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # reset the peak resident set size
    except OSError:
        return float("nan")
    start = rss_mib("VmRSS")
    for _ in range(repeats):
        fn()
    return rss_mib("VmHWM") - start


def settings():
    return " ".join(f"{k}={v}" for k, v in MEMORY_ENV.items())


def child_peak(script, child_args, label):
    """Run `script` with `child_args` in a fresh process with `MEMORY_ENV`; the `peak_mib` it printed as JSON.

    NaN (and a line saying why) when the child fails.
    """
    command = [sys.executable, os.path.abspath(script), *child_args]
    done = subprocess.run(command, env={**os.environ, **MEMORY_ENV}, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"  ({label}: the memory child failed: {done.stderr.strip().splitlines()[-1:]})")
        return float("nan")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mib"]


def report(peak):
    """The child's last line: what `child_peak` reads."""
    print(json.dumps({"peak_mib": peak}))
