"""A mold that dies or hangs (SIGKILL, SIGSTOP) never stops PID 1's loop, and what it was asked is
given back: a pending spawn's slot is filled by the next mold, a pending recovery is sent again, and
a stop still finishes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
import redis
from rq import Queue
from rq.job import Job, JobStatus
from test_pid1 import UNSHARE

from conftest import free_port, wait_for
from starter import Starter, process_state, registries

STALL = 5.0  # supervisor.MOLD_STALL


def mold_pid(s: Starter) -> int:
    """The serving mold's pid (as the supervisor reports it)."""
    molds: list[int] = wait_for(  # type: ignore[assignment]
        lambda: [m["pid"] for m in s.status()["molds"] if m["ready"]], what="a ready mold"
    )
    return molds[0]


@pytest.mark.parametrize("pending", ["spawn", "recovery"])
@pytest.mark.parametrize("fault", ["killed", "stopped"])
def test_a_mold_that_dies_or_hangs_with_a_request_pending_is_replaced_and_the_request_redone(
    start: Callable[..., Starter], conn: redis.Redis, fault: str, pending: str
) -> None:
    s = start(RESQUE_STARTER_CONCURRENCY="1")
    [worker] = s.wait_workers(1)
    mold = mold_pid(s)
    job = None
    if pending == "recovery":
        job = Queue("default", connection=conn).enqueue("testjobs.sleep_then_record", 60)
        wait_for(lambda: s.status()["workers"][0]["state"] == "busy", what="the job to start")
    os.kill(mold, signal.SIGSTOP)
    try:
        if pending == "spawn":
            s.signal(signal.SIGTTIN)
            wait_for(lambda: len(s.status()["workers"]) == 2, what="the spawn to be asked")
        else:
            os.kill(worker["pid"], signal.SIGKILL)  # its recovery is asked of the stopped mold
            wait_for(lambda: worker["pid"] not in [w["pid"] for w in s.status()["workers"]],
                     what="the worker to be reaped")  # fmt: skip
        if fault == "killed":
            os.kill(mold, signal.SIGKILL)
        if pending == "spawn":
            s.wait_workers(2, timeout=STALL + 20)
            assert mold not in [m["pid"] for m in s.status()["molds"]]
            s.signal(signal.SIGQUIT)
            assert s.wait_exit(20) == 0
        else:
            s.signal(signal.SIGQUIT)  # a stop with the recovery still to do: it is done, then the exit
            assert s.wait_exit(STALL + 20) == 0
            assert job is not None
            assert job.get_status(refresh=True) == JobStatus.FAILED
            result = Job.fetch(job.id, connection=conn).latest_result()
            assert result is not None and "died (killed by SIGKILL)" in (result.exc_string or "")
            assert registries(conn)["started"] == []
    finally:
        if process_state(mold) not in (None, "Z"):
            os.kill(mold, signal.SIGCONT)
    if fault == "stopped":
        assert f"mold gen=1 pid {mold} left a request unanswered" in s.log()
    assert process_state(mold) in (None, "Z")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root and unshare")
def test_pid1_answers_and_reaps_while_its_mold_is_stopped_under_a_thousand_spawns(
    starters: Callable[..., Starter], redis_url: str, run_dir: str, conn: redis.Redis
) -> None:
    """The mold stops reading (SIGSTOP); `ctl scale 1000` asks it for a thousand workers, more than its
    socket holds: PID 1 writes only what the socket takes, so it still answers TTIN and `ctl status`
    at once and reaps a worker killed meanwhile; then it replaces the hung mold."""
    from starter import base_env

    s = starters(base_env(redis_url, run_dir, RESQUE_STARTER_CONCURRENCY="1"), prefix=UNSHARE)
    [worker] = s.wait_workers(1)
    mold = s.host_pid(mold_pid(s))
    worker_pid = s.host_pid(worker["pid"])
    os.kill(mold, signal.SIGSTOP)
    try:
        assert s.ctl({"cmd": "scale", "n": "1000"})["ok"]
        wait_for(lambda: len(s.status()["workers"]) > 1, what="spawns to be asked of the stopped mold")
        latencies = []
        for expected in (1001, 1002, 1003):
            began = time.monotonic()
            s.signal(signal.SIGTTIN)
            wait_for(lambda n=expected: s.status()["groups"][0]["size"] == n, 5, 0.001, what="TTIN")  # type: ignore[misc]
            latencies.append(time.monotonic() - began)
        assert min(latencies) < 0.1 and max(latencies) < 0.5, latencies
        os.kill(worker_pid, signal.SIGKILL)
        wait_for(lambda: process_state(worker_pid) is None, 5, what="the killed worker to be reaped")
        assert s.ctl({"cmd": "scale", "n": "1"})["ok"]
    except BaseException:
        os.kill(mold, signal.SIGCONT)
        raise
    wait_for(lambda: process_state(mold) is None, STALL + 10, what="the hung mold to be killed and reaped")
    s.wait_workers(1, timeout=30)
    assert "left a request unanswered" in s.log() or "its outbox is full" in s.log()
    s.signal(signal.SIGQUIT)
    assert s.wait_exit(20) == 0


FLOOD = {
    "readyz": (
        "import socket, sys\n"
        "while True:\n"
        "    try:\n"
        "        with socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=5) as s:\n"
        "            s.sendall(b'GET /readyz HTTP/1.0\\r\\n\\r\\n')\n"
        "            while s.recv(65536):\n"
        "                pass\n"
        "    except OSError:\n"
        "        pass\n"
    ),
    "ctl": (
        "import sys\n"
        "from resque_starter import control\n"
        "while True:\n"
        "    try:\n"
        "        control.request(sys.argv[1], {'cmd': 'status'})\n"
        "    except control.ControlError:\n"
        "        pass\n"
    ),
}


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root and unshare")
def test_pid1_answers_ttin_and_reaps_under_floods_and_a_stopped_mold(
    starters: Callable[..., Starter], redis_url: str, run_dir: str, conn: redis.Redis
) -> None:
    """A /readyz flood, a `ctl status` flood and a SIGSTOPped mold at the same time: PID 1 still takes
    TTIN within 100 ms, reaps every worker killed meanwhile, replaces the hung mold and stops cleanly."""
    from starter import ROOT, base_env, descendants

    port = free_port()
    env = base_env(redis_url, run_dir, RESQUE_STARTER_CONCURRENCY="2", RESQUE_STARTER_METRICS_PORT=str(port))
    s = starters(env, prefix=UNSHARE)
    workers = s.wait_workers(2)
    mold = s.host_pid(mold_pid(s))
    flood_env = {**os.environ, "PYTHONPATH": str(ROOT)}
    floods = [
        subprocess.Popen([sys.executable, "-c", FLOOD[kind], arg], env=flood_env)
        for kind, arg in [("readyz", str(port))] * 2 + [("ctl", run_dir)] * 2
    ]
    try:
        os.kill(mold, signal.SIGSTOP)
        latencies = []
        for expected in (3, 4, 5):
            began = time.monotonic()
            s.signal(signal.SIGTTIN)
            wait_for(lambda n=expected: s.status()["groups"][0]["size"] == n, 5, 0.001, what="TTIN")  # type: ignore[misc]
            latencies.append(time.monotonic() - began)
        assert min(latencies) < 0.1 and max(latencies) < 0.5, latencies
        killed = [s.host_pid(w["pid"]) for w in workers]
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: all(process_state(p) is None for p in killed), 5, what="every killed worker reaped")
    except BaseException:
        os.kill(mold, signal.SIGCONT)
        raise
    finally:
        for flood in floods:
            flood.kill()
            flood.wait()
    wait_for(lambda: process_state(mold) is None, STALL + 10, what="the hung mold to be killed and reaped")
    s.wait_workers(5, timeout=60)
    wait_for(lambda: not [p for p in descendants(s.proc.pid) if process_state(p) == "Z"], what="no zombie")
    s.signal(signal.SIGQUIT)
    assert s.wait_exit(30) == 0
