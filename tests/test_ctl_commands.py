"""`ctl kill JOB_ID`, rq's own stop-job command, `ctl pause|resume|drain GROUP`, what each ctl command
prints, and the one table of commands that signals go through too: against a real supervisor, real
workers of each class and a real Redis (the TTIN bound drives the supervisor object directly: 1024
workers are not needed to show that the 1025th is refused)."""

from __future__ import annotations

import logging
import signal
from typing import Any

import pytest
import redis
from rq import Queue, Retry, Worker
from rq.command import send_stop_job_command
from rq.job import Job, JobStatus
from test_groups import group_env, in_group, wait_groups

from resque_starter import config, loader
from resque_starter.supervisor import Supervisor

from conftest import wait_for
from starter import Starter, base_env, ctl, ok, registries

CLASSES = {
    "rq.Worker": {},
    "prefork": {"RESQUE_STARTER_PREFORK_HORSE": "1"},
    "rq.SimpleWorker": {"RESQUE_STARTER_WORKER_CLASS": "rq.SimpleWorker"},
}


@pytest.fixture(params=list(CLASSES))
def two_busy(request, starters, redis_url, run_dir, conn):  # type: ignore[no-untyped-def]
    """A supervisor of two workers of one class, each running a 60 s job: (starter, [job, job])."""
    s = starters(base_env(redis_url, run_dir, **CLASSES[request.param]))
    s.wait_workers(2)
    queue = Queue("default", connection=conn)
    jobs = [queue.enqueue("testjobs.sleep_then_record", 60, retry=Retry(max=1)) for _ in range(2)]
    for job in jobs:
        wait_for(lambda job=job: running_on(s, job), what=f"{job.id} busy")
    return s, jobs


def running_on(s: Starter, job: Job) -> dict[str, Any] | None:
    return next((w for w in s.status()["workers"] if w["job_id"] == job.id), None)


def wait_status(job: Job, *statuses: JobStatus, timeout: float = 20.0) -> JobStatus:
    found = wait_for(
        lambda: job.get_status(refresh=True) in statuses and job.get_status(),
        timeout,
        what=f"{job.id} {statuses}",
    )
    return found  # type: ignore[return-value]


def test_ctl_kill_kills_one_job_as_usr1_does_and_its_worker_goes_on(two_busy, conn) -> None:
    s, (victim, other) = two_busy
    worker = running_on(s, victim)
    assert worker is not None
    out = ok(s.run_dir, "kill", victim.id).strip()
    where = f"worker default:{worker['slot']} pid {worker['pid']}"
    assert out == f"killing job {victim.id} (testjobs.sleep_then_record) on {where}"
    # retried per its rq Retry (once), exactly as USR1 does; then killed again it fails for good
    wait_for(lambda: Job.fetch(victim.id, connection=conn).retries_left == 0, what="the retry to be used")
    wait_for(lambda: running_on(s, victim), what="the retried job to run again")
    ok(s.run_dir, "kill", victim.id)
    assert wait_status(victim, JobStatus.FAILED) == JobStatus.FAILED
    assert "SIGUSR1" in (Job.fetch(victim.id, connection=conn).latest_result().exc_string or "")
    assert other.get_status(refresh=True) == JobStatus.STARTED and running_on(s, other), "one job only"
    assert registries(conn)["started"] == [other.id]
    after = Queue("default", connection=conn).enqueue("testjobs.record")
    wait_status(after, JobStatus.FINISHED)
    assert {w["pid"] for w in s.status()["workers"]} >= {worker["pid"]}, "the worker went on"

    refused = ctl(s.run_dir, "kill", victim.id)
    assert refused.returncode == 1
    assert refused.stderr.strip() == f"resque-starter ctl kill: no worker is running job '{victim.id}'"


def test_rqs_send_stop_job_command_stops_the_job_on_our_workers(two_busy, conn) -> None:
    s, (victim, other) = two_busy
    worker = running_on(s, victim)
    send_stop_job_command(conn, victim.id)
    assert wait_status(victim, JobStatus.STOPPED, JobStatus.FAILED) == JobStatus.STOPPED
    assert victim.id in registries(conn)["failed"], "rq moves a stopped job to the failed registry"
    assert other.get_status(refresh=True) == JobStatus.STARTED
    after = Queue("default", connection=conn).enqueue("testjobs.record")
    wait_status(after, JobStatus.FINISHED)
    assert worker is not None and worker["pid"] in {w["pid"] for w in s.status()["workers"]}


# --------------------------------------------------------------------------- one group


@pytest.fixture
def groups(starters, redis_url, run_dir, conn):  # type: ignore[no-untyped-def]
    s = starters(group_env(redis_url, run_dir, "high=1; low=1"))
    wait_groups(s, {"high": 1, "low": 1})
    return s


def suspended(conn: redis.Redis) -> dict[str, bool]:
    """rq's view: each worker's first queue -> whether it is suspended."""
    return {w.queue_names()[0]: w.get_state() == "suspended" for w in Worker.all(connection=conn)}


def test_pause_and_resume_one_group(groups: Starter, conn) -> None:
    s = groups
    assert (
        ok(s.run_dir, "pause", "low").strip()
        == "paused group low: its workers take no new job until ctl resume"
    )
    wait_for(lambda: suspended(conn) == {"high": False, "low": True}, what="low suspended, high not")
    workers = s.status()["workers"]
    assert [w["state"] for w in in_group(workers, "low")] == ["paused"]
    assert [w["state"] for w in in_group(workers, "high")] == ["idle"]
    assert s.status()["paused"] is False, "the supervisor as a whole is not paused"
    low = Queue("low", connection=conn).enqueue("testjobs.record")
    high = Queue("high", connection=conn).enqueue("testjobs.record")
    wait_status(high, JobStatus.FINISHED)
    assert low.get_status(refresh=True) == JobStatus.QUEUED, "the paused group took no job"
    assert ok(s.run_dir, "resume", "low").strip() == "resumed group low: its workers take jobs again"
    wait_status(low, JobStatus.FINISHED)

    ok(s.run_dir, "pause")
    wait_for(lambda: suspended(conn) == {"high": True, "low": True}, what="every group suspended")
    assert s.status()["paused"] is True
    ok(s.run_dir, "resume", "high")
    wait_for(lambda: suspended(conn) == {"high": False, "low": True}, what="high resumed alone")
    assert s.status()["paused"] is False
    unknown = ctl(s.run_dir, "pause", "nosuch")
    assert unknown.returncode == 1
    assert unknown.stderr.strip() == "resque-starter ctl pause: unknown group 'nosuch'; groups: high; low"


def test_drain_one_group_waits_for_its_job_only(groups: Starter, conn) -> None:
    s = groups
    long_low = Queue("low", connection=conn).enqueue("testjobs.sleep_then_record", 60)
    short_high = Queue("high", connection=conn).enqueue("testjobs.sleep_then_record", 1.5)
    wait_for(lambda: running_on(s, long_low) and running_on(s, short_high), what="both busy")
    result = ctl(s.run_dir, "drain", "high", "--timeout", "20")
    assert result.returncode == 0, result.stdout + result.stderr
    assert short_high.get_status(refresh=True) == JobStatus.FINISHED
    assert f"waiting for job {short_high.id}" in result.stdout and long_low.id not in result.stdout
    assert result.stdout.rstrip().endswith("drained: no job is running")
    late = Queue("high", connection=conn).enqueue("testjobs.record")
    other = Queue("low", connection=conn).enqueue("testjobs.record")
    assert running_on(s, long_low), "the other group's job runs on"
    ok(s.run_dir, "kill", long_low.id)
    wait_status(other, JobStatus.FINISHED)
    assert late.get_status(refresh=True) == JobStatus.QUEUED, "the drained group takes no job"
    assert s.status()["draining"] is False, "only one group drains"
    ok(s.run_dir, "resume", "high")
    wait_status(late, JobStatus.FINISHED)


def test_a_group_pause_survives_a_reload(groups: Starter, conn) -> None:
    s = groups
    ok(s.run_dir, "pause", "low")
    ok(s.run_dir, "reload")
    wait_groups(s, {"high": 1, "low": 1}, generation=2, timeout=40)
    wait_for(lambda: suspended(conn) == {"high": False, "low": True}, what="low still paused in generation 2")


# --------------------------------------------------------------------------- what ctl prints


def test_every_command_that_changes_something_prints_one_line(start, conn) -> None:
    s = start(RESQUE_STARTER_CONCURRENCY="1")
    s.wait_workers(1)
    for args, line in (
        (("pause",), "paused every group: its workers take no new job until ctl resume"),
        (("resume",), "resumed every group: its workers take jobs again"),
        (("kill-jobs",), "kill-jobs: told 1 worker(s) to kill their running job"),
        (("scale", "2"), "group default: 2 worker(s)"),
        (("reload",), "reloading: a new generation starts; the serving one serves until it is ready"),
    ):
        assert ok(s.run_dir, *args) == line + "\n"
    assert ok(s.run_dir, "stop") == "stopping (graceful): ctl status shows the workers left\n"
    assert s.wait_exit(30) == 0


def test_health_without_a_flag_is_live(start) -> None:
    s = start(RESQUE_STARTER_CONCURRENCY="1")
    s.wait_workers(1)
    bare = ctl(s.run_dir, "health")
    assert (bare.returncode, bare.stdout) == (0, '{"live": true}\n'), bare.stderr
    usage = " ".join(ctl(s.run_dir, "health", "--help").stdout.split())
    assert "--live (the default)" in usage and "a mold serves (the default)" in usage


# --------------------------------------------------------------------------- signals use the same table


@pytest.fixture
def supervisor() -> Supervisor:
    """The supervisor object, not started: its signal handling is plain methods on desired state."""
    env = {"RESQUE_STARTER_CONCURRENCY": str(config.MAX_GROUP_SIZE), "REDIS_URL": "redis://127.0.0.1:1"}
    return Supervisor(loader.load({}, env), {}, {})


def test_ttin_has_the_bound_of_ctl_scale(supervisor: Supervisor, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "resque_starter.supervisor")
    supervisor._signals += [signal.SIGTTIN]
    supervisor._handle_signals()
    assert supervisor.sizes == [config.MAX_GROUP_SIZE]
    refused = f"scale +1 would make {config.MAX_GROUP_SIZE + 1} workers; the most is {config.MAX_GROUP_SIZE}"
    assert f"SIGTTIN scale refused: {refused}" in caplog.text
    supervisor._signals += [signal.SIGTTOU, signal.SIGTTIN, signal.SIGTTIN]
    supervisor._handle_signals()
    assert supervisor.sizes == [config.MAX_GROUP_SIZE]
    assert supervisor.command({"cmd": "scale", "n": "+1"}) == {"ok": False, "error": refused}


def test_ttou_at_zero_is_refused_not_clamped(
    supervisor: Supervisor, caplog: pytest.LogCaptureFixture
) -> None:
    supervisor.command({"cmd": "scale", "n": "0"})
    supervisor._signals += [signal.SIGTTOU]
    supervisor._handle_signals()
    assert supervisor.sizes == [0]
    assert "SIGTTOU scale refused: scale -1 would make -1 workers; the least is 0" in caplog.text
