"""Issue 16: nothing is lost when a whole pod dies; a live pod's agent settles a dead one's lease.

Pods are real supervisors, killed for real: SIGKILL of PID 1 of a PID namespace (every worker and
horse dies with it, as in a container kill), at random moments under a stream of jobs.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis
from rq import Queue, Retry
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry

from resque_starter.lease import LEASES, Leases, lease_key
from resque_starter.recovery import CLAIM_PREFIX, REQUEUES_META_KEY, claim_key

from conftest import wait_for
from starter import Starter, base_env, cmdline, descendants

UNSHARE = ("unshare", "--pid", "--fork", "--mount-proc", "--kill-child")
TTL = 3.0
BOUND = TTL + 5  # the promise: a dead pod is settled within its lease TTL + 5 s
QUEUES = ("q1", "q2", "q3")
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare"
)


def pod_env(redis_url: str, run_dir: Path, **env: str) -> dict[str, str]:
    run_dir.mkdir(parents=True, exist_ok=True)
    settings = {
        "RESQUE_STARTER_QUEUES": ",".join(QUEUES),
        "RESQUE_STARTER_CONCURRENCY": "3",
        "RESQUE_STARTER_LEASE_TTL": str(TTL),
        "RESQUE_STARTER_LOG_LEVEL": "INFO",
        **env,
    }
    return base_env(redis_url, str(run_dir), **settings)


def pod_id(s: Starter) -> str:
    return str(wait_for(lambda: (s.try_status() or {}).get("agent", {}).get("pod"), what="the pod id"))


def wait_leased(conn: redis.Redis, s: Starter) -> str:
    """The pod's lease is in Redis and names every worker the pod reports."""
    pod = pod_id(s)

    def leased() -> bool:
        names = {w["name"] for w in (s.try_status() or {"workers": []})["workers"]}
        held = conn.hget(lease_key(pod), "workers")
        return conn.zscore(LEASES, pod) is not None and held is not None and names <= set(_json(held))

    wait_for(leased, 20, what="the pod's lease naming its workers")
    return pod


def _json(raw: bytes | None) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(raw)
    return value


def kill_pod(s: Starter) -> float:
    """SIGKILL of PID 1's parent (unshare --kill-child): the whole PID namespace dies at once."""
    os.kill(s.proc.pid, signal.SIGKILL)
    s.proc.wait()
    killed = time.monotonic()
    wait_for(lambda: not descendants(s.proc.pid), what="the namespace to be gone")
    return killed


def wait_settled(conn: redis.Redis, pod: str, killed: float, bound: float = BOUND) -> float:
    """Until the dead pod's lease is gone (settled and removed); fails past the bound. Seconds taken."""
    wait_for(lambda: conn.zscore(LEASES, pod) is None and not conn.exists(lease_key(pod)), bound + 10,
             what=f"pod {pod} settled")  # fmt: skip
    took = time.monotonic() - killed
    assert took <= bound, f"settled {took:.1f}s after the kill, over the bound of {bound}s"
    return took


def leftovers(conn: redis.Redis) -> dict[str, object]:
    """What must be empty once every pod is settled: claim lists, started registries, intermediate lists."""
    found: dict[str, object] = {}
    claims = [k.decode() for k in conn.scan_iter(f"{CLAIM_PREFIX}*") if conn.llen(k)]
    if claims:
        found["claims"] = claims
    for name in QUEUES:
        queue = Queue(name, connection=conn)
        if started := StartedJobRegistry(name, connection=conn).get_job_ids():
            found[f"started:{name}"] = started
        if conn.llen(queue.intermediate_queue_key):
            found[f"intermediate:{name}"] = conn.lrange(queue.intermediate_queue_key, 0, -1)
    return found


# ---------------------------------------------------------------------------- the rules, exactly


def test_a_fresh_supervisor_settles_a_killed_pod_with_the_rules_of_a_dead_worker(
    starters, redis_url: str, conn: redis.Redis, tmp_path: Path
) -> None:
    """Running jobs requeued at the front and counted, one past MAX_REQUEUES failed naming the pod,
    one with an rq Retry retried; a claim back at the front of its queue in order; the dead pod's rq
    workers gone. The fresh supervisor has no worker, so the queues show where everything went."""
    a = starters(pod_env(redis_url, tmp_path / "a"), prefix=UNSHARE)
    a.wait_workers(3)
    dead = wait_leased(conn, a)
    names = sorted(w["name"] for w in a.status()["workers"])
    q1 = Queue("q1", connection=conn)
    plain = q1.enqueue("testjobs.sleep_then_record", 60)
    spent = q1.enqueue("testjobs.sleep_then_record", 60, meta={REQUEUES_META_KEY: 3})
    retried = q1.enqueue("testjobs.sleep_then_record", 60, meta={REQUEUES_META_KEY: 3}, retry=Retry(max=2))
    wait_for(lambda: conn.llen("testjobs:done:started") == 3, what="three jobs running")
    waiting = q1.enqueue("testjobs.record")
    # a worker killed between claiming ids and recording them holds them in its claim list
    conn.rpush(claim_key(names[0], "q2"), "claimed-1", "claimed-2")
    conn.rpush(Queue("q2", connection=conn).key, "behind")

    killed = kill_pod(a)
    assert conn.zscore(LEASES, dead) is not None, "the lease outlives the pod until it expires"
    b = starters(pod_env(redis_url, tmp_path / "b", RESQUE_STARTER_CONCURRENCY="0"))
    wait_settled(conn, dead, killed)

    assert q1.get_job_ids()[:1] == [plain.id], "requeued at the front, before the job that was waiting"
    assert waiting.id in q1.get_job_ids()
    assert Job.fetch(plain.id, connection=conn).meta[REQUEUES_META_KEY] == 1
    failed = Job.fetch(spent.id, connection=conn)
    assert failed.get_status() == JobStatus.FAILED
    reason = failed.latest_result().exc_string  # type: ignore[union-attr]
    assert f"pod {dead}" in reason and "died" in reason and "max_requeues=3" in reason, reason
    again = Job.fetch(retried.id, connection=conn)
    assert again.get_status() in (JobStatus.QUEUED, JobStatus.SCHEDULED) and again.retries_left == 1
    assert Queue("q2", connection=conn).get_job_ids() == ["claimed-1", "claimed-2", "behind"]
    assert leftovers(conn) == {}
    registered = {w.decode() for w in conn.smembers("rq:workers")}
    assert not registered & set(names), "the dead pod's rq workers are unregistered"
    assert f"settled pod {dead}" in b.log()


def test_a_pod_restarted_in_place_settles_its_predecessor_at_once(
    starters, redis_url: str, conn: redis.Redis, tmp_path: Path
) -> None:
    """Same run dir = the same pod restarted (a container restarted in place): no wait for the TTL."""
    ttl = 30.0
    env = pod_env(redis_url, tmp_path / "run", RESQUE_STARTER_LEASE_TTL=str(ttl))
    a = starters(env, prefix=UNSHARE)
    a.wait_workers(3)
    dead = wait_leased(conn, a)
    job = Queue("q1", connection=conn).enqueue("testjobs.sleep_then_record", 8)
    wait_for(lambda: conn.llen("testjobs:done:started") == 1, what="the job running")
    killed = kill_pod(a)
    b = starters(env, prefix=UNSHARE)
    wait_settled(conn, dead, killed, bound=10)  # well before the old lease's 30 s expire
    assert "ran in this run dir before: settling its lease at once" in b.log()
    wait_for(lambda: conn.llen("testjobs:done") == 1, 40, what="the requeued job to run again")
    # the job records itself before rq marks it finished: wait for rq's word rather than read it once
    wait_for(lambda: job.get_status(refresh=True) == JobStatus.FINISHED, 10, what="the job finished")
    assert conn.lrange("testjobs:done:started", 0, -1) == [job.id.encode()] * 2, "interrupted once, run twice"


def test_workers_take_no_job_before_the_expired_leases_found_at_start_are_settled(
    starters, redis_url: str, conn: redis.Redis, tmp_path: Path
) -> None:
    """A dead pod's job requeued at the front runs before anything queued after it: the new pod's
    workers were paused until its agent had settled every expired lease."""
    a = starters(pod_env(redis_url, tmp_path / "a", RESQUE_STARTER_CONCURRENCY="1"), prefix=UNSHARE)
    a.wait_workers(1)
    dead = wait_leased(conn, a)
    q1 = Queue("q1", connection=conn)
    first = q1.enqueue("testjobs.sleep_then_record", 60, "order")
    wait_for(lambda: conn.llen("testjobs:order:started") == 1, what="the job running")
    later = [q1.enqueue("testjobs.sleep_then_record", 0, "order") for _ in range(3)]
    kill_pod(a)
    # a big dead pod: settling it takes a while, and the new pod's worker is ready long before
    ghosts = {f"ghost-{i}": ["q1"] for i in range(1500)}
    conn.hset(
        lease_key(dead), "workers", json.dumps({**_json(conn.hget(lease_key(dead), "workers")), **ghosts})
    )
    wait_for(lambda: (conn.zscore(LEASES, dead) or float("inf")) < _redis_ms(conn), 10, what="lease expired")
    env = pod_env(redis_url, tmp_path / "b", RESQUE_STARTER_CONCURRENCY="1", RESQUE_STARTER_DRAIN_TIMEOUT="0")
    b = starters(env)
    wait_for(lambda: conn.llen("testjobs:order:started") >= 2, 20, what="the new pod's first job")
    assert conn.lindex("testjobs:order:started", 1) == first.id.encode(), "the dead pod's job ran first"
    b.signal(signal.SIGINT)
    assert later  # queued behind it all along


def _redis_ms(conn: redis.Redis) -> float:
    seconds, micros = conn.time()
    return seconds * 1000 + micros / 1000


def test_racing_takers_take_one_expired_lease_once(redis_url: str, conn: redis.Redis) -> None:
    """Eight takers at once, each on its own connection, on one expired lease: exactly one wins."""
    conn.zadd(LEASES, {"dead-pod": 0})
    conn.hset(lease_key("dead-pod"), mapping={"workers": "{}"})
    barrier = threading.Barrier(8)
    won: list[str] = []

    def take(i: int) -> None:
        leases = Leases(redis.Redis.from_url(redis_url), f"taker-{i}", TTL)
        barrier.wait()
        if leases.take() is not None:
            won.append(f"taker-{i}")

    threads = [threading.Thread(target=take, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1, won
    assert conn.hget(lease_key("dead-pod"), "settler") == won[0].encode()


# ---------------------------------------------------------------------------- kills at random moments


class Stream:
    """Jobs of random length enqueued without pause over several queues, from a thread."""

    def __init__(self, url: str) -> None:
        self.conn = redis.Redis.from_url(url)
        self.jobs: list[Job] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        queues = [Queue(name, connection=self.conn) for name in QUEUES]
        while not self._stop.wait(0.2):
            seconds = random.choice((0, 0, 0.1, 0.3, 1.5))
            self.jobs.append(random.choice(queues).enqueue("testjobs.sleep_then_record", seconds))

    def stop(self) -> list[Job]:
        self._stop.set()
        self._thread.join()
        return self.jobs


def check_every_job(conn: redis.Redis, jobs: list[Job], dead_pods: list[str]) -> None:
    """Every job finished, or failed with a reason naming a dead pod; none ran twice unless a pod died
    under it (each extra run follows a requeue that counted it); nothing left behind."""

    def ended() -> list[str]:
        pending = [
            j.id for j in jobs if j.get_status(refresh=True) not in (JobStatus.FINISHED, JobStatus.FAILED)
        ]
        return [] if pending else ["all ended"]

    wait_for(ended, 120, interval=0.5, what="every job of the stream to end")
    started = Counter(conn.lrange("testjobs:done:started", 0, -1))
    done = Counter(conn.lrange("testjobs:done", 0, -1))
    for job in jobs:
        job.refresh()
        key = job.id.encode()
        assert done[key] <= started[key], f"job {job.id}"
        requeues = int(job.meta.get(REQUEUES_META_KEY, 0))
        assert started[key] <= 1 + requeues, f"job {job.id} started {started[key]} times, requeued {requeues}"
        if job.get_status() == JobStatus.FAILED:
            reason = job.latest_result().exc_string or ""  # type: ignore[union-attr]
            assert any(f"pod {pod}" in reason for pod in dead_pods), reason
    assert leftovers(conn) == {}


@pytest.mark.parametrize("settler", ["fresh", "two-long-running"])
def test_pods_killed_at_random_moments_under_a_stream_of_jobs_lose_nothing(
    starters, redis_url: str, conn: redis.Redis, tmp_path: Path, settler: str
) -> None:
    """Three rounds: a pod (PID 1 of its namespace) takes jobs from a stream and is SIGKILLed at a random
    moment. `fresh`: a new supervisor started after the kill settles it. `two-long-running`: two
    supervisors running all along race to settle it, and one does, once."""
    live: list[Starter] = []
    if settler == "two-long-running":
        live = [
            starters(pod_env(redis_url, tmp_path / f"live{i}", RESQUE_STARTER_CONCURRENCY="1"))
            for i in (1, 2)
        ]
    stream = Stream(redis_url)
    dead_pods: list[str] = []
    try:
        for round_ in range(3):
            a = starters(pod_env(redis_url, tmp_path / f"dead{round_}"), prefix=UNSHARE)
            a.wait_workers(3)
            dead = wait_leased(conn, a)
            time.sleep(random.uniform(0.2, 2.5))  # the random moment of the kill, not a synchronisation
            killed = kill_pod(a)
            dead_pods.append(dead)
            if settler == "fresh":
                fresh = starters(
                    pod_env(redis_url, tmp_path / f"fresh{round_}", RESQUE_STARTER_CONCURRENCY="1")
                )
                live.append(fresh)
            wait_settled(conn, dead, killed)
    finally:
        jobs = stream.stop()
    assert len(jobs) > 50
    check_every_job(conn, jobs, dead_pods)
    logs = "".join(s.log() for s in live)
    for pod in dead_pods:
        assert logs.count(f"settling the jobs of pod {pod} ") == 1, (
            f"pod {pod} settled more or less than once"
        )


# ---------------------------------------------------------------------------- a hung agent


def agent_pid(s: Starter) -> int:
    return int(wait_for(lambda: (s.try_status() or {}).get("agent", {}).get("pid"), what="the agent"))  # type: ignore[arg-type]


def test_a_hung_agent_lets_the_lease_expire_another_pod_settles_it_and_the_agent_is_replaced(
    starters, redis_url: str, conn: redis.Redis, tmp_path: Path
) -> None:
    """The other pod runs no worker: the hung pod's job, requeued, waits for the hung pod's new workers."""
    other = starters(pod_env(redis_url, tmp_path / "other", RESQUE_STARTER_CONCURRENCY="0"))
    wait_leased(conn, other)
    s = starters(pod_env(redis_url, tmp_path / "hung", RESQUE_STARTER_CONCURRENCY="1"))
    s.wait_workers(1)
    pod = wait_leased(conn, s)
    job = Queue("q1", connection=conn).enqueue("testjobs.sleep_then_record", 8)
    wait_for(lambda: [w for w in s.status()["workers"] if w["state"] == "busy"], what="the hung pod's job")
    hung = agent_pid(s)
    assert "resque-starter: agent" in cmdline(hung)
    os.kill(hung, signal.SIGSTOP)
    try:
        wait_for(lambda: f"settled pod {pod}" in other.log(), BOUND + 5, what="the other pod to settle it")
        wait_for(lambda: agent_pid(s) != hung, 10, what="the hung agent replaced")
    finally:
        with contextlib.suppress(ProcessLookupError):  # killed and reaped by its supervisor
            os.kill(hung, signal.SIGCONT)
    assert "hung; replacing it" in s.log()
    wait_for(lambda: f"the lease of pod {pod} expired" in s.log(), 10, what="the pod told of its lost lease")
    new_pod = wait_leased(conn, s)
    assert new_pod != pod, "it goes on under a new lease"
    s.wait_workers(1)
    wait_for(lambda: job.get_status(refresh=True) == JobStatus.FINISHED, 30, what="the job to finish")
    assert conn.lrange("testjobs:done", 0, -1) == [job.id.encode()], "it finished once"
    assert leftovers(conn) == {}
