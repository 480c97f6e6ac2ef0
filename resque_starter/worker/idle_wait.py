"""An idle worker's wait: for a job on any of its queues, or for a signal, whichever comes first.

Redis has no blocking move from several lists, and a pop into thin air (BLPOP, BLMPOP) loses the job
when the worker dies before recording it. So an idle worker blocks one `BLMOVE queue -> its claim list`
per queue, each on a connection of its own (the client's pool keeps them for the next wait), and waits
in `select` on all of their sockets together with the worker's signal wakeup pipe:

- the first BLMOVE that returns has moved a job into this worker's claim list: the job is owned the
  reliable way (recovery finds it there if the worker dies now);
- the other waits are cancelled with one pipelined `CLIENT UNBLOCK` on another connection; a job one
  of them moved in that instant is put back at the front of its queue, in order, as every release is;
- a signal (stop, pause, kill) cancels every wait the same way, so an idle worker stops in a few ms.

The cost per idle worker: one connection per queue while it waits, and per queue one BLMOVE per
`timeout` seconds: with the default 5 s and three queues, 0.6 commands a second (a busy worker, which
finds its next job with the claim script, never waits here).
"""

from __future__ import annotations

import contextlib
import os
import select
from collections.abc import Sequence

import redis
from redis.connection import AbstractConnection, Connection

from resque_starter import claims


class IdleWait:
    """Blocks on several queues at once for one worker; one instance per worker process."""

    def __init__(self, client: redis.Redis, wake_fd: int) -> None:
        self._client = client
        self._wake_fd = wake_fd
        self._ids: dict[int, int] = {}  # id(connection) -> its Redis client id, for CLIENT UNBLOCK
        self._spare_made = False

    def wait(
        self, queue_keys: Sequence[str], claim_keys: Sequence[str], timeout: float, watch: Sequence[int] = ()
    ) -> tuple[int, str] | None:
        """Wait up to `timeout` seconds (at least 50 ms) for a job on any queue.

        Returns (index of the queue, job id) for the job moved into `claim_keys[index]`, or None when
        the wait timed out, a signal came (the wakeup pipe is drained; the caller reads its flags), or
        one of the `watch` descriptors became readable (left for the caller to read).
        Redis errors propagate after every connection is given back.
        """
        pool = self._client.connection_pool
        conns: list[Connection] = []
        seconds = f"{max(0.05, timeout):.3f}"
        try:
            for queue_key, claim_key in zip(queue_keys, claim_keys, strict=True):
                conn = pool.get_connection()
                conns.append(conn)
                self._client_id(conn)
                conn.send_command("BLMOVE", queue_key, claim_key, "LEFT", "RIGHT", seconds)
            self._make_spare(pool)
            won, unread = self._first_answer(conns, timeout + 2.0, watch)
        except BaseException:
            for held in conns:  # a half-read reply must not go back to the pool; closing aborts the block
                held.disconnect()
                pool.release(held)
            raise
        raced = self._cancel(conns, unread)
        for held in conns:
            pool.release(held)
        # a job moved in the instant before its wait was cancelled goes back to the front of its queue
        claims.release(self._client, [(claim_keys[i], queue_keys[i]) for i, job_id in raced if job_id])
        return won

    def _make_spare(self, pool: redis.ConnectionPool) -> None:
        """Once: one more connection in the pool than the waits hold, for the cancel (and whatever the
        worker sends next), so the worker's connections are all made at its first wait, not later."""
        if not self._spare_made:
            pool.release(pool.get_connection())
            self._spare_made = True

    def _client_id(self, conn: AbstractConnection) -> int:
        """The connection's Redis client id, asked once per connection (the pool reuses them)."""
        known = self._ids.get(id(conn))
        if known is None or conn.pid != os.getpid():
            conn.send_command("CLIENT", "ID")
            known = self._ids[id(conn)] = int(conn.read_response())
        return known

    def _first_answer(
        self, conns: Sequence[AbstractConnection], limit: float, watch: Sequence[int]
    ) -> tuple[tuple[int, str] | None, list[int]]:
        """Wait for the first job moved, a signal, or every wait timing out: (index, job id) or None,
        and the indexes of the waits not answered yet."""
        socks = {self._fileno(conn): i for i, conn in enumerate(conns)}
        while socks:
            ready, _, _ = select.select([self._wake_fd, *watch, *socks], [], [], limit)
            if not ready or self._wake_fd in ready:
                self._drain_wakeup()
                break
            if any(fd in watch for fd in ready):
                break
            i = socks.pop(ready[0])
            job_id = conns[i].read_response()
            if job_id is not None:
                return (i, _text(job_id)), list(socks.values())
        return None, list(socks.values())

    def _cancel(self, conns: Sequence[AbstractConnection], unread: list[int]) -> list[tuple[int, str | None]]:
        """Unblock the waits still blocked, in one round trip; each then answers once: nil, or the job
        it moved just before."""
        if not unread:
            return []
        with self._client.pipeline(transaction=False) as pipe:
            for i in unread:
                pipe.client_unblock(self._ids[id(conns[i])])
            pipe.execute()
        answers: list[tuple[int, str | None]] = []
        for i in unread:
            reply = conns[i].read_response()
            answers.append((i, None if reply is None else _text(reply)))
        return answers

    @staticmethod
    def _fileno(conn: AbstractConnection) -> int:
        sock = getattr(conn, "_sock", None)
        assert sock is not None, "a connection that sent a command has a socket"
        return sock.fileno()

    def _drain_wakeup(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_fd, 512):
                pass


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
