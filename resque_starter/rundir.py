"""The supervisor's files: RESQUE_STARTER_RUN_DIR (control socket, worker status sockets) and PID_FILE.

Both are checked at start, so a path that cannot be written is a configuration error (exit 2) rather
than a failure later, when a worker or `ctl` first needs it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os

from resque_starter.config import ConfigError

log = logging.getLogger("resque_starter.supervisor")


def make(path: str) -> None:
    """Create the run dir, private to our uid (it holds the control socket)."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as exc:
        why = "it is not a directory" if isinstance(exc, FileExistsError) else exc.strerror
        raise ConfigError("RESQUE_STARTER_RUN_DIR", path, f"a writable directory ({why})") from None


def write_pid_file(path: str) -> None:
    """Write our PID atomically (rename), so a reader never sees a half-written file."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise ConfigError("RESQUE_STARTER_PID_FILE", path, f"a writable path ({exc.strerror})") from None


def remove_pid_file(path: str) -> None:
    """Remove the PID file if it still names us: a newer supervisor may have taken it over."""
    try:
        with open(path) as f:
            if f.read().strip() == str(os.getpid()):
                os.unlink(path)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            log.warning("could not remove pid file %s: %s", path, exc)
