"""Issue 6: graceful reload on HUP, against a real supervisor and Redis, under a steady stream of jobs.

Each test writes the application module `reloadapp` to a tmp dir on PYTHONPATH; the mold imports it,
so editing the file on disk and sending HUP changes what new-generation workers run.
"""

from __future__ import annotations

import collections
import os
import re
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
import redis
from rq import Queue, Worker
from rq.job import Job, JobStatus

from conftest import wait_for
from starter import (
    ROOT,
    TESTS,
    Starter,
    base_env,
    cmdline,
    ctl,
    descendants,
    ok,
    process_state,
    registries,
    supervised,
)

APP = """\
import os
import time

import redis
from rq import get_current_job

VERSION = {version!r}
redis.Redis.from_url(os.environ["REDIS_URL"]).rpush("reloadapp:imports", VERSION)
{extra}

def job(seconds=0.0):
    current = get_current_job()
    current.connection.rpush("reloadapp:started", current.id)
    time.sleep(seconds)
    current.connection.rpush("reloadapp:done", current.id)
    return VERSION
"""


class App:
    """The application module on disk: what the next mold will import."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "reloadapp.py"

    def write(self, version: str, extra: str = "") -> None:
        self.path.write_text(APP.format(version=version, extra=extra))

    def break_it(self, source: str) -> None:
        self.path.write_text(source)


@pytest.fixture
def app(tmp_path: Path) -> App:
    directory = tmp_path / "app"
    directory.mkdir()
    a = App(directory)
    a.write("v1")
    return a


@pytest.fixture
def start(starters, redis_url, run_dir, conn, app):  # type: ignore[no-untyped-def]
    path = os.pathsep.join([str(app.path.parent), str(TESTS), str(ROOT)])
    app_env = {"RESQUE_STARTER_APP": "reloadapp", "PYTHONPATH": path, "PYTHONDONTWRITEBYTECODE": "1"}
    return lambda **env: starters(base_env(redis_url, run_dir, **{**app_env, **env}))


def enqueue(conn: redis.Redis, seconds: float = 0.0) -> Job:
    return Queue("default", connection=conn).enqueue("reloadapp.job", seconds)


def reload_during_a_job(s: Starter, conn: redis.Redis, app: App, seconds: float) -> Job:
    """Start a job of `seconds` and, once it runs, reload to "v2": the job generation 1 must finish."""
    job = enqueue(conn, seconds)
    wait_for(lambda: conn.llen("reloadapp:started"), what="the long job to start")
    app.write("v2")
    s.signal(signal.SIGHUP)
    return job


def result(conn: redis.Redis, job: Job, timeout: float = 20.0) -> Any:
    wait_for(lambda: job.get_status(refresh=True) == JobStatus.FINISHED, timeout, what=f"job {job.id}")
    return Job.fetch(job.id, connection=conn).return_value()


def generations(status: dict[str, Any]) -> list[int]:
    return sorted(w["generation"] for w in status["workers"])


def served_by(s: Starter, generation: int, n: int, timeout: float = 30.0) -> dict[str, Any]:
    """Until the reload to `generation` is complete: n ready workers of it, nothing else, one mold."""

    def done() -> dict[str, Any] | None:
        s.assert_running()
        status = s.try_status()
        if status is None or status["serving_generation"] != generation:
            return None
        ready = [w for w in status["workers"] if w["ready"] and w["stopping"] is None]
        if len(ready) != n or generations(status) != [generation] * n:
            return None
        return status if [m["generation"] for m in status["molds"]] == [generation] else None

    return wait_for(done, timeout, what=f"generation {generation} serving with {n} workers")  # type: ignore[return-value]


def gone(pid: int) -> bool:
    return process_state(pid) in (None, "Z")


class Producer(threading.Thread):
    """A steady stream of jobs, one every 10 ms, each recording its own completion."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.queue = Queue("default", connection=redis.Redis.from_url(url))
        self.jobs: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(0.01):
            self.jobs.append(self.queue.enqueue("reloadapp.job", 0.01).id)

    def stop(self) -> list[str]:
        self.halt.set()
        self.join()
        return self.jobs


class Sampler(threading.Thread):
    """Every 20 ms: the supervisor's worker children (from /proc) and its own view (`ctl status`).

    Workers are the supervisor's direct children besides the molds (work-horses are the workers'
    children). A mold is recognised by its pid from any status seen before or after the listing.
    """

    def __init__(self, s: Starter) -> None:
        super().__init__(daemon=True)
        self.s = s
        self.halt = threading.Event()
        self.molds: set[int] = set()
        self.process_counts: list[int] = []
        self.capacity: list[int] = []
        self.worker_generations: dict[str, int] = {}
        self.titles: dict[int, str] = {}

    def _status(self) -> dict[str, Any]:
        status = self.s.status()
        self.molds |= {m["pid"] for m in status["molds"]}
        for w in status["workers"]:
            self.worker_generations[w["name"]] = w["generation"]
        return status

    def run(self) -> None:
        while not self.halt.wait(0.02):
            self._status()
            kids = supervised(self.s)
            status = self._status()
            workers = [p for p in kids if p not in self.molds]
            self.process_counts.append(len(workers))
            self.capacity.append(sum(1 for w in status["workers"] if w["ready"] and w["stopping"] is None))
            for pid in workers:
                self.titles.setdefault(pid, cmdline(pid))

    def stop(self) -> None:
        self.halt.set()
        self.join()


def test_reload_under_a_stream_of_jobs_loses_nothing_runs_new_code_and_keeps_the_surge(
    start, conn, app: App
) -> None:
    n = 3
    s = start(RESQUE_STARTER_CONCURRENCY=str(n))
    s.wait_workers(n)
    old_mold = s.status()["molds"][0]["pid"]
    sampler, producer = Sampler(s), Producer(s.url)
    sampler.start()
    producer.start()
    wait_for(lambda: conn.llen("reloadapp:done") >= 30, what="jobs flowing before the reload")
    app.write("v2")
    ran_before_hup = set(conn.lrange("reloadapp:done", 0, -1))
    s.signal(signal.SIGHUP)
    served_by(s, 2, n)
    after_reload = len(producer.jobs)
    wait_for(lambda: len(producer.jobs) >= after_reload + 30, what="jobs enqueued after the reload")
    enqueued = producer.stop()
    wait_for(lambda: conn.llen("reloadapp:done") >= len(enqueued), 30, what="every job to run")
    empty = {"queued": [], "started": [], "failed": []}
    wait_for(lambda: registries(conn) == empty, what="every job to finish")
    sampler.stop()

    done = collections.Counter(i.decode() for i in conn.lrange("reloadapp:done", 0, -1))
    assert [i for i, count in done.items() if count > 1] == [], "a job ran twice"
    assert set(done) == set(enqueued), "every job enqueued before, during and after the HUP ran"

    assert max(sampler.process_counts) == n + 1, "new workers overlap old ones, one surge process at most"
    assert min(sampler.capacity) >= n, "an old worker stops only once replaced"

    jobs = Job.fetch_many(enqueued, connection=conn)
    for job in jobs:
        assert job is not None
        generation = sampler.worker_generations[job.worker_name]
        assert job.return_value() == f"v{generation}", "each worker runs its own generation's code"
    assert {j.return_value() for j in jobs if j.id.encode() in ran_before_hup} == {"v1"}
    assert {j.return_value() for j in jobs[after_reload:]} == {"v2"}, "jobs after the reload run new code"
    assert conn.lrange("reloadapp:imports", 0, -1) == [b"v1", b"v2"], "one import per generation"
    assert gone(old_mold), "the old mold exits once its last worker is gone"
    titles = sampler.titles.values()
    assert any("gen=1" in t for t in titles) and any("gen=2" in t for t in titles)
    assert "resque-starter: supervisor gen=2" in cmdline(s.pid)


def test_titles_and_status_show_each_workers_generation_and_the_old_mold_waits_for_its_last_worker(
    start, conn, app: App
) -> None:
    s = start(RESQUE_STARTER_CONCURRENCY="1")
    [old] = s.wait_workers(1)
    old_mold = s.status()["molds"][0]["pid"]
    long_job = reload_during_a_job(s, conn, app, 3)

    def both() -> dict[str, Any] | None:
        status = s.status()
        new = [w for w in status["workers"] if w["generation"] == 2 and w["ready"]]
        return status if new else None

    status = wait_for(both, what="a ready generation-2 worker beside the draining one")
    assert isinstance(status, dict)
    by_gen = {w["generation"]: w for w in status["workers"]}
    assert sorted(by_gen) == [1, 2]
    assert by_gen[1]["pid"] == old["pid"] and by_gen[1]["state"] == "busy"
    assert by_gen[1]["stopping"] == "replaced by generation 2"
    assert sorted(m["generation"] for m in status["molds"]) == [1, 2]
    assert not gone(old_mold), "the old mold stays while one of its workers still runs a job"
    assert "resque-starter: worker[0] gen=1 busy" in cmdline(old["pid"])
    assert "resque-starter: worker[0] gen=2 " in cmdline(by_gen[2]["pid"])
    assert "resque-starter: supervisor gen=2" in cmdline(s.pid)
    text = ok(s.run_dir, "status")
    assert "generation 2" in text and "GEN" in text

    assert result(conn, long_job) == "v1", "the old worker finished its job on the old code"
    served_by(s, 2, 1)
    wait_for(lambda: gone(old_mold), what="the old mold to exit after its last worker")
    assert gone(old["pid"])
    assert result(conn, enqueue(conn)) == "v2"


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        ("def broken(:\n", "SyntaxError"),
        ("import os\nraise RuntimeError('broken on purpose')\n", "RuntimeError: broken on purpose"),
    ],
    ids=["syntax-error", "raising-import"],
)
def test_a_reload_to_broken_code_keeps_the_old_generation_serving(
    start, conn, app: App, source: str, reason: str
) -> None:
    s = start()
    workers = s.wait_workers(2)
    [old_mold] = s.status()["molds"]
    app.break_it(source)
    assert s.ctl({"cmd": "reload"}) == {"ok": True, "reloading": True}

    def failed() -> dict[str, Any] | None:
        status = s.status()
        return status if status["reload_error"] else None

    status = wait_for(failed, 20, what="the reload to fail")
    assert isinstance(status, dict)
    assert reason in status["reload_error"]
    assert status["generation"] == status["serving_generation"] == 1
    assert generations(status) == [1, 1]
    assert {w["pid"] for w in status["workers"]} == {w["pid"] for w in workers}, "old workers untouched"
    wait_for(lambda: [m["generation"] for m in s.status()["molds"]] == [1], what="the failed mold dropped")
    wait_for(lambda: supervised(s) == {old_mold["pid"], *(w["pid"] for w in workers)},
             what="no process of the failed generation left")  # fmt: skip
    assert s.log().count("Traceback (most recent call last)") == 1, "the failure is logged with its traceback"
    assert reason in s.log()
    text = ok(s.run_dir, "status")
    assert "last reload failed" in text and reason in text

    assert [result(conn, enqueue(conn)) for _ in range(3)] == ["v1"] * 3, "the old generation serves"
    assert s.ctl({"cmd": "health", "check": "ready"})["ok"]
    app.write("v2")
    s.signal(signal.SIGHUP)
    status = served_by(s, 3, 2)
    assert status["reload_error"] is None
    assert result(conn, enqueue(conn)) == "v2", "a later HUP after fixing the file succeeds"


def test_new_generation_workers_that_crash_at_start_abandon_the_reload(
    start, conn, app: App, tmp_path: Path
) -> None:
    conf = tmp_path / "conf.py"
    conf.write_text("def after_fork(worker, slot):\n    pass\n")
    s = start(RESQUE_STARTER_CONFIG=str(conf))
    workers = s.wait_workers(2)
    [old_mold] = s.status()["molds"]
    conf.write_text("def after_fork(worker, slot):\n    raise RuntimeError('no workers for gen 2')\n")
    app.write("v2")
    s.signal(signal.SIGHUP)

    def abandoned() -> dict[str, Any] | None:
        s.assert_running()
        status = s.status()
        return status if status["reload_error"] else None

    status = wait_for(abandoned, 60, what="the reload to be abandoned")
    assert isinstance(status, dict)
    assert "crash at start" in status["reload_error"]
    assert status["generation"] == status["serving_generation"] == 1
    assert "RuntimeError: no workers for gen 2" in s.log(), "the crash is logged with its traceback"
    wait_for(lambda: generations(s.status()) == [1, 1], what="the crashing workers gone")
    wait_for(lambda: [m["pid"] for m in s.status()["molds"]] == [old_mold["pid"]], what="gen-2 mold dropped")
    wait_for(lambda: supervised(s) == {old_mold["pid"], *(w["pid"] for w in workers)},
             what="nothing of generation 2 left")  # fmt: skip
    assert {w["pid"] for w in s.status()["workers"]} == {w["pid"] for w in workers}, "old workers served on"
    assert [result(conn, enqueue(conn)) for _ in range(3)] == ["v1"] * 3

    conf.write_text("def after_fork(worker, slot):\n    pass\n")
    s.signal(signal.SIGHUP)
    served_by(s, 3, 2)
    assert result(conn, enqueue(conn)) == "v2"


def test_ttin_during_a_reload_adds_a_new_generation_worker_and_the_scaled_count_survives(
    start, conn, app: App
) -> None:
    s = start(RESQUE_STARTER_CONCURRENCY="2")
    s.wait_workers(2)
    assert s.ctl({"cmd": "scale", "n": "3"})["ok"]
    s.wait_workers(3)
    long_job = reload_during_a_job(s, conn, app, 4)
    wait_for(lambda: any(w["generation"] == 2 and w["ready"] for w in s.status()["workers"]),
             what="the reload under way")  # fmt: skip
    assert any(w["generation"] == 1 for w in s.status()["workers"]), "the old busy worker still runs"
    s.signal(signal.SIGTTIN)

    def slot3() -> dict[str, Any] | None:
        status = s.status()
        return next((w for w in status["workers"] if w["slot"] == 3), None)

    added = wait_for(slot3, what="a worker for the added slot")
    assert isinstance(added, dict) and added["generation"] == 2, "TTIN adds a new-generation worker"
    assert result(conn, long_job) == "v1"
    status = served_by(s, 2, 4)
    assert status["groups"][0]["size"] == 4, "the count set by ctl scale and TTIN survives the reload"
    assert sorted(w["slot"] for w in status["workers"]) == [0, 1, 2, 3]


def test_quit_during_a_reload_drains_both_generations_and_exits_0(start, conn, app: App) -> None:
    s = start(RESQUE_STARTER_CONCURRENCY="1")
    s.wait_workers(1)
    old_job = enqueue(conn, 3)
    wait_for(lambda: conn.llen("reloadapp:started") == 1, what="the old worker's job to start")
    app.write("v2")
    s.signal(signal.SIGHUP)
    wait_for(lambda: any(w["generation"] == 2 and w["ready"] for w in s.status()["workers"]),
             what="a ready generation-2 worker")  # fmt: skip
    new_job = enqueue(conn, 2)
    wait_for(lambda: conn.llen("reloadapp:started") == 2, what="the new worker's job to start")
    status = s.status()
    assert sorted((w["generation"], w["state"]) for w in status["workers"]) == [(1, "busy"), (2, "busy")]
    tree = descendants(s.pid)
    s.signal(signal.SIGQUIT)
    assert s.wait_exit(30) == 0
    assert result(conn, old_job) == "v1" and result(conn, new_job) == "v2"
    assert registries(conn) == {"queued": [], "started": [], "failed": []}
    assert Worker.all(connection=conn) == []
    assert [p for p in tree if process_state(p) is not None] == []


def test_a_second_hup_mid_reload_starts_a_third_generation_and_abandons_the_second(
    start, conn, app: App
) -> None:
    n = 2
    s = start(RESQUE_STARTER_CONCURRENCY=str(n))
    s.wait_workers(n)
    sampler = Sampler(s)
    sampler.start()
    long_job = reload_during_a_job(s, conn, app, 4)

    def half_done() -> dict[str, Any] | None:
        status = s.status()
        gens = {w["generation"] for w in status["workers"] if w["ready"]}
        return status if gens == {1, 2} and len(status["molds"]) == 2 else None

    status = wait_for(half_done, what="generations 1 and 2 serving side by side")
    assert isinstance(status, dict)
    molds = {m["generation"]: m["pid"] for m in status["molds"]}
    app.write("v3")
    s.signal(signal.SIGHUP)
    wait_for(lambda: s.status()["generation"] == 3, what="generation 3")
    assert result(conn, long_job) == "v1"
    status = served_by(s, 3, n)
    sampler.stop()
    wait_for(lambda: gone(molds[1]) and gone(molds[2]), what="the molds of generations 1 and 2 to exit")
    expected = {status["molds"][0]["pid"], *(w["pid"] for w in status["workers"])}
    wait_for(lambda: supervised(s) == expected, what="no process of generations 1 and 2 left")
    assert max(sampler.process_counts) <= n + 1
    assert [result(conn, enqueue(conn)) for _ in range(3)] == ["v3"] * 3
    assert conn.lrange("reloadapp:imports", 0, -1) == [b"v1", b"v2", b"v3"]


def test_a_second_hup_while_the_new_mold_still_imports_abandons_it_cleanly(start, conn, app: App) -> None:
    s = start()
    workers = s.wait_workers(2)
    app.write("v2", extra="time.sleep(2)")
    s.signal(signal.SIGHUP)

    def importing() -> int | None:
        molds = s.status()["molds"]
        return next((m["pid"] for m in molds if m["generation"] == 2 and not m["ready"]), None)

    slow_mold = wait_for(importing, what="the generation-2 mold importing")
    app.write("v3")
    s.signal(signal.SIGHUP)
    status = served_by(s, 3, 2)
    assert not {w["pid"] for w in workers} & {w["pid"] for w in status["workers"]}
    wait_for(lambda: gone(slow_mold), what="the abandoned mold to exit")
    assert "mold gen=2 failed" not in s.log() and "Traceback" not in s.log(), "abandoning is no error"
    assert status["reload_error"] is None
    assert result(conn, enqueue(conn)) == "v3"


def test_a_failed_reload_with_no_workers_keeps_the_old_mold_and_does_not_loop(start, conn, app: App) -> None:
    s = start(RESQUE_STARTER_CONCURRENCY="0")
    wait_for(lambda: (s.try_status() or {}).get("serving_generation") == 1, what="generation 1 serving")
    [old_mold] = s.status()["molds"]
    app.break_it("raise RuntimeError('broken on purpose')\n")
    s.signal(signal.SIGHUP)
    wait_for(lambda: s.status()["reload_error"], what="the reload to fail")
    wait_for(lambda: len(s.status()["molds"]) == 1, what="the failed mold dropped")
    assert s.status()["molds"] == [old_mold], "the serving mold stays, even with no worker of its own"
    s.signal(signal.SIGTTIN)
    s.wait_workers(1)
    assert result(conn, enqueue(conn)) == "v1"
    assert len(re.findall(r"mold gen=\d+ pid \d+: importing", s.log())) == 2, "no retry loop"


def test_a_serving_mold_that_cannot_be_restarted_stops_the_supervisor_without_a_loop(
    start, conn, app: App
) -> None:
    s = start()
    s.wait_workers(2)
    [mold] = s.status()["molds"]
    job = enqueue(conn, 2)
    wait_for(lambda: conn.llen("reloadapp:started"), what="a job to start")
    app.break_it("raise RuntimeError('broken on purpose')\n")
    os.kill(mold["pid"], signal.SIGKILL)
    assert s.wait_exit(30) == 3, "the application no longer imports: exit 3 after a drain"
    assert result(conn, job) == "v1", "the running job finished first"
    assert len(re.findall(r"mold gen=\d+ pid \d+: importing", s.log())) == 2, "no retry loop"
    assert registries(conn) == {"queued": [], "started": [], "failed": []}


def test_a_scaled_count_survives_a_reload_unless_the_config_file_changes_it(
    start, conn, app: App, tmp_path: Path
) -> None:
    conf = tmp_path / "conf.py"
    conf.write_text("concurrency = 1\n")
    s = start(RESQUE_STARTER_CONFIG=str(conf), RESQUE_STARTER_CONCURRENCY="")
    s.wait_workers(1)
    assert s.ctl({"cmd": "scale", "n": "+1"})["ok"]
    s.wait_workers(2)
    s.signal(signal.SIGHUP)
    assert served_by(s, 2, 2)["groups"][0]["size"] == 2, "the config did not change: the scaled count stays"
    conf.write_text("concurrency = 'three'\n")
    refused = ctl(s.run_dir, "reload")
    assert refused.returncode == 1 and "RESQUE_STARTER_CONCURRENCY" in refused.stderr, (
        "a bad config is refused"
    )
    status = s.status()
    assert status["generation"] == 2 and status["reload_error"] in refused.stderr
    conf.write_text("concurrency = 3\n")
    s.signal(signal.SIGHUP)
    assert served_by(s, 3, 3)["groups"][0]["size"] == 3, "a count changed in the config file is applied"


def test_quit_while_the_new_mold_still_imports_exits_0_and_leaves_nothing(start, conn, app: App) -> None:
    s = start()
    s.wait_workers(2)
    app.write("v2", extra="time.sleep(30)")
    s.signal(signal.SIGHUP)
    wait_for(lambda: any(m["generation"] == 2 for m in s.status()["molds"]), what="the generation-2 mold")
    tree = descendants(s.pid)
    s.signal(signal.SIGQUIT)
    assert s.wait_exit(20) == 0
    assert [p for p in tree if process_state(p) is not None] == [], "the importing mold is not left behind"
