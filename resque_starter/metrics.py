"""The optional HTTP endpoint (RESQUE_STARTER_METRICS_PORT): /healthz, /readyz and Prometheus /metrics.

It runs inside the supervisor's selector loop, not in a thread: the supervisor forks molds, and a
thread holding a lock at fork time can deadlock the child. Every socket is non-blocking, a request
is bounded, and few connections are held (listener.Listener), so no client can stall the loop
or use up its file descriptors. prometheus-client is the optional extra `metrics`.

It knows the supervisor only through the command dispatcher: /healthz (?check=progress) and /readyz
are the `health` command, a scrape reads the `status` document, exactly as `ctl` does.
"""

from __future__ import annotations

import json
import selectors
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from resque_starter.commands import Dispatch
from resque_starter.config import ConfigError
from resque_starter.listener import Listener
from resque_starter.states import WorkerState

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

BIND_ADDRESS = "0.0.0.0"  # for a pod's kubelet and Prometheus, which do not come from localhost
MAX_REQUEST = 8192
TEXT_FORMAT = "text/plain; version=0.0.4; charset=utf-8"  # what generate_latest() writes
REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


@dataclass
class _Client:
    request: bytes = b""


class MetricsServer(Listener[_Client]):
    def __init__(self, port: int, selector: selectors.BaseSelector, dispatch: Dispatch) -> None:
        try:
            from prometheus_client import CollectorRegistry
        except ImportError:
            allowed = "set only with prometheus-client installed: pip install 'resque-starter[metrics]'"
            raise ConfigError("RESQUE_STARTER_METRICS_PORT", port, allowed) from None
        super().__init__(selector)
        self._dispatch = dispatch
        self._registry = CollectorRegistry()
        self._registry.register(_Collector(dispatch))
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((BIND_ADDRESS, port))
        except OSError as exc:
            self.sock.close()
            raise ConfigError("RESQUE_STARTER_METRICS_PORT", port, f"a free port ({exc.strerror})") from None
        self.listen()

    def new_client(self) -> _Client:
        return _Client()

    def read(self, conn: socket.socket) -> None:
        client = self._clients[conn]
        try:
            data = conn.recv(MAX_REQUEST)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.drop(conn)
            return
        client.request += data
        if b"\r\n\r\n" in client.request or b"\n\n" in client.request:
            self.reply(conn, self._respond(client.request))
        elif len(client.request) > MAX_REQUEST:
            self.reply(conn, _reply(400, _error("request too long")))

    def _respond(self, request: bytes) -> bytes:
        """One whole HTTP response (status line, headers, body) for one request."""
        parts = request.split(b"\n", 1)[0].split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            return _reply(400, _error("not an HTTP request"))
        method, (path, _, query) = parts[0], parts[1].partition(b"?")
        if method not in (b"GET", b"HEAD"):
            return _reply(405, _error("only GET and HEAD"))
        return _reply(*self._route(path, query), head=method == b"HEAD")

    def _route(self, path: bytes, query: bytes) -> tuple[int, tuple[str, bytes]]:
        if path in (b"/healthz", b"/readyz"):
            check = "ready" if path == b"/readyz" else "progress" if query == b"check=progress" else "live"
            result = self._dispatch({"cmd": "health", "check": check})
            return (200 if result["ok"] else 503), _json(result)
        if path == b"/metrics":
            from prometheus_client import generate_latest

            return 200, (TEXT_FORMAT, generate_latest(self._registry))
        if path == b"/scale":  # KEDA's metrics-api scaler: {"desired_pods": N, ...}
            result = self._dispatch({"cmd": "demand"})
            return (200 if result.pop("ok") else 503), _json(result)
        return 404, _error("not found; try /healthz, /readyz, /metrics or /scale")


def _json(value: dict[str, Any]) -> tuple[str, bytes]:
    return "application/json", json.dumps(value).encode() + b"\n"


def _error(message: str) -> tuple[str, bytes]:
    return _json({"error": message})


def _reply(status: int, content: tuple[str, bytes], head: bool = False) -> bytes:
    content_type, body = content
    headers = (
        f"HTTP/1.1 {status} {REASONS[status]}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return headers.encode() + (b"" if head else body)


class _Collector:
    """Reads the supervisor's status document at scrape time; nothing is kept between scrapes."""

    def __init__(self, dispatch: Dispatch) -> None:
        self._dispatch = dispatch

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

        status = self._dispatch({"cmd": "status"})["status"]
        workers = status["workers"]
        by_state = GaugeMetricFamily("resque_starter_workers", "Worker processes by state.", labels=["state"])
        for state in WorkerState:
            by_state.add_metric([state.value], sum(1 for w in workers if w["state"] == state))
        yield by_state
        slots = GaugeMetricFamily(
            "resque_starter_worker_slots", "Desired worker count of each group.", labels=["group"]
        )
        for group in status["groups"]:
            slots.add_metric([group["name"]], group["size"])
        yield slots
        for key, name, text in (
            ("done", "jobs_finished", "Jobs finished successfully, summed over every worker so far."),
            ("failed", "jobs_failed", "Jobs failed, summed over every worker so far."),
            ("requeued", "jobs_requeued", "Interrupted jobs put back in their queue by workers."),
        ):
            yield CounterMetricFamily(f"resque_starter_{name}", text, value=status["jobs"][key])
        yield CounterMetricFamily(
            "resque_starter_worker_restarts",
            "Workers respawned after an exit nobody asked for.",
            value=status["restarts"],
        )
        yield CounterMetricFamily(
            "resque_starter_reloads", "Reloads started (HUP, ctl reload).", value=status["reloads"]
        )
        yield GaugeMetricFamily(
            "resque_starter_draining",
            "1 while a ctl drain or a graceful stop lets running jobs finish.",
            value=int(status["draining"]),
        )
        yield GaugeMetricFamily(
            "resque_starter_paused", "1 while workers take no new job.", value=int(status["paused"])
        )
        yield GaugeMetricFamily(
            "resque_starter_generation", "The current generation.", value=status["generation"]
        )
        labels = [
            "group",
            "slot",
            "generation",
            "pid",
        ]  # pid: a stopping worker may share slot and generation
        uss = GaugeMetricFamily(
            "resque_starter_worker_uss_bytes", "Private memory of each worker.", labels=labels
        )
        pss = GaugeMetricFamily(
            "resque_starter_worker_pss_bytes", "Proportional memory of each worker.", labels=labels
        )
        for w in workers:
            row = [w["group"], str(w["slot"]), str(w["generation"]), str(w["pid"])]
            if w["uss"] is not None:
                uss.add_metric(row, w["uss"])
                pss.add_metric(row, w["pss"])
        yield uss
        yield pss
        yield from _queue_metrics(status["queues"] or {})
        yield from _autoscale_metrics(status["groups"])
        yield from _job_metrics(self._dispatch({"cmd": "job-stats"})["job_stats"])


def _autoscale_metrics(groups: list[dict[str, Any]]) -> Iterator[Metric]:
    """Each autoscaling group's window, and what holds its growth back (absent for the other groups)."""
    from prometheus_client.metrics_core import GaugeMetricFamily

    window = GaugeMetricFamily(
        "resque_starter_autoscale_workers",
        "An autoscaling group's window of workers (bound: min, max); absent for groups of fixed size.",
        labels=["group", "bound"],
    )
    held = GaugeMetricFamily(
        "resque_starter_autoscale_held",
        "1 while an autoscaling group's jobs wait but it does not grow, by reason: max, memory or cpu.",
        labels=["group", "reason"],
    )
    for g in groups:
        scale = g["autoscale"]
        if scale is None:
            continue
        for bound in ("min", "max"):
            window.add_metric([g["name"], bound], scale[bound])
        for reason in ("max", "memory", "cpu"):
            held.add_metric([g["name"], reason], float(scale["held"] == reason))
    yield window
    yield held


def _queue_metrics(rows: dict[str, dict[str, Any]]) -> Iterator[Metric]:
    """The agent's last queue gauges (none while it has no recent report: absent, not stale)."""
    from prometheus_client.metrics_core import GaugeMetricFamily

    for key, name, text in (
        ("waiting", "queue_jobs_waiting", "Jobs waiting in each of the pod's queues."),
        (
            "oldest_age",
            "queue_oldest_job_age_seconds",
            "How long the oldest waiting job of each queue has waited.",
        ),
        (
            "started",
            "queue_jobs_started",
            "Jobs started and not ended on each queue, by every pod (rq's StartedJobRegistry).",
        ),
    ):
        family = GaugeMetricFamily(f"resque_starter_{name}", text, labels=["queue"])
        for queue, row in rows.items():
            family.add_metric([queue], row[key] or 0)
        yield family


def _job_metrics(stats: dict[str, Any]) -> Iterator[Metric]:
    """The job histograms (job_stats.JobStats.snapshot) as Prometheus histograms: cumulative buckets."""
    from prometheus_client.metrics_core import HistogramMetricFamily
    from prometheus_client.utils import floatToGoString

    duration = HistogramMetricFamily(
        "resque_starter_job_duration_seconds",
        "Jobs run, by how they ended (finished, failed, requeued, stopped), and how long they took.",
        labels=["queue", "func", "outcome"],
    )
    for row in stats["duration"]:
        labels = [row["queue"], row["func"], row["outcome"]]
        duration.add_metric(labels, _buckets(stats["duration_buckets"], row, floatToGoString), row["sum"])
    yield duration
    wait = HistogramMetricFamily(
        "resque_starter_job_wait_seconds",
        "Jobs started, and how long each waited in its queue (enqueued to started).",
        labels=["queue"],
    )
    for row in stats["wait"]:
        wait.add_metric([row["queue"]], _buckets(stats["wait_buckets"], row, floatToGoString), row["sum"])
    yield wait


def _buckets(
    bounds: list[float], row: dict[str, Any], shown: Callable[[float], str]
) -> list[tuple[str, float]]:
    """Prometheus's buckets: cumulative counts, each under its bound as Prometheus writes it (le="1.0")."""
    cumulative, total = [], 0
    for bound, count in zip([*map(shown, bounds), "+Inf"], row["counts"], strict=True):
        total += count
        cumulative.append((bound, total))
    return cumulative
