"""Run `run_worker` in a real forked process, as the mold does, and read its status events."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import redis

from resque_starter.config import Group, Settings
from resque_starter.protocol import LineBuffer, WorkerSpec
from resque_starter.worker import run_worker

from conftest import wait_for


@dataclass
class WorkerProcess:
    pid: int
    sock: socket.socket
    name: str
    status_fd: int  # the worker's end of the status socket, by its fd number in the worker
    seen: list[dict[str, Any]] = field(default_factory=list)
    horses: set[int] = field(default_factory=set)
    exit_code: int | None = None
    _buffer: LineBuffer = field(default_factory=LineBuffer)
    _pending: deque[dict[str, Any]] = field(default_factory=deque)

    def next_event(self, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while not self._pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no status event within {timeout}s; seen so far: {self.seen}")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            if not data:
                raise AssertionError(f"status socket closed; seen so far: {self.seen}")
            self._pending.extend(self._buffer.feed(data))
        message = self._pending.popleft()
        self.seen.append(message)
        if message.get("event") == "busy" and message.get("horse"):
            self.horses.add(message["horse"])
        return message

    def expect(self, event: str, timeout: float = 10.0) -> dict[str, Any]:
        """The next event must be `event` (events in between are a test failure)."""
        message = self.next_event(timeout)
        assert message.get("event") == event, f"expected {event!r}, got {message}; seen: {self.seen}"
        return message

    def expect_idle(self, done: int, failed: int, requeued: int, outcome: str | None = None,
                    timeout: float = 10.0) -> dict[str, Any]:  # fmt: skip
        """The next event must be `idle` with these job counters; after a job it also says how the job
        ended (`outcome`, when given, must match)."""
        message = self.expect("idle", timeout)
        counters = {k: message[k] for k in ("done", "failed", "requeued")}
        assert counters == {"done": done, "failed": failed, "requeued": requeued}, message
        assert set(message) <= {"event", "done", "failed", "requeued", "ended"}, message
        if outcome is not None:
            assert message["ended"]["outcome"] == outcome, message
        return message

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def poll(self) -> int | None:
        if self.exit_code is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.exit_code = os.waitstatus_to_exitcode(status)
        return self.exit_code

    def wait(self, timeout: float = 10.0) -> int:
        wait_for(lambda: self.poll() is not None, timeout=timeout, what=f"worker {self.pid} to exit")
        assert self.exit_code is not None
        return self.exit_code

    def kill(self) -> None:
        """SIGKILL the worker and any horse it reported, as the supervisor does to a stuck worker."""
        for pid in [self.pid, *filter(leads_own_group, self.horses)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.poll() is None:
            self.wait()
        self.sock.close()


def leads_own_group(pid: int) -> bool:
    """A live horse leads its own process group; a pid reused by something else most likely not."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[2]) == pid
    except (FileNotFoundError, ProcessLookupError):
        return False


# A worker_class parameter of PREFORK means rq.Worker with RESQUE_STARTER_PREFORK_HORSE, so the same
# tests check the plain classes and the pre-forked horse.
PREFORK = "prefork"
EVERY_CLASS = ("rq.Worker", "rq.SimpleWorker", PREFORK)
FORKING_CLASSES = ("rq.Worker", PREFORK)


def make_settings(redis_url: str, queues: tuple[str, ...] = ("default",), **overrides: Any) -> Settings:
    if overrides.get("worker_class") == PREFORK:
        overrides = {**overrides, "worker_class": "rq.Worker", "prefork_horse": True}
    base = replace(
        Settings(),
        redis_url=redis_url,
        queues=queues,
        groups=(Group(queues, 1),),
        job_monitoring_interval=1,
    )
    return replace(base, **overrides)


def fork_worker(settings: Settings, spec: WorkerSpec) -> WorkerProcess:
    parent, child = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the worker process
        try:
            os.setpgrp()  # as a worker's own group: a stray killpg hits the worker, not pytest
            parent.close()
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(
                logging.Formatter(f"[worker {os.getpid()}] %(name)s %(levelname)s %(message)s")
            )
            logging.getLogger().addHandler(handler)
            logging.getLogger().setLevel(logging.INFO)
            run_worker(settings, spec, child)
        finally:
            os._exit(99)
    status_fd = child.fileno()
    child.close()
    return WorkerProcess(pid, parent, spec.name, status_fd)


Start = Callable[..., WorkerProcess]


@contextlib.contextmanager
def worker_processes(redis_url: str) -> Iterator[Start]:
    """A function that forks a worker with make_settings(...) overrides; every one is killed at the end."""
    started: list[WorkerProcess] = []

    def start(queues: tuple[str, ...] = ("default",), spec: Any = None, **overrides: Any) -> WorkerProcess:
        url = overrides.pop("redis_url", redis_url)
        process = fork_worker(make_settings(url, queues, **overrides), spec or new_spec())
        started.append(process)
        return process

    try:
        yield start
    finally:
        for process in started:
            process.kill()


def new_spec(**overrides: Any) -> WorkerSpec:
    fields: dict[str, Any] = {"group": 0, "slot": 0, "generation": 1, "name": f"test-{uuid.uuid4().hex[:10]}"}
    return WorkerSpec(**{**fields, **overrides})


def claim_keys(conn: redis.Redis) -> list[bytes]:
    return list(conn.scan_iter("rq:resque-starter:claim:*"))


def proctitle(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode().strip()
