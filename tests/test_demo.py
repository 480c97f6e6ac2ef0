"""The README's first command: `resque-starter demo` with nothing configured.

No REDIS_URL: the supervisor starts its own redis-server on a unix socket in the run dir, the example
app is preloaded, a producer enqueues jobs, and a stop leaves nothing behind: no process, no socket.
"""

from __future__ import annotations

import os
import signal
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
