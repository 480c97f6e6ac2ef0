"""Issue 22: the queue gauges (waiting, oldest waiting job's age, started), read by the agent and served
by the supervisor from its last report on /metrics, in `ctl status` and as KEDA's scaling endpoint
(/scale: desired pods = ceil((waiting + running) / workers per pod))."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from rq import Queue
from test_ctl import http_get
from test_job_metrics import sample, scrape

from resque_starter import queue_gauges

from conftest import free_port, wait_for
from starter import base_env, ok


@pytest.fixture
def start(starters, redis_url, run_dir, conn):  # type: ignore[no-untyped-def]
    return lambda **env: starters(base_env(redis_url, run_dir, **env))


def scale(port: int) -> tuple[int, dict[str, Any]]:
    code, content_type, body = http_get(port, "/scale")
    assert content_type == "application/json"
    return code, json.loads(body)


def wait_scale(port: int, desired: int, waiting: int, running: int) -> None:
    """Until /scale answers these numbers, for 2 workers a pod on default and low."""
    expected = {"desired_pods": desired, "waiting": waiting, "running": running, "capacity_per_pod": 2,
                "queues": ["default", "low"]}  # fmt: skip
    wait_for(lambda: scale(port) == (200, expected), 15, what=f"/scale to say {expected}")


def test_gauges_and_the_scaling_endpoint_follow_waiting_and_running_jobs(start, conn) -> None:
    port = free_port()
    s = start(RESQUE_STARTER_METRICS_PORT=str(port), RESQUE_STARTER_QUEUES="default,low")
    s.wait_workers(2)
    ok(s.run_dir, "pause")
    default, low = Queue("default", connection=conn), Queue("low", connection=conn)
    first = default.enqueue("testjobs.noop")
    time.sleep(1.5)  # the age the oldest job must show
    default.enqueue("testjobs.noop")
    slow = [low.enqueue("testjobs.sleep_then_record", 6) for _ in range(3)]

    wait_scale(port, desired=3, waiting=5, running=0)
    rows = s.status()["queues"]
    assert rows["default"]["waiting"] == 2 and rows["low"]["waiting"] == 3
    assert rows["default"]["oldest_age"] >= 1.5 and rows["low"]["oldest_age"] < rows["default"]["oldest_age"]
    samples = scrape(port)
    assert sample(samples, "resque_starter_queue_jobs_waiting", queue="default") == 2
    assert sample(samples, "resque_starter_queue_jobs_waiting", queue="low") == 3
    assert sample(samples, "resque_starter_queue_oldest_job_age_seconds", queue="default") >= 1.5
    assert sample(samples, "resque_starter_queue_jobs_started", queue="low") == 0

    ok(s.run_dir, "resume")  # the no-ops run, then two of the slow jobs: one waits
    wait_for(lambda: first.get_status(refresh=True) == "finished", 20, what="the first job to run")
    wait_scale(port, desired=2, waiting=1, running=2)
    samples = scrape(port)
    assert sample(samples, "resque_starter_queue_jobs_started", queue="low") == 2
    assert sample(samples, "resque_starter_queue_jobs_waiting", queue="default") == 0
    assert sample(samples, "resque_starter_queue_oldest_job_age_seconds", queue="default") == 0
    wait_for(lambda: all(j.get_status(refresh=True) == "finished" for j in slow), 60, what="the slow jobs")
    wait_scale(port, desired=0, waiting=0, running=0)


def test_a_bad_or_missing_report_is_not_served() -> None:
    assert queue_gauges.valid({"q": {"waiting": 1, "oldest_age": None, "started": 0}}) is not None
    for bad in (None, [], {"q": None}, {"q": {"waiting": -1, "oldest_age": None, "started": 0}},
                {"q": {"waiting": 1, "oldest_age": float("inf"), "started": 0}},
                {"q": {"waiting": True, "oldest_age": 1, "started": 0}}, {1: {}}):  # fmt: skip
        assert queue_gauges.valid(bad) is None, bad
    rows = {
        "a": {"waiting": 7, "oldest_age": 3.0, "started": 2},
        "b": {"waiting": 0, "oldest_age": None, "started": 1},
    }
    assert queue_gauges.demand(rows, 4)["desired_pods"] == 3  # ceil(10 / 4)
    assert queue_gauges.demand(rows, 0)["desired_pods"] == 0
