"""Processes that must not outlive their parent: a pre-forked horse its worker, a worker its supervisor.

Inside a container the kernel kills the whole PID namespace with PID 1; outside one, without this, a
supervisor killed by SIGKILL would leave workers taking jobs that nobody supervises.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent(parent: int, sig: int = signal.SIGKILL) -> None:
    """Have the kernel send `sig` to this process when `parent` dies; if it already has, exit now."""
    if _libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    if os.getppid() != parent:  # it died before the prctl: we were already reparented
        os._exit(0)


def await_adoption(supervisor: int, timeout: float = 2.0) -> bool:
    """A double-forked worker starts as the child of a middle process that exits at once; wait until
    the supervisor (a subreaper, or PID 1) has adopted it. False if something else adopted it."""
    deadline = time.monotonic() + timeout
    while os.getppid() != supervisor:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True
