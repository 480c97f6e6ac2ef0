"""What the workers say and what commands read: worker events, job counters, the status document,
health checks and the process title.
"""

from __future__ import annotations

import os
import time
from typing import Any

from resque_starter import config, progress, queue_gauges
from resque_starter.process_table import Worker
from resque_starter.protocol import JOB_COUNTERS
from resque_starter.states import Intake, WorkerState
from resque_starter.supervisor.state import AGENT_REPORT_STALE, SupervisorState, _receive


class Reports(SupervisorState):
    def _on_worker_message(self, w: Worker) -> None:
        data = _receive(w.status)
        if data is None:
            return
        if not data:
            self._selector.unregister(w.status)  # the worker is gone or going; reaping tells how
            w.listening = False
            if w.pid is None and w.stopping:  # a spawn its dying mold never forked
                self._forget(w)
            return
        for message in w.buffer.feed(data):
            event = message.get("event")
            if event == "ready":
                w.ready = True
                w.state = WorkerState.PAUSED if w.paused else WorkerState.IDLE
                if w.pid is None:
                    w.pid = int(message.get("pid", 0)) or None
                    if w.stop_level is not None:  # forked by a mold that died before it told us
                        self._signal(w, w.stop_level.signal)
            elif event == "busy":
                w.state, w.job, w.dump_asked = WorkerState.BUSY, message, None
                self.job_metrics.started(message)
                self.took_at[w.group] = time.monotonic()
            elif event == "idle":
                w.state, w.job, w.dump_asked = (
                    (WorkerState.PAUSED if w.paused else WorkerState.IDLE),
                    None,
                    None,
                )
                self._count_jobs(w, message)
                self.job_metrics.ended(message.get("ended"))
            elif event == "paused" and w.state != WorkerState.BUSY:
                w.state = WorkerState.PAUSED
            elif event == "resumed" and w.state == WorkerState.PAUSED:
                w.state = WorkerState.IDLE
            elif event == "recycle":
                w.stop_reason = f"recycle: {message.get('reason')}"
            elif event == "promote-ready":
                w.promotable = True
            elif event == "deadline":
                w.deadline_kind = int(message.get("kind", 0))
            elif message.get("op") == "ready" and w.promoting is not None:
                self._adopt_mold(w)
                return

    def _count_jobs(self, w: Worker, message: dict[str, Any]) -> None:
        """Take a worker's own counters, and add what they grew by to totals that outlive the worker."""
        if self.stop_level is not None and int(message.get("requeued", w.requeued)) > w.requeued:
            self.interrupted = True  # a job that heard the stop was requeued: the stop interrupted it
        for name in JOB_COUNTERS:
            value = int(message.get(name, getattr(w, name)))
            self.jobs[name] += value - getattr(w, name)
            setattr(w, name, value)

    def status(self) -> dict[str, Any]:
        """The status document (`ctl status --json`, the metrics): its field names are a wire format."""
        order = sorted(self.workers.values(), key=lambda w: (w.spec.group, w.spec.slot, w.spec.generation))
        workers = [w.row() for w in order]
        return {
            "pid": os.getpid(),
            "uptime": round(time.time() - self.started, 3),
            "generation": self.generation,
            "serving_generation": self.serving_generation,
            "groups": [
                {"name": g.name, "queues": list(g.queues), "size": self.sizes[i]} | self._autoscale_of(g.name)
                for i, g in enumerate(self.settings.groups)
            ],
            "paused": self.paused,
            "draining": self.draining,
            "stopping": self.stop_level.label if self.stop_level is not None else None,
            "molds": [
                {"generation": m.generation, "pid": m.pid, "ready": m.ready, "reforked": m.promoted}
                for m in self.molds.values()
            ],
            "workers": workers,
            "reload_error": self.reload_error,
            "reloading": self._reload_wanted or self._reloading is not None,
            "restarts": self.restarts,
            "reloads": self.reloads,
            "jobs": dict(self.jobs),
            "queues": self.queues(),
            "redis_url": config.mask_url(self.settings.redis_url or ""),
            "app": list(self.settings.app),
            "agent": {
                "pid": self.agent.pid if self.agent else None,
                "pod": self.pod_id,
                "redis": self.redis_answers(),
                "swept": self.swept,
                "settled_pods": self.settled_pods,
            },
        }

    def _autoscale_of(self, group: str) -> dict[str, Any]:
        """A group's `autoscale` field: its window and what holds its growth back; None when off."""
        scaler = self.autoscalers.get(group)
        if scaler is None:
            return {"autoscale": None}
        shown = {"min": scaler.low, "max": scaler.high, "wait": scaler.wait, "cooldown": scaler.cooldown}
        return {"autoscale": {**shown, "held": scaler.held}}

    def job_stats(self) -> dict[str, Any]:
        return self.job_metrics.snapshot()

    def queues(self) -> dict[str, dict[str, Any]] | None:
        """The agent's last queue gauges, or None when it has sent none lately (queue_gauges.STALE)."""
        if self.queue_report is None or time.monotonic() - self.queue_report[1] > queue_gauges.STALE:
            return None
        return self.queue_report[0]

    def demand(self) -> dict[str, Any] | None:
        """Pods wanted for the jobs waiting and running on the pod's queues, at this pod's capacity."""
        rows = self.queues()
        return None if rows is None else queue_gauges.demand(rows, self._capacity())

    def _capacity(self) -> int:
        """Workers this pod can run: a group's size, or for an autoscaling group its MAX unless memory or
        CPU holds its growth back. KEDA then adds pods only for what the pods cannot take by growing."""
        capacity = 0
        for size, group in zip(self.sizes, self.settings.groups, strict=True):
            scaler = self.autoscalers.get(group.name)
            growing = scaler is not None and scaler.held not in ("memory", "cpu")
            capacity += scaler.high if growing and scaler is not None else size
        return capacity

    def health(self, check: str) -> dict[str, Any]:
        """live: the loop answers and a mold serves; ready: also not stopping, a worker registered with rq
        and Redis answering. A paused (or draining) supervisor stays ready: it is healthy, just idle.
        progress: live, and the pod takes the jobs its queues hold (progress.py)."""
        live = any(m.ready for m in self.molds.values()) or self.serving_generation > 0
        if check == "live":
            return {"ok": live, "live": live}
        if check == "progress":
            ok, reason = self._progress()
            return {"ok": live and ok, "live": live, "progress": ok, "reason": reason}
        ready_workers = sum(1 for w in self.workers.values() if w.ready and w.stop_level is None)
        redis_ok = self.redis_answers()
        ok = live and ready_workers > 0 and redis_ok and self.stop_level is None
        return {"ok": ok, "live": live, "ready_workers": ready_workers, "redis": redis_ok}

    def _progress(self) -> tuple[bool, str]:
        timeout = self.settings.progress_timeout
        if timeout is None:
            return True, "the progress check is off (RESQUE_STARTER_PROGRESS_TIMEOUT)"
        if self.stop_level is not None:
            return True, "the pod is stopping"
        groups = []
        now = time.monotonic()
        for i, g in enumerate(self.settings.groups):
            if not self.sizes[i] or self._intake_of(g.name) is not Intake.OPEN:
                continue
            workers = [w for w in self.workers.values() if w.group == g.name and w.stop_level is None]
            jobs = tuple(
                progress.Job(
                    self._slot_label(w), str(j.get("job")), float(j["started"]), _seconds(j.get("timeout"))
                )
                for w in workers
                if w.state == WorkerState.BUSY
                and (j := w.job) is not None
                and _seconds(j.get("started")) is not None
            )
            grace = self.settings.for_group(i).stuck_grace or 0.0
            idle_for = now - self.took_at.get(g.name, now)
            groups.append(progress.Group(g.name, g.queues, len(workers), jobs, grace, idle_for))
        return progress.check(timeout, groups, self.queues())

    def redis_answers(self) -> bool:
        """Whether Redis answered the agent lately: PID 1 itself never waits on the network."""
        a = self.agent
        return a is not None and a.redis_ok and time.monotonic() - a.redis_at < AGENT_REPORT_STALE

    def _slot_label(self, w: Worker) -> str:
        if len(self.settings.groups) > 1:
            return f"{w.group}:{w.spec.slot}"
        return str(w.spec.slot)

    def _title(self) -> str:
        live = sum(1 for w in self.workers.values() if w.stop_level is None)
        state = " paused" if self.paused else ""
        if self.stop_level is not None:
            state = f" stopping({self.stop_level.label})"
        return (
            f"resque-starter: supervisor gen={self.generation} workers={live}/{sum(self.sizes)}{state} "
            f"app={','.join(self.settings.app) or '-'}"
        )


def _seconds(value: Any) -> float | None:
    """A number from a worker's event, or None (a job without a timeout, a malformed event)."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
