"""Per-process memory from /proc/PID/smaps_rollup: what copy-on-write sharing actually saves.

`report` turns the supervisor's status into the `ctl mem` document: every process of the tree
(supervisor, molds, workers and their children: work-horses, rq's scheduler) with RSS, PSS, USS and
shared bytes, the totals, and an estimate of what the workers would use with nothing shared.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

FIELDS = ("rss", "pss", "uss", "shared")


@dataclass(frozen=True)
class Memory:
    rss: int
    pss: int
    uss: int
    shared: int


def read(pid: int | str = "self") -> Memory | None:
    """Bytes of RSS, PSS, USS (private) and shared for one process; None if it is gone or unreadable."""
    fields: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[2] == "kB":
                    fields[parts[0].rstrip(":")] = int(parts[1]) * 1024
    except OSError:
        return None
    uss = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
    shared = fields.get("Shared_Clean", 0) + fields.get("Shared_Dirty", 0)
    return Memory(rss=fields.get("Rss", 0), pss=fields.get("Pss", 0), uss=uss, shared=shared)


def release_free_heap() -> None:
    """Give the C heap's free pages back to the kernel (glibc's malloc_trim), just before a fork.

    Free chunks of malloc's heap still hold their pages. A child's first allocations land in them and
    copy them, and the parent keeps its copies of garbage for good; released, they are fresh zero
    pages for whoever allocates there (measured with the benchmark's app: the supervisor's private
    memory 1.7 MB less, the mold's and every worker's resident memory 1.6 MB less). A C library
    without malloc_trim (musl) keeps its pages."""
    import ctypes

    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


def parents() -> dict[int, int]:
    """{pid: parent pid} of every live process, from /proc/PID/stat."""
    found: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                found[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return found


def children(of: set[int]) -> dict[int, int]:
    """{pid: parent pid} of every live process whose parent is in `of`."""
    return {pid: ppid for pid, ppid in parents().items() if ppid in of}


def descendants(roots: Iterable[int]) -> list[int]:
    """Every live process descended from `roots` (not the roots): what a process tree leaves behind."""
    table = parents()
    found: list[int] = []
    frontier = list(roots)
    while frontier:
        current = frontier.pop()
        kids = [pid for pid, ppid in table.items() if ppid == current]
        found += kids
        frontier += kids
    return found


def report(status: dict[str, Any]) -> dict[str, Any]:
    """The `ctl mem` document for a supervisor's `status()`; processes gone meanwhile are left out."""
    rows: list[dict[str, Any]] = [{"role": "supervisor", "pid": status["pid"]}]
    rows += [{"role": f"mold gen={m['generation']}", "pid": m["pid"]} for m in status["molds"]]
    grouped = len(status["groups"]) > 1
    slots = {
        w["pid"]: f"{w['group']}:{w['slot']}" if grouped else str(w["slot"])
        for w in status["workers"]
        if w["pid"]
    }
    horses = {w.get("horse_pid") for w in status["workers"]}
    rows += [{"role": f"worker[{slot}]", "pid": pid} for pid, slot in slots.items()]
    owners = children(set(slots))  # horses, rq's scheduler, a pre-forked horse's forker
    owners |= {pid: owners[parent] for pid, parent in children(set(owners)).items()}  # the forker's horses
    for pid, worker in sorted(owners.items()):
        kind = "horse" if pid in horses else "child"
        rows.append({"role": f"{kind}[{slots[worker]}]", "pid": pid})
    processes = []
    for row in rows:
        mem = read(row["pid"])
        if mem is not None:
            processes.append({**row, **asdict(mem)})
    total = {name: sum(p[name] for p in processes) for name in FIELDS}
    workers = [p for p in processes if p["role"].startswith("worker[")]
    others = [p for p in processes if p["role"].startswith(("horse[", "child["))]
    jobs = [p for p in others if p["role"].startswith("horse[")]
    # Nothing shared: each worker would hold all it maps (its RSS), each child its own private memory.
    unshared = sum(p["rss"] for p in workers) + sum(p["uss"] for p in others)
    return {
        "processes": processes,
        "total": total,
        "workers": len(workers),
        "jobs": len(jobs),
        "unshared": unshared,
        "saved": round(1 - total["pss"] / unshared, 4) if unshared else None,
    }


# A worker's own memory after the fork (about 8 MB: pages its refcount writes copy) and its work-horse's
# (as much again), before anything a job allocates: what each worker adds to the shared app.
WORKER_OVERHEAD = 16 * 2**20


def fit(workers: int, supervisor: int, mold: int, limit: int | None, cpus: float | None) -> tuple[bool, str]:
    """Whether `workers` workers fit a memory limit, and the estimate in words: the app once (the mold's
    USS before any fork: every worker shares it), the supervisor, and WORKER_OVERHEAD per worker."""
    need = supervisor + mold + workers * WORKER_OVERHEAD
    cpu = f", CPU quota {cpus:g}" if cpus is not None else ""
    estimate = (
        f"estimated {mb(need)} = {mb(mold)} mold (the app and Python, shared by all workers) + "
        f"{mb(supervisor)} supervisor + {workers} x {mb(WORKER_OVERHEAD)} per worker "
        f"(a worker and its work-horse, before what jobs allocate)"
    )
    if limit is None:
        return True, f"{workers} workers: {estimate}; no container memory limit{cpu}"
    if need <= limit:
        return True, f"{workers} workers fit the container's memory limit of {mb(limit)}{cpu}: {estimate}"
    return False, (
        f"{workers} workers may not fit the container's memory limit of {mb(limit)}{cpu}: {estimate}; "
        f"lower RESQUE_STARTER_CONCURRENCY or raise the limit"
    )


def mb(value: int) -> str:
    return f"{value / 2**20:.0f} MB" if value >= 10 * 2**20 else f"{value / 2**20:.1f} MB"


def summary(mem: dict[str, Any]) -> str:
    """The saving in one sentence a person reads at a glance."""
    n = mem["workers"]
    if n == 0:
        return f"no workers; the supervisor and mold use {mb(mem['total']['pss'])} in all"
    running = f" ({mem['jobs']} running a job)" if mem["jobs"] else ""
    saved = mem["saved"] or 0.0
    verdict = f"{saved:.0%} saved" if saved >= 0 else f"{-saved:.0%} more than unshared"
    return (
        f"{n} worker{'s' if n != 1 else ''}{running} with their mold and supervisor use "
        f"{mb(mem['total']['pss'])} in all; {n} unshared cop{'ies' if n != 1 else 'y'} would use "
        f"{mb(mem['unshared'])}: {verdict}"
    )


def format_report(mem: dict[str, Any]) -> str:
    """The `ctl mem` table: one row a process, the totals, then the summary sentence."""
    header = ("PROCESS", "PID", "RSS", "PSS", "USS", "SHARED")
    rows: list[tuple[str, ...]] = [header]
    for p in mem["processes"]:
        rows.append((p["role"], str(p["pid"]), *(mb(p[name]) for name in FIELDS)))
    rows.append(("total", "", *(mb(mem["total"][name]) for name in FIELDS)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(widths[i]) if i < 2 else cell.rjust(widths[i]) for i, cell in enumerate(row))
        for row in rows
    ]
    notes = [
        "",
        summary(mem),
        "(PSS splits each shared page among the processes that map it, so the PSS total is what the tree "
        "costs; USS is private memory, what a process frees on exit; an unshared copy is a worker's RSS.)",
    ]
    return "\n".join(lines + notes)
