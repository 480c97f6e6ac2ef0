"""Issue 7, memory: reforking, recycling, container limits and `ctl mem`, on a real supervisor."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from rq import Queue
from rq.job import Job, JobStatus

from conftest import wait_for
from starter import ROOT, Starter, base_env, ok, registries

Start = Callable[..., Starter]


def finished(jobs: list[Job]) -> bool:
    return all(j.get_status(refresh=True) == JobStatus.FINISHED for j in jobs)


def ran(conn: redis.Redis, tag: str) -> Counter[str]:
    return Counter(item.decode() for item in conn.lrange(f"testjobs:{tag}", 0, -1))


def reforked_mold(s: Starter) -> dict | None:  # type: ignore[type-arg]
    """The serving generation's mold once it is a promoted worker and every worker comes from it."""
    status = s.try_status()
    if status is None or status["serving_generation"] != status["generation"]:
        return None
    molds = [m for m in status["molds"] if m["generation"] == status["generation"] and m["reforked"]]
    return molds[0] if molds and len(status["workers"]) == 3 else None


@pytest.mark.parametrize(
    ("worker_class", "prefork"),
    [("testjobs.CountingWorker", "false"), ("rq.SimpleWorker", "false"), ("rq.Worker", "true")],
    ids=["CountingWorker", "SimpleWorker", "Worker-prefork"],
)
def test_refork_under_a_stream_of_jobs_keeps_every_job_and_shares_what_jobs_loaded(
    start: Start, conn: redis.Redis, worker_class: str, prefork: str
) -> None:
    s = start(
        RESQUE_STARTER_APP="testapp",
        RESQUE_STARTER_CONCURRENCY="3",
        RESQUE_STARTER_REFORK_AFTER="2",
        RESQUE_STARTER_WORKER_CLASS=worker_class,
        RESQUE_STARTER_PREFORK_HORSE=prefork,
    )
    old = {w["pid"] for w in s.wait_workers(3)}
    old_mold = s.status()["molds"][0]["pid"]
    queue = Queue(connection=conn)
    stream: list[Job] = []

    def produce() -> None:
        producer = Queue(connection=redis.Redis.from_url(s.url))
        for _ in range(150):
            stream.append(producer.enqueue("testjobs.lazy_load"))

    thread = threading.Thread(target=produce)
    thread.start()
    thread.join()
    mold = wait_for(lambda: reforked_mold(s), 40, what="a reforked mold serving 3 workers")
    assert isinstance(mold, dict)
    wait_for(lambda: finished(stream), 40, what="every job of the stream")
    done = ran(conn, "lazy")
    assert set(done) == {j.id for j in stream}, "no job lost"
    assert max(done.values()) == 1, "no job ran twice"
    if worker_class == "testjobs.CountingWorker":  # its execute_job ran for the in-process job too
        wait_for(
            lambda: all(conn.get(f"counting:{j.id}") == b"1" for j in stream),
            what="CountingWorker.execute_job after every job",
        )
    assert registries(conn) == {"queued": [], "started": [], "failed": []}
    assert mold["pid"] in old, "the new mold is one of the old workers"
    assert old_mold not in [m["pid"] for m in s.status()["molds"]], "the imported mold is gone"
    assert not old & {w["pid"] for w in s.status()["workers"]}, "every worker was replaced"
    assert [int(p) for p in conn.lrange("testapp:imports", 0, -1)] == [old_mold], "no new import"

    conn.delete("testjobs:lazy")
    later = [queue.enqueue("testjobs.lazy_load") for _ in range(6)]
    wait_for(lambda: finished(later), 20, what="jobs on the reforked generation")
    results = [Job.fetch(j.id, connection=conn).return_value() for j in later]
    assert all(r["inherited"] and r["loaded_by"] == mold["pid"] for r in results), results


def workers_of(conn: redis.Redis, jobs: list[Job]) -> list[str]:
    return [Job.fetch(j.id, connection=conn).worker_name or "" for j in jobs]


@pytest.mark.parametrize(
    ("worker_class", "jobs_per_worker", "prefork"),
    [("rq.SimpleWorker", 2, "false"), ("rq.Worker", 6, "false"), ("rq.Worker", 6, "true")],
    ids=["SimpleWorker-recycled", "Worker-leak-dies-with-the-horse", "Worker-prefork"],
)
def test_max_memory_recycles_a_leaking_worker_between_jobs(
    start: Start, conn: redis.Redis, worker_class: str, jobs_per_worker: int, prefork: str
) -> None:
    """A job leaking 48 MB into a module-level list grows the worker it runs in: a SimpleWorker (10 MB
    at start) passes 80 MB after its second job and is recycled then; with rq.Worker the leak is in the
    work-horse, which exits after each job, so the worker never grows and is never recycled."""
    s = start(
        RESQUE_STARTER_CONCURRENCY="1",
        RESQUE_STARTER_MAX_MEMORY="80M",
        RESQUE_STARTER_WORKER_CLASS=worker_class,
        RESQUE_STARTER_PREFORK_HORSE=prefork,
    )
    s.wait_workers(1)
    queue = Queue(connection=conn)
    jobs = [queue.enqueue("testjobs.leak", 48) for _ in range(6)]
    wait_for(lambda: finished(jobs), 40, what="6 leaking jobs")
    names = workers_of(conn, jobs)
    runs = [names[i : i + jobs_per_worker] for i in range(0, 6, jobs_per_worker)]
    assert all(len(set(run)) == 1 for run in runs), names
    assert len(set(names)) == 6 // jobs_per_worker, names
    recycles = 6 // jobs_per_worker - (jobs_per_worker == 6)  # the worker logs it just after the job
    wait_for(lambda: s.log().count("recycling (max_memory)") == recycles, what=f"{recycles} recycles")
    assert registries(conn) == {"queued": [], "started": [], "failed": []}
    s.wait_workers(1)
    assert "crash" not in s.log()


def test_max_jobs_recycles_after_every_job_without_counting_crashes(start: Start, conn: redis.Redis) -> None:
    """Workers that exit cleanly within a second of start, again and again, are recycled, not a crash loop."""
    s = start(RESQUE_STARTER_MAX_JOBS="1")
    s.wait_workers(2)
    queue = Queue(connection=conn)
    jobs = [queue.enqueue("testjobs.record") for _ in range(12)]
    wait_for(lambda: finished(jobs), 60, what="12 jobs, one per worker")
    assert len(set(workers_of(conn, jobs))) == 12
    assert max(ran(conn, "done").values()) == 1
    wait_for(lambda: s.status()["restarts"] >= 12, what="12 recycled workers respawned")
    s.wait_workers(2)
    assert "crash" not in s.log()


def test_max_lifetime_waits_for_the_running_job(start: Start, conn: redis.Redis) -> None:
    """A worker whose lifetime (2 s +-10%) ends during a 3 s job finishes the job, then is recycled."""
    s = start(RESQUE_STARTER_CONCURRENCY="1", RESQUE_STARTER_MAX_LIFETIME="2s")
    first = s.wait_workers(1)[0]
    job = Queue(connection=conn).enqueue("testjobs.sleep_then_record", 3)
    wait_for(lambda: finished([job]), 20, what="the 3 s job")
    assert Job.fetch(job.id, connection=conn).worker_name == first["name"]
    # the horse finishes the job before its worker gets to log the recycle
    wait_for(lambda: "recycling (max_lifetime)" in s.log(), what="the recycle after the job")
    replacement = s.wait_workers(1)[0]
    assert replacement["pid"] != first["pid"]
    assert registries(conn) == {"queued": [], "started": [], "failed": []}


@pytest.mark.parametrize("prefork", ["false", "true"])
def test_ctl_mem_shows_every_process_and_the_saving(start: Start, conn: redis.Redis, prefork: str) -> None:
    """With the pre-forked horse too, where horses are the children of each worker's horse forker."""
    env = {"RESQUE_STARTER_CONCURRENCY": "3", "RESQUE_STARTER_PREFORK_HORSE": prefork}
    s = start(RESQUE_STARTER_APP="bigapp", **env)
    workers = s.wait_workers(3)
    job = Queue(connection=conn).enqueue("testjobs.sleep_then_record", 30)
    horse = wait_for(
        lambda: [w["horse_pid"] for w in s.status()["workers"] if w["horse_pid"]], what="a horse"
    )
    mem = json.loads(ok(s.run_dir, "mem", "--json"))
    status = s.status()
    roles = {p["pid"]: p["role"] for p in mem["processes"]}
    assert roles[status["pid"]] == "supervisor"
    assert roles[status["molds"][0]["pid"]] == "mold gen=1"
    assert {roles[w["pid"]] for w in workers} == {"worker[0]", "worker[1]", "worker[2]"}
    assert roles[horse[0]].startswith("horse[")  # type: ignore[index]
    for p in mem["processes"]:
        assert p["uss"] <= p["pss"] <= p["rss"] and p["uss"] + p["shared"] == p["rss"], p
    assert mem["total"]["pss"] == sum(p["pss"] for p in mem["processes"])
    assert (mem["workers"], mem["jobs"]) == (3, 1)
    app = 30 * 2**20  # bigapp is about 40 MB: every worker maps it, none holds a copy of its own
    assert all(
        p["rss"] > app and p["uss"] < app / 2 for p in mem["processes"] if p["role"].startswith("worker")
    )
    assert mem["unshared"] > 3 * app and mem["saved"] > 0.4, mem
    text = ok(s.run_dir, "mem")
    assert "worker[0]" in text and "horse[" in text and "total" in text
    sentence = (
        r"3 workers \(1 running a job\) .* use \d+ MB in all;"
        r" 3 unshared copies would use \d+ MB: (\d+)% saved"
    )
    match = re.search(sentence, text)
    assert match and abs(int(match[1]) - 100 * mem["saved"]) <= 5, text
    job.cancel()


def test_a_full_collection_in_a_worker_leaves_the_app_shared(start: Start, conn: redis.Redis) -> None:
    """gc.freeze() in the mold: a job calling gc.collect() inside the worker (rq.SimpleWorker) does not
    touch, and so does not copy, the 40 MB the mold built."""
    s = start(
        RESQUE_STARTER_APP="bigapp",
        RESQUE_STARTER_CONCURRENCY="1",
        RESQUE_STARTER_WORKER_CLASS="rq.SimpleWorker",
    )
    s.wait_workers(1)
    jobs = [Queue(connection=conn).enqueue("testjobs.collect") for _ in range(3)]
    wait_for(lambda: finished(jobs), 20, what="3 collecting jobs")
    worker = s.status()["workers"][0]
    assert worker["uss"] < 20 * 2**20, f"worker USS {worker['uss'] >> 20} MB: the collection unshared the app"


V1_MEMORY = Path("/sys/fs/cgroup/memory")


@pytest.fixture
def memory_cgroup() -> Iterator[Path]:
    """A real cgroup v1 memory controller directory with a 64 MB limit (root and cgroup v1 only)."""
    if os.geteuid() != 0 or not shutil.which("unshare") or not (V1_MEMORY / "memory.limit_in_bytes").exists():
        pytest.skip("needs root, unshare and a cgroup v1 memory controller")
    path = V1_MEMORY / f"resque-starter-test-{os.getpid()}"
    path.mkdir()
    (path / "memory.limit_in_bytes").write_text(str(64 * 2**20))
    yield path
    path.rmdir()


def test_start_warns_when_the_workers_cannot_fit_the_memory_limit(
    redis_url: str, run_dir: str, conn: redis.Redis, memory_cgroup: Path
) -> None:
    """Seen through a mount namespace, as in a container, the limit is the cgroup's: 4 workers of 16 MB
    each over the app and the supervisor do not fit 64 MB, and the warning says what was estimated."""
    mount = 'mount --bind "$0" /sys/fs/cgroup/memory && exec "$@"'
    prefix = ("unshare", "--mount", "--fork", "--kill-child", "sh", "-c", mount, str(memory_cgroup))
    s = Starter(base_env(redis_url, run_dir, RESQUE_STARTER_CONCURRENCY="4"), prefix=prefix)
    try:
        s.wait_workers(4)
        line = wait_for(lambda: [x for x in s.log().splitlines() if "memory: " in x], what="the memory check")
        assert isinstance(line, list) and "WARNING" in line[0], line
        assert "4 workers may not fit the container's memory limit of 64 MB: estimated " in line[0]
        assert re.search(r"= [\d.]+ MB mold \(the app .* \+ 4 x 16 MB per worker", line[0]), line[0]
    finally:
        s.stop()


def test_start_says_what_it_estimated_when_the_workers_fit(start: Start) -> None:
    s = start(RESQUE_STARTER_APP="bigapp", RESQUE_STARTER_CONCURRENCY="2")
    s.wait_workers(2)
    line = [x for x in s.log().splitlines() if "memory: " in x]
    assert len(line) == 1 and "WARNING" not in line[0], line
    app = int(re.search(r"= (\d+) MB mold \(the app", line[0])[1])  # type: ignore[index]
    assert 30 <= app <= 80, line[0]


AUDIT_IMPORTS = """
import os, sys

def before_fork(settings):
    mold = os.getpid()

    def audit(event, args):
        if event == "import" and os.getpid() != mold:
            with open({path!r}, "a") as f:
                f.write(f"{{os.getpid()}} {{args[0]}}\\n")

    sys.addaudithook(audit)
"""


def test_workers_and_horses_import_nothing_after_the_fork(
    start: Start, conn: redis.Redis, tmp_path: Path
) -> None:
    """What a worker or its work-horse imports lands on pages of its own, in every process: the mold
    loads what rq and redis-py would load lazily (a client's version lookup, the idna codec of its
    first connection, os.wait4's resource module, strptime), so that nothing is left to import."""
    imports = tmp_path / "imports.txt"
    config = tmp_path / "audit_conf.py"
    config.write_text(AUDIT_IMPORTS.format(path=str(imports)))
    s = start(RESQUE_STARTER_APP="testjobs", RESQUE_STARTER_CONFIG=str(config))
    s.wait_workers(2)
    jobs = [Queue(connection=conn).enqueue("testjobs.noop") for _ in range(4)]
    wait_for(lambda: finished(jobs), 20, what="4 jobs")
    assert not imports.exists(), imports.read_text()


def test_release_free_heap_gives_freed_memory_back() -> None:
    """What a process freed in the middle of malloc's heap stays resident, and a fork's first
    allocations would copy it: released before each fork, it costs neither process anything."""
    code = (
        "from resque_starter import procmem\n"
        "junk = [bytes(1000) for _ in range(20000)]\n"  # 20 MB of chunks in malloc's heap
        "keep = bytes(1000)\n"  # above them, so freeing them leaves a hole, not a heap to shrink
        "del junk\n"
        "before = procmem.read().uss\n"
        "procmem.release_free_heap()\n"
        "print(before - procmem.read().uss)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert int(out.stdout) > 10 * 2**20, f"released only {int(out.stdout) >> 10} kB"
