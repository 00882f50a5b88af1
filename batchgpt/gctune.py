"""The cyclic garbage collector while a run sends.

A run allocates a few dozen container objects per request (the reply's parsed JSON, the
output line, tasks, futures) and almost no cyclic garbage, while the process holds a few
hundred thousand long-lived objects (the imported SDK, aiohttp, pydantic's schemas, the
plan). With the default thresholds every ~700 allocations start a collection, and the
older generations' collections walk those long-lived objects again and again: 12-18 % of
the client's CPU per request at zero latency (benchmarks/overhead.py, docs/performance.md,
issue 13). So, while sending, everything alive before the first request is moved out of
the collector's sight (``gc.freeze()``) and the youngest generation is collected every
50,000 allocations instead of 700. Cycles made meanwhile are still collected; at the end
the frozen objects are handed back and the thresholds restored.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SENDING_THRESHOLD = (50_000, 20, 100)


_lock = threading.Lock()
_active = 0  # runs sending in this process (threads, several loops)
_saved: tuple[int, int, int] = gc.get_threshold()


@contextmanager
def quiet_gc() -> Iterator[None]:
    """Freeze what is alive now and collect less often until the block ends. Runs that
    overlap in one process share it: the first to start sets it, the last to end undoes
    it, so the process is left as it was found."""
    global _active, _saved
    with _lock:
        if _active == 0:
            _saved = gc.get_threshold()
            gc.freeze()
            gc.set_threshold(*SENDING_THRESHOLD)
        _active += 1
    try:
        yield
    finally:
        with _lock:
            _active -= 1
            if _active == 0:
                gc.set_threshold(*_saved)
                gc.unfreeze()
