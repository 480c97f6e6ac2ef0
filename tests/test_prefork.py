"""RESQUE_STARTER_PREFORK_HORSE: what only the pre-forked horse does, plus the job-safety checks no other
file has, for both forking kinds. The signal checks it shares with rq.Worker run in test_worker.py,
test_supervisor.py and test_pid1.py with a PREFORK parameter."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import redis
from rq import Callback, Queue, Retry
from rq import Worker as RqWorker
from rq.job import UNSERIALIZABLE_RETURN_VALUE_PAYLOAD, Job, JobStatus
from rq.registry import FinishedJobRegistry
from rq.results import Result
from rq.serializers import JSONSerializer
from test_worker import assert_nothing_held, done_ids, latest_failure

from resque_starter.config import Hooks

import testjobs
from conftest import wait_for
from starter import process_state
from worker_harness import (
    FORKING_CLASSES,
    PREFORK,
    Start,
    WorkerProcess,
    leads_own_group,
    new_spec,
    proctitle,
    worker_processes,
)

FORKING = pytest.mark.parametrize("worker_class", FORKING_CLASSES)
SPARE_TITLE = "horse pre-forked, waiting for a job"
FORKER_TITLE = "horse forker"


@pytest.fixture
def start(redis_url: str, conn: redis.Redis) -> Iterator[Start]:
    with worker_processes(redis_url) as start:
        yield start


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(kid) for kid in f.read().split()]
    except OSError:
        return []


def forkers(worker: WorkerProcess) -> list[int]:
    return [pid for pid in children(worker.pid) if FORKER_TITLE in _title(pid)]


def spares(worker: WorkerProcess) -> list[int]:
    """Horses waiting for a job: children of the worker's forker."""
    kids = [pid for forker in forkers(worker) for pid in children(forker)]
    return [pid for pid in kids if SPARE_TITLE in _title(pid)]


def _title(pid: int) -> str:
    try:
        return proctitle(pid)
    except OSError:
        return ""


def one_spare(worker: WorkerProcess) -> int:
    """The one pre-forked horse, not yet (or never) named in a busy event."""
    found = wait_for(lambda: [p for p in spares(worker) if p not in worker.horses], what="a pre-forked horse")
    [spare] = found  # type: ignore[misc]
    return spare


def gone(pid: int) -> bool:
    """Not running any more: reaped, or dead and waiting for a reaper that is not ours."""
    return process_state(pid) in (None, "Z")


def socket_targets(pid: int) -> set[str]:
    targets = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            targets.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    return {t for t in targets if t.startswith("socket:")}


def test_the_next_horse_is_forked_ahead_and_runs_the_job(start: Start, conn: redis.Redis) -> None:
    queue = Queue("default", connection=conn)
    worker = start(worker_class=PREFORK)
    worker.expect("ready")
    spare = one_spare(worker)
    assert leads_own_group(spare)
    status = os.readlink(f"/proc/{worker.pid}/fd/{worker.status_fd}")
    assert status not in socket_targets(spare)
    assert conn.keys("rq:resque-starter:claim:*") == [], "a spare claims nothing"

    ran_on = []
    for _ in range(3):
        job = queue.enqueue("testjobs.pid")
        assert worker.expect("busy")["horse"] == spare, "the busy event names the horse running the job"
        worker.expect("idle")
        assert job.get_status() == JobStatus.FINISHED
        ran_on.append(job.return_value())
        wait_for(lambda pid=spare: process_state(pid) is None, what="the finished horse to be reaped")
        spare = one_spare(worker)
    assert len(set(ran_on)) == 3 and worker.pid not in ran_on, "every job in a fresh process"
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0
    assert process_state(spare) is None


def _stop(worker: WorkerProcess, how: str) -> None:
    if how == "term":
        worker.signal(signal.SIGTERM)
    elif how == "pause, then term":
        worker.signal(signal.SIGUSR2)
        worker.expect("paused")
        worker.signal(signal.SIGTERM)
    elif how == "sigkill":
        worker.signal(signal.SIGKILL)


@pytest.mark.parametrize("how", ["term", "pause, then term", "recycle", "sigkill"])
def test_no_idle_horse_outlives_its_worker(start: Start, conn: redis.Redis, how: str) -> None:
    worker = start(worker_class=PREFORK, max_jobs=1 if how == "recycle" else None)
    worker.expect("ready")
    Queue("default", connection=conn).enqueue("testjobs.sleep_then_record", 0.5)
    worker.expect("busy")
    spare = one_spare(worker)  # forked while the job runs
    worker.expect("idle")
    if how == "recycle":
        worker.expect("recycle")
    else:
        _stop(worker, how)
    code = worker.wait()
    if how == "sigkill":
        assert code == -signal.SIGKILL
        wait_for(lambda: gone(spare), what="the spare to die with its worker")
    else:
        assert code == 0
        assert process_state(spare) is None, "stopped and reaped by its worker"
        assert_nothing_held(conn, Queue("default", connection=conn), worker.name)


def test_a_horse_that_died_idle_is_replaced(start: Start, conn: redis.Redis) -> None:
    worker = start(worker_class=PREFORK)
    worker.expect("ready")
    spare = one_spare(worker)
    os.kill(spare, signal.SIGKILL)
    wait_for(lambda: gone(spare), what="the spare to die")  # a kill is not instant: the job must not race it
    job = Queue("default", connection=conn).enqueue("testjobs.record")
    horse = worker.expect("busy")["horse"]
    assert horse not in (spare, worker.pid)
    worker.expect_idle(1, 0, 0)
    assert done_ids(conn) == [job.id]
    assert process_state(spare) is None, "the dead one was reaped"


@pytest.mark.parametrize("paused", [False, True], ids=["idle", "paused"])
def test_a_horse_that_died_idle_is_reaped_before_any_job_comes(start: Start, paused: bool) -> None:
    """The next job may be hours away: a dead spare is no zombie for that long (found by the chaos test)."""
    worker = start(worker_class=PREFORK, spec=new_spec(paused=paused))
    worker.expect("ready")
    if paused:
        worker.expect("paused")
    spare = one_spare(worker)
    os.kill(spare, signal.SIGKILL)
    wait_for(lambda: process_state(spare) is None, 5, what="the dead spare to be reaped")


@FORKING
def test_job_timeout_kills_the_job_and_the_worker_goes_on(
    start: Start, conn: redis.Redis, worker_class: str
) -> None:
    queue = Queue("default", connection=conn)
    worker = start(worker_class=worker_class)
    worker.expect("ready")
    job = queue.enqueue("testjobs.sleep_then_record", 30, job_timeout=1)
    worker.expect("busy")
    worker.expect_idle(0, 1, 0, timeout=15)
    assert job.get_status() == JobStatus.FAILED
    assert "JobTimeoutException" in latest_failure(job)
    after = queue.enqueue("testjobs.record")
    worker.expect("busy")
    worker.expect("idle")
    assert done_ids(conn) == [after.id]
    assert_nothing_held(conn, queue, worker.name)


@FORKING
def test_results_and_retries_as_in_rq(start: Start, conn: redis.Redis, worker_class: str) -> None:
    queue = Queue("default", connection=conn)
    worker = start(worker_class=worker_class)
    worker.expect("ready")
    failing = queue.enqueue("testjobs.fail", "on purpose", retry=Retry(max=2))
    for _ in range(3):
        assert worker.expect("busy")["job"] == failing.id
        worker.expect("idle")
    assert failing.get_status() == JobStatus.FAILED
    failing.refresh()
    assert failing.retries_left == 0
    assert "RuntimeError: on purpose" in latest_failure(failing)
    good = queue.enqueue("testjobs.record")
    worker.expect("busy")
    worker.expect_idle(1, 3, 0)
    assert Job.fetch(good.id, connection=conn).return_value() == "recorded"


def test_simple_worker_ignores_it_with_a_log_line(
    start: Start, conn: redis.Redis, capfd: pytest.CaptureFixture[str]
) -> None:
    worker = start(worker_class="rq.SimpleWorker", prefork_horse=True)
    worker.expect("ready")
    Queue("default", connection=conn).enqueue("testjobs.record")
    assert worker.expect("busy")["horse"] is None
    worker.expect("idle")
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0
    assert "RESQUE_STARTER_PREFORK_HORSE ignored: rq.SimpleWorker does not fork" in capfd.readouterr().err


def _ballast(worker: Any, slot: int) -> None:
    worker.ballast = bytes(range(256)) * (256 * 1024)  # 64 MiB of this worker's own, touched pages


def test_max_memory_turns_it_off_so_the_worker_memory_is_its_own(
    start: Start, capfd: pytest.CaptureFixture[str]
) -> None:
    """A horse forker shares the worker's pages for good, so the worker's USS would hide them."""
    worker = start(worker_class=PREFORK, max_memory=32 * 1024 * 1024, hooks=Hooks(after_fork=_ballast))
    worker.expect("ready")
    assert worker.expect("recycle")["reason"] == "max_memory"
    assert worker.wait() == 0
    assert "RESQUE_STARTER_PREFORK_HORSE ignored: RESQUE_STARTER_MAX_MEMORY" in capfd.readouterr().err


def test_the_worker_forks_once_its_forker_forks_every_horse(start: Start, conn: redis.Redis) -> None:
    """After every fork, each page the forking process writes is copied again: the worker forks only
    its forker, at start, and never again."""
    queue = Queue("default", connection=conn)
    worker = start(worker_class=PREFORK)
    worker.expect("ready")
    [forker] = wait_for(lambda: forkers(worker), what="the horse forker")  # type: ignore[misc]
    for _ in range(3):
        queue.enqueue("testjobs.record")
        horse = worker.expect("busy")["horse"]
        assert _parent(horse) == forker
        worker.expect("idle")
    assert children(worker.pid) == [forker]


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def test_a_forker_killed_mid_job_fails_the_job_as_rq_and_is_replaced(start: Start, conn: redis.Redis) -> None:
    """Its horses die with it (PR_SET_PDEATHSIG): the running job fails as when rq's horse is killed,
    and the worker forks a new forker for the next job."""
    queue = Queue("default", connection=conn)
    worker = start(worker_class=PREFORK)
    worker.expect("ready")
    [forker] = wait_for(lambda: forkers(worker), what="the horse forker")  # type: ignore[misc]
    job = queue.enqueue("testjobs.sleep_then_record", 30)
    horse = worker.expect("busy")["horse"]
    wait_for(lambda: conn.llen("testjobs:done:started"), what="the job to start")
    os.kill(forker, signal.SIGKILL)
    worker.expect_idle(0, 1, 0, timeout=15)
    assert job.get_status() == JobStatus.FAILED
    assert "Work-horse terminated unexpectedly" in latest_failure(job)
    wait_for(lambda: gone(horse), what="the horse to die with its forker")
    after = queue.enqueue("testjobs.record")
    assert _parent(worker.expect("busy")["horse"]) not in (forker, worker.pid)
    worker.expect("idle")
    assert done_ids(conn) == [after.id]
    assert_nothing_held(conn, queue, worker.name)


@pytest.mark.parametrize("prefork_horse", [False, True], ids=["rq.Worker", "prefork"])
def test_a_killed_horse_reaches_rqs_hook_with_its_resource_usage(
    start: Start, conn: redis.Redis, prefork_horse: bool
) -> None:
    """rq gives its killed-horse hook what os.wait4 returned; a pre-forked horse's comes from its forker."""
    worker = start(worker_class="testjobs.RusageWorker", prefork_horse=prefork_horse)
    worker.expect("ready")
    Queue("default", connection=conn).enqueue("testjobs.sleep_then_record", 30)
    horse = worker.expect("busy")["horse"]
    wait_for(lambda: conn.llen("testjobs:done:started"), what="the job to start")
    os.kill(horse, signal.SIGKILL)
    worker.expect("idle", timeout=15)
    [seen] = [json.loads(entry) for entry in conn.lrange("testjobs:killed-horses", 0, -1)]
    retpid, status, kind, maxrss = seen
    assert (retpid, os.WTERMSIG(status), kind) == (horse, signal.SIGKILL, "struct_rusage")
    assert maxrss > 0


def test_a_forker_killed_while_idle_is_replaced_before_any_job_comes(start: Start) -> None:
    worker = start(worker_class=PREFORK)
    worker.expect("ready")
    [forker] = wait_for(lambda: forkers(worker), what="the horse forker")  # type: ignore[misc]
    spare = one_spare(worker)
    os.kill(forker, signal.SIGKILL)
    wait_for(lambda: gone(spare), what="the spare to die with its forker")
    wait_for(lambda: process_state(forker) is None, 5, what="the dead forker to be reaped")
    wait_for(lambda: [f for f in forkers(worker) if f != forker] and spares(worker), 5, what="a new spare")


def test_spec_paused_worker_keeps_no_job_but_its_spare(start: Start, conn: redis.Redis) -> None:
    job = Queue("default", connection=conn).enqueue("testjobs.record")
    worker = start(worker_class=PREFORK, spec=new_spec(paused=True))
    worker.expect("ready")
    worker.expect("paused")
    spare = one_spare(worker)
    assert job.get_status() == JobStatus.QUEUED
    worker.signal(signal.SIGCONT)
    worker.expect("resumed")
    assert worker.expect("busy")["horse"] == spare


def _socket_inodes(pid: int) -> set[int]:
    return {int(t[len("socket:[") : -1]) for t in socket_targets(pid)}


def _unix_peers() -> dict[int, int]:
    """Unix socket inode -> its peer's inode, from `ss` (sock_diag): /proc does not tell."""
    out = subprocess.run(["ss", "-xaH"], capture_output=True, text=True, check=True).stdout
    return {int(f[5]): int(f[7]) for f in (line.split() for line in out.splitlines()) if len(f) >= 8}


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
def test_the_scheduler_does_not_hold_the_spare_socket(start: Start, conn: redis.Redis) -> None:
    """rq forks its scheduler after the forker and the first spare: the worker's end of the spare's socket
    stays its own."""
    worker = start(worker_class=PREFORK, spec=new_spec(scheduler=True))
    worker.expect("ready")
    spare = one_spare(worker)

    def scheduler() -> int | None:
        others = [pid for pid in children(worker.pid) if pid not in forkers(worker)]
        return others[0] if others else None

    pid = int(wait_for(scheduler, what="rq's scheduler process"))  # type: ignore[arg-type]
    peers = _unix_peers()
    ours = {peers[inode] for inode in _socket_inodes(spare) if inode in peers}
    assert ours and ours <= _socket_inodes(worker.pid)
    assert not ours & _socket_inodes(pid)
    job = Queue("default", connection=conn).enqueue_in(timedelta(seconds=1), "testjobs.record")
    assert worker.expect("busy", timeout=15)["horse"] == spare
    worker.expect("idle")
    assert done_ids(conn) == [job.id]


@FORKING
def test_a_killed_worker_takes_its_scheduler_with_it(
    start: Start, conn: redis.Redis, worker_class: str
) -> None:
    """rq's scheduler, a fork of the worker, holds the worker's Redis connections: had it outlived the
    worker, the claim the worker was blocked in would have moved the next job into a dead worker's list."""
    worker = start(worker_class=worker_class, spec=new_spec(scheduler=True))
    worker.expect("ready")

    def scheduler() -> int | None:
        others = [pid for pid in children(worker.pid) if pid not in forkers(worker)]
        return others[0] if others else None

    def claiming() -> bool:
        return any(c.get("cmd") == "blmove" for c in conn.client_list())

    pid = int(wait_for(scheduler, what="rq's scheduler process"))  # type: ignore[arg-type]
    wait_for(claiming, what="the worker to block waiting for a job")
    worker.kill()
    wait_for(lambda: gone(pid), what="the scheduler to die with its worker")
    wait_for(lambda: not claiming(), what="Redis to see the claim's connection closed")
    queue = Queue("default", connection=conn)
    job = queue.enqueue("testjobs.record")
    assert queue.get_job_ids() == [job.id]
    assert conn.keys("rq:resque-starter:claim:*") == []


# --- what the horse hands back, and what it finishes itself: the same outcome as rq.Worker's horse ------


def ready(start: Start, conn: redis.Redis, worker_class: str) -> tuple[WorkerProcess, Queue]:
    worker = start(worker_class=worker_class)
    worker.expect("ready")
    return worker, Queue("default", connection=conn)


def run_one(worker: WorkerProcess, queue: Queue, func: str, *args: Any, **options: Any) -> tuple[Job, int]:
    """Enqueue one job, wait until the worker is idle again: the job, fetched afresh, and its horse."""
    job = queue.enqueue(func, *args, **options)
    horse = worker.expect("busy")["horse"]
    worker.expect("idle")
    return Job.fetch(job.id, connection=queue.connection), horse


@FORKING
@pytest.mark.parametrize(
    "func, expected",
    [
        ("testjobs.plain_result", testjobs.PLAIN),
        ("testjobs.rich_result", testjobs.rich_result()),
        ("testjobs.big_result", testjobs.BIG),
        ("testjobs.unpicklable_result", UNSERIALIZABLE_RETURN_VALUE_PAYLOAD),
    ],
    ids=["builtins", "classes", "large", "unpicklable"],
)
def test_return_values_are_saved_as_in_rq(
    start: Start, conn: redis.Redis, worker_class: str, func: str, expected: object
) -> None:
    worker, queue = ready(start, conn, worker_class)
    job, _horse = run_one(worker, queue, func)
    assert job.get_status() == JobStatus.FINISHED
    assert job.return_value() == expected
    result = job.latest_result()
    assert result is not None and result.type == Result.Type.SUCCESSFUL
    assert result.worker_name == worker.name and result.execution_id
    assert job.started_at is not None and job.ended_at is not None and job.started_at <= job.ended_at
    assert FinishedJobRegistry(queue=queue).get_job_ids() == [job.id]
    assert_nothing_held(conn, queue, worker.name)
    [rq_worker] = RqWorker.all(connection=conn)
    assert (rq_worker.successful_job_count, rq_worker.failed_job_count) == (1, 0)
    assert rq_worker.total_working_time > 0


@FORKING
def test_a_configured_serializer_is_used_as_in_rq(start: Start, conn: redis.Redis, worker_class: str) -> None:
    worker = start(worker_class=worker_class, serializer="json")
    worker.expect("ready")
    queue = Queue("default", connection=conn, serializer=JSONSerializer)
    job, _horse = run_one(worker, queue, "testjobs.length", "four")
    assert job.get_status() == JobStatus.FINISHED
    assert Job.fetch(job.id, connection=conn, serializer=JSONSerializer).return_value() == 4


@FORKING
def test_the_job_sees_itself_as_in_rq(start: Start, conn: redis.Redis, worker_class: str) -> None:
    """Small jobs come with the hand-off; large ones, and ones holding what pickle cannot take, the horse
    fetches: the same job either way."""
    worker, queue = ready(start, conn, worker_class)
    job, horse = run_one(worker, queue, "testjobs.describe", job_timeout=77)
    seen = job.return_value()
    assert seen == {
        "id": job.id,
        "origin": "default",
        "func_name": "testjobs.describe",
        "args": (),
        "timeout": 77,
        "created_at": job.created_at,
        "enqueued_at": job.enqueued_at,
        "started_at": job.started_at,
        "status": JobStatus.STARTED,
    }
    assert job.get_meta()["seen_by"] == horse
    big, _horse = run_one(worker, queue, "testjobs.length", testjobs.BIG)
    assert big.return_value() == len(testjobs.BIG)
    held, _horse = run_one(worker, queue, "testjobs.opened_path", testjobs.Opened("/srv/data"))
    assert held.return_value() == "/srv/data"


@FORKING
def test_a_returned_retry_and_callbacks_run_as_in_rq(
    start: Start, conn: redis.Redis, worker_class: str
) -> None:
    worker, queue = ready(start, conn, worker_class)
    callback = Callback("testjobs.callback_pid")
    job, horse = run_one(worker, queue, "testjobs.pid", on_success=callback)
    assert job.get_status() == JobStatus.FINISHED
    assert conn.lrange(f"testjobs:callback:{job.id}", 0, -1) == [str(horse).encode()], "in the horse"
    job, horse = run_one(worker, queue, "testjobs.fail", on_failure=callback)
    assert job.get_status() == JobStatus.FAILED
    assert conn.lrange(f"testjobs:callback:{job.id}", 0, -1) == [str(horse).encode()]

    retried = queue.enqueue("testjobs.retry_once")
    for _ in range(2):
        worker.expect("busy")
        worker.expect("idle")
    assert retried.get_status() == JobStatus.FINISHED
    assert retried.return_value() == "second run"

    first = queue.enqueue("testjobs.noop")
    dependent = queue.enqueue("testjobs.record", depends_on=first)
    ran = []
    for _ in range(2):
        ran.append(worker.expect("busy")["job"])
        worker.expect("idle")
    assert ran == [first.id, dependent.id], "the dependent is enqueued when its dependency finishes"
    assert dependent.get_status() == JobStatus.FINISHED
    assert_nothing_held(conn, queue, worker.name)


def test_a_horse_whose_job_needs_no_redis_opens_no_connection(start: Start, conn: redis.Redis) -> None:
    """The worker prepares the job and saves a plain result: its horse runs only the job. A horse that
    uses Redis (here, a job that does) connects as rq's does, which shows the count would see it."""
    worker, queue = ready(start, conn, PREFORK)
    one_spare(worker)

    def connections() -> int:
        return int(conn.info("stats")["total_connections_received"])

    before = connections()
    for _ in range(3):
        job, _horse = run_one(worker, queue, "testjobs.noop")
        assert job.return_value() == "ok"
    assert connections() == before
    job, _horse = run_one(worker, queue, "testjobs.record")
    assert job.return_value() == "recorded"
    assert connections() == before + 1
