"""Issue 22: RESQUE_STARTER_AUTOSCALE=MIN:MAX, with real workers and jobs: the first group grows while
jobs wait, never above MAX, shrinks after the cool-down, never below MIN, loses no job; TTIN moves the
window and `ctl scale N` turns it off. The decision itself (hysteresis, memory) unit by unit."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
from rq import Queue
from rq.registry import FailedJobRegistry
from test_job_metrics import sample, scrape

from resque_starter.autoscale import STEP, Autoscaler

from conftest import free_port, wait_for
from starter import ROOT, base_env, ok


@pytest.fixture
def start(starters, redis_url, run_dir, conn):  # type: ignore[no-untyped-def]
    return lambda **env: starters(base_env(redis_url, run_dir, **env))


def test_grows_under_a_backlog_up_to_max_and_shrinks_after_the_cool_down(start, conn) -> None:
    port = free_port()
    s = start(RESQUE_STARTER_CONCURRENCY="1", RESQUE_STARTER_METRICS_PORT=str(port),
              RESQUE_STARTER_AUTOSCALE="1:3", RESQUE_STARTER_AUTOSCALE_WAIT="0.3",
              RESQUE_STARTER_AUTOSCALE_COOLDOWN="3")  # fmt: skip
    s.wait_workers(1)
    assert s.status()["autoscale"] == {"group": "default", "min": 1, "max": 3, "wait": 0.3, "cooldown": 3.0}
    samples = scrape(port)
    assert sample(samples, "resque_starter_autoscale_workers", bound="min") == 1
    assert sample(samples, "resque_starter_autoscale_workers", bound="max") == 3
    jobs = [Queue("default", connection=conn).enqueue("testjobs.sleep_then_record", 1.5) for _ in range(10)]
    sizes: list[int] = []

    def grown() -> bool:
        status = s.status()
        sizes.append(status["groups"][0]["size"])
        return len([w for w in status["workers"] if w["ready"]]) == 3

    wait_for(grown, 30, what="3 workers for the backlog")
    wait_for(
        lambda: all(j.get_status(refresh=True) == "finished" for j in jobs), 60, what="every job to finish"
    )
    assert conn.llen("testjobs:done") == 10, "each job ran once, to the end"
    assert FailedJobRegistry("default", connection=conn).count == 0

    def shrunk() -> bool:
        status = s.status()
        sizes.append(status["groups"][0]["size"])
        return status["groups"][0]["size"] == 1 and len(status["workers"]) == 1

    wait_for(shrunk, 30, what="back to 1 worker after the cool-down")
    assert max(sizes) == 3 and min(sizes) == 1, sizes

    s.signal(signal.SIGTTIN)  # moves the window
    wait_for(lambda: s.status()["autoscale"]["min"] == 2, 10, what="TTIN to move MIN:MAX to 2:4")
    assert s.status()["autoscale"]["max"] == 4
    s.wait_workers(2)
    ok(s.run_dir, "scale", "1")  # a fixed size: autoscale off
    assert s.status()["autoscale"] is None
    s.wait_workers(1)


def test_the_decision_has_hysteresis_bounds_and_a_memory_limit() -> None:
    scaler = Autoscaler(low=1, high=3, wait=1.0, cooldown=10.0)
    yes, no = (lambda n: True), (lambda n: False)
    t = 100.0
    assert scaler.decide(t, 1, oldest_age=5.0, waiting=4, idle=0, fits=yes) == 2
    assert scaler.decide(t + STEP / 2, 2, oldest_age=5.0, waiting=4, idle=0, fits=yes) == 2, (
        "one step a second"
    )
    assert scaler.decide(t + STEP, 2, oldest_age=5.0, waiting=4, idle=0, fits=yes) == 3
    assert scaler.decide(t + 2 * STEP, 3, oldest_age=5.0, waiting=4, idle=0, fits=yes) == 3, "never above MAX"
    assert scaler.decide(t + 3 * STEP, 2, oldest_age=5.0, waiting=4, idle=0, fits=no) == 2, (
        "no memory for one more"
    )
    assert scaler.decide(t + 4 * STEP, 3, oldest_age=0.5, waiting=1, idle=0, fits=yes) == 3, (
        "waiting, not for long"
    )
    # idle with nothing waiting: one fewer only after a whole cool-down, then again after another
    assert scaler.decide(t + 5, 3, None, waiting=0, idle=2, fits=yes) == 3
    assert scaler.decide(t + 14, 3, None, waiting=0, idle=2, fits=yes) == 3
    assert scaler.decide(t + 15, 3, None, waiting=0, idle=2, fits=yes) == 2
    assert scaler.decide(t + 16, 2, None, waiting=0, idle=1, fits=yes) == 2
    # a job waiting again restarts the cool-down
    assert scaler.decide(t + 20, 2, 0.1, waiting=1, idle=1, fits=yes) == 2
    assert scaler.decide(t + 29, 2, None, waiting=0, idle=1, fits=yes) == 2
    assert scaler.decide(t + 39, 2, None, waiting=0, idle=1, fits=yes) == 1
    assert scaler.decide(t + 60, 1, None, waiting=0, idle=1, fits=yes) == 1, "never below MIN"
    # without a recent queue report only the window is enforced
    assert scaler.decide(t + 61, 1, None, waiting=None, idle=0, fits=yes) == 1
    scaler.window(2, 4)
    assert scaler.decide(t + 62, 1, None, waiting=None, idle=0, fits=yes) == 2


@pytest.mark.parametrize("value", ["3", "3:1", "0:0", "a:b", "1:99999"])
def test_a_bad_window_exits_2_with_one_line(run_dir: str, value: str) -> None:
    env = base_env("redis://127.0.0.1:1/0", run_dir, RESQUE_STARTER_AUTOSCALE=value)
    result = subprocess.run([sys.executable, "-m", "resque_starter", "run"], env=env, cwd=str(ROOT),
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert (
        result.returncode == 2 and "RESQUE_STARTER_AUTOSCALE" in result.stderr and "MIN:MAX" in result.stderr
    )
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
