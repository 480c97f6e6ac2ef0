"""PreforkHorseMixin: RESQUE_STARTER_PREFORK_HORSE's rq side (the process side is `prefork`)."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import signal
from typing import Any

from rq.executions import Execution
from rq.job import Job, Retry
from rq.queue import Queue
from rq.serializers import DefaultSerializer, JSONSerializer

from resque_starter import job as job_api
from resque_starter import logs, prefork, rq_compat
from resque_starter.worker.controls import Running
from resque_starter.worker.mixin import StarterMixin

DONE = b"done"  # a pre-forked horse's report when it finished its job the rq way, to the end


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

    def bootstrap(self, *args: Any, **kwargs: Any) -> None:
        super().bootstrap(*args, **kwargs)
        os.register_at_fork(after_in_child=self._close_in_child)
        self._ensure_spare()

    def monitor_work_horse(self, job: Job, queue: Queue, execution: Execution) -> None:
        self._ensure_spare()  # while the horse runs the job
        super().monitor_work_horse(job, queue, execution)
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
        finished = super().perform_job(job, queue, execution)
        if self._report is not None:
            self._report(DONE)
        return finished

    def prepare_job_execution(self, job: Job, remove_from_intermediate_queue: bool = False) -> None:
        if not self.is_horse:  # a horse's job was prepared by the worker before it was handed over
            super().prepare_job_execution(job, remove_from_intermediate_queue)
        else:
            self._begin_performing()

    def _finalize_success(self, job: Job, queue: Queue, execution: Execution, return_value: Any) -> None:
        """In a horse: hand the return value back to the worker, which saves it and does the rest of rq's
        bookkeeping, when nothing of that runs user code; otherwise (and in the worker) rq's own."""
        job_api.set_performing(False)
        payload = self._hand_back(job, return_value) if self._report is not None else None
        if payload is None:
            super()._finalize_success(job, queue, execution, return_value)
            return
        report, self._report = self._report, None
        assert report is not None  # payload is None without one
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

    def _idle_watch(self) -> tuple[int, ...]:
        """The forker's socket: what it says of the spare (forked, or dead), or its own death (EOF), ends
        an idle wait, and the loop's _heartbeat_if_due reads it (so it is not readable again)."""
        forker = self._forker
        if self._spare is None or forker is None or forker.gone:
            return ()
        return (forker.sock.fileno(),)

    def _heartbeat_if_due(self) -> None:
        """Run between idle waits: also the moment to notice a dead spare."""
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
        execution = self.execution
        assert execution is not None, "prepare_execution ran"
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
        rq_compat.set_horse(self, horse.pid)
        self.procline(f"Handed {job.id} to horse {horse.pid}")

    def _hand_off(self, job: Job, queue: Queue, execution: Execution) -> bytes:
        """What the horse needs to run the job: the Job as the worker holds it now, attribute by attribute
        (as rq's horse inherits it by fork; rebuilding it from Redis's fields costs a fresh horse about 40
        more copied pages), without its connection (the horse has its own) and with rq's mark of what it
        has not loaded yet by name. Too large for one message, or not picklable: its id, to fetch it by."""
        state, unloaded = rq_compat.job_state(job)
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
        rq_compat.become_horse(self)
        self._running = None
        logs.set_job(None)  # a forker forked during a job would pass that job's tags on
        self.executions = {}
        self.setup_work_horse_signals()
        self._set_title("horse pre-forked, waiting for a job")

    def _run_handed_job(self, message: bytes, report: prefork.Report) -> None:
        job_id, saved, execution_id, queue_name, times = pickle.loads(message)
        os.environ["RQ_WORKER_ID"] = self.name
        os.environ["RQ_JOB_ID"] = job_id
        if saved is None:
            job = self.job_class.fetch(job_id, connection=self.connection, serializer=self.serializer)
        else:
            job = rq_compat.restore_job(self.job_class, self.connection, *saved)
        execution = rq_compat.restore_execution(execution_id, job, self.connection, self.name, times)
        self.executions = {execution.id: execution}
        queue = next(q for q in self.queues if q.name == queue_name)
        self._running = Running.of(job, queue.name, self._timeout_of(job))
        logs.set_job(job.id, self._running.func, queue.name)
        self._report = report
        self.main_work_horse(job, queue)


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
