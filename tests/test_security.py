"""Security: secrets stay out of logs and `ctl status`; nothing runs a shell.

That the control socket refuses other users is tested in test_ctl.py (a second uid via setpriv);
that the image runs as non-root, in the container tests.
"""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from rq import Queue
from rq.job import JobStatus

from conftest import RedisServer, wait_for
from starter import ROOT, Starter, base_env, ctl

PASSWORD = "s3cr3t-Pa55w0rd"
# Environment variables whose names say they hold secrets: their values must never be logged.
SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "aws-secret-value-123",
    "DATABASE_PASSWORD": "db-password-value-456",
    "API_TOKEN": "api-token-value-789",
    "RESQUE_STARTER_SECRET_KEY": "starter-secret-value-0",  # not a setting: must not be echoed either
}


@pytest.fixture
def locked_redis(tmp_path: Path) -> Iterator[RedisServer]:
    data = tmp_path / "redis"
    data.mkdir()
    server = RedisServer(str(data), "--requirepass", PASSWORD)
    server.start()
    yield server
    server.stop()


def ctl_output(run_dir: str, *args: str) -> str:
    result = ctl(run_dir, *args)
    return result.stdout + result.stderr


def assert_no_secret(where: str, text: str) -> None:
    for secret in (PASSWORD, *SECRETS.values()):
        assert secret not in text, f"{secret!r} leaked into {where}:\n{text[-3000:]}"


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_the_redis_password_and_secret_environment_never_reach_logs_or_status(
    locked_redis: RedisServer, run_dir: str, fmt: str
) -> None:
    """Every path that logs the URL or the settings: start, reload, a worker's death and its recovery,
    a failing job, a Redis that refuses the password, status and health; at DEBUG."""
    url = f"redis://:{PASSWORD}@127.0.0.1:{locked_redis.port}/0"
    env = base_env(url, run_dir, RESQUE_STARTER_LOG_FORMAT=fmt, **SECRETS)
    s = Starter(env)
    try:
        s.wait_workers(2)
        conn = redis.Redis.from_url(url)
        queue = Queue("default", connection=conn)
        jobs = [queue.enqueue("testjobs.fail"), queue.enqueue("testjobs.sleep_then_record", 30)]

        def running_slow_job() -> int | None:
            return next((w["pid"] for w in s.status()["workers"] if w["job_id"] == jobs[1].id), None)

        os.kill(int(wait_for(running_slow_job, what="the slow job to start")), signal.SIGKILL)  # type: ignore[arg-type]
        wait_for(lambda: jobs[1].get_status(refresh=True) == JobStatus.FAILED, what="recovery to fail it")
        s.signal(signal.SIGHUP)
        wait_for(lambda: s.status()["serving_generation"] == 2, 30, what="the reload")
        s.wait_workers(2)
        outputs = {
            "ctl status": ctl_output(s.run_dir, "status"),
            "ctl status --json": ctl_output(s.run_dir, "status", "--json"),
            "ctl health --ready": ctl_output(s.run_dir, "health", "--ready"),
        }
        assert json.loads(outputs["ctl status --json"])["redis_url"].startswith("redis://:***@")
        assert jobs[0].get_status(refresh=True) == JobStatus.FAILED
        s.signal(signal.SIGQUIT)
        s.wait_exit(30)
    finally:
        s.stop()
    for where, text in outputs.items():
        assert_no_secret(where, text)
    assert_no_secret("the log", s.log())
    assert "***@127.0.0.1" in s.log()


def test_a_wrong_redis_password_is_reported_without_it(locked_redis: RedisServer, run_dir: str) -> None:
    url = f"redis://:wrong-{PASSWORD}@127.0.0.1:{locked_redis.port}/0"
    s = Starter(base_env(url, run_dir, RESQUE_STARTER_CONCURRENCY="1"))
    try:
        wait_for(lambda: "attempt 2" in s.log(), 20, what="two failed connection attempts")
        status = ctl_output(s.run_dir, "status", "--json")
    finally:
        s.stop()
    assert "invalid username-password pair" in s.log() or "WRONGPASS" in s.log() or "AUTH" in s.log()
    assert_no_secret("the log", s.log())
    assert_no_secret("ctl status", status)


@pytest.mark.parametrize(
    "url",
    [
        f"redis://:{PASSWORD}@127.0.0.1:notaport/0",
        f"redis://user:{PASSWORD}@[::1/0",
        f"redis://127.0.0.1:6379/0?password={PASSWORD}&db=zz",
        f"ftp://user:{PASSWORD}@example/",
    ],
)
def test_a_bad_redis_url_is_refused_without_its_password(url: str, tmp_path: Path) -> None:
    env = base_env(url, str(tmp_path / "run"))
    result = subprocess.run(
        [sys.executable, "-m", "resque_starter", "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=str(ROOT),
    )
    assert result.returncode == 2, result.stderr
    assert "REDIS_URL=" in result.stderr and "***" in result.stderr, result.stderr
    assert_no_secret("the error", result.stdout + result.stderr)


SPAWNING = {"system", "popen", "spawnl", "spawnv", "spawnve", "spawnlp", "posix_spawn", "posix_spawnp"}
SPAWNING |= {f"exec{suffix}" for suffix in ("l", "le", "lp", "lpe", "v", "ve", "vp", "vpe")}


def test_nothing_in_the_package_runs_a_shell_or_evaluates_text() -> None:
    """An audit that stays true: job arguments reach no shell because nothing here starts one. The
    processes the package starts are the embedded redis-server and the pod-deletion-cost child (this
    package's own module under sys.executable), each with a fixed argv and no shell; the one text it
    evaluates is the operator's own config file (RESQUE_STARTER_CONFIG, Python by design), run in a
    child with a deadline."""
    found = set()
    for path in sorted((ROOT / "resque_starter").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert "subprocess" not in names and "pty" not in names, f"{path.name} imports {names}"
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in SPAWNING or name in ("eval", "exec"):
                found.add((path.name, name))
            assert not any(k.arg == "shell" for k in node.keywords), f"{path.name}: shell= in a call"
    expected = {("embedded_redis.py", "posix_spawn"), ("deletion_cost.py", "posix_spawn")}
    expected.add(("config_file.py", "exec"))
    assert found == expected, found
