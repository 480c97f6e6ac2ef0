"""Speed benchmark (issue 8): throughput, latency and supervisor overhead against what users pick instead.

Throughput: each system (2 rq workers over the ~100 MB app) drains a fixed count of jobs, timed from
just before they are enqueued (in one round trip) to the last one finished; the median of several runs.
Latency: TTIN to the new worker registered with rq (a fork from the mold) against a cold `rq worker`
start; QUIT (rq: TERM) to exit when idle; enqueue to job function started when a worker is idle.
Overhead: CPU seconds of resque-starter's supervisor and mold over an idle and a busy period.

    python3 bench/throughput.py [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import common
import idle
from common import RedisServer, System
from rq import Queue

N = 2
WORKLOADS = {"no-op": "bench_app.noop", "app": "bench_app.use_app"}


@dataclass
class Plan:
    jobs: int
    runs: int
    latency_samples: int
    ttin_samples: int
    cold_samples: int
    quit_samples: int
    cpu_seconds: float


FULL = Plan(
    jobs=200, runs=5, latency_samples=20, ttin_samples=10, cold_samples=3, quit_samples=3, cpu_seconds=60
)
QUICK = Plan(
    jobs=100, runs=3, latency_samples=10, ttin_samples=5, cold_samples=2, quit_samples=1, cpu_seconds=15
)


@dataclass
class Speed:
    rates: dict[str, list[float]] = field(default_factory=dict)
    cpu_ms: dict[str, list[float]] = field(default_factory=dict)
    start_latency_ms: list[float] = field(default_factory=list)
    note: str = ""

    def rate(self, workload: str) -> float:
        return common.median(self.rates[workload])

    def spread(self, workload: str) -> str:
        return f"{min(self.rates[workload]):.0f}-{max(self.rates[workload]):.0f}"


def systems(server: RedisServer) -> list[System]:
    """The systems compared, each on its own queue so that all run at once and their runs interleave."""
    return [
        common.resque_starter("resque-starter rq.Worker", N, server, "q0"),
        common.resque_starter("resque-starter SimpleWorker", N, server, "q1", worker_class="rq.SimpleWorker"),
        common.resque_starter("resque-starter prefork horse", N, server, "q2", prefork_horse="true"),
        common.rq_pool(N, server, "q3"),
        common.rq_workers(N, server, "q4"),
    ]


def drain(system: System, func: str, jobs: int) -> tuple[float, float]:
    """Jobs per second and CPU milliseconds per job for `jobs` jobs of `func`, enqueued at once onto
    the system's idle workers. CPU per job hardly depends on what else the machine runs; jobs/s does."""
    before, cpu = system.done(), system.cpu()
    began = time.perf_counter()
    system.enqueue(func, jobs)
    system.wait_done(before + jobs, timeout=max(60, jobs))
    rate = jobs / (time.perf_counter() - began)
    system.wait_idle()
    return rate, (system.cpu() - cpu) * 1000 / jobs


def start_latency_ms(system: System) -> float:
    """Milliseconds from enqueueing one job onto an idle worker to its function starting."""
    enqueued = time.time()
    job = Queue(system.queue, connection=system.conn).enqueue("bench_app.stamp")
    common.wait_until(lambda: job.get_status(refresh=True) == "finished", 30, "the stamp job", 0.002)
    started = float(job.return_value())
    system.wait_idle()
    return (started - enqueued) * 1000


def idle_horses(system: System) -> bool:
    """Whether every idle worker has a child process: the pre-forked horse waiting for a job."""
    workers = [w["pid"] for w in system.status()["workers"]]
    return all(len(common.tree([pid])) > 1 for pid in workers)


def within(predicate: Callable[[], bool], seconds: float) -> bool:
    try:
        common.wait_until(predicate, seconds, "", 0.05)
    except TimeoutError:
        return False
    return True


def measure_speeds(compared: list[System], plan: Plan) -> dict[str, Speed]:
    """All systems run at once, idle but for the one being measured; run k of each system comes before
    run k+1 of any, so a slow spell of this (shared) machine falls on all of them alike."""
    speeds = {s.label: Speed() for s in compared}
    with contextlib.ExitStack() as stack:
        for system in compared:
            stack.enter_context(system.running())
            drain(system, WORKLOADS["no-op"], 4 * N)  # warm-up: first imports, first forks
        for system in compared:
            if "prefork" in system.label and not within(lambda s=system: idle_horses(s), 5):
                speeds[system.label].note = "no idle pre-forked horse seen: the setting had no effect"
        for run in range(plan.runs):
            print(f"[throughput] run {run + 1} of {plan.runs}", flush=True)
            for name, func in WORKLOADS.items():
                for system in compared:
                    rate, cpu = drain(system, func, plan.jobs)
                    speeds[system.label].rates.setdefault(name, []).append(rate)
                    speeds[system.label].cpu_ms.setdefault(name, []).append(cpu)
        for _ in range(plan.latency_samples):
            for system in compared:
                speeds[system.label].start_latency_ms.append(start_latency_ms(system))
    return speeds


def ttin_ms(server: RedisServer, samples: int) -> list[float]:
    """Milliseconds from TTIN to the supervisor to one more worker registered with rq, `samples` times."""
    system = common.resque_starter("resque-starter TTIN", N, server, "ttin")
    result = []
    with system.running():
        for _ in range(samples):
            before = system.registered()
            began = time.perf_counter()
            system.signal(signal.SIGTTIN)
            common.wait_until(lambda b=before: system.registered() > b, 30, "the TTIN worker", 0.001)
            result.append((time.perf_counter() - began) * 1000)
    return result


def cold_start_ms(server: RedisServer, samples: int) -> list[float]:
    """Milliseconds from launching `rq worker` (the app in its settings module) to registered with rq."""
    result = []
    for _ in range(samples):
        system = common.rq_workers(1, server, "cold")
        result.append(system.start(timeout=60) * 1000)
        system.stop()
    return result


def overhead(server: RedisServer, seconds: float) -> dict[str, float]:
    """Supervisor + mold CPU seconds per minute, idle and while no-op jobs keep both workers busy."""
    system = common.resque_starter("resque-starter CPU", N, server, "cpu")
    queue = Queue(system.queue, connection=system.conn)
    result = {}
    with system.running():
        status = system.status()
        pids = [status["pid"], *(m["pid"] for m in status["molds"])]
        for phase in ("idle", "busy"):
            system.wait_idle()
            used = sum(map(common.cpu_seconds, pids))
            began = time.monotonic()
            while time.monotonic() - began < seconds:
                if phase == "busy" and queue.count < 50:
                    system.enqueue(WORKLOADS["no-op"], 100)
                time.sleep(0.1)
            result[phase] = (sum(map(common.cpu_seconds, pids)) - used) * 60 / (time.monotonic() - began)
            queue.empty()
    return result


def ms(values: list[float]) -> str:
    return f"{common.median(values):.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer jobs and samples, 15 s CPU windows")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    before = common.machine()
    with RedisServer() as server:
        speeds = measure_speeds(systems(server), plan)
        print("[latency] TTIN, cold start, QUIT ...", flush=True)
        ttin = ttin_ms(server, plan.ttin_samples)
        cold = cold_start_ms(server, plan.cold_samples)
        stopping = [common.resque_starter("resque-starter", N, server), common.rq_pool(N, server)]
        quits = {
            s.label: idle.stop_ms(s, plan.quit_samples) for s in [*stopping, common.rq_workers(N, server)]
        }
        print(f"[overhead] {plan.cpu_seconds:g} s idle, {plan.cpu_seconds:g} s busy ...", flush=True)
        cpu = overhead(server, plan.cpu_seconds)
        idle_rows = idle.measure(server, plan.latency_samples, plan.quit_samples)
    machine = f"Machine: {before} (before) / {common.machine().rsplit('; ', 1)[1]} (after)"
    report(
        machine,
        speeds,
        ttin,
        cold,
        quits,
        cpu,
        plan,
        idle.table(idle_rows, plan.latency_samples, plan.quit_samples),
    )
    labels = list(speeds)
    chart = common.bar_chart(
        "throughput",
        f"Jobs per second, {N} rq workers over a ~100 MB app (higher is better)",
        "jobs/s (median)",
        labels,
        {f"{name} jobs": [speeds[k].rate(name) for k in labels] for name in WORKLOADS},
    )
    if chart:
        print(f"chart: {chart}")


def report(
    machine: str,
    speeds: dict[str, Speed],
    ttin: list[float],
    cold: list[float],
    quits: dict[str, list[float]],
    cpu: dict[str, float],
    plan: Plan,
    idle_table: str,
) -> None:
    labels = list(speeds)
    rs, prefork, pool = labels[0], labels[2], labels[3]
    rows = []
    for label, s in speeds.items():
        row: list[object] = [label]
        for name in WORKLOADS:
            row += [s.rate(name), s.spread(name), f"{s.rate(name) / speeds[pool].rate(name):.2f}x"]
            row.append(common.median(s.cpu_ms[name]))
        rows.append([*row, ms(s.start_latency_ms), s.note or None])
    headers = ["system", "no-op jobs/s", "min-max", "vs pool", "CPU ms/job"]
    headers += ["app jobs/s", "min-max", "vs pool", "CPU ms/job", "enqueue->start ms", "note"]
    lines = [
        machine,
        f"Throughput: {plan.jobs} jobs drained by {N} workers over a ~100 MB app, median of {plan.runs}",
        "interleaved runs; CPU ms/job: CPU time of all the system's processes and the horses they reaped,",
        f"per job (median; barely changed by other load); enqueue->start: median of {plan.latency_samples} "
        "single jobs onto idle workers",
        common.table(headers, rows),
        "",
        "Latency (ms, median)",
        common.table(
            ["what", "ms", "samples"],
            [
                ["TTIN -> new worker registered (fork from the mold)", ms(ttin), len(ttin)],
                ["cold `rq worker` start -> registered", ms(cold), len(cold)],
                *[[f"graceful stop when idle -> exit: {k}", ms(v), len(v)] for k, v in quits.items()],
            ],
        ),
        "",
        f"Supervisor + mold CPU over {plan.cpu_seconds:g} s each (in clock ticks of 0.01 s): "
        f"idle {cpu['idle']:.3f} s/min, busy {cpu['busy']:.3f} s/min",
        "",
    ]
    noop = {k: s.rate("no-op") / speeds[pool].rate("no-op") for k, s in speeds.items()}
    targets = [
        ["no-op: resque-starter rq.Worker / rq worker-pool", f"{noop[rs]:.2f}x", ">= 1.1x", noop[rs] >= 1.1],
        ["no-op: prefork horse / rq worker-pool", f"{noop[prefork]:.2f}x", ">= 2x", noop[prefork] >= 2],
        ["TTIN -> registered, median", f"{ms(ttin)} ms", "<= 100 ms", common.median(ttin) <= 100],
        ["idle supervisor + mold CPU", f"{cpu['idle']:.3f} s/min", "<= 0.1 s/min", cpu["idle"] <= 0.1],
    ]
    lines += [
        "Targets (issue 8)",
        common.table(["target", "measured", "limit", "result"], _verdicts(targets)),
        "",
        idle_table,
    ]
    common.report("throughput", "\n".join(lines))


def _verdicts(rows: list[list[object]]) -> list[list[object]]:
    return [[*row[:-1], common.verdict(bool(row[-1]))] for row in rows]


if __name__ == "__main__":
    main()
