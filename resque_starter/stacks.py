"""Where a stuck process was stuck: its Python stack, written by itself on a signal (faulthandler).

Every worker registers faulthandler on DUMP_SIGNAL into a file of the run dir named by its pid (its
horses inherit the registration and write there too). Whoever is about to kill a stuck job (the
supervisor's watchdog for a job running in the worker, the worker for rq's horse timeout) asks for
the dump first, logs it, and names the innermost frame in the failed job's reason. No rq here: the
supervisor imports this.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import time
from typing import IO

DUMP_SIGNAL = signal.SIGRTMIN + 3
DUMP_WAIT = 0.5  # how long a dump may take to appear before the kill goes ahead without it

_registered: IO[str] | None = None  # kept open: faulthandler writes to its descriptor


def stack_path(run_dir: str, pid: int) -> str:
    return os.path.join(run_dir, f"stack-{pid}.txt")


def register(run_dir: str) -> None:
    """In a worker: write every thread's stack to its stack file on DUMP_SIGNAL (best effort: a run dir
    that cannot be written only loses the dump)."""
    global _registered
    try:
        os.makedirs(run_dir, mode=0o700, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND
        fd = os.open(stack_path(run_dir, os.getpid()), flags, 0o600)
    except OSError:
        return
    _registered = os.fdopen(fd, "w")
    faulthandler.register(DUMP_SIGNAL, file=_registered, all_threads=True, chain=False)


def request(pid: int, path: str) -> bool:
    """Ask `pid` for its stack (into `path`, the file of the worker it belongs to); False if it is gone
    or the file is."""
    try:
        os.truncate(path, 0)
        os.kill(pid, DUMP_SIGNAL)
    except OSError:
        return False
    return True


def read(path: str) -> str:
    with contextlib.suppress(OSError), open(path, errors="replace") as f:
        return f.read()
    return ""


def dump(pid: int, path: str, wait: float = DUMP_WAIT) -> str:
    """request, then wait (up to `wait`, in the worker: it has nothing else to do) until it is written."""
    if not request(pid, path):
        return ""
    deadline = time.monotonic() + wait
    text = ""
    while time.monotonic() < deadline:
        time.sleep(0.05)
        latest = read(path)
        if latest and latest == text:
            break
        text = latest
    return text


def remove(run_dir: str, pid: int) -> None:
    with contextlib.suppress(OSError):
        os.unlink(stack_path(run_dir, pid))


def innermost_frame(stack: str) -> str | None:
    """The innermost frame of the main thread (faulthandler lists it last) as 'file:line function'."""
    blocks = [b for b in stack.split("\n\n") if 'File "' in b]
    if not blocks:
        return None
    for line in blocks[-1].splitlines():
        line = line.strip()
        if line.startswith('File "'):
            path, _, rest = line[6:].partition('", line ')
            number, _, func = rest.partition(" in ")
            return f"{path}:{number} {func}".strip()
    return None
