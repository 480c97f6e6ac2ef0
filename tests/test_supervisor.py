"""The core of issue 2: a real supervisor, mold and workers, driven with real signals and real Redis."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rq import Queue, Worker
from rq.job import Job, JobStatus

from conftest import wait_for
from starter import ROOT, cmdline, descendants, process_state, registries


def enqueue(conn, func: str, *args, queue: str = "default", **kwargs) -> Job:  # type: ignore[no-untyped-def]
    return Queue(queue, connection=conn).enqueue(func, *args, **kwargs)


# RESQUE_STARTER_PREFORK_HORSE off and on: the pre-forked horse passes the same signal checks.
PREFORK = pytest.mark.parametrize("prefork", ["false", "true"])


def wait_status(conn, job: Job, status: JobStatus, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    wait_for(lambda: job.get_status(refresh=True) == status, timeout, what=f"job {job.id} to be {status}")


def test_jobs_from_another_process_run_on_workers_forked_from_one_mold(start, conn) -> None:
    s = start(RESQUE_STARTER_APP="testapp", RESQUE_STARTER_CONCURRENCY="3")
    workers = s.wait_workers(3)
    producer = (
        "import redis, rq, sys\n"
        "q = rq.Queue('default', connection=redis.Redis.from_url(sys.argv[1]))\n"
        "print(' '.join(q.enqueue('testjobs.pid').id for _ in range(30)))\n"
    )
    out = subprocess.run([sys.executable, "-c", producer, s.url], capture_output=True, text=True, check=True)
    jobs = [Job.fetch(i, connection=conn) for i in out.stdout.split()]
    wait_for(lambda: all(j.get_status(refresh=True) == JobStatus.FINISHED for j in jobs), 30, what="30 jobs")
    status = s.status()
    mold_pid = status["molds"][0]["pid"]
    assert [int(p) for p in conn.lrange("testapp:imports", 0, -1)] == [mold_pid], "the app is imported once"
    worker_pids = {w["pid"] for w in workers}
    children = set(descendants(s.pid))
    assert worker_pids | {mold_pid} <= children
    for pid in worker_pids:  # workers are the supervisor's children (double fork), not the mold's
        assert int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) == s.pid
    ran_on = {Job.fetch(j.id, connection=conn).worker_name for j in jobs}
    assert ran_on <= {w["name"] for w in workers}
    assert "resque-starter: supervisor gen=1 workers=3/3" in cmdline(s.pid)
    assert "resque-starter: mold gen=1 app=testapp" in cmdline(mold_pid)
    assert any("resque-starter: worker[0] gen=1" in cmdline(p) for p in worker_pids)


@PREFORK
def test_quit_lets_the_running_job_finish_and_leaves_nothing_behind(start, conn, prefork: str) -> None:
    s = start(RESQUE_STARTER_PREFORK_HORSE=prefork)
    s.wait_workers(2)
    job = enqueue(conn, "testjobs.sleep_then_record", 2)
    wait_for(lambda: conn.llen("testjobs:done:started"), what="job to start")
    tree = descendants(s.pid)
    s.signal(signal.SIGQUIT)
    assert s.wait_exit(30) == 0
    assert job.get_status(refresh=True) == JobStatus.FINISHED
    assert registries(conn)["started"] == []
    assert Worker.all(connection=conn) == []
    assert [p for p in tree if process_state(p) is not None] == []


@pytest.mark.parametrize("term", ["graceful", "quick"])
def test_term_follows_resque_starter_term(start, conn, term: str) -> None:
    s = start(RESQUE_STARTER_TERM=term)
    s.wait_workers(2)
    job = enqueue(conn, "testjobs.sleep_then_record", 3)
    wait_for(lambda: conn.llen("testjobs:done:started"), what="job to start")
    s.signal(signal.SIGTERM)
    code = s.wait_exit(30)
    if term == "graceful":
        assert code == 0
        assert job.get_status(refresh=True) == JobStatus.FINISHED
    else:
        assert code == 1
        assert registries(conn)["queued"] == [job.id], "a quick stop puts the job back in its queue"
    assert registries(conn)["started"] == []


@PREFORK
def test_int_requeues_the_running_job_at_the_front_and_exits_1(start, conn, prefork: str) -> None:
    s = start(RESQUE_STARTER_CONCURRENCY="1", RESQUE_STARTER_PREFORK_HORSE=prefork)
    s.wait_workers(1)
    long_job = enqueue(conn, "testjobs.sleep_then_record", 60)
    wait_for(lambda: conn.llen("testjobs:done:started"), what="job to start")
    waiting = enqueue(conn, "testjobs.record")
    s.signal(signal.SIGINT)
    assert s.wait_exit(20) == 1
    regs = registries(conn)
    assert regs["queued"] == [long_job.id, waiting.id]
    assert regs["started"] == []
    assert Job.fetch(long_job.id, connection=conn).meta.get("resque_starter_requeues") == 1


def test_second_term_escalates_a_drain_to_a_quick_stop(start, conn) -> None:
    s = start(RESQUE_STARTER_CONCURRENCY="1", RESQUE_STARTER_DRAIN_TIMEOUT="60")
    s.wait_workers(1)
    job = enqueue(conn, "testjobs.sleep_then_record", 60)
    wait_for(lambda: conn.llen("testjobs:done:started"), what="job to start")
    s.signal(signal.SIGTERM)
    wait_for(lambda: "stopping: graceful" in s.log(), what="the drain to begin")
    s.signal(signal.SIGTERM)
    assert s.wait_exit(20) == 1
    assert registries(conn)["queued"] == [job.id]
    assert registries(conn)["started"] == []


def test_drain_timeout_escalates_on_its_own(start, conn) -> None:
    s = start(RESQUE_STARTER_CONCURRENCY="1", RESQUE_STARTER_DRAIN_TIMEOUT="1")
    s.wait_workers(1)
    job = enqueue(conn, "testjobs.sleep_then_record", 60)
    wait_for(lambda: conn.llen("testjobs:done:started"), what="job to start")
    began = time.monotonic()
    s.signal(signal.SIGTERM)
    assert s.wait_exit(20) == 1
    assert time.monotonic() - began < 1 + 10, "drain timeout + generous slack"
    assert registries(conn)["queued"] == [job.id]


@PREFORK
def test_usr1_kills_running_jobs_and_workers_go_on(start, conn, prefork: str) -> None:
    s = start(RESQUE_STARTER_CONCURRENCY="1", RESQUE_STARTER_PREFORK_HORSE=prefork)
    [worker] = s.wait_workers(1)
    job = enqueue(conn, "testjobs.sleep_then_record", 60)
    wait_for(lambda: conn.llen("testjobs:done:started"), what="job to start")
    s.signal(signal.SIGUSR1)
    wait_status(conn, job, JobStatus.FAILED)
    assert job.id in registries(conn)["failed"]
    assert "SIGUSR1" in (Job.fetch(job.id, connection=conn).latest_result().exc_string or "")
    after = enqueue(conn, "testjobs.record")
    wait_status(conn, after, JobStatus.FINISHED)
    assert s.status()["workers"][0]["pid"] == worker["pid"], "the same worker goes on"


def test_usr2_pauses_intake_and_cont_resumes(start, conn) -> None:
    s = start()
    s.wait_workers(2)
    s.signal(signal.SIGUSR2)
    wait_for(
        lambda: (
            all(w.get_state() == "suspended" for w in Worker.all(connection=conn))
            and len(Worker.all(connection=conn)) == 2
        ),
        what="workers suspended",
    )
    job = enqueue(conn, "testjobs.record")
    time.sleep(1.5)  # a window in which a paused worker must NOT take the job (absence can only be sampled)
    assert job.get_status(refresh=True) == JobStatus.QUEUED
    assert len(Worker.all(connection=conn)) == 2, "paused workers stay registered"
    s.signal(signal.SIGCONT)
    wait_status(conn, job, JobStatus.FINISHED)


def test_ttin_adds_and_ttou_removes_the_highest_slot_gracefully(start, conn) -> None:
    s = start(RESQUE_STARTER_CONCURRENCY="1")
    s.wait_workers(1)
    s.signal(signal.SIGTTIN)
    s.wait_workers(2)  # the kernel merges a signal sent while the same one is still pending: one at a time
    s.signal(signal.SIGTTIN)
    workers = s.wait_workers(3)
    assert sorted(w["slot"] for w in workers) == [0, 1, 2]
    assert len(Worker.all(connection=conn)) == 3
    for _ in range(3):
        enqueue(conn, "testjobs.sleep_then_record", 2)
    wait_for(lambda: conn.llen("testjobs:done:started") == 3, what="three jobs running")
    s.signal(signal.SIGTTOU)
    workers = s.wait_workers(2)
    assert sorted(w["slot"] for w in workers) == [0, 1]
    wait_for(lambda: conn.llen("testjobs:done") == 3, what="every running job to finish, slot 2's too")
    assert registries(conn)["failed"] == []


def test_a_killed_worker_is_respawned(start, conn) -> None:
    s = start(RESQUE_STARTER_CONCURRENCY="1")
    [worker] = s.wait_workers(1)
    os.kill(worker["pid"], signal.SIGKILL)
    wait_for(lambda: [w for w in s.ready_workers() if w["pid"] != worker["pid"]], what="a new worker")
    job = enqueue(conn, "testjobs.record")
    wait_status(conn, job, JobStatus.FINISHED)
    assert [w.name for w in Worker.all(connection=conn)] != [worker["name"]]


def test_a_horse_reaped_by_another_process_does_not_hold_up_the_recovery(start, conn) -> None:
    """The supervisor kills a dead worker's horse before it settles the job, and waits for it to exit:
    a pre-forked horse may be reaped by its forker, so its exit never reaches the supervisor."""
    foreign = subprocess.Popen(["sleep", "60"], start_new_session=True)  # a group leader the test reaps
    conn.set("testjobs:foreign-horse", foreign.pid)
    s = start(RESQUE_STARTER_CONCURRENCY="1", RESQUE_STARTER_WORKER_CLASS="testjobs.ForeignHorseWorker")
    [worker] = s.wait_workers(1)
    job = enqueue(conn, "testjobs.noop")
    wait_for(lambda: [w for w in s.status()["workers"] if w["horse_pid"] == foreign.pid], what="busy")
    os.kill(worker["pid"], signal.SIGKILL)
    assert foreign.wait(timeout=10) == -signal.SIGKILL, "the supervisor killed the horse"
    wait_status(conn, job, JobStatus.FAILED)
    assert "died (killed by SIGKILL)" in (Job.fetch(job.id, connection=conn).latest_result().exc_string or "")


def test_app_that_fails_to_import_exits_3_with_one_traceback(start, tmp_path: Path) -> None:
    (tmp_path / "brokenapp.py").write_text("import os\nraise RuntimeError('broken on purpose')\n")
    s = start(RESQUE_STARTER_APP="brokenapp", PYTHONPATH=f"{tmp_path}:{ROOT}")
    assert s.wait_exit(20) == 3
    assert s.log().count("RuntimeError: broken on purpose") == 2  # the traceback's last line, and the summary
    assert s.log().count("Traceback (most recent call last)") == 1


def test_after_fork_that_raises_is_a_crash_loop_exit_4(start, tmp_path: Path) -> None:
    conf = tmp_path / "conf.py"
    conf.write_text("def after_fork(worker, slot):\n    raise RuntimeError('no')\n")
    s = start(RESQUE_STARTER_CONFIG=str(conf), RESQUE_STARTER_CONCURRENCY="1")
    assert s.wait_exit(60) == 4
    assert "crash loop" in s.log()


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"RESQUE_STARTER_CONCURRENCY": "-1"}, "RESQUE_STARTER_CONCURRENCY"),
        ({"RESQUE_STARTER_CONCURRENCY": "abc"}, "RESQUE_STARTER_CONCURRENCY"),
        ({"RESQUE_STARTER_QUEUES": "high priority"}, "RESQUE_STARTER_QUEUES"),
        ({"RESQUE_STARTER_CONFIG": "/nonexistent/conf.py"}, "RESQUE_STARTER_CONFIG"),
        ({"RESQUE_STARTER_WORKER_CLASS": "rq.NoSuchWorker"}, "RESQUE_STARTER_WORKER_CLASS"),
        ({"RESQUE_STARTER_APP": "no_such_module_anywhere"}, "RESQUE_STARTER_APP"),
        ({"RESQUE_STARTER_WORKER_CLASS": "testjobs.NoSuchClass"}, "RESQUE_STARTER_WORKER_CLASS"),
    ],
)
def test_bad_configuration_exits_2_with_one_line(start, env: dict[str, str], needle: str) -> None:
    s = start(**env, RESQUE_STARTER_LOG_LEVEL="WARNING")
    assert s.wait_exit(20) == 2
    errors = [line for line in s.log().splitlines() if needle in line]
    assert len(errors) == 1, s.log()
    assert "not allowed" in errors[0]


def test_idle_supervisor_uses_no_cpu(start) -> None:
    s = start()
    s.wait_workers(2)

    def cpu_ticks() -> int:
        fields = Path(f"/proc/{s.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])

    time.sleep(0.5)
    before = cpu_ticks()
    time.sleep(3)  # measuring an interval: the quantity under test is CPU used while nothing happens
    assert cpu_ticks() - before <= 2, "an idle supervisor sleeps in select(), it does not poll"


def test_json_logs_are_one_object_a_line_with_the_role(start, conn) -> None:
    s = start(RESQUE_STARTER_LOG_FORMAT="json", RESQUE_STARTER_CONCURRENCY="1")
    s.wait_workers(1)
    job = enqueue(conn, "testjobs.record")
    wait_status(conn, job, JobStatus.FINISHED)
    s.signal(signal.SIGQUIT)
    assert s.wait_exit(20) == 0
    entries = [json.loads(line) for line in s.log().splitlines() if line.strip()]
    assert {e["role"] for e in entries} >= {"supervisor", "worker[0]"}
    assert all({"ts", "level", "pid", "msg"} <= e.keys() for e in entries)


def test_workers_do_not_outlive_a_supervisor_killed_by_sigkill(start, conn) -> None:
    """Outside a PID namespace nothing else would stop them: they quick-stop, their job goes back."""
    s = start(RESQUE_STARTER_CONCURRENCY="2")
    workers = s.wait_workers(2)
    mold = s.status()["molds"][0]["pid"]
    job = enqueue(conn, "testjobs.sleep_then_record", 60)
    wait_for(lambda: conn.llen("testjobs:done:started"), what="job to start")
    s.signal(signal.SIGKILL)
    s.wait_exit(10)

    def gone(pid: int) -> bool:
        return process_state(pid) in (None, "Z")

    wait_for(lambda: all(gone(w["pid"]) for w in workers) and gone(mold), 15, what="workers and mold to exit")
    wait_for(lambda: registries(conn)["queued"] == [job.id], what="the interrupted job back in its queue")
    assert registries(conn)["started"] == []


def test_nothing_forked_after_the_supervisor_died_runs_unsupervised(start, conn) -> None:  # type: ignore[no-untyped-def]
    """The supervisor is SIGKILLed while its mold holds a spawn request it has not read (SIGSTOP): the
    mold dies with it, so no worker starts that nobody supervises (nor one the old worker's quick
    stop would leave behind)."""
    s = start(RESQUE_STARTER_CONCURRENCY="1")
    [worker] = s.wait_workers(1)
    prefix = worker["name"].rsplit(".", 1)[0]
    mold = s.status()["molds"][0]["pid"]
    os.kill(mold, signal.SIGSTOP)
    s.signal(signal.SIGTTIN)
    wait_for(lambda: len(s.status()["workers"]) == 2, what="the spawn to be asked")
    s.signal(signal.SIGKILL)
    s.wait_exit(10)
    if process_state(mold) not in (None, "Z"):
        os.kill(mold, signal.SIGCONT)
    wait_for(lambda: process_state(mold) in (None, "Z"), what="the mold to go")
    wait_for(lambda: process_state(worker["pid"]) in (None, "Z"), what="the supervised worker to go")
    deadline = time.monotonic() + 3  # long enough for a worker forked now to register with rq
    while time.monotonic() < deadline:
        names = [w.name for w in Worker.all(connection=conn)]
        assert not [n for n in names if n.startswith(prefix)], names
        time.sleep(0.1)


def test_a_worker_that_exits_0_mid_job_has_its_job_recovered(start, conn) -> None:  # type: ignore[no-untyped-def]
    """A job that calls os._exit(0) in a SimpleWorker: the worker itself exits 0 while busy. Its job
    must not stay STARTED: an exit 0 with a job running is no clean exit."""
    s = start(RESQUE_STARTER_CONCURRENCY="1", RESQUE_STARTER_WORKER_CLASS="rq.SimpleWorker")
    s.wait_workers(1)
    job = Queue("default", connection=conn).enqueue("testjobs.exit_process", 0)
    wait_for(lambda: job.get_status(refresh=True) == JobStatus.FAILED, 15, what="the job to be failed")
    assert registries(conn)["started"] == []
    s.wait_workers(1)
    s.signal(signal.SIGQUIT)
    assert s.wait_exit(20) == 0


@pytest.mark.parametrize("prefork", ["false", "true"])
def test_a_horse_that_exits_0_mid_job_fails_its_job(start, conn, prefork: str) -> None:  # type: ignore[no-untyped-def]
    """rq takes a work-horse's exit 0 for a job done: a job calling os._exit(0) left its job STARTED
    for good. The job's end now reads its status and fails a job nobody settled."""
    s = start(RESQUE_STARTER_CONCURRENCY="1", RESQUE_STARTER_PREFORK_HORSE=prefork)
    s.wait_workers(1)
    job = Queue("default", connection=conn).enqueue("testjobs.exit_process", 0)
    wait_for(lambda: job.get_status(refresh=True) == JobStatus.FAILED, 15, what="the job to be failed")
    assert "exited 0 without finishing the job" in (job.latest_result().exc_string or "")
    assert registries(conn)["started"] == []
    after = Queue("default", connection=conn).enqueue("testjobs.noop")
    wait_for(lambda: after.get_status(refresh=True) == JobStatus.FINISHED, 15, what="the worker to go on")
    s.signal(signal.SIGQUIT)
    assert s.wait_exit(20) == 0
