"""Issue 22: the job metrics (duration by queue, function and outcome; wait by queue), counted by the
supervisor from its workers' own events and scraped from /metrics, under a mixed workload of real jobs:
finished, failed, stopped (ctl kill) and requeued (a worker's quick stop)."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from typing import Any

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString
from rq import Queue
from rq.job import Job, JobStatus
from test_ctl import documented_metrics, http_get

from resque_starter.job_stats import DURATION_BUCKETS, OTHER, JobStats

from conftest import free_port, wait_for
from starter import ROOT, base_env, ok

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def start(starters, redis_url, run_dir, conn):  # type: ignore[no-untyped-def]
    return lambda **env: starters(base_env(redis_url, run_dir, **env))


def scrape(port: int) -> Samples:
    code, _, body = http_get(port, "/metrics")
    assert code == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def durations(samples: Samples, suffix: str, **labels: str) -> float:
    return sample(samples, f"resque_starter_job_duration_seconds_{suffix}", **labels)


def enqueue(conn: redis.Redis, queue: str, func: str, *args: Any) -> Job:
    return Queue(queue, connection=conn).enqueue(func, *args)


def wait_status(job: Job, status: JobStatus) -> None:
    wait_for(lambda: job.get_status(refresh=True) == status, 60, what=f"job {job.id} to be {status}")


def test_duration_and_wait_histograms_match_the_jobs_run(start, conn) -> None:
    port = free_port()
    s = start(RESQUE_STARTER_METRICS_PORT=str(port), RESQUE_STARTER_QUEUES="default,low")
    s.wait_workers(2)
    before = time.time()
    quick = [enqueue(conn, "default", "testjobs.noop") for _ in range(5)]
    failing = [enqueue(conn, "default", "testjobs.fail", "boom") for _ in range(3)]
    slow = [enqueue(conn, "low", "testjobs.sleep_then_record", 0.3, "slow") for _ in range(2)]
    for job in quick + slow:
        wait_status(job, JobStatus.FINISHED)
    for job in failing:
        wait_status(job, JobStatus.FAILED)

    # stopped: killed on request while it runs; its worker goes on
    killed = enqueue(conn, "default", "testjobs.sleep_then_record", 60)
    wait_for(lambda: conn.llen("testjobs:done:started") >= 1, what="the job to be killed to start")
    wait_for(lambda: any(w["job_id"] == killed.id for w in s.status()["workers"]), what="its worker busy")
    ok(s.run_dir, "kill", killed.id)
    wait_status(killed, JobStatus.FAILED)

    # requeued: its worker alone is stopped quickly; the job then runs again, to the end, on a worker
    requeued = enqueue(conn, "low", "testjobs.sleep_then_record", 3)
    wait_for(lambda: conn.llen("testjobs:done:started") >= 2, what="the job to be requeued to start")
    worker = wait_for(lambda: next((w for w in s.status()["workers"] if w["job_id"] == requeued.id), None))
    os.kill(worker["pid"], signal.SIGINT)
    wait_status(requeued, JobStatus.FINISHED)

    expected = {
        ("default", "testjobs.noop", "finished"): 5,
        ("default", "testjobs.fail", "failed"): 3,
        ("default", "testjobs.sleep_then_record", "stopped"): 1,
        ("low", "testjobs.sleep_then_record", "finished"): 3,
        ("low", "testjobs.sleep_then_record", "requeued"): 1,
    }

    def counted() -> Samples | None:
        samples = scrape(port)
        seen = {
            (dict(labels)["queue"], dict(labels)["func"], dict(labels)["outcome"]): value
            for (name, labels), value in samples.items()
            if name == "resque_starter_job_duration_seconds_count"
        }
        return samples if seen == expected else None

    samples = wait_for(counted, 30, what=f"the duration histogram to count {expected}")
    assert isinstance(samples, dict)
    elapsed = time.time() - before
    for (queue, func, outcome), n in expected.items():
        labels = {"queue": queue, "func": func, "outcome": outcome}
        assert durations(samples, "bucket", le="+Inf", **labels) == n
        buckets = [durations(samples, "bucket", le=floatToGoString(b), **labels) for b in DURATION_BUCKETS]
        assert buckets == sorted(buckets), "buckets are cumulative"
        assert 0 < durations(samples, "sum", **labels) < n * elapsed
    slow_finished = {"queue": "low", "func": "testjobs.sleep_then_record", "outcome": "finished"}
    # two 0.3 s runs and one 3 s run: none is under 0.25 s, the 3 s one is over 2.5 s
    assert durations(samples, "bucket", le=floatToGoString(0.25), **slow_finished) == 0
    assert durations(samples, "bucket", le=floatToGoString(2.5), **slow_finished) == 2
    assert durations(samples, "sum", **slow_finished) >= 3.6
    # every start waited in its queue: 5 + 3 + 1 on default; 2, the requeued one twice, on low
    assert sample(samples, "resque_starter_job_wait_seconds_count", queue="default") == 9
    assert sample(samples, "resque_starter_job_wait_seconds_count", queue="low") == 4
    waited = sample(samples, "resque_starter_job_wait_seconds_sum", queue="default")
    assert 0 < waited < 9 * elapsed
    # the job counters and the histogram agree
    finished = sum(n for (_, _, outcome), n in expected.items() if outcome == "finished")
    assert sample(samples, "resque_starter_jobs_finished_total") == finished


def test_function_labels_are_capped_and_bad_events_are_ignored() -> None:
    stats = JobStats(max_funcs=3)
    for i in range(10):
        stats.ended({"queue": "default", "func": f"app.f{i}", "outcome": "finished", "duration": 0.1})
    stats.ended({"queue": "default", "func": "app.f0", "outcome": "failed", "duration": 2})
    for bad in (None, {"queue": "q"}, {"queue": "q", "func": "f", "outcome": "exploded", "duration": 1},
                {"queue": "q", "func": "f", "outcome": "finished", "duration": float("nan")},
                {"queue": "q", "func": "f", "outcome": "finished", "duration": True}):  # fmt: skip
        stats.ended(bad)
    stats.started({"queue": "default", "enqueued": 100.0, "started": 100.5})
    stats.started({"queue": "default", "enqueued": None, "started": 100.5})
    snapshot = stats.snapshot()
    rows = {(r["func"], r["outcome"]): r["count"] for r in snapshot["duration"]}
    assert rows == {("app.f0", "finished"): 1, ("app.f1", "finished"): 1, ("app.f2", "finished"): 1,
                    (OTHER, "finished"): 7, ("app.f0", "failed"): 1}  # fmt: skip
    [wait] = snapshot["wait"]
    assert (wait["queue"], wait["count"], wait["sum"]) == ("default", 1, 0.5)
    assert wait["counts"][snapshot["wait_buckets"].index(0.5)] == 1


def test_the_sample_dashboard_queries_only_documented_metrics() -> None:
    dashboard = json.loads((ROOT / "examples" / "grafana" / "resque-starter.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    used = {
        re.sub(r"_(bucket|sum|count)$", "", name)
        for e in exprs
        for name in re.findall(r"resque_starter_\w+", e)
    }
    assert used and used <= documented_metrics(), used - documented_metrics()
    assert {"resque_starter_job_duration_seconds", "resque_starter_job_wait_seconds"} <= used
