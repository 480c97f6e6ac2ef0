"""What the worker's signal handlers may touch (`Controls`), what the worker knows of its environment
(`Context`) and of the job it runs (`Running`): the state shared by the worker mixins and the process.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import FrameType
from typing import Any, Protocol

from rq.job import Job
from rq.utils import now

from resque_starter import job as job_api
from resque_starter import orphans, protocol
from resque_starter.config import Settings
from resque_starter.protocol import WorkerSpec

REDIS_BACKOFF_FIRST = 0.5  # waiting for Redis: the first wait, doubled up to the last
REDIS_BACKOFF_MAX = 30.0

# Why the running job is being stopped, as the page of resque_starter.job says (harder is larger).
STOPPING, QUICK_STOP, KILL_JOB = job_api.STOP, job_api.QUICK, job_api.KILL
QUICK_STOP_REASON = job_api.reason(QUICK_STOP)
KILL_JOB_REASON = job_api.reason(KILL_JOB)

_OUR_SIGNALS = (signal.SIGTERM, signal.SIGQUIT, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCONT)


class Interruptible(Protocol):
    """The worker, as the signal handlers see it (StarterMixin)."""

    def stop_job(self, kind: int) -> None: ...


class Controls:
    """The state signal handlers may touch: flags, plus the worker once it exists.

    Every handler only sets flags or starts the running job's stop (worker.stop_job: the job is
    warned at once, Shutdown is raised in it at the deadline, SIGKILL follows). A wakeup pipe
    (signal.set_wakeup_fd) lets the worker sleep while paused or backing off and still react to a
    signal at once.
    """

    def __init__(self, paused: bool) -> None:
        self.stop = False
        self.quick = False
        self.stop_requested_at: datetime | None = None  # of a warm shutdown (TERM, QUIT, `rq shutdown`)
        self.paused = paused
        self.worker: Interruptible | None = None
        self.installed = False  # our signal handlers (a worker rq's own code built installs them in work())
        self._read = self._write = -1  # the wakeup pipe, made when first needed

    def _pipe(self) -> tuple[int, int]:
        if self._read < 0:
            self._read, self._write = os.pipe()
            os.set_blocking(self._read, False)
            os.set_blocking(self._write, False)
        return self._read, self._write

    def install(self) -> None:
        self.installed = True
        signal.set_wakeup_fd(self._pipe()[1], warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGQUIT, self._on_stop)
        signal.signal(signal.SIGINT, self._on_quick_stop)
        signal.signal(signal.SIGUSR1, self._on_kill_job)
        signal.signal(signal.SIGUSR2, self._on_pause)
        signal.signal(signal.SIGCONT, self._on_resume)

    def uninstall_in_child(self) -> None:
        """In a fork of the worker (horse, scheduler): none of this belongs to it."""
        if self.installed:
            self.installed = False
            signal.set_wakeup_fd(-1)
            for signum in _OUR_SIGNALS:
                signal.signal(signum, signal.SIG_DFL)
        if self._read >= 0:
            os.close(self._read)
            os.close(self._write)
            self._read = self._write = -1

    @property
    def wake_fd(self) -> int:
        """Readable once a signal came: what an idle wait selects on besides Redis."""
        return self._pipe()[0]

    def request_stop(self) -> None:
        """A warm shutdown (TERM, QUIT, or rq's command listener in another thread): the flag, when it
        was asked (rq records that), and a byte in the wakeup pipe, which ends an idle wait at once."""
        self.stop = True
        self.stop_requested_at = self.stop_requested_at or now()
        if self.worker is not None:
            self.worker.stop_job(STOPPING)
        with contextlib.suppress(BlockingIOError):
            os.write(self._pipe()[1], b"\0")

    def wait(self, timeout: float) -> None:
        """Sleep up to `timeout` seconds; any signal ends it early."""
        read = self._pipe()[0]
        select.select([read], [], [], timeout)
        with contextlib.suppress(BlockingIOError):
            while os.read(read, 512):
                pass

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self.request_stop()

    def _on_quick_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stop = self.quick = True
        if self.worker is not None:
            self.worker.stop_job(QUICK_STOP)

    def _on_kill_job(self, signum: int, frame: FrameType | None) -> None:
        if self.worker is not None:
            self.worker.stop_job(KILL_JOB)

    def _on_pause(self, signum: int, frame: FrameType | None) -> None:
        self.paused = True

    def _on_resume(self, signum: int, frame: FrameType | None) -> None:
        self.paused = False


@dataclass
class Context:
    """Everything the worker needs from its environment, built once in run_worker (or, for a worker
    class rq builds itself, as in Worker.find_by_key, `detached`)."""

    settings: Settings
    spec: WorkerSpec
    controls: Controls
    status: socket.socket | None  # to the supervisor; None when there is none
    queues: tuple[str, ...] = ()
    label: str = ""
    deadline: float | None = None
    promote_to: int | None = None  # the generation whose mold the supervisor asked this worker to be
    pid: int = field(default_factory=os.getpid)  # the worker's, in every fork of it
    _inbox: protocol.LineBuffer = field(default_factory=protocol.LineBuffer, repr=False)
    _released: bool = field(default=False, repr=False)
    _hung_up: bool = field(default=False, repr=False)

    @classmethod
    def detached(cls) -> Context:
        """For a worker built with no supervisor, as rq's own code builds one (find_by_key, all(), a
        script): the default settings, no status socket; it installs its signal handlers in work()."""
        spec = WorkerSpec(group=0, slot=0, generation=0, name="")
        return cls(Settings(), spec, Controls(paused=False), None)

    def send(self, message: dict[str, Any]) -> None:
        """Tell the supervisor; it may be gone (then nobody is listening), which is not our problem."""
        if self.status is None:
            return
        with contextlib.suppress(OSError):
            protocol.send(self.status, message)

    def promotion_requested(self) -> bool:
        """Read, without blocking, whether the supervisor sent `promote` (its only message to a worker)."""
        if self.status is None:
            return False
        while self.promote_to is None and select.select([self.status], [], [], 0)[0]:
            try:
                data = self.status.recv(65536)
            except OSError:
                data = b""
            if not data:
                self._hung_up = True
                return False
            for message in self._inbox.feed(data):
                if message.get("op") == "promote":
                    self.promote_to = int(message["generation"])
        return self.promote_to is not None

    def watched(self) -> tuple[int, ...]:
        """What an idle wait also wakes on: the supervisor's socket, until it hangs up (then it would
        be readable forever)."""
        if self.status is None or self._hung_up or self.promote_to is not None:
            return ()
        return (self.status.fileno(),)

    def title(self, state: str) -> str:
        return f"resque-starter: worker[{self.label}] gen={self.spec.generation} {state}"

    def close_in_child(self) -> None:
        """os.register_at_fork hook, in each child of the worker (its horse forker, rq's horse or
        scheduler): our socket and handlers are not its own, and it dies with the worker. rq's scheduler
        would outlive a killed worker holding the worker's Redis connections open, and a claim the worker
        had waiting could then still move a job into the dead worker's list after its recovery."""
        if self._released:
            return  # a fork of a fork: already done in its parent
        if self.status is not None:
            self.status.close()
        self.release()
        orphans.die_with_parent(self.pid)

    def release(self) -> None:
        """Give up the signal handlers and wakeup pipe for good (a fork, or a worker promoted to mold):
        the at-fork hook, which cannot be unregistered, does nothing from here on."""
        self._released = True
        self.controls.uninstall_in_child()


FINISHED, FAILED, REQUEUED, STOPPED = "finished", "failed", "requeued", "stopped"  # how a job ended


@dataclass
class Running:
    """The job a worker (or horse) runs: what its titles, events and log lines name."""

    job_id: str
    func: str
    queue: str
    started: float  # time.time()
    timeout: float | None = None  # rq's, in seconds; None for none
    enqueued: float | None = None  # the job's enqueued_at, as a timestamp
    stopped: bool = False  # killed on request (SIGUSR1, ctl kill-job, rq's stop-job)

    @classmethod
    def of(cls, job: Job, queue: str, timeout: float | None = None) -> Running:
        enqueued = job.enqueued_at.replace(tzinfo=UTC).timestamp() if job.enqueued_at else None
        return cls(job.id, func_name(job), queue, time.time(), timeout, enqueued)

    @property
    def elapsed(self) -> float:
        return time.time() - self.started

    def outcome(self, before: tuple[int, int, int], after: tuple[int, int, int]) -> str:
        """How the job ended, from the worker's counters (done, failed, requeued) around it: a horse's
        success or failure reaches the worker only as rq's counters in Redis."""
        done, failed, requeued = (b - a for a, b in zip(before, after, strict=True))
        if requeued:
            return REQUEUED
        if self.stopped:
            return STOPPED
        return FINISHED if done and not failed else FAILED


def func_name(job: Job) -> str:
    """The job's function name, for titles and events; "?" for data rq cannot load."""
    try:
        return job.func_name or "?"
    except Exception:  # undeserializable job data: rq fails it when it runs
        return "?"
