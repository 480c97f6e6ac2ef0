"""Hostile input: whatever reaches the control socket or the start-up configuration, the answer is a
clear error, never a traceback and never a dead supervisor.

The control socket's fixed malformed examples are in test_ctl.py; here hypothesis generates them
against one running supervisor. The config loader's own property tests are in test_config.py; here
the real command is started on bad paths and must exit 2 or 3 with one line.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from resque_starter.config import MAX_GROUP_SIZE as MAX_SCALE
from resque_starter.protocol import MAX_LINE

from conftest import RedisServer
from starter import ROOT, TESTS, Starter, base_env

HYPOTHESIS = settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
# Every command except those that end or restart the supervisor under test (stop, reload: their
# argument handling is the same dispatch), and made-up ones.
COMMANDS = st.sampled_from(["status", "health", "scale", "pause", "resume", "drain", "kill-jobs"]) | JSON


@pytest.fixture(scope="module")
def supervisor(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Starter]:
    run_dir = tmp_path_factory.mktemp("hostile") / "run"
    s = Starter(base_env(redis_server.url, str(run_dir), RESQUE_STARTER_CONCURRENCY="1"))
    s.wait_workers(1)
    yield s
    s.stop()


def exchange(s: Starter, payload: bytes, half_close: bool = True) -> bytes:
    """Send raw bytes on the control socket (then half-close, as a client that is done would); read to EOF."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(os.path.join(s.run_dir, "control.sock"))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(payload)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        data = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                data += chunk
    return data


def assert_one_reply(s: Starter, data: bytes, payload: bytes) -> dict[str, Any]:
    """One JSON line: a valid reply, or an error; and the supervisor lives on, without a traceback."""
    assert data.endswith(b"\n") and data.count(b"\n") == 1, (payload[:200], data[:200])
    reply = json.loads(data)
    assert isinstance(reply, dict) and isinstance(reply.get("ok"), bool), reply
    if not reply["ok"]:
        assert isinstance(reply.get("error"), str) or reply.get("live") is False, reply
    s.assert_running()
    assert "Traceback" not in s.log(), s.log()[-3000:]
    return reply


def restore(s: Starter) -> None:
    """Undo what a valid command may have changed, so every example starts alike."""
    assert s.ctl({"cmd": "resume"})["ok"]
    assert s.ctl({"cmd": "scale", "n": "1"})["ok"]


@HYPOTHESIS
@given(payload=st.binary(max_size=4096), newline=st.booleans())
def test_any_bytes_get_one_reply(supervisor: Starter, payload: bytes, newline: bool) -> None:
    data = payload + (b"\n" if newline else b"")
    assume(data and b"\n" not in data[:-1])  # one request; a client that says nothing is just closed
    reply = assert_one_reply(supervisor, exchange(supervisor, data), data)
    assert reply["ok"] is False


@HYPOTHESIS
@given(value=JSON)
def test_any_json_value_gets_one_reply(supervisor: Starter, value: object) -> None:
    data = json.dumps(value).encode() + b"\n"
    assert_one_reply(supervisor, exchange(supervisor, data), data)
    restore(supervisor)


@HYPOTHESIS
@given(
    cmd=COMMANDS,
    fields=st.dictionaries(st.sampled_from(["n", "group", "check", "quick", "timeout", "cmd2"]), JSON),
)
def test_commands_with_arguments_of_any_type_get_one_reply(
    supervisor: Starter, cmd: object, fields: dict[str, object]
) -> None:
    request = {"cmd": cmd, **fields}
    data = json.dumps(request).encode() + b"\n"
    reply = assert_one_reply(supervisor, exchange(supervisor, data), data)
    if cmd == "scale" and reply["ok"]:
        assert 0 <= reply["size"] <= MAX_SCALE
    restore(supervisor)


@HYPOTHESIS
@given(n=st.integers(min_value=MAX_SCALE + 1) | st.integers(max_value=-2), sign=st.sampled_from(["", "+"]))
def test_scale_out_of_range_is_refused(supervisor: Starter, n: int, sign: str) -> None:
    text = f"{sign}{n}" if n >= 0 else str(n)
    reply = supervisor.ctl({"cmd": "scale", "n": text})
    assert reply["ok"] is False and "would make" in reply["error"], reply
    assert supervisor.status()["groups"][0]["size"] == 1


@HYPOTHESIS
@given(request=st.dictionaries(st.text(max_size=8), JSON, min_size=1).map(json.dumps), cut=st.integers(1))
def test_a_truncated_request_gets_an_error(supervisor: Starter, request: str, cut: int) -> None:
    data = request.encode()[: max(1, cut % len(request.encode()))]
    reply = assert_one_reply(supervisor, exchange(supervisor, data), data)
    assert reply == {"ok": False, "error": "bad request: end of stream before a newline"}


@pytest.mark.parametrize(
    "payload",
    [
        b"[" * 40_000 + b"]" * 40_000 + b"\n",  # deeper than the JSON decoder's recursion limit
        b'{"a":' * 20_000 + b"1" + b"}" * 20_000 + b"\n",
        b"\n" * 200_000,  # many empty lines: only the first is ever parsed
        b"x" * (4 * MAX_LINE),  # oversized, no newline
        b"x" * (4 * MAX_LINE) + b"\n",
        json.dumps({"cmd": "status", "pad": "y" * (2 * MAX_LINE)}).encode() + b"\n",
    ],
    ids=["deep-array", "deep-object", "newlines", "oversized", "oversized-line", "padded-status"],
)
def test_pathological_requests_get_an_error_and_cost_little(supervisor: Starter, payload: bytes) -> None:
    reply = assert_one_reply(supervisor, exchange(supervisor, payload), payload)
    assert reply["ok"] is False
    assert supervisor.ctl({"cmd": "health", "check": "live"})["ok"]


def test_many_pathological_clients_at_once_do_not_stop_the_loop(supervisor: Starter) -> None:
    """Forty clients each sending a chunk of newlines, more than the server holds (it drops the oldest,
    maybe one whose read is due in the same wakeup): the loop must still answer a probe quickly."""
    path = os.path.join(supervisor.run_dir, "control.sock")
    for _ in range(10):
        socks = []
        try:
            for _ in range(40):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(path)
                sock.sendall(b"\n" * 65536)
                socks.append(sock)
            assert supervisor.ctl({"cmd": "health", "check": "live"})["ok"] is True
        finally:
            for sock in socks:
                sock.close()
    supervisor.assert_running()
    assert "Traceback" not in supervisor.log()


# ------------------------------------------------------------------------------------------- start-up


NO_DAC_OVERRIDE = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search")


def run_starter(tmp_path: Path, redis_url: str, prefix: tuple[str, ...] = (), **env: str) -> tuple[int, str]:
    """Start the real command (under `prefix`); its exit status and combined output."""
    environ = base_env(redis_url, str(tmp_path / "run"), **env)
    environ["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(TESTS), str(ROOT)])
    proc = subprocess.run(
        [*prefix, sys.executable, "-m", "resque_starter", "run"],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(tmp_path),
    )
    return proc.returncode, proc.stdout + proc.stderr


def errors(output: str) -> list[str]:
    """The lines that explain the failure: `resque-starter: ...` from the loader, ERROR records after."""
    return [line for line in output.splitlines() if line.startswith("resque-starter:") or " ERROR " in line]


@pytest.mark.parametrize(
    ("setup", "env", "code", "says"),
    [
        (None, {"RESQUE_STARTER_CONFIG": "{tmp}/missing.py"}, 2, "RESQUE_STARTER_CONFIG='{tmp}/missing.py'"),
        ("dir:conf", {"RESQUE_STARTER_CONFIG": "{tmp}/conf"}, 2, "RESQUE_STARTER_CONFIG='{tmp}/conf'"),
        ("file:conf.py:x = (\n", {"RESQUE_STARTER_CONFIG": "{tmp}/conf.py"}, 2, "SyntaxError at line 1"),
        (None, {"RESQUE_STARTER_APP": "no_such_app"}, 2, "RESQUE_STARTER_APP='no_such_app'"),
        (
            "dir:appdir",
            {"RESQUE_STARTER_APP": "appdir"},
            2,
            "{tmp}/appdir is a directory without __init__.py",
        ),
        ("file:badapp.py:def f(:\n", {"RESQUE_STARTER_APP": "badapp"}, 3, "SyntaxError"),
        (None, {"RESQUE_STARTER_APP": "{tmp}/x.py"}, 2, "RESQUE_STARTER_APP='{tmp}/x.py'"),
        ("file:afile:", {"RESQUE_STARTER_RUN_DIR": "{tmp}/afile"}, 2, "RESQUE_STARTER_RUN_DIR='{tmp}/afile'"),
        ("file:afile:", {"RESQUE_STARTER_RUN_DIR": "{tmp}/afile/run"}, 2, "RESQUE_STARTER_RUN_DIR="),
        (
            None,
            {"RESQUE_STARTER_PID_FILE": "{tmp}/no/dir/pid"},
            2,
            "RESQUE_STARTER_PID_FILE='{tmp}/no/dir/pid'",
        ),
        (
            "dir:piddir",
            {"RESQUE_STARTER_PID_FILE": "{tmp}/piddir"},
            2,
            "RESQUE_STARTER_PID_FILE='{tmp}/piddir'",
        ),
    ],
    ids=[
        "config-missing",
        "config-is-dir",
        "config-syntax",
        "app-missing",
        "app-is-dir",
        "app-syntax",
        "app-is-a-path",
        "run-dir-is-a-file",
        "run-dir-under-a-file",
        "pid-file-dir-missing",
        "pid-file-is-a-dir",
    ],
)
def test_bad_paths_exit_2_or_3_with_one_line(
    tmp_path: Path, redis_url: str, setup: str | None, env: dict[str, str], code: int, says: str
) -> None:
    tmp = str(tmp_path)
    if setup is not None:
        kind, name, *text = setup.split(":", 2)
        if kind == "dir":
            (tmp_path / name).mkdir()
        else:
            (tmp_path / name).write_text(text[0])
    env = {k: v.format(tmp=tmp) for k, v in env.items()}
    exit_code, output = run_starter(tmp_path, redis_url, **env)
    assert exit_code == code, output
    *traceback, line = errors(output)
    assert says.format(tmp=tmp) in line, output
    if code == 3:  # the application's own traceback, logged once by the mold, then the one line
        assert output.count("Traceback") == 1 and len(traceback) == 1, output
    else:
        assert not traceback and "Traceback" not in output, output
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == [], "no temporary left"


@pytest.mark.parametrize(
    ("variable", "path"),
    [("RESQUE_STARTER_RUN_DIR", "{locked}/run"), ("RESQUE_STARTER_PID_FILE", "{locked}/starter.pid")],
)
def test_a_path_that_is_not_writable_exits_2_naming_it(
    tmp_path: Path, redis_url: str, variable: str, path: str
) -> None:
    """Without CAP_DAC_OVERRIDE mode bits bind even root, as they bind the image's non-root user."""
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    target = path.format(locked=locked)
    exit_code, output = run_starter(tmp_path, redis_url, prefix=NO_DAC_OVERRIDE, **{variable: target})
    assert exit_code == 2, output
    (line,) = errors(output)
    assert f"{variable}='{target}' is not allowed" in line and "Permission denied" in line, line
    assert "Traceback" not in output
