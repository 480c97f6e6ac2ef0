"""The supervisor's process table: one row per mold, worker, recovery and agent it started.

Rows hold the *actual* state, as the processes last reported it; the supervisor's desired state
(sizes, generation, paused, stopping) lives on the supervisor, and `reconcile()` converges one
toward the other.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from resque_starter import procmem
from resque_starter.config import Settings
from resque_starter.protocol import EXIT_REDIS_UNREACHABLE, LineBuffer, Outbox, WorkerSpec
from resque_starter.states import StopLevel, WorkerState


@dataclass
class Mold:
    generation: int
    pid: int
    sock: socket.socket
    settings: Settings
    buffer: LineBuffer = field(default_factory=LineBuffer)
    ready: bool = False
    failed: bool = False
    promoted: bool = False  # a worker promoted to mold (reforking); its generation does not refork again
    # requests sent and not yet answered with "forked", by token, with when they were sent: what its
    # death or hang must give back to the desired state
    pending: dict[str, float] = field(default_factory=dict)
    hung: bool = False  # it stopped reading or answering: killed, and replaced once reaped
    outbox: Outbox = field(init=False)

    def __post_init__(self) -> None:
        self.outbox = Outbox(self.sock)


@dataclass
class Worker:
    """A worker process and what it last told us about itself."""

    spec: WorkerSpec
    status: socket.socket
    queues: tuple[str, ...]
    pid: int | None = None
    started_at: float = field(default_factory=time.monotonic)
    buffer: LineBuffer = field(default_factory=LineBuffer)
    state: WorkerState = WorkerState.STARTING
    ready: bool = False
    job: dict[str, Any] | None = None
    done: int = 0
    failed: int = 0
    requeued: int = 0
    stop_level: StopLevel | None = None
    stop_reason: str = ""
    paused: bool = False
    listening: bool = True
    promotable: bool = False  # it ran REFORK_AFTER jobs
    promoting: int | None = None  # asked to become the mold of this generation
    kill_at: float | None = None  # time.monotonic() when a graceful stop of this worker is over (SIGKILL)
    deadline_kind: int = 0  # it killed itself at its job's stop deadline (resque_starter.job.STOP...)
    dump_asked: float | None = None  # the watchdog asked it for its stack (time.monotonic())
    stuck: str | None = None  # the watchdog killed it: where its job was stuck

    @property
    def group(self) -> str:
        """The name of its group as spawned (a reload may renumber the groups)."""
        return ",".join(self.queues)

    @property
    def key(self) -> tuple[int, int]:
        return (self.spec.group, self.spec.slot)

    @property
    def stopping(self) -> bool:
        return self.stop_level is not None

    @property
    def shown_state(self) -> WorkerState:
        """What `ctl status` shows: a busy worker stays busy while it stops, so its job is visible."""
        if self.state == WorkerState.BUSY:
            return self.state
        if self.promoting is not None:
            return WorkerState.PROMOTING
        return WorkerState.STOPPING if self.stopping else self.state

    def row(self) -> dict[str, Any]:
        """This worker's row of `ctl status`, with its memory read now."""
        mem = procmem.read(self.pid) if self.pid else None
        job = self.job or {}
        started = job.get("started")
        return {
            "group": self.group,
            "slot": self.spec.slot,
            "pid": self.pid,
            "generation": self.spec.generation,
            "name": self.spec.name,
            "state": self.shown_state.value,
            "ready": self.ready,
            "job_id": job.get("job"),
            "job_func": job.get("func"),
            "job_age": round(time.time() - float(started), 3) if started else None,
            "horse_pid": job.get("horse"),
            "jobs_done": self.done,
            "jobs_failed": self.failed,
            "jobs_requeued": self.requeued,
            "uptime": round(time.monotonic() - self.started_at, 3),
            "stopping": self.stop_reason or None,
            "uss": mem.uss if mem else None,
            "pss": mem.pss if mem else None,
        }


@dataclass
class Recovery:
    """A short-lived child settling a dead worker's claimed and started jobs."""

    worker: str
    queues: tuple[str, ...]
    requeue: bool
    reason: str
    after_pid: int | None = None  # an orphaned horse that must be reaped first
    pid: int | None = None
    sent: bool = False


@dataclass
class Agent:
    """The child doing the supervisor's Redis work (agent.py), and what it last reported."""

    sock: socket.socket
    pid: int | None = None
    buffer: LineBuffer = field(default_factory=LineBuffer)
    seen: float = field(default_factory=time.monotonic)  # its last message: a hung agent is replaced
    held: dict[str, list[str]] | None = None  # what it was last told the pod holds
    redis_ok: bool = False
    redis_at: float = 0.0  # when it last reported on Redis (monotonic)
    killed: bool = False
    releasing: float | None = None  # when it was asked to release the lease (monotonic)


def describe_status(status: int) -> str:
    """A wait status in words, for logs and failed-job reasons."""
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    if os.WEXITSTATUS(status) == EXIT_REDIS_UNREACHABLE:
        return f"exit code {EXIT_REDIS_UNREACHABLE}: it could not reach Redis"
    return f"exit code {os.WEXITSTATUS(status)}"
