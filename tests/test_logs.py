"""Issue 22 (job context in logs) and issue 19's log checks: the real log of a real supervisor, its
workers and horses, read line by line in both formats."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis
from rq import Queue
from rq.job import Job, JobStatus

from conftest import wait_for
from starter import ROOT, Starter, base_env, registries

TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ +\[[^\]]*\] ")
TEXT_JOB = re.compile(r" job=(?P<id>\S+) func=(?P<func>\S+) queue=(?P<queue>[^\s\]]+)")


@pytest.fixture
def start(starters, redis_url, run_dir, conn):  # type: ignore[no-untyped-def]
    return lambda **env: starters(base_env(redis_url, run_dir, RESQUE_STARTER_LOG_LEVEL="INFO", **env))


def enqueue(conn: redis.Redis, func: str, *args: Any, queue: str = "default") -> Job:
    return Queue(queue, connection=conn).enqueue(func, *args)


def wait_status(job: Job, status: JobStatus) -> None:
    wait_for(lambda: job.get_status(refresh=True) == status, 30, what=f"job {job.id} to be {status}")


def json_lines(s: Starter) -> list[dict[str, Any]]:
    """Every line of the log as JSON: a line that is not one object fails the test."""
    return [json.loads(line) for line in s.log().splitlines()]


def quick_stop_while_running(s: Starter, conn: redis.Redis) -> Job:
    job = enqueue(conn, "testjobs.sleep_then_record", 60)
    wait_for(lambda: conn.llen("testjobs:done:started") >= 1, what="the long job to start")
    wait_for(lambda: any(w["job_id"] == job.id for w in s.status()["workers"]), what="the worker busy")
    s.signal(signal.SIGINT)
    assert s.wait_exit(30) == 1
    return job


@pytest.mark.parametrize("prefork", ["false", "true"])
def test_json_lines_name_the_job_while_it_runs_and_its_end_says_duration_and_outcome(
    start, conn, prefork: str
) -> None:
    s = start(RESQUE_STARTER_LOG_FORMAT="json", RESQUE_STARTER_PREFORK_HORSE=prefork,
              RESQUE_STARTER_QUEUES="default,low")  # fmt: skip
    s.wait_workers(2)
    ok = enqueue(conn, "testjobs.record")
    low = enqueue(conn, "testjobs.noop", queue="low")
    bad = enqueue(conn, "testjobs.fail", "kaboom")
    for job, status in ((ok, JobStatus.FINISHED), (low, JobStatus.FINISHED), (bad, JobStatus.FAILED)):
        wait_status(job, status)
    wait_for(lambda: sum(1 for e in json_lines(s) if "job_outcome" in e) >= 3, what="three job ends")
    requeued = quick_stop_while_running(s, conn)

    entries = json_lines(s)
    expected = {
        ok.id: ("testjobs.record", "default", "finished"),
        low.id: ("testjobs.noop", "low", "finished"),
        bad.id: ("testjobs.fail", "default", "failed"),
        requeued.id: ("testjobs.sleep_then_record", "default", "requeued"),
    }
    for job_id, (func, queue, outcome) in expected.items():
        mine = [e for e in entries if e.get("job_id") == job_id]
        assert {(e["job_func"], e["job_queue"]) for e in mine} == {(func, queue)}, mine
        assert {e["role"].split("[")[0] for e in mine} == {"worker"}, mine  # worker and horse lines
        ends = [e for e in mine if "job_outcome" in e]
        assert len(ends) == 1, ends
        assert ends[0]["job_outcome"] == outcome and ends[0]["job_duration"] >= 0, ends
        assert mine[-1] is ends[0], "the end is the job's last line"
        # every line a worker logs between the job's start and its end names the job
        pid = ends[0]["pid"]
        first = entries.index(mine[0])
        during = [e for e in entries[first : entries.index(ends[0])] if e["pid"] == pid]
        assert all(e.get("job_id") == job_id for e in during), during
    # rq's horse lines carry the job too: the failure's traceback is logged in the horse (its own pid)
    failure = [e for e in entries if e.get("job_id") == bad.id and "kaboom" in e["msg"]]
    end = next(e for e in entries if e.get("job_id") == bad.id and "job_outcome" in e)
    assert failure and all(e["pid"] != end["pid"] for e in failure), failure
    horse_lines = [e for e in entries if e.get("job_id") == ok.id and "Job OK" in e["msg"]]
    assert horse_lines, "rq's horse logs Job OK with the job's tags"
    assert not any(e.get("job_id") and e["role"] == "supervisor" for e in entries)
    assert not any("job_id" in e for e in entries if "Listening on" in e["msg"])


@pytest.mark.parametrize("worker_class", ["rq.Worker", "rq.SimpleWorker"])
def test_a_quick_stop_logs_its_requeue_once_as_a_requeue_and_no_line_lacks_its_prefix(
    start, conn, worker_class: str
) -> None:
    s = start(RESQUE_STARTER_CONCURRENCY="1", RESQUE_STARTER_WORKER_CLASS=worker_class)
    s.wait_workers(1)
    bad = enqueue(conn, "testjobs.fail", "first line\nsecond line")
    wait_status(bad, JobStatus.FAILED)
    job = quick_stop_while_running(s, conn)
    assert registries(conn)["queued"] == [job.id]

    log = s.log()
    lines = log.splitlines()
    assert all(TEXT_LINE.match(line) for line in lines), [line for line in lines if not TEXT_LINE.match(line)]
    assert "first line\\nsecond line" in log  # rq's traceback of the failed job, on one line
    mine = [line for line in lines if job.id in line]
    assert not [line for line in mine if "WARNING" in line or "ERROR" in line], mine
    assert not [line for line in mine if "failed" in line or "terminated" in line], mine
    ends = [line for line in mine if "outcome=" in line]
    assert len(ends) == 1 and " outcome=requeued]" in ends[0] and "quick stop, SIGINT" in ends[0], ends
    assert sum("requeued" in line for line in mine) == 1, mine
    assert len([line for line in lines if "killed horse pid" in line]) <= 1  # the job may end by itself
    tags = {m.group("id", "func", "queue") for line in mine if (m := TEXT_JOB.search(line))}
    assert tags == {(job.id, "testjobs.sleep_then_record", "default")}


@pytest.mark.parametrize("prefork", ["false", "true"])
def test_a_worker_interrupted_twice_kills_and_logs_its_horse_once(start, conn, prefork: str) -> None:
    """A terminal's ^C reaches every process of the group, and the supervisor then signals the worker too
    (a pre-forked horse is its forker's child: killed, it stays a zombie the worker can signal again)."""
    s = start(RESQUE_STARTER_CONCURRENCY="1", RESQUE_STARTER_PREFORK_HORSE=prefork)
    s.wait_workers(1)
    job = enqueue(conn, "testjobs.sleep_then_record", 60)
    wait_for(lambda: conn.llen("testjobs:done:started") >= 1, what="the long job to start")
    worker = wait_for(lambda: next((w for w in s.status()["workers"] if w["job_id"] == job.id), None))
    os.kill(worker["pid"], signal.SIGINT)
    s.signal(signal.SIGINT)
    assert s.wait_exit(30) == 1
    assert len([line for line in s.log().splitlines() if "killed horse pid" in line]) <= 1, s.log()


def test_a_dead_workers_recovery_is_one_line_without_a_python_dict(start, conn) -> None:
    s = start(RESQUE_STARTER_CONCURRENCY="1")
    s.wait_workers(1)
    job = enqueue(conn, "testjobs.sleep_then_record", 60)
    worker = wait_for(lambda: next((w for w in s.status()["workers"] if w["job_id"] == job.id), None))
    os.kill(worker["pid"], signal.SIGKILL)
    wait_status(job, JobStatus.FAILED)
    wait_for(lambda: "recovered worker" in s.log(), what="the recovery's line")
    lines = [line for line in s.log().splitlines() if "recovered worker" in line]
    assert len(lines) == 1, lines
    counts = "claims=0 requeued=0 retried=0 failed=1 gone=0"
    assert lines[0].endswith(f"recovered worker {worker['name']}: {counts}"), lines


def test_log_config_is_a_dictconfig_file_with_our_tags(start, conn, tmp_path: Path) -> None:
    out = tmp_path / "jobs.log"
    config = {
        "version": 1,
        "formatters": {"mine": {"format": "%(role)s|%(job_id)s|%(job_func)s|%(job_queue)s|%(message)s"},
                       "ours": {"()": "resque_starter.logs.JsonFormatter"}},
        "filters": {"tags": {"()": "resque_starter.logs.ContextFilter"}},
        "handlers": {"file": {"class": "logging.FileHandler", "filename": str(out), "formatter": "mine",
                              "filters": ["tags"]},
                     "err": {"class": "logging.StreamHandler", "formatter": "ours"}},
        "root": {"level": "INFO", "handlers": ["file", "err"]},
    }  # fmt: skip
    path = tmp_path / "logging.json"
    path.write_text(json.dumps(config))
    s = start(RESQUE_STARTER_LOG_CONFIG=str(path), RESQUE_STARTER_CONCURRENCY="1")
    s.wait_workers(1)
    job = enqueue(conn, "testjobs.record")
    wait_status(job, JobStatus.FINISHED)
    wait_for(lambda: f"job {job.id} finished in" in out.read_text(), what="the job's end in the file")
    ends = [line for line in out.read_text().splitlines() if f"job {job.id} finished" in line]
    assert ends[0].startswith(f"worker[0]|{job.id}|testjobs.record|default|"), ends
    assert any(json.loads(line).get("job_outcome") == "finished" for line in s.log().splitlines())


@pytest.mark.parametrize(
    ("content", "name", "allowed"),
    [
        ("{not json", "logging.json", "valid JSON"),
        ('{"handlers": {}}', "logging.json", '"version": 1'),
        ('{"version": 1, "handlers": {"h": {"class": "no.such.Handler"}}}', "logging.json", "dictConfig"),
        (None, "missing.json", "a readable file"),
    ],
)
def test_a_bad_log_config_exits_2_with_one_line(
    tmp_path: Path, run_dir: str, content: str | None, name: str, allowed: str
) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    env = base_env("redis://127.0.0.1:1/0", run_dir, RESQUE_STARTER_LOG_CONFIG=str(path))
    result = subprocess.run([sys.executable, "-m", "resque_starter", "run"], env=env, cwd=str(ROOT),
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if "RESQUE_STARTER_LOG_CONFIG" in line]
    assert len(lines) == 1 and allowed in lines[0] and "Traceback" not in result.stderr, result.stderr
