"""Everything resque-starter relies on in rq beyond rq's documented API, in one place.

rq is subclassed, not copied, but a subclass relies on more than the public API: the names and
parameters of the hooks the worker mixins override, private attributes they read or write, private
methods recovery and the pre-forked horse call, and the order in which rq's work loop calls the hooks
(the worker saves Redis round trips by doing, at the end of a job, what it knows rq's loop does next).
Each of these is named here, and tests/test_rq_contract.py checks every one of them against the
installed rq, so a release that changes one fails those tests rather than a job in production. The
rq versions those tests pass on are pinned in pyproject.toml.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any

import redis
from redis.client import Pipeline
from rq.executions import Execution
from rq.job import UNEVALUATED, Job
from rq.queue import Queue
from rq.worker import BaseWorker

if TYPE_CHECKING:
    from rq.worker import Worker

    # For type checkers the mixins are rq workers (what they are layered over at run time), so every
    # override is checked against rq's signature; at run time they are plain mixins.
    WorkerBase = Worker
else:
    WorkerBase = object

# The rq worker hooks the mixins override, with the parameters (after self) they are written for. Every
# method of the mixins that rq's BaseWorker or Worker also has must be listed (a contract test checks).
HOOKS: dict[str, tuple[str, ...]] = {
    "__init__": (
        "queues", "name", "default_result_ttl", "connection", "exception_handlers", "maintenance_interval",
        "default_worker_ttl", "worker_ttl", "job_class", "queue_class", "log_job_description",
        "job_monitoring_interval", "disable_default_exception_handler", "prepare_for_work", "serializer",
        "work_horse_killed_handler",
    ),
    "_install_signal_handlers": (),
    "handle_payload": ("message",),
    "procline": ("message",),
    "register_birth": (),
    "bootstrap": ("logging_level", "date_format", "log_format"),
    "heartbeat": ("timeout", "pipeline"),
    "set_state": ("state", "pipeline"),
    "check_for_suspension": ("burst",),
    "dequeue_job_and_maintain_ttl": ("timeout", "max_idle_time"),
    "execute_job": ("job", "queue"),
    "prepare_execution": ("job",),
    "fork_work_horse": ("job", "queue"),
    "main_work_horse": ("job", "queue"),
    "monitor_work_horse": ("job", "queue", "execution"),
    "wait_for_horse": (),
    "perform_job": ("job", "queue", "execution"),
    "prepare_job_execution": ("job", "remove_from_intermediate_queue"),
    "_finalize_success": ("job", "queue", "execution", "return_value"),
    "handle_execution_ended": ("job", "queue", "heartbeat_ttl"),
    "maintain_heartbeats": ("job", "execution"),
    "kill_horse": ("sig",),
    "handle_job_failure": ("job", "queue", "started_job_registry", "exc_string", "execution"),
    "handle_work_horse_killed": ("job", "retpid", "ret_val", "rusage"),
    "teardown": (),
    "subscribe": (),
    "unsubscribe": (),
}  # fmt: skip

# Attributes BaseWorker.__init__ sets that the mixins read or write: `_stop_requested` (a property of
# ours over the supervisor's stop flag), `_horse_pid` and `_is_horse` (a pre-forked horse is not rq's
# fork), `_ordered_queues` (the claim's order), `_shutdown_requested_date` (for rq's
# set_shutdown_requested_date), `pubsub_thread` (joined before a worker becomes a mold).
WORKER_ATTRIBUTES = (
    "_stop_requested", "_horse_pid", "_is_horse", "_ordered_queues", "_shutdown_requested_date",
    "pubsub_thread", "executions", "last_heartbeat", "log_job_description", "exponential_backoff_factor",
    "max_connection_wait_time",
)  # fmt: skip

# rq's private methods (and one public one rq calls only from its own signal handler) called here, with
# the parameters (after self) passed to them.
PRIVATE_CALLS: dict[tuple[type, str], tuple[str, ...]] = {
    (Queue, "_enqueue_job"): ("job", "pipeline", "at_front", "unique"),
    (Job, "_handle_failure"): (
        "exc_string", "pipeline", "worker_name", "execution_id", "execution_started_at", "execution_ended_at",
    ),
    (Execution, "__init__"): ("id", "job_id", "connection", "worker_name"),
    (Job, "restore"): ("raw_data",),
    (BaseWorker, "set_shutdown_requested_date"): (),
}  # fmt: skip

# What rq's work loop calls, in order, from a job's start to the wait for the next one (SimpleWorker, and
# rq.Worker in the worker process), `set_state:STATE` for set_state. The mixins rely on it: prepare_execution
# sets BUSY on its own transaction's pipeline (the claim leaves the claim list in it); execute_job ends by
# setting IDLE, and the loop's heartbeat and its check for `rq suspend` come right after, so the job's end
# sends them in one round trip; in a horse, a job's run begins with prepare_job_execution (the pre-forked
# horse's worker did that already) and a success ends in _finalize_success (which it hands back).
WORK_LOOP_SIMPLE = (
    "execute_job", "prepare_execution", "set_state:busy", "perform_job", "prepare_job_execution", "heartbeat",
    "_finalize_success", "handle_execution_ended", "set_state:idle", "heartbeat", "check_for_suspension",
)  # fmt: skip
WORK_LOOP_FORKING = (
    "execute_job", "prepare_execution", "set_state:busy", "fork_work_horse", "monitor_work_horse",
    "wait_for_horse", "set_state:idle", "heartbeat", "check_for_suspension",
)  # fmt: skip


# rq's log lines for a job that ended by an exception or the death of its horse, the job's id their second
# argument: monitor_work_horse's warning, handle_exception's error. For a job the worker itself interrupted
# for a quick stop (it killed the horse, or raised JobInterrupted) they are not news: the job is requeued,
# which the worker logs in its own words.
JOB_FAILED_MESSAGES = (
    "Worker %s: job %s failed (%s)",
    "Worker %s: job %s: exception raised while executing (%s)\n%s",
)


def job_state(job: Job) -> tuple[dict[str, Any], list[str]]:
    """A Job's attributes as the worker holds them, without its connection, and the names of those rq
    has not loaded yet (its UNEVALUATED mark): what `restore_job` rebuilds it from in another process."""
    fields = vars(job)
    unloaded = [name for name, value in fields.items() if value is UNEVALUATED]
    state = {name: value for name, value in fields.items() if name != "connection" and name not in unloaded}
    return state, unloaded


def restore_job(
    job_class: type[Job], connection: redis.Redis, state: dict[str, Any], unloaded: Iterable[str]
) -> Job:
    """The Job `job_state` described, on `connection`, without Job.__init__ (which would reset it)."""
    job = job_class.__new__(job_class)
    vars(job).update(state, connection=connection)
    vars(job).update(dict.fromkeys(unloaded, UNEVALUATED))
    return job


def restore_execution(
    execution_id: str, job: Job, connection: redis.Redis, worker_name: str, times: tuple[datetime, datetime]
) -> Execution:
    """The Execution the worker has just saved, as Execution.fetch would restore it, without the fetch."""
    execution = Execution(execution_id, job.id, connection, worker_name=worker_name)
    execution.created_at, execution.last_heartbeat = times
    execution._job = job
    return execution


def set_horse(worker: WorkerBase, pid: int) -> None:
    """Record the pid of a horse rq did not fork itself, for its monitor, kill and wait."""
    worker._horse_pid = pid


def become_horse(worker: WorkerBase) -> None:
    """In a pre-forked horse, which rq's main_work_horse has not marked yet: it is a horse from now on."""
    worker._is_horse = True
    worker._horse_pid = 0


def record_shutdown_request(worker: WorkerBase, when: datetime) -> None:
    """What rq's request_stop records on a warm shutdown during a job: the worker hash's
    shutdown_requested_date."""
    worker._shutdown_requested_date = when
    worker.set_shutdown_requested_date()


def enqueue_at_front(queue: Queue, job: Job, pipeline: Pipeline) -> None:
    """Put an interrupted job back at the front of its queue, on `pipeline`, without the dependency
    checks of Queue.enqueue_job (its dependencies were met when it was first enqueued)."""
    queue._enqueue_job(job, pipeline=pipeline, at_front=True)


def record_failure(
    job: Job, exc_string: str, pipeline: Pipeline, worker_name: str, execution: Execution
) -> None:
    """What rq's worker saves for a failed job (result, failed registry), on `pipeline`."""
    job._handle_failure(
        exc_string,
        pipeline,
        worker_name=worker_name,
        execution_id=execution.id,
        execution_started_at=execution.created_at,
        execution_ended_at=job.ended_at,
    )
