"""Enqueue example jobs for the compose demo, by dotted name so the producer never imports the app.

Environment: REDIS_URL; PRODUCER_JOB (dotted function) and PRODUCER_ARGS (a JSON list; unset, each
job gets its sequence number);
PRODUCER_QUEUE; PRODUCER_JOBS (how many, 0 = until stopped) every PRODUCER_INTERVAL seconds;
PRODUCER_WAIT=1 waits for the jobs and exits 0 only when every one finished (within PRODUCER_TIMEOUT).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from rq import Queue
from rq.job import Job, JobStatus

DEFAULT_JOB = "resque_starter.demo.tasks.resize_image"
POLL = 0.2


def log(message: str) -> None:
    print(f"producer: {message}", flush=True)


def connect(url: str, timeout: float) -> Redis:
    """Wait for Redis: in compose it may still be starting although the healthcheck passed elsewhere."""
    conn = Redis.from_url(url)
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn.ping()
            return conn
        except RedisConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(POLL)


def produce(queue: Queue, job: str, args: list[object] | None, count: int, interval: float) -> list[Job]:
    jobs: list[Job] = []
    while count == 0 or len(jobs) < count:
        job_args = [len(jobs)] if args is None else args
        enqueued = queue.enqueue(job, *job_args)
        jobs.append(enqueued)
        log(f"enqueued {job}{tuple(job_args)} as {enqueued.id}")
        if interval:
            time.sleep(interval)
    return jobs


def wait(jobs: list[Job], timeout: float) -> bool:
    """True when every job finished; stops early when one failed or was stopped."""
    deadline = time.monotonic() + timeout
    pending = list(jobs)
    while pending and time.monotonic() < deadline:
        for job in list(pending):
            status = job.get_status(refresh=True)
            if status == JobStatus.FINISHED:
                log(f"{job.id} finished: {job.return_value()!r}")
                pending.remove(job)
            elif status in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED):
                log(f"{job.id} {status}")
                return False
        time.sleep(POLL)
    if pending:
        log(f"{len(pending)} job(s) not finished after {timeout}s")
    return not pending


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    conn = connect(os.environ["REDIS_URL"], float(os.environ.get("PRODUCER_TIMEOUT", "120")))
    queue = Queue(os.environ.get("PRODUCER_QUEUE", "default"), connection=conn)
    jobs = produce(
        queue,
        os.environ.get("PRODUCER_JOB", DEFAULT_JOB),
        json.loads(os.environ["PRODUCER_ARGS"]) if "PRODUCER_ARGS" in os.environ else None,
        int(os.environ.get("PRODUCER_JOBS", "0")),
        float(os.environ.get("PRODUCER_INTERVAL", "0")),
    )
    if os.environ.get("PRODUCER_WAIT", "0") not in ("1", "true", "yes"):
        return 0
    return 0 if wait(jobs, float(os.environ.get("PRODUCER_TIMEOUT", "120"))) else 1


if __name__ == "__main__":
    sys.exit(main())
