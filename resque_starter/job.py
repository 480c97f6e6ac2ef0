"""What a running job can know of a coming stop: the public API for jobs (see docs/jobs.md).

    from resque_starter.job import Shutdown, seconds_left, stopping

When the worker running a job is asked to stop (a graceful stop, a scale-down, a reload replacing it,
a recycle), to stop quickly (SIGINT), or to kill its job (SIGUSR1, `ctl kill`), the job learns it at
once, in the process that runs it (rq's work-horse, a pre-forked horse or a SimpleWorker): `stopping()`
turns true and `seconds_left()` counts down to the moment `Shutdown` is raised inside the job. A short
grace (RESQUE_STARTER_SHUTDOWN_GRACE) later, a job still running is killed (SIGKILL). Both moments fall
within RESQUE_STARTER_DRAIN_TIMEOUT, so the platform's grace period still covers the whole stop.

A job that ends with `Shutdown` (raised in it, or raised by it: "I stopped early, run me again") while a
stop is pending is put back at the front of its queue: not a failure, but counted against
RESQUE_STARTER_MAX_REQUEUES; what it saved with `job.save_meta()` first is kept. A job that returns
normally is finished, whatever `stopping()` said. Outside resque-starter (plain `rq worker`, a unit
test) nothing is ever pending: `stopping()` is False and `seconds_left()` None.

How it works: the worker shares one page of memory with the processes it forks, where it writes when
the stop began and its deadlines; `Shutdown` is raised by a signal (SHUTDOWN_SIGNAL) the worker sends
to the job's process, whose handler raises only while a job is being performed.
"""

from __future__ import annotations

import mmap
import signal
import struct
import time
from types import FrameType

__all__ = ["Shutdown", "seconds_left", "stopping"]

# Raises Shutdown in the process performing a job (stacks.DUMP_SIGNAL is the next one).
SHUTDOWN_SIGNAL = signal.SIGRTMIN + 2

# Why a stop is pending, as written on the page (0: none).
STOP, QUICK, KILL = 1, 2, 3
_REASONS = {
    STOP: "resque-starter: the worker is stopping (stop, scale-down, reload or recycle)",
    QUICK: "resque-starter: interrupted by shutdown (quick stop, SIGINT)",
    KILL: "resque-starter: job killed by SIGUSR1",
}
_LAYOUT = struct.Struct("=ddq")  # Shutdown at, SIGKILL at (time.monotonic(), system-wide), kind


class Shutdown(BaseException):
    """Raised inside a running job when its stop's deadline comes; raise it yourself to stop early and
    be requeued. A BaseException, like Sidekiq::Shutdown, so `except Exception` does not swallow it:
    clean up in `finally`, or catch it, save progress, and raise it again."""


class _Page:
    """The stop as the worker wrote it, readable by every process it forked (MAP_SHARED)."""

    def __init__(self) -> None:
        self._map = mmap.mmap(-1, mmap.PAGESIZE)

    def read(self) -> tuple[float, float, int]:
        return _LAYOUT.unpack_from(self._map)

    def write(self, shutdown_at: float, kill_at: float, kind: int) -> None:
        _LAYOUT.pack_into(self._map, 0, shutdown_at, kill_at, kind)

    def clear(self) -> None:
        self.write(0.0, 0.0, 0)


_page: _Page | None = None  # the worker's, inherited by its horses; None outside resque-starter
_performing = False  # in this process, a job is between the start and the end of rq's perform_job


def stopping() -> bool:
    """Whether the worker running this job is stopping (or this job is being killed): save your
    progress, and return or raise Shutdown soon."""
    return _page is not None and _page.read()[2] != 0


def seconds_left() -> float | None:
    """Seconds until Shutdown is raised in this job (0.0 once it is due), or None when no stop is
    pending. SIGKILL follows RESQUE_STARTER_SHUTDOWN_GRACE seconds after that."""
    if _page is None:
        return None
    shutdown_at, _kill_at, kind = _page.read()
    return max(0.0, shutdown_at - time.monotonic()) if kind else None


# --- the worker's side (resque_starter.worker) ----------------------------------------------------


def share() -> _Page:
    """In a new worker, before it forks anything: a fresh page, this worker's and its horses'."""
    global _page
    _page = _Page()
    signal.signal(SHUTDOWN_SIGNAL, _on_shutdown_signal)
    return _page


def pending_kind() -> int:
    return _page.read()[2] if _page is not None else 0


def reason(kind: int) -> str:
    return _REASONS.get(kind, _REASONS[STOP])


def set_performing(performing: bool) -> None:
    global _performing
    _performing = performing


def _on_shutdown_signal(signum: int, frame: FrameType | None) -> None:
    """Raise inside the job; outside one (rq's bookkeeping before or after it) do nothing: the worker's
    deadline still ends a horse that does not finish."""
    if _performing:
        set_performing(False)
        raise Shutdown(reason(pending_kind()))
