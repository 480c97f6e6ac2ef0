"""Memory benchmark (issue 7): total PSS of every process of each system, idle and under load.

Each system runs 4 rq workers over the ~100 MB app (bench_app) and is measured from a fresh start, per
workload: idle after start; the peak while 4 jobs run at once (sampled continuously, round after
round); idle after the jobs. PSS splits every shared page among the processes sharing it, so the
sum over a process tree is what the tree really costs.

    python3 bench/memory.py [--quick]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import common
from common import MB, Snapshot, System


@dataclass
class Workload:
    name: str
    func: str
    seconds: float


WORKLOADS = (
    Workload("import-only", "bench_app.hold", 1.0),
    Workload("realistic", "bench_app.realistic", 1.0),
)
SETTLE = 1.5  # seconds a system must look unchanged before an idle sample


def total(snap: Snapshot) -> float:
    return sum(mem.pss for _, mem in snap) / MB


@dataclass
class Result:
    processes: int = 0
    idle_start: float = 0.0
    peaks: list[float] | None = None
    idle_after: float = 0.0
    generation: int | None = None  # resque-starter's generation at the end: a refork makes a new one
    detail: dict[str, Snapshot] = field(default_factory=dict)

    @property
    def peak(self) -> float:
        return max(self.peaks or [0.0])

    @property
    def last_peak(self) -> float:
        return (self.peaks or [0.0])[-1]


def settled(system: System) -> Callable[[], bool]:
    """True once the system is idle and, for resque-starter, one generation serves every slot."""

    def check() -> bool:
        system.wait_idle()
        if system.run_dir is None:
            return True
        status = system.status()
        workers = status["workers"]
        return (
            len(status["molds"]) == 1
            and len(workers) == system.workers
            and all(w["ready"] and w["generation"] == status["generation"] for w in workers)
        )

    return check


def settle(system: System) -> None:
    """Wait until the system has looked idle, with the same processes, for SETTLE seconds.

    A stable window rather than one look: horses exit just after their job, and a refork may begin
    just after a worker's Nth job.
    """
    check = settled(system)
    since: float | None = None
    seen: list[int] = []

    def stable() -> bool:
        nonlocal since, seen
        pids = sorted(system.pids())
        if not check() or pids != seen:
            since, seen = None, pids
            return False
        since = since or time.monotonic()
        return time.monotonic() - since >= SETTLE

    common.wait_until(stable, 120, f"{system.label} to settle", 0.1)


def peak_during(system: System, workload: Workload, jobs: int, done_before: int) -> Snapshot:
    """Enqueue `jobs` jobs and sample the system until they have all finished: the largest sample."""
    system.enqueue(workload.func, jobs, workload.seconds)
    peak: Snapshot = []
    while system.done() < done_before + jobs:
        peak = max(peak, system.snapshot(), key=total)
    return peak


def measure(system: System, workload: Workload, rounds: int) -> Result:
    system.conn.flushall()
    with system.running():
        settle(system)
        start = system.snapshot()
        result = Result(processes=len(start), idle_start=total(start), peaks=[], detail={"idle start": start})
        for n in range(rounds):
            peak = peak_during(system, workload, system.workers, n * system.workers)
            result.peaks.append(total(peak))
            result.detail[f"peak round {n + 1}"] = peak
            settle(system)
        result.detail["idle after"] = system.snapshot()
        result.idle_after = total(result.detail["idle after"])
        if system.run_dir is not None:
            result.generation = system.status()["generation"]
    return result


def details(results: dict[str, dict[str, Result]]) -> str:
    """Every process of every sample shown in the table: where the memory is, for whoever improves it."""
    lines = []
    for workload, by_system in results.items():
        for label, result in by_system.items():
            for when, snap in result.detail.items():
                lines.append(f"== {workload} / {label} / {when}: total PSS {total(snap):.1f} MB")
                rows = [[t[:70], m.pss / MB, m.uss / MB, m.shared / MB, m.rss / MB] for t, m in snap]
                lines += [common.table(["process", "PSS", "USS", "shared", "RSS"], rows), ""]
    return "\n".join(lines)


def systems(n: int, server: common.RedisServer, refork_after: int) -> list[System]:
    refork = f"resque-starter refork={refork_after}"
    return [
        common.resque_starter("resque-starter", n, server),
        common.resque_starter(refork, n, server, refork_after=str(refork_after)),
        common.rq_pool(n, server),
        common.rq_workers(n, server),
        common.single(server),
    ]


def targets(results: dict[str, dict[str, Result]], labels: list[str]) -> list[tuple[str, ...]]:
    """(target, measured, limit, 1 process, PASS/MISS) for each target of issue 7.

    `1 process` is the same ratio for the single process holding the app: a limit below it is one no
    system of 4 workers can meet (it holds what that process holds, and more), and the result says so.
    """
    rs, refork, pool, floor = labels[0], labels[1], labels[2], labels[4]
    imp, real = results["import-only"], results["realistic"]
    rows = []

    def ratio(name: str, value: float, base: float, limit: float, single: float | None) -> None:
        measured = value / base
        result = common.verdict(measured <= limit)
        if single is not None and measured > limit and single > limit:
            result += " (limit below 1 process)"
        shown = "-" if single is None else f"{single:.2f}x"
        rows.append((name, f"{measured:.2f}x", f"<= {limit}x", shown, result))

    idle, peak = imp[pool].idle_start, real[pool].peak
    ratio(
        "import-only idle: resque-starter / rq worker-pool",
        imp[rs].idle_start,
        idle,
        0.4,
        imp[floor].idle_start / idle,
    )
    ratio(
        "import-only idle: resque-starter / 1 process", imp[rs].idle_start, imp[floor].idle_start, 1.3, None
    )
    ratio(
        "realistic peak: resque-starter / rq worker-pool", real[rs].peak, peak, 0.4, real[floor].peak / peak
    )
    ratio(
        "realistic peak after refork: refork / rq worker-pool",
        real[refork].last_peak,
        peak,
        0.25,
        real[floor].peak / peak,
    )
    for workload, label in (("import-only", rs), ("realistic", rs), ("realistic", refork)):
        r, single = results[workload][label], results[workload][floor]
        name = f"{workload} idle after / idle at start: {label}"
        ratio(name, r.idle_after, r.idle_start, 1.05, single.idle_after / single.idle_start)
    return rows


HEADERS = [
    "system",
    "procs",
    "idle start",
    "peak",
    "peak last",
    "idle after",
    "idle/pool",
    "peak/pool",
    "gen",
]


def _row(r: Result, pool: Result) -> list[object]:
    idle, peak = f"{r.idle_start / pool.idle_start:.2f}x", f"{r.peak / pool.peak:.2f}x"
    return [r.processes, r.idle_start, r.peak, r.last_peak, r.idle_after, idle, peak, r.generation]


def render(results: dict[str, dict[str, Result]], labels: list[str], rounds: int, n: int) -> list[str]:
    """The report: one table per workload, then the targets; `gen` is resque-starter's last generation."""
    pool, refork = labels[2], results["realistic"][labels[1]]
    text = [
        f"Total PSS (MB) of every process, N = {n} workers, ~100 MB app, {rounds} rounds of {n} jobs at once",
        "(peak = the highest sample over all rounds; peak last = the last round's)",
        "",
    ]
    for workload in WORKLOADS:
        res = results[workload.name]
        rows = [[label, *_row(r, res[pool])] for label, r in res.items()]
        text += [
            f"{workload.name} ({workload.func}, {workload.seconds:g} s)",
            common.table(HEADERS, rows),
            "",
        ]
    if refork.generation == 1:
        text += [f"note: {labels[1]} ended in generation 1: no refork happened in this run", ""]
    return [
        *text,
        "Targets (issue 7)",
        common.table(["target", "measured", "limit", "1 process", "result"], targets(results, labels)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2 rounds of jobs instead of 3")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--refork-after", type=int, default=1, help="RESQUE_STARTER_REFORK_AFTER")
    args = parser.parse_args()
    rounds = 2 if args.quick else 3
    results: dict[str, dict[str, Result]] = {w.name: {} for w in WORKLOADS}
    before = common.machine()
    with common.RedisServer() as server:
        compared = systems(args.workers, server, args.refork_after)
        for workload in WORKLOADS:
            for system in compared:
                print(f"[{workload.name}] {system.label} ...", flush=True)
                results[workload.name][system.label] = measure(system, workload, rounds)
    labels = [s.label for s in compared]
    machine = f"Machine: {before} (before) / {common.machine().rsplit('; ', 1)[1]} (after)"
    common.report("memory", "\n".join([machine, *render(results, labels, rounds, args.workers)]))
    path = common.OUT / "memory-processes.txt"
    path.write_text(details(results))
    print(f"per process: {path}")
    chart = common.bar_chart(
        "memory",
        f"Total PSS, {args.workers} rq workers over a ~100 MB app (lower is better)",
        "MB",
        labels,
        {
            "import-only, idle": [results["import-only"][k].idle_start for k in labels],
            "realistic, peak": [results["realistic"][k].peak for k in labels],
            "realistic, peak last round": [results["realistic"][k].last_peak for k in labels],
            "realistic, idle after": [results["realistic"][k].idle_after for k in labels],
        },
    )
    if chart:
        print(f"chart: {chart}")


if __name__ == "__main__":
    main()
