"""The supervisor's socket-level PING against real redis-servers: TCP, unix socket, password, ACL user."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from resque_starter.redis_ping import ping

from conftest import RedisServer, free_port, wait_for


def test_ping_over_tcp_and_a_closed_port(redis_url: str) -> None:
    assert ping(redis_url, timeout=1)
    assert not ping(f"redis://127.0.0.1:{free_port()}/0", timeout=1)
    assert not ping("http://127.0.0.1/", timeout=1)


@pytest.fixture
def secured(tmp_path: Path):  # type: ignore[no-untyped-def]
    port = free_port()
    sock = tmp_path / "r.sock"
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--unixsocket",
            str(sock),
            "--requirepass",
            "s3cret",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
    )
    wait_for(
        lambda: ping(f"redis://:s3cret@127.0.0.1:{port}/0", timeout=1), what="redis-server with a password"
    )
    yield port, sock
    proc.terminate()
    proc.wait(10)


def test_ping_authenticates_by_password_and_acl_user(secured) -> None:  # type: ignore[no-untyped-def]
    port, sock = secured
    assert ping(f"redis://:s3cret@127.0.0.1:{port}/0", timeout=1)
    assert ping(f"redis://default:s3cret@127.0.0.1:{port}", timeout=1)
    assert ping(f"unix://:s3cret@{sock}", timeout=1)
    assert ping(f"unix://{sock}?password=s3cret", timeout=1)
    assert ping(f"redis://127.0.0.1:{port}/0?username=default&password=s3cret", timeout=1)
    assert not ping(f"redis://127.0.0.1:{port}/0?username=nobody&password=s3cret", timeout=1)
    assert not ping(f"redis://127.0.0.1:{port}/0", timeout=1), "no password: NOAUTH"
    assert not ping(f"redis://:wrong@127.0.0.1:{port}/0", timeout=1)


def test_ping_gives_up_on_a_hung_server_within_its_timeout(tmp_path: Path) -> None:
    server = RedisServer(str(tmp_path))
    server.start()
    assert server.proc is not None
    server.proc.send_signal(19)  # SIGSTOP: connects (the kernel accepts), never answers
    try:
        began = time.monotonic()
        assert not ping(server.url, timeout=0.2)
        assert time.monotonic() - began < 2
    finally:
        server.proc.send_signal(18)
        server.stop()
