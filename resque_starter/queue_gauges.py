"""Per-queue gauges, read by the agent (PID 1 makes no Redis call): jobs waiting, the oldest waiting
job's age, jobs started (rq's StartedJobRegistry, every pod's). Two round trips for all the queues.

The agent reports them to the supervisor as {"event": "queues", "queues": {name: row}}; the supervisor
keeps the last report for /metrics, `ctl status` and the scaling endpoint (/scale), which reads no Redis.
"""

from __future__ import annotations

import math
import time
from datetime import UTC
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import redis

INTERVAL = 2.0  # seconds between two readings: fresher than KEDA's polling, cheap for Redis
AUTOSCALE_INTERVAL = 1.0  # when a group autoscales: a burst is seen a second sooner
STALE = 3 * INTERVAL  # a report older than this is not served: the agent or Redis is in trouble


def read(connection: redis.Redis, queues: list[str]) -> dict[str, dict[str, Any]]:
    """{queue: {"waiting": n, "oldest_age": seconds or None, "started": n}} for each queue. rq pops
    from the head of a queue's list, so the head is the job that waited longest (a job requeued at the
    front by a stop counts from its first enqueue)."""
    # imported here: the supervisor imports this module for `valid` and `demand`, and holds no rq
    from rq.job import Job
    from rq.queue import Queue
    from rq.registry import StartedJobRegistry
    from rq.utils import as_text, utcparse

    with connection.pipeline(transaction=False) as pipe:
        for name in queues:
            key = Queue(name, connection=connection).key
            pipe.llen(key)
            pipe.lindex(key, 0)
            pipe.zcard(StartedJobRegistry(name, connection=connection).key)
        replies = pipe.execute()
    rows: dict[str, dict[str, Any]] = {}
    heads = {}
    for i, name in enumerate(queues):
        waiting, head, started = replies[3 * i : 3 * i + 3]
        rows[name] = {"waiting": int(waiting), "oldest_age": None, "started": int(started)}
        if head is not None:
            heads[name] = as_text(head)
    if heads:
        with connection.pipeline(transaction=False) as pipe:
            for job_id in heads.values():
                pipe.hget(Job.key_for(job_id), "enqueued_at")
            stamps = pipe.execute()
        now = time.time()
        for name, stamp in zip(heads, stamps, strict=True):
            if stamp:
                enqueued = utcparse(as_text(stamp)).replace(tzinfo=UTC).timestamp()
                rows[name]["oldest_age"] = round(max(0.0, now - enqueued), 3)
    return rows


def valid(report: Any) -> dict[str, dict[str, Any]] | None:
    """The agent's report as the supervisor keeps it, or None when it is malformed (never raised)."""
    if not isinstance(report, dict):
        return None
    rows = {}
    for name, row in report.items():
        if not isinstance(name, str) or not isinstance(row, dict):
            return None
        waiting, started, age = row.get("waiting"), row.get("started"), row.get("oldest_age")
        if not (_count(waiting) and _count(started)) or not (age is None or _seconds(age)):
            return None
        rows[name] = {"waiting": waiting, "oldest_age": age, "started": started}
    return rows


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _seconds(value: Any) -> bool:
    return (
        isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    )


def demand(rows: dict[str, dict[str, Any]], capacity: int) -> dict[str, Any]:
    """The scaling endpoint's answer: pods wanted for the jobs waiting and running on these queues, at
    `capacity` workers a pod (KEDA's metrics-api scaler reads `desired_pods`)."""
    waiting = sum(row["waiting"] for row in rows.values())
    running = sum(row["started"] for row in rows.values())
    desired = math.ceil((waiting + running) / capacity) if capacity > 0 else 0
    return {"desired_pods": desired, "waiting": waiting, "running": running, "capacity_per_pod": capacity,
            "queues": sorted(rows)}  # fmt: skip
