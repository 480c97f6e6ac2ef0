"""The application the benchmarks preload: about 100 MB of small Python objects built at import.

It stands for a real app's import-time state (models, tables, caches): 650,000 small lists, each a
separate object the garbage collector tracks, so a full collection in an unfrozen fork touches, and
unshares, every page they live on. The job functions are the benchmarks' workloads.
"""

from __future__ import annotations

import gc
import os
import time

SIZE = int(os.environ.get("BENCH_APP_SIZE", "650000"))
LAZY_SIZE = 125_000  # about 20 MB, loaded by a job on its first call

DATA = [[i, i + 1] for i in range(SIZE)]
_lazy: list[tuple[int, str]] | None = None


def noop() -> None:
    """Import-only: runs nothing of the app."""


def hold(seconds: float = 1.0) -> None:
    """Import-only, but long enough for a memory sample to see it running."""
    time.sleep(seconds)


def use_app() -> int:
    """Reads a sample of the preloaded data, as a job that uses the app does."""
    return sum(DATA[i][1] for i in range(0, len(DATA), 1000))


def realistic(seconds: float = 1.0) -> int:
    """Loads about 20 MB lazily on first call, makes a full collection as many libraries do, then holds."""
    global _lazy
    if _lazy is None:
        _lazy = [(i, str(i)) for i in range(LAZY_SIZE)]
    gc.collect()
    time.sleep(seconds)
    return len(_lazy)


def stamp() -> float:
    """When the job function started, for enqueue-to-start latency."""
    return time.time()


def stamp_after(seconds: float) -> float:
    """Holds a worker for `seconds`, then says when it let go of it (for busy-to-free latency)."""
    time.sleep(seconds)
    return time.time()
