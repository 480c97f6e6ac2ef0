"""Jobs that hear the stop coming (resque_starter.job), for real: forked workers, real Redis, real signals.

A stop, a recycle, SIGINT or SIGUSR1 warns the running job at once; Shutdown is raised in it at the
deadline (DRAIN_TIMEOUT - SHUTDOWN_GRACE for a graceful stop), SIGKILL follows at DRAIN_TIMEOUT.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator

import pytest
import redis
from rq import Queue
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry

from resque_starter import job as job_api
from resque_starter.recovery import REQUEUES_META_KEY, recover_worker

from conftest import wait_for
from worker_harness import EVERY_CLASS, FORKING_CLASSES, Start, WorkerProcess, worker_processes

EVERY = pytest.mark.parametrize("worker_class", EVERY_CLASS)
FORKING = pytest.mark.parametrize("worker_class", FORKING_CLASSES)
DRAIN, GRACE = 3.0, 1.0


@pytest.fixture
def start(redis_url: str, conn: redis.Redis) -> Iterator[Start]:
    with worker_processes(redis_url) as start:
        yield start


def started(conn: redis.Redis, job: Job) -> bool:
    return job.id.encode() in conn.lrange("testjobs:done:started", 0, -1)


def warnings(conn: redis.Redis) -> list[list[object]]:
    return [json.loads(item) for item in conn.lrange("testjobs:done:warned", 0, -1)]


def run_job(
    start: Start, conn: redis.Redis, func: str, *args: object, **settings: object
) -> tuple[WorkerProcess, Job, Job]:
    """A worker running `func`, with a second job waiting behind it."""
    queue = Queue("default", connection=conn)
    worker = start(drain_timeout=DRAIN, shutdown_grace=GRACE, **settings)
    worker.expect("ready")
    job = queue.enqueue(func, *args)
    worker.expect("busy")
    wait_for(lambda: started(conn, job), what="the job to start")
    return worker, job, queue.enqueue("testjobs.record")


def assert_requeued_with_progress(conn: redis.Redis, job: Job, waiting: Job) -> None:
    assert Queue("default", connection=conn).get_job_ids() == [job.id, waiting.id]
    job.refresh()
    assert job.get_status() == JobStatus.QUEUED
    assert job.meta[REQUEUES_META_KEY] == 1
    assert job.meta["step"] > 0, "what the job saved before it raised survives the requeue"
    assert job.id not in FailedJobRegistry("default", connection=conn)


def test_outside_resque_starter_nothing_is_pending() -> None:
    assert job_api.stopping() is False
    assert job_api.seconds_left() is None
    assert issubclass(job_api.Shutdown, BaseException) and not issubclass(job_api.Shutdown, Exception)


@EVERY
def test_term_warns_the_job_then_requeues_what_it_saved(
    start: Start, conn: redis.Redis, worker_class: str
) -> None:
    worker, job, waiting = run_job(start, conn, "testjobs.checkpoint", worker_class=worker_class)
    began = time.monotonic()
    worker.signal(signal.SIGTERM)
    wait_for(lambda: warnings(conn), timeout=1.0, what="the job to hear of the stop at once")
    [[warned_id, left]] = warnings(conn)
    assert warned_id == job.id
    assert DRAIN - GRACE - 1.0 < left <= DRAIN - GRACE  # seconds until Shutdown is raised
    assert worker.expect("idle", timeout=DRAIN + 5)["requeued"] == 1
    assert worker.wait() == 0
    assert DRAIN - GRACE - 0.5 < time.monotonic() - began < DRAIN, "Shutdown came at DRAIN - GRACE"
    assert_requeued_with_progress(conn, job, waiting)


@EVERY
def test_a_recycle_by_lifetime_during_a_job_stops_it_the_same_way(
    start: Start, conn: redis.Redis, worker_class: str
) -> None:
    worker, job, waiting = run_job(
        start, conn, "testjobs.checkpoint", worker_class=worker_class, max_lifetime=1.0
    )
    assert worker.expect("idle", timeout=DRAIN + 5)["requeued"] == 1
    assert worker.expect("recycle")["reason"] == "max_lifetime"
    assert worker.wait() == 0
    assert warnings(conn)
    assert_requeued_with_progress(conn, job, waiting)


@EVERY
def test_int_raises_shutdown_at_once_and_requeues(start: Start, conn: redis.Redis, worker_class: str) -> None:
    worker, job, waiting = run_job(start, conn, "testjobs.checkpoint", worker_class=worker_class)
    began = time.monotonic()
    worker.signal(signal.SIGINT)
    assert worker.expect("idle")["requeued"] == 1
    assert worker.wait() == 0
    assert time.monotonic() - began < GRACE + 1
    assert_requeued_with_progress(conn, job, waiting)


@EVERY
def test_usr1_raises_shutdown_and_fails_the_job(start: Start, conn: redis.Redis, worker_class: str) -> None:
    worker, job, waiting = run_job(start, conn, "testjobs.checkpoint", worker_class=worker_class)
    worker.signal(signal.SIGUSR1)
    assert worker.expect("idle") == {"event": "idle", "done": 0, "failed": 1, "requeued": 0}
    job.refresh()
    assert job.get_status() == JobStatus.FAILED
    assert job.meta["step"] > 0, "the job heard Shutdown (not SIGKILL) and saved its progress"
    assert worker.expect("busy")["job"] == waiting.id, "the worker goes on"


@FORKING
@pytest.mark.parametrize("func", ["testjobs.ignore_shutdown", "testjobs.c_sleep"])
def test_a_job_that_ignores_shutdown_is_killed_at_the_deadline(
    start: Start, conn: redis.Redis, worker_class: str, func: str
) -> None:
    """One that swallows Shutdown, and one in a C call with every signal blocked: SIGKILL at DRAIN."""
    args = (60,) if func == "testjobs.c_sleep" else ()
    worker, job, waiting = run_job(start, conn, func, *args, worker_class=worker_class)
    began = time.monotonic()
    worker.signal(signal.SIGTERM)
    assert worker.expect("idle", timeout=DRAIN + 5)["requeued"] == 1
    assert worker.wait() == 0
    assert DRAIN - 0.5 < time.monotonic() - began < DRAIN + 2
    if func == "testjobs.ignore_shutdown":
        assert conn.lrange("testjobs:done:swallowed", 0, -1) == [job.id.encode()]
    assert Queue("default", connection=conn).get_job_ids() == [job.id, waiting.id]


def test_a_simple_worker_whose_job_outlives_the_deadline_kills_itself(
    start: Start, conn: redis.Redis
) -> None:
    """(A SimpleWorker whose main thread blocks signals in C code never hears the stop: its supervisor's
    deadline kills it, see test_supervisor_deadlines.)"""
    worker, job, waiting = run_job(start, conn, "testjobs.ignore_shutdown", worker_class="rq.SimpleWorker")
    began = time.monotonic()
    worker.signal(signal.SIGTERM)
    assert worker.expect("deadline", timeout=DRAIN + 5) == {"event": "deadline", "kind": job_api.STOP}
    assert worker.wait() == -signal.SIGKILL
    assert DRAIN - 0.5 < time.monotonic() - began < DRAIN + 2
    # what the supervisor does next: its recovery requeues the job (the worker told it why it died)
    recover_worker(conn, worker.name, ["default"], requeue=True, max_requeues=3, reason="stopped")
    assert Queue("default", connection=conn).get_job_ids() == [job.id, waiting.id]


@EVERY
def test_a_job_that_returns_after_the_warning_is_finished(
    start: Start, conn: redis.Redis, worker_class: str
) -> None:
    queue = Queue("default", connection=conn)
    worker = start(worker_class=worker_class, drain_timeout=DRAIN, shutdown_grace=GRACE)
    worker.expect("ready")
    job = queue.enqueue("testjobs.sleep_then_record", 0.5)
    worker.expect("busy")
    wait_for(lambda: started(conn, job), what="the job to start")
    worker.signal(signal.SIGTERM)
    assert worker.expect("idle")["done"] == 1
    assert worker.wait() == 0
    assert job.get_status() == JobStatus.FINISHED


@FORKING
def test_usr1_kills_a_job_that_ignores_shutdown_a_grace_later(
    start: Start, conn: redis.Redis, worker_class: str
) -> None:
    worker, job, waiting = run_job(start, conn, "testjobs.ignore_shutdown", worker_class=worker_class)
    began = time.monotonic()
    worker.signal(signal.SIGUSR1)
    assert worker.expect("idle") == {"event": "idle", "done": 0, "failed": 1, "requeued": 0}
    assert GRACE - 0.3 < time.monotonic() - began < GRACE + 2, "Shutdown first, SIGKILL a grace later"
    assert conn.lrange("testjobs:done:swallowed", 0, -1) == [job.id.encode()]
    assert job.get_status() == JobStatus.FAILED
    assert "SIGUSR1" in (job.latest_result().exc_string or "")  # type: ignore[union-attr]
    assert worker.expect("busy")["job"] == waiting.id
