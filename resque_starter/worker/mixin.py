"""StarterMixin: resque-starter's behaviour over any rq worker class.

See the package's docstring for what it changes; the dequeue is `ClaimingMixin`'s, the titles, events
and fewer round trips are `ReportingMixin`'s.
"""

from __future__ import annotations

import gc
import os
import signal
import time
from typing import Any, NoReturn

from rq.command import parse_payload
from rq.exceptions import StopRequested
from rq.executions import Execution
from rq.job import Job
from rq.queue import Queue
from rq.worker import Worker as ForkingWorker

from resque_starter import claims, recovery, rq_compat
from resque_starter.worker.controls import (
    KILL_JOB,
    KILL_JOB_REASON,
    QUICK_STOP,
    QUICK_STOP_REASON,
    Context,
    JobInterrupted,
    Running,
    func_name,
)
from resque_starter.worker.dequeue import ClaimingMixin

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
        self._shutdown_recorded = False
        super().__init__(*args, **kwargs)
        self._claim_first = claims.claim_script(self.connection)
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
        self._running = Running(job.id, func_name(job), queue.name, time.time())
        refork_after = self._context.settings.refork_after
        try:
            if self._controls.stop:  # it came after the claim: teardown puts the job back
                raise StopRequested()
            # a refork candidate's Nth job runs in this process, even with a forking worker class, so
            # what it loads lazily (imports, caches) stays here, and so in the mold this may become
            self._in_process = self._jobs_done + 1 == refork_after
            super().execute_job(job, queue)
            self._record_shutdown_request()
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
        if self._interrupts:  # the signal came before there was a horse to kill
            self.kill_horse()

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
        self._record_shutdown_request()
        self.procline("busy")  # refresh the elapsed time in the title

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
