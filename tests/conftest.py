"""Shared fixtures: a real redis-server per test session on a free port, flushed per test."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(
    predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.02, what: str = ""
) -> object:
    """Poll until predicate() is truthy; fail the test with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


class RedisServer:
    def __init__(self, tmp: str, *extra: str) -> None:
        self.port = free_port()
        self.dir = tmp
        self.extra = extra  # more redis-server options, e.g. "--requirepass", "secret"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (apt-get install -y redis-server)")
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)

        def up() -> bool:
            try:
                return bool(client.ping())
            except redis.AuthenticationError:  # up, and --requirepass is among the extra options
                return True
            except redis.ConnectionError:
                return False

        wait_for(up, what="redis-server to answer")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(str(tmp_path_factory.mktemp("redis")))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def conn(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def run_dir(tmp_path) -> str:  # type: ignore[no-untyped-def]
    path = tmp_path / "run"
    path.mkdir()
    return str(path)


@pytest.fixture
def starters() -> Iterator[Callable[..., Any]]:
    """Starts `starter.Starter(*args, **kwargs)`; stops every one it started when the test ends."""
    from starter import Starter  # starter imports this module: a top-level import would be circular

    started: list[Starter] = []

    def launch(*args: Any, **kwargs: Any) -> Starter:
        started.append(Starter(*args, **kwargs))
        return started[-1]

    yield launch
    for s in started:
        s.stop()


@pytest.fixture
def start(
    starters: Callable[..., Any], redis_url: str, run_dir: str, conn: redis.Redis
) -> Callable[..., Any]:
    """A supervisor on the test's Redis (flushed) and run dir: `start(args=(), **RESQUE_STARTER_env)`."""
    from starter import base_env

    return lambda args=(), **env: starters(base_env(redis_url, run_dir, **env), args)


os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist (`-n N --dist loadgroup`) every container test runs in one worker: they share
    one Docker engine and the image that worker builds once."""
    for item in items:
        if item.get_closest_marker("container"):
            item.add_marker(pytest.mark.xdist_group("container"))
