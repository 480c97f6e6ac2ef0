"""StarterMixin: resque-starter's behaviour over any rq worker class.

See the package's docstring for what it changes; the dequeue is `ClaimingMixin`'s, the titles, events
and fewer round trips are `ReportingMixin`'s.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

from rq.command import parse_payload
from rq.exceptions import StopRequested
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.worker import Worker as ForkingWorker

from resque_starter import claims, logs, recovery, rq_compat, stacks
from resque_starter import job as job_api
from resque_starter.worker.controls import (
    KILL_JOB,
    KILL_JOB_REASON,
    STOPPING,
    Context,
    Running,
)
from resque_starter.worker.dequeue import ClaimingMixin
from resque_starter.worker.stopclock import StopClock

LEFTOVER_REASON = "resque-starter: the worker stopped with this job unfinished"


class StarterMixin(ClaimingMixin):
    """resque-starter's behaviour over any rq worker class (`type('StarterWorker', (StarterMixin, cls), {})`).

    The rq hooks it (and the mixins under it) override, and what else it relies on in rq, are listed in
    rq_compat, whose contract tests check them against the installed rq.
    """

    def __init__(self, *args: Any, context: Context | None = None, **kwargs: Any) -> None:
        """`context` is run_worker's; rq's own code (Worker.find_by_key, all()) builds the class without
        one, and so may a script: then it works as a worker with no supervisor (Context.detached)."""
        if context is None:
            context = Context.detached()
        self._context = context
        self._controls = context.controls
        self._running: Running | None = None
        self._horse_ended: tuple[Job, Queue, Execution] | None = None
        self._interrupts: dict[str, int] = {}  # job id -> how it is being stopped (controls.STOPPING...)
        self._clock = StopClock(self._job_pid, self._kill_job_process)
        self._lifetime_timer: threading.Timer | None = None
        self._stuck: str | None = None  # where rq's monitor found the horse it killed for its timeout
        self._jobs_done = 0
        self._requeued = 0
        self._killed_horse = 0
        self._end_note = ""  # why the job ended, when the worker itself ended it (a quick stop)
        self._in_process = False
        self._state_title = "starting"
        self._claim_first = None
        self._counters: list[bytes | None] | None = None  # read with the end of the last job
        self._heartbeat_sent = False  # with the end of the last job, for rq's loop, which sends one next
        self._suspended: bool | None = None  # read with the end of the last job, for rq's loop's next check
        self._totals = (0, 0, 0)  # a worker's counters in Redis start at zero: its name is new
        self._shutdown_recorded = False
        super().__init__(*args, **kwargs)
        self._claim_first = claims.claim_script(self.connection)
        self.log.addFilter(self._quiet_quick_stop)
        if context.status is None:
            context.queues, context.label = tuple(self.queue_names()), self.name

    # rq's work loop reads and writes this flag; ours is the single source of truth, and a stop once
    # requested is never withdrawn (BaseWorker.__init__ assigns False).
    @property
    def _stop_requested(self) -> bool:
        return self._controls.stop

    @_stop_requested.setter
    def _stop_requested(self, value: bool) -> None:
        self._controls.stop = self._controls.stop or value

    def _install_signal_handlers(self) -> None:
        """run_worker installed our handlers before connecting to Redis; keep them. A worker with no
        supervisor installs them here, where rq installs its own."""
        if not self._controls.installed:
            self._controls.worker = self
            job_api.share()
            self._controls.install()

    def handle_payload(self, message: Any) -> None:
        """rq's `shutdown` command sends SIGINT to the worker, which here means a quick stop; make it
        the graceful stop it is in rq. Other commands (kill-horse, stop-job) behave as in rq, and
        stop-job also stops a job that runs in this process (SimpleWorker, which rq cannot stop): as
        USR1 does, from the main thread, and the job ends STOPPED as rq's command promises."""
        payload = parse_payload(message)
        if payload.get("command") == "shutdown":
            self.log.info("Worker %s: shutdown command received, stopping after the current job", self.name)
            self._controls.request_stop()
            if self._running is not None:
                self._record_shutdown_request()
            return
        super().handle_payload(message)
        if (
            payload.get("command") == "stop-job"
            and not self._forks
            and self._stopped_job_id == payload.get("job_id")
        ):
            os.kill(os.getpid(), signal.SIGUSR1)

    # --- running a job -------------------------------------------------------------------------

    def execute_job(self, job: Job, queue: Queue) -> None:
        running = self._running = Running.of(job, queue.name, self._timeout_of(job))
        logs.set_job(job.id, running.func, queue.name)  # every log line until the job's end names it
        refork_after = self._context.settings.refork_after
        try:
            if self._controls.stop:  # it came after the claim: teardown puts the job back
                raise StopRequested()
            # a refork candidate's Nth job runs in this process, even with a forking worker class, so
            # what it loads lazily (imports, caches) stays here, and so in the mold this may become
            self._in_process = self._jobs_done + 1 == refork_after
            self._watch_lifetime()
            requeued = self._requeued
            super().execute_job(job, queue)
            self._record_shutdown_request()
            if self._forks and self._clock.kind and self._requeued == requeued:
                # its horse may have requeued it (Shutdown), in a process of its own
                self._requeued += job.get_status() == JobStatus.QUEUED
        except BaseException:
            logs.set_job(None)
            raise
        finally:
            if self._lifetime_timer is not None:  # gone before the next fork (a promotion needs no thread)
                self._lifetime_timer.cancel()
                self._lifetime_timer.join()
                self._lifetime_timer = None
            self._clock.end()
            self._in_process = False
            self._running = None
            kind = self._interrupts.get(job.id)
            if kind is not None and kind != KILL_JOB and not self._end_note:  # its horse settled it
                self._end_note = job_api.reason(kind)
            self._interrupts.clear()
        self._jobs_done += 1
        running.stopped = running.stopped or self._stopped_job_id == job.id
        self._send_idle(running)
        logs.set_job(None)
        if self._jobs_done == refork_after:
            self._context.send({"event": "promote-ready", "jobs": self._jobs_done})
        self._recycle_if_due()

    def _timeout_of(self, job: Job) -> float | None:
        """The job's rq timeout as rq's perform_job reads it; None for none (-1)."""
        timeout = job.timeout or self.queue_class.DEFAULT_TIMEOUT
        return None if timeout == -1 else float(timeout)

    @property
    def _forks(self) -> bool:
        """Whether jobs run in a work-horse (rq.Worker and its subclasses) rather than in this process."""
        return isinstance(self, ForkingWorker) and not self._in_process

    def prepare_execution(self, job: Job) -> Execution:
        """rq's, whose transaction also takes the job out of its claim list (see ClaimingMixin.set_state),
        then the title and, for a job run in this process, the busy event."""
        execution = super().prepare_execution(job)
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

    def _start_horse(self, job: Job, queue: Queue) -> None:
        """rq forks the horse here; PreforkHorseMixin hands the job to one forked in advance instead."""
        super().fork_work_horse(job, queue)

    def main_work_horse(self, job: Job, queue: Queue) -> None:
        """In a fresh work-horse: freeze what it inherited from the worker, so collections in the job
        (the interpreter's, or the gc.collect() many libraries call) examine, and copy, only what the
        job allocates. The worker itself stays unfrozen: its own garbage is still collected there. A
        worker with no supervisor has no at-fork hook to give up its signal handlers: done here."""
        gc.freeze()
        if self._context.status is None:
            self._context.release()
        super().main_work_horse(job, queue)

    def monitor_work_horse(self, job: Job, queue: Queue, execution: Execution) -> None:
        if not self._in_process:  # nothing to monitor when the job ran in fork_work_horse
            super().monitor_work_horse(job, queue, execution)
            self._horse_ended = (job, queue, execution)  # the job's end checks it was settled

    def prepare_job_execution(self, job: Job, remove_from_intermediate_queue: bool = False) -> None:
        super().prepare_job_execution(job, remove_from_intermediate_queue)
        if self.is_horse or not self._forks:
            self._begin_performing()

    def _begin_performing(self) -> None:
        """In the process that runs the job (horse, or SimpleWorker), inside rq's perform_job: from here
        until rq finalizes the job, SHUTDOWN_SIGNAL raises Shutdown in it. One that came before (a stop
        begun between the claim and now) raises it at once."""
        job_api.set_performing(True)
        seconds = job_api.seconds_left()
        if seconds is not None and seconds <= 0:
            job_api.set_performing(False)
            raise job_api.Shutdown(job_api.reason(job_api.pending_kind()))

    def handle_execution_ended(self, job: Job, queue: Queue, heartbeat_ttl: int) -> None:
        job_api.set_performing(False)
        super().handle_execution_ended(job, queue, heartbeat_ttl)

    def maintain_heartbeats(self, job: Job, execution: Execution) -> None:
        super().maintain_heartbeats(job, execution)
        self._record_shutdown_request()
        self.procline("busy")  # refresh the elapsed time in the title
        self._recycle_running_job_if_due()

    # --- stopping the running job (see stopclock) ----------------------------------------------

    def stop_job(self, kind: int) -> None:
        """Signal handler side of TERM/QUIT (STOPPING: Shutdown at DRAIN_TIMEOUT - SHUTDOWN_GRACE, or half
        DRAIN_TIMEOUT when that is later), INT
        and USR1 (QUICK_STOP, KILL_JOB: Shutdown at once), and of a recycle by lifetime: the job is
        warned now, SIGKILL follows at the deadline. Outside a job it does nothing; the job is settled
        in handle_job_failure (or by its horse)."""
        running = self._running
        if running is None:
            return
        self._interrupts[running.job_id] = max(kind, self._interrupts.get(running.job_id, 0))
        running.stopped = running.stopped or kind == KILL_JOB  # the job metrics' outcome: stopped
        settings = self._context.settings
        if kind == STOPPING:  # half the drain at least, however short, for the job to finish by itself
            drain = settings.drain_timeout
            self._clock.begin(kind, max(drain - settings.shutdown_grace, drain / 2), drain)
        else:
            self._clock.begin(kind, 0.0, settings.shutdown_grace)

    def _job_pid(self) -> int:
        """The process performing the job: its horse (0 until it is forked), or this one."""
        return self.horse_pid if self._forks else os.getpid()

    def _kill_job_process(self) -> bool:
        """The stop's deadline passed: SIGKILL the job's process. A SimpleWorker is that process: it tells
        the supervisor, whose recovery then settles the job as the stop would have. False while the
        horse is not forked yet."""
        if self._forks:
            if not self.horse_pid:
                return False
            self.kill_horse()
            return True
        self.log.warning("Worker %s: the job outlived its stop's deadline; killing this worker", self.name)
        self._context.send({"event": "deadline", "kind": self._clock.kind})
        os.kill(os.getpid(), signal.SIGKILL)
        return True

    def _watch_lifetime(self) -> None:
        """A recycle by lifetime that comes while a job runs is a stop of that job too. A forking worker
        notices it while monitoring the horse; a job run in this process holds the main thread, so a
        timer notices it."""
        deadline = self._context.deadline
        if deadline is not None and not self._forks:
            timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._recycle_running_job_if_due)
            timer.daemon = True
            timer.start()
            self._lifetime_timer = timer

    def _recycle_running_job_if_due(self) -> None:
        deadline = self._context.deadline
        if deadline is not None and time.monotonic() >= deadline and not self._clock.kind:
            self.log.info("Worker %s: lifetime over while a job runs: stopping it to recycle", self.name)
            self.stop_job(STOPPING)

    def _record_shutdown_request(self) -> None:
        """rq writes, in its signal handler, when a warm shutdown was requested during a job; ours only
        set flags, so the worker writes it at its next step (its monitor's next turn, or the job's end)."""
        when = self._controls.stop_requested_at
        if when is not None and not self._shutdown_recorded:
            self._shutdown_recorded = True
            rq_compat.record_shutdown_request(self, when)

    def kill_horse(self, sig: signal.Signals = signal.SIGKILL) -> None:
        """rq kills the horse's process group, but a horse that has not yet run its os.setpgrp() is
        still in ours, and so may be the supervisor: then kill the horse alone (it has no children
        yet). A horse that already exited is no error. When rq's monitor kills a horse past its job's
        timeout (no stop of ours pending), the horse writes its stack to the log first."""
        pid = self.horse_pid
        if not pid:
            return
        if self._past_timeout() and not self._interrupts:
            self._log_stuck_stack(pid)
        try:
            if os.getpgid(pid) == pid:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        except ProcessLookupError:
            return
        if pid != self._killed_horse:  # a second signal (a terminal's ^C, then the supervisor's) kills again
            self._killed_horse = pid
            self.log.info("Worker %s: killed horse pid %s", self.name, pid)

    def _past_timeout(self) -> bool:
        running = self._running
        return running is not None and running.timeout is not None and running.elapsed > running.timeout

    def _log_stuck_stack(self, pid: int) -> None:
        """rq's monitor is about to kill a horse stuck past its job's timeout: log where it is stuck,
        and keep the innermost frame for the failed job's reason."""
        path = stacks.stack_path(self._context.settings.run_dir, self._context.pid)
        stack = stacks.dump(pid, path)
        frame = stacks.innermost_frame(stack)
        assert self._running is not None
        self._stuck = f"stuck for {self._running.elapsed:.0f}s at {frame or 'an unknown frame'}"
        self.log.warning(
            "Worker %s: horse %s %s (job timeout %ss); its stack:\n%s",
            self.name, pid, self._stuck, self._running.timeout, stack.rstrip() or "(not written)",
        )  # fmt: skip

    def handle_job_failure(
        self,
        job: Job,
        queue: Queue,
        started_job_registry: Any = None,
        exc_string: str = "",
        execution: Execution | None = None,
    ) -> None:
        """A job stopped by a stop, a scale-down, a reload, a recycle or SIGINT is requeued or failed by
        the shared rule; one killed by SIGUSR1 fails (or is retried) the rq way with a reason that names
        us. Where the job ran (horse, SimpleWorker) it counts as stopped only when it ended with Shutdown
        (one that failed on its own fails), and the page says how (a horse was forked before the worker
        learnt of the stop); in a forking worker, its horse was killed at the deadline."""
        kind = self._interrupts.pop(job.id, None)
        if self.is_horse or not self._forks:  # the job ran here: stopped only if it ended with Shutdown
            kind = (
                (job_api.pending_kind() or None) if isinstance(sys.exc_info()[1], job_api.Shutdown) else None
            )
        if kind is not None and kind != KILL_JOB and execution is not None:
            outcome = recovery.requeue_or_fail(
                job,
                queue,
                execution,
                max_requeues=self._context.settings.max_requeues,
                reason=f"{job_api.reason(kind)}\n{exc_string}".rstrip(),
                requeue=self._context.settings.requeue_interrupted,
                connection=self.connection,
                worker_name=self.name,
                log_outcome=False,  # the worker's last line of the job (_send_idle) says it, with why
            )
            self._end_note = job_api.reason(kind)
            self.executions.pop(execution.id, None)
            if outcome in (recovery.FAILED, recovery.RETRIED):
                self.increment_failed_job_count()
            self._requeued += outcome == recovery.REQUEUED
            return
        if kind == KILL_JOB:
            exc_string = f"{KILL_JOB_REASON}\n{exc_string}"
        stuck, self._stuck = self._stuck, None
        if stuck:
            exc_string = f"resque-starter: {stuck}, killed past its timeout\n{exc_string}"
        super().handle_job_failure(job, queue, started_job_registry, exc_string, execution)

    def handle_work_horse_killed(self, job: Job, retpid: int, ret_val: int, rusage: Any) -> None:
        """rq warns of every horse that died; one the worker killed for a stop is requeued (or failed by
        the shared rule), which the job's last line says (rq's handler, if any, still runs)."""
        if not self._stopping(job.id):
            super().handle_work_horse_killed(job, retpid, ret_val, rusage)
        elif self._work_horse_killed_handler is not None:
            self._work_horse_killed_handler(job, retpid, ret_val, rusage)

    def _quiet_quick_stop(self, record: logging.LogRecord) -> bool:
        """A filter on rq's worker logger: drop rq's "job failed (Work-horse terminated unexpectedly)"
        and "exception raised while executing" for a job a stop interrupted: it is requeued (or failed
        by the shared rule, which says so), not failed by its own code."""
        if record.msg not in rq_compat.JOB_FAILED_MESSAGES or not isinstance(record.args, tuple):
            return True
        return not self._stopping(str(record.args[1]))

    def _stopping(self, job_id: str) -> bool:
        """Whether a stop (not USR1's kill) interrupted this job: in the worker its signal said so; where
        the job runs (horse, SimpleWorker) the page does (resque_starter.job)."""
        kind = self._interrupts.get(job_id)
        if kind is None and (self.is_horse or not self._forks):
            kind = job_api.pending_kind() or None
        return kind is not None and kind != KILL_JOB

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
