"""Work-horses forked ahead of time, and reaped after their job, both off the job's path.

The mechanics under RESQUE_STARTER_PREFORK_HORSE (worker.PreforkHorseMixin holds the rq side). With a
big preloaded app, a horse costs milliseconds twice: fork() copies the page tables, and exit unmaps
them. So a worker forks its next horse while it has time; the horse waits on a socket for its job,
and when the job is over says so before it exits, so the worker goes on while the kernel tears the
horse down and a reaper thread collects it.

A horse leads its own process group from its first instruction (the worker sets it too, so no killpg
of the horse can ever hit the worker), and dies with its worker: SIGKILL by PR_SET_PDEATHSIG, or exit
0 when its socket reaches EOF before a job came.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

from resque_starter import orphans

log = logging.getLogger("resque_starter.prefork")

DONE = b"done"
MAX_MESSAGE = 65536  # a job id, an execution id and a queue name; rq does not bound their length

OnStart = Callable[[], None]
OnJob = Callable[[bytes, Callable[[], None]], None]


@dataclass
class Horse:
    """The worker's side of one pre-forked horse: its pid, and the socket its job goes down."""

    pid: int
    sock: socket.socket
    pidfd: int | None = None  # opened when it gets its job, where the kernel has pidfds (Linux 5.3)

    @classmethod
    def fork(cls, on_start: OnStart, on_job: OnJob) -> Horse:
        """Fork a horse. In it: own process group, death with this process, `on_start()`, then wait
        for `hand()` and run `on_job(message, report_done)`. It exits 0 on EOF instead, 1 if a
        callback raises. rq's main_work_horse, which on_job ends in, exits by itself."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the horse
            ours.close()
            _serve(parent, theirs, on_start, on_job)
        theirs.close()
        with contextlib.suppress(OSError):  # the horse may have done it already
            os.setpgid(pid, pid)
        return cls(pid, ours)

    def hand(self, message: bytes) -> None:
        """Send the horse its job. Raises ConnectionError, after reaping it, if it died idle."""
        try:
            self.sock.send(message, socket.MSG_NOSIGNAL)
        except ConnectionError:
            self.close()
            os.waitpid(self.pid, 0)
            raise
        with contextlib.suppress(OSError):
            self.pidfd = os.pidfd_open(self.pid)

    def wait_done(self) -> bool:
        """Block until the horse reports its job done (True: it is exiting, see Reaper) or exits
        without that (False: reap it with wait4 for its status). Without pidfds, False at once. A
        signal handler that raises (rq's monitor timeout) interrupts the wait."""
        if self.pidfd is None:
            return False
        readable, _, _ = select.select([self.sock, self.pidfd], [], [])
        if self.sock not in readable:
            return False
        with contextlib.suppress(OSError):
            return self.sock.recv(MAX_MESSAGE) == DONE
        return False

    def close(self) -> None:
        """Close our side (in the worker, or in any other child of it that inherited it)."""
        self.sock.close()
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None

    def discard(self) -> None:
        """End a horse that got no job (it holds nothing: no job, no claim) and reap it."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        self.close()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)


def _serve(parent: int, sock: socket.socket, on_start: OnStart, on_job: OnJob) -> None:  # pragma: no cover
    code = 1
    try:
        os.setpgrp()
        orphans.die_with_parent(parent)
        on_start()
        message = sock.recv(MAX_MESSAGE)
        if message:

            def report_done() -> None:
                with contextlib.suppress(OSError):
                    sock.send(DONE, socket.MSG_NOSIGNAL)

            on_job(message, report_done)
        code = 0
    except BaseException:
        log.exception("pre-forked horse %d failed", os.getpid())
    finally:
        os._exit(code)


class Reaper:
    """A thread that reaps horses which reported their job done and are still exiting, so no zombie
    stays and the exit is off the next job's path. It only waits for the pids it is given."""

    def __init__(self) -> None:
        self._pids: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="resque-starter-reaper", daemon=True)
        self._thread.start()

    def add(self, pid: int) -> None:
        self._pids.put(pid)

    def close(self) -> None:
        """Reap every horse given so far, then end the thread."""
        self._pids.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (pid := self._pids.get()) is not None:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
