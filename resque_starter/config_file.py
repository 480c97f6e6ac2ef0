"""Running a Python config file without trusting it.

A config file is code: it may sleep, hang on a network call, eat memory, call os._exit(0) or raise
KeyboardInterrupt. So the supervisor never runs it itself. It runs in a forked child, in a process group
of its own, with a deadline (a child, not an alarm: an alarm cannot stop os._exit(0), a C call that retries
on EINTR, or a `finally:` that sleeps again, and a child's memory is given back when it ends). The child
sends back plain data only: what the file's public names hold, where a value that is not plain data (a
function, a class instance) crosses as an `Opaque` description. The parent unpickles it with an
unpickler that can build no other object, so nothing of the file runs in the parent.

Functions cannot cross processes: the hooks are run where they are needed, from the file read again in
that process (`run_here`, in the mold; the supervisor's before_exit in a child of its own).

Only a regular file of at most MAX_SIZE bytes is read (not a FIFO, a device such as /dev/zero, a
directory), opened without blocking, so reading it cannot hang either.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import os
import select
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from resque_starter import kinds

MAX_SIZE = 1 << 20  # bytes of config file: far more than any config, far less than a mistake
MAX_RESULT = 4 << 20  # bytes of the pickled values the child sends back
MAX_DEPTH = 16  # nesting of lists, tuples and dicts in one value
MAX_REPR = 120  # characters of an Opaque value's description

_HEADER = 4  # bytes of the big-endian length before the pickled reply


class ConfigFileError(Exception):
    """What is wrong with the file: the `allowed` text of the ConfigError the loader builds around it."""


@dataclass(frozen=True)
class Opaque:
    """A config file's value that is not plain data, described: its repr, type and whether it is callable."""

    text: str
    kind: str
    callable: bool

    def __repr__(self) -> str:
        return self.text


def read_source(path: str) -> bytes:
    """The file's bytes, if it is a regular file of at most MAX_SIZE bytes; never blocks (O_NONBLOCK)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigFileError(f"a readable Python file ({e.strerror or e})") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise ConfigFileError("a Python config file, not a directory")
        if not stat.S_ISREG(mode):
            raise ConfigFileError(f"a regular file (it is a {_file_type(mode)})")
        data = b""
        while len(data) <= MAX_SIZE and (chunk := os.read(fd, MAX_SIZE + 1 - len(data))):
            data += chunk
    except OSError as e:
        raise ConfigFileError(f"a readable Python file ({e.strerror or e})") from None
    finally:
        os.close(fd)
    if len(data) > MAX_SIZE:
        raise ConfigFileError(f"a Python file of at most {MAX_SIZE >> 10} KiB (it has more)")
    return data


def _file_type(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return name
    return "special file"


def run_here(path: str) -> dict[str, Any]:
    """Run the file in this process and return its namespace; ConfigFileError when it fails.

    Every exception it raises is caught, BaseException included: KeyboardInterrupt or SystemExit raised
    by a config file is a broken config file, not a request to stop."""
    source = read_source(path)
    namespace: dict[str, Any] = {"__name__": "__config__", "__file__": path, "__builtins__": builtins}
    try:
        code = compile(source, path, "exec", dont_inherit=True)
        exec(code, namespace)
    except SyntaxError as e:
        raise ConfigFileError(f"a valid Python file (SyntaxError at line {e.lineno}: {e.msg})") from None
    except BaseException as e:
        raise ConfigFileError(f"a Python file that runs (it raised {type(e).__name__}: {e})") from None
    return namespace


def hook_functions(path: str, names: Iterable[str]) -> dict[str, Callable[..., Any]]:
    """The functions `names` of the config file, run in this process; ConfigFileError if one is gone."""
    namespace = run_here(path)
    for name in names:
        if not callable(namespace.get(name)):
            raise ConfigFileError(f"a Python file that defines the hook {name} (it no longer does)")
    return {name: namespace[name] for name in names}


@dataclass(frozen=True)
class FileHook:
    """A hook of the config file, by name: calling it runs the file again in the calling process (a
    function cannot cross processes), so the mold swaps these for the functions once (config.with_hooks),
    and the supervisor calls its before_exit only in a child."""

    path: str
    name: str

    def __call__(self, *args: Any) -> Any:
        return hook_functions(self.path, [self.name])[self.name](*args)


def sort_names(
    namespace: Mapping[str, object],
    settings: Collection[str],
    hooks: Collection[str],
    only_outside: Mapping[str, str],
) -> tuple[dict[str, object], list[str]]:
    """The file's settings (plain values, None left out) and the names of its hooks, from its public
    names (`plain`); a name that is probably a misspelt setting or hook is an error with a did-you-mean.
    `only_outside`: setting -> where it is set instead (it governs the file, so the file cannot set it)."""
    found: dict[str, object] = {}
    found_hooks: list[str] = []
    known = [*settings, *hooks]
    for name, value in namespace.items():
        if name in hooks:
            if not isinstance(value, Opaque) or not value.callable:
                kind = value.kind if isinstance(value, Opaque) else type(value).__name__
                raise ConfigFileError(f"hook {name} must be a function, not {kind}")
            found_hooks.append(name)
        elif name == "config":
            raise ConfigFileError("the config file cannot name another config file")
        elif name in only_outside:
            raise ConfigFileError(f"{name} is set by {only_outside[name]} only")
        elif name in settings:
            if value is not None:
                found[name] = value
        elif name.lower() in known:
            raise ConfigFileError(f"settings are lowercase: write {name.lower()} instead of {name}")
        elif name.islower() and (close := kinds.close_match(name, known)):
            raise ConfigFileError(f"{name} is not a setting or hook; did you mean {close}?")
    return found, found_hooks


def public_names(namespace: dict[str, Any]) -> dict[str, Any]:
    """The names a config file defines for us: not _private, not modules it imported."""
    return {
        name: value
        for name, value in namespace.items()
        if not name.startswith("_") and not isinstance(value, type(sys))
    }


def plain(value: object, depth: int = 0) -> object:
    """`value` as plain data that pickles without any class: anything else becomes an Opaque."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if depth < MAX_DEPTH:
        if type(value) is list:
            return [plain(item, depth + 1) for item in value]
        if type(value) is tuple:
            return tuple(plain(item, depth + 1) for item in value)
        if type(value) is dict:
            return {plain(k, depth + 1): plain(v, depth + 1) for k, v in value.items()}
    try:
        text = repr(value)
    except Exception:
        text = f"<{type(value).__name__}>"
    if len(text) > MAX_REPR:
        text = text[: MAX_REPR - 3] + "..."
    return Opaque(text, type(value).__name__, callable(value))


def _unpickle_plain(data: bytes) -> Any:
    """Unpickle plain data and Opaque, nothing else: no class of the config file is ever looked up.
    (pickle is imported here, only by supervisors with a config file: the supervisor's memory.)"""
    import pickle

    class PlainUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if (module, name) == (__name__, "Opaque"):
                return Opaque
            raise pickle.UnpicklingError(f"{module}.{name} is not plain data")

    return PlainUnpickler(io.BytesIO(data)).load()


class Evaluation:
    """A config file run in a forked child with a deadline; its result is read without blocking.

    The supervisor registers `sock` in its selector, calls `on_readable` when it is readable and
    `exited` when it reaps `pid`, and takes `result()` once `done`; `wait` is the blocking form."""

    def __init__(self, path: str, timeout: float, import_path: Iterable[str] = ()) -> None:
        self.path = path
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self._data = bytearray()
        self.eof = False  # the child closed its end (or sent more than MAX_RESULT, which is not read)
        self._overflow = False
        self._status: int | None = None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.pid = fork_isolated()
        if self.pid == 0:  # pragma: no cover - the child ends in os._exit
            ours.close()
            _child(theirs, path, list(import_path))
        theirs.close()
        ours.setblocking(False)
        self.sock = ours

    def on_readable(self, _sock: object = None) -> None:
        """Read what the child sent so far (the selector callback: `_sock` is the readable socket)."""
        while not self.eof:
            try:
                chunk = self.sock.recv(65536)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            self._data += chunk
            self._overflow = len(self._data) > MAX_RESULT + _HEADER
            self.eof = not chunk or self._overflow

    def exited(self, status: int) -> None:
        self._status = status

    @property
    def _complete(self) -> bool:
        if len(self._data) < _HEADER:
            return False
        return len(self._data) >= _HEADER + int.from_bytes(self._data[:_HEADER], "big")

    @property
    def done(self) -> bool:
        """The result is here, or the child is gone without one, or the deadline has passed."""
        return (
            self._complete
            or self._overflow
            or (self.eof and self._status is not None)
            or time.monotonic() >= self.deadline
        )

    def result(self) -> dict[str, object]:
        """The file's public names as plain data; ConfigFileError for whatever went wrong."""
        self.close()
        if self._overflow:
            raise ConfigFileError(f"a Python file whose settings take at most {MAX_RESULT >> 20} MiB")
        if self._complete:
            try:
                kind, payload = _unpickle_plain(bytes(self._data[_HEADER:]))
                names = dict(payload) if kind == "ok" else None
            except Exception as e:  # garbled: something else wrote to its socket (a fork of the file)
                raise ConfigFileError(f"a Python file whose result can be read ({e})") from None
            if names is None:
                raise ConfigFileError(str(payload))
            return names
        if self._status is None:
            raise ConfigFileError(f"a Python file that runs to its end within {self.timeout:g}s (it did not)")
        raise ConfigFileError(f"a Python file that runs to its end (it {_ended(self._status)} before that)")

    def wait(self) -> None:
        """Block until `done` (start-up, before there is a loop to watch it), then reap the child."""
        try:
            while not self.done:
                if not self.eof:
                    left = max(0.0, self.deadline - time.monotonic())
                    if select.select([self.sock], [], [], left)[0]:
                        self.on_readable()
                    continue
                pid, status = os.waitpid(self.pid, os.WNOHANG)  # it closed its end: its exit is near
                if pid:
                    self.exited(status)
                else:
                    time.sleep(0.005)
        finally:
            self.close()
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)

    def close(self) -> None:
        """End the child and whatever it started (its process group), once; the caller reaps the child."""
        if self.sock.fileno() == -1:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self.sock.close()


def _ended(status: int) -> str:
    if os.WIFSIGNALED(status):
        try:
            return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
        except ValueError:  # a real-time signal has no name
            return f"was killed by signal {os.WTERMSIG(status)}"
    return f"exited with code {os.waitstatus_to_exitcode(status)}"


def fork_isolated() -> int:
    """fork(); the child (0 returned there) is the leader of a process group of its own, so that killing
    the group ends whatever it started too, and handles signals as a plain process does, not as the
    supervisor it was forked from."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setpgid(0, 0)
            _reset_signals()
        except BaseException:  # the child must never go on as a copy of its parent
            os._exit(1)
    return pid


def wait_or_kill(pid: int, timeout: float) -> int | None:
    """The exit status of child `pid` within `timeout` seconds, or None: then its group is killed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.01)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


def _reset_signals() -> None:
    signal.set_wakeup_fd(-1)
    for sig in signal.valid_signals():
        with contextlib.suppress(OSError, ValueError):
            if callable(signal.getsignal(sig)):
                signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def _child(sock: socket.socket, path: str, import_path: list[str]) -> None:
    """Run the file, send back its public names as plain data (or the error), and exit."""
    code = 0
    try:
        # none of the supervisor's sockets and pipes stays open in here (a mold would not see the
        # supervisor's end close while a config file runs, for one)
        os.closerange(3, sock.fileno())
        os.closerange(sock.fileno() + 1, os.sysconf("SC_OPEN_MAX"))
        sys.path[:0] = [entry for entry in import_path if entry not in sys.path]
        try:
            reply: tuple[str, object] = ("ok", {k: plain(v) for k, v in public_names(run_here(path)).items()})
        except ConfigFileError as e:
            reply = ("error", str(e))
        import pickle

        data = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
        sock.sendall(len(data).to_bytes(_HEADER, "big") + data)
    except BaseException:
        code = 1
    finally:
        os._exit(code)
