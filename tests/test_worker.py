"""The worker process for real: forked like the mold does, real Redis, real rq jobs, real signals."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from rq import Queue, Retry, Worker
from rq.command import send_shutdown_command
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry, StartedJobRegistry
from rq.suspension import resume

import resque_starter.worker as worker_module
import resque_starter.worker.dequeue as worker_dequeue
from resque_starter.config import Group, Hooks
from resque_starter.recovery import REQUEUES_META_KEY, claim_key, recover_worker

import testjobs
from conftest import RedisServer, wait_for
from worker_harness import (
    EVERY_CLASS,
    FORKING_CLASSES,
    Start,
    WorkerProcess,
    claim_keys,
    new_spec,
    proctitle,
    worker_processes,
)

EVERY = pytest.mark.parametrize("worker_class", EVERY_CLASS)
FORKING = pytest.mark.parametrize("worker_class", FORKING_CLASSES)


@pytest.fixture
def start(redis_url: str, conn: redis.Redis) -> Iterator[Start]:
    with worker_processes(redis_url) as start:
        yield start


def done_ids(conn: redis.Redis, tag: str = "done") -> list[str]:
    return [item.decode() for item in conn.lrange(f"testjobs:{tag}", 0, -1)]


def started_running(conn: redis.Redis, job: Job) -> bool:
    return job.id in done_ids(conn, "done:started")


def stays(predicate: Callable[[], bool], seconds: float) -> None:
    """Assert `predicate` holds for `seconds` (what a worker must NOT do needs a time bound)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert predicate()
        time.sleep(0.05)


def latest_failure(job: Job) -> str:
    result = job.latest_result()
    assert result is not None
    return result.exc_string or ""


def assert_nothing_held(conn: redis.Redis, queue: Queue, name: str) -> None:
    assert claim_keys(conn) == []
    assert StartedJobRegistry(queue=queue).get_job_ids(cleanup=False) == []
    assert not conn.exists(f"rq:worker:{name}:executions")


# --- running jobs and reporting --------------------------------------------------------------------


@EVERY
def test_runs_jobs_and_reports_events_in_order(start: Start, conn: redis.Redis, worker_class: str) -> None:
    queue = Queue("default", connection=conn)
    worker = start(worker_class=worker_class)
    ready = worker.expect("ready")
    assert ready == {"event": "ready", "pid": worker.pid, "name": worker.name}
    assert [w.name for w in Worker.all(connection=conn)] == [worker.name]

    job = queue.enqueue("testjobs.record")
    busy = worker.expect("busy")
    assert (busy["job"], busy["func"], busy["queue"]) == (job.id, "testjobs.record", "default")
    assert abs(busy["started"] - time.time()) < 30
    if worker_class != "rq.SimpleWorker":
        assert isinstance(busy["horse"], int) and busy["horse"] != worker.pid
    else:
        assert busy["horse"] is None
    assert worker.expect("idle") == {"event": "idle", "done": 1, "failed": 0, "requeued": 0}
    assert done_ids(conn) == [job.id]
    assert job.get_status() == JobStatus.FINISHED

    queue.enqueue("testjobs.fail")
    worker.expect("busy")
    assert worker.expect("idle") == {"event": "idle", "done": 1, "failed": 1, "requeued": 0}

    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0
    assert Worker.all(connection=conn) == []
    assert_nothing_held(conn, queue, worker.name)


def test_process_title_shows_state(start: Start, conn: redis.Redis) -> None:
    worker = start(queues=("high", "default"))
    worker.expect("ready")
    wait_for(lambda: "worker[0] gen=1 idle queues=high,default" in proctitle(worker.pid), what="idle title")
    job = Queue("default", connection=conn).enqueue("testjobs.sleep_then_record", 30)
    worker.expect("busy")
    wait_for(
        lambda: f"worker[0] gen=1 busy job={job.id[:8]} testjobs.sleep_then_record" in proctitle(worker.pid)
    )
    worker.signal(signal.SIGINT)
    assert worker.wait() == 0


def test_group_label_in_title_when_several_groups(start: Start, redis_url: str) -> None:
    groups = (Group(("high",), 1), Group(("low", "default"), 2))
    worker = start(groups=groups, spec=new_spec(slot=1, group=1))
    worker.expect("ready")
    wait_for(lambda: "worker[low,default:1] gen=1 idle queues=low,default" in proctitle(worker.pid))


@FORKING
def test_horse_does_not_keep_the_status_socket(start: Start, conn: redis.Redis, worker_class: str) -> None:
    worker = start(worker_class=worker_class)
    worker.expect("ready")
    Queue("default", connection=conn).enqueue("testjobs.sleep_then_record", 30)
    horse = worker.expect("busy")["horse"]
    status = os.readlink(f"/proc/{worker.pid}/fd/{worker.status_fd}")
    assert status.startswith("socket:")

    def horse_fd_targets() -> set[str]:
        fds = os.listdir(f"/proc/{horse}/fd")
        return {
            os.readlink(f"/proc/{horse}/fd/{fd}") for fd in fds if os.path.exists(f"/proc/{horse}/fd/{fd}")
        }

    wait_for(lambda: status not in horse_fd_targets(), what="the horse to close the status socket")
    worker.signal(signal.SIGINT)
    assert worker.wait() == 0


def test_keeps_working_when_the_supervisor_is_gone(start: Start, conn: redis.Redis) -> None:
    worker = start()
    worker.expect("ready")
    worker.sock.close()
    job = Queue("default", connection=conn).enqueue("testjobs.record")
    wait_for(lambda: done_ids(conn) == [job.id], what="the job to run")
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0


def test_priority_order_of_several_queues(start: Start, conn: redis.Redis) -> None:
    high, low = Queue("high", connection=conn), Queue("low", connection=conn)
    low1 = low.enqueue("testjobs.record").id
    high1, high2 = high.enqueue("testjobs.record").id, high.enqueue("testjobs.record").id
    low2 = low.enqueue("testjobs.record").id
    worker = start(queues=("high", "low"))
    wait_for(lambda: len(done_ids(conn)) == 4, what="four jobs")
    assert done_ids(conn) == [high1, high2, low1, low2]
    # while blocked on the first queue, a job on another one is still picked up
    late = low.enqueue("testjobs.record")
    wait_for(lambda: late.id in done_ids(conn), what="the job on the second queue")
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0


def test_round_robin_strategy(start: Start, conn: redis.Redis) -> None:
    a, b = Queue("a", connection=conn), Queue("b", connection=conn)
    a1, a2 = a.enqueue("testjobs.record").id, a.enqueue("testjobs.record").id
    b1, b2 = b.enqueue("testjobs.record").id, b.enqueue("testjobs.record").id
    worker = start(queues=("a", "b"), dequeue_strategy="round_robin")
    wait_for(lambda: len(done_ids(conn)) == 4, what="four jobs")
    assert done_ids(conn) == [a1, b1, a2, b2]
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0


# --- graceful stop ---------------------------------------------------------------------------------


@EVERY
def test_term_during_a_job_lets_it_finish(start: Start, conn: redis.Redis, worker_class: str) -> None:
    queue = Queue("default", connection=conn)
    worker = start(worker_class=worker_class)
    worker.expect("ready")
    job = queue.enqueue("testjobs.sleep_then_record", 1.0)
    worker.expect("busy")
    wait_for(lambda: started_running(conn, job), what="the job to start")
    waiting = queue.enqueue("testjobs.record")
    worker.signal(signal.SIGTERM)
    assert worker.expect("idle")["done"] == 1
    assert worker.wait() == 0
    assert job.get_status() == JobStatus.FINISHED
    assert queue.get_job_ids() == [waiting.id]  # no new job was taken
    assert_nothing_held(conn, queue, worker.name)


@FORKING
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGQUIT])
def test_stop_when_idle_is_prompt(start: Start, conn: redis.Redis, signum: int, worker_class: str) -> None:
    worker = start(worker_class=worker_class)
    worker.expect("ready")
    wait_for(lambda: "idle" in proctitle(worker.pid), what="idle")
    began = time.monotonic()
    worker.signal(signum)
    assert worker.wait() == 0
    assert time.monotonic() - began < worker_module.CLAIM_POLL_SECONDS + 2
    assert Worker.all(connection=conn) == []
    assert_nothing_held(conn, Queue("default", connection=conn), worker.name)


def test_rq_shutdown_command_is_a_graceful_stop(start: Start, conn: redis.Redis) -> None:
    worker = start()
    worker.expect("ready")
    job = Queue("default", connection=conn).enqueue("testjobs.sleep_then_record", 1.0)
    worker.expect("busy")
    wait_for(lambda: started_running(conn, job), what="the job to start")
    send_shutdown_command(conn, worker.name)
    worker.expect("idle")
    assert worker.wait() == 0
    assert job.get_status() == JobStatus.FINISHED


# --- quick stop ------------------------------------------------------------------------------------


def start_long_job(start: Start, conn: redis.Redis, **overrides: Any) -> tuple[WorkerProcess, Job, Job]:
    """A worker running a 30 s job, with a second job waiting behind it."""
    queue = Queue("default", connection=conn)
    worker = start(**overrides)
    worker.expect("ready")
    job = queue.enqueue("testjobs.sleep_then_record", 30)
    worker.expect("busy")
    wait_for(lambda: started_running(conn, job), what="the job to start")
    return worker, job, queue.enqueue("testjobs.record")


@EVERY
def test_int_requeues_the_running_job_at_the_front(
    start: Start, conn: redis.Redis, worker_class: str
) -> None:
    worker, job, waiting = start_long_job(start, conn, worker_class=worker_class)
    began = time.monotonic()
    worker.signal(signal.SIGINT)
    assert worker.expect("idle")["requeued"] == 1, "the supervisor counts requeues from idle events"
    assert worker.wait() == 0
    assert time.monotonic() - began < 5
    queue = Queue("default", connection=conn)
    assert queue.get_job_ids() == [job.id, waiting.id]
    job.refresh()
    assert job.get_status() == JobStatus.QUEUED
    assert job.meta[REQUEUES_META_KEY] == 1
    assert done_ids(conn) == []
    assert_nothing_held(conn, queue, worker.name)
    assert Worker.all(connection=conn) == []


@EVERY
def test_int_fails_the_job_after_max_requeues(start: Start, conn: redis.Redis, worker_class: str) -> None:
    worker, job, _ = start_long_job(start, conn, worker_class=worker_class, max_requeues=1)
    worker.signal(signal.SIGINT)
    assert worker.wait() == 0
    assert Job.fetch(job.id, connection=conn).meta[REQUEUES_META_KEY] == 1

    again = start(worker_class=worker_class, max_requeues=1)
    again.expect("ready")
    assert again.expect("busy")["job"] == job.id  # requeued at the front
    wait_for(lambda: done_ids(conn, "done:started").count(job.id) == 2, what="the second run")
    again.signal(signal.SIGINT)
    idle = again.expect("idle")
    assert (idle["failed"], idle["requeued"]) == (1, 0), "failed after max requeues, not requeued again"
    assert again.wait() == 0
    assert job.get_status() == JobStatus.FAILED
    assert job.id in FailedJobRegistry("default", connection=conn)
    assert "interrupted by shutdown 2 times" in latest_failure(job)
    assert_nothing_held(conn, Queue("default", connection=conn), again.name)


@EVERY
def test_int_fails_the_job_when_requeue_is_off(start: Start, conn: redis.Redis, worker_class: str) -> None:
    worker, job, waiting = start_long_job(start, conn, worker_class=worker_class, requeue_interrupted=False)
    worker.signal(signal.SIGINT)
    assert worker.wait() == 0
    assert job.get_status() == JobStatus.FAILED
    assert "interrupted by shutdown (quick stop" in latest_failure(job)
    queue = Queue("default", connection=conn)
    assert queue.get_job_ids() == [waiting.id]
    assert_nothing_held(conn, queue, worker.name)


# --- killing the job -------------------------------------------------------------------------------


@EVERY
def test_usr1_kills_the_job_and_the_worker_goes_on(
    start: Start, conn: redis.Redis, worker_class: str
) -> None:
    worker, job, waiting = start_long_job(start, conn, worker_class=worker_class)
    worker.signal(signal.SIGUSR1)
    assert worker.expect("idle") == {"event": "idle", "done": 0, "failed": 1, "requeued": 0}
    assert job.get_status() == JobStatus.FAILED  # failed, not "stopped"
    assert job.id in FailedJobRegistry("default", connection=conn)
    assert "SIGUSR1" in latest_failure(job)
    assert worker.expect("busy")["job"] == waiting.id
    assert worker.expect("idle") == {"event": "idle", "done": 1, "failed": 1, "requeued": 0}
    assert worker.poll() is None
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0


@EVERY
def test_usr1_honours_the_jobs_retry(start: Start, conn: redis.Redis, worker_class: str) -> None:
    queue = Queue("default", connection=conn)
    worker = start(worker_class=worker_class)
    worker.expect("ready")
    job = queue.enqueue("testjobs.sleep_then_record", 30, retry=Retry(max=1))
    worker.expect("busy")
    wait_for(lambda: started_running(conn, job), what="the job to start")
    worker.signal(signal.SIGUSR1)
    worker.expect("idle")
    assert worker.expect("busy")["job"] == job.id  # retried
    wait_for(lambda: done_ids(conn, "done:started").count(job.id) == 2, what="the retry to start")
    worker.signal(signal.SIGUSR1)
    worker.expect("idle")
    assert job.get_status() == JobStatus.FAILED
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0


@FORKING
def test_killing_a_job_right_after_the_fork_spares_the_worker(
    start: Start, conn: redis.Redis, worker_class: str
) -> None:
    """Before its os.setpgrp() the horse is in the worker's process group: rq's killpg would hit it."""
    queue = Queue("default", connection=conn)
    worker = start(worker_class=worker_class)
    worker.expect("ready")
    for _ in range(10):
        queue.enqueue("testjobs.sleep_then_record", 30)
        worker.expect("busy")
        worker.signal(signal.SIGUSR1)
        worker.expect("idle")
    assert worker.poll() is None


def test_usr1_when_idle_does_nothing(start: Start, conn: redis.Redis) -> None:
    worker = start()
    worker.expect("ready")
    worker.signal(signal.SIGUSR1)
    job = Queue("default", connection=conn).enqueue("testjobs.record")
    worker.expect("busy")
    assert worker.expect("idle")["done"] == 1
    assert job.get_status() == JobStatus.FINISHED


# --- pause -----------------------------------------------------------------------------------------


def worker_state(conn: redis.Redis, name: str) -> str | None:
    state = conn.hget(f"rq:worker:{name}", "state")
    return state.decode() if state else None


@EVERY
def test_pause_stops_intake_even_while_blocked(start: Start, conn: redis.Redis, worker_class: str) -> None:
    queue = Queue("default", connection=conn)
    worker = start(worker_class=worker_class)
    worker.expect("ready")
    wait_for(lambda: worker_state(conn, worker.name) == "idle", what="idle")
    worker.signal(signal.SIGUSR2)
    job = queue.enqueue("testjobs.record")  # while the worker may still be blocked waiting for a job
    worker.expect("paused")
    assert worker_state(conn, worker.name) == "suspended"
    assert "paused" in proctitle(worker.pid)
    stays(lambda: queue.get_job_ids() == [job.id], 1.5)
    assert job.get_status() == JobStatus.QUEUED
    assert [w.name for w in Worker.all(connection=conn)] == [worker.name]

    worker.signal(signal.SIGCONT)
    worker.expect("resumed")
    assert worker.expect("busy")["job"] == job.id
    worker.expect("idle")
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0


@EVERY
def test_rq_suspend_during_a_job_holds_the_next_one_until_resume(
    start: Start, conn: redis.Redis, worker_class: str
) -> None:
    """rq's own pause, `rq suspend`, works as in rq: issued while a job runs, the worker takes no job
    from the end of that one until `rq resume`."""
    queue = Queue("default", connection=conn)
    worker = start(worker_class=worker_class)
    worker.expect("ready")
    queue.enqueue("testjobs.suspend_workers")
    worker.expect("busy")
    worker.expect("idle")
    held = queue.enqueue("testjobs.record")
    wait_for(lambda: worker_state(conn, worker.name) == "suspended", what="rq's suspended state")
    stays(lambda: queue.get_job_ids() == [held.id], 1.5)
    resume(conn)
    assert worker.expect("busy")["job"] == held.id
    worker.expect("idle")


@FORKING
def test_pause_during_a_job_lets_it_finish(start: Start, conn: redis.Redis, worker_class: str) -> None:
    worker = start(worker_class=worker_class)
    worker.expect("ready")
    job = Queue("default", connection=conn).enqueue("testjobs.sleep_then_record", 0.5)
    worker.expect("busy")
    worker.signal(signal.SIGUSR2)
    worker.expect("idle")
    worker.expect("paused")
    assert job.get_status() == JobStatus.FINISHED
    worker.signal(signal.SIGTERM)  # a paused worker stops at once
    assert worker.wait() == 0


def test_starts_paused_when_asked(start: Start, conn: redis.Redis) -> None:
    job = Queue("default", connection=conn).enqueue("testjobs.record")
    worker = start(spec=new_spec(paused=True))
    worker.expect("ready")
    worker.expect("paused")
    assert job.get_status() == JobStatus.QUEUED
    worker.signal(signal.SIGCONT)
    worker.expect("resumed")
    worker.expect("busy")


# --- dying and recovery ----------------------------------------------------------------------------


@FORKING
@pytest.mark.parametrize("requeue", [False, True])
def test_sigkill_mid_job_then_recover(
    start: Start, conn: redis.Redis, requeue: bool, worker_class: str
) -> None:
    worker, job, waiting = start_long_job(start, conn, worker_class=worker_class)
    worker.kill()  # the worker and its horse, as the supervisor does
    queue = Queue("default", connection=conn)
    assert job.id in StartedJobRegistry(queue=queue).get_job_ids(cleanup=False)

    reason = f"worker pid {worker.pid} (rq name {worker.name}) died by SIGKILL while running this job"
    counts = recover_worker(conn, worker.name, ["default"], requeue=requeue, max_requeues=3, reason=reason)
    assert_nothing_held(conn, queue, worker.name)
    assert Worker.all(connection=conn) == []
    job.refresh()
    if requeue:
        assert counts["requeued"] == 1
        assert queue.get_job_ids() == [job.id, waiting.id]
        assert job.meta[REQUEUES_META_KEY] == 1
    else:
        assert counts["failed"] == 1
        assert job.get_status() == JobStatus.FAILED
        assert reason in latest_failure(job)
        assert queue.get_job_ids() == [waiting.id]
    assert recover_worker(conn, worker.name, ["default"], requeue=requeue, max_requeues=3, reason=reason) == {
        "claims": 0,
        "requeued": 0,
        "retried": 0,
        "failed": 0,
        "gone": 0,
    }


def test_sigkill_between_pop_and_record_loses_nothing(
    start: Start, conn: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hole in rq: a worker killed after taking a job id but before recording it."""
    monkeypatch.setattr(worker_dequeue, "CLAIM_POLL_SECONDS", 5.0)  # a wide window to freeze it in
    queue = Queue("default", connection=conn)
    worker = start()
    worker.expect("ready")

    def blocked() -> bool:
        return any(c.get("cmd") == "blmove" and "b" in c.get("flags", "") for c in conn.client_list())

    wait_for(blocked, what="the worker to block waiting for a job")
    worker.signal(signal.SIGSTOP)  # Redis still hands it the next job; it never gets to record it
    job = queue.enqueue("testjobs.record")
    claim = claim_key(worker.name, "default")
    wait_for(
        lambda: conn.lrange(claim, 0, -1) == [job.id.encode()], what="Redis to move the job into the claim"
    )
    worker.kill()
    assert queue.get_job_ids() == []  # with rq's BLPOP this job would now be gone

    counts = recover_worker(conn, worker.name, ["default"], requeue=False, max_requeues=3, reason="killed")
    assert counts["claims"] == 1
    assert queue.get_job_ids() == [job.id]
    assert claim_keys(conn) == []
    again = start()
    again.expect("ready")
    assert again.expect("busy")["job"] == job.id
    again.expect("idle")
    assert done_ids(conn) == [job.id]


@EVERY
def test_an_app_job_class_with_keys_of_its_own(start: Start, conn: redis.Redis, worker_class: str) -> None:
    """The claim brings the job's fields from under the job class's own key prefix (a job queued before
    the worker starts), and a job that comes while the worker is blocked waiting is fetched from there."""
    queue = Queue("default", connection=conn, job_class=testjobs.TaggedJob)
    waiting = queue.enqueue("testjobs.length", "four")
    worker = start(worker_class=worker_class, job_class="testjobs.TaggedJob")
    worker.expect("ready")
    worker.expect("busy")
    worker.expect("idle")
    wait_for(lambda: any(c["cmd"] == "blmove" for c in conn.client_list()), what="the worker in BLMOVE")
    later = queue.enqueue("testjobs.length", "seven")
    worker.expect("busy")
    assert worker.expect("idle")["done"] == 2
    for job, expected in ((waiting, 4), (later, 5)):
        assert conn.exists(f"testjobs:job:{job.id}")
        assert testjobs.TaggedJob.fetch(job.id, connection=conn).return_value() == expected


def test_claim_of_a_deleted_job_is_dropped(start: Start, conn: redis.Redis) -> None:
    queue = Queue("default", connection=conn)
    gone = queue.enqueue("testjobs.record")
    gone.delete(remove_from_queue=False)
    conn.rpush(queue.key, gone.id)
    job = queue.enqueue("testjobs.record")
    worker = start()
    worker.expect("ready")
    assert worker.expect("busy")["job"] == job.id
    worker.expect("idle")
    assert claim_keys(conn) == []


# --- recycling -------------------------------------------------------------------------------------


@FORKING
def test_max_jobs_recycles(start: Start, conn: redis.Redis, worker_class: str) -> None:
    queue = Queue("default", connection=conn)
    jobs = [queue.enqueue("testjobs.record") for _ in range(3)]
    worker = start(max_jobs=2, worker_class=worker_class)
    worker.expect("ready")
    for _ in range(2):
        worker.expect("busy")
        worker.expect("idle")
    assert worker.expect("recycle") == {"event": "recycle", "reason": "max_jobs"}
    assert worker.wait() == 0
    assert queue.get_job_ids() == [jobs[2].id]
    assert_nothing_held(conn, queue, worker.name)


def test_max_lifetime_recycles_an_idle_worker(start: Start) -> None:
    worker = start(max_lifetime=0.5)
    worker.expect("ready")
    assert worker.expect("recycle", timeout=5)["reason"] == "max_lifetime"
    assert worker.wait() == 0


def test_max_memory_recycles_between_jobs(start: Start, conn: redis.Redis) -> None:
    Queue("default", connection=conn).enqueue("testjobs.record")
    worker = start(max_memory=1024 * 1024 * 1024)
    worker.expect("ready")
    worker.expect("busy")
    worker.expect("idle")
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0
    small = start(max_memory=1024)
    small.expect("ready")
    assert small.expect("recycle")["reason"] == "max_memory"
    assert small.wait() == 0


# --- start-up --------------------------------------------------------------------------------------


def _raise_in_hook(worker: Any, slot: int) -> None:
    raise RuntimeError("after_fork failed on purpose")


def test_after_fork_raising_exits_70(start: Start, conn: redis.Redis) -> None:
    worker = start(hooks=Hooks(after_fork=_raise_in_hook))
    assert worker.wait() == 70
    assert worker.seen == []
    assert Worker.all(connection=conn) == []


def _record_hook(worker: Any, slot: int) -> None:
    worker.connection.set("hooked", f"{worker.name}:{slot}:{type(worker).__name__}")


def test_after_fork_gets_the_worker_and_slot(start: Start, conn: redis.Redis) -> None:
    worker = start(hooks=Hooks(after_fork=_record_hook), spec=new_spec(slot=3))
    worker.expect("ready")
    assert conn.get("hooked") == f"{worker.name}:3:StarterWorker".encode()


def test_user_worker_class(start: Start, conn: redis.Redis) -> None:
    worker = start(worker_class="testjobs.CountingWorker")
    worker.expect("ready")
    job = Queue("default", connection=conn).enqueue("testjobs.record")
    worker.expect("busy")
    worker.expect("idle")
    assert conn.get(f"counting:{job.id}") == b"1"


def test_waits_for_redis_at_start(start: Start, tmp_path: Any) -> None:
    later = RedisServer(str(tmp_path))
    worker = start(redis_url=later.url)
    stays(lambda: worker.poll() is None, 1.0)
    later.start()
    try:
        worker.expect("ready", timeout=15)
        worker.signal(signal.SIGTERM)
        assert worker.wait() == 0
    finally:
        later.stop()


def test_stop_while_waiting_for_redis(start: Start, tmp_path: Any) -> None:
    worker = start(redis_url=RedisServer(str(tmp_path)).url)
    stays(lambda: worker.poll() is None, 0.5)
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0
    assert worker.seen == []
