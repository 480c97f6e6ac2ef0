"""Job metrics' cost (issue 22): CPU per job with the metrics endpoint on and scraped, against off.

Two resque-starter systems (2 rq.Worker workers over the ~100 MB app, each on its own queue) drain the
same no-op jobs in interleaved runs; one serves RESQUE_STARTER_METRICS_PORT and is scraped every
second (Prometheus's usual interval is 15-30 s), the other has no endpoint. CPU milliseconds per job
cover every process of the system (supervisor, mold, workers, reaped horses): what the machine pays.
What the job metrics add to the job's path (the job's end in the worker's idle event, one histogram
observation in the supervisor) runs in both; the difference is the endpoint and its scrapes.

    python3 bench/metrics_cost.py [--quick]      (bench/throughput.py includes this row)
"""

from __future__ import annotations

import argparse
import contextlib
import threading
import urllib.request

import common
from common import RedisServer, System

N = 2
LIMIT = 1.03  # metrics on may cost at most 3 % more CPU per job than off


def _scraper(port: int, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        with contextlib.suppress(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()


def measure(server: RedisServer, jobs: int, runs: int) -> dict[str, float]:
    """Median CPU ms per job of each system, and their ratio (`ratio`: on / off)."""
    port = common.free_port()
    on = common.resque_starter("metrics on", N, server, "mq0", metrics_port=str(port))
    off = common.resque_starter("metrics off", N, server, "mq1")
    cpu: dict[str, list[float]] = {on.label: [], off.label: []}
    stop = threading.Event()
    with on.running(), off.running():
        scraper = threading.Thread(target=_scraper, args=(port, stop), daemon=True)
        scraper.start()
        try:
            for system in (on, off):
                drain(system, 4 * N)  # warm-up: first imports, first forks
            for run in range(runs):
                print(f"[metrics cost] run {run + 1} of {runs}", flush=True)
                for system in (on, off) if run % 2 == 0 else (off, on):
                    cpu[system.label].append(drain(system, jobs))
        finally:
            stop.set()
            scraper.join()
    result = {label: common.median(values) for label, values in cpu.items()}
    result["ratio"] = result[on.label] / result[off.label]
    return result


def drain(system: System, jobs: int) -> float:
    """CPU milliseconds per job for `jobs` no-op jobs enqueued at once onto idle workers."""
    before, cpu = system.done(), system.cpu()
    system.enqueue("bench_app.noop", jobs)
    system.wait_done(before + jobs, timeout=max(60, jobs))
    system.wait_idle()
    return (system.cpu() - cpu) * 1000 / jobs


def row(result: dict[str, float]) -> list[object]:
    """The targets row: CPU per job with metrics on and scraped / off."""
    measured = f"{result['ratio']:.3f}x ({result['metrics on']:.2f} / {result['metrics off']:.2f} ms)"
    return ["CPU/job: metrics on (scraped 1/s) / off", measured, f"<= {LIMIT}x", result["ratio"] <= LIMIT]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer jobs and runs")
    args = parser.parse_args()
    jobs, runs = (100, 4) if args.quick else (300, 8)
    with RedisServer() as server:
        result = measure(server, jobs, runs)
    *cells, ok = row(result)
    text = common.table(["target", "measured", "limit", "result"], [[*cells, common.verdict(bool(ok))]])
    print(text)
    common.report(
        "metrics_cost", f"{common.machine()}\n{jobs} no-op jobs x {runs} interleaved runs\n{text}\n"
    )


if __name__ == "__main__":
    main()
