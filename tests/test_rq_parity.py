"""Where our worker classes behave as rq's do (issue 18: differences found by running rq's own test suite
against them that were not intended). Real worker processes, real Redis, real signals."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from rq import Queue, Worker
from rq.command import send_shutdown_command
from rq.job import JobStatus

import resque_starter.worker.dequeue as worker_dequeue
from resque_starter import mold
from resque_starter.claims import claim_key
from resque_starter.worker import Context, Controls, StarterMixin, build_worker

import testjobs
from conftest import wait_for
from worker_harness import EVERY_CLASS, PREFORK, Start, make_settings, new_spec, proctitle, worker_processes

EVERY = pytest.mark.parametrize("worker_class", EVERY_CLASS)


@pytest.fixture
def start(redis_url: str, conn: redis.Redis) -> Iterator[Start]:
    with worker_processes(redis_url) as start:
        yield start


def _in_process(redis_url: str, **settings: Any) -> StarterMixin:
    """The worker run_worker builds, in this process, on a status socket nobody reads."""
    status, _supervisor = socket.socketpair()
    context = Context(
        make_settings(redis_url, **settings), new_spec(), Controls(paused=False), status, ("default",)
    )
    return build_worker(context)


@pytest.mark.parametrize(
    ("worker_class", "prefork"),
    [("testjobs.QuietWorker", False), ("testjobs.QuietWorker", True), ("testjobs.QuietSimpleWorker", False)],
)
def test_log_job_description_false_keeps_job_arguments_out_of_the_logs(
    start: Start, conn: redis.Redis, capfd: pytest.CaptureFixture[str], worker_class: str, prefork: bool
) -> None:
    job = Queue("default", connection=conn).enqueue("testjobs.length", "secret-argument")
    worker = start(worker_class=worker_class, prefork_horse=prefork)
    worker.expect("ready")
    worker.expect("busy")
    worker.expect("idle")
    logged = capfd.readouterr().err
    assert f"default: {job.id}" in logged  # rq's line without the description
    assert "secret-argument" not in logged


@EVERY
def test_a_warm_shutdown_during_a_job_records_when_it_was_requested(
    start: Start, conn: redis.Redis, worker_class: str
) -> None:
    """rq writes shutdown_requested_date into the worker's hash when a warm shutdown comes mid-job."""
    Queue("default", connection=conn).enqueue("testjobs.sleep_then_record", 1.0)
    worker = start(worker_class=worker_class)
    worker.expect("ready")
    worker.expect("busy")
    worker.signal(15)
    worker.expect("idle")
    assert worker.wait() == 0
    assert conn.hget(f"rq:worker:{worker.name}", "shutdown_requested_date") is not None


@EVERY
def test_an_idle_worker_stops_at_once_on_rq_shutdown(
    start: Start, conn: redis.Redis, worker_class: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`rq shutdown` (send_shutdown_command) stops an idle worker as fast as rq's does, not at the end
    of its blocking wait for a job (made long here so that the difference cannot hide)."""
    monkeypatch.setattr(worker_dequeue, "CLAIM_POLL_SECONDS", 10.0)
    worker = start(worker_class=worker_class)
    worker.expect("ready")
    wait_for(lambda: "idle" in proctitle(worker.pid), what="idle")
    wait_for(lambda: any(c["cmd"] == "blmove" for c in conn.client_list()), what="the worker in BLMOVE")
    began = time.monotonic()
    send_shutdown_command(conn, worker.name)
    assert worker.wait() == 0
    assert time.monotonic() - began < 0.5


@pytest.mark.parametrize("worker_class", ["rq.Worker", PREFORK])
def test_rq_code_may_run_the_execution_hooks_itself(
    redis_url: str, conn: redis.Redis, worker_class: str
) -> None:
    """prepare_execution, fork_work_horse and monitor_work_horse called directly, as rq's own code and
    tests do, run the job (they used to assert that our execute_job had run first)."""
    worker = _in_process(redis_url, worker_class=worker_class)
    worker.bootstrap()
    queue = Queue("default", connection=conn)
    job = queue.enqueue("testjobs.length", "four")
    execution = worker.prepare_execution(job)
    worker.fork_work_horse(job, queue)
    worker.monitor_work_horse(job, queue, execution)
    assert job.get_status() == JobStatus.FINISHED
    assert job.return_value() == 4
    worker.teardown()


def test_rq_builds_our_worker_class_itself(redis_url: str, conn: redis.Redis) -> None:
    """rq's class methods (Worker.all, find_by_key) build the worker class they are called on without
    our context: they must find a worker of ours as they find rq's."""
    worker = _in_process(redis_url)
    worker.register_birth()
    cls = type(worker)
    found = cls.find_by_key(worker.key, connection=conn)
    assert found is not None and found.name == worker.name
    assert [w.name for w in cls.all(connection=conn)] == [worker.name]
    assert [w.name for w in Worker.all(connection=conn)] == [worker.name]


def test_recovery_puts_claims_back_into_the_apps_own_queues(redis_url: str, conn: redis.Redis) -> None:
    """The recovery the mold runs for a dead worker builds its queues with the app's queue class
    (RESQUE_STARTER_QUEUE_CLASS), as the worker did: a claimed job goes back under the class's keys."""
    queue = testjobs.PrefixedQueue("default", connection=conn)
    job = queue.enqueue("testjobs.noop")
    conn.lmove(queue.key, claim_key("dead-worker", "default"), "LEFT", "RIGHT")
    settings = make_settings(redis_url, queue_class="testjobs.PrefixedQueue")
    request = {"worker": "dead-worker", "queues": ["default"], "requeue": True, "reason": "killed"}
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the recovery child, as the mold forks it
        code = 1
        try:
            mold._recovery_main(settings, request, os.getppid())
            code = 0
        finally:
            os._exit(code)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert queue.get_job_ids() == [job.id]
    assert Queue("default", connection=conn).get_job_ids() == []
