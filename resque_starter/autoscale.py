"""RESQUE_STARTER_AUTOSCALE=MIN:MAX: the first group's worker count follows its backlog inside the pod.

A worker forks from the mold in milliseconds, so the pod can follow its queues much faster than the HPA
adds pods. The decision is a pure function of what the supervisor already knows (the agent's last queue
report, its workers' states, the memory estimate), made in the reconcile loop; the slot loop then forks
or gracefully stops workers as for `ctl scale` (a stopped worker finishes its job first: nothing is lost).

- Grow, one worker at a time (at most one change per STEP seconds), while the oldest waiting job of the
  group's queues has waited longer than AUTOSCALE_WAIT, up to MAX and only while one more worker fits the
  container's memory (procmem.fit: the mold's measured cost per worker against the cgroup limit).
- Shrink by one when nothing waited and a worker stayed idle for AUTOSCALE_COOLDOWN; again only after
  another full cool-down. Never below MIN.
- Hysteresis: growth needs jobs that wait too long, shrinking needs an idle worker and no waiting job for
  a whole cool-down, and each growth restarts that cool-down: a backlog that comes and goes does not flap.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

STEP = 1.0  # seconds between two changes of the worker count


@dataclass
class Autoscaler:
    low: int
    high: int
    wait: float  # grow while the oldest waiting job waited longer than this
    cooldown: float  # shrink after this long with an idle worker and nothing waiting
    changed_at: float = -math.inf
    idle_since: float | None = None

    def window(self, low: int, high: int) -> None:
        """TTIN/TTOU move the window; a new window starts a new cool-down."""
        self.low, self.high, self.idle_since = low, high, None

    def decide(
        self, now: float, size: int, oldest_age: float | None, waiting: int | None, idle: int,
        fits: Callable[[int], bool],
    ) -> int:  # fmt: skip
        """The worker count to have now. `oldest_age` and `waiting` are None without a recent report
        from the agent: then only the window is enforced."""
        clamped = min(max(size, self.low), self.high)
        if clamped != size:
            return self._changed(now, clamped)
        if waiting is None or now - self.changed_at < STEP:
            return size
        if oldest_age is not None and oldest_age > self.wait:
            self.idle_since = None
            return self._changed(now, size + 1) if size < self.high and fits(size + 1) else size
        if waiting > 0 or idle == 0:
            self.idle_since = None
            return size
        if self.idle_since is None:
            self.idle_since = now
        elif now - self.idle_since >= self.cooldown and size > self.low:
            self.idle_since = now  # the next one after another whole cool-down
            return self._changed(now, size - 1)
        return size

    def _changed(self, now: float, size: int) -> int:
        self.changed_at = now
        return size
