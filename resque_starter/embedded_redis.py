"""The embedded redis-server used when REDIS_URL is unset: a child on a private unix socket.

At start-up the supervisor waits for it (nothing else runs yet). A restart, later, happens inside
PID 1's loop, which must not block: `spawn` only starts the process, and the loop asks `answers`
(a non-blocking connect to its socket) until it does or `deadline` passes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import time

from resque_starter import rundir
from resque_starter.config import ConfigError

START_TIMEOUT = 10.0  # seconds a (re)started redis-server has to accept connections


class EmbeddedRedis:
    start_timeout = START_TIMEOUT

    def __init__(self, run_dir: str) -> None:
        self.socket = os.path.join(run_dir, "redis.sock")
        self.run_dir = run_dir
        self.pid = 0
        self.deadline: float | None = None  # set while a (re)start waits for it to answer

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def spawn(self) -> None:
        """Start redis-server without waiting for it; OSError (with the reason) if it cannot start."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server is not installed (not on PATH)")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)
        argv = [
            binary,
            "--port",
            "0",
            "--unixsocket",
            self.socket,
            "--unixsocketperm",
            "700",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self.run_dir,
            "--loglevel",
            "warning",
        ]
        # its banner and warnings, out of our log stream; opened by us, never through a planted link
        log_fd = rundir.open_private(os.path.join(self.run_dir, "redis.log"))
        try:
            # its own process group, so a terminal's Ctrl-C does not take Redis away from draining workers
            self.pid = os.posix_spawn(
                binary, argv, os.environ, setpgroup=0, file_actions=[(os.POSIX_SPAWN_DUP2, log_fd, 1)]
            )
        finally:
            os.close(log_fd)
        self.deadline = time.monotonic() + self.start_timeout

    def answers(self) -> bool:
        """Its socket accepts a connection (a connect that cannot block: the server is our child on a
        unix socket, so a listening one takes it into its backlog at once)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.setblocking(False)
            try:
                probe.connect(self.socket)
            except OSError:
                return False
        self.deadline = None
        return True

    def start(self) -> None:
        """Spawn and wait until it answers: at start-up only, before the supervisor's loop runs."""
        try:
            self.spawn()
        except OSError as exc:
            raise ConfigError("REDIS_URL", None, f"set REDIS_URL, or install redis-server ({exc})") from None
        while not self.answers():
            if self.deadline is not None and time.monotonic() > self.deadline:
                raise ConfigError("REDIS_URL", None, "an embedded redis-server that answers")
            time.sleep(0.02)

    def stop(self) -> None:
        """SIGTERM; the caller's final reap collects it."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)


def start(run_dir: str) -> EmbeddedRedis:
    server = EmbeddedRedis(run_dir)
    server.start()
    return server
