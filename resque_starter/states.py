"""The supervisor's named states: how hard a stop is, what a worker is doing, whether a group takes jobs.

One declaration each, so the supervisor, the status document, the metrics and `ctl` cannot drift
apart. The values are the words of the status JSON (its wire format), so a member compares equal to
the string a client reads there.
"""

from __future__ import annotations

import enum
import signal


class StopLevel(enum.IntEnum):
    """A stop, in escalating order: a repeated request, or a passed deadline, moves one level up."""

    GRACEFUL = 0
    QUICK = 1
    KILL = 2

    @property
    def label(self) -> str:
        """The word of the status document's `stopping` field."""
        return self.name.lower()

    @property
    def signal(self) -> signal.Signals:
        """What each worker is sent at this level (TERM: finish the job; INT: requeue it; KILL)."""
        return _STOP_SIGNALS[self]

    def escalated(self) -> StopLevel:
        return StopLevel(min(self + 1, StopLevel.KILL))


_STOP_SIGNALS = {
    StopLevel.GRACEFUL: signal.SIGTERM,
    StopLevel.QUICK: signal.SIGINT,
    StopLevel.KILL: signal.SIGKILL,
}


class WorkerState(enum.StrEnum):
    """A worker's state as `ctl status` and the metrics show it."""

    STARTING = "starting"  # forked, not yet registered with rq
    IDLE = "idle"  # waiting for a job
    BUSY = "busy"  # running a job (also while it stops, so its job stays visible)
    PAUSED = "paused"  # acknowledged a pause: takes no new job
    STOPPING = "stopping"  # told to stop, with no job running
    PROMOTING = "promoting"  # becoming the next mold (REFORK_AFTER)


class Intake(enum.Enum):
    """Whether a group's workers take new jobs: a drain is a pause that status reports as draining."""

    OPEN = "open"
    PAUSED = "paused"
    DRAINING = "draining"
