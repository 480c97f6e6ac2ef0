"""Work-horses forked ahead of time by a forker process: off the job's path, and off the worker's pages.

The mechanics under RESQUE_STARTER_PREFORK_HORSE (worker.PreforkHorseMixin holds the rq side). A worker
that forks a horse per job pays three times: fork() copies its page tables, the horse's exit drops them
again, and after every fork each page the worker writes is copied once more (copy-on-write: about 900
pages, 3 ms, per job measured with rq's loop). So the worker forks once, when it starts, a *forker*: a
copy of itself that does nothing but fork horses when asked and reap them. The worker never forks again,
so its pages stay its own, and the forker, which writes almost nothing, forks from page tables that
stay as compact as the mold left them (huge pages, see `hugepages`).

Each horse is forked while the previous job runs (or while the worker waits for one) and waits on a
socket whose other end the worker holds; the worker hands it the job there. When the job is over the
horse reports, in one message, before it exits, so the worker goes on while the kernel tears the horse
down. A horse that exits without reporting (killed, crashed) is reaped by the forker, which sends its
wait status on.

A horse leads its own process group from its first instruction, and dies with its forker, the forker with
its worker (PR_SET_PDEATHSIG); a horse still waiting for a job exits 0 when its socket reaches EOF.
"""

from __future__ import annotations

import contextlib
import logging
import marshal
import os
import resource
import select
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from resque_starter import orphans

log = logging.getLogger("resque_starter.prefork")

FORK = b"fork"
MAX_MESSAGE = 65536  # a job id, an execution id and a queue name; rq does not bound their length
# What a horse killed with its forker (PR_SET_PDEATHSIG) reports to wait4: killed by SIGKILL.
KILLED = int(signal.SIGKILL)
# The forker ignores these: sent to a whole process group (a terminal's ^C), they are the worker's.
_FORKER_IGNORES = (
    signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM,
)  # fmt: skip

OnStart = Callable[[], None]
Report = Callable[[bytes], None]
OnJob = Callable[[bytes, Report], None]


class ForkerGone(ConnectionError):
    """The forker died (killed, or out of memory): its horses died with it."""


@dataclass
class Horse:
    """The worker's side of one pre-forked horse: the socket its job goes down, and, once the forker has
    answered (`Forker.ready`), its pid or why it could not be forked."""

    sock: socket.socket
    pid: int = 0
    error: OSError | None = None
    report: bytes | None = None  # its one message back, once read

    def hand(self, message: bytes) -> None:
        """Send the horse its job. Raises ConnectionError if it died waiting."""
        try:
            self.sock.send(message, socket.MSG_NOSIGNAL)
        except ConnectionError:
            self.close()
            raise

    def close(self) -> None:
        """Close our side (in the worker, or in any other child of it that inherited it)."""
        self.sock.close()


@dataclass
class Forker:
    """The worker's side of its forker: ask for horses, learn how they ended."""

    pid: int
    sock: socket.socket
    _exits: dict[int, tuple[int, Any]] = field(default_factory=dict)  # pid -> (wait status, rusage)
    _forgotten: set[int] = field(default_factory=set)  # horses whose exit status nobody will ask for
    _asked: list[Horse] = field(default_factory=list)  # not yet answered, in the order asked for
    gone: bool = False

    @classmethod
    def start(cls, on_ready: OnStart, on_start: OnStart, on_job: OnJob) -> Forker:
        """Fork the forker. In it: death with this process, `on_ready()`, then a horse per request, each
        running `on_start()`, then `on_job(message, report)` once handed a job (see `_serve`)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the forker
            ours.close()
            _run_forker(parent, theirs, on_ready, on_start, on_job)
        theirs.close()
        return cls(pid, ours)

    def spawn(self) -> Horse:
        """Ask for a new horse, without waiting for the fork (`ready` does): the worker goes on with its
        job meanwhile. Raises ForkerGone."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            socket.send_fds(self.sock, [FORK], [theirs.fileno()])
        except OSError as exc:
            ours.close()
            self.gone = True
            raise ForkerGone(f"forker {self.pid} is gone") from exc
        finally:
            theirs.close()
        horse = Horse(ours)
        self._asked.append(horse)
        return horse

    def ready(self, horse: Horse) -> None:
        """Until the horse is forked. Raises OSError if the fork failed, ForkerGone."""
        while not horse.pid and horse.error is None and not self.gone:
            self._receive(block=True)
        if horse.error is None and not horse.pid:
            horse.error = ForkerGone(f"forker {self.pid} is gone")
        if horse.error is not None:
            horse.close()
            raise horse.error

    def wait(self, horse: Horse) -> tuple[bytes | None, int, Any]:
        """Until the horse reports, (its report, 0, None), or ends without that, (None, wait status,
        rusage). A signal handler that raises (rq's monitor timeout) interrupts the wait and loses
        nothing: a second call goes on where the first one stopped, and returns the same report."""
        watched = [horse.sock, self.sock]
        while horse.report is None:
            settled = horse.pid in self._exits or self.gone  # no more news of it from the forker
            readable = select.select(watched, [], [], 0 if settled else None)[0]
            if horse.sock in readable:
                if not self._read_report(horse):
                    watched.remove(horse.sock)  # EOF: it died; its status comes from the forker
                continue
            if settled:
                if horse.pid not in self._exits:
                    return None, KILLED, None
                status, rusage = self._exits.pop(horse.pid)
                return None, status, rusage
            if self.sock in readable:
                self._receive(block=False)
        return horse.report, os.EX_OK, None

    def ended(self, horse: Horse) -> bool:
        """Whether the horse has ended, or could not be forked (a spare lost without a job); reads the
        forker's news first."""
        self._receive(block=False)
        if horse.pid in self._exits or horse.error is not None or self.gone:
            self._exits.pop(horse.pid, None)
            return True
        return False

    def forget(self, pid: int) -> None:
        """Nobody will ask how this horse ends (it reported its job done, or it is being discarded)."""
        if self._exits.pop(pid, None) is None:
            self._forgotten.add(pid)

    def close(self) -> None:
        """Stop the forker (it kills and reaps any horse it still has) and reap it."""
        self.sock.close()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)

    def _read_report(self, horse: Horse) -> bool:
        """Read the horse's report, if it sent one before its socket closed (SIGALRM as in `_receive`)."""
        with _alarm_held():
            report = _recv(horse.sock)
            if report:
                horse.report = report
                self.forget(horse.pid)
        return bool(report)

    def _receive(self, block: bool) -> None:
        """Read the forker's messages: what each fork gave, and how each horse ended. SIGALRM, whose
        handler raises in rq's monitor, waits until a message read is also recorded."""
        with _alarm_held():
            while not self.gone:
                if not (block or select.select([self.sock], [], [], 0)[0]):
                    return
                data = _recv(self.sock)
                if not data:
                    self.gone = True
                    return
                self._record(marshal.loads(data))
                block = False

    def _record(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "forked":
            horse = self._asked.pop(0)
            horse.pid = message[1]
            if horse.sock.fileno() == -1:  # discarded before its fork was answered: it exits on EOF
                self._forgotten.add(horse.pid)
        elif kind == "failed":
            self._asked.pop(0).error = OSError(message[1], os.strerror(message[1]))
        elif message[1] in self._forgotten:
            self._forgotten.discard(message[1])
        else:
            self._exits[message[1]] = (message[2], resource.struct_rusage(message[3]))


@contextlib.contextmanager
def _alarm_held() -> Iterator[None]:
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(MAX_MESSAGE)
    except OSError:
        return b""


# --- in the forker -----------------------------------------------------------------------------------


def _run_forker(  # pragma: no cover - runs in the forker
    parent: int, sock: socket.socket, on_ready: OnStart, on_start: OnStart, on_job: OnJob
) -> None:
    code = 1
    try:
        orphans.die_with_parent(parent)
        for sig in _FORKER_IGNORES:
            signal.signal(sig, signal.SIG_IGN)
        on_ready()
        _Forker(sock, on_start, on_job).serve()
        code = 0
    except BaseException:
        log.exception("horse forker %d failed", os.getpid())
    finally:
        os._exit(code)


class _Forker:  # pragma: no cover - runs in the forker
    """Fork a horse per request, reap them all, report each exit; on EOF, end every horse left and exit.

    After each fork the forker copies every page it writes again, and Python writes every object it
    touches: so its loop touches little (marshal, not pickle; plain try, not contextlib; descriptors, not
    socket objects): about 105 pages per horse instead of 136."""

    def __init__(self, sock: socket.socket, on_start: OnStart, on_job: OnJob) -> None:
        self.sock = sock
        self.on_start = on_start
        self.on_job = on_job
        self.horses: set[int] = set()
        self.wake_read, self.wake_write = os.pipe()
        for fd in (self.wake_read, self.wake_write):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self.wake_write, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)

    def serve(self) -> None:
        while True:
            readable = select.select([self.sock.fileno(), self.wake_read], [], [])[0]
            if self.wake_read in readable:
                try:
                    while os.read(self.wake_read, 512):
                        pass
                except BlockingIOError:
                    pass
                self.reap(os.WNOHANG)
            if self.sock.fileno() in readable:
                try:
                    message, passed, _flags, _address = self.sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(4))
                except ConnectionResetError:  # the worker closed its end with our news unread
                    message, passed = b"", []
                if not message:
                    break
                self.fork(int.from_bytes(passed[0][2][:4], sys.byteorder))
        for pid in self.horses:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.reap(0)

    def fork(self, horse: int) -> None:
        """Fork a horse, its socket to the worker the descriptor `horse`."""
        try:
            pid = os.fork()
        except OSError as exc:  # EAGAIN, ENOMEM: the worker logs it and asks again later
            os.close(horse)
            self.report(("failed", exc.errno))
            return
        if pid == 0:
            self.sock.close()
            signal.set_wakeup_fd(-1)
            os.close(self.wake_read)
            os.close(self.wake_write)
            for sig in (signal.SIGCHLD, *_FORKER_IGNORES):
                signal.signal(sig, signal.SIG_DFL)
            _serve(os.getppid(), socket.socket(fileno=horse), self.on_start, self.on_job)
        os.close(horse)
        try:  # noqa: SIM105 - contextlib would be more pages to copy, see the class
            os.setpgid(pid, pid)
        except OSError:  # the horse may have done it already
            pass
        self.horses.add(pid)
        self.report(("forked", pid))

    def reap(self, options: int) -> None:
        while self.horses:
            try:
                pid, status, rusage = os.wait4(-1, options)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.horses.discard(pid)
            self.report(("exited", pid, status, tuple(rusage)))

    def report(self, message: tuple[Any, ...]) -> None:
        try:  # noqa: SIM105
            self.sock.send(marshal.dumps(message), socket.MSG_NOSIGNAL)
        except OSError:  # the worker is gone: so are we, soon
            pass


def _serve(parent: int, sock: socket.socket, on_start: OnStart, on_job: OnJob) -> None:  # pragma: no cover
    """A horse's whole life: wait for the job, run it, exit 0 (1 if a callback raised; rq's
    main_work_horse, which on_job ends in, exits by itself). Its one report must not be empty."""
    code = 1
    try:
        os.setpgrp()
        orphans.die_with_parent(parent)
        on_start()
        message = sock.recv(MAX_MESSAGE)
        if message:

            def report(news: bytes) -> None:
                with contextlib.suppress(OSError):
                    sock.send(news, socket.MSG_NOSIGNAL)

            on_job(message, report)
        code = 0
    except BaseException:
        log.exception("pre-forked horse %d failed", os.getpid())
    finally:
        os._exit(code)
