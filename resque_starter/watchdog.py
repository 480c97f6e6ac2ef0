"""The supervisor's watchdog for jobs that run in the worker process itself (rq.SimpleWorker, a refork
candidate's job): their rq timeout plus RESQUE_STARTER_STUCK_GRACE, enforced from outside.

rq enforces a job's timeout with SIGALRM inside the process that runs it; C code that holds the GIL
(one long C call) never lets that handler run, nor any thread of the worker. A forking worker's
horse is watched by the worker (rq's horse monitor kills it past its timeout, see StarterMixin.
kill_horse); a job running in the worker can only be watched by the supervisor. It knows each busy
worker's job, start and timeout from the worker's "busy" event, and acts from its loop's timers:
past the deadline it asks the worker for its stack (stacks.DUMP_SIGNAL), and a moment later logs the
stack and SIGKILLs the worker; the recovery fails the job with a reason that says where it was stuck.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time

from resque_starter import stacks
from resque_starter.process_table import Worker

log = logging.getLogger("resque_starter.supervisor")


def _deadline(w: Worker, grace: float | None) -> float | None:
    """When (time.time()) the job of `w` is stuck, if it runs in the worker and has a timeout."""
    job = w.job
    if grace is None or w.pid is None or job is None or job.get("horse") is not None:
        return None
    timeout, started = job.get("timeout"), job.get("started")
    if not isinstance(timeout, (int, float)) or not isinstance(started, (int, float)):
        return None
    return float(started) + float(timeout) + grace


def next_due(w: Worker, grace: float | None) -> float | None:
    """When (time.monotonic()) the watchdog must look at `w` again; None for never."""
    if w.dump_asked is not None:
        return w.dump_asked + stacks.DUMP_WAIT
    deadline = _deadline(w, grace)
    return None if deadline is None else time.monotonic() + max(0.0, deadline - time.time())


def tend(w: Worker, grace: float | None, run_dir: str, label: str) -> None:
    """Ask a stuck worker for its stack; once it had time to write it, log it and kill the worker."""
    deadline = _deadline(w, grace)
    if deadline is None or time.time() < deadline or w.stuck is not None:
        return
    assert w.pid is not None and w.job is not None
    path = stacks.stack_path(run_dir, w.pid)
    if w.dump_asked is None:
        stacks.request(w.pid, path)
        w.dump_asked = time.monotonic()
        return
    if time.monotonic() < w.dump_asked + stacks.DUMP_WAIT:
        return
    stack = stacks.read(path)
    elapsed = time.time() - float(w.job["started"])
    where = stacks.innermost_frame(stack) or "an unknown frame (no stack written)"
    w.stuck = (
        f"resque-starter: stuck for {elapsed:.0f}s, past its timeout of {w.job['timeout']:g}s + "
        f"{grace:g}s, at {where}; killed by the supervisor's watchdog"
    )
    log.error(
        "worker[%s] pid %s: job %s %s; its stack:\n%s",
        label, w.pid, w.job.get("job"), w.stuck, stack.rstrip() or "(not written)",
    )  # fmt: skip
    with contextlib.suppress(ProcessLookupError):
        os.kill(w.pid, signal.SIGKILL)
