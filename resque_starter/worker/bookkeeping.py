"""The worker's titles and its events to the supervisor, and rq's Redis bookkeeping in fewer round trips.

rq's loop, at the end of each job, sets the worker idle, heartbeats, and checks for `rq suspend`, each a
round trip of its own (three for a heartbeat without a pipeline); the idle event reports the job
counters. `ReportingMixin` sends all of that in one round trip with the job's end, and skips what rq's
loop then repeats. It relies on the order of rq's loop that `rq_compat.WORK_LOOP_SIMPLE` names.
"""

from __future__ import annotations

import os
import time

from redis.client import Pipeline
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.suspension import WORKERS_SUSPENDED
from rq.worker import WorkerStatus
from setproctitle import setproctitle

from resque_starter.protocol import JOB_COUNTERS
from resque_starter.rq_compat import WorkerBase
from resque_starter.worker.controls import FINISHED, Context, Running

COUNTERS = ("successful_job_count", "failed_job_count")  # rq's, in the worker's hash: the idle event's


class ReportingMixin(WorkerBase):
    """Titles, status events, and rq's heartbeat, state and suspension check in fewer round trips."""

    _context: Context
    _running: Running | None
    _state_title: str
    _counters: list[bytes | None] | None  # read with the end of the last job
    _heartbeat_sent: bool  # with the end of the last job, for rq's loop, which sends one next
    _suspended: bool | None  # read with the end of the last job, for rq's loop's next check
    _totals: tuple[int, int, int]  # done, failed, requeued as of the last idle event
    _requeued: int  # jobs this worker put back in their queue (quick stop)
    _end_note: str
    _horse_ended: tuple[Job, Queue, Execution] | None  # the job whose horse just exited, if it forked

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
        if running is None:  # rq's code ran prepare_execution or fork_work_horse itself, not execute_job
            return
        self._context.send(
            {"event": "busy", "job": running.job_id, "func": running.func, "queue": running.queue,
             "horse": horse, "started": running.started, "timeout": running.timeout,
             "enqueued": running.enqueued}
        )  # fmt: skip

    def _send_idle(self, ended: Running | None = None) -> None:
        """The idle event: the worker's job counters and, after a job, how it ended (queue, function,
        outcome, duration), which the supervisor's job metrics count: no Redis call of their own, the
        counters came with the job's end (set_state). The job's last log line says the same."""
        counters, self._counters = self._counters, None
        done, failed = counters if counters is not None else self.connection.hmget(self.key, COUNTERS)
        totals = (int(done or 0), int(failed or 0), self._requeued)
        message: dict[str, object] = {"event": "idle", **dict(zip(JOB_COUNTERS, totals, strict=True))}
        if ended is not None:
            outcome = ended.outcome(self._totals, totals)
            duration = time.time() - ended.started
            message["ended"] = {"queue": ended.queue, "func": ended.func, "outcome": outcome,
                                "duration": round(duration, 6)}  # fmt: skip
            note, self._end_note = self._end_note, ""
            note = "" if outcome == FINISHED else note  # a stop that came too late to interrupt it
            self.log.info("job %s %s in %.3fs%s", ended.job_id, outcome, duration, note and f": {note}",
                          extra={"job_duration": round(duration, 6), "job_outcome": outcome})  # fmt: skip
        self._totals = totals
        self._context.send(message)

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
        ended, self._horse_ended = self._horse_ended, None
        with self.connection.pipeline(transaction=False) as own:
            super().set_state(state, own)
            super().heartbeat(pipeline=own)
            own.hmget(self.key, COUNTERS)
            own.exists(WORKERS_SUSPENDED)
            if ended is not None:
                own.hget(ended[0].key, "status")
            results = own.execute()
        status = results.pop() if ended is not None else None
        *_, self._counters, suspended = results
        self._heartbeat_sent = True
        self._suspended = bool(suspended)
        if ended is not None and status == JobStatus.STARTED.value.encode():
            self._fail_unsettled(*ended)

    def _fail_unsettled(self, job: Job, queue: Queue, execution: Execution) -> None:
        """rq takes a horse's exit 0 for a job done; a job that called os._exit(0) never settled its job,
        which would stay STARTED. The job's status came with the job's end, so the check costs nothing."""
        reason = "resque-starter: the work-horse exited 0 without finishing the job (os._exit in the job?)"
        self.log.warning("Worker %s: job %s failed (%s)", self.name, job.id, reason)
        self.handle_job_failure(job, queue=queue, exc_string=reason, execution=execution)
        self._counters = None  # the failure changed them: the idle event reads them afresh

    def check_for_suspension(self, burst: bool) -> None:
        """rq's loop checks for `rq suspend` before each job; after a job, the job's end read it (see
        set_state): only a suspension found then is left for rq to handle."""
        suspended, self._suspended = self._suspended, None
        if suspended is not False:
            super().check_for_suspension(burst)
