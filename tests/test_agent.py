"""The agent: readiness from its reports (PID 1 never talks to Redis), its life tied to the supervisor's,
the pod's lease released at a clean exit, and a stop that says what it waits for."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest
import redis
from rq import Queue
from rq.job import JobStatus

from resque_starter import control
from resque_starter.lease import LEASES, lease_key

from conftest import RedisServer, wait_for
from starter import Starter, base_env, process_state


@pytest.fixture
def start(starters, redis_url, run_dir, conn):  # type: ignore[no-untyped-def]
    """A supervisor on the test's Redis, or on `url`."""
    return lambda url=None, **env: starters(base_env(url or redis_url, run_dir, **env))


def ready(s: Starter) -> dict[str, object]:
    return control.request(s.run_dir, {"cmd": "health", "check": "ready"})


def tcp_peers(pid: int) -> set[int]:
    """Remote ports of the TCP connections process `pid` holds (from its fds and /proc/net/tcp*)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes:
                ports.add(int(fields[2].rsplit(":", 1)[1], 16))
    return ports


def test_readiness_follows_redis_through_the_agent_and_pid_1_never_connects_to_redis(
    start, tmp_path: Path
) -> None:
    private = RedisServer(str(tmp_path))
    private.start()
    try:
        s = start(private.url, RESQUE_STARTER_CONCURRENCY="1")
        s.wait_workers(1)
        wait_for(lambda: ready(s)["ok"], 5, what="ready")
        client = redis.Redis.from_url(private.url)
        before = client.info("stats")["total_connections_received"]
        for _ in range(30):
            assert ready(s)["redis"] is True
            assert private.port not in tcp_peers(s.pid), "the supervisor holds a connection to Redis"
        after = client.info("stats")["total_connections_received"]
        assert after - before <= 2, f"{after - before} new connections for 30 readiness probes"
        assert private.proc is not None
        os.kill(private.proc.pid, signal.SIGSTOP)
        try:
            wait_for(lambda: ready(s)["redis"] is False, 5, what="not ready while Redis hangs")
        finally:
            os.kill(private.proc.pid, signal.SIGCONT)
        wait_for(lambda: ready(s)["ok"], 5, what="ready again once Redis answers")
        private.stop()
        wait_for(lambda: ready(s)["redis"] is False, 5, what="not ready once Redis is gone")
        private.start()  # on the same port
        wait_for(lambda: ready(s)["ok"], 10, what="ready again once Redis is back")
    finally:
        private.stop()


def test_the_agent_dies_with_its_supervisor_and_the_lease_then_expires(start, conn: redis.Redis) -> None:
    s = start(RESQUE_STARTER_CONCURRENCY="1", RESQUE_STARTER_LEASE_TTL="3")
    s.wait_workers(1)
    agent = int(wait_for(lambda: s.status()["agent"]["pid"], what="the agent"))  # type: ignore[arg-type]
    pod = s.status()["agent"]["pod"]
    wait_for(lambda: conn.zscore(LEASES, pod), what="the lease")
    s.signal(signal.SIGKILL)
    s.proc.wait()
    wait_for(lambda: process_state(agent) in (None, "Z"), 5, what="the agent to die with the supervisor")
    seconds, micros = conn.time()
    expires = conn.zscore(LEASES, pod)
    assert expires is not None and expires <= seconds * 1000 + micros / 1000 + 3000, "nothing refreshes it"


def test_a_graceful_stop_says_what_it_waits_for_and_that_the_drain_ran_out(start, conn: redis.Redis) -> None:
    # SHUTDOWN_GRACE=0: no Shutdown ends the job early (docs/jobs.md), so the drain runs out
    s = start(
        RESQUE_STARTER_CONCURRENCY="1", RESQUE_STARTER_DRAIN_TIMEOUT="7", RESQUE_STARTER_SHUTDOWN_GRACE="0"
    )
    s.wait_workers(1)
    pod = s.status()["agent"]["pod"]
    job = Queue("default", connection=conn).enqueue("testjobs.sleep_then_record", 60)
    wait_for(lambda: conn.llen("testjobs:done:started"), what="the job to start")
    wait_for(lambda: s.status()["workers"][0]["state"] == "busy", what="the worker busy")
    s.signal(signal.SIGTERM)
    assert s.wait_exit(20) == 1
    log = s.log()
    waiting = re.findall(
        r"stopping \(graceful\): waiting for 1 worker\(s\), 1 running job\(s\) \((\S+)\); (\d)s left", log
    )
    assert waiting == [(job.id, "2")], log[-3000:]
    assert (
        f"the drain ran out of time (RESQUE_STARTER_DRAIN_TIMEOUT=7s) with 1 worker(s), 1 running job(s) "
        f"({job.id}): interrupting them" in log
    )
    assert job.get_status(refresh=True) == JobStatus.QUEUED
    assert conn.zscore(LEASES, pod) is None and not conn.exists(lease_key(pod)), "a clean exit releases it"


def test_a_big_pods_workers_reach_its_lease_in_parts(
    redis_url: str, conn: redis.Redis, tmp_path: Path
) -> None:
    """The supervisor sends what the pod holds in parts ("more"); the lease names all of it, once whole."""
    import dataclasses
    import json
    import socket
    import threading

    from resque_starter import config, protocol
    from resque_starter.agent import Agent

    settings = dataclasses.replace(config.Settings(), redis_url=redis_url, run_dir=str(tmp_path))
    ours, theirs = socket.socketpair()
    agent = Agent(settings, theirs, os.getppid(), {"pod": "big-pod", "first": True})
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        held = {f"big-pod.{i}": ["q1", "q2"] for i in range(1500)}
        names = list(held)
        for i in range(0, 1500, 200):
            part = {name: held[name] for name in names[i : i + 200]}
            protocol.send(ours, {"op": "hold", "workers": part, "more": i + 200 < 1500})
            if i == 0:
                time.sleep(1.5)  # a refresh falls between the parts: it must not write half a list
                raw = conn.hget(lease_key("big-pod"), "workers")
                assert raw is None or json.loads(raw) == {}, "a part written before the whole"

        def whole() -> bool:
            raw = conn.hget(lease_key("big-pod"), "workers")
            return raw is not None and json.loads(raw) == held

        wait_for(whole, 5, what="the lease naming all 1500 workers")
        protocol.send(ours, {"op": "release"})
        thread.join(5)
        assert not thread.is_alive() and conn.zscore(LEASES, "big-pod") is None
    finally:
        ours.close()
