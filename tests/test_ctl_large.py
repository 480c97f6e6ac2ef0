"""Large replies on the control socket (issue 17, findings 4 and 8): with 300 workers on long queue names
`ctl status` is ~400 KB, and ctl reads the whole line. Clients that ask for a large reply and never
read it cannot hold PID 1's loop: another client's answer and a TTIN still come within 100 ms. Real
supervisors, one of 300 SimpleWorkers and one with many wide groups, each for the whole module."""

from __future__ import annotations

import json
import select
import signal
import socket
import time
from collections.abc import Iterator

import pytest

from resque_starter import control, listener
from resque_starter.control_server import socket_path

from conftest import RedisServer, wait_for
from starter import Starter, base_env, cmdline, ctl

WORKERS = 300
QUEUES = ",".join(f"q{i}_" + "x" * 60 for i in range(8))  # each worker's row names its queues


@pytest.fixture(scope="module")
def big(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Starter]:
    run_dir = tmp_path_factory.mktemp("large") / "run"
    env = base_env(
        redis_server.url,
        str(run_dir),
        RESQUE_STARTER_CONCURRENCY=str(WORKERS),
        RESQUE_STARTER_WORKER_CLASS="rq.SimpleWorker",
        RESQUE_STARTER_QUEUES=QUEUES,
        RESQUE_STARTER_LOG_LEVEL="WARNING",
    )
    s = Starter(env)
    try:
        s.wait_workers(WORKERS, timeout=240)
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def wide(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Starter]:
    """Two workers, and 63 empty groups of ten 255-character queue names: a ~330 KB status that costs
    the supervisor little to build (no /proc reads, a short reconcile), so timings are the socket's."""
    base = tmp_path_factory.mktemp("wide")
    conf = base / "conf.py"
    names = [[f"g{g}q{q}_".ljust(255, "x") for q in range(10)] for g in range(63)]
    conf.write_text(f"groups = {[('default', 2), *((','.join(n), 0) for n in names)]!r}\n")
    env = base_env(redis_server.url, str(base / "run"), RESQUE_STARTER_LOG_LEVEL="WARNING")
    del env["RESQUE_STARTER_CONCURRENCY"]  # the config file's groups replace it
    s = Starter({**env, "RESQUE_STARTER_CONFIG": str(conf)})
    try:
        s.wait_workers(2)
        yield s
    finally:
        s.stop()


def ask(s: Starter, message: dict[str, object]) -> socket.socket:
    """A client that sends a request and does not read the reply (yet)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(socket_path(s.run_dir))
    sock.sendall(json.dumps(message).encode() + b"\n")
    return sock


def read_all(sock: socket.socket) -> bytes:
    data = b""
    sock.settimeout(10)
    while chunk := sock.recv(1 << 20):
        data += chunk
    return data


def title_size(s: Starter) -> str:
    return cmdline(s.pid).split("workers=")[1].split()[0].split("/")[1]


def answer_time(s: Starter) -> float:
    began = time.monotonic()
    assert control.request(s.run_dir, {"cmd": "health", "check": "live"})["ok"] is True
    return time.monotonic() - began


def ttin_time(s: Starter, size: int) -> float:
    """From TTIN until the loop has handled it (its process title shows the new size)."""
    began = time.monotonic()
    s.signal(signal.SIGTTIN)
    wait_for(lambda: title_size(s) == str(size + 1), 5, 0.002, what="TTIN to be handled")
    took = time.monotonic() - began
    s.signal(signal.SIGTTOU)
    wait_for(lambda: title_size(s) == str(size), 5, what="TTOU to be handled")
    return took


STUCK = 5


def status_time(s: Starter) -> float:
    """One whole `status` exchange: the supervisor builds the document, the client reads and parses it."""
    began = time.monotonic()
    assert control.request(s.run_dir, {"cmd": "status"})["ok"]
    return time.monotonic() - began


def test_clients_that_never_read_do_not_hold_the_loop(wide: Starter) -> None:
    """Each client below asks for the ~330 KB status and never reads it. A server that waits for a
    client to take its reply (it used to, up to 1 s each) needs STUCK x (building the document + 1 s)
    before it answers the probe; ours only builds the STUCK documents and keeps what is unsent. The
    cost of building one is measured first: on a loaded 2-core machine it varies tenfold."""
    one = min(status_time(wide) for _ in range(2))
    began = time.monotonic()
    stuck = [ask(wide, {"cmd": "status"}) for _ in range(STUCK)]
    try:
        for sock in stuck:  # each has its answer started: the server holds the rest, unsent
            assert select.select([sock], [], [], 30)[0], "the server answers"
        answer_time(wide)
        held = time.monotonic() - began
        bound = STUCK * (one + 0.5)
        assert held < bound, f"{held:.2f}s (not {bound:.2f}s) to answer after {STUCK} stuck clients"

        # with the clients still connected and their replies pending, the loop answers at once
        assert min(answer_time(wide) for _ in range(5)) < 0.1
        assert min(ttin_time(wide, 2) for _ in range(3)) < 0.1

        late = read_all(stuck[0])  # a slow reader gets the whole reply
        assert len(late) > 256 * 1024, "larger than the socket buffer: the server had to keep the rest"
        assert late.endswith(b"\n") and len(json.loads(late)["status"]["groups"]) == 64
    finally:
        for sock in stuck:
            sock.close()


def test_status_and_drain_read_a_reply_of_hundreds_of_kilobytes(big: Starter) -> None:
    status = ctl(big.run_dir, "status", "--json")
    assert status.returncode == 0, status.stderr
    assert len(status.stdout) > 256 * 1024, (
        "the reply is larger than the old 64 KB read and the socket buffer"
    )
    assert len(json.loads(status.stdout)["workers"]) == WORKERS
    table = ctl(big.run_dir, "status")
    assert table.returncode == 0 and table.stdout.count("idle") == WORKERS, table.stderr
    drain = ctl(big.run_dir, "drain", "--timeout", "60")
    assert drain.returncode == 0 and drain.stdout.rstrip().endswith("drained: no job is running"), (
        drain.stderr
    )
    assert ctl(big.run_dir, "resume").returncode == 0


def test_a_client_that_never_reads_is_dropped_after_the_client_timeout(big: Starter) -> None:
    sock = ask(big, {"cmd": "status"})
    asked = time.monotonic()
    try:
        poller = select.poll()
        poller.register(sock, select.POLLRDHUP)  # the server's end closed (it never half-closes first here)
        wait_for(
            lambda: poller.poll(0), listener.CLIENT_TIMEOUT + 10, 0.05, what="the server to drop the client"
        )
        assert time.monotonic() - asked >= listener.CLIENT_TIMEOUT - 0.5
        partial = read_all(sock)
        assert partial and not partial.endswith(b"\n"), "the reply was cut off: the server let go of it"
    finally:
        sock.close()
    big.assert_running()
    assert control.request(big.run_dir, {"cmd": "health", "check": "live"})["ok"] is True
