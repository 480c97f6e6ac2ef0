"""Stops of a real supervisor that the running job hears (scale-down, reload, TERM), the deadline of a
worker stopped on its own, and the watchdog for jobs stuck in the worker process (SimpleWorker)."""

from __future__ import annotations

import signal
import time
from typing import Any

import pytest
import redis
from rq import Queue
from rq.job import Job, JobStatus

from resque_starter.recovery import REQUEUES_META_KEY

from conftest import wait_for

CLASSES = pytest.mark.parametrize(
    "worker_env",
    [
        {"RESQUE_STARTER_WORKER_CLASS": "rq.Worker"},
        {"RESQUE_STARTER_WORKER_CLASS": "rq.SimpleWorker"},
        {"RESQUE_STARTER_WORKER_CLASS": "rq.Worker", "RESQUE_STARTER_PREFORK_HORSE": "true"},
    ],
    ids=["rq.Worker", "rq.SimpleWorker", "prefork"],
)
STOP_ENV = {
    "RESQUE_STARTER_CONCURRENCY": "1",
    "RESQUE_STARTER_DRAIN_TIMEOUT": "3",
    "RESQUE_STARTER_SHUTDOWN_GRACE": "1",
}


def running(s: Any, conn: redis.Redis, func: str, *args: object, **kwargs: Any) -> tuple[Job, dict[str, Any]]:
    """Enqueue `func` and wait until a worker reports it busy with it: the job and that worker's row."""
    job = Queue("default", connection=conn).enqueue(func, *args, **kwargs)

    def busy() -> dict[str, Any] | None:
        return next((w for w in s.status()["workers"] if w["job_id"] == job.id), None)

    row = wait_for(busy, what=f"a worker to run {func}")
    wait_for(lambda: job.id.encode() in conn.lrange("testjobs:done:started", 0, -1), what="the job to start")
    return job, row  # type: ignore[return-value]


def simple_worker(start: Any, stuck_grace: str) -> Any:
    s = start(
        RESQUE_STARTER_WORKER_CLASS="rq.SimpleWorker",
        RESQUE_STARTER_CONCURRENCY="1",
        RESQUE_STARTER_STUCK_GRACE=stuck_grace,
    )
    s.wait_workers(1)
    return s


def requeued_with_progress(conn: redis.Redis, job: Job) -> bool:
    job.refresh()  # status and meta of one read: the job saves its meta before it is requeued
    requeued = job.get_status(refresh=False) == JobStatus.QUEUED
    return requeued and job.meta.get("step", 0) > 0 and job.meta.get(REQUEUES_META_KEY) == 1


@CLASSES
def test_scale_down_warns_the_job_which_is_requeued_with_its_progress(start, conn, worker_env) -> None:  # type: ignore[no-untyped-def]
    s = start(**STOP_ENV, **worker_env)
    s.wait_workers(1)
    job, _ = running(s, conn, "testjobs.checkpoint")
    assert s.ctl({"cmd": "scale", "n": "0"})["ok"]
    wait_for(lambda: requeued_with_progress(conn, job), timeout=10, what="the job requeued with its progress")
    assert conn.llen("testjobs:done:warned") == 1
    assert Queue("default", connection=conn).get_job_ids() == [job.id]
    wait_for(lambda: not s.status()["workers"], what="the worker gone")


@CLASSES
def test_reload_warns_the_job_which_is_requeued_with_its_progress(start, conn, worker_env) -> None:  # type: ignore[no-untyped-def]
    s = start(**STOP_ENV, **worker_env)
    s.wait_workers(1)
    job, old = running(s, conn, "testjobs.checkpoint")
    s.signal(signal.SIGHUP)
    # the job is requeued at the front, and the new generation's worker runs it again
    wait_for(lambda: conn.llen("testjobs:done:started") == 2, timeout=15, what="the job to run again")
    job.refresh()
    assert job.meta["step"] > 0 and job.meta[REQUEUES_META_KEY] == 1
    assert job.worker_name != old["name"]


@CLASSES
def test_term_warns_the_job_which_is_requeued_and_the_stop_is_clean(start, conn, worker_env) -> None:  # type: ignore[no-untyped-def]
    s = start(**STOP_ENV, **worker_env)
    s.wait_workers(1)
    job, _ = running(s, conn, "testjobs.checkpoint")
    began = time.monotonic()
    s.signal(signal.SIGTERM)
    assert s.wait_exit(15) == 1, "a stop that requeued a job interrupted it"
    assert time.monotonic() - began < 3
    assert requeued_with_progress(conn, job)


def test_a_simple_worker_in_c_code_is_killed_when_its_stop_is_over(start, conn) -> None:  # type: ignore[no-untyped-def]
    """Its main thread blocks every signal in one C call: neither the warning nor Shutdown reach it, and
    its own clock cannot kill it; the supervisor does, DRAIN_TIMEOUT (+1 s) after the scale-down."""
    s = start(**STOP_ENV, RESQUE_STARTER_WORKER_CLASS="rq.SimpleWorker")
    s.wait_workers(1)
    job, _ = running(s, conn, "testjobs.c_sleep", 60)
    began = time.monotonic()
    assert s.ctl({"cmd": "scale", "n": "0"})["ok"]
    wait_for(lambda: not s.status()["workers"], timeout=10, what="the worker killed")
    assert 3 < time.monotonic() - began < 6
    wait_for(lambda: job.get_status(refresh=True) == JobStatus.QUEUED, what="the job requeued")
    assert "outlived its stop's deadline" in s.log()


def test_the_watchdog_kills_a_simple_worker_stuck_in_c_code_past_its_timeout(start, conn) -> None:  # type: ignore[no-untyped-def]
    s = simple_worker(start, stuck_grace="1")
    job, _ = running(s, conn, "testjobs.spin", 120, job_timeout=2)
    began = time.monotonic()
    wait_for(lambda: job.get_status(refresh=True) == JobStatus.FAILED, timeout=15, what="the job failed")
    assert time.monotonic() - began < 6
    reason = job.latest_result().exc_string  # type: ignore[union-attr]
    assert "stuck for" in reason and "past its timeout of 2s + 1s" in reason
    assert "testjobs.py:" in reason and " spin" in reason, reason
    log = s.log()
    assert "killed by the supervisor's watchdog; its stack:" in log
    assert "in spin" in log and "most recent call first" in log
    s.wait_workers(1)  # a new worker takes the slot


def test_a_horse_that_rq_kills_past_its_timeout_leaves_its_stack_and_frame(start, conn) -> None:  # type: ignore[no-untyped-def]
    """rq's horse monitor kills a horse 60 s (rq's fixed margin) past its job's timeout; the worker asks
    the horse for its stack first, logs it, and the failed job's reason names the frame."""
    s = start(RESQUE_STARTER_WORKER_CLASS="rq.Worker", RESQUE_STARTER_CONCURRENCY="1")
    s.wait_workers(1)
    job, _ = running(s, conn, "testjobs.deaf_sleep", 300, job_timeout=1)
    wait_for(lambda: job.get_status(refresh=True) == JobStatus.FAILED, timeout=120, what="the horse killed")
    reason = job.latest_result().exc_string  # type: ignore[union-attr]
    assert "stuck for" in reason and "testjobs.py:" in reason and " deaf_sleep" in reason, reason
    log = s.log()
    assert "stuck for" in log and "in deaf_sleep" in log and "most recent call first" in log, log[-3000:]


def test_the_watchdog_never_touches_a_long_job_within_its_timeout(start, conn) -> None:  # type: ignore[no-untyped-def]
    s = simple_worker(start, stuck_grace="0")
    job, row = running(s, conn, "testjobs.sleep_then_record", 3, job_timeout=4)
    wait_for(lambda: job.get_status(refresh=True) == JobStatus.FINISHED, timeout=10, what="the job to finish")
    assert [w["pid"] for w in s.status()["workers"]] == [row["pid"]]
    assert "watchdog" not in s.log()
