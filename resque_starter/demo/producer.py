"""The demo's producer: plain `rq.Queue.enqueue` calls from another process, as an app would make."""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import logging
import os
import signal
import time

import redis
from rq import Queue
from setproctitle import setproctitle

from resque_starter import logs
from resque_starter.config import Settings
from resque_starter.connection import connect

log = logging.getLogger("resque_starter.demo")
PR_SET_PDEATHSIG = 1


def start_in_background(settings: Settings) -> int:
    """Fork the producer; it dies with its parent. Returns its pid (the supervisor reaps it)."""
    parent = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    try:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        logs.set_role("demo producer")
        setproctitle("resque-starter: demo producer")
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if os.getppid() == parent:
            run(
                settings.redis_url or f"unix://{os.path.join(settings.run_dir, 'redis.sock')}",
                settings.queues[0],
            )
    finally:
        os._exit(0)


def run(url: str, queue_name: str, interval: float = 1.0) -> None:
    connection = connect(url)
    while True:  # the embedded Redis may not be up yet
        with contextlib.suppress(redis.ConnectionError, FileNotFoundError):
            connection.ping()
            break
        time.sleep(0.1)
    queue = Queue(queue_name, connection=connection)
    for n in itertools.count():
        job = queue.enqueue("resque_starter.demo.tasks.resize_image", n)
        queue.enqueue("resque_starter.demo.tasks.send_email", f"user{n}@example.invalid")
        if n % 3 == 0:
            queue.enqueue("resque_starter.demo.tasks.flaky", n)
        log.info("demo producer: enqueued %s and friends", job.id)
        time.sleep(interval)
