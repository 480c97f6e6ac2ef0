"""What makes forked jobs cheaper (issue 8): the mold's heap on huge pages, and work-horses that do
not redo work their worker already did."""

from __future__ import annotations

import json
import platform
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from rq import Queue
from rq.exceptions import StopRequested
from rq.job import Job
from rq.suspension import suspend
from rq.utils import utcformat
from rq.worker import WorkerStatus

from resque_starter import hugepages
from resque_starter.protocol import LineBuffer
from resque_starter.worker import Context, Controls, StarterMixin, build_worker

from starter import ROOT, Starter
from worker_harness import make_settings, new_spec


def _kernel() -> tuple[int, int]:
    major, minor = platform.release().split(".")[:2]
    return int(major), int(minor)


needs_collapse = pytest.mark.skipif(
    not hugepages.thp_allowed() or _kernel() < (6, 1),
    reason="transparent huge pages disabled, or no MADV_COLLAPSE (Linux 6.1)",
)


def anon_huge_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("AnonHugePages:"))


def test_only_aligned_parts_of_private_anonymous_mappings_are_candidates(tmp_path: Path) -> None:
    maps = tmp_path / "maps"
    maps.write_text(
        textwrap.dedent("""\
        00400000-00600000 r-xp 00000000 08:01 1 /usr/bin/python3
        00a01000-01100000 rw-p 00000000 00:00 0 [heap]
        7f0000100000-7f0000900000 rw-p 00000000 00:00 0
        7f0001000000-7f0001400000 rw-s 00000000 00:01 2 /dev/zero (deleted)
        7f0002000000-7f0002100000 rw-p 00000000 00:00 0
        7f0003000000-7f0003400000 ---p 00000000 00:00 0
        7f0004000000-7f0004400000 rw-p 00000000 08:01 3 /usr/lib/libfoo.so
        7ffd00000000-7ffd00400000 rw-p 00000000 00:00 0 [stack]
        """)
    )
    assert hugepages.anonymous_ranges(str(maps)) == [
        (0x00C00000, 0x01000000),  # [heap]: its two whole 2 MiB pages
        (0x7F0000200000, 0x7F0000800000),
    ]


def _build_and_collapse(gather: bool) -> tuple[int, int, int]:
    """In a fresh interpreter: 40 MB of small objects as an app builds them (the list's array grows
    by reallocation on the way), frozen, then collapsed: (bytes collapsed, AnonHugePages, RSS growth)."""
    script = textwrap.dedent(f"""\
        import gc, json
        from resque_starter import hugepages, procmem
        if {gather}:
            hugepages.gather_heap()
        table = [[i, i + 1] for i in range(250_000)]
        gc.freeze()
        before = procmem.read().rss
        collapsed = hugepages.collapse_heap()
        with open("/proc/self/smaps_rollup") as f:
            huge = next(int(l.split()[1]) * 1024 for l in f if l.startswith("AnonHugePages:"))
        print(json.dumps([collapsed, huge, procmem.read().rss - before]))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    collapsed, huge, grown = json.loads(out.stdout)
    return collapsed, huge, grown


@needs_collapse
def test_a_gathered_heap_is_collapsed_into_huge_pages_for_little_memory() -> None:
    """Most of the 40 MB ends up on huge pages, and resident memory grows by at most MAX_MISSING small
    pages per huge page. Without gather_heap, pymalloc's arenas sit among malloc's own mappings in
    runs too short to hold many aligned 2 MiB ranges."""
    collapsed, huge, grown = _build_and_collapse(gather=True)
    assert huge >= collapsed >= 24 * 2**20
    assert grown <= collapsed // hugepages.HUGE * hugepages.MAX_MISSING * hugepages.PAGE
    assert _build_and_collapse(gather=False)[0] < collapsed


@needs_collapse
def test_the_mold_keeps_the_app_on_huge_pages(start: Callable[..., Starter]) -> None:
    s = start(RESQUE_STARTER_APP="bigapp", RESQUE_STARTER_CONCURRENCY="1")
    s.wait_workers(1)
    mold = s.status()["molds"][0]["pid"]
    assert anon_huge_bytes(mold) >= 20 * 2**20  # of bigapp's 40 MB


def _worker(redis_url: str, **settings: Any) -> tuple[StarterMixin, socket.socket]:
    """The worker run_worker builds, in this process (it never runs its loop here), and the supervisor's
    end of its status socket."""
    status, supervisor = socket.socketpair()
    context = Context(
        make_settings(redis_url, **settings), new_spec(), Controls(paused=False), status, ("default",)
    )
    return build_worker(context), supervisor


def test_every_connection_of_a_worker_shares_one_driver_info(redis_url: str) -> None:
    """A horse's first command opens a new connection; it must not read redis-py's metadata again."""
    worker, _ = _worker(redis_url)
    pool = worker.connection.connection_pool
    first, second = pool.make_connection(), pool.make_connection()
    assert first.driver_info is second.driver_info
    assert first.driver_info.lib_version == redis.__version__


def _round_trips(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every request a client of this process sends to Redis (a pipeline's commands go in one)."""
    sent: list[object] = []
    send = redis.connection.AbstractConnection.send_packed_command

    def counted(
        self: redis.connection.AbstractConnection, command: object, check_health: bool = True
    ) -> None:
        sent.append(command)
        send(self, command, check_health)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counted)
    return sent


def test_the_bookkeeping_between_two_jobs_takes_fewer_round_trips(
    redis_url: str, conn: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """rq sends a heartbeat's commands one by one after every job, and sets the worker idle twice
    between two jobs: one round trip each here, and none for the second idle, with rq's outcome."""
    worker, _ = _worker(redis_url)
    worker.register_birth()
    worker.set_state(WorkerStatus.BUSY)
    conn.expire(worker.key, 5)
    sent = _round_trips(monkeypatch)
    worker.heartbeat()
    assert len(sent) == 1
    worker.set_state(WorkerStatus.IDLE)
    worker.set_state(WorkerStatus.IDLE)
    assert len(sent) == 2
    assert conn.ttl(worker.key) > 60
    assert conn.hget(worker.key, "last_heartbeat").decode() == utcformat(worker.last_heartbeat)
    assert conn.hget(worker.key, "state") == b"idle"


def test_a_claim_brings_the_job_in_the_same_round_trip(
    redis_url: str, conn: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claim script returns the job's fields with its id: the job as Job.fetch builds it, without
    the fetch's round trip."""
    queue = Queue("default", connection=conn)
    queued = queue.enqueue("testjobs.length", "four", job_timeout=77, meta={"k": "v"})
    worker, _ = _worker(redis_url)
    worker.register_birth()
    worker.get_redis_server_version()  # asked once per worker, then known
    sent = _round_trips(monkeypatch)
    claimed = worker._claim(block=False)
    assert len(sent) == 1
    assert claimed is not None
    job, from_queue = claimed
    assert from_queue.name == "default"
    assert job.to_dict() == Job.fetch(queued.id, connection=conn).to_dict()
    assert (job.func_name, job.args, job.timeout, job.meta) == ("testjobs.length", ("four",), 77, {"k": "v"})


def test_the_end_of_a_job_is_one_round_trip(
    redis_url: str, conn: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """rq's worker ends a job by setting itself idle, and its loop heartbeats and checks for `rq suspend`
    next; the idle event reports the job counters: one request for all, none for what the loop does next,
    and a suspension found then is rq's to handle."""
    worker, supervisor = _worker(redis_url, worker_class="rq.SimpleWorker")
    worker.register_birth()
    worker.get_redis_server_version()
    Queue("default", connection=conn).enqueue("testjobs.length", "four")
    claimed = worker._claim(block=False)
    assert claimed is not None
    sent = _round_trips(monkeypatch)
    worker.execute_job(*claimed)
    last = b"".join(sent[-1])  # type: ignore[arg-type]
    for command in (b"state\r\n$4\r\nidle", b"last_heartbeat", b"EXPIRE", b"HMGET", b"EXISTS"):
        assert command in last
    requests = len(sent)
    worker.heartbeat()  # what rq's loop calls after each job, then at the top of the next turn
    worker.check_for_suspension(burst=False)
    assert len(sent) == requests
    assert conn.hget(worker.key, "state") == b"idle"
    assert conn.ttl(worker.key) > 60
    events = LineBuffer().feed(supervisor.recv(65536))
    assert {k: events[-1][k] for k in ("event", "done", "failed", "requeued")} == {
        "event": "idle",
        "done": 1,
        "failed": 0,
        "requeued": 0,
    }
    assert events[-1]["ended"]["outcome"] == "finished"
    suspend(conn)
    Queue("default", connection=conn).enqueue("testjobs.length", "five")
    claimed = worker._claim(block=False)
    assert claimed is not None
    worker.execute_job(*claimed)
    with pytest.raises(StopRequested):  # rq's way in burst mode: a suspended worker stops
        worker.check_for_suspension(burst=True)
