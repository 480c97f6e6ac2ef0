"""Worker groups (issue 10): several queue lists and sizes under one supervisor, against real processes,
real signals and a real Redis; and the config file's per-group overrides."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis
from rq import Queue, Worker
from rq.job import Job, JobStatus

from resque_starter import config, control
from resque_starter.config import ConfigError, Group
from resque_starter.loader import load

from conftest import wait_for
from starter import ROOT, Starter, base_env, cmdline, ctl, registries

P = "RESQUE_STARTER_"


def group_env(redis_url: str | None, run_dir: str, groups: str | None, **env: str) -> dict[str, str]:
    environment = base_env(redis_url, run_dir, **env)
    del environment[P + "CONCURRENCY"]  # GROUPS replaces it (and setting both is an error)
    if groups is not None:
        environment[P + "GROUPS"] = groups
    return environment


@pytest.fixture
def start(starters, redis_url, run_dir, conn):  # type: ignore[no-untyped-def]
    return lambda groups, **env: starters(group_env(redis_url, run_dir, groups, **env))


def wait_groups(
    s: Starter, sizes: dict[str, int], generation: int | None = None, timeout: float = 20.0
) -> list[dict[str, Any]]:
    """Until every worker is ready (of `generation`), the count per group is `sizes`, and rq agrees."""

    def settled() -> list[dict[str, Any]] | None:
        s.assert_running()
        status = s.try_status()
        if status is None:
            return None
        workers = status["workers"]
        if not all(w["ready"] and w["state"] != "stopping" for w in workers):
            return None
        if generation is not None and any(w["generation"] != generation for w in workers):
            return None
        if Counter(w["group"] for w in workers) != Counter(sizes):
            return None
        registered = {w.name for w in Worker.all(connection=s.connection())}
        return workers if {w["name"] for w in workers} <= registered else None

    return wait_for(settled, timeout, what=f"workers {sizes} (gen {generation})")  # type: ignore[return-value]


def in_group(workers: list[dict[str, Any]], group: str) -> list[dict[str, Any]]:
    return [w for w in workers if w["group"] == group]


def enqueue(conn: redis.Redis, func: str, *args: Any, queue: str) -> Job:
    return Queue(queue, connection=conn).enqueue(func, *args)


def wait_status(job: Job, status: JobStatus, timeout: float = 20.0) -> None:
    wait_for(lambda: job.get_status(refresh=True) == status, timeout, what=f"job {job.id} to be {status}")


def started(conn: redis.Redis, n: int) -> None:
    wait_for(lambda: conn.llen("testjobs:done:started") == n, what=f"{n} job(s) to start")


# ---- consuming


def test_each_group_takes_only_its_queues_in_priority_order(start, conn) -> None:
    jobs = {
        queue: [enqueue(conn, "testjobs.record", queue=queue) for _ in range(n)]
        for queue, n in (("default", 4), ("high", 4), ("low", 3), ("other", 1))
    }
    s = start("high,default=2; low=1")
    workers = wait_groups(s, {"high,default": 2, "low": 1})
    group_of = {w["name"]: w["group"] for w in workers}
    ran = [job for queue in ("default", "high", "low") for job in jobs[queue]]
    wait_for(lambda: all(j.get_status(refresh=True) == JobStatus.FINISHED for j in ran), 30, what="11 jobs")
    runs = [Job.fetch(job.id, connection=conn) for job in ran]
    for job in runs:
        assert job.origin in group_of[job.worker_name].split(","), (job.origin, group_of[job.worker_name])
    for name, group in group_of.items():
        mine = sorted((j for j in runs if j.worker_name == name), key=lambda j: j.started_at)
        taken = [j.origin for j in mine]
        priority = group.split(",")
        assert taken == sorted(taken, key=priority.index), f"{name} took {taken}"
    assert Queue("other", connection=conn).get_job_ids() == [jobs["other"][0].id], "no group serves other"
    titles = sorted(cmdline(w["pid"]).split(" gen=")[0] for w in workers)
    assert titles == [
        "resque-starter: worker[high,default:0]",
        "resque-starter: worker[high,default:1]",
        "resque-starter: worker[low:0]",
    ]


# ---- scaling


def test_ctl_scale_changes_one_group_and_a_group_at_zero_keeps_its_place(start, conn) -> None:
    s = start("high,default=1; low=1; reports=0")
    [high] = in_group(wait_groups(s, {"high,default": 1, "low": 1}), "high,default")
    scaled = ctl(s.run_dir, "scale", "low", "3")
    assert (scaled.returncode, scaled.stdout.strip()) == (0, "group low: 3 worker(s)"), scaled.stderr
    workers = wait_groups(s, {"high,default": 1, "low": 3})
    assert sorted(w["slot"] for w in in_group(workers, "low")) == [0, 1, 2]
    assert [w["pid"] for w in in_group(workers, "high,default")] == [high["pid"]], "the other group stays"

    assert ctl(s.run_dir, "scale", "low", "0").returncode == 0
    wait_groups(s, {"high,default": 1})
    assert [(g["name"], g["size"]) for g in s.status()["groups"]] == [
        ("high,default", 1),
        ("low", 0),
        ("reports", 0),
    ]
    assert "groups: high,default=1; low=0; reports=0" in ctl(s.run_dir, "status").stdout

    job = enqueue(conn, "testjobs.record", queue="reports")
    assert ctl(s.run_dir, "scale", "reports", "+1").returncode == 0
    assert ctl(s.run_dir, "scale", "low", "+2").returncode == 0
    workers = wait_groups(s, {"high,default": 1, "low": 2, "reports": 1})
    wait_status(job, JobStatus.FINISHED)
    assert Job.fetch(job.id, connection=conn).worker_name == in_group(workers, "reports")[0]["name"]
    assert [w["pid"] for w in in_group(workers, "high,default")] == [high["pid"]]

    unknown = ctl(s.run_dir, "scale", "nosuch", "1")
    assert unknown.returncode == 1
    assert "unknown group 'nosuch'; groups: high,default; low; reports" in unknown.stderr


def test_ttin_and_ttou_act_on_the_first_group(start) -> None:
    s = start("high=1; low=1")
    [low] = in_group(wait_groups(s, {"high": 1, "low": 1}), "low")
    for sig, high in ((signal.SIGTTIN, 2), (signal.SIGTTOU, 1), (signal.SIGTTOU, 0), (signal.SIGTTIN, 1)):
        s.signal(sig)  # one at a time: the kernel merges a signal sent while the same one is pending
        workers = wait_groups(s, {"high": high, "low": 1})
        assert [w["pid"] for w in in_group(workers, "low")] == [low["pid"]]


# ---- reload


def test_reload_keeps_both_groups_sizes(start, conn) -> None:
    s = start("high,default=1; low=1")
    wait_groups(s, {"high,default": 1, "low": 1})
    assert s.ctl({"cmd": "scale", "group": "low", "n": "2"})["ok"]
    s.signal(signal.SIGTTIN)
    before = wait_groups(s, {"high,default": 2, "low": 2})
    s.signal(signal.SIGHUP)
    after = wait_groups(s, {"high,default": 2, "low": 2}, generation=2, timeout=40)
    assert not {w["pid"] for w in before} & {w["pid"] for w in after}, "every worker was replaced"
    assert [(g["name"], g["size"]) for g in s.status()["groups"]] == [("high,default", 2), ("low", 2)]
    job = enqueue(conn, "testjobs.record", queue="low")
    wait_status(job, JobStatus.FINISHED)


def test_reload_applies_changed_group_sizes_new_groups_and_overrides(start, conn, tmp_path: Path) -> None:
    conf = tmp_path / "conf.py"
    conf.write_text('groups = "high,default=1; low=1"\n')
    s = start(None, RESQUE_STARTER_CONFIG=str(conf))
    wait_groups(s, {"high,default": 1, "low": 1})
    s.signal(signal.SIGTTIN)
    wait_groups(s, {"high,default": 2, "low": 1})
    conf.write_text(
        'groups = "high,default=1; low=3; reports=1"\n'
        'group_overrides = {"reports": {"worker_class": "rq.SimpleWorker"}}\n'
    )
    s.signal(signal.SIGHUP)
    # high,default's configured size did not change, so its scaled size stays; low's did, so it wins
    workers = wait_groups(s, {"high,default": 2, "low": 3, "reports": 1}, generation=2, timeout=40)
    job = enqueue(conn, "testjobs.pid", queue="reports")
    wait_status(job, JobStatus.FINISHED)
    assert job.return_value() == in_group(workers, "reports")[0]["pid"], "reports runs jobs in the worker"


# ---- stopping and signals across groups


def busy_in_both(s: Starter, conn: redis.Redis, seconds: float) -> list[Job]:
    wait_groups(s, {"high": 1, "low": 1})
    jobs = [enqueue(conn, "testjobs.sleep_then_record", seconds, queue=q) for q in ("high", "low")]
    started(conn, 2)
    return jobs


def test_quit_drains_both_groups(start, conn) -> None:
    s = start("high=1; low=1")
    jobs = busy_in_both(s, conn, 2)
    waiting = enqueue(conn, "testjobs.record", queue="low")
    s.signal(signal.SIGQUIT)
    assert s.wait_exit(30) == 0
    assert [j.get_status(refresh=True) for j in jobs] == [JobStatus.FINISHED] * 2
    assert registries(conn, "high")["started"] == registries(conn, "low")["started"] == []
    assert registries(conn, "low")["queued"] == [waiting.id], "a draining worker takes no new job"
    assert Worker.all(connection=conn) == []


def test_int_requeues_the_jobs_of_both_groups(start, conn) -> None:
    s = start("high=1; low=1")
    jobs = busy_in_both(s, conn, 60)
    s.signal(signal.SIGINT)
    assert s.wait_exit(30) == 1
    for job, queue in zip(jobs, ("high", "low"), strict=True):
        assert registries(conn, queue) == {"queued": [job.id], "started": [], "failed": []}


def test_usr1_kills_the_jobs_of_both_groups(start, conn) -> None:
    s = start("high=1; low=1")
    jobs = busy_in_both(s, conn, 60)
    pids = {w["pid"] for w in s.status()["workers"]}
    s.signal(signal.SIGUSR1)
    for job in jobs:
        wait_status(job, JobStatus.FAILED)
        assert "SIGUSR1" in (Job.fetch(job.id, connection=conn).latest_result().exc_string or "")
    assert {w["pid"] for w in s.status()["workers"]} == pids, "the workers go on"


def test_usr2_pauses_both_groups_and_cont_resumes(start, conn) -> None:
    s = start("high=1; low=1")
    wait_groups(s, {"high": 1, "low": 1})
    s.signal(signal.SIGUSR2)

    def suspended() -> bool:
        workers = Worker.all(connection=conn)
        return len(workers) == 2 and all(w.get_state() == "suspended" for w in workers)

    wait_for(suspended, what="both groups' workers suspended")
    jobs = [enqueue(conn, "testjobs.record", queue=q) for q in ("high", "low")]
    time.sleep(1.5)  # a window in which a paused worker must NOT take a job (absence can only be sampled)
    assert [j.get_status(refresh=True) for j in jobs] == [JobStatus.QUEUED] * 2
    s.signal(signal.SIGCONT)
    for job in jobs:
        wait_status(job, JobStatus.FINISHED)


def test_ctl_drain_waits_for_the_jobs_of_both_groups(start, conn) -> None:
    s = start("high=1; low=1")
    jobs = busy_in_both(s, conn, 1.5)
    lines: list[str] = []
    assert control.drain(s.run_dir, 20, lines.append)
    assert [j.get_status(refresh=True) for j in jobs] == [JobStatus.FINISHED] * 2
    assert sum("waiting for job" in line for line in lines) == 2, lines
    s.signal(signal.SIGTERM)
    assert s.wait_exit(20) == 0


# ---- per-group overrides


def test_a_group_runs_its_own_worker_class_and_max_jobs(start, conn, tmp_path: Path) -> None:
    conf = tmp_path / "conf.py"
    conf.write_text('group_overrides = {"low": {"worker_class": "rq.SimpleWorker", "max_jobs": 2}}\n')
    s = start("high=1; low=1", RESQUE_STARTER_CONFIG=str(conf))
    workers = wait_groups(s, {"high": 1, "low": 1})
    [high], [low] = in_group(workers, "high"), in_group(workers, "low")
    low_jobs = [enqueue(conn, "testjobs.pid", queue="low") for _ in range(3)]
    high_jobs = [enqueue(conn, "testjobs.pid", queue="high") for _ in range(3)]
    for job in low_jobs + high_jobs:
        wait_status(job, JobStatus.FINISHED)
    first, second, third = (j.return_value() for j in low_jobs)
    assert first == second == low["pid"], "SimpleWorker runs the job in the worker process"
    assert third != low["pid"], "recycled after max_jobs=2: a new worker ran the third"
    assert all(j.return_value() != high["pid"] for j in high_jobs), "rq.Worker forks a horse per job"
    assert [w["pid"] for w in in_group(s.status()["workers"], "high")] == [high["pid"]], "no max_jobs"


def test_a_group_recycles_on_its_own_max_memory(start, conn, tmp_path: Path) -> None:
    conf = tmp_path / "conf.py"
    conf.write_text('worker_class = "rq.SimpleWorker"\ngroup_overrides = {"low": {"max_memory": "96M"}}\n')
    s = start("high=1; low=1", RESQUE_STARTER_CONFIG=str(conf))
    workers = wait_groups(s, {"high": 1, "low": 1})
    assert all(w["uss"] < 96 << 20 for w in workers), workers
    [high], [low] = in_group(workers, "high"), in_group(workers, "low")
    jobs = [enqueue(conn, "testjobs.hoard", 128, queue=q) for q in ("high", "low")]
    for job in jobs:
        wait_status(job, JobStatus.FINISHED)
    wait_for(
        lambda: [w for w in in_group(s.ready_workers(), "low") if w["pid"] != low["pid"]],
        what="low's worker to be recycled",
    )
    assert "recycling (max_memory)" in s.log()
    after = enqueue(conn, "testjobs.pid", queue="high")
    wait_status(after, JobStatus.FINISHED)
    assert after.return_value() == high["pid"], "high has no max_memory: the same worker goes on"


# ---- configuration


def config_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "conf.py"
    path.write_text(text)
    return str(path)


def test_group_overrides_apply_to_their_group_only(tmp_path: Path) -> None:
    path = config_file(
        tmp_path,
        "max_jobs = 500\n"
        "group_overrides = {"
        '"low": {"worker_class": "rq.SimpleWorker", "max_jobs": "off", "max_memory": "1G"}, '
        '("high", "default"): {"max_lifetime": "1h"}}\n',
    )
    settings = load({}, {P + "GROUPS": "high, default=2; low=1; reports=0", P + "CONFIG": path})
    high, low, reports = (settings.for_group(i) for i in range(3))
    assert (high.worker_class, high.max_jobs, high.max_lifetime) == ("rq.Worker", 500, 3600.0)
    assert (low.worker_class, low.max_jobs, low.max_memory) == ("rq.SimpleWorker", None, 1 << 30)
    assert (reports.max_jobs, reports.max_lifetime, reports.max_memory) == (500, None, None)
    assert settings.groups[2] == Group(("reports",), 0)
    assert settings.describe()["groups"][1] == {
        "queues": ["low"],
        "size": 1,
        "overrides": {"worker_class": "rq.SimpleWorker", "max_jobs": None, "max_memory": 1 << 30},
    }


BAD_OVERRIDES = [
    ('{"lo": {"max_jobs": 1}}', "group_overrides (in {path})='lo' is not allowed: keys are group names: "
     "high,default; low"),
    ('{"low": {"max_jobs": 0}}', "group_overrides['low']['max_jobs'] (in {path})=0 is not allowed: "
     "a whole number from 1 to 1000000000"),
    ('{"high,default": {"max_memory": "lots"}}', "group_overrides['high,default']['max_memory'] (in {path})="
     "'lots' is not allowed: a size"),
    ('{"low": {"worker_class": "Worker"}}', "group_overrides['low']['worker_class'] (in {path})="
     "'Worker' is not allowed: the dotted path"),
    ('{"low": {"queues": "x"}}', "group_overrides['low'] (in {path})='queues' is not allowed: a group may "
     "override worker_class, max_jobs, max_lifetime, max_memory"),
    ('{"low": 100}', "group_overrides['low'] (in {path})=100 is not allowed: a dict of settings"),
    ('{"low": {}, " low": {}}', "group_overrides (in {path})=' low' is not allowed: "
     "group low is listed twice"),
    ('["low"]', "group_overrides (in {path})=['low'] is not allowed: a dict of group name to a dict"),
]  # fmt: skip


@pytest.mark.parametrize(("native", "message"), BAD_OVERRIDES)
def test_a_bad_override_is_one_line_naming_the_group(tmp_path: Path, native: str, message: str) -> None:
    path = config_file(tmp_path, f"group_overrides = {native}\n")
    with pytest.raises(ConfigError) as caught:
        load({}, {P + "GROUPS": "high,default=2; low=1", P + "CONFIG": path})
    assert len(str(caught.value).splitlines()) == 1
    assert str(caught.value).startswith(message.format(path=path)), str(caught.value)


def test_an_override_worker_class_is_checked_by_the_mold(tmp_path: Path) -> None:
    path = config_file(tmp_path, 'group_overrides = {"low": {"worker_class": "rq.Queue"}}\n')
    settings = load({}, {P + "GROUPS": "high,default=2; low=1", P + "CONFIG": path})
    error = config.check_classes(settings)
    assert error is not None
    assert error.startswith(f"group_overrides['low']['worker_class'] (in {path})='rq.Queue' is not allowed")


def test_a_misspelt_group_overrides_is_caught(tmp_path: Path) -> None:
    path = config_file(tmp_path, 'group_override = {"low": {"max_jobs": 1}}\n')
    with pytest.raises(ConfigError, match="did you mean group_overrides"):
        load({}, {P + "CONFIG": path})


# ---- bad configuration, end to end


def run_cli(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "resque_starter", "run"]
    return subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize(
    ("groups", "points_at"),
    [
        ("high,default=3; low=x", "group 2 'low=x': size must be a whole number from 0 to 1024"),
        ("high,default=3; low", "group 2 'low': expected QUEUES=SIZE"),
        ("high=1; low=-1; reports=0", "group 2 'low=-1': size must be"),
        ("high=1; re ports=1", "group 2 're ports=1': queue names"),
        ("a,b=1; a,b=2", "group 2 'a,b=2': the same queues as group 1"),
    ],
)
def test_bad_groups_exit_2_with_one_line_pointing_at_the_group(
    redis_url: str, run_dir: str, groups: str, points_at: str
) -> None:
    done = run_cli(group_env(redis_url, run_dir, groups))
    assert done.returncode == 2
    assert done.stdout == ""
    [line] = done.stderr.splitlines()
    assert line.startswith(f"resque-starter: {P}GROUPS={groups!r} is not allowed: {points_at}"), line


def test_bad_override_in_the_config_file_exits_2_with_one_line(redis_url, run_dir, tmp_path: Path) -> None:
    path = config_file(tmp_path, 'group_overrides = {"low": {"max_memory": "0"}}\n')
    done = run_cli(group_env(redis_url, run_dir, "high=1; low=1", RESQUE_STARTER_CONFIG=path))
    assert done.returncode == 2
    [line] = done.stderr.splitlines()
    assert f"group_overrides['low']['max_memory'] (in {path})='0' is not allowed" in line


def test_override_worker_class_the_app_lacks_exits_2_naming_the_group(start, tmp_path: Path) -> None:
    path = config_file(tmp_path, 'group_overrides = {"low": {"worker_class": "testjobs.NoSuchWorker"}}\n')
    s = start("high=1; low=1", RESQUE_STARTER_CONFIG=path, RESQUE_STARTER_LOG_LEVEL="WARNING")
    assert s.wait_exit(20) == 2
    errors = [line for line in s.log().splitlines() if "group_overrides" in line]
    assert len(errors) == 1, s.log()
    expected = f"group_overrides['low']['worker_class'] (in {path})='testjobs.NoSuchWorker' is not allowed"
    assert expected in errors[0]
