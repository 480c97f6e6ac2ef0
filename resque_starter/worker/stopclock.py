"""The running job's stop: warn it at once, raise Shutdown in it at its deadline, SIGKILL it a grace later.

The worker's signal handlers (and its recycle by lifetime) call `StopClock.begin`; the page of
`resque_starter.job` tells the job at once. A thread then keeps the two deadlines, because neither the
worker's main thread (rq's horse monitor waits in SIGALRM-bounded slices of job_monitoring_interval)
nor the job's process (its SIGALRM is rq's job timeout) has a timer of its own to spare. The thread
exists only while a stopping job runs, so a worker never forks with it (a promoted worker needs none).
A SimpleWorker stuck in C code that holds the GIL starves this thread too: its supervisor's deadline
for the worker (graceful stops) or its watchdog (job timeouts) kills it from outside.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable

from resque_starter import job as job_api

RETRY = 0.05  # how often the clock looks again for a horse that is being forked


class StopClock:
    """One job's stop, from the warning to the kill."""

    def __init__(self, job_pid: Callable[[], int], kill: Callable[[], bool]) -> None:
        self._job_pid = job_pid  # the process performing the job: the horse, or this worker
        self._kill = kill  # SIGKILL the job's process; False while it has none yet (a horse to come)
        self._kill_at = 0.0
        self._kind = 0
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def kind(self) -> int:
        return self._kind

    def begin(self, kind: int, shutdown_in: float, kill_in: float) -> None:
        """A stop of `kind`: Shutdown due `shutdown_in` seconds from now, SIGKILL `kill_in` seconds from
        now. An earlier deadline, or a harder kind, wins."""
        if job_api._page is None:  # not shared: no worker of ours runs this job
            return
        now = time.monotonic()
        kill_at = now + kill_in
        if self._kind and self._kill_at <= kill_at and kind <= self._kind:
            return
        shutdown_at = now + shutdown_in
        if self._kind:
            old_shutdown_at, _old_kill_at, _kind = job_api._page.read()
            shutdown_at, kill_at = min(shutdown_at, old_shutdown_at), min(kill_at, self._kill_at)
        self._kill_at = kill_at
        self._kind = max(kind, self._kind)
        job_api._page.write(shutdown_at, self._kill_at, self._kind)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="resque-starter stop clock", daemon=True)
            self._thread.start()
        else:
            self._wake.set()

    def end(self) -> None:
        """The job is over: forget its stop (the worker may run the next one after a USR1)."""
        self._kind = 0
        if job_api._page is not None:
            job_api._page.clear()
        thread, self._thread = self._thread, None
        if thread is not None:
            self._wake.set()
            thread.join()
            self._wake.clear()

    def _run(self) -> None:
        signalled = False
        while self._kind:
            assert job_api._page is not None
            shutdown_at, kill_at, kind = job_api._page.read()
            if not kind:  # the job ended (end() clears the page): nothing is due any more
                return
            now = time.monotonic()
            if now >= kill_at and self._kill():
                return
            if not signalled and now >= shutdown_at:
                signalled = self._signal(job_api.SHUTDOWN_SIGNAL)
            # a horse not forked yet is waited for in short steps; otherwise the next deadline
            due = kill_at if signalled else shutdown_at
            self._wake.wait(max(RETRY, due - now) if self._job_pid() else RETRY)
            self._wake.clear()

    def _signal(self, signum: int) -> bool:
        pid = self._job_pid()
        if not pid:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
        return True
