"""The idle wait blocks on every queue at once and on the wakeup pipe, and never loses a job."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from resque_starter.worker.idle_wait import IdleWait

QUEUES = ["rq:queue:a", "rq:queue:b", "rq:queue:c"]
CLAIMS = ["claim:a", "claim:b", "claim:c"]


@pytest.fixture
def waiter(conn: redis.Redis, redis_url: str) -> Iterator[tuple[IdleWait, int]]:
    read, write = os.pipe()
    os.set_blocking(read, False)
    client = redis.Redis.from_url(redis_url)
    yield IdleWait(client, read), write
    client.close()
    os.close(read)
    os.close(write)


def _push_later(conn: redis.Redis, delay: float, *pairs: tuple[str, str]) -> threading.Thread:
    def push() -> None:
        time.sleep(delay)  # the producer's timing, not a synchronisation: the waiter must be blocked by then
        with conn.pipeline() as pipe:
            for key, value in pairs:
                pipe.rpush(key, value)
            pipe.execute()

    thread = threading.Thread(target=push)
    thread.start()
    return thread


def _blocked_clients(conn: redis.Redis) -> int:
    return int(conn.info("clients")["blocked_clients"])


@pytest.mark.parametrize("index", [0, 2])
def test_a_job_on_any_queue_wakes_the_wait_at_once(
    conn: redis.Redis, waiter: tuple[IdleWait, int], index: int
) -> None:
    wait, _ = waiter
    pusher = _push_later(conn, 0.3, (QUEUES[index], "job-1"))
    started = time.monotonic()
    won = wait.wait(QUEUES, CLAIMS, timeout=5)
    elapsed = time.monotonic() - started
    pusher.join()
    assert won == (index, "job-1")
    assert elapsed < 1.0, f"woke {elapsed:.3f}s after the wait began (the job came at 0.3s)"
    assert conn.lrange(CLAIMS[index], 0, -1) == [b"job-1"]
    assert all(conn.llen(key) == 0 for key in QUEUES)
    assert _blocked_clients(conn) == 0, "the other queues' waits were not cancelled"


def test_a_signal_ends_the_wait_and_moves_nothing(conn: redis.Redis, waiter: tuple[IdleWait, int]) -> None:
    wait, wake = waiter
    timer = threading.Timer(0.2, os.write, (wake, b"\0"))
    timer.start()
    started = time.monotonic()
    assert wait.wait(QUEUES, CLAIMS, timeout=5) is None
    assert time.monotonic() - started < 1.0
    assert _blocked_clients(conn) == 0
    conn.rpush(QUEUES[1], "later")
    assert all(conn.llen(key) == 0 for key in CLAIMS), "a cancelled wait still took a job"


def test_the_wait_times_out_in_redis(conn: redis.Redis, waiter: tuple[IdleWait, int]) -> None:
    wait, _ = waiter
    started = time.monotonic()
    assert wait.wait(QUEUES, CLAIMS, timeout=1) is None
    assert 0.9 < time.monotonic() - started < 3.0
    assert _blocked_clients(conn) == 0


def test_jobs_on_two_queues_at_once_one_is_taken_the_other_stays_first_in_line(
    conn: redis.Redis, waiter: tuple[IdleWait, int]
) -> None:
    wait, _ = waiter
    # one transaction pushes onto two queues: both BLMOVEs may be served before the first answer is read
    for round_ in range(20):
        conn.delete(*CLAIMS, *QUEUES)
        pusher = _push_later(conn, 0.05, (QUEUES[0], f"a{round_}"), (QUEUES[1], f"b{round_}"))
        won = wait.wait(QUEUES, CLAIMS, timeout=5)
        pusher.join()
        assert won is not None
        index, job_id = won
        other = 1 - index
        assert conn.lrange(CLAIMS[index], 0, -1) == [job_id.encode()]
        assert conn.lrange(CLAIMS[other], 0, -1) == []
        assert conn.lrange(QUEUES[other], 0, -1) == [("b" if other else "a").encode() + str(round_).encode()]
        assert _blocked_clients(conn) == 0


def test_connections_are_reused_across_waits(conn: redis.Redis, waiter: tuple[IdleWait, int]) -> None:
    wait, wake = waiter
    for _ in range(3):
        os.write(wake, b"\0")
        assert wait.wait(QUEUES, CLAIMS, timeout=5) is None
    before = int(conn.info("stats")["total_connections_received"])
    for _ in range(5):
        os.write(wake, b"\0")
        assert wait.wait(QUEUES, CLAIMS, timeout=5) is None
    assert int(conn.info("stats")["total_connections_received"]) == before
