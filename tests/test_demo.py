"""The README's first command: `resque-starter demo` with nothing configured.

No REDIS_URL: the supervisor starts its own redis-server on a unix socket in the run dir, the example
app is preloaded, a producer enqueues jobs, and a stop leaves nothing behind: no process, no socket.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

from conftest import wait_for
from starter import Starter, base_env, cmdline, descendants, process_state


def test_the_demo_runs_jobs_on_an_embedded_redis_and_a_stop_leaves_nothing(
    starters: Callable[..., Starter], run_dir: str
) -> None:
    s = starters(base_env(None, run_dir), command="demo")
    s.wait_workers(2)
    status = wait_for(
        lambda: (st := s.status())["jobs"]["done"] >= 3 and st, 30, what="the demo's jobs to run"
    )
    assert isinstance(status, dict)
    assert status["app"] == ["resque_starter.demo.tasks"]
    assert status["redis_url"] == f"unix://{run_dir}/redis.sock"
    assert "REDIS_URL is not set: started an embedded redis-server" in s.log()
    assert "RESQUE_STARTER_APP is not set" not in s.log(), "the demo sets its app: no warning"
    tree = descendants(s.pid)
    assert [p for p in tree if "redis-server" in cmdline(p)], "the embedded redis-server is our child"
    [producer] = [p for p in tree if "resque-starter: demo producer" in cmdline(p)]
    s.signal(signal.SIGQUIT)
    assert s.wait_exit(30) == 0
    assert [p for p in tree if process_state(p) not in (None, "Z")] == [], "every child is gone"
    assert not Path(run_dir, "redis.sock").exists()
    assert not os.path.exists(os.path.join(run_dir, "control.sock"))
    assert process_state(producer) is None


def test_an_embedded_redis_that_cannot_be_restarted_stops_the_supervisor_saying_so(
    starters: Callable[..., Starter], run_dir: str, tmp_path: Path
) -> None:
    """The embedded redis-server dies and its restart fails (a redis-server on PATH that works once):
    the restart never blocks the loop, the exit line says what failed, and the workers are stopped
    gracefully, not SIGKILLed."""
    real = shutil.which("redis-server")
    assert real is not None
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    flag = tmp_path / "started-once"
    shim = bin_dir / "redis-server"
    shim.write_text(f'#!/bin/sh\n[ -e {flag} ] && {{ sleep 2; exit 1; }}\ntouch {flag}\nexec {real} "$@"\n')
    shim.chmod(0o755)
    env = base_env(None, run_dir, RESQUE_STARTER_CONCURRENCY="1", RESQUE_STARTER_DRAIN_TIMEOUT="5")
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    s = starters(env)
    s.wait_workers(1)
    [server] = [p for p in descendants(s.pid) if "redis-server" in cmdline(p)]
    os.kill(server, signal.SIGKILL)
    wait_for(lambda: "restarting it" in s.log(), what="the restart")
    for _ in range(5):  # while the new one neither answers nor exits, the loop answers at once
        began = time.monotonic()
        s.status()
        assert time.monotonic() - began < 0.5
    assert s.wait_exit(30) == 1
    errors = [line for line in s.log().splitlines() if " ERROR " in line]
    assert any("the embedded redis-server could not be restarted" in line for line in errors), errors
    assert not any("REDIS_URL is not set" in line for line in errors), errors
    assert not re.search(r"worker\[0\] pid \d+ gen 1 exited \(killed by SIGKILL\)", s.log())
    assert re.search(r"worker\[0\] pid \d+ gen 1 exited", s.log())
