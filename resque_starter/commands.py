"""The one table of commands: every way to steer the supervisor goes through `dispatch`.

Signals (mapped by `for_signal`), `resque-starter ctl` (the control socket) and the HTTP endpoint's
/healthz and /readyz all send the same request, `{"cmd": NAME, ...arguments}`, so each argument is
validated once, with one error wording and one bound (TTIN and `ctl scale` both stop at
MAX_GROUP_SIZE). A command only changes the supervisor's *desired* state, through the narrow
`Supervised` interface; the reconcile loop does the rest. Replies are JSON objects with `ok`.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any, Protocol

from resque_starter import procmem
from resque_starter.config import MAX_GROUP_SIZE
from resque_starter.states import Intake, StopLevel

Request = dict[str, Any]
Reply = dict[str, Any]
Dispatch = Callable[[Request], Reply]
HEALTH_CHECKS = ("live", "ready", "progress")


class Supervised(Protocol):
    """What commands may read and change on the supervisor, and nothing more."""

    def group_sizes(self) -> dict[str, int]:
        """Each group's desired size, by name, in configuration order."""

    @property
    def stop_level(self) -> StopLevel | None: ...

    def scale(self, group: str, size: int) -> None:
        """A fixed size (it turns the group's autoscale off)."""

    def shift_autoscale(self, group: str, delta: int) -> tuple[int, int] | None:
        """Move an autoscaling group's MIN:MAX; None when the group does not autoscale."""

    def set_intake(self, intake: Intake, group: str | None) -> None: ...

    def request_stop(self, level: StopLevel) -> StopLevel:
        """The level now in effect (a repeated request escalates)."""

    def request_reload(self) -> None:
        """Re-read the configuration (in a child) and start a new generation with it; status() tells
        `reloading` until then, and `reload_error` if it is refused."""

    def kill_jobs(self) -> int:
        """Every worker kills its running job (USR1); how many workers were told."""

    def kill_job(self, job_id: str) -> dict[str, Any] | None:
        """The status row of the worker told to kill this job, or None when no worker runs it."""

    def status(self) -> dict[str, Any]: ...

    def job_stats(self) -> dict[str, Any]:
        """The job metrics' histograms (job_stats.JobStats.snapshot)."""

    def demand(self) -> dict[str, Any] | None:
        """queue_gauges.demand from the agent's last report; None without a recent one."""

    def health(self, check: str) -> Reply: ...


class Refused(Exception):
    """A request the supervisor refuses: its message is the reply's `error`."""


def dispatch(sup: Supervised, request: Request) -> Reply:
    """Run one request against the supervisor; a refused one gets `{"ok": false, "error": ...}`."""
    name = request.get("cmd")
    command = COMMANDS.get(name) if isinstance(name, str) else None
    if command is None:
        return {"ok": False, "error": f"unknown command {name!r}"}
    try:
        return command(sup, request)
    except Refused as exc:
        return {"ok": False, "error": str(exc)}


SIGNALS: dict[int, Request] = {
    signal.SIGQUIT: {"cmd": "stop"},
    signal.SIGINT: {"cmd": "stop", "quick": True},
    signal.SIGUSR1: {"cmd": "kill-jobs"},
    signal.SIGUSR2: {"cmd": "pause"},
    signal.SIGCONT: {"cmd": "resume"},
    signal.SIGTTIN: {"cmd": "scale", "n": "+1"},
    signal.SIGTTOU: {"cmd": "scale", "n": "-1"},
    signal.SIGHUP: {"cmd": "reload"},
}


def for_signal(signum: int, term: str) -> Request | None:
    """The request a signal stands for; TERM is a graceful or a quick stop as RESQUE_STARTER_TERM says."""
    if signum == signal.SIGTERM:
        return {"cmd": "stop", "quick": term != StopLevel.GRACEFUL.label}
    return SIGNALS.get(signum)


# --------------------------------------------------------------------------- arguments


def _group(sup: Supervised, request: Request) -> str | None:
    """The request's GROUP (a name as `ctl status` shows it), or None when it names none."""
    group = request.get("group")
    names = list(sup.group_sizes())
    if group is None or (isinstance(group, str) and group in names):
        return group
    raise Refused(f"unknown group {group!r}; groups: {'; '.join(names)}")


def _not_stopping(sup: Supervised) -> None:
    if sup.stop_level is not None:
        raise Refused("the supervisor is stopping")


# --------------------------------------------------------------------------- the commands


def _status(sup: Supervised, request: Request) -> Reply:
    return {"ok": True, "status": sup.status()}


def _job_stats(sup: Supervised, request: Request) -> Reply:
    return {"ok": True, "job_stats": sup.job_stats()}


def _demand(sup: Supervised, request: Request) -> Reply:
    demand = sup.demand()
    if demand is None:
        raise Refused("no recent queue report from the agent (is Redis reachable?)")
    return {"ok": True, **demand}


def _mem(sup: Supervised, request: Request) -> Reply:
    return {"ok": True, "mem": procmem.report(sup.status())}


def _health(sup: Supervised, request: Request) -> Reply:
    check = request.get("check", "live")
    if check not in HEALTH_CHECKS:
        raise Refused(f"health checks are 'live', 'ready' and 'progress', not {check!r}")
    return sup.health(check)


def _scale(sup: Supervised, request: Request) -> Reply:
    """N, +N or -N workers in GROUP (default: the first), from 0 to MAX_GROUP_SIZE."""
    n = request.get("n")
    group = _group(sup, request)
    sizes = sup.group_sizes()
    name = group if group is not None else next(iter(sizes))
    text = str(n).strip()
    try:
        value = int(text)
    except ValueError:
        raise Refused(f"scale takes N, +N or -N, not {n!r}") from None
    if text[:1] in "+-":
        _not_stopping(sup)
        window = sup.shift_autoscale(name, value)
        if window is not None:
            return {"ok": True, "group": name, "autoscale": list(window)}
    size = sizes[name] + value if text[:1] in "+-" else value
    if size < 0:
        raise Refused(f"scale {text} would make {size} workers; the least is 0")
    if size > MAX_GROUP_SIZE:
        raise Refused(f"scale {text} would make {size} workers; the most is {MAX_GROUP_SIZE}")
    _not_stopping(sup)
    sup.scale(name, size)
    return {"ok": True, "group": name, "size": size}


def _intake(intake: Intake) -> Callable[[Supervised, Request], Reply]:
    """pause, resume, drain: of one GROUP, or of every group when none is named."""

    def command(sup: Supervised, request: Request) -> Reply:
        group = _group(sup, request)
        sup.set_intake(intake, group)
        return {"ok": True, "groups": [group] if group is not None else list(sup.group_sizes())}

    return command


def _reload(sup: Supervised, request: Request) -> Reply:
    _not_stopping(sup)
    sup.request_reload()
    return {"ok": True, "reloading": True}


def _stop(sup: Supervised, request: Request) -> Reply:
    quick = request.get("quick", False)
    if not isinstance(quick, bool):
        raise Refused(f"stop takes quick: true or false, not {quick!r}")
    level = sup.request_stop(StopLevel.QUICK if quick else StopLevel.GRACEFUL)
    return {"ok": True, "stopping": level.label}


def _kill_jobs(sup: Supervised, request: Request) -> Reply:
    return {"ok": True, "workers": sup.kill_jobs()}


def _kill(sup: Supervised, request: Request) -> Reply:
    """Kill one running job, found among the workers' status rows (as USR1 does on that worker)."""
    job_id = request.get("job")
    if not isinstance(job_id, str) or not job_id:
        raise Refused(f"kill takes the id of a running job, not {job_id!r}")
    row = sup.kill_job(job_id)
    if row is None:
        raise Refused(f"no worker is running job {job_id!r}")
    return {"ok": True, "job": job_id, "worker": row}


COMMANDS: dict[str, Callable[[Supervised, Request], Reply]] = {
    "status": _status,
    "job-stats": _job_stats,
    "demand": _demand,
    "mem": _mem,
    "health": _health,
    "scale": _scale,
    "pause": _intake(Intake.PAUSED),
    "drain": _intake(Intake.DRAINING),
    "resume": _intake(Intake.OPEN),
    "reload": _reload,
    "stop": _stop,
    "kill-jobs": _kill_jobs,
    "kill": _kill,
}
CHANGES = frozenset(COMMANDS) - {
    "status",
    "job-stats",
    "mem",
    "health",
}  # the commands that change desired state
