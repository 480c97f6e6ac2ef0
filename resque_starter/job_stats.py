"""Job metrics, counted in the supervisor from the workers' own events: no Redis call, on the job's path
or in the supervisor's loop.

A worker's "busy" event says when its job was enqueued and started (the wait, by queue); its "idle"
event after a job says how the job ended: queue, function, outcome (finished, failed, requeued,
stopped) and duration. Each becomes one observation of a fixed-bucket histogram, a bisect and two
additions in the loop. Label values are bounded: queues are the configured ones, outcomes are four,
and function names are capped (MAX_FUNCS; later ones count as `other`), so a producer that enqueues
many distinct functions cannot grow the supervisor's memory or the scrape without bound.
A worker that is killed never sends its job's end: its job is settled by the recovery, not counted here.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Any

# Seconds, the upper bounds (le) of the buckets; +Inf is implied. Jobs run from milliseconds to hours.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 1800, 3600)
WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 1800, 3600)
OUTCOMES = ("finished", "failed", "requeued", "stopped")
MAX_FUNCS = 50
OTHER = "other"


@dataclass
class Histogram:
    """Counts per bucket (not cumulative; the last is +Inf), their sum and count."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def to_dict(self) -> dict[str, Any]:
        return {"counts": list(self.counts), "sum": round(self.total, 6), "count": sum(self.counts)}


class JobStats:
    """The histograms, by (queue, func, outcome) and by queue; `snapshot` is what /metrics exports."""

    def __init__(self, max_funcs: int = MAX_FUNCS) -> None:
        self.max_funcs = max_funcs
        self.durations: dict[tuple[str, str, str], Histogram] = {}
        self.waits: dict[str, Histogram] = {}
        self._funcs: set[str] = set()

    def started(self, busy: dict[str, Any]) -> None:
        """A worker's busy event: the job's wait from enqueued to started, when both are known."""
        queue, enqueued, started = (
            busy.get("queue"),
            _number(busy.get("enqueued")),
            _number(busy.get("started")),
        )
        if not isinstance(queue, str) or enqueued is None or started is None:
            return
        if queue not in self.waits:
            self.waits[queue] = Histogram(WAIT_BUCKETS)
        self.waits[queue].observe(max(0.0, started - enqueued))

    def ended(self, ended: Any) -> None:
        """A worker's idle event's `ended`: one job's queue, function, outcome and duration."""
        if not isinstance(ended, dict):
            return
        queue, func, outcome = (ended.get(k) for k in ("queue", "func", "outcome"))
        duration = _number(ended.get("duration"))
        if (
            not isinstance(queue, str)
            or not isinstance(func, str)
            or outcome not in OUTCOMES
            or duration is None
        ):
            return
        key = (queue, self._func(func), outcome)
        if key not in self.durations:
            self.durations[key] = Histogram(DURATION_BUCKETS)
        self.durations[key].observe(max(0.0, duration))

    def _func(self, func: str) -> str:
        if func in self._funcs:
            return func
        if len(self._funcs) < self.max_funcs:
            self._funcs.add(func)
            return func
        return OTHER

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready: the bucket bounds, then one entry per label set."""
        return {
            "duration_buckets": list(DURATION_BUCKETS),
            "wait_buckets": list(WAIT_BUCKETS),
            "duration": [
                {"queue": q, "func": f, "outcome": o, **h.to_dict()}
                for (q, f, o), h in self.durations.items()
            ],
            "wait": [{"queue": q, **h.to_dict()} for q, h in self.waits.items()],
        }


def _number(value: Any) -> float | None:
    """A finite number from a worker's event, or None (a bad event is ignored, never raised in the loop)."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None
