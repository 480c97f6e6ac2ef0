"""Job functions the tests enqueue. Workers import them as `testjobs.*` (tests/ is on PYTHONPATH)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import date

from rq import Queue, Retry, SimpleWorker, Worker, get_current_job
from rq.job import Job
from rq.suspension import suspend


def noop() -> str:
    return "ok"


def _record(tag: str) -> None:
    job = get_current_job()
    assert job is not None
    job.connection.rpush(f"testjobs:{tag}", job.id)


def record(tag: str = "done") -> str:
    """Push this job's id onto the list `testjobs:<tag>`: the proof it ran (and how often)."""
    _record(tag)
    return "recorded"


def sleep_then_record(seconds: float, tag: str = "done") -> str:
    _record(f"{tag}:started")
    time.sleep(seconds)
    _record(tag)
    return "slept"


def fail(message: str = "boom") -> None:
    raise RuntimeError(message)


def make_orphan(seconds: float = 0.2) -> int:
    """Double-fork a grandchild that outlives this job: it becomes the subreaper's (PID 1's) child."""
    proc = subprocess.Popen(
        [sys.executable, "-c", f"import os,time\nif os.fork()==0:\n    time.sleep({seconds})\n"],
    )
    proc.wait()
    _record("orphans")
    return proc.pid


def pid() -> int:
    return os.getpid()


def exit_process(code: int = 0) -> None:
    """End the process running the job at once, cleanly as far as its exit code tells."""
    os._exit(code)


_HOARD: list[bytes] = []


def hoard(megabytes: int) -> int:
    """Keep `megabytes` of written (so private, counted in USS) memory in the process running the job:
    under rq.SimpleWorker that is the worker itself, which max_memory then recycles."""
    _HOARD.append(b"\x01" * (megabytes << 20))
    return os.getpid()


class CountingWorker(Worker):
    """A user's own worker class: resque-starter must layer over it, not replace it."""

    def execute_job(self, job: Job, queue: Queue) -> None:
        super().execute_job(job, queue)
        self.connection.incr(f"counting:{job.id}")


_warm: dict[str, int] = {}


def lazy_load() -> dict[str, object]:
    """Loads a cache on first call in this process, as job code often does; says whether it was already
    there (inherited from a mold that ran this job before: reforking) and where it ran."""
    inherited = "cache" in _warm
    _warm.setdefault("cache", os.getpid())
    _record("lazy")
    return {"inherited": inherited, "loaded_by": _warm["cache"], "pid": os.getpid()}


_leak: list[bytearray] = []


def leak(megabytes: int = 32) -> int:
    """Keeps `megabytes` of touched memory in a module-level list: it grows whichever process ran it."""
    _leak.append(bytearray(b"x" * (megabytes << 20)))
    _record("done")
    return len(_leak)


def collect() -> int:
    """A full collection, as many libraries run: it must not unshare the frozen app."""
    import gc

    _record("done")
    return gc.collect()


# --- return values, callbacks and retries: what a pre-forked horse hands back, or finishes itself -----

PLAIN = {"ints": [1, 2**70], "float": 2.5, "text": "ü", "bytes": b"\x00\xff", "none": None, "set": {True}}
BIG = "x" * 100_000  # more than one hand-off message holds


@dataclass(frozen=True)
class Point:
    x: int
    y: int


def plain_result() -> dict[str, object]:
    return PLAIN


def rich_result() -> tuple[Point, date]:
    """Loading it imports and builds classes: the horse that made it saves it."""
    return Point(1, 2), date(2026, 11, 27)


def big_result() -> str:
    return BIG


def unpicklable_result() -> object:
    return lambda: None


def length(data: str) -> int:
    return len(data)


class Opened:
    """An argument saved as its path; once loaded it holds a lock, which no pickle takes."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __setstate__(self, state: dict[str, object]) -> None:
        vars(self).update(state, lock=threading.Lock())


def opened_path(opened: Opened) -> str:
    return opened.path


def describe() -> dict[str, object]:
    """The job as the code running it sees it (rq.get_current_job), after saving some meta."""
    job = get_current_job()
    assert job is not None
    job.meta["seen_by"] = os.getpid()
    job.save_meta()
    fields = ("id", "origin", "func_name", "args", "timeout", "created_at", "enqueued_at", "started_at")
    return {name: getattr(job, name) for name in fields} | {"status": job.get_status(refresh=False)}


def suspend_workers() -> None:
    """`rq suspend`, as an operator would run it while this job runs."""
    job = get_current_job()
    assert job is not None
    suspend(job.connection)


def retry_once() -> object:
    """Returns an rq Retry on its first run, a value on its second."""
    job = get_current_job()
    assert job is not None
    if job.connection.incr(f"testjobs:runs:{job.id}") == 1:
        return Retry(max=1)
    return "second run"


def callback_pid(job: Job, connection: object, result: object, *args: object) -> None:
    """An on_success / on_failure callback: records which process ran it."""
    job.connection.rpush(f"testjobs:callback:{job.id}", os.getpid())


class TaggedJob(Job):
    """An app's own job class, whose jobs live under keys of its own (rq lets a Job subclass choose)."""

    redis_job_namespace_prefix = "testjobs:job:"


class RusageWorker(Worker):
    """Records what rq's killed-horse hook is given, as JSON in the Redis list testjobs:killed-horses."""

    def handle_work_horse_killed(self, job: Job, retpid: int, ret_val: int, rusage: object) -> None:
        seen = [retpid, ret_val, type(rusage).__name__, getattr(rusage, "ru_maxrss", None)]
        self.connection.rpush("testjobs:killed-horses", json.dumps(seen))
        super().handle_work_horse_killed(job, retpid, ret_val, rusage)


class ForeignHorseWorker(Worker):
    """Reports as its horse a process that another one started and reaps (its pid in the Redis key
    testjobs:foreign-horse), and waits: what the supervisor sees of a pre-forked horse, whose forker
    may reap it after the worker died."""

    def fork_work_horse(self, job: Job, queue: Queue) -> None:
        self._horse_pid = int(self.connection.get("testjobs:foreign-horse") or 0)

    def monitor_work_horse(self, job: Job, queue: Queue, execution: object) -> None:
        time.sleep(3600)


class QuietWorker(Worker):
    """rq's switch that keeps a job's description, its arguments included, out of the worker's logs
    (what `rq worker --disable-job-desc-logging` sets)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **{**kwargs, "log_job_description": False})  # type: ignore[arg-type]


class QuietSimpleWorker(SimpleWorker):
    """QuietWorker's switch over rq.SimpleWorker."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **{**kwargs, "log_job_description": False})  # type: ignore[arg-type]


class PrefixedQueue(Queue):
    """An app's own queue class, whose queues live under keys of its own."""

    redis_queue_namespace_prefix = "testjobs:queue:"


def checkpoint(tag: str = "done") -> str:
    """A long job that stops well: it notes when it hears of the stop, and when Shutdown comes it saves
    its progress in job.meta and raises it again (so it is requeued with that progress)."""
    from resque_starter.job import Shutdown, seconds_left, stopping

    job = get_current_job()
    assert job is not None
    _record(f"{tag}:started")
    step = int(job.meta.get("step", 0))
    warned = False
    try:
        while True:
            if stopping() and not warned:
                warned = True
                job.connection.rpush(f"testjobs:{tag}:warned", json.dumps([job.id, seconds_left()]))
            step += 1
            time.sleep(0.02)
    except Shutdown:
        job.meta["step"] = step
        job.save_meta()
        raise


def ignore_shutdown(tag: str = "done") -> None:
    """A job that swallows every exception, Shutdown included: only SIGKILL ends it."""
    _record(f"{tag}:started")
    while True:
        try:
            time.sleep(0.05)
        except BaseException:  # what a badly written job does
            _record(f"{tag}:swallowed")


def c_sleep(seconds: int, tag: str = "done") -> None:
    """Sleep in one C call with every signal blocked: nothing but SIGKILL ends it early."""
    import ctypes
    import signal

    _record(f"{tag}:started")
    signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    ctypes.CDLL(None).sleep(seconds)


def spin(seconds: int, tag: str = "done") -> int:
    """Run `seconds`-ish inside one C call that holds the GIL (rq's SIGALRM timeout never gets a turn)."""
    _record(f"{tag}:started")
    return sum(range(seconds * 30_000_000))


def hold(megabytes: int, seconds: float, tag: str = "done") -> None:
    """Hold `megabytes` of written memory for `seconds`: a job whose work-horse costs that much."""
    held = b"\x01" * (megabytes << 20)
    time.sleep(seconds)
    assert len(held) == megabytes << 20
    _record(tag)


def burn(seconds: float, tag: str = "done") -> None:
    """Keep one CPU busy for `seconds` of wall time, in Python (rq's timeouts still work)."""
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        pass
    _record(tag)


def deaf_sleep(seconds: float, tag: str = "done") -> None:
    """Sleep with SIGALRM ignored: rq's timeout (an alarm in the process that runs the job) never fires,
    as in a job whose C library swallows it; only something outside the process can end it."""
    import signal

    _record(f"{tag}:started")
    signal.signal(signal.SIGALRM, signal.SIG_IGN)
    time.sleep(seconds)
