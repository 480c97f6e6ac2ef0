"""Where the promise "no job is lost" is kept: claims, requeue-or-fail, and recovering a dead worker.

A worker never pops a job id into thin air: it moves it atomically from its queue into its own claim
list (`claim_key`), and removes it from there in the same transaction that records the job's rq
execution (StartedJobRegistry + `rq:worker:NAME:executions`). So at any instant each job a worker
holds is in exactly one of two places that name the worker, and `recover_worker` can undo both
after the worker is gone (SIGKILL, OOM, crash): claims go back to the front of their queue, and
executions are requeued (an interrupted shutdown) or failed with a reason (honouring rq's Retry).

`requeue_or_fail` is the one rule for an interrupted job, shared by the worker's quick stop (SIGINT)
and by recovery. This module imports rq, so the supervisor runs it in a short-lived child of the
mold (which has the application's job class and serializer imported).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable

import redis
from rq import Queue, Worker, worker_registration
from rq.callbacks import execute_failure_callback
from rq.exceptions import AbandonedJobError, NoSuchJobError
from rq.executions import Execution, ExecutionRegistry
from rq.job import Job, JobStatus
from rq.rate_limit import release_slot
from rq.serializers import Serializer, resolve_serializer
from rq.timeouts import UnixSignalDeathPenalty
from rq.utils import as_text, import_job_class, import_queue_class, now

from resque_starter import rq_compat
from resque_starter.claims import CLAIM_PREFIX, claim_key, release_claims

# claim_key and release_claims are part of this module's API (recovery is where claims are undone)
__all__ = [
    "CLAIM_PREFIX", "FAILED", "GONE", "REQUEUED", "REQUEUES_META_KEY", "RETRIED",
    "claim_key", "recover_worker", "release_claims", "requeue_or_fail",
]  # fmt: skip

log = logging.getLogger("resque_starter.recovery")

REQUEUES_META_KEY = "resque_starter_requeues"

REQUEUED = "requeued"
RETRIED = "retried"
FAILED = "failed"
GONE = "gone"


def _times(count: int) -> str:
    return "1 time" if count == 1 else f"{count} times"


def requeue_or_fail(
    job: Job,
    queue: Queue,
    execution: Execution,
    *,
    max_requeues: int,
    reason: str,
    requeue: bool,
    connection: redis.Redis,
    worker_name: str = "",
    failure_callback: bool = False,
) -> str:
    """Settle a job whose execution was interrupted; return REQUEUED, RETRIED, FAILED or GONE.

    With `requeue` (the job was cut short by a shutdown) it goes back to the FRONT of its queue,
    its `job.meta["resque_starter_requeues"]` counting how often; once that count would exceed
    `max_requeues` it is failed instead, saying how often it was interrupted, so a job that always
    outlives the drain cannot loop forever. A failure honours the job's rq Retry, as rq does for
    an abandoned job. In every case the execution is deleted, so nothing stays in the
    StartedJobRegistry. `failure_callback` runs the job's on_failure (with AbandonedJobError)
    before a failure or retry, for callers where rq did not already run it.
    """
    try:
        job.refresh()  # the horse or the job may have changed status and meta since we fetched it
    except NoSuchJobError:
        with connection.pipeline() as pipe:
            execution.delete(job, pipe)
            pipe.execute()
        return GONE
    count = int(job.meta.get(REQUEUES_META_KEY, 0))
    exc_string = reason
    if requeue and count >= max_requeues:
        exc_string = f"{reason}; interrupted by shutdown {_times(count + 1)} (max_requeues={max_requeues})"
    will_requeue = requeue and count < max_requeues
    if failure_callback and not will_requeue:
        _run_failure_callback(job, exc_string)
    with connection.pipeline() as pipe:
        execution.delete(job, pipe)
        if will_requeue:
            job.meta[REQUEUES_META_KEY] = count + 1
            job.started_at = job.ended_at = None
            rq_compat.enqueue_at_front(queue, job, pipe)
            outcome = REQUEUED
        elif job.should_retry:
            job.retry(queue, pipe)
            outcome = RETRIED
        else:
            job.ended_at = now()
            job.set_status(JobStatus.FAILED, pipeline=pipe)
            rq_compat.record_failure(job, exc_string, pipe, worker_name, execution)
            outcome = FAILED
        pipe.execute()
    log.warning("job %s %s: %s", job.id, outcome, exc_string)
    _after_commit(job, queue, outcome, exc_string)
    return outcome


def _run_failure_callback(job: Job, reason: str) -> None:
    try:
        error = AbandonedJobError(reason)
        execute_failure_callback(job, UnixSignalDeathPenalty, AbandonedJobError, error, None)
    except Exception:
        log.exception("job %s: failure callback raised", job.id)


def _after_commit(job: Job, queue: Queue, outcome: str, exc_string: str) -> None:
    """What rq does once a failure is persisted; each step logged, never raised, like rq's worker."""
    try:
        if outcome == FAILED:
            job.send_webhooks(JobStatus.FAILED, exc_string=exc_string)
            queue.enqueue_dependents(job)
        release_slot(job)  # a no-op unless the job holds a rate-limit slot it no longer needs
    except Exception:
        log.exception("job %s: follow-up after %s failed", job.id, outcome)


def recover_worker(
    connection: redis.Redis,
    worker_name: str,
    queue_names: Iterable[str],
    *,
    requeue: bool,
    max_requeues: int,
    reason: str,
    job_class: type[Job] | str | None = None,
    queue_class: type[Queue] | str | None = None,
    serializer: Serializer | str | None = None,
    unregister: bool = True,
) -> dict[str, int]:
    """Settle every job Redis says `worker_name` holds, and (`unregister`) unregister it. Idempotent.

    For a gone worker, whose horse must already be dead (the supervisor kills it first) or its job
    would run twice; or, with `unregister` False, for a live worker between jobs after a failover (the
    new primary may still show jobs whose end the old one took with it). `queue_names` are the queues
    the worker served. Its claims go back to the front of their queues; each execution whose job is
    unfinished is settled by `requeue_or_fail` with `reason`; executions of finished jobs are just
    deleted. Returns counts by outcome.
    """
    job_cls = import_job_class(job_class) if isinstance(job_class, str) else (job_class or Job)
    queue_cls = import_queue_class(queue_class) if isinstance(queue_class, str) else (queue_class or Queue)
    serializer = resolve_serializer(serializer)

    def queue_for(name: str) -> Queue:
        return queue_cls(name, connection=connection, job_class=job_cls, serializer=serializer)

    queues = [queue_for(name) for name in queue_names]
    counts = {"claims": release_claims(connection, worker_name, queues)}
    counts.update(dict.fromkeys((REQUEUED, RETRIED, FAILED, GONE), 0))
    worker = Worker(
        queues,
        name=worker_name,
        connection=connection,
        job_class=job_cls,
        queue_class=queue_cls,
        serializer=serializer,
        prepare_for_work=False,
    )
    for member in connection.smembers(worker.executions_key):
        execution = Execution.from_composite_key(as_text(member), connection=connection)
        execution.worker_name = worker_name
        outcome = _recover_execution(
            execution, queues, job_cls, queue_for, serializer, requeue, max_requeues, reason
        )
        if outcome:
            counts[outcome] += 1
    if unregister:
        with connection.pipeline() as pipe:
            worker_registration.unregister(worker, pipe)
            pipe.delete(worker.key, worker.executions_key)
            pipe.execute()
        log.info("recovered worker %s: %s", worker_name, counts)
    return counts


def _recover_execution(
    execution: Execution,
    queues: list[Queue],
    job_cls: type[Job],
    queue_for: Callable[[str], Queue],
    serializer: Serializer,
    requeue: bool,
    max_requeues: int,
    reason: str,
) -> str | None:
    """Settle one execution of a dead worker; None when its job had already been settled."""
    connection = execution.connection
    with contextlib.suppress(ValueError):  # the hash may have expired: only created_at is lost
        execution.refresh()
    try:
        job = job_cls.fetch(execution.job_id, connection=connection, serializer=serializer)
    except NoSuchJobError:
        _drop_orphan_execution(execution, queues)
        return GONE
    queue = queue_for(job.origin)
    status = job.get_status(refresh=False)
    # QUEUED with an execution: the worker died between recording the execution and its horse
    # marking the job started, so the job is in no queue, unless someone already requeued it.
    unfinished = status == JobStatus.STARTED or (
        status == JobStatus.QUEUED and connection.lpos(queue.key, job.id) is None
    )
    if not unfinished:
        with connection.pipeline() as pipe:
            execution.delete(job, pipe)
            pipe.execute()
        return None
    return requeue_or_fail(
        job,
        queue,
        execution,
        max_requeues=max_requeues,
        reason=reason,
        requeue=requeue,
        connection=connection,
        worker_name=execution.worker_name,
        failure_callback=True,
    )


def _drop_orphan_execution(execution: Execution, queues: list[Queue]) -> None:
    """The job was deleted: remove its execution wherever it can be named without the job's origin."""
    with execution.connection.pipeline() as pipe:
        pipe.delete(execution.key)
        pipe.srem(execution.worker_executions_key, execution.composite_key)
        for queue in queues:
            pipe.zrem(queue.started_job_registry.key, execution.composite_key)
        ExecutionRegistry(job_id=execution.job_id, connection=execution.connection).remove(execution, pipe)
        pipe.execute()
