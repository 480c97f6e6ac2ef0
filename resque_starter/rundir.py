"""The supervisor's files: RESQUE_STARTER_RUN_DIR (control socket, embedded Redis) and PID_FILE.

Both are checked at start, so a path that cannot be used is a configuration error (exit 2) rather
than a failure later, when a worker or `ctl` first needs it. Both may sit in a directory other local
users write to (/tmp): the run dir is used only when it is ours and private (nobody else can have put
a socket or a link in it), and the pid file is written through a temporary name nobody can predict.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import tempfile

from resque_starter.config import ConfigError

log = logging.getLogger("resque_starter.supervisor")

RUN_DIR = "RESQUE_STARTER_RUN_DIR"
PID_FILE = "RESQUE_STARTER_PID_FILE"


def make(path: str) -> None:
    """Create the run dir, mode 0700, or verify that the one there is ours and not writable by others.

    The checks are made on the directory opened without following a link, so what is checked is what
    we use; one we own that others may read is only tightened (they could not have put anything in it).
    """
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
    except OSError as exc:
        why = "a parent is not a directory" if isinstance(exc, FileExistsError) else exc.strerror
        raise ConfigError(RUN_DIR, path, f"a writable directory ({why})") from None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        why = {
            errno.ELOOP: "it is a symbolic link",
            errno.ENOTDIR: "it is a symbolic link" if os.path.islink(path) else "it is not a directory",
        }.get(exc.errno or 0, exc.strerror)
        raise ConfigError(RUN_DIR, path, f"a directory of our own ({why})") from None
    try:
        info = os.fstat(fd)
        if info.st_uid != os.geteuid():
            owner = f"owned by uid {os.geteuid()} (it belongs to uid {info.st_uid})"
            raise ConfigError(RUN_DIR, path, f"a directory {owner}; remove it or choose another")
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            mode = f"{stat.S_IMODE(info.st_mode):04o}"
            raise ConfigError(RUN_DIR, path, f"a private directory (mode {mode} is writable by other users)")
        if stat.S_IMODE(info.st_mode) != 0o700:
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


def write_pid_file(path: str) -> None:
    """Write our PID atomically (rename), so a reader never sees a half-written file. The temporary
    is made by mkstemp (O_EXCL, a random name) beside the target: nothing planted there is followed."""
    directory, name = os.path.split(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
            os.fchmod(f.fileno(), 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise ConfigError(PID_FILE, path, f"a writable path ({exc.strerror})") from None


def remove_pid_file(path: str) -> None:
    """Remove the PID file if it still names us: a newer supervisor may have taken it over."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd) as f:
            if f.read().strip() == str(os.getpid()):
                os.unlink(path)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            log.warning("could not remove pid file %s: %s", path, exc)


def open_private(path: str) -> int:
    """Open a file of ours in the run dir for appending (the embedded Redis's log): never through a
    link, and never a file someone else created."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    if os.fstat(fd).st_uid != os.geteuid():
        os.close(fd)
        raise PermissionError(errno.EPERM, "not our own file", path)
    return fd
