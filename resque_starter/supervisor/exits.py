"""Reaping and exits: whose child died, a worker's exit and what it means (crash loop and backoff,
a reload abandoned, its jobs to recover), the orphaned horse watched, exits reaped before we knew whose.
"""

from __future__ import annotations

import contextlib
import os
import random
import selectors
import signal
import time

from resque_starter import job as job_api
from resque_starter import stacks
from resque_starter.config import EXIT_CRASH_LOOP
from resque_starter.process_table import Recovery, Worker, describe_status
from resque_starter.states import StopLevel, WorkerState
from resque_starter.supervisor.state import (
    BACKOFF_BASE,
    BACKOFF_MAX,
    CRASH_LIMIT,
    EARLY_EXIT_TTL,
    EARLY_EXITS_MAX,
    MIN_UPTIME,
    SupervisorState,
    log,
)


class Exits(SupervisorState):
    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._on_exit(pid, status)

    def _on_exit(self, pid: int, status: int) -> None:
        if pid in self._config_children:
            self._config_children.discard(pid)
            if self._evaluation is not None and self._evaluation.pid == pid:
                self._evaluation.exited(status)
            return
        if self.agent is not None and self.agent.pid == pid:
            self._on_agent_exit(self.agent, status)
            return
        for mold in list(self.molds.values()):
            if mold.pid == pid:
                self._on_mold_exit(mold, status)
                return
        for w in list(self.workers.values()):
            if w.pid == pid:
                self._on_worker_exit(w, status)
                return
        for r in self.recoveries.values():
            if r.pid == pid:
                del self.recoveries[r.worker]
                if status != 0:
                    log.error("recovery of %s failed (%s)", r.worker, describe_status(status))
                return
        self._horse_gone(pid)  # a dead worker's horse, killed by us, may be ours to reap
        if self._annotator is not None and self._annotator.exited(pid):
            return
        if self._redis is not None and pid == self._redis.pid:
            self._on_redis_exit(self._redis, status)
            return
        # a worker or recovery child may die before the mold has told us its pid; or an adopted orphan
        now = time.monotonic()
        self.early_exits[pid] = (status, now)
        while (
            len(self.early_exits) > EARLY_EXITS_MAX
            or now - next(iter(self.early_exits.values()))[1] > EARLY_EXIT_TTL
        ):
            self.early_exits.pop(next(iter(self.early_exits)))
        log.debug("reaped pid %d (%s)", pid, describe_status(status))

    def _on_worker_exit(self, w: Worker, status: int) -> None:
        if w.pid is not None:
            stacks.remove(self.settings.run_dir, w.pid)
        if w.listening:
            self._on_worker_message(w)  # what it said last (a "busy") may still be unread
        self._forget(w)
        uptime = time.monotonic() - w.started_at
        # an exit 0 with a job running (a job calling os._exit(0) in a SimpleWorker) is no clean exit
        clean = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 and w.state != WorkerState.BUSY
        log_fn = log.info if clean or w.stop_level is not None else log.warning
        log_fn(
            "worker[%s] pid %s gen %d exited (%s) after %.1fs",
            self._slot_label(w),
            w.pid,
            w.spec.generation,
            describe_status(status),
            uptime,
        )
        if not clean:
            self._recover(w, status)
        if w.stop_level is not None or self.stop_level is not None:
            return
        self.restarts += 1
        count = self.backoff.get(w.key, (0, 0.0))[0]
        if clean or uptime >= MIN_UPTIME:
            self.backoff.pop(w.key, None)
            return
        count += 1
        delay = min(BACKOFF_MAX, BACKOFF_BASE * 2 ** (count - 1)) * random.uniform(0.8, 1.2)
        self.backoff[w.key] = (count, time.monotonic() + delay)
        if count >= CRASH_LIMIT:
            self._on_crash_loop(w)
        else:
            log.warning(
                "worker[%s] crashed within %.0fs of start; respawning in %.1fs",
                self._slot_label(w),
                MIN_UPTIME,
                delay,
            )

    def _on_crash_loop(self, w: Worker) -> None:
        if w.spec.generation == self.generation and self.serving_generation not in (0, self.generation):
            self.reload_error = f"generation {self.generation}: workers crash at start; reload abandoned"
            log.error("%s; generation %d keeps serving", self.reload_error, self.serving_generation)
            self._revert_generation()
            return
        log.error(
            "crash loop: worker[%s] died within %.0fs of start %d times in a row; giving up",
            self._slot_label(w),
            MIN_UPTIME,
            CRASH_LIMIT,
        )
        self.request_stop(StopLevel.QUICK)
        self._pending_exit = EXIT_CRASH_LOOP

    def _revert_generation(self) -> None:
        """A reload that cannot serve is abandoned: the serving generation and its settings stay."""
        self.generation = self.serving_generation
        serving = self.molds.get(self.serving_generation)
        if serving is not None:
            self.settings = serving.settings
        self.backoff.clear()

    def _recover(self, w: Worker, status: int) -> None:
        """A worker died without cleaning up: kill its orphaned horse, then fix its jobs in Redis."""
        stopping = self.stop_level is not None and self.stop_level >= StopLevel.QUICK
        # a worker that killed itself at its job's stop deadline was stopping, unless it killed a job (USR1)
        deadline = w.deadline_kind in (job_api.STOP, job_api.QUICK)
        shutdown = w.stop_level == StopLevel.KILL or stopping or deadline
        if w.state == WorkerState.BUSY:  # a stop that costs a job its normal end (killed, failed) exits 1
            self.interrupted = self.interrupted or self.stop_level is not None
        horse = (w.job or {}).get("horse")
        after_pid = None
        if isinstance(horse, int) and self._take_early_exit(horse) is None:
            # not reaped by us, so the pid is still the horse's: kill it before touching its job
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(horse, signal.SIGKILL)
                after_pid = horse
        reason = (
            f"interrupted by shutdown: worker pid {w.pid} ({w.spec.name}) was killed"
            if shutdown
            else w.stuck
            or f"worker pid {w.pid} ({w.spec.name}) died ({describe_status(status)}) while running this job"
        )
        self.recoveries[w.spec.name] = Recovery(w.spec.name, w.queues, shutdown, reason, after_pid)
        if after_pid is not None:
            self._watch_exit(after_pid)

    def _watch_exit(self, horse: int) -> None:
        """Learn when the killed horse has exited, whoever reaps it. rq's horse, orphaned, is reaped by
        us; a pre-forked horse may be reaped by its forker, and then its exit never reaches us (seen
        in the chaos storm: the recovery waited for the stop deadline)."""
        try:
            fd = os.pidfd_open(horse)
        except ProcessLookupError:  # reaped already
            self._horse_gone(horse)
            return
        except OSError:  # no pidfd (before Linux 5.3): only our own reaping of it tells
            return
        self._selector.register(fd, selectors.EVENT_READ, lambda f: self._on_horse_exit(horse, f))

    def _on_horse_exit(self, horse: int, fd: int) -> None:
        self._selector.unregister(fd)
        os.close(fd)
        self._horse_gone(horse)

    def _horse_gone(self, horse: int) -> None:
        for r in self.recoveries.values():
            if r.after_pid == horse:
                r.after_pid = None

    def _forget(self, w: Worker) -> None:
        self.workers.pop(w.spec.name, None)
        if w.listening:
            self._selector.unregister(w.status)
        w.status.close()

    def _take_early_exit(self, pid: int) -> int | None:
        """The exit status reaped for `pid` before we knew whose it was, if `pid` still means that
        process: an entry is stale once it is older than EARLY_EXIT_TTL (the late news it waits for
        comes within milliseconds) or once `pid` is a child of ours again. A child's pid is not reused
        until we reap it, so waitid (WNOWAIT: it reaps nothing) tells truly whether pid was reused."""
        status, reaped = self.early_exits.pop(pid, (None, 0.0))
        if status is None or time.monotonic() - reaped > EARLY_EXIT_TTL:
            return None
        try:
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return status  # not a child of ours: the exit we reaped is the news about pid
        log.debug("pid %d was reused by a new child; its early exit entry is stale", pid)
        return None
