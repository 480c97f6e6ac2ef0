"""What both benchmarks share: a private redis-server, the systems they compare, process-tree memory
and CPU from /proc, jobs in and out of the queue, and the table and chart they print and write.

Every system is measured the same way, from the outside: its processes are found by walking /proc
from the processes we started, and it counts as started once its workers are registered with rq.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from rq import Queue, Worker
from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))  # the worktree's resque_starter, wherever the script is run from

from resque_starter import procmem  # noqa: E402

OUT = BENCH / "out"
QUEUE = "default"
MB = 2**20
Snapshot = list[tuple[str, procmem.Memory]]  # (process title, its memory) for each process of a system


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.005) -> Any:
    """Poll until predicate() is truthy; raise TimeoutError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A throwaway redis-server on a free 127.0.0.1 port, no persistence; `tmp` is removed with it."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            sys.exit("redis-server is not installed (apt-get install -y redis-server)")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._dir = tempfile.TemporaryDirectory(prefix="bench-")
        self.tmp = self._dir.name
        argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        argv += ["--dir", self._dir.name, "--loglevel", "warning"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        self.conn = redis.Redis.from_url(self.url)
        wait_until(self._answers, 10, "redis-server to answer")

    def _answers(self) -> bool:
        try:
            return bool(self.conn.ping())
        except redis.ConnectionError:
            return False

    def close(self) -> None:
        self.conn.close()
        self.proc.terminate()
        self.proc.wait(10)
        self._dir.cleanup()

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- /proc


def tree(roots: Sequence[int]) -> list[int]:
    """The roots and every process descended from them."""
    live = [r for r in roots if os.path.exists(f"/proc/{r}")]
    return live + procmem.descendants(live)


def alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def cpu_seconds(pid: int, children: bool = False) -> float:
    """User + system CPU seconds this process used, with its reaped children's if asked; 0 if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = sum(int(x) for x in fields[11 : 15 if children else 13])
    return ticks / os.sysconf("SC_CLK_TCK")


def catches(pid: int, sig: int) -> bool:
    """Whether the process has installed a handler for the signal (SigCgt in /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(mask >> (sig - 1) & 1)


def title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


# --------------------------------------------------------------------------- the systems compared


def child_env(redis_url: str, **overrides: str) -> dict[str, str]:
    """The environment every system starts with: ours, minus any configuration that would skew it."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RESQUE_STARTER_", "RQ_")) and k not in ("REDIS_URL", "PYTHONPATH")
    }
    env["PYTHONPATH"] = os.pathsep.join([str(BENCH), str(ROOT)])
    env["REDIS_URL"] = redis_url
    env.update(overrides)
    return env


@dataclass
class System:
    """One way to run rq workers over the app, on its own queue: commands whose process trees we measure."""

    label: str
    commands: list[list[str]]
    env: dict[str, str]
    workers: int
    conn: redis.Redis
    queue: str = QUEUE
    stop_signal: int = signal.SIGTERM
    run_dir: str | None = None
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, timeout: float = 120) -> float:
        """Start every command; return seconds until all `workers` are registered with rq."""
        logs = OUT / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log = open(logs / f"{self.label.replace(' ', '_').replace('/', '_')}.log", "ab")  # noqa: SIM115
        began = time.monotonic()
        self.procs = [
            subprocess.Popen(argv, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            for argv in self.commands
        ]
        log.close()
        wait_until(lambda: self.registered() == self.workers, timeout, f"{self.label} to register", 0.02)
        seconds = time.monotonic() - began
        # rq's worker-pool forks its workers before it installs its signal handlers: a stop signal
        # sent in between kills the pool and orphans the workers.
        wait_until(self._catches_stop, 30, f"{self.label} to handle {self.stop_signal!r}", 0.01)
        return seconds

    def _catches_stop(self) -> bool:
        return all(catches(pid, self.stop_signal) for pid in self.roots)

    def registered(self) -> int:
        """How many workers on our queue are registered with rq; raises if one of our commands died."""
        for p in self.procs:
            if p.poll() is not None:
                raise RuntimeError(f"{self.label}: {p.args} exited with {p.returncode} (see bench/out/logs)")
        return Worker.count(queue=Queue(self.queue, connection=self.conn))

    @property
    def roots(self) -> list[int]:
        return [p.pid for p in self.procs]

    def pids(self) -> list[int]:
        return tree(self.roots)

    def snapshot(self) -> Snapshot:
        """Every process of the system with its memory (PSS, USS, shared, RSS), sampled now."""
        found = ((title(pid), procmem.read(pid)) for pid in self.pids())
        return [(name, mem) for name, mem in found if mem is not None]

    def cpu(self) -> float:
        """CPU seconds used so far by the system's processes and the children they reaped (the horses)."""
        return sum(cpu_seconds(pid, children=True) for pid in self.pids())

    def status(self) -> dict[str, Any]:
        """resque-starter's `ctl status` document (the supervisor, molds and workers with their pids)."""
        from resque_starter import control

        assert self.run_dir is not None, f"{self.label} is not resque-starter"
        return control.request(self.run_dir, {"cmd": "status"})["status"]

    def signal(self, sig: int) -> None:
        for pid in self.roots:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def stop(self, timeout: float = 30) -> None:
        """Graceful stop; whatever is still there after `timeout` is killed, so runs never leak processes."""
        self.signal(self.stop_signal)
        deadline = time.monotonic() + timeout
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.1, deadline - time.monotonic()))
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for p in self.procs:
            p.wait()

    @contextlib.contextmanager
    def running(self) -> Iterator[System]:
        try:
            self.start()
            yield self
        finally:
            self.stop()

    # ----------------------------------------------------------------- jobs on our queue

    def enqueue(self, func: str, count: int, *args: Any) -> None:
        """Put `count` jobs on our queue in one round trip."""
        queue = Queue(self.queue, connection=self.conn)
        with self.conn.pipeline() as pipe:
            queue.enqueue_many([Queue.prepare_data(func, args) for _ in range(count)], pipeline=pipe)
            pipe.execute()

    def done(self) -> int:
        """Jobs finished so far; a failed job stops the benchmark, since its numbers would mean nothing."""
        failed = FailedJobRegistry(self.queue, connection=self.conn).get_job_count(cleanup=False)
        if failed:
            raise RuntimeError(f"{self.label}: {failed} job(s) failed; see bench/out/logs")
        return FinishedJobRegistry(self.queue, connection=self.conn).get_job_count(cleanup=False)

    def wait_done(self, total: int, timeout: float) -> None:
        wait_until(lambda: self.done() >= total, timeout, f"{self.label}: {total} jobs to finish")

    def wait_idle(self, timeout: float = 30) -> None:
        """Until no job is queued or running on our queue and each of our workers says idle."""
        queue = Queue(self.queue, connection=self.conn)

        def idle() -> bool:
            running = StartedJobRegistry(self.queue, connection=self.conn).get_job_count(cleanup=False)
            if queue.count or running:
                return False
            return all(w.get_state() == "idle" for w in Worker.all(queue=queue))

        wait_until(idle, timeout, f"{self.label} to go idle", 0.02)


def resque_starter(label: str, n: int, server: RedisServer, queue: str = QUEUE, **settings: str) -> System:
    """`python -m resque_starter run` with the app preloaded by its mold; settings are RESQUE_STARTER_*."""
    run_dir = tempfile.mkdtemp(prefix="run-", dir=server.tmp)  # removed with the server
    env = child_env(
        server.url,
        RESQUE_STARTER_APP="bench_app",
        RESQUE_STARTER_CONCURRENCY=str(n),
        RESQUE_STARTER_QUEUES=queue,
        RESQUE_STARTER_RUN_DIR=run_dir,
        **{f"RESQUE_STARTER_{k.upper()}": v for k, v in settings.items()},
    )
    command = [sys.executable, "-m", "resque_starter", "run"]
    return System(label, [command], env, n, server.conn, queue, signal.SIGQUIT, run_dir)


def _rq(server: RedisServer, queue: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "rq.cli", *args, "-u", server.url, "-c", "bench_rq_settings", queue]


def rq_pool(n: int, server: RedisServer, queue: str = QUEUE) -> System:
    """`rq worker-pool -n N`, the app preloaded through its settings module before the pool forks."""
    command = _rq(server, queue, "worker-pool", "-n", str(n))
    return System(f"rq worker-pool -n {n}", [command], child_env(server.url), n, server.conn, queue)


def rq_workers(n: int, server: RedisServer, queue: str = QUEUE) -> System:
    """N independent `rq worker` processes, each importing the app itself."""
    commands = [_rq(server, queue, "worker") for _ in range(n)]
    return System(f"{n} x rq worker", commands, child_env(server.url), n, server.conn, queue)


def single(server: RedisServer, queue: str = QUEUE) -> System:
    """One process holding the app (a `rq worker` with rq.SimpleWorker): the floor for memory."""
    argv = _rq(server, queue, "worker", "-w", "rq.SimpleWorker")
    return System("1 process (floor)", [argv], child_env(server.url), 1, server.conn, queue)


# --------------------------------------------------------------------------- output


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table, numbers right-aligned, that reads the same in a terminal and in a README."""
    cells = [[str(c) for c in headers], *[[_cell(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [_numeric([r[i] for r in cells[1:] if r[i] != "-"]) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append(
            "  ".join(
                c.rjust(widths[i]) if numeric[i] else c.ljust(widths[i]) for i, c in enumerate(row)
            ).rstrip()
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def _numeric(column: list[str]) -> bool:
    try:
        [float(text.rstrip("x%")) for text in column]
    except ValueError:
        return False
    return bool(column)


def machine() -> str:
    """What the numbers were measured on, including how busy the machine was with other work."""
    import platform

    import rq

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True
    ).stdout.strip()
    return (
        f"resque-starter {commit or '(not a git checkout)'}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, rq {rq.__version__}, redis-py {redis.__version__}; load average {load}"
    )


def report(name: str, text: str) -> Path:
    """Print the text and keep it in bench/out/NAME.txt."""
    print(text)
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.txt"
    path.write_text(text + "\n")
    return path


def bar_chart(
    name: str, title_text: str, ylabel: str, categories: Sequence[str], series: dict[str, Sequence[float]]
) -> Path | None:
    """Grouped bars to bench/out/NAME.png with matplotlib (the optional `bench` extra); None without it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(no chart: matplotlib is not installed; pip install -e '.[bench]' for bench/out/{name}.png)")
        return None
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(min(12.0, 2 + 1.8 * len(categories)), 5.0))
    for i, (label, values) in enumerate(series.items()):
        xs = [c + (i - (len(series) - 1) / 2) * width for c in range(len(categories))]
        bars = ax.bar(xs, values, width, label=label)
        ax.bar_label(bars, labels=[_cell(v) for v in values], fontsize=7, padding=2)
    ax.set_xticks(range(len(categories)), categories, rotation=15, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title_text)
    if len(series) > 1:
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
