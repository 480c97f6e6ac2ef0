"""Idle workers answer at once: a job on any of their queues starts within milliseconds, a stop is
immediate, and nothing is lost or run twice on the way (issue 21). Generous deadlines here; the
medians are measured by bench/idle.py."""

from __future__ import annotations

import signal
import statistics
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
from rq import Queue, Worker
from rq.command import send_shutdown_command
from rq.job import Job

from conftest import wait_for
from worker_harness import EVERY_CLASS, PREFORK

QUEUES = ("high", "default", "low")


def _settings(worker_class: str) -> dict[str, str]:
    if worker_class == PREFORK:
        return {"RESQUE_STARTER_PREFORK_HORSE": "true"}
    return {"RESQUE_STARTER_WORKER_CLASS": worker_class}


def _idle(conn: redis.Redis, count: int) -> bool:
    workers = Worker.all(connection=conn)
    return len(workers) == count and all(w.get_state() == "idle" for w in workers)


@pytest.mark.parametrize("worker_class", EVERY_CLASS)
def test_a_job_on_the_last_queue_starts_at_once(
    start: Callable[..., Any], conn: redis.Redis, worker_class: str
) -> None:
    """rq's BLMOVE waits on one list: the old wait noticed the last queue's jobs only at its next poll,
    half a second late on average. Now every queue is waited on at once."""
    s = start(RESQUE_STARTER_QUEUES=",".join(QUEUES), **_settings(worker_class))
    s.wait_workers(2)
    queue = Queue(QUEUES[-1], connection=conn)
    latencies = []
    for _ in range(5):
        wait_for(lambda: _idle(conn, 2), what="both workers idle")
        job = queue.enqueue("testjobs.noop")
        wait_for(lambda j=job: j.get_status(refresh=True) == "finished", what="the job to finish")
        job = Job.fetch(job.id, connection=conn)
        assert job.started_at is not None and job.enqueued_at is not None
        latencies.append((job.started_at - job.enqueued_at).total_seconds())
    assert statistics.median(latencies) < 0.3, f"enqueue -> start: {latencies}"
    for name in QUEUES:
        assert Queue(name, connection=conn).count == 0


@pytest.mark.parametrize("worker_class", EVERY_CLASS)
def test_an_idle_pod_stops_at_once(start: Callable[..., Any], conn: redis.Redis, worker_class: str) -> None:
    s = start(
        RESQUE_STARTER_CONCURRENCY="4", RESQUE_STARTER_QUEUES=",".join(QUEUES), **_settings(worker_class)
    )
    s.wait_workers(4)
    wait_for(lambda: _idle(conn, 4), what="four idle workers")
    began = time.monotonic()
    s.signal(signal.SIGTERM)
    assert s.wait_exit() == 0
    took = time.monotonic() - began
    assert took < 0.8, f"SIGTERM -> exit took {took:.3f}s with 4 idle workers"
    assert Worker.all(connection=conn) == []
    assert not conn.keys("rq:resque-starter:claim:*")


def test_rq_shutdown_command_stops_an_idle_worker_at_once(
    start: Callable[..., Any], conn: redis.Redis
) -> None:
    s = start(RESQUE_STARTER_CONCURRENCY="1")
    (row,) = s.wait_workers(1)
    wait_for(lambda: _idle(conn, 1), what="an idle worker")
    began = time.monotonic()
    send_shutdown_command(conn, row["name"])
    wait_for(lambda: not any(w.name == row["name"] for w in Worker.all(connection=conn)), what="it to stop")
    took = time.monotonic() - began
    assert took < 0.5, f"rq shutdown -> unregistered took {took:.3f}s"
