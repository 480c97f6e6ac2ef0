"""The desired state: what the commands table (commands.py) calls. Each method only records a wish
(stop level, intake, sizes, a reload); the converge steps of reconcile() act on it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import selectors
import signal
import time
from typing import Any

from resque_starter import commands, config_file, loader
from resque_starter.config import MAX_GROUP_SIZE, ConfigError, Settings
from resque_starter.states import Intake, StopLevel, WorkerState
from resque_starter.supervisor.state import QUICK_GRACE, STOP_REPORT_EVERY, SupervisorState, autoscalers, log


class DesiredState(SupervisorState):
    def command(self, request: commands.Request, via: str = "ctl") -> commands.Reply:
        """One request from a signal, `ctl` or the HTTP endpoint; changes desired state only. A refused
        command that would change something is logged, whoever sent it."""
        reply = commands.dispatch(self, request)
        name = request.get("cmd")
        if not reply["ok"] and isinstance(name, str) and name in commands.CHANGES:
            log.warning("%s %s refused: %s", via, name, reply["error"])
        return reply

    def group_sizes(self) -> dict[str, int]:
        return {g.name: self.sizes[i] for i, g in enumerate(self.settings.groups)}

    def request_stop(self, level: StopLevel) -> StopLevel:
        """Graceful drain, quick stop, or kill; a repeated request escalates one level."""
        if self.stop_level is not None:
            level = max(level, self.stop_level.escalated())
            if level <= self.stop_level:
                return self.stop_level
        if level > StopLevel.GRACEFUL and any(w.state == WorkerState.BUSY for w in self.workers.values()):
            self.interrupted = True
        self.stop_level = level
        timeout = self.settings.drain_timeout if level == StopLevel.GRACEFUL else QUICK_GRACE
        self.stop_deadline = time.monotonic() + timeout
        self._stop_report_at = time.monotonic() + STOP_REPORT_EVERY
        log.info("stopping: %s (deadline in %.1fs)", level.label, timeout)
        return level

    def set_intake(self, intake: Intake, group: str | None = None) -> None:
        """USR2/CONT, `ctl pause|resume|drain [GROUP]`: whether a group's (or every group's) workers take
        new jobs; a drain is a pause that `status` and the metrics report as draining."""
        for name in self.intake if group is None else [group]:
            if intake is Intake.OPEN and self.intake[name] is not Intake.OPEN:
                self.took_at[name] = time.monotonic()  # the progress check counts from the resume
            self.intake[name] = intake
        log.info("%s: %s", f"group {group}" if group else "every group", intake.value)

    def _intake_of(self, group: str) -> Intake:
        """A group's desired intake. One it does not know (new in a reload, or an old worker's group that
        a reload removed) follows the whole supervisor when every group agrees."""
        known = set(self.intake.values())
        return self.intake.get(group) or (known.pop() if len(known) == 1 else Intake.OPEN)

    @property
    def paused(self) -> bool:
        """Every group takes no new job (USR2, `ctl pause`, `ctl drain`)."""
        return all(i is not Intake.OPEN for i in self.intake.values())

    @property
    def draining(self) -> bool:
        """Intake is stopped so running jobs can finish: a `ctl drain` of every group not yet resumed, or a
        graceful stop."""
        drained = all(i is Intake.DRAINING for i in self.intake.values())
        return drained or self.stop_level == StopLevel.GRACEFUL

    def scale(self, group: str, size: int) -> None:
        index = [g.name for g in self.settings.groups].index(group)
        if self.autoscalers.pop(group, None) is not None:
            log.info("autoscale off: group %s has a fixed size now", group)
        if size and not self.sizes[index]:
            self.took_at[group] = time.monotonic()  # the progress check counts from the scale-up
        self.sizes[index] = size
        log.info("group %s: %d worker(s)", group, size)

    def shift_autoscale(self, group: str, delta: int) -> tuple[int, int] | None:
        """TTIN/TTOU (scale +N/-N) while autoscaling: move MIN:MAX by delta; None when `group` does not
        autoscale (then the command scales it as usual)."""
        scaler = self.autoscalers.get(group)
        if scaler is None:
            return None
        low, high = scaler.low + delta, scaler.high + delta
        if low < 0 or high < 1 or high > MAX_GROUP_SIZE:
            raise commands.Refused(
                f"autoscale {scaler.low}:{scaler.high} {delta:+d} leaves 0..{MAX_GROUP_SIZE}"
            )
        scaler.window(low, high)
        log.info("autoscale: group %s: %d:%d worker(s)", group, low, high)
        return low, high

    def kill_jobs(self) -> int:
        """USR1: every worker kills its running job; workers go on."""
        for w in self.workers.values():
            self._signal(w, signal.SIGUSR1)
        return sum(1 for w in self.workers.values() if w.pid is not None)

    def kill_job(self, job_id: str) -> dict[str, Any] | None:
        """`ctl kill JOB_ID`: USR1 to the worker running this job. What the worker has reported since
        the loop last read is read first, so a job that has just ended is not taken for running (its
        worker's next job would be killed instead)."""
        for w in list(self.workers.values()):
            if (w.job or {}).get("job") != job_id:
                continue
            if w.listening:
                self._on_worker_message(w)
            if w.pid is not None and w.state == WorkerState.BUSY and (w.job or {}).get("job") == job_id:
                log.info("kill job %s on worker[%s] pid %s", job_id, self._slot_label(w), w.pid)
                self._signal(w, signal.SIGUSR1)
                return w.row()
        return None

    def request_reload(self) -> None:
        """HUP: re-read the configuration and start a new generation; the loop swaps workers over.
        Only the wish is recorded here: `_converge_reload` reads the config (the file in a child, never
        in this loop) and starts the generation when the result arrives."""
        self._reload_wanted = True
        self.reload_error = None  # the outcome of this reload, once it is known (`reloading` until then)

    def _converge_reload(self) -> None:
        """Start reading the configuration when a reload is wanted (anew if a reading is under way: the
        file may have changed since it started), and apply it once it is read; a config that fails,
        hangs past its deadline or dies is a refused reload, and the serving generation goes on."""
        if self.stop_level is not None or self._reload_wanted:
            self._cancel_reload()
        if self._reload_wanted and self.stop_level is None:
            self._reload_wanted = False
            try:
                self._reloading = loader.Loading(self._flags, self._environ)
            except ConfigError as exc:
                self._refuse_reload(exc)
                return
            evaluation = self._evaluation
            if evaluation is not None:
                self._config_children.add(evaluation.pid)
                self._selector.register(evaluation.sock, selectors.EVENT_READ, evaluation.on_readable)
                log.info("reload: running %s in pid %d", evaluation.path, evaluation.pid)
        loading = self._reloading
        if loading is None or (self._evaluation is not None and not self._evaluation.done):
            return
        self._cancel_reload()
        try:
            new = loading.settings()
        except ConfigError as exc:
            self._refuse_reload(exc)
            return
        if new.redis_url is None:
            new = dataclasses.replace(new, redis_url=self.settings.redis_url)
        self.sizes = self._sizes_after_reload(new)
        windows = {g.name: g.window for g in self.settings.groups}
        self.autoscalers = autoscalers(new, self.autoscalers, windows)
        self.intake = {g.name: self._intake_of(g.name) for g in new.groups}
        for g in new.groups:
            self.took_at.setdefault(g.name, time.monotonic())
        self.settings = new
        self._generations += 1
        self.generation = self._generations
        self.reloads += 1
        self.reload_error = None
        log.info("reload: starting generation %d", self.generation)

    @property
    def _evaluation(self) -> config_file.Evaluation | None:
        """The config file a HUP is running, if any."""
        return self._reloading.evaluation if self._reloading is not None else None

    def _cancel_reload(self) -> None:
        """Stop watching the reading under way (its child is killed by close() and reaped by _reap)."""
        if self._evaluation is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(self._evaluation.sock)
            self._evaluation.close()
        self._reloading = None

    def _refuse_reload(self, exc: ConfigError) -> None:
        self.reload_error = str(exc)
        log.error("reload refused, the running generation keeps serving: %s", exc)

    def _sizes_after_reload(self, new: Settings) -> list[int]:
        """Groups match by name: one keeps the size it was scaled to (TTIN, `ctl scale`) unless the
        reload changed its configured size; a new group starts at its configured size."""
        old = {g.name: (g.size, self.sizes[i]) for i, g in enumerate(self.settings.groups)}
        return [old[g.name][1] if g.name in old and old[g.name][0] == g.size else g.size for g in new.groups]
