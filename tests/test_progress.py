"""The progress health check (`ctl health --progress`, /healthz?check=progress) on a real supervisor:
it fails when jobs wait while every worker is stuck past its job's timeout, and passes on an idle
pod, a paused one and one busy with long jobs within their timeouts."""

from __future__ import annotations

import json
from typing import Any

import redis
from rq import Queue
from test_ctl import http_get

from resque_starter import progress

from conftest import free_port, wait_for
from starter import ctl

TIMEOUT = "2"  # RESQUE_STARTER_PROGRESS_TIMEOUT in these tests


def probe(run_dir: str) -> tuple[int, dict[str, Any]]:
    result = ctl(run_dir, "health", "--progress")
    return result.returncode, json.loads(result.stdout)


def oldest_waiting(s: Any) -> float:
    """The agent's gauge of the oldest waiting job's age on `default` (0 without a fresh report)."""
    rows = s.status()["queues"] or {}
    return (rows.get("default") or {}).get("oldest_age") or 0.0


def waited_past_timeout(s: Any) -> bool:
    """A job waited longer than the threshold and the supervisor's gauges know it."""
    return oldest_waiting(s) > float(TIMEOUT) + 1


def test_progress_is_off_by_default_and_then_only_live(start) -> None:  # type: ignore[no-untyped-def]
    s = start(RESQUE_STARTER_CONCURRENCY="1")
    s.wait_workers(1)
    code, reply = probe(s.run_dir)
    assert code == 0 and reply["live"] is True, reply
    assert reply["reason"] == "the progress check is off (RESQUE_STARTER_PROGRESS_TIMEOUT)"


def test_progress_fails_when_the_only_worker_is_stuck_past_its_timeout(start, conn: redis.Redis) -> None:  # type: ignore[no-untyped-def]
    """A SimpleWorker job in one C call with signals blocked outlives its 1 s timeout (rq's SIGALRM never
    runs; the watchdog is off): nothing takes the job queued behind it."""
    s = start(
        RESQUE_STARTER_CONCURRENCY="1",
        RESQUE_STARTER_WORKER_CLASS="rq.SimpleWorker",
        RESQUE_STARTER_STUCK_GRACE="off",
        RESQUE_STARTER_PROGRESS_TIMEOUT=TIMEOUT,
        RESQUE_STARTER_DRAIN_TIMEOUT="1",
    )
    s.wait_workers(1)
    queue = Queue("default", connection=conn)
    stuck = queue.enqueue("testjobs.c_sleep", 120, job_timeout=1)
    wait_for(lambda: conn.llen("testjobs:done:started"), what="the stuck job to start")
    queue.enqueue("testjobs.noop")
    assert probe(s.run_dir)[0] == 0, "healthy before the threshold"
    wait_for(lambda: waited_past_timeout(s), timeout=15, what="the second job to wait past the threshold")
    code, reply = probe(s.run_dir)
    assert code == 1 and reply["live"] is True and reply["progress"] is False, reply
    reason = reply["reason"]
    assert "every worker of group default (1) is busy past its job's timeout + STUCK_GRACE (0s)" in reason
    assert f"the longest job {stuck.id} on worker 0" in reason and "(timeout 1s)" in reason
    assert "on queue default (PROGRESS_TIMEOUT 2s) and no worker of group default (1) took a job" in reason


def test_progress_passes_while_the_worker_is_busy_within_its_timeout(start, conn: redis.Redis) -> None:  # type: ignore[no-untyped-def]
    """A long job within its timeout, and a job waiting behind it past the threshold: healthy, over
    ctl and over HTTP."""
    port = free_port()
    s = start(
        RESQUE_STARTER_CONCURRENCY="1",
        RESQUE_STARTER_PROGRESS_TIMEOUT=TIMEOUT,
        RESQUE_STARTER_METRICS_PORT=str(port),
        RESQUE_STARTER_DRAIN_TIMEOUT="1",
    )
    s.wait_workers(1)
    queue = Queue("default", connection=conn)
    queue.enqueue("testjobs.sleep_then_record", 60, job_timeout=600)
    wait_for(lambda: s.status()["workers"][0]["job_id"], what="the worker busy")
    queue.enqueue("testjobs.noop")
    wait_for(lambda: waited_past_timeout(s), timeout=15, what="the second job to wait past the threshold")
    code, reply = probe(s.run_dir)
    assert code == 0 and reply["progress"] is True, reply
    assert reply["reason"] == "group default is busy within its jobs' timeouts"
    status, _, body = http_get(port, "/healthz?check=progress")
    assert status == 200 and json.loads(body)["reason"] == reply["reason"], body


def test_progress_passes_on_an_idle_pod_and_a_paused_one(start, conn: redis.Redis) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    s = start(
        RESQUE_STARTER_CONCURRENCY="1",
        RESQUE_STARTER_PROGRESS_TIMEOUT=TIMEOUT,
        RESQUE_STARTER_METRICS_PORT=str(port),
    )
    s.wait_workers(1)
    wait_for(lambda: s.status()["queues"] is not None, what="the agent's first queue gauges")
    wait_for(lambda: "no job waited" in probe(s.run_dir)[1]["reason"], what="the pod idle past the threshold")
    code, reply = probe(s.run_dir)
    assert code == 0 and reply["reason"] == "group default: no job waited longer than 2s", reply
    assert ctl(s.run_dir, "pause").returncode == 0
    wait_for(lambda: s.status()["workers"][0]["state"] == "paused", what="the worker paused")
    job = Queue("default", connection=conn).enqueue("testjobs.noop")
    wait_for(lambda: waited_past_timeout(s), timeout=15, what="the job to wait past the threshold")
    code, reply = probe(s.run_dir)
    assert code == 0, reply
    assert reply["reason"] == "no group takes jobs (paused, draining or scaled to 0): no progress expected"
    status, _, body = http_get(port, "/healthz?check=progress")
    assert status == 200, body
    assert ctl(s.run_dir, "resume").returncode == 0
    wait_for(lambda: job.get_status() == "finished", what="the job taken after the resume")
    code, reply = probe(s.run_dir)
    assert code == 0 and reply["reason"].startswith("group default took a job"), reply


# --------------------------------------------------------------------------- the rule itself


def group(**fields: Any) -> progress.Group:
    values: dict[str, Any] = {"name": "default", "queues": ("default",), "workers": 1, "jobs": (),
                              "grace": 0.0, "idle_for": 10.0}  # fmt: skip
    return progress.Group(**(values | fields))


def test_idle_workers_that_take_no_waiting_job_fail_and_stale_gauges_pass() -> None:
    """Workers that are not busy yet take nothing (they never start, or the dequeue is broken)."""
    gauges = {"default": {"waiting": 3, "oldest_age": 42.0, "started": 0}}
    ok, reason = progress.check(5.0, [group(workers=0)], gauges)
    assert not ok
    assert reason == (
        "a job has waited 42s on queue default (PROGRESS_TIMEOUT 5s) and no worker of group default (0) "
        "took a job for 10s"
    )
    ok, reason = progress.check(5.0, [group(workers=0)], None)
    assert ok and reason == "group default: queue gauges are stale (is Redis reachable?): unknown, healthy"
    took_one = progress.check(5.0, [group(workers=0, idle_for=4.0)], gauges)
    assert took_one == (True, "group default took a job 4s ago")
