"""The chaos soak, shared by tests/chaos/test_chaos.py (small numbers, in CI) and bench/soak.py (big ones).

One round: enqueue `jobs` short jobs that record their own start and completion in Redis, start a
supervisor, and for `storm_seconds` hit it with a seeded random storm of TTIN, TTOU, USR1, USR2,
CONT, HUP, `ctl scale`, SIGTERM, SIGINT and SIGKILL of random workers and SIGKILL of work-horses,
while a thread samples /proc for zombies. Then: the worker count must converge to the target, QUIT
must stop it cleanly, and a fresh supervisor drains what is left. Finally every job is checked
against the promise of docs/reliability.md: finished exactly once (or requeued, then finished), or
failed with a reason a storm event explains; no started/WIP entry, claim list, intermediate list or worker
registration is left.

Everything random comes from `random.Random(seed)`, and the seed is in every failure message, so a
failure can be replayed with `python bench/soak.py --seed N` (or the test id).
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
from rq import Queue, Retry
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry

from resque_starter.recovery import CLAIM_PREFIX, REQUEUES_META_KEY

from starter import Starter, base_env, cmdline, descendants, process_state

TAG = "chaos"
STARTED_KEY, DONE_KEY = f"testjobs:{TAG}:started", f"testjobs:{TAG}"
MIN_VICTIM_UPTIME = 6.0  # older than the supervisor's MIN_UPTIME: a kill is then not a crash at start
YOUNG_KILLS = 2  # kills of young workers in a row per slot, well below the supervisor's CRASH_LIMIT
# A zombie is normal between a child's exit and its reaping: an instant for the supervisor (SIGCHLD), up
# to a poll (about a second) for a worker's pre-forked horse. One that outlives this is a leak.
ZOMBIE_GRACE = 3.0
SAMPLE_INTERVAL = 0.05
HORSE = " horse "  # in the title of a running horse ("horse job=...") and of a pre-forked one
RETRY_MAX = 1

# Why a job may legitimately fail in a storm: each names the event that caused it.
FAILURE_REASONS = (
    "resque-starter: job killed by SIGUSR1",  # USR1
    "Work-horse terminated unexpectedly",  # SIGKILL of a horse (rq's own words)
    "while running this job",  # SIGKILL of a worker: "worker pid N (...) died (killed by SIGKILL) ..."
    "interrupted by shutdown",  # SIGINT of a worker, once a job has been requeued MAX_REQUEUES times
)


@dataclass(frozen=True)
class Plan:
    """How big one round is. The defaults are the CI size."""

    seed: int
    jobs: int = 1000
    storm_seconds: float = 10.0
    concurrency: int = 3
    max_workers: int = 6
    queues: tuple[str, ...] = ("high", "default")
    worker_class: str = "rq.Worker"
    prefork_horse: bool = False
    slow_share: float = 0.05  # jobs of 0.2-0.5 s, so stops and kills find jobs running
    retry_share: float = 0.1  # jobs with an rq Retry, which a kill must honour
    converge_timeout: float = 40.0
    drain_timeout: float = 120.0

    @property
    def replay(self) -> str:
        return (
            f"chaos seed={self.seed} (replay: python bench/soak.py --seed {self.seed} --jobs {self.jobs} "
            f"--storm {self.storm_seconds:g} --worker-class {self.worker_class}"
            f"{' --prefork-horse' if self.prefork_horse else ''})"
        )


@dataclass
class Storm:
    """What the storm did, for the checks and for the failure message."""

    plan: Plan
    target: int
    events: list[str] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    young_kills: Counter[int] = field(default_factory=Counter)  # per slot, in a row
    t0: float = field(default_factory=time.monotonic)

    def note(self, what: str) -> None:
        self.events.append(f"{time.monotonic() - self.t0:7.2f}s {what}")

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.events[-n:])


class ChaosFailure(AssertionError):
    pass


class ZombieWatch(threading.Thread):
    """Samples the supervisor's process tree; remembers every zombie that outlived ZOMBIE_GRACE."""

    def __init__(self, root: int) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.samples = 0
        self.first_seen: dict[int, float] = {}
        self.leaks: dict[int, str] = {}
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(SAMPLE_INTERVAL):
            self.sample()

    def sample(self) -> None:
        now = time.monotonic()
        zombies = {pid for pid in [self.root, *descendants(self.root)] if process_state(pid) == "Z"}
        self.samples += 1
        for pid in list(self.first_seen):
            if pid not in zombies:
                del self.first_seen[pid]
        for pid in zombies:
            first = self.first_seen.setdefault(pid, now)
            if now - first >= ZOMBIE_GRACE and pid not in self.leaks:
                self.leaks[pid] = f"pid {pid} a zombie for {now - first:.1f}s, parent {parent(pid)}"

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)


def parent(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            ppid = int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return "?"
    return f"{ppid} ({cmdline(ppid)[:60]})"


# ------------------------------------------------------------------------------------------ a round


def run_round(plan: Plan, redis_url: str, run_dir: str, out: Callable[[str], None] = print) -> Storm:
    """One whole round; a broken promise raises ChaosFailure, with the seed and the last storm events."""
    out(plan.replay)
    conn = redis.Redis.from_url(redis_url)
    conn.flushall()
    rng = random.Random(plan.seed)
    job_ids = enqueue(conn, plan, rng)
    env = base_env(
        redis_url,
        run_dir,
        RESQUE_STARTER_CONCURRENCY=str(plan.concurrency),
        RESQUE_STARTER_QUEUES=",".join(plan.queues),
        RESQUE_STARTER_WORKER_CLASS=plan.worker_class,
        RESQUE_STARTER_LOG_LEVEL="INFO",
        RESQUE_STARTER_PREFORK_HORSE=str(plan.prefork_horse).lower(),
    )
    storm = Storm(plan, plan.concurrency)
    starter = Starter(env)
    watch = ZombieWatch(starter.pid)
    try:
        watch.start()
        starter.wait_workers(plan.concurrency, timeout=30)
        try:
            blow(starter, storm, rng)
            converge(starter, storm)
        except AssertionError as exc:
            raise _failure(plan, storm, f"{exc}\n--- supervisor log:\n{starter.log()[-3000:]}") from None
        tree = descendants(starter.pid)
        storm.note("QUIT")
        starter.signal(signal.SIGQUIT)
        code = starter.wait_exit(60)
        watch.stop()
        _check(code == 0, plan, storm, f"QUIT exited {code}, expected 0\n{starter.log()[-3000:]}")
        left = [f"{p} {cmdline(p)}" for p in tree if process_state(p) is not None]
        _check(not left, plan, storm, f"processes left after QUIT: {left}")
        _check(
            not watch.leaks, plan, storm, f"zombies in {watch.samples} samples: {list(watch.leaks.values())}"
        )
        check_nothing_held(conn, plan, storm, "after the storm's supervisor exited")
        out(
            f"storm: {dict(storm.counts)}; {conn.llen(DONE_KEY)} completions; "
            f"{watch.samples} process samples, no zombie"
        )
    finally:
        watch.stop()
        starter.stop()
    drain(plan, storm, env, conn, job_ids)
    summary = check_jobs(conn, plan, storm, job_ids)
    out(f"seed {plan.seed}: {summary}")
    return storm


def enqueue(conn: redis.Redis, plan: Plan, rng: random.Random) -> list[str]:
    """Mostly instant jobs, a few slow ones, some with a Retry; spread over the queues."""
    ids = []
    queues = {name: Queue(name, connection=conn) for name in plan.queues}
    with conn.pipeline() as pipe:
        for _ in range(plan.jobs):
            seconds = rng.uniform(0.2, 0.5) if rng.random() < plan.slow_share else rng.uniform(0, 0.01)
            retry = Retry(max=RETRY_MAX) if rng.random() < plan.retry_share else None
            queue = queues[rng.choice(plan.queues)]
            job = queue.enqueue("testjobs.sleep_then_record", seconds, TAG, retry=retry, pipeline=pipe)
            ids.append(job.id)
        pipe.execute()
    return ids


# ------------------------------------------------------------------------------------------ the storm


def blow(starter: Starter, storm: Storm, rng: random.Random) -> None:
    """Random events at random short intervals until storm_seconds have passed."""
    actions: list[tuple[Callable[[Starter, Storm, random.Random], str], float]] = [
        (ttin, 1.5),
        (ttou, 1.5),
        (scale, 0.5),
        (usr1, 1),
        (usr2, 0.5),
        (cont, 1.5),
        (hup, 0.3),
        (kill_worker, 3),
        (term_worker, 1),
        (int_worker, 1),
        (kill_horse, 3),
    ]
    functions, weights = zip(*actions, strict=True)
    deadline = time.monotonic() + storm.plan.storm_seconds
    while time.monotonic() < deadline:
        starter.assert_running()
        action = rng.choices(functions, weights)[0]
        storm.note(action(starter, storm, rng))
        storm.counts[action.__name__] += 1
        time.sleep(rng.uniform(0.05, 0.4))


def ttin(starter: Starter, storm: Storm, rng: random.Random) -> str:
    if storm.target >= storm.plan.max_workers:
        return ttou(starter, storm, rng)
    return _resize(starter, storm, signal.SIGTTIN, storm.target + 1)


def ttou(starter: Starter, storm: Storm, rng: random.Random) -> str:
    return _resize(starter, storm, signal.SIGTTOU, max(0, storm.target - 1))


def _resize(starter: Starter, storm: Storm, sig: int, target: int) -> str:
    """Signals of one kind coalesce while pending, so wait until this one is seen before the next."""
    starter.signal(sig)
    storm.target = target
    wait_size(starter, target)
    return f"{signal.Signals(sig).name} -> {target}"


def scale(starter: Starter, storm: Storm, rng: random.Random) -> str:
    n = rng.randint(0, storm.plan.max_workers)
    reply = starter.ctl({"cmd": "scale", "n": str(n)})
    assert reply.get("ok"), f"ctl scale {n}: {reply}"
    storm.target = n
    return f"ctl scale {n}"


def wait_size(starter: Starter, target: int, timeout: float = 5.0) -> None:
    """The desired size, as the supervisor reports it: the signal was handled (promptly)."""
    deadline = time.monotonic() + timeout
    while starter.status()["groups"][0]["size"] != target:
        assert time.monotonic() < deadline, f"the supervisor did not take size {target} within {timeout}s"
        time.sleep(0.02)


def usr1(starter: Starter, storm: Storm, rng: random.Random) -> str:
    starter.signal(signal.SIGUSR1)
    return "USR1"


def usr2(starter: Starter, storm: Storm, rng: random.Random) -> str:
    starter.signal(signal.SIGUSR2)
    return "USR2"


def cont(starter: Starter, storm: Storm, rng: random.Random) -> str:
    starter.signal(signal.SIGCONT)
    return "CONT"


def hup(starter: Starter, storm: Storm, rng: random.Random) -> str:
    starter.signal(signal.SIGHUP)
    return "HUP"


def kill_worker(starter: Starter, storm: Storm, rng: random.Random) -> str:
    return _hit_worker(starter, storm, rng, signal.SIGKILL)


def term_worker(starter: Starter, storm: Storm, rng: random.Random) -> str:
    """A worker stopped from outside, gracefully: it finishes its job, exits, and its slot is refilled."""
    return _hit_worker(starter, storm, rng, signal.SIGTERM)


def int_worker(starter: Starter, storm: Storm, rng: random.Random) -> str:
    """A worker stopped quickly from outside (rq's `shutdown` command does this): its job goes back."""
    return _hit_worker(starter, storm, rng, signal.SIGINT)


def _hit_worker(starter: Starter, storm: Storm, rng: random.Random, sig: signal.Signals) -> str:
    """Send sig to a worker, a busy one when there is one. A worker that exits young, unasked, counts
    as a crash at start, and CRASH_LIMIT of those in a row in one slot rightly end the supervisor
    (exit 4), so a slot gets at most YOUNG_KILLS of them in a row."""
    workers = [
        w
        for w in starter.status()["workers"]
        if w["pid"] and (w["uptime"] >= MIN_VICTIM_UPTIME or storm.young_kills[w["slot"]] < YOUNG_KILLS)
    ]
    if not workers:
        return f"{sig.name} worker: none to hit"
    victim = rng.choice([w for w in workers if w["state"] == "busy"] or workers)
    label = f"{victim['state']} worker[{victim['slot']}] up {victim['uptime']:.1f}s"
    text = _send(storm, victim["pid"], sig, "worker[", label)
    if victim["uptime"] >= MIN_VICTIM_UPTIME:
        storm.young_kills[victim["slot"]] = 0
    else:
        storm.young_kills[victim["slot"]] += 1
    return text


def kill_horse(starter: Starter, storm: Storm, rng: random.Random) -> str:
    horses = [p for p in descendants(starter.pid) if HORSE in cmdline(p)]
    if not horses:
        return "SIGKILL horse: none running"
    return _send(storm, rng.choice(horses), signal.SIGKILL, HORSE, "horse")


def _send(storm: Storm, pid: int, sig: signal.Signals, title: str, label: str) -> str:
    """Signal pid if it still is what we think it is (a recycled pid must not be shot)."""
    if title not in cmdline(pid):
        return f"{sig.name} {label} pid {pid}: already gone"
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return f"{sig.name} {label} pid {pid}: already gone"
    storm.counts[f"{sig.name} {label.split()[0]}"] += 1
    return f"{sig.name} {label} pid {pid}"


def converge(starter: Starter, storm: Storm) -> None:
    """After the storm: exactly `target` ready workers, and as many worker processes, none stopping."""
    storm.note(f"waiting for {storm.target} workers")
    deadline = time.monotonic() + storm.plan.converge_timeout
    seen: Any = None
    while True:
        starter.assert_running()
        status = starter.status()
        workers = status["workers"]
        processes = [p for p in descendants(starter.pid) if "resque-starter: worker[" in cmdline(p)]
        horses = [p for p in processes if HORSE in cmdline(p)]
        seen = (status["groups"][0]["size"], len(workers), len(processes) - len(horses))
        if (
            seen == (storm.target,) * 3
            and all(w["ready"] and not w["stopping"] for w in workers)
            and len({w["generation"] for w in workers}) <= 1
        ):
            storm.note(f"{storm.target} workers")
            return
        assert time.monotonic() < deadline, (
            f"worker count did not converge to {storm.target} in {storm.plan.converge_timeout}s: "
            f"(size, status rows, processes) = {seen}; {workers}"
        )
        time.sleep(0.1)


# ------------------------------------------------------------------------------------------ afterwards


def drain(plan: Plan, storm: Storm, env: dict[str, str], conn: redis.Redis, job_ids: list[str]) -> None:
    """A fresh, undisturbed supervisor runs whatever the storm left queued; then QUIT."""
    starter = Starter(env)
    try:
        starter.wait_workers(plan.concurrency, timeout=30)
        deadline = time.monotonic() + plan.drain_timeout
        while (left := unsettled(conn, plan)) > 0:
            starter.assert_running()
            _check(time.monotonic() < deadline, plan, storm, f"{left} job(s) still unsettled after the drain")
            time.sleep(0.1)
        starter.signal(signal.SIGQUIT)
        code = starter.wait_exit(60)
        _check(code == 0, plan, storm, f"the draining supervisor exited {code}\n{starter.log()[-3000:]}")
    finally:
        starter.stop()
    check_nothing_held(conn, plan, storm, "after the drain")


def unsettled(conn: redis.Redis, plan: Plan) -> int:
    """Jobs still queued, running, or scheduled for a retry."""
    with conn.pipeline() as pipe:
        for name in plan.queues:
            pipe.llen(f"rq:queue:{name}")
            pipe.zcard(StartedJobRegistry(name, connection=conn).key)
            pipe.zcard(f"rq:scheduled:{name}")
        return sum(pipe.execute())


def check_nothing_held(conn: redis.Redis, plan: Plan, storm: Storm, when: str) -> None:
    """docs/reliability.md: nothing in started/WIP after exit; no claim, no intermediate, no worker."""
    wip = {key.decode(): conn.zrange(key, 0, -1) for key in conn.scan_iter("rq:wip:*") if conn.zcard(key)}
    claims = [key.decode() for key in conn.scan_iter(f"{CLAIM_PREFIX}*")]
    intermediate = [key.decode() for key in conn.scan_iter("rq:queue:*:intermediate") if conn.llen(key)]
    workers = [m.decode() for key in conn.scan_iter("rq:workers*") for m in conn.smembers(key)]
    workers += [
        k.decode()
        for k in conn.scan_iter("rq:worker:*")
        if not k.endswith(b":executions") and not conn.hexists(k, "death")
    ]
    executions = [key.decode() for key in conn.scan_iter("rq:worker:*:executions") if conn.scard(key)]
    problems = {
        "started/WIP entries": wip,
        "claim lists": claims,
        "intermediate lists": intermediate,
        "worker registrations": workers,
        "worker executions": executions,
    }
    found = {name: value for name, value in problems.items() if value}
    _check(not found, plan, storm, f"{when}: {found}")


def check_jobs(conn: redis.Redis, plan: Plan, storm: Storm, job_ids: list[str]) -> str:
    """Every job: finished exactly once (more only if it was requeued or retried), or failed for a reason
    the storm explains; never lost, never in two states."""
    starts = Counter(x.decode() for x in conn.lrange(STARTED_KEY, 0, -1))
    dones = Counter(x.decode() for x in conn.lrange(DONE_KEY, 0, -1))
    failed = {i for name in plan.queues for i in FailedJobRegistry(name, connection=conn).get_job_ids()}
    finished = {i for name in plan.queues for i in FinishedJobRegistry(name, connection=conn).get_job_ids()}
    problems: list[str] = []
    outcomes: Counter[str] = Counter()
    for job_id, job in zip(job_ids, Job.fetch_many(job_ids, connection=conn), strict=True):
        if job is None:
            problems.append(f"{job_id}: lost (no job hash)")
            continue
        problem = _check_job(job, starts[job_id], dones[job_id], job_id in failed, job_id in finished)
        if problem:
            problems.append(f"{job_id} ({job.args}): {problem}")
        outcomes[job.get_status(refresh=False) or "?"] += 1
        outcomes["requeued"] += bool(job.meta.get(REQUEUES_META_KEY))
    explained = storm.counts["usr1"] * storm.plan.max_workers + storm.counts["SIGKILL busy"]
    explained += storm.counts["SIGKILL horse"] + storm.counts["SIGINT busy"]
    if outcomes[JobStatus.FAILED] > explained:
        problems.append(f"{outcomes[JobStatus.FAILED]} failures but the storm explains at most {explained}")
    _check(
        not problems, plan, storm, f"{len(problems)} job(s) broke the promise:\n" + "\n".join(problems[:30])
    )
    return ", ".join(f"{k}={v}" for k, v in sorted(outcomes.items()))


def _check_job(job: Job, starts: int, dones: int, in_failed: bool, in_finished: bool) -> str | None:
    status = job.get_status(refresh=False)
    requeues = int(job.meta.get(REQUEUES_META_KEY, 0))
    retries = RETRY_MAX - job.retries_left if job.retries_left is not None else 0
    reruns = requeues + retries
    if dones > starts:
        return f"completed {dones} times but started {starts} times"
    if status == JobStatus.FINISHED:
        if in_failed or not in_finished:
            return f"finished, but in FailedJobRegistry={in_failed}, FinishedJobRegistry={in_finished}"
        if not 1 <= dones <= 1 + reruns:
            return f"finished, but completed {dones} times ({requeues} requeues, {retries} retries)"
        return None
    if status == JobStatus.FAILED:
        reason = job.latest_result()
        text = reason.exc_string if reason is not None else None
        if not in_failed:
            return "failed, but not in FailedJobRegistry"
        if not text or not any(r in text for r in FAILURE_REASONS):
            return f"failed for a reason no storm event explains: {text!r}"
        if dones > 1 + reruns:
            return f"failed, but completed {dones} times"
        return None
    return f"ended {status} (expected finished or failed)"


def _failure(plan: Plan, storm: Storm, message: str) -> ChaosFailure:
    return ChaosFailure(f"[{plan.replay}]\n{message}\n--- last storm events:\n{storm.tail()}")


def _check(ok: bool, plan: Plan, storm: Storm, message: str) -> None:
    if not ok:
        raise _failure(plan, storm, message)
