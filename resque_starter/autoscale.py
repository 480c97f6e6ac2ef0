"""Autoscaling groups (RESQUE_STARTER_AUTOSCALE=MIN:MAX, or a MIN:MAX size in GROUPS): a group's worker
count follows its backlog inside the pod.

A worker forks from the mold in milliseconds, so the pod can follow its queues much faster than the HPA
adds pods. The decision is a function of what the supervisor already knows (the agent's last queue
report, its workers' states, the cgroup's memory and CPU), made in the reconcile loop; the slot loop
then forks or gracefully stops workers as for `ctl scale` (a stopped worker finishes its job first:
nothing is lost).

- Grow while the oldest waiting job of the group's queues has waited longer than AUTOSCALE_WAIT, at most
  one change per STEP seconds, doubling the workers but adding no more than jobs wait (1, 2, 4, 8: MAX
  within seconds), up to MAX and only while the container has room for them: its memory (the cgroup's
  working set plus what a running worker costs, under MEMORY_CEILING of the limit) and its CPU (under
  CPU_BUSY of the quota over the last CPU_WINDOW: on saturated CPUs another worker only adds memory and
  latency). Without a memory limit or a CPU quota that resource never holds growth back: the container
  is not limited there. What holds it is reported.
- Shrink by one when nothing waited and a worker stayed idle for AUTOSCALE_COOLDOWN; again only after
  another full cool-down. Never below MIN.
- Hysteresis: growth needs jobs that wait too long, shrinking needs an idle worker and no waiting job for
  a whole cool-down, and each growth restarts that cool-down: a backlog that comes and goes does not flap.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from resque_starter import cgroups

STEP = 1.0  # seconds between two changes of a group's worker count
CPU_BUSY = 0.9  # the share of the CPU limit above which one more worker does not help
CPU_WINDOW = 1.0  # seconds of CPU usage (at least) the share is measured over: the last step's
MEMORY_CEILING = 0.9  # the share of the memory limit growth stops at: room for what jobs allocate


@dataclass
class Autoscaler:
    low: int
    high: int
    wait: float  # grow while the oldest waiting job waited longer than this
    cooldown: float  # shrink after this long with an idle worker and nothing waiting
    changed_at: float = -math.inf
    idle_since: float | None = None
    held: str | None = None  # what stopped the last growth wanted: "max", "memory" or "cpu"

    def window(self, low: int, high: int) -> None:
        """TTIN/TTOU move the window; a new window starts a new cool-down."""
        self.low, self.high, self.idle_since = low, high, None

    def decide(
        self, now: float, size: int, oldest_age: float | None, waiting: int | None, idle: int,
        room: Callable[[int], str | None],
    ) -> int:  # fmt: skip
        """The worker count to have now. `oldest_age` and `waiting` are None without a recent report
        from the agent: then only the window is enforced. `room(n)` says what, if anything, leaves no
        room for the group at n workers."""
        clamped = min(max(size, self.low), self.high)
        if clamped != size:
            return self._changed(now, clamped)
        if waiting is None or now - self.changed_at < STEP:
            return size
        if oldest_age is not None and oldest_age > self.wait:
            self.idle_since = None
            return self._grow(now, size, waiting, room)
        self.held = None
        if waiting > 0 or idle == 0:
            self.idle_since = None
            return size
        if self.idle_since is None:
            self.idle_since = now
        elif now - self.idle_since >= self.cooldown and size > self.low:
            self.idle_since = now  # the next one after another whole cool-down
            return self._changed(now, size - 1)
        return size

    def _grow(self, now: float, size: int, waiting: int, room: Callable[[int], str | None]) -> int:
        """Double the workers (at least one more), for no more jobs than wait, up to MAX; one more only,
        if the double has no room; none if that has none either (then `held` says why)."""
        if size >= self.high:
            self.held = "max"
            return size
        for target in dict.fromkeys((min(self.high, size + max(1, min(size, waiting))), size + 1)):
            self.held = room(target)
            if self.held is None:
                return self._changed(now, target)
        return size

    def _changed(self, now: float, size: int) -> int:
        self.changed_at = now
        return size


class CpuLoad:
    """The share of the container's CPU quota its cgroup used over the last CPU_WINDOW seconds, from
    samples of the cgroup's usage counter; nothing without a quota. The quota is read at each sample
    too (a few small file reads a second at most): it can change under a running pod (an in-place
    resize)."""

    def __init__(
        self,
        quota: Callable[[], float | None] = cgroups.cpu_quota,
        usage: Callable[[], float | None] = cgroups.cpu_usage,
    ) -> None:
        self._quota, self._usage = quota, usage
        self._samples: deque[tuple[float, float]] = deque()
        self.quota: float | None = None

    def sample(self, now: float) -> None:
        if self._samples and now - self._samples[-1][0] < STEP / 2:
            return
        self.quota = self._quota()
        used = self._usage() if self.quota is not None else None
        if used is None:
            self._samples.clear()
            return
        self._samples.append((now, used))
        while len(self._samples) > 2 and now - self._samples[1][0] >= CPU_WINDOW:
            self._samples.popleft()

    def busy(self) -> float | None:
        """The share used, or None without a quota or before two samples CPU_WINDOW apart."""
        if self.quota is None or len(self._samples) < 2:
            return None
        (t0, u0), (t1, u1) = self._samples[0], self._samples[-1]
        return (u1 - u0) / (t1 - t0) / self.quota if t1 - t0 >= CPU_WINDOW else None
