"""The embedded redis-server used when REDIS_URL is unset: a child on a private unix socket."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time

from resque_starter import redis_ping
from resque_starter.config import ConfigError


class EmbeddedRedis:
    def __init__(self, run_dir: str) -> None:
        self.socket = os.path.join(run_dir, "redis.sock")
        self.run_dir = run_dir
        self.pid = 0

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ConfigError("REDIS_URL", None, "set REDIS_URL, or install redis-server")
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
        # its own process group, so a terminal's Ctrl-C does not take Redis away from draining workers
        log_file = os.path.join(self.run_dir, "redis.log")  # its banner and warnings, out of our log stream
        self.pid = os.posix_spawn(
            binary,
            argv,
            os.environ,
            setpgroup=0,
            file_actions=[(os.POSIX_SPAWN_OPEN, 1, log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)],
        )
        deadline = time.monotonic() + 10
        while not redis_ping.ping(self.url, timeout=1):
            if time.monotonic() > deadline:
                raise ConfigError("REDIS_URL", None, "an embedded redis-server that answers")
            time.sleep(0.02)

    def restart(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)
        self.start()

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
