"""Issue 3: correct as PID 1 (a new PID namespace), and a Kubernetes stop loses nothing."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import pytest
from rq import Queue, Worker
from rq.job import Job, JobStatus

from conftest import wait_for
from starter import Starter, base_env, descendants, process_state, registries

UNSHARE = ("unshare", "--pid", "--fork", "--mount-proc", "--kill-child")
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare"
)


@pytest.fixture
def start(starters, redis_url, run_dir, conn):  # type: ignore[no-untyped-def]
    return lambda prefix=UNSHARE, **env: starters(base_env(redis_url, run_dir, **env), prefix=prefix)


def zombies(s: Starter) -> list[int]:
    return [p for p in descendants(s.proc.pid) if process_state(p) == "Z"]


def in_namespace_pid(s: Starter) -> int:
    with open(f"/proc/{s.pid}/status") as f:
        for line in f:
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
    raise AssertionError("no NSpid line")


@pytest.mark.parametrize(
    "prefix",
    [UNSHARE, (*UNSHARE, "tini", "--"), ()],
    ids=["pid1", "tini-pid1", "subreaper"],
)
def test_orphans_from_jobs_are_reaped(start, conn, prefix: tuple[str, ...]) -> None:
    if "tini" in prefix and not shutil.which("tini"):
        pytest.skip("tini is not installed")
    s = start(prefix=prefix)
    s.wait_workers(2)
    if prefix == UNSHARE:
        assert in_namespace_pid(s) == 1
    q = Queue("default", connection=conn)
    jobs = [q.enqueue("testjobs.make_orphan", 0.2) for _ in range(6)]
    wait_for(lambda: all(j.get_status(refresh=True) == JobStatus.FINISHED for j in jobs), 30, what="jobs")

    def settled() -> bool:
        return not zombies(s) and not any("import os,time" in _cmd(p) for p in descendants(s.proc.pid))

    # settled() saw no zombie: a second look could catch one that exists legitimately for an instant
    # (a horse between its exit and its worker's wait), so none is taken
    wait_for(settled, 10, what="every orphan to exit and be reaped")
    assert conn.llen("testjobs:orphans") == 6


def _cmd(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def test_every_signal_reaches_pid1(start, conn) -> None:
    s = start(RESQUE_STARTER_CONCURRENCY="1")
    s.wait_workers(1)
    s.signal(signal.SIGTTIN)
    s.wait_workers(2)
    s.signal(signal.SIGTTOU)
    s.wait_workers(1)
    s.signal(signal.SIGUSR2)
    wait_for(lambda: s.status()["paused"], what="paused")
    s.signal(signal.SIGCONT)
    wait_for(lambda: not s.status()["paused"], what="resumed")
    job = Queue("default", connection=conn).enqueue("testjobs.sleep_then_record", 60)
    wait_for(lambda: conn.llen("testjobs:done:started"), what="job to start")
    s.signal(signal.SIGUSR1)
    wait_for(lambda: job.get_status(refresh=True) == JobStatus.FAILED, what="USR1 to kill the job")
    s.signal(signal.SIGQUIT)
    assert s.wait_exit(20) == 0


def test_term_with_a_job_longer_than_the_drain_timeout(start, conn) -> None:
    s = start(RESQUE_STARTER_CONCURRENCY="1", RESQUE_STARTER_DRAIN_TIMEOUT="2")
    s.wait_workers(1)
    q = Queue("default", connection=conn)
    job = q.enqueue("testjobs.sleep_then_record", 60)
    wait_for(lambda: conn.llen("testjobs:done:started"), what="job to start")
    other = q.enqueue("testjobs.record")
    began = time.monotonic()
    s.signal(signal.SIGTERM)
    assert s.wait_exit(15) == 1
    assert time.monotonic() - began <= 2 + 2, "exits within drain timeout + 2 s"
    regs = registries(conn)
    assert regs["queued"] == [job.id, other.id], "the interrupted job is back at the head of its queue"
    assert regs["started"] == []
    assert Job.fetch(job.id, connection=conn).meta["resque_starter_requeues"] == 1


def test_term_with_short_jobs_finishes_them_and_exits_0(start, conn) -> None:
    s = start(RESQUE_STARTER_CONCURRENCY="2", RESQUE_STARTER_DRAIN_TIMEOUT="10")
    s.wait_workers(2)
    q = Queue("default", connection=conn)
    jobs = [q.enqueue("testjobs.sleep_then_record", 1) for _ in range(2)]
    wait_for(lambda: conn.llen("testjobs:done:started") == 2, what="both jobs to start")
    s.signal(signal.SIGTERM)
    assert s.wait_exit(15) == 0
    assert all(j.get_status(refresh=True) == JobStatus.FINISHED for j in jobs)
    assert registries(conn)["started"] == []


def test_simulated_kubelet_term_then_sigkill_loses_nothing(start, conn) -> None:
    grace = 6.0
    s = start(RESQUE_STARTER_CONCURRENCY="2", RESQUE_STARTER_DRAIN_TIMEOUT="1")
    s.wait_workers(2)
    q = Queue("default", connection=conn)
    jobs = [q.enqueue("testjobs.sleep_then_record", 30) for _ in range(2)]
    jobs += [q.enqueue("testjobs.sleep_then_record", 0.2) for _ in range(5)]
    wait_for(lambda: conn.llen("testjobs:done:started") >= 2, what="jobs to start")
    s.signal(signal.SIGTERM)  # the kubelet: TERM to PID 1, then SIGKILL of the namespace after the grace
    try:
        s.proc.wait(grace)
    except Exception:
        os.kill(s.proc.pid, signal.SIGKILL)  # --kill-child: the whole namespace goes
        s.proc.wait()
    regs = registries(conn)
    assert regs["started"] == []
    for job in jobs:
        status = job.get_status(refresh=True)
        assert status in (JobStatus.FINISHED, JobStatus.QUEUED), (job.id, status)
        if status == JobStatus.QUEUED:
            assert job.id in regs["queued"]


@pytest.mark.parametrize("prefork", ["false", "true"])
def test_a_worker_killed_mid_job_leaves_its_job_failed_with_a_reason(start, conn, prefork: str) -> None:
    s = start(RESQUE_STARTER_CONCURRENCY="1", RESQUE_STARTER_PREFORK_HORSE=prefork)
    [worker] = s.wait_workers(1)
    job = Queue("default", connection=conn).enqueue("testjobs.sleep_then_record", 60)
    wait_for(lambda: conn.llen("testjobs:done:started"), what="job to start")
    busy = wait_for(lambda: [w for w in s.status()["workers"] if w["state"] == "busy"], what="busy status")
    horse = busy[0]["horse_pid"]  # type: ignore[index]
    assert horse
    host_pid = s.host_pid(worker["pid"])
    # pre-forked: the worker's horse forker, the horse, and the next one forked while it runs
    expected = 3 if prefork == "true" else 1

    def horses() -> list[int] | None:
        found = descendants(host_pid)
        return found if len(found) == expected else None

    kids: list[int] = wait_for(horses, what="the worker's horses")  # type: ignore[assignment]
    os.kill(host_pid, signal.SIGKILL)
    wait_for(lambda: job.get_status(refresh=True) == JobStatus.FAILED, 10, what="the job to be failed")
    result = Job.fetch(job.id, connection=conn).latest_result()
    assert result is not None and "died" in (result.exc_string or "")
    assert registries(conn)["started"] == []
    wait_for(
        lambda: not [p for p in descendants(s.proc.pid) if "sleep_then_record" in _cmd(p)], what="horse gone"
    )
    wait_for(lambda: all(process_state(p) is None for p in kids), what="its horses dead and reaped")
    assert not zombies(s)
    s.wait_workers(1)
    assert worker["name"] not in {w["name"] for w in s.status()["workers"]}


def test_a_fault_in_the_loop_is_a_logged_quick_stop_not_a_crash(starters, redis_url, run_dir, conn) -> None:
    """An unexpected exception in a loop step (injected: USR1 raises) is logged with its traceback and
    becomes a quick stop: the running job goes back to the front of its queue, exit 1. Unwound, PID 1
    would take the namespace down with the job still STARTED."""
    s = starters(
        base_env(redis_url, run_dir, RESQUE_STARTER_CONCURRENCY="1"), prefix=UNSHARE, module="faulty"
    )
    s.wait_workers(1)
    job = Queue("default", connection=conn).enqueue("testjobs.sleep_then_record", 60)
    wait_for(lambda: conn.llen("testjobs:done:started"), what="job to start")
    s.signal(signal.SIGUSR1)
    assert s.wait_exit(8) == 1, "within the quick stop's grace"
    log = s.log()
    assert "the supervisor's loop failed; stopping quickly" in log and "RuntimeError: injected fault" in log
    assert "stopping: quick" in log
    regs = registries(conn)
    assert regs["queued"] == [job.id] and regs["started"] == []


def _in_namespace(s: Starter, script: str) -> str:
    """Run a shell script inside the supervisor's PID namespace (as a child of no one there)."""
    argv = ["nsenter", "--target", str(s.pid), "--pid", "--mount", "--", "sh", "-c", script]
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout


@pytest.mark.skipif(not shutil.which("nsenter"), reason="needs nsenter")
def test_a_reused_pid_is_not_taken_for_an_early_exit(start, conn) -> None:
    """pid reuse, forced: an orphan with pid X exits and PID 1 reaps it before anything claims X
    (an "early exit", kept in case a worker's "forked" message is late); the next worker is then
    given pid X (ns_last_pid). That live worker must not be taken for the orphan's exit (on main it
    was: its row dropped, its slot respawned, one rq worker too many running unsupervised)."""
    s = start(RESQUE_STARTER_CONCURRENCY="1")
    s.wait_workers(1)
    orphan = int(_in_namespace(s, "sleep 0.1 & echo $!"))
    wait_for(lambda: f"reaped pid {orphan} " in s.log(), what="PID 1 to reap the orphan")
    # the next two pids: the mold's intermediate child, then the worker: X - 1 and X
    _in_namespace(s, f"echo {orphan - 2} > /proc/sys/kernel/ns_last_pid")
    s.signal(signal.SIGTTIN)

    def settled() -> bool:
        workers = s.status()["workers"]
        return len(workers) == 2 and all(w["ready"] for w in workers)

    wait_for(settled, 20, what="two ready workers")
    pids = [w["pid"] for w in s.status()["workers"]]
    assert orphan in pids, (orphan, pids)
    wait_for(lambda: len(Worker.all(connection=conn)) == 2, what="rq to know exactly the two")
    s.signal(signal.SIGQUIT)
    assert s.wait_exit(20) == 0
