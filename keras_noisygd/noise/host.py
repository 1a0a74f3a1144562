"""The draws of an eager step on a CPU, made in NumPy a block of updates ahead.

Where `_backend.draws_on_host` holds (eager PyTorch on a CPU), the Threefry
words and the Box-Muller normals are computed in NumPy: each of the ~150
small operations of a draw would otherwise cost its dispatch. At a batch's
`n` NumPy's own per-call overhead still dominates, so once a stream has
been asked for the keys `[seed, c - 1]` and `[seed, c]` in turn (the
optimizer's key is `[seed, update]`), `draw` makes the next updates' draws
together: one set of NumPy operations on `[count, n]` arrays (`AHEAD` rows,
fewer for large `n`) instead of `count` sets on `[n]`. Threefry and
Box-Muller are elementwise, so each row is what drawing its key alone gives;
only the per-call cost is shared. Another key, size or stream just misses
and draws one row.
"""

from __future__ import annotations

import collections
import threading

import numpy as np

AHEAD = 32
"""The updates drawn together once a stream is read in order."""

_AHEAD_ELEMENTS = 2**16  # beyond ~64k values a row, batching saves nothing and only holds memory
_STREAMS = 16  # the streams remembered (an optimizer uses one or two; NoiseMonitor's probe another)


class Blocks:
    """Rows of host draws by key: `draw(what, key, n, stream, make)` returns `make`'s row for `key`.

    `make(k0, k1s)` gets the first key word and a `uint32` array of second key
    words and returns one row for each (an array with a leading axis of their
    number). Rows are shared: callers must not modify them.
    """

    def __init__(self):
        self._blocks = collections.OrderedDict()  # (what, k0, n, stream) -> (first k1, rows, last k1 asked)
        self._lock = threading.Lock()

    def draw(self, what, key, n, stream, make):
        k0, k1 = int(key[0]), int(key[1])
        name = (what, k0, n, stream)
        with self._lock:
            block = self._blocks.get(name)
            if block is not None:
                first, rows, last = block
                if 0 <= k1 - first < len(rows):
                    self._blocks[name] = (first, rows, k1)
                    return rows[k1 - first]
            in_order = block is not None and k1 == block[2] + 1
        count = max(1, min(AHEAD, _AHEAD_ELEMENTS // max(n, 1))) if in_order else 1
        count = min(count, 2**32 - k1)  # the key word stays below 2**32
        rows = make(k0, np.arange(k1, k1 + count, dtype=np.uint64).astype(np.uint32))
        with self._lock:
            self._blocks[name] = (k1, rows, k1)
            self._blocks.move_to_end(name)
            while len(self._blocks) > _STREAMS:
                self._blocks.popitem(last=False)
        return rows[0]


BLOCKS = Blocks()
