"""Converging the workers toward the desired state: which generation serves, slots filled and
emptied, a stop escalated on its deadline, pause and resume, recoveries handed to a mold.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import time

from resque_starter import autoscale, cgroups, procmem, watchdog
from resque_starter.config import EXIT_INTERRUPTED, EXIT_OK
from resque_starter.process_table import Worker
from resque_starter.states import Intake, StopLevel, WorkerState
from resque_starter.supervisor.state import (
    DEADLINE_MARGIN,
    MAX_SPAWNS_IN_FLIGHT,
    STOP_REPORT_EVERY,
    SupervisorState,
    log,
)

COST_MEMORY = 600.0  # seconds the most a worker held counts as its cost
COST_SAMPLES = 32  # workers whose memory _memory_fits reads (those running a job first), at most 1/s


class Converge(SupervisorState):
    def _update_serving(self) -> None:
        """The current generation serves once its mold is ready and every worker is its own and ready."""
        mold = self.molds.get(self.generation)
        if mold is None or not mold.ready or self.serving_generation == self.generation:
            return
        if (self.workers or not sum(self.sizes)) and all(
            w.ready and w.spec.generation == self.generation for w in self.workers.values()
        ):
            log.info("generation %d is serving", self.generation)
            self.serving_generation = self.generation

    def _converge_autoscale(self) -> None:
        """Each autoscaling group's size from its backlog (autoscale.py); the slot loop forks or stops."""
        if not self.autoscalers:
            return
        now = time.monotonic()
        self.cpu_load.sample(now)
        self._track_cost(now)
        rows = self.queues()
        for index, group in enumerate(self.settings.groups):
            scaler = self.autoscalers.get(group.name)
            if scaler is None or self._intake_of(group.name) is not Intake.OPEN:
                continue  # a paused or draining group's jobs wait by design: no reason to grow
            mine = None if rows is None else [rows[q] for q in group.queues if q in rows]
            waiting = None if mine is None else sum(r["waiting"] for r in mine)
            oldest = max((r["oldest_age"] for r in mine or [] if r["oldest_age"] is not None), default=None)
            idle = sum(w.spec.group == index and w.state == WorkerState.IDLE for w in self.workers.values())
            room = functools.partial(self._room, index, now)
            size = scaler.decide(now, self.sizes[index], oldest, waiting, idle, room)
            if size != self.sizes[index]:
                log.info("autoscale: group %s: %d -> %d worker(s)", group.name, self.sizes[index], size)
                self.sizes[index] = size

    def _room(self, index: int, now: float, size: int) -> str | None:
        """What leaves no room for group `index` at `size` workers: "cpu" when the container's CPUs are
        busy, "memory" when one more worker would not fit its memory; None when it fits."""
        busy = self.cpu_load.busy()
        if busy is not None and busy >= autoscale.CPU_BUSY:
            return "cpu"
        more = size - self.sizes[index]
        return None if self._memory_fits(sum(self.sizes) + more, now) else "memory"

    def _memory_fits(self, total: int, now: float) -> bool:
        """Whether `total` workers fit the container's memory, under MEMORY_CEILING of its limit: the
        cgroup's working set now, plus what each worker lacks now of the most one worker held with its
        work-horse within COST_MEMORY (an idle worker, or one whose horse has just forked or exited, is
        about to hold as much), plus that cost for each worker not forked yet. Without a working set to
        read, the start-up estimate (the mold's cost per worker)."""
        limit = cgroups.memory_limit()
        if limit is None:
            return True
        used = cgroups.memory_used()
        if used is None:
            mold = self.molds.get(self.serving_generation)
            own, app = procmem.read(), procmem.read(mold.pid) if mold is not None else None
            return own is None or app is None or procmem.fit(total, own.uss, app.uss, limit, None)[0]
        live, held, cost = self._worker_costs(now)
        lacking = sum(cost - h for h in held) + max(0, total - len(live)) * cost
        return used + lacking <= limit * autoscale.MEMORY_CEILING

    def _track_cost(self, now: float) -> None:
        """Once a STEP while jobs run under a memory limit, whether or not growth is wanted: the first
        burst after a quiet spell then knows what a job costs before its own horses allocate."""
        if now - self.worker_cost_read < autoscale.STEP or not any(w.job for w in self.workers.values()):
            return
        if cgroups.memory_limit() is not None:
            self._worker_costs(now)

    def _worker_costs(self, now: float) -> tuple[list[Worker], list[int], int]:
        """The live workers (those running a job first), what each of up to COST_SAMPLES of them holds,
        and a worker's cost: the most one held within COST_MEMORY, at least procmem.WORKER_OVERHEAD (a
        horse just forked holds little yet: its job's may be the peak's). Read once per pass of the loop:
        the tracking and each size tried share one reading."""
        if self.worker_cost_read == now and self._worker_holdings is not None:
            live, held = self._worker_holdings
            return live, held, self.worker_cost[1]
        live = sorted(
            (w for w in self.workers.values() if w.pid is not None and not w.stopping),
            key=lambda w: not w.job,
        )
        held = [self._holds(w) for w in live[:COST_SAMPLES]]
        cost = max([procmem.WORKER_OVERHEAD, *held])
        if cost >= self.worker_cost[1] or now - self.worker_cost[0] > COST_MEMORY:
            self.worker_cost = (now, cost)
        self.worker_cost_read, self._worker_holdings = now, (live, held)
        return live, held, self.worker_cost[1]

    @staticmethod
    def _holds(w: Worker) -> int:
        """The private memory a worker holds with its work-horse, if it runs one (/proc/PID/smaps_rollup)."""
        pids = [w.pid, (w.job or {}).get("horse")]
        return sum(m.uss for pid in pids if pid and (m := procmem.read(pid)) is not None)

    def _converge_slots(self) -> None:
        mold = self.molds.get(self.generation)
        now = time.monotonic()
        limit = sum(self.sizes) + self.settings.reload_surge
        for w in list(self.workers.values()):
            if not w.stopping and (
                w.spec.group >= len(self.sizes) or w.spec.slot >= self.sizes[w.spec.group]
            ):
                self._stop_worker(w, StopLevel.GRACEFUL, "scale down")
        if mold is None or not mold.ready:
            return
        for group, size in enumerate(self.sizes):
            for slot in range(size):
                occupants = [w for w in self.workers.values() if w.key == (group, slot) and not w.stopping]
                current = [w for w in occupants if w.spec.generation == self.generation]
                old = self._newest_old([w for w in occupants if w.spec.generation != self.generation])
                if current:
                    if current[0].ready:
                        for w in old:
                            replaced = f"replaced by generation {self.generation}"
                            self._stop_worker(w, StopLevel.GRACEFUL, replaced)
                    continue
                if self.backoff.get((group, slot), (0, 0.0))[1] > now:
                    continue
                if old and len(self.workers) >= limit:
                    continue
                if mold.hung or len(mold.pending) >= MAX_SPAWNS_IN_FLIGHT:
                    return  # the rest when it has answered
                self._spawn(mold, group, slot)

    def _newest_old(self, old: list[Worker]) -> list[Worker]:
        """A reload during a reload can leave a slot with workers of two old generations: the newest ready
        one keeps serving it, the others are stopped. Otherwise both would count against the surge limit
        and no worker of the current generation could start (seen with two quick HUPs)."""
        ready = [w for w in old if w.ready and w.pid is not None]
        if len(old) < 2 or not ready:
            return old
        keep = max(ready, key=lambda w: w.spec.generation)
        for w in old:
            if w is not keep:
                self._stop_worker(w, StopLevel.GRACEFUL, f"replaced by generation {keep.spec.generation}")
        return [keep]

    def _converge_stop(self) -> None:
        assert self.stop_level is not None and self.stop_deadline is not None
        now = time.monotonic()
        if now >= self.stop_deadline and self.stop_level < StopLevel.KILL and self.workers:
            if self.stop_level == StopLevel.GRACEFUL:
                log.warning(
                    "the drain ran out of time (RESQUE_STARTER_DRAIN_TIMEOUT=%gs) with %s: interrupting them",
                    self.settings.drain_timeout,
                    self._still_running(),
                )
            else:
                log.warning("stop deadline passed with %s; killing them", self._still_running())
            self.request_stop(self.stop_level.escalated())
        elif self.workers and now >= self._stop_report_at:
            self._stop_report_at = now + STOP_REPORT_EVERY
            left = self.stop_deadline - now
            log.info(
                "stopping (%s): waiting for %s; %.0fs left",
                self.stop_level.label,
                self._still_running(),
                left,
            )
        for w in self.workers.values():
            if w.stop_level is None or w.stop_level < self.stop_level:
                self._stop_worker(w, self.stop_level, "shutdown")
        if not self.workers and self.recoveries and time.monotonic() >= self.stop_deadline:
            self._abandon_recoveries()
        if not self.workers and not self.recoveries and self._lease_released():
            self.exit_code = self._pending_exit or (EXIT_INTERRUPTED if self.interrupted else EXIT_OK)

    def _still_running(self) -> str:
        """What a stop waits for, in words: workers, and the jobs they run."""
        jobs = [str(w.job.get("job")) for w in self.workers.values() if w.state == WorkerState.BUSY and w.job]
        shown = f" ({', '.join(jobs[:10])}{', ...' if len(jobs) > 10 else ''})" if jobs else ""
        return f"{len(self.workers)} worker(s), {len(jobs)} running job(s){shown}"

    def _abandon_recoveries(self) -> None:
        """A stop is bounded by its deadline even when a recovery still waits for Redis: rq's own
        maintenance will find those jobs (after its abandoned-job timeout) instead."""
        for r in self.recoveries.values():
            log.error("stop deadline passed: gave up recovering the jobs of dead worker %s; the pod's lease "
                      "still names it, so another pod settles them once it expires", r.worker)  # fmt: skip
            if r.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(r.pid, signal.SIGKILL)
        self.recoveries.clear()
        self.interrupted = True
        if self.agent is not None:  # the lease must expire, not be released
            self._kill_agent(self.agent)

    def _holds_intake(self, group: str) -> bool:
        """A group's workers take no job while it is paused, nor before the expired leases found at start
        are settled (so a dead pod's jobs, requeued at the front, run first)."""
        return not self.swept or self._intake_of(group) is not Intake.OPEN

    def _converge_deadlines(self) -> None:
        """A worker stopped gracefully is killed once DRAIN_TIMEOUT is over (its own deadline for its job
        came first); the watchdog kills one whose job runs in it past its timeout (see `watchdog`)."""
        now = time.monotonic()
        for w in list(self.workers.values()):
            if w.kill_at is not None and now >= w.kill_at and w.stop_level == StopLevel.GRACEFUL:
                log.warning(
                    "worker[%s] pid %s outlived its stop's deadline; killing it", self._slot_label(w), w.pid
                )
                self._stop_worker(w, StopLevel.KILL, w.stop_reason)
            watchdog.tend(w, self.settings.stuck_grace, self.settings.run_dir, self._slot_label(w))

    def _converge_pause(self) -> None:
        for w in self.workers.values():
            paused = self._holds_intake(w.group)
            # only once ready: before, its handlers may not be installed, and a signal would be lost
            if w.ready and w.paused != paused and not w.stopping:
                w.paused = paused
                self._signal(w, signal.SIGUSR2 if paused else signal.SIGCONT)
                if not paused and w.state == WorkerState.PAUSED:
                    w.state = WorkerState.IDLE  # a worker resumed before its wait for jobs began says nothing

    def _converge_recoveries(self) -> None:
        mold = self._ready_mold()
        if mold is None:
            return
        for r in self.recoveries.values():
            if not r.sent and r.after_pid is None:
                r.sent = True
                token = f"recover:{r.worker}"
                request = {
                    "op": "recover",
                    "token": token,
                    "worker": r.worker,
                    "queues": list(r.queues),
                    "requeue": r.requeue,
                    "reason": r.reason,
                }
                self._send_mold(mold, token, request)

    def _stop_worker(self, w: Worker, level: StopLevel, reason: str) -> None:
        if w.pid is None:
            return  # the mold has not told us its pid yet; the next reconcile (on "forked") stops it
        w.stop_level, w.stop_reason = level, reason
        if level == StopLevel.GRACEFUL and w.kill_at is None:
            w.kill_at = time.monotonic() + self.settings.drain_timeout + DEADLINE_MARGIN
        if level == StopLevel.KILL:
            horse = (w.job or {}).get("horse")
            if isinstance(horse, int):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(horse, signal.SIGKILL)
        self._signal(w, level.signal)

    def _signal(self, w: Worker, sig: int) -> None:
        if w.pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(w.pid, sig)
