"""Autoscale inside the pod (issue 22): how fast one pod follows a burst, against fixed sizes.

A burst of JOBS jobs of 0.5 s each lands on one idle pod: with 1 fixed worker, with 8 fixed workers,
and with RESQUE_STARTER_AUTOSCALE=1:8 (wait 0.5 s, cool-down 5 s). For each: the pod's memory while
idle (PSS of every process), seconds from the burst to its last job finished, the most workers seen, for
autoscale the seconds until it ran 8 workers and, after the burst, until it was back at 1.

    python3 bench/autoscale.py [--quick]
"""

from __future__ import annotations

import argparse
import time

import common
from common import RedisServer, System

MAX = 8
JOB_SECONDS = 0.5
SYSTEMS = {
    "1 worker": (1, {}),
    f"{MAX} workers": (MAX, {}),
    f"autoscale 1:{MAX}": (1, {"autoscale": f"1:{MAX}", "autoscale_wait": "0.5", "autoscale_cooldown": "5"}),
}


def size(system: System) -> int:
    return int(system.status()["groups"][0]["size"])


def burst(system: System, jobs: int) -> dict[str, float]:
    """One burst onto the idle system: its numbers (seconds, workers, MB)."""
    system.wait_idle()
    idle_pss = sum(mem.pss for _, mem in system.snapshot()) / common.MB
    began = time.monotonic()
    system.enqueue("bench_app.hold", jobs, JOB_SECONDS)
    peak, at_max = size(system), None
    while system.done() < jobs:
        peak = max(peak, size(system))
        if at_max is None and peak >= MAX and "autoscale" in system.label:
            at_max = time.monotonic() - began
        time.sleep(0.02)
    drained = time.monotonic() - began
    shrunk = None
    if "autoscale" in system.label:
        common.wait_until(lambda: size(system) == 1, 120, "autoscale back to 1 worker", 0.05)
        shrunk = time.monotonic() - began - drained
    return {"idle_pss": idle_pss, "drained": drained, "peak": peak, "at_max": at_max, "shrunk": shrunk}


def measure(server: RedisServer, jobs: int) -> list[list[object]]:
    rows: list[list[object]] = []
    for label, (workers, settings) in SYSTEMS.items():
        print(f"[autoscale] {label} ...", flush=True)
        system = common.resque_starter(label, workers, server, **settings)
        with system.running():
            found = burst(system, jobs)
        rows.append(
            [
                label,
                found["idle_pss"],
                found["drained"],
                found["peak"],
                found["at_max"] or "-",
                found["shrunk"] or "-",
            ]
        )
        server.conn.flushdb()
    return rows


def table(rows: list[list[object]], jobs: int) -> str:
    headers = [
        "pod",
        "idle PSS MB",
        "burst done s",
        "most workers",
        f"{MAX} workers after s",
        "back to 1 after s",
    ]
    ideal = jobs * JOB_SECONDS / MAX
    return "\n".join(
        [
            f"A burst of {jobs} jobs of {JOB_SECONDS} s onto one idle pod "
            f"({ideal:.1f} s of work for {MAX} workers);",
            "autoscale: wait 0.5 s, cool-down 5 s (one worker fewer per cool-down once nothing waits)",
            common.table(headers, rows),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a smaller burst")
    args = parser.parse_args()
    jobs = 32 if args.quick else 96
    with RedisServer() as server:
        rows = measure(server, jobs)
    common.report("autoscale", f"Machine: {common.machine()}\n" + table(rows, jobs))


if __name__ == "__main__":
    main()
