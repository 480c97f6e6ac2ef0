"""Idle workers (issue 21): enqueue-to-start on the first and the last of three queues, and stop time.

Enqueue -> start: 2 idle workers on three queues, one no-op job every 0.2-0.6 s onto the first or the
last queue; milliseconds from enqueueing to the job function starting (median). Busy -> free: a job
enqueued on the last queue while both workers are busy, from the moment one becomes free to its start.
Idle stop: 4 idle workers, SIGTERM to the supervisor (rq: to each worker) until every process is gone.

    python3 bench/idle.py [--quick]      (bench/throughput.py includes these rows)
"""

from __future__ import annotations

import argparse
import random
import signal
import sys
import time

import common
from common import RedisServer, System
from rq import Queue

QUEUES = ("iq0", "iq1", "iq2")
CLASSES = {
    "rq.Worker": {},
    "pre-forked horse": {"prefork_horse": "true"},
    "SimpleWorker": {"worker_class": "rq.SimpleWorker"},
}


def starter(label: str, n: int, server: RedisServer, **settings: str) -> System:
    system = common.resque_starter(label, n, server, QUEUES[0], **settings)
    system.env["RESQUE_STARTER_QUEUES"] = ",".join(QUEUES)
    system.stop_signal = signal.SIGTERM
    return system


def rq_worker(n: int, server: RedisServer) -> System:
    """`rq worker` on the three queues (BLPOP over all of them, a horse forked per job)."""
    argv = [sys.executable, "-m", "rq.cli", "worker", "-u", server.url, "-c", "bench_rq_settings", *QUEUES]
    return System(f"{n} x rq worker", [argv] * n, common.child_env(server.url), n, server.conn, QUEUES[0])


def start_ms(system: System, queue: str) -> float:
    """One job onto an idle system's `queue`: milliseconds from enqueue to its function starting."""
    enqueued = time.time()
    job = Queue(queue, connection=system.conn).enqueue("bench_app.stamp")
    common.wait_until(lambda: job.get_status(refresh=True) == "finished", 30, "the stamp job", 0.002)
    return (float(job.return_value()) - enqueued) * 1000


def free_to_start_ms(system: System) -> float:
    """Both workers busy; a job waits on the last queue: ms from the first busy job's end to its start."""
    first, last = Queue(QUEUES[0], connection=system.conn), Queue(QUEUES[-1], connection=system.conn)
    holds = [first.enqueue("bench_app.stamp_after", 0.3 + 0.2 * i) for i in range(system.workers)]
    common.wait_until(
        lambda: all(j.get_status(refresh=True) == "started" for j in holds), 30, "both workers busy", 0.002
    )
    waiting = last.enqueue("bench_app.stamp")
    every = [*holds, waiting]
    common.wait_until(
        lambda: all(j.get_status(refresh=True) == "finished" for j in every), 30, "the jobs to finish", 0.002
    )
    freed = min(float(j.return_value()) for j in holds)
    return (float(waiting.return_value()) - freed) * 1000


def latencies(system: System, samples: int) -> dict[str, list[float]]:
    result: dict[str, list[float]] = {"first": [], "last": [], "busy->free": []}
    with system.running():
        system.wait_idle()
        for _ in range(samples):
            for which, queue in (("first", QUEUES[0]), ("last", QUEUES[-1])):
                time.sleep(random.uniform(0.2, 0.6))  # the workload's pace: idle workers between jobs
                result[which].append(start_ms(system, queue))
        for _ in range(max(3, samples // 4)):
            result["busy->free"].append(free_to_start_ms(system))
    return result


def stop_ms(system: System, samples: int) -> list[float]:
    """Milliseconds from the stop signal to every process of the idle system gone."""
    result = []
    for _ in range(samples):
        system.start()
        system.wait_idle()
        pids = system.pids()
        began = time.perf_counter()
        system.signal(system.stop_signal)
        common.wait_until(lambda p=pids: not any(map(common.alive, p)), 60, f"{system.label} to exit", 0.001)
        result.append((time.perf_counter() - began) * 1000)
        system.stop()
    return result


def measure(server: RedisServer, samples: int, stops: int) -> list[list[object]]:
    """Rows: system, enqueue->start on the first and the last queue, busy->free, idle stop (4 workers)."""
    rows: list[list[object]] = []
    systems = [(f"resque-starter {k}", settings) for k, settings in CLASSES.items()]
    for label, settings in systems:
        print(f"[idle] {label} ...", flush=True)
        lat = latencies(starter(label, 2, server, **settings), samples)
        stop = stop_ms(starter(label, 4, server, **settings), stops)
        rows.append([label, *(common.median(lat[k]) for k in lat), common.median(stop)])
    print("[idle] rq worker ...", flush=True)
    lat = latencies(rq_worker(2, server), samples)
    rows.append(
        [
            "2 x rq worker",
            *(common.median(lat[k]) for k in lat),
            common.median(stop_ms(rq_worker(4, server), stops)),
        ]
    )
    return rows


def table(rows: list[list[object]], samples: int, stops: int) -> str:
    headers = ["system", "first queue ms", "last queue ms", "busy->free ms", "idle stop ms (4 workers)"]
    targets = [
        [row[0], max(float(row[1]), float(row[2])) <= 15, float(row[4]) <= 200]  # type: ignore[arg-type]
        for row in rows
        if str(row[0]).startswith("resque-starter")
    ]
    verdicts = [
        [label, common.verdict(fast), common.verdict(stops_fast)] for label, fast, stops_fast in targets
    ]
    return "\n".join(
        [
            f"Idle workers on three queues: enqueue -> job started, median of {samples} jobs per queue,",
            "one every 0.2-0.6 s onto 2 idle workers; busy->free: a job waiting on the last queue while both",
            "workers are busy, from the first one free to its start; idle stop: SIGTERM to every process",
            f"gone, median of {stops}",
            common.table(headers, rows),
            "",
            "Targets (issue 21): <= 15 ms on every queue, idle stop <= 200 ms",
            common.table(["system", "every queue <= 15 ms", "idle stop <= 200 ms"], verdicts),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer samples")
    args = parser.parse_args()
    samples, stops = (8, 3) if args.quick else (20, 5)
    with RedisServer() as server:
        rows = measure(server, samples, stops)
    common.report("idle", f"Machine: {common.machine()}\n" + table(rows, samples, stops))


if __name__ == "__main__":
    main()
