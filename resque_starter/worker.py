"""The worker process: an rq worker with resque-starter's signals, status events and reliable dequeue.

`run_worker` is what the mold calls in a freshly double-forked child. It opens its own Redis
connection (waiting for Redis with backoff), runs the after_fork hook and then rq's `work()` with
`StarterMixin` layered over the configured worker class (`rq.Worker`, `rq.SimpleWorker`, or the
user's), which changes four things:

- Signals (handlers only set flags or kill the horse): TERM/QUIT finish the current job and exit;
  INT interrupts it and requeues it at the front of its queue (or fails it, see
  `recovery.requeue_or_fail`); USR1 kills the current job only; USR2 pauses, CONT resumes.
- Dequeue: instead of rq's BLPOP (a worker killed after the pop loses the job) or BLMOVE into a
  shared intermediate list (recovered after a minute or more), job ids move atomically into a claim
  list of this worker (`recovery.claim_key`) and leave it in the same transaction that records the
  execution, so `recovery.recover_worker` finds everything a dead worker held.
- Status: JSON lines on the supervisor's socket (ready, busy, idle, paused, resumed, recycle,
  promote-ready); the supervisor's one message the other way is `promote`.
- Recycling between jobs after max_jobs, max_lifetime (+-10% jitter) or max_memory (USS).
- Reforking (refork_after): the worker's Nth job runs in this process, even with a forking worker
  class, so what it loads lazily stays here; asked to, the worker then becomes the next mold.

With prefork_horse and a class that forks per job, `PreforkHorseMixin` (over StarterMixin) forks each
horse ahead of its job and reaps it after, both off the job's path, and keeps rq's Redis bookkeeping out
of the horse where it can (the process side is `prefork`).
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import gc
import io
import logging
import os
import pickle
import random
import select
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, NoReturn

import redis
from redis.client import Pipeline
from redis.driver_info import DriverInfo
from rq.command import parse_payload
from rq.exceptions import NoSuchJobError, StopRequested
from rq.executions import Execution
from rq.job import UNEVALUATED, Job, Retry
from rq.queue import Queue
from rq.serializers import DefaultSerializer, JSONSerializer
from rq.suspension import WORKERS_SUSPENDED
from rq.utils import as_text, import_attribute, now
from rq.worker import BaseWorker, DequeueStrategy, WorkerStatus
from rq.worker import Worker as ForkingWorker
from setproctitle import setproctitle

from resque_starter import orphans, prefork, protocol, recovery
from resque_starter.config import Settings, mask_url
from resque_starter.protocol import WorkerSpec

log = logging.getLogger("resque_starter.worker")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_HOOK_FAILED = 70

# How long one blocking wait for a job lasts. It bounds how late a pause or stop takes effect
# while idle, and how late a job on a queue other than the first one is noticed while blocked
# (BLMOVE can wait on one list only; every poll first tries all queues in priority order).
CLAIM_POLL_SECONDS = 1.0
STATUS_SEND_TIMEOUT = 5.0
THREAD_JOIN_TIMEOUT = 5.0  # how long a promoted worker waits for rq's pubsub thread before it forks
REDIS_BACKOFF_FIRST = 0.5
REDIS_BACKOFF_MAX = 30.0
REDIS_CONNECT_TIMEOUT = 5.0
# Given to every client we make: without it, each new connection (every worker, every work-horse)
# looks the version up in the package metadata, running importlib.metadata and an email parser.
DRIVER_INFO = DriverInfo(lib_version=redis.__version__)

QUICK_STOP = "quick"
KILL_JOB = "kill"
QUICK_STOP_REASON = "resque-starter: interrupted by shutdown (quick stop, SIGINT)"
KILL_JOB_REASON = "resque-starter: job killed by SIGUSR1"
LEFTOVER_REASON = "resque-starter: the worker stopped with this job unfinished"
COUNTERS = ("successful_job_count", "failed_job_count")  # rq's, in the worker's hash: the idle event's
DONE = b"done"  # a pre-forked horse's report when it finished its job the rq way, to the end

# Signals whose handlers a fork may have inherited from the supervisor, the mold or pytest.
_RESET_SIGNALS = (
    signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2,
    signal.SIGCONT, signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD, signal.SIGALRM, signal.SIGWINCH,
)  # fmt: skip
_OUR_SIGNALS = (signal.SIGTERM, signal.SIGQUIT, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCONT)

# KEYS[1..n]: queue keys in dequeue order, KEYS[n+1..2n]: this worker's claim lists for them;
# ARGV[1..n]: the queue names, ARGV[n+1]: the job key prefix. Moves the first available job id into its
# claim list: {queue, id, the job's fields} (what Job.fetch reads, in the same round trip), or nil.
_CLAIM_FIRST = """
local n = #KEYS / 2
for i = 1, n do
  local job_id = redis.call('LMOVE', KEYS[i], KEYS[n + i], 'LEFT', 'RIGHT')
  if job_id then
    return {ARGV[i], job_id, redis.call('HGETALL', ARGV[n + 1] .. job_id)}
  end
end
return false
"""


class JobInterrupted(BaseException):
    """Raised inside a SimpleWorker's running job by SIGINT or SIGUSR1 (a forking worker kills its
    horse instead). A BaseException, like rq's ShutDownImminentException, so `except Exception` in
    job code does not swallow it."""


class Controls:
    """The state signal handlers may touch: flags, plus the worker once it exists.

    Every handler only sets flags or interrupts the running job. A wakeup pipe (signal.set_wakeup_fd)
    lets the worker sleep while paused or backing off and still react to a signal at once.
    """

    def __init__(self, paused: bool) -> None:
        self.stop = False
        self.quick = False
        self.paused = paused
        self.worker: StarterMixin | None = None
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)

    def install(self) -> None:
        signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGQUIT, self._on_stop)
        signal.signal(signal.SIGINT, self._on_quick_stop)
        signal.signal(signal.SIGUSR1, self._on_kill_job)
        signal.signal(signal.SIGUSR2, self._on_pause)
        signal.signal(signal.SIGCONT, self._on_resume)

    def uninstall_in_child(self) -> None:
        """In a fork of the worker (horse, scheduler): none of this belongs to it."""
        signal.set_wakeup_fd(-1)
        for signum in _OUR_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        os.close(self._read)
        os.close(self._write)

    def wait(self, timeout: float) -> None:
        """Sleep up to `timeout` seconds; any signal ends it early."""
        select.select([self._read], [], [], timeout)
        with contextlib.suppress(BlockingIOError):
            while os.read(self._read, 512):
                pass

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stop = True

    def _on_quick_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stop = self.quick = True
        if self.worker is not None:
            self.worker.interrupt_job(QUICK_STOP)

    def _on_kill_job(self, signum: int, frame: FrameType | None) -> None:
        if self.worker is not None:
            self.worker.interrupt_job(KILL_JOB)

    def _on_pause(self, signum: int, frame: FrameType | None) -> None:
        self.paused = True

    def _on_resume(self, signum: int, frame: FrameType | None) -> None:
        self.paused = False


@dataclass
class Context:
    """Everything the worker needs from its environment, built once in run_worker."""

    settings: Settings
    spec: WorkerSpec
    controls: Controls
    status: socket.socket
    queues: tuple[str, ...] = ()
    label: str = ""
    deadline: float | None = None
    promote_to: int | None = None  # the generation whose mold the supervisor asked this worker to be
    pid: int = field(default_factory=os.getpid)  # the worker's, in every fork of it
    _inbox: protocol.LineBuffer = field(default_factory=protocol.LineBuffer, repr=False)
    _released: bool = field(default=False, repr=False)

    def send(self, message: dict[str, Any]) -> None:
        """Tell the supervisor; it may be gone (then nobody is listening), which is not our problem."""
        with contextlib.suppress(OSError):
            protocol.send(self.status, message)

    def promotion_requested(self) -> bool:
        """Read, without blocking, whether the supervisor sent `promote` (its only message to a worker)."""
        while self.promote_to is None and select.select([self.status], [], [], 0)[0]:
            try:
                data = self.status.recv(65536)
            except OSError:
                return False
            if not data:
                return False
            for message in self._inbox.feed(data):
                if message.get("op") == "promote":
                    self.promote_to = int(message["generation"])
        return self.promote_to is not None

    def title(self, state: str) -> str:
        return f"resque-starter: worker[{self.label}] gen={self.spec.generation} {state}"

    def close_in_child(self) -> None:
        """os.register_at_fork hook, in each child of the worker (its horse forker, rq's horse or
        scheduler): our socket and handlers are not its own, and it dies with the worker. rq's scheduler
        would outlive a killed worker holding the worker's Redis connections open, and a claim the worker
        had waiting could then still move a job into the dead worker's list after its recovery."""
        if self._released:
            return  # a fork of a fork: already done in its parent
        self.status.close()
        self.release()
        orphans.die_with_parent(self.pid)

    def release(self) -> None:
        """Give up the signal handlers and wakeup pipe for good (a fork, or a worker promoted to mold):
        the at-fork hook, which cannot be unregistered, does nothing from here on."""
        self._released = True
        self.controls.uninstall_in_child()


@dataclass
class Running:
    job_id: str
    func: str
    queue: str
    started: float


def _func_name(job: Job) -> str:
    try:
        return job.func_name or "?"
    except Exception:  # undeserializable job data: rq fails it when it runs
        return "?"


def private_memory() -> int:
    """This process's USS in bytes: memory no other process shares (copy-on-write copies included)."""
    total = 0
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1]) * 1024
    return total


class StarterMixin:
    """resque-starter's behaviour over any rq worker class (`type('StarterWorker', (StarterMixin, cls), {})`).

    Relies on these rq 3.0 BaseWorker hooks: dequeue_job_and_maintain_ttl, execute_job,
    prepare_execution, fork_work_horse, kill_horse, prepare_job_execution, handle_execution_ended,
    handle_job_failure, register_birth, teardown, procline, heartbeat, set_state, check_for_suspension.
    """

    # Attributes of rq's BaseWorker this mixin uses, for type checkers.
    connection: redis.Redis
    name: str
    key: str
    log: logging.Logger
    queues: list[Queue]
    _ordered_queues: list[Queue]
    executions: dict[str, Execution]
    job_class: type[Job]
    queue_class: type[Queue]
    serializer: Any
    last_heartbeat: Any
    horse_pid: int
    is_horse: bool

    def __init__(self, *args: Any, context: Context, **kwargs: Any) -> None:
        self._context = context
        self._controls = context.controls
        self._running: Running | None = None
        self._interrupts: dict[str, str] = {}
        self._performing = False
        self._jobs_done = 0
        self._requeued = 0
        self._in_process = False
        self._state_title = "starting"
        self._claim_first = None
        self._counters: list[bytes | None] | None = None  # read with the end of the last job
        self._heartbeat_sent = False  # with the end of the last job, for rq's loop, which sends one next
        self._suspended: bool | None = None  # read with the end of the last job, for rq's loop's next check
        super().__init__(*args, **kwargs)
        self._claim_first = self.connection.register_script(_CLAIM_FIRST)

    # rq's work loop reads and writes this flag; ours is the single source of truth, and a stop once
    # requested is never withdrawn (BaseWorker.__init__ assigns False).
    @property
    def _stop_requested(self) -> bool:
        return self._controls.stop

    @_stop_requested.setter
    def _stop_requested(self, value: bool) -> None:
        self._controls.stop = self._controls.stop or value

    def _install_signal_handlers(self) -> None:
        """run_worker installed our handlers before connecting to Redis; keep them."""

    def handle_payload(self, message: Any) -> None:
        """rq's `shutdown` command sends SIGINT to the worker, which here means a quick stop; make it
        the graceful stop it is in rq. Other commands (kill-horse, stop-job) behave as in rq."""
        if parse_payload(message).get("command") == "shutdown":
            self.log.info("Worker %s: shutdown command received, stopping after the current job", self.name)
            self._controls.stop = True
            return
        super().handle_payload(message)

    # --- titles and events ---------------------------------------------------------------------

    def procline(self, message: str) -> None:
        """rq calls this at every step; show resque-starter's title instead of rq's message."""
        running = self._running
        if running is None:
            setproctitle(self._context.title(self._state_title))
        elif self.is_horse:
            setproctitle(self._context.title(f"horse job={running.job_id[:8]} {running.func}"))
        else:
            elapsed = time.time() - running.started
            setproctitle(self._context.title(f"busy job={running.job_id[:8]} {running.func} {elapsed:.1f}s"))

    def _set_title(self, state: str) -> None:
        self._state_title = state
        self.procline(state)

    def register_birth(self) -> None:
        super().register_birth()
        self._context.send({"event": "ready", "pid": os.getpid(), "name": self.name})

    def _send_busy(self, horse: int | None) -> None:
        running = self._running
        assert running is not None
        self._context.send(
            {"event": "busy", "job": running.job_id, "func": running.func, "queue": running.queue,
             "horse": horse, "started": running.started}
        )  # fmt: skip

    def _send_idle(self) -> None:
        counters, self._counters = self._counters, None
        done, failed = counters if counters is not None else self.connection.hmget(self.key, COUNTERS)
        self._context.send(
            {"event": "idle", "done": int(done or 0), "failed": int(failed or 0), "requeued": self._requeued}
        )

    # --- rq's bookkeeping, in fewer round trips ---------------------------------------------------

    def heartbeat(self, timeout: int | None = None, pipeline: Pipeline | None = None) -> None:
        """rq sends a heartbeat's three commands one round trip each when it is given no pipeline: send them
        in one. The one rq's loop sends right after each job went with the job's end (set_state)."""
        if pipeline is not None:
            super().heartbeat(timeout, pipeline)
            return
        if self._heartbeat_sent and timeout is None:
            self._heartbeat_sent = False
            return
        with self.connection.pipeline(transaction=False) as own:
            super().heartbeat(timeout, own)
            own.execute()

    def set_state(self, state: str, pipeline: Pipeline | None = None) -> None:
        """rq sets IDLE at the end of each job, and the wait for the next sets it again: once is enough. At
        the end of a job, what rq's loop does next (a heartbeat, then the check for `rq suspend`) and the
        counters the idle event reports go in the same round trip."""
        if pipeline is not None:
            super().set_state(state, pipeline)
            return
        if state == self._state:
            return
        if state != WorkerStatus.IDLE or self._running is None:
            super().set_state(state)
            return
        with self.connection.pipeline(transaction=False) as own:
            super().set_state(state, own)
            super().heartbeat(pipeline=own)
            own.hmget(self.key, COUNTERS)
            own.exists(WORKERS_SUSPENDED)
            *_, self._counters, suspended = own.execute()
        self._heartbeat_sent = True
        self._suspended = bool(suspended)

    def check_for_suspension(self, burst: bool) -> None:
        """rq's loop checks for `rq suspend` before each job; after a job, the job's end read it (see
        set_state): only a suspension found then is left for rq to handle."""
        suspended, self._suspended = self._suspended, None
        if suspended is not False:
            super().check_for_suspension(burst)

    # --- dequeue -------------------------------------------------------------------------------

    def dequeue_job_and_maintain_ttl(
        self, timeout: int | None, max_idle_time: int | None = None
    ) -> tuple[Job, Queue] | None:
        """Claim the next job, as rq's version pops it: heartbeats, maintenance and the backoff on
        Redis connection errors are kept; pause, stop and recycling are checked between short waits.

        `timeout` None (burst mode) tries once without blocking; otherwise it waits, in
        CLAIM_POLL_SECONDS steps, until a job comes, a stop, or `max_idle_time` seconds pass.
        """
        self.set_state(WorkerStatus.IDLE)
        self._set_title(f"idle queues={','.join(self._context.queues)}")
        wait = REDIS_BACKOFF_FIRST
        idle_since = time.monotonic()
        while True:
            try:
                self._recycle_if_due()
                self._wait_while_paused()
                if self._controls.stop:
                    raise StopRequested()
                self._heartbeat_if_due()
                if self.should_run_maintenance_tasks:
                    self.run_maintenance_tasks()
                result = self._claim(block=timeout is not None)
                wait = REDIS_BACKOFF_FIRST
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                self.log.error("Worker %s: Redis unreachable (%s), retrying in %.1fs", self.name, exc, wait)
                self._controls.wait(wait)
                wait = min(wait * 2, REDIS_BACKOFF_MAX)
                continue
            if result is not None or timeout is None:
                return result
            if max_idle_time is not None and time.monotonic() - idle_since >= max_idle_time:
                return None

    def _heartbeat_if_due(self) -> None:
        """rq heartbeats before each blocking wait of `dequeue_timeout` seconds: keep that cadence."""
        last = self.last_heartbeat
        if last is None or (now() - last).total_seconds() >= self.dequeue_timeout:
            self.heartbeat()

    def _claim(self, block: bool) -> tuple[Job, Queue] | None:
        """Move the first available job id into this worker's claim list and fetch the job."""
        ordered = self._ordered_queues
        names = [queue.name for queue in ordered]
        claims = [recovery.claim_key(self.name, name) for name in names]
        assert self._claim_first is not None
        prefix = self.job_class.redis_job_namespace_prefix
        found = self._claim_first(keys=[q.key for q in ordered] + claims, args=[*names, prefix])
        if not found and block:
            job_id = self.connection.blmove(ordered[0].key, claims[0], CLAIM_POLL_SECONDS, "LEFT", "RIGHT")
            found = [names[0], job_id, None] if job_id is not None else None
        if not found:
            return None
        queue_name, job_id, fields = as_text(found[0]), as_text(found[1]), found[2]
        queue = ordered[names.index(queue_name)]
        if self._controls.stop or self._controls.paused:  # the signal came while we were waiting
            self._release_claims()
            return None
        try:
            job = self._load(job_id, fields)
        except NoSuchJobError:  # deleted while queued: drop it, as rq does
            self.connection.lrem(recovery.claim_key(self.name, queue_name), 1, job_id)
            return None
        self.reorder_queues(reference_queue=queue)
        job.redis_server_version = self.get_redis_server_version()
        self.log.info("Worker %s: %s: %s (%s)", self.name, queue.name, job.description, job.id)
        return job, queue

    def _load(self, job_id: str, fields: list[bytes] | None) -> Job:
        """The claimed job: Job.fetch, from the fields the claim brought when it could (not after BLMOVE)."""
        if fields is None:
            return self.job_class.fetch(job_id, connection=self.connection, serializer=self.serializer)
        if not fields:
            raise NoSuchJobError(f"No such job: {self.job_class.key_for(job_id)}")
        job = self.job_class(job_id, connection=self.connection, serializer=self.serializer)
        job.restore(dict(zip(fields[::2], fields[1::2], strict=True)))
        return job

    def _release_claims(self) -> None:
        moved = recovery.release_claims(self.connection, self.name, self.queues)
        if moved:
            self.log.info("Worker %s: put %d claimed job(s) back at the front of a queue", self.name, moved)

    def _wait_while_paused(self) -> None:
        if not self._controls.paused or self._controls.stop:
            return
        self.set_state(WorkerStatus.SUSPENDED)
        self._set_title("paused")
        self._context.send({"event": "paused"})
        self.log.info("Worker %s: paused (SIGUSR2), SIGCONT resumes", self.name)
        while self._controls.paused and not self._controls.stop:
            self._heartbeat_if_due()
            self._recycle_if_due()
            self._controls.wait(CLAIM_POLL_SECONDS)  # a signal ends it at once; the rest is polled
        if not self._controls.paused:
            self.log.info("Worker %s: resumed", self.name)
            self._context.send({"event": "resumed"})
        self.set_state(WorkerStatus.IDLE)
        self._set_title(f"idle queues={','.join(self._context.queues)}")

    # --- running a job -------------------------------------------------------------------------

    def execute_job(self, job: Job, queue: Queue) -> None:
        self._running = Running(job.id, _func_name(job), queue.name, time.time())
        refork_after = self._context.settings.refork_after
        try:
            if self._controls.stop:  # it came after the claim: teardown puts the job back
                raise StopRequested()
            # a refork candidate's Nth job runs in this process, even with a forking worker class, so
            # what it loads lazily (imports, caches) stays here, and so in the mold this may become
            self._in_process = self._jobs_done + 1 == refork_after
            super().execute_job(job, queue)
        finally:
            self._in_process = False
            self._running = None
            self._interrupts.clear()
            self._performing = False
        self._jobs_done += 1
        self._send_idle()
        if self._jobs_done == refork_after:
            self._context.send({"event": "promote-ready", "jobs": self._jobs_done})
        self._recycle_if_due()

    @property
    def _forks(self) -> bool:
        """Whether jobs run in a work-horse (rq.Worker and its subclasses) rather than in this process."""
        return isinstance(self, ForkingWorker) and not self._in_process

    def prepare_execution(self, job: Job) -> Execution:
        """rq's prepare_execution, plus removing the job from the claim list in the same transaction:
        from here on the execution (StartedJobRegistry, worker executions) is what names the job."""
        with self.connection.pipeline() as pipeline:
            ttl = self.get_heartbeat_ttl(job)
            execution = Execution.create(job, ttl, pipeline=pipeline, worker_name=self.name)
            self.executions[execution.id] = execution
            self.set_state(WorkerStatus.BUSY, pipeline=pipeline)
            pipeline.lrem(recovery.claim_key(self.name, job.origin), 1, job.id)
            pipeline.execute()
        self.procline("busy")
        if not self._forks:
            self._send_busy(horse=None)
        return execution

    def fork_work_horse(self, job: Job, queue: Queue) -> None:
        if self._in_process:  # rq.SimpleWorker's way, inside the worker class's own execute_job
            self.perform_job(job, queue, self.execution)  # type: ignore[arg-type]
            return
        self._start_horse(job, queue)
        self._send_busy(horse=self.horse_pid)
        if self._interrupts:  # the signal came before there was a horse to kill
            self.kill_horse()

    def _start_horse(self, job: Job, queue: Queue) -> None:
        """rq forks the horse here; PreforkHorseMixin hands the job to one forked in advance instead."""
        super().fork_work_horse(job, queue)

    def main_work_horse(self, job: Job, queue: Queue) -> None:
        """In a fresh work-horse: freeze what it inherited from the worker, so collections in the job
        (the interpreter's, or the gc.collect() many libraries call) examine, and copy, only what the
        job allocates. The worker itself stays unfrozen: its own garbage is still collected there."""
        gc.freeze()
        super().main_work_horse(job, queue)  # type: ignore[misc]

    def monitor_work_horse(self, job: Job, queue: Queue, execution: Execution) -> None:
        if not self._in_process:  # nothing to monitor when the job ran in fork_work_horse
            super().monitor_work_horse(job, queue, execution)

    def prepare_job_execution(self, job: Job, remove_from_intermediate_queue: bool = False) -> None:
        super().prepare_job_execution(job, remove_from_intermediate_queue)
        if not self.is_horse and not self._forks:  # SimpleWorker: the job runs in this process from here on
            self._performing = True
            kind = self._interrupts.get(job.id)
            if kind:
                self._raise_interrupt(kind)

    def handle_execution_ended(self, job: Job, queue: Queue, heartbeat_ttl: int) -> None:
        self._performing = False
        super().handle_execution_ended(job, queue, heartbeat_ttl)

    def maintain_heartbeats(self, job: Job, execution: Execution) -> None:
        super().maintain_heartbeats(job, execution)
        self.procline("busy")  # refresh the elapsed time in the title

    def kill_horse(self, sig: signal.Signals = signal.SIGKILL) -> None:
        """rq kills the horse's process group, but a horse that has not yet run its os.setpgrp() is
        still in ours, and so may be the supervisor: then kill the horse alone (it has no children
        yet). A horse that already exited is no error."""
        pid = self.horse_pid
        if not pid:
            return
        try:
            if os.getpgid(pid) == pid:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        except ProcessLookupError:
            return
        self.log.info("Worker %s: killed horse pid %s", self.name, pid)

    def interrupt_job(self, kind: str) -> None:
        """Signal handler side of SIGINT / SIGUSR1: kill the horse, or raise inside a SimpleWorker's
        job. Outside a job it does nothing; the job is settled in handle_job_failure."""
        running = self._running
        if running is None:
            return
        self._interrupts[running.job_id] = kind
        if self.horse_pid:
            self.kill_horse()
        elif self._performing:
            self._raise_interrupt(kind)

    def _raise_interrupt(self, kind: str) -> NoReturn:
        self._performing = False
        raise JobInterrupted(QUICK_STOP_REASON if kind == QUICK_STOP else KILL_JOB_REASON)

    def handle_job_failure(
        self,
        job: Job,
        queue: Queue,
        started_job_registry: Any = None,
        exc_string: str = "",
        execution: Execution | None = None,
    ) -> None:
        """A job we interrupted on SIGINT is requeued or failed by the shared rule; one killed by
        SIGUSR1 fails (or is retried) the rq way with a reason that names us."""
        kind = self._interrupts.pop(job.id, None)
        if kind == QUICK_STOP and execution is not None:
            outcome = recovery.requeue_or_fail(
                job,
                queue,
                execution,
                max_requeues=self._context.settings.max_requeues,
                reason=f"{QUICK_STOP_REASON}\n{exc_string}".rstrip(),
                requeue=self._context.settings.requeue_interrupted,
                connection=self.connection,
                worker_name=self.name,
            )
            self.executions.pop(execution.id, None)
            if outcome in (recovery.FAILED, recovery.RETRIED):
                self.increment_failed_job_count()
            self._requeued += outcome == recovery.REQUEUED
            return
        if kind == KILL_JOB:
            exc_string = f"{KILL_JOB_REASON}\n{exc_string}"
        super().handle_job_failure(job, queue, started_job_registry, exc_string, execution)

    # --- stopping ------------------------------------------------------------------------------

    def _recycle_if_due(self) -> None:
        if self._controls.stop:
            return
        if self._context.promotion_requested():
            generation = self._context.promote_to
            self.log.info("Worker %s: promoted to be the mold of generation %d", self.name, generation)
            self._controls.stop = True
            return
        reason = self._recycle_reason()
        if reason:
            self.log.info("Worker %s: recycling (%s)", self.name, reason)
            self._context.send({"event": "recycle", "reason": reason})
            self._controls.stop = True

    def _recycle_reason(self) -> str | None:
        settings = self._context.settings
        if settings.max_jobs is not None and self._jobs_done >= settings.max_jobs:
            return "max_jobs"
        if self._context.deadline is not None and time.monotonic() >= self._context.deadline:
            return "max_lifetime"
        if settings.max_memory is not None and private_memory() > settings.max_memory:
            return "max_memory"
        return None

    def teardown(self) -> None:
        """Give back what this worker still holds before rq unregisters it: claims to the front of
        their queues, and any execution left by an error in the loop. If Redis is unreachable this
        raises, the worker stays registered, and the supervisor's recover_worker settles it."""
        if not self.is_horse:
            self._set_title("stopping")
            self._release_claims()
            for execution in list(self.executions.values()):
                self._settle_leftover(execution)
        super().teardown()

    def unsubscribe(self) -> None:
        """Stop the pubsub thread before unsubscribing, so the UNSUBSCRIBE reply wakes it into a loop
        that ends: rq's order leaves it blocked for its 60 s read, and every stop waits out join(1)."""
        if self.pubsub_thread:
            self.pubsub_thread.stop()
        super().unsubscribe()

    def _settle_leftover(self, execution: Execution) -> None:
        job = execution.job
        queue = self.queue_class(
            job.origin, connection=self.connection, job_class=self.job_class, serializer=self.serializer
        )
        outcome = recovery.requeue_or_fail(
            job,
            queue,
            execution,
            max_requeues=self._context.settings.max_requeues,
            reason=LEFTOVER_REASON,
            requeue=True,
            connection=self.connection,
            worker_name=self.name,
        )
        self.executions.pop(execution.id, None)
        self._requeued += outcome == recovery.REQUEUED


class PreforkHorseMixin(StarterMixin):
    """RESQUE_STARTER_PREFORK_HORSE over rq.Worker: no fork, and no exit, on the job's path, no fork in
    the worker at all, and in the horse little but the job.

    At start the worker forks its forker (`prefork`), which forks each horse ahead of its job: the next
    one while the current job runs (or at start). The worker prepares a dequeued job as rq's horse would
    first thing (heartbeats, started status) and hands the job itself to the waiting horse, as the worker
    holds it, the way rq's horse inherits it by fork (too large for one message, by id: the horse fetches
    it). The horse rebuilds the Execution the worker has just saved and runs rq's main_work_horse. A job
    that returns a value the worker can save as it is (`_hand_back`) ends there: the horse sends the value
    back and exits, and the worker saves it through rq's own _finalize_success. Every other ending (an
    exception, a callback, a Retry, a value of the app's classes) the horse finishes itself, the rq way,
    and says so. Why: a fresh process pays for every page it writes, and Python writes every object it
    touches (reference counts), so rq's Redis bookkeeping cost most of a horse's time; the worker's pages
    are its own. Each job still gets its own process, and a horse whose job needs no Redis never connects.
    The rest is rq's and StarterMixin's: monitor_work_horse (heartbeats, the death of a horse, the timeout
    kill), kill_horse, the busy event with the horse's pid, results, retries, registries.
    """

    _forker: prefork.Forker | None = None
    _spare: prefork.Horse | None = None  # forked, waiting for a job
    _horse: prefork.Horse | None = None  # running the current job
    _report: prefork.Report | None = None  # in a horse: the one message back to the worker
    _handed_back: bytes | None = None  # in the worker: the horse's return value, to finish the job with
    _horse_pid: int
    _is_horse: bool

    def bootstrap(self, *args: Any, **kwargs: Any) -> None:
        super().bootstrap(*args, **kwargs)  # type: ignore[misc]
        os.register_at_fork(after_in_child=self._close_in_child)
        self._ensure_spare()

    def monitor_work_horse(self, job: Job, queue: Queue, execution: Execution) -> None:
        self._ensure_spare()  # while the horse runs the job
        super().monitor_work_horse(job, queue, execution)  # type: ignore[misc]
        payload, self._handed_back = self._handed_back, None
        if payload is not None:
            serialized, job.started_at = pickle.loads(payload)
            self._finalize_success(job, queue, execution, job.serializer.loads(serialized))

    def execute_job(self, job: Job, queue: Queue) -> None:
        super().execute_job(job, queue)
        self._ensure_spare()

    def wait_for_horse(self) -> tuple[int | None, int | None, Any]:
        """rq waits for the horse's exit; a horse that reported counts as exited 0. Its report is DONE, or
        the job's return value, for the worker to save (see monitor_work_horse)."""
        horse, forker = self._horse, self._forker
        if horse is None or forker is None:
            return None, None, None
        report, status, rusage = forker.wait(horse)
        if report is not None and report != DONE:
            self._handed_back = report
        self._horse = None
        horse.close()
        return horse.pid, status, rusage

    def perform_job(self, job: Job, queue: Queue, execution: Execution) -> bool:
        finished = super().perform_job(job, queue, execution)  # type: ignore[misc]
        if self._report is not None:
            self._report(DONE)
        return finished

    def prepare_job_execution(self, job: Job, remove_from_intermediate_queue: bool = False) -> None:
        if not self.is_horse:  # a horse's job was prepared by the worker before it was handed over
            super().prepare_job_execution(job, remove_from_intermediate_queue)

    def _finalize_success(self, job: Job, queue: Queue, execution: Execution, return_value: Any) -> None:
        """In a horse: hand the return value back to the worker, which saves it and does the rest of rq's
        bookkeeping, when nothing of that runs user code; otherwise (and in the worker) rq's own."""
        payload = self._hand_back(job, return_value) if self._report is not None else None
        if payload is None:
            super()._finalize_success(job, queue, execution, return_value)  # type: ignore[misc]
            return
        report, self._report = self._report, None
        report(payload)

    @staticmethod
    def _hand_back(job: Job, return_value: Any) -> bytes | None:
        """The return value serialized as the worker is to save it, if the worker can finish the job: no
        callback or webhook to run, no Retry to act on, a value the worker can load without importing
        or running any code of the app's, and small enough for one message."""
        if isinstance(return_value, Retry) or job.success_callback or job.webhooks:
            return None
        try:
            serialized = job.serializer.dumps(return_value)
        except Exception:  # rq saves UNSERIALIZABLE_RETURN_VALUE_PAYLOAD instead: its own path
            return None
        payload = pickle.dumps((serialized, job.started_at))
        if len(payload) > prefork.MAX_MESSAGE or not _plain(job.serializer, serialized):
            return None
        return payload

    def teardown(self) -> None:
        if not self.is_horse:
            for horse in (self._spare, self._horse):
                if horse is not None:
                    self._discard(horse)
            self._spare = self._horse = None
            if self._forker is not None:
                self._forker.close()
                self._forker = None
        super().teardown()

    def _heartbeat_if_due(self) -> None:
        """Polled about every second while idle or paused: also the moment to notice a dead spare."""
        super()._heartbeat_if_due()
        self._drop_dead_spare()

    def maintain_heartbeats(self, job: Job, execution: Execution) -> None:
        """Polled every job_monitoring_interval while a job runs."""
        super().maintain_heartbeats(job, execution)
        self._drop_dead_spare()

    def _drop_dead_spare(self) -> None:
        """A spare that died waiting (killed, or failed to start) is replaced now, not at the next job,
        which may be hours away (its forker has reaped it: no zombie stays)."""
        spare, forker = self._spare, self._forker
        if spare is None or forker is None or not forker.ended(spare):
            return
        why = f"could not be forked: {spare.error}" if spare.error else "died waiting for a job"
        self.log.warning("Worker %s: pre-forked horse %s %s", self.name, spare.pid or "", why)
        spare.close()
        self._spare = None
        self._ensure_spare()

    def _start_horse(self, job: Job, queue: Queue) -> None:
        execution = self.execution  # type: ignore[attr-defined]
        os.environ["RQ_WORKER_ID"] = self.name
        os.environ["RQ_JOB_ID"] = job.id
        self.prepare_job_execution(job, remove_from_intermediate_queue=len(self.queues) == 1)
        message = self._hand_off(job, queue, execution)
        horse, self._spare = self._spare, None
        try:
            horse = self._ready(horse or self._fork_horse())
            horse.hand(message)
        except OSError as exc:  # its fork failed, it died waiting, or its forker did
            self.log.warning("Worker %s: pre-forked horse lost (%s); forking one", self.name, exc)
            if horse is not None:
                self._discard(horse)
            horse = self._ready(self._fork_horse())
            horse.hand(message)
        self._horse = horse
        self._horse_pid = horse.pid
        self.procline(f"Handed {job.id} to horse {horse.pid}")

    def _hand_off(self, job: Job, queue: Queue, execution: Execution) -> bytes:
        """What the horse needs to run the job: the Job as the worker holds it now, attribute by attribute
        (as rq's horse inherits it by fork; rebuilding it from Redis's fields costs a fresh horse about 40
        more copied pages), without its connection (the horse has its own) and with rq's mark of what it
        has not loaded yet by name. Too large for one message, or not picklable: its id, to fetch it by."""
        fields = vars(job)
        state = {
            name: value for name, value in fields.items() if name != "connection" and value is not UNEVALUATED
        }
        unloaded = [name for name, value in fields.items() if value is UNEVALUATED]
        times = (execution.created_at, execution.last_heartbeat)
        try:
            message = pickle.dumps((job.id, (state, unloaded), execution.id, queue.name, times))
        except Exception:  # an attribute that only the job's own serializer can save
            message = None
        if message is None or len(message) > prefork.MAX_MESSAGE:
            message = pickle.dumps((job.id, None, execution.id, queue.name, times))
        return message

    def _ensure_spare(self) -> None:
        """Ask for the next horse, not waiting for its fork: that happens while the job runs, or the
        worker waits for the next one. A failed fork is noticed, and logged, when the horse is needed."""
        if self._spare is not None or self._controls.stop:
            return
        try:
            self._spare = self._fork_horse()
        except OSError as exc:  # the forker is gone: the hand-off forks another when a job comes
            self.log.warning("Worker %s: could not pre-fork a horse: %s", self.name, exc)

    def _ready(self, horse: prefork.Horse) -> prefork.Horse:
        assert self._forker is not None, "a horse comes from the forker"
        self._forker.ready(horse)
        return horse

    def _fork_horse(self) -> prefork.Horse:
        """A horse from the forker; a new forker first if there is none yet, or it died (then every
        horse it had died with it)."""
        if self._forker is not None and self._forker.gone:
            self.log.warning("Worker %s: horse forker %s died; forking another", self.name, self._forker.pid)
            self._forker.close()
            self._forker = None
        if self._forker is None:
            callbacks = (self._become_forker, self._wait_as_spare, self._run_handed_job)
            self._forker = prefork.Forker.start(*callbacks)
        return self._forker.spawn()

    def _discard(self, horse: prefork.Horse) -> None:
        """End a horse that will run no job of ours (it holds nothing: no job, no claim). One whose fork
        is not answered yet exits by itself when its socket closes."""
        horse.close()
        if not horse.pid:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(horse.pid, signal.SIGKILL)
        if self._forker is not None:
            self._forker.forget(horse.pid)

    def _close_in_child(self) -> None:
        """In any child of the worker (its forker, rq's scheduler, a horse): the worker's sockets to
        its forker and horses are not its own."""
        for held in (self._spare, self._horse, self._forker):
            if held is not None:
                held.sock.close()
        self._spare = self._horse = self._forker = None

    # --- in the forker -------------------------------------------------------------------------

    def _become_forker(self) -> None:
        self._set_title("horse forker")

    # --- in the horse --------------------------------------------------------------------------

    def _wait_as_spare(self) -> None:
        """Forget the worker's job, if any, and connect to Redis before a job comes (best effort)."""
        self._is_horse = True
        self._horse_pid = 0
        self._running = None
        self.executions = {}
        self.setup_work_horse_signals()  # type: ignore[attr-defined]
        self._set_title("horse pre-forked, waiting for a job")

    def _run_handed_job(self, message: bytes, report: prefork.Report) -> None:
        job_id, saved, execution_id, queue_name, times = pickle.loads(message)
        os.environ["RQ_WORKER_ID"] = self.name
        os.environ["RQ_JOB_ID"] = job_id
        if saved is None:
            job = self.job_class.fetch(job_id, connection=self.connection, serializer=self.serializer)
        else:
            state, unloaded = saved
            job = self.job_class.__new__(self.job_class)
            vars(job).update(state, connection=self.connection)
            vars(job).update(dict.fromkeys(unloaded, UNEVALUATED))
        # the execution the worker has just saved, as Execution.fetch would restore it, without the fetch
        execution = Execution(execution_id, job_id, self.connection, worker_name=self.name)
        execution.created_at, execution.last_heartbeat = times
        execution._job = job
        self.executions = {execution.id: execution}
        queue = next(q for q in self.queues if q.name == queue_name)
        self._running = Running(job.id, _func_name(job), queue.name, time.time())
        self._report = report
        self.main_work_horse(job, queue)  # type: ignore[attr-defined]


class _BuiltinsOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"{module}.{name} is not a builtin value")


def _plain(serializer: Any, serialized: bytes) -> bool:
    """Whether loading the value imports and runs nothing: JSON, or a pickle of builtin values."""
    if serializer is JSONSerializer:
        return True
    if serializer is not DefaultSerializer:
        return False
    try:
        _BuiltinsOnly(io.BytesIO(serialized)).load()
    except pickle.UnpicklingError:
        return False
    return True


def forks_horses(worker_class: type[BaseWorker]) -> bool:
    """Whether the class forks a horse per job the way rq.Worker does (not SimpleWorker, SpawnWorker)."""
    if not issubclass(worker_class, ForkingWorker):
        return False
    return worker_class.fork_work_horse is ForkingWorker.fork_work_horse


# --- the process ---------------------------------------------------------------------------------


def run_worker(settings: Settings, spec: WorkerSpec, status: socket.socket) -> NoReturn:
    """Entry point in a freshly forked worker process, run with its group's settings (worker class and
    recycling limits may differ per group). Never returns: 0 after a requested stop or a recycle, 70 when
    the after_fork hook raised, 75 when Redis could not be reached (so the supervisor can say so in the
    reason of the job this cost), 1 on any other failure."""
    code = EXIT_FAILED
    try:
        code = _serve(settings.for_group(spec.group), spec, status)
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        log.error("worker[%s] %s: Redis could not be reached (%s); exiting", spec.slot, spec.name, exc)
        code = protocol.EXIT_REDIS_UNREACHABLE
    except BaseException:
        log.exception("worker[%s] %s failed", spec.slot, spec.name)
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(code)


def _serve(settings: Settings, spec: WorkerSpec, status: socket.socket) -> int:
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    for signum in _RESET_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    context = _make_context(settings, spec, status)
    setproctitle(context.title("starting"))
    status.settimeout(STATUS_SEND_TIMEOUT)
    os.set_inheritable(status.fileno(), False)
    os.register_at_fork(after_in_child=context.close_in_child)
    context.controls.install()

    worker = _connect(context)
    if worker is None:
        return EXIT_OK
    context.controls.worker = worker
    if settings.hooks.after_fork is not None:
        try:
            settings.hooks.after_fork(worker, spec.slot)
        except BaseException:
            log.exception("worker[%s]: the after_fork hook raised", context.label)
            return EXIT_HOOK_FAILED
    worker.work(
        logging_level=settings.log_level,
        with_scheduler=spec.scheduler,
        dequeue_strategy=DequeueStrategy(settings.dequeue_strategy),
    )
    if not context.controls.stop:
        log.error("worker[%s]: rq's work loop ended without a stop request", context.label)
        return EXIT_FAILED
    if context.promote_to is not None:
        _become_mold(context, worker, context.promote_to)
    return EXIT_OK


def _become_mold(context: Context, worker: StarterMixin, generation: int) -> None:
    """Reforking: serve the mold protocol on the status socket, keeping everything the jobs loaded.
    Returns only if this process cannot fork safely (a thread still runs); it then exits like a recycle."""
    from resque_starter.mold import run_mold

    worker.connection.close()  # no child may inherit a Redis connection
    thread = getattr(worker, "pubsub_thread", None)
    if thread is not None:
        thread.join(THREAD_JOIN_TIMEOUT)
    if threading.active_count() > 1:
        names = ", ".join(t.name for t in threading.enumerate() if t is not threading.current_thread())
        log.warning("worker[%s]: not promoted to mold: threads still run (%s)", context.label, names)
        return
    context.controls.worker = None
    context.release()
    context.status.settimeout(None)
    for stream in (sys.stdout, sys.stderr):  # a buffer left here would be written again by every fork
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    # a reforked generation does not refork again: its workers run every job the configured way
    settings = dataclasses.replace(context.settings, refork_after=None)
    run_mold(settings, generation, context.status, promoted=True)


def _make_context(settings: Settings, spec: WorkerSpec, status: socket.socket) -> Context:
    group = settings.groups[spec.group]
    label = f"{group.name}:{spec.slot}" if len(settings.groups) > 1 else str(spec.slot)
    deadline = None
    if settings.max_lifetime is not None:
        deadline = time.monotonic() + settings.max_lifetime * random.uniform(0.9, 1.1)
    return Context(settings, spec, Controls(paused=spec.paused), status, group.queues, label, deadline)


def _connect(context: Context) -> StarterMixin | None:
    """Build the worker on a fresh connection, waiting for Redis with exponential backoff. None when
    a stop was requested before Redis answered."""
    url = context.settings.redis_url
    if not url:
        raise ValueError("no Redis URL: the supervisor must pass one to its workers")
    wait = REDIS_BACKOFF_FIRST
    attempt = 1
    while not context.controls.stop:
        try:
            return build_worker(context)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            log.warning(
                "worker[%s]: Redis at %s not reachable (attempt %d: %s); retrying in %.1fs",
                context.label, mask_url(url), attempt, exc, wait,
            )  # fmt: skip
            context.controls.wait(wait)
            wait = min(wait * 2, REDIS_BACKOFF_MAX)
            attempt += 1
    return None


def warm_client(url: str) -> None:
    """In the mold, before its freeze: build a client as a worker does, without connecting, and load
    the idna codec its first connection loads (socket.getaddrinfo encodes host names with it), so no
    worker imports them (modules, unicodedata tables) on pages of its own."""
    redis.Redis.from_url(url, driver_info=DRIVER_INFO).close()
    codecs.lookup("idna")


def _why_no_prefork(settings: Settings, worker_class: type[BaseWorker]) -> str | None:
    if not forks_horses(worker_class):
        return f"{settings.worker_class} does not fork a horse per job"
    if settings.max_memory is not None:
        # the horse forker shares the worker's pages for good: the worker's USS would not show them
        return "RESQUE_STARTER_MAX_MEMORY needs the worker's memory unshared, and a horse forker shares it"
    return None


def build_worker(context: Context) -> StarterMixin:
    """The configured rq worker class with StarterMixin on top, on its own Redis connection."""
    settings = context.settings
    user_class = import_attribute(settings.worker_class)
    if not (isinstance(user_class, type) and issubclass(user_class, BaseWorker)):
        raise TypeError(f"{settings.worker_class} is not an rq worker class")
    mixin: type[StarterMixin] = StarterMixin
    if settings.prefork_horse:
        why_not = _why_no_prefork(settings, user_class)
        if why_not is None:
            mixin = PreforkHorseMixin
        else:
            log.info("worker[%s]: RESQUE_STARTER_PREFORK_HORSE ignored: %s", context.label, why_not)
    worker_class = type("StarterWorker", (mixin, user_class), {})
    assert settings.redis_url
    connection = redis.Redis.from_url(
        settings.redis_url, socket_connect_timeout=REDIS_CONNECT_TIMEOUT, driver_info=DRIVER_INFO
    )
    tunables = {
        "worker_ttl": settings.worker_ttl,
        "job_monitoring_interval": settings.job_monitoring_interval,
        "maintenance_interval": settings.maintenance_interval,
        "default_result_ttl": settings.result_ttl,
    }
    return worker_class(
        list(context.queues),
        name=context.spec.name,
        connection=connection,
        job_class=settings.job_class,
        queue_class=settings.queue_class,
        serializer=settings.serializer,
        context=context,
        **{key: value for key, value in tunables.items() if value is not None},
    )
