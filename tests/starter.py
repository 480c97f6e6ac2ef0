"""Drive a real `resque-starter` process: start it, signal it, read its status, wait for its exit."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis
from rq import Queue, Worker
from rq.registry import FailedJobRegistry, StartedJobRegistry

from resque_starter import control, procmem
from resque_starter.connection import connect

from conftest import wait_for

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def base_env(redis_url: str | None, run_dir: str, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESQUE_STARTER_") and k != "REDIS_URL"}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(ROOT)])
    env["RESQUE_STARTER_RUN_DIR"] = run_dir
    env["RESQUE_STARTER_CONCURRENCY"] = "2"
    env["RESQUE_STARTER_JOB_MONITORING_INTERVAL"] = "1"
    env["RESQUE_STARTER_LOG_LEVEL"] = "DEBUG"
    env["RESQUE_STARTER_DRAIN_TIMEOUT"] = "10"
    if redis_url is not None:
        env["REDIS_URL"] = redis_url
    env.update(overrides)
    return env


def ctl(
    run_dir: str, *args: str, user: int | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """`resque-starter ctl --run-dir DIR ARGS`, as another uid when asked (setpriv)."""
    prefix = (
        ["setpriv", "--reuid", str(user), "--regid", str(user), "--clear-groups"] if user is not None else []
    )
    argv = [*prefix, sys.executable, "-m", "resque_starter", "ctl", "--run-dir", run_dir, *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESQUE_STARTER_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, cwd="/")


def ok(run_dir: str, *args: str) -> str:
    result = ctl(run_dir, *args)
    assert result.returncode == 0, (
        f"ctl {' '.join(args)}: {result.returncode}\n{result.stdout}{result.stderr}"
    )
    return result.stdout


class Starter:
    """One supervisor process under test, with its log in a file the test can read."""

    def __init__(
        self,
        env: dict[str, str],
        args: tuple[str, ...] = (),
        prefix: tuple[str, ...] = (),
        command: str = "run",
        run_dir: str | None = None,
        module: str = "resque_starter",
        cwd: str = str(ROOT),
        launcher: tuple[str, ...] | None = None,
    ) -> None:
        """`run_dir`: where the supervisor's default run dir will be, when env does not set one;
        `module`: what `python -m` runs (a test's wrapper of the command); `launcher`: the command
        instead of `python -m module` (a console script, as pip installs it), run in `cwd`."""
        self.env = env
        self.run_dir = run_dir or env["RESQUE_STARTER_RUN_DIR"]
        self.log_path = Path(self.run_dir).parent / f"starter-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self._prefix = prefix
        self._inner: int | None = None
        argv = [*prefix, *(launcher or (sys.executable, "-m", module)), command, *args]
        self.proc = subprocess.Popen(argv, env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=cwd)
        self.url = env.get("REDIS_URL") or f"unix://{self.run_dir}/redis.sock"

    @property
    def pid(self) -> int:
        """The supervisor's pid as seen from here: under `unshare` or `tini`, the wrapper's child."""
        if not self._prefix:
            return self.proc.pid
        if self._inner is None:

            def child() -> int | None:
                self.assert_running()
                kids = children(self.proc.pid)
                return kids[0] if kids else None

            self._inner = int(wait_for(child, what="the wrapped supervisor to start"))  # type: ignore[arg-type]
        return self._inner

    def host_pid(self, pid: int) -> int:
        """A pid the supervisor reports as seen from the test: under `unshare` the supervisor and its
        children live in a PID namespace of their own, whose pids are not the test's."""
        if not self._prefix:
            return pid
        for p in descendants(self.proc.pid):
            try:
                with open(f"/proc/{p}/status") as f:
                    for line in f:
                        if line.startswith("NSpid:") and int(line.split()[-1]) == pid:
                            return p
            except OSError:
                continue
        raise AssertionError(f"no process with namespace pid {pid}")

    def connection(self) -> redis.Redis:
        return connect(self.url)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def ctl(self, message: dict[str, Any]) -> dict[str, Any]:
        return control.request(self.run_dir, message)

    def status(self) -> dict[str, Any]:
        return self.ctl({"cmd": "status"})["status"]

    def try_status(self) -> dict[str, Any] | None:
        try:
            return self.status()
        except control.ControlError:
            return None

    def ready_workers(self) -> list[dict[str, Any]]:
        status = self.try_status()
        if status is None:
            return []
        return [w for w in status["workers"] if w["ready"] and w["state"] != "stopping"]

    def wait_workers(self, n: int, timeout: float = 20.0) -> list[dict[str, Any]]:
        """Until exactly n workers are ready, and rq's own registry agrees."""

        def settled() -> list[dict[str, Any]] | None:
            self.assert_running()
            workers = self.ready_workers()
            status = self.try_status()
            if status is None or len(workers) != n or len(status["workers"]) != n:
                return None
            names = {w.name for w in Worker.all(connection=self.connection())}
            return workers if {w["name"] for w in workers} <= names else None

        return wait_for(settled, timeout, what=f"{n} ready workers") or []  # type: ignore[return-value]

    def assert_running(self) -> None:
        code = self.proc.poll()
        if code is not None:
            raise AssertionError(f"resque-starter exited with {code}:\n{self.log()[-4000:]}")

    def wait_exit(self, timeout: float = 30.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"resque-starter did not exit in {timeout}s:\n{self.log()[-4000:]}"
            ) from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, AssertionError):
                os.kill(self.pid, signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                for pid in [self.proc.pid, *descendants(self.proc.pid)]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


def supervised(s: Starter) -> set[int]:
    """The supervisor's children but its agent (agent.py), which every supervisor runs beside its molds
    and workers: what tests of molds and workers compare with the status."""
    status = s.try_status() or {}
    return set(children(s.pid)) - {status.get("agent", {}).get("pid")}


def children(pid: int) -> list[int]:
    return sorted(p for p, ppid in procmem.parents().items() if ppid == pid)


def descendants(pid: int) -> list[int]:
    """Every process whose ancestry leads to pid (from /proc), so tests can see what is left behind."""
    return procmem.descendants([pid])


def process_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def registries(conn: redis.Redis, queue: str = "default") -> dict[str, list[str]]:
    q = Queue(queue, connection=conn)
    return {
        "queued": q.get_job_ids(),
        "started": StartedJobRegistry(queue, connection=conn).get_job_ids(),
        "failed": FailedJobRegistry(queue, connection=conn).get_job_ids(),
    }
