"""The progress health check (`ctl health --progress`, /healthz?check=progress): does the pod take the
jobs its queues hold? `live` only says that the supervisor answers and a mold serves; a pod whose
workers all hang, or whose queue grows while nothing is picked up, stays live forever.

A group of worker slots makes no progress when none of its workers took a job for PROGRESS_TIMEOUT
(the workers' "busy" events) and none is busy on a job within its rq timeout + STUCK_GRACE, while
either a job has waited on one of its queues for longer than PROGRESS_TIMEOUT (the agent's queue
gauges: PID 1 makes no Redis call) or every one of its workers is busy past its job's timeout + grace.
A paused, draining or empty (size 0) group is not expected to take jobs; a stopping pod is healthy; a
worker busy within its job's timeout (or on a job without one) is progress, however long the job.
Stale gauges are unknown, and unknown is healthy: the reason says so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Job:
    """A busy worker's job, from its "busy" event."""

    worker: str  # the slot's label, as `ctl status` shows it
    job: str
    started: float  # time.time()
    timeout: float | None  # rq's, in seconds; None for none


@dataclass(frozen=True)
class Group:
    """What the check reads of one group that should be taking jobs (open, size > 0)."""

    name: str
    queues: tuple[str, ...]
    workers: int  # its live workers
    jobs: tuple[Job, ...]  # their running jobs
    grace: float  # STUCK_GRACE, 0 when off
    idle_for: float  # seconds since one of its workers last took a job (or the group opened)


def check(timeout: float, groups: list[Group], gauges: dict[str, dict[str, Any]] | None) -> tuple[bool, str]:
    """(healthy, reason) for the groups that should be taking jobs; the reason names every problem."""
    if not groups:
        return True, "no group takes jobs (paused, draining or scaled to 0): no progress expected"
    notes, problems = [], []
    now = time.time()
    for g in groups:
        if g.idle_for <= timeout:
            notes.append(f"group {g.name} took a job {g.idle_for:.0f}s ago")
            continue
        stuck = [j for j in g.jobs if j.timeout is not None and now - j.started > j.timeout + g.grace]
        if len(stuck) < len(g.jobs):
            notes.append(f"group {g.name} is busy within its jobs' timeouts")
            continue
        all_stuck = bool(g.workers) and len(stuck) == g.workers
        if all_stuck:
            j = max(stuck, key=lambda j: now - j.started)
            problems.append(
                f"every worker of group {g.name} ({g.workers}) is busy past its job's timeout + STUCK_GRACE "
                f"({g.grace:g}s), the longest job {j.job} on worker {j.worker} for {now - j.started:.0f}s "
                f"(timeout {j.timeout:g}s)"
            )
        if gauges is None:
            notes.append(f"group {g.name}: queue gauges are stale (is Redis reachable?): unknown, healthy")
            continue
        ages = {q: gauges[q]["oldest_age"] for q in g.queues if q in gauges and gauges[q]["waiting"]}
        waited = {q: age for q, age in ages.items() if age is not None and age > timeout}
        if waited:
            queue = max(waited, key=lambda q: waited[q])
            problems.append(
                f"a job has waited {waited[queue]:.0f}s on queue {queue} (PROGRESS_TIMEOUT {timeout:g}s) and "
                f"no worker of group {g.name} ({g.workers}) took a job for {g.idle_for:.0f}s"
            )
        elif not all_stuck:
            notes.append(f"group {g.name}: no job waited longer than {timeout:g}s")
    return (False, "; ".join(problems)) if problems else (True, "; ".join(notes))
