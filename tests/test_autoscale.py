"""Issue 22: RESQUE_STARTER_AUTOSCALE=MIN:MAX, with real workers and jobs: the first group grows while
jobs wait, never above MAX, shrinks after the cool-down, never below MIN, loses no job; TTIN moves the
window and `ctl scale N` turns it off; a MIN:MAX size in GROUPS autoscales any group. In a real cgroup,
growth stops at the memory limit and at a busy CPU quota, saying so. The decision itself (hysteresis,
bounds, room) unit by unit."""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest
from rq import Queue
from rq.registry import FailedJobRegistry
from test_job_metrics import sample, scrape
from test_queue_gauges import scale

from resque_starter.autoscale import CPU_BUSY, CPU_WINDOW, STEP, Autoscaler, CpuLoad
from resque_starter.config import Group, Settings
from resque_starter.supervisor.state import autoscalers

from conftest import free_port, wait_for
from starter import ROOT, base_env, ok

if TYPE_CHECKING:
    from cgroup_sandbox import Sandbox

pytest_plugins = ["cgroup_sandbox"]  # the `cgroup` fixture: a real cgroup of the test's own


@pytest.fixture
def start(starters, redis_url, run_dir, conn):  # type: ignore[no-untyped-def]
    return lambda **env: starters(base_env(redis_url, run_dir, **env))


def test_grows_under_a_backlog_up_to_max_and_shrinks_after_the_cool_down(start, conn) -> None:
    port = free_port()
    s = start(RESQUE_STARTER_CONCURRENCY="1", RESQUE_STARTER_METRICS_PORT=str(port),
              RESQUE_STARTER_AUTOSCALE="1:3", RESQUE_STARTER_AUTOSCALE_WAIT="0.3",
              RESQUE_STARTER_AUTOSCALE_COOLDOWN="3")  # fmt: skip
    s.wait_workers(1)
    window = {"min": 1, "max": 3, "wait": 0.3, "cooldown": 3.0, "held": None}
    assert s.status()["groups"][0]["autoscale"] == window
    # KEDA's /scale counts what the pod can grow to: pods are added only for what MAX cannot take
    wait_for(lambda: scale(port) == (200, {"desired_pods": 0, "waiting": 0, "running": 0,
                                           "capacity_per_pod": 3, "queues": ["default"]}), 15)  # fmt: skip
    samples = scrape(port)
    assert sample(samples, "resque_starter_autoscale_workers", group="default", bound="min") == 1
    assert sample(samples, "resque_starter_autoscale_workers", group="default", bound="max") == 3
    assert sample(samples, "resque_starter_autoscale_held", group="default", reason="memory") == 0
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
    wait_for(lambda: autoscale_of(s)["min"] == 2, 10, what="TTIN to move MIN:MAX to 2:4")
    assert autoscale_of(s)["max"] == 4
    s.wait_workers(2)
    assert "default=2 (autoscale 2:4)" in ok(s.run_dir, "status")
    ok(s.run_dir, "scale", "1")  # a fixed size: autoscale off
    assert autoscale_of(s) is None
    s.wait_workers(1)


def autoscale_of(s, group: int = 0):  # type: ignore[no-untyped-def]
    return s.status()["groups"][group]["autoscale"]


def test_a_min_max_size_in_groups_autoscales_that_group(start, conn) -> None:
    s = start(RESQUE_STARTER_GROUPS="fixed=1; bulk=0:2", RESQUE_STARTER_CONCURRENCY="",
              RESQUE_STARTER_AUTOSCALE_WAIT="0.2", RESQUE_STARTER_AUTOSCALE_COOLDOWN="2")  # fmt: skip
    s.wait_workers(1)
    assert autoscale_of(s, 0) is None and autoscale_of(s, 1)["min"] == 0, s.status()["groups"]
    jobs = [Queue("bulk", connection=conn).enqueue("testjobs.sleep_then_record", 1.0) for _ in range(6)]
    wait_for(lambda: s.status()["groups"][1]["size"] == 2, 30, what="the bulk group to grow to its MAX")
    wait_for(lambda: autoscale_of(s, 1)["held"] == "max", 30, what="growth held at MAX while jobs wait")
    wait_for(lambda: all(j.get_status(refresh=True) == "finished" for j in jobs), 60, what="every job")
    wait_for(lambda: s.status()["groups"][1]["size"] == 0, 30, what="bulk back to 0 after the cool-down")
    assert s.status()["groups"][0]["size"] == 1, "the fixed group keeps its size"
    assert conn.llen("testjobs:done") == 6
    # `ctl scale GROUP +N` moves that group's window
    assert ok(s.run_dir, "scale", "bulk", "+1").strip() == "group bulk: autoscale 1:3 worker(s)"
    assert autoscale_of(s, 1)["min"] == 1 and autoscale_of(s, 1)["max"] == 3
    s.wait_workers(2)


def test_a_paused_group_does_not_grow_for_the_jobs_it_keeps_waiting(start, conn) -> None:
    s = start(RESQUE_STARTER_GROUPS="a=1; b=1:3", RESQUE_STARTER_CONCURRENCY="",
              RESQUE_STARTER_AUTOSCALE_WAIT="0.2")  # fmt: skip
    s.wait_workers(2)
    ok(s.run_dir, "pause", "b")
    Queue("b", connection=conn).enqueue("testjobs.record")

    def waited_long() -> bool:  # long enough for an open group to have grown twice
        rows = s.status()["queues"] or {}
        return (rows.get("b", {}).get("oldest_age") or 0) > 0.2 + 3 * STEP

    wait_for(waited_long, 15, what="the paused group's job to wait")
    assert s.status()["groups"][1]["size"] == 1, "a paused group's waiting jobs are no backlog"
    ok(s.run_dir, "resume", "b")
    wait_for(lambda: conn.llen("testjobs:done") == 1, 10, what="the job, once resumed")


def in_cgroup(starters, redis_url, run_dir, box: Sandbox, **env: str):  # type: ignore[no-untyped-def]
    """A supervisor started inside `box` (tests/in_cgroup.py), autoscaling 1:12 from one worker."""
    env = base_env(redis_url, run_dir, IN_CGROUP=box.procs, RESQUE_STARTER_CONCURRENCY="1",
                   RESQUE_STARTER_AUTOSCALE="1:12", RESQUE_STARTER_AUTOSCALE_WAIT="0.2", **env)  # fmt: skip
    return starters(env, module="in_cgroup")


def watch_growth(s, held: str, sizes: list[int]) -> None:  # type: ignore[no-untyped-def]
    def holding() -> bool:
        group = s.status()["groups"][0]
        sizes.append(group["size"])
        return bool(group["autoscale"]["held"] == held)

    wait_for(holding, 60, what=f"growth held by {held} while jobs wait")


def test_growth_stops_below_the_cgroups_memory_limit(cgroup, starters, redis_url, run_dir, conn) -> None:
    """Jobs of 48 MB each wait; the group grows while one more worker (measured: the most a worker held
    with its horse) fits under the limit the kernel enforces, then holds, and no process is OOM-killed."""
    port = free_port()
    s = in_cgroup(starters, redis_url, run_dir, cgroup, RESQUE_STARTER_METRICS_PORT=str(port))
    s.wait_workers(1)
    # one such job first: the supervisor remembers what a worker held (10 minutes), so the burst's first
    # steps know a job's cost before their own horses allocate; and the pod is whole (agent and all)
    warm = Queue("default", connection=conn).enqueue("testjobs.hold", 48, 2.0)
    wait_for(lambda: warm.get_status(refresh=True) == "finished", 30, what="the warm-up job")
    conn.delete("testjobs:done")
    cgroup.limit_memory(cgroup.memory_used() + (220 << 20))  # room for a few such workers, not 12
    jobs = [Queue("default", connection=conn).enqueue("testjobs.hold", 48, 2.0) for _ in range(12)]
    sizes: list[int] = []
    watch_growth(s, "memory", sizes)
    assert 2 <= max(sizes) < 12, sizes

    def capacity_is_the_size_while_held() -> bool:
        size = s.status()["groups"][0]["size"]
        return scale(port)[1]["capacity_per_pod"] == size and autoscale_of(s)["held"] == "memory"

    wait_for(capacity_is_the_size_while_held, 10, what="/scale to count only the workers that fit")
    ended = ("finished", "failed", "stopped", "canceled")
    wait_for(lambda: all(j.get_status(refresh=True) in ended for j in jobs), 90, what="every job to end")
    how = f"sizes {sizes}, OOM kills {cgroup.oom_kills()}, statuses {[j.get_status() for j in jobs]}"
    assert cgroup.oom_kills() == 0, f"grew past what the memory limit holds: {how}\n{s.log()[-3000:]}"
    assert conn.llen("testjobs:done") == 12 and FailedJobRegistry("default", connection=conn).count == 0, how


def test_growth_stops_while_the_cpu_quota_is_used_up(cgroup, starters, redis_url, run_dir, conn) -> None:
    """Jobs that burn CPU under a quota of a fifth of a CPU: more workers would only wait for the CPU, so the
    group stops growing once the last second's CPU shows the quota used up (the steps taken before it
    was measured: 1 -> 2, maybe 2 -> 4), far below MAX, and says why."""
    s = in_cgroup(starters, redis_url, run_dir, cgroup)
    s.wait_workers(1)
    cgroup.limit_cpu(0.2)  # read at each sample (a running pod can be resized); less than a busy host gives
    jobs = [Queue("default", connection=conn).enqueue("testjobs.burn", 1.0) for _ in range(10)]
    sizes: list[int] = []
    watch_growth(s, "cpu", sizes)
    assert max(sizes) <= 4, sizes
    wait_for(lambda: all(j.get_status(refresh=True) == "finished" for j in jobs), 90, what="every job")
    assert conn.llen("testjobs:done") == 10


def test_the_decision_has_hysteresis_bounds_and_room() -> None:
    scaler = Autoscaler(low=1, high=3, wait=1.0, cooldown=10.0)
    yes, no = (lambda n: None), (lambda n: "memory")
    t = 100.0
    assert scaler.decide(t, 1, oldest_age=5.0, waiting=4, idle=0, room=yes) == 2
    assert scaler.decide(t + STEP / 2, 2, oldest_age=5.0, waiting=4, idle=0, room=yes) == 2, (
        "one step a second"
    )
    assert scaler.decide(t + STEP, 2, oldest_age=5.0, waiting=4, idle=0, room=yes) == 3
    assert scaler.decide(t + 2 * STEP, 3, oldest_age=5.0, waiting=4, idle=0, room=yes) == 3, "never above MAX"
    assert scaler.held == "max"
    assert scaler.decide(t + 3 * STEP, 2, oldest_age=5.0, waiting=4, idle=0, room=no) == 2, (
        "no memory for one more"
    )
    assert scaler.held == "memory"
    assert scaler.decide(t + 4 * STEP, 3, oldest_age=0.5, waiting=1, idle=0, room=yes) == 3, (
        "waiting, not for long"
    )
    assert scaler.held is None, "nothing holds growth back when none is wanted"
    wide = Autoscaler(low=1, high=8, wait=1.0, cooldown=10.0)
    assert wide.decide(t, 2, oldest_age=5.0, waiting=10, idle=0, room=yes) == 4, "doubles"
    assert wide.decide(t + STEP, 4, oldest_age=5.0, waiting=1, idle=0, room=yes) == 5, "no more than wait"
    assert wide.decide(t + 2 * STEP, 5, oldest_age=5.0, waiting=9, idle=0, room=yes) == 8, "up to MAX"
    empty = Autoscaler(low=0, high=8, wait=1.0, cooldown=10.0)
    assert empty.decide(t, 0, oldest_age=5.0, waiting=9, idle=0, room=yes) == 1, "from none, one"
    tight = Autoscaler(low=1, high=8, wait=1.0, cooldown=10.0)
    assert (
        tight.decide(t, 4, oldest_age=5.0, waiting=9, idle=0, room=lambda n: "memory" if n > 5 else None) == 5
    ), "one more when the double has no room"
    # idle with nothing waiting: one fewer only after a whole cool-down, then again after another
    assert scaler.decide(t + 5, 3, None, waiting=0, idle=2, room=yes) == 3
    assert scaler.decide(t + 14, 3, None, waiting=0, idle=2, room=yes) == 3
    assert scaler.decide(t + 15, 3, None, waiting=0, idle=2, room=yes) == 2
    assert scaler.decide(t + 16, 2, None, waiting=0, idle=1, room=yes) == 2
    # a job waiting again restarts the cool-down
    assert scaler.decide(t + 20, 2, 0.1, waiting=1, idle=1, room=yes) == 2
    assert scaler.decide(t + 29, 2, None, waiting=0, idle=1, room=yes) == 2
    assert scaler.decide(t + 39, 2, None, waiting=0, idle=1, room=yes) == 1
    assert scaler.decide(t + 60, 1, None, waiting=0, idle=1, room=yes) == 1, "never below MIN"
    # without a recent queue report only the window is enforced
    assert scaler.decide(t + 61, 1, None, waiting=None, idle=0, room=yes) == 1
    scaler.window(2, 4)
    assert scaler.decide(t + 62, 1, None, waiting=None, idle=0, room=yes) == 2


def test_a_reload_keeps_a_moved_window_or_autoscale_off_unless_the_configured_window_changes() -> None:
    before = Settings(groups=(Group(("a",), 1, window=(1, 4)), Group(("b",), 1, window=(0, 2))))
    scalers = autoscalers(before, {}, {})
    scalers["a"].window(2, 5)  # moved by TTIN
    del scalers["b"]  # turned off by `ctl scale b 1`
    windows = {g.name: g.window for g in before.groups}
    same = autoscalers(dataclasses.replace(before, autoscale_wait=3.0), scalers, windows)
    assert (same["a"].low, same["a"].high, same["a"].wait) == (2, 5, 3.0) and "b" not in same
    changed = Settings(groups=(Group(("a",), 1, window=(1, 6)), Group(("b",), 1, window=(0, 3))))
    fresh = autoscalers(changed, scalers, windows)
    assert (fresh["a"].low, fresh["a"].high, fresh["b"].high) == (1, 6, 3)


def test_cpu_load_is_the_share_of_the_quota_used_over_the_last_window() -> None:
    used = [0.0]
    load = CpuLoad(quota=lambda: 0.5, usage=lambda: used[0])
    load.sample(10.0)
    assert load.busy() is None, "one sample says nothing"
    used[0] = 0.45  # 0.45 CPU seconds in one second: 90 % of half a CPU
    load.sample(10.0 + CPU_WINDOW)
    assert load.busy() == pytest.approx(CPU_BUSY)
    used[0] = 0.5  # then idle: the window moves on
    load.sample(10.0 + 2 * CPU_WINDOW)
    load.sample(10.0 + 3 * CPU_WINDOW)
    assert load.busy() == pytest.approx(0.0)
    unlimited = CpuLoad(quota=lambda: None, usage=lambda: 1.0)
    unlimited.sample(10.0)
    unlimited.sample(10.0 + CPU_WINDOW)
    assert unlimited.busy() is None, "without a quota CPU holds nothing back"


@pytest.mark.parametrize("value", ["3", "3:1", "0:0", "a:b", "1:99999"])
def test_a_bad_window_exits_2_with_one_line(run_dir: str, value: str) -> None:
    env = base_env("redis://127.0.0.1:1/0", run_dir, RESQUE_STARTER_AUTOSCALE=value)
    result = subprocess.run([sys.executable, "-m", "resque_starter", "run"], env=env, cwd=str(ROOT),
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert (
        result.returncode == 2 and "RESQUE_STARTER_AUTOSCALE" in result.stderr and "MIN:MAX" in result.stderr
    )
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
