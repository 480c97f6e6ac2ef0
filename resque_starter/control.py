"""The control socket: how `resque-starter ctl` reaches the supervisor, whoever is PID 1.

A Unix stream socket in RUN_DIR, mode 0600. One JSON request line, one JSON reply line, then the
server closes. The server side runs inside the supervisor's event loop (non-blocking, bounded), and a
command only changes desired state, exactly like the matching signal.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import pwd
import selectors
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from resque_starter import config, procmem, protocol
from resque_starter.config import ConfigError
from resque_starter.listener import Listener

if TYPE_CHECKING:
    from resque_starter.supervisor import Supervisor

log = logging.getLogger("resque_starter.control")

SOCKET_NAME = "control.sock"
MAX_SCALE = config.MAX_GROUP_SIZE
Handler = Callable[[dict[str, Any]], dict[str, Any]]


def socket_path(run_dir: str) -> str:
    return os.path.join(run_dir, SOCKET_NAME)


class ControlServer(Listener[protocol.LineBuffer]):
    def __init__(self, run_dir: str, selector: selectors.BaseSelector, handler: Handler) -> None:
        super().__init__(selector)
        self.path = socket_path(run_dir)
        self._handler = handler
        _remove_stale(self.path, run_dir)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            self.sock.bind(self.path)
        except OSError as exc:
            allowed = f"a writable directory ({exc.strerror})"
            raise ConfigError("RESQUE_STARTER_RUN_DIR", run_dir, allowed) from None
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        self.listen()

    def new_client(self) -> protocol.LineBuffer:
        return protocol.LineBuffer()

    def read(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        buffer = self._clients[conn]
        if not data:
            if buffer.partial:  # the client half-closed in the middle of its request line
                self._reply(conn, {"ok": False, "error": "bad request: end of stream before a newline"})
            else:
                self.drop(conn)
            return
        end = data.find(b"\n")  # one request per connection: what follows its line is never parsed
        messages = buffer.feed(data if end < 0 else data[: end + 1])
        if not messages:
            return
        request = messages[0]
        if "error" in request and "cmd" not in request:
            reply = {"ok": False, "error": f"bad request: {request['error']}"}
        else:
            try:
                reply = self._handler(request)
            except Exception as exc:  # a bad request must never take the supervisor down
                log.exception("control request %r failed", request)
                reply = {"ok": False, "error": f"internal error: {exc}"}
        self._reply(conn, reply)

    def _reply(self, conn: socket.socket, reply: dict[str, Any]) -> None:
        conn.settimeout(1.0)
        with contextlib.suppress(OSError):
            conn.sendall(protocol.encode(reply))
        conn.setblocking(False)
        self.linger(conn)

    def close(self) -> None:
        super().close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def _remove_stale(path: str, run_dir: str) -> None:
    """A socket nobody answers on is a dead supervisor's: replace it; a live one is an error."""
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
        return
    finally:
        probe.close()
    allowed = f"a run dir no other running supervisor uses ({path} answers)"
    raise ConfigError("RESQUE_STARTER_RUN_DIR", run_dir, allowed)


# --------------------------------------------------------------------------- server-side commands


def dispatch(sup: Supervisor, request: dict[str, Any]) -> dict[str, Any]:
    cmd = request.get("cmd")
    if cmd == "status":
        return {"ok": True, "status": sup.status()}
    if cmd == "mem":
        return {"ok": True, "mem": procmem.report(sup.status())}
    if cmd == "health":
        return health(sup, request.get("check", "live"))
    if cmd == "scale":
        return scale(sup, request.get("n"), request.get("group"))
    if cmd in ("pause", "drain"):
        sup.pause(True, drain=cmd == "drain")
    elif cmd == "resume":
        sup.pause(False)
    elif cmd == "reload":
        sup.request_reload()
        if sup.reload_error:
            return {"ok": False, "error": sup.reload_error}
    elif cmd == "stop":
        sup.request_stop(1 if request.get("quick") else 0)
    elif cmd == "kill-jobs":
        sup.kill_jobs()
    else:
        return {"ok": False, "error": f"unknown command {cmd!r}"}
    return {"ok": True}


def scale(sup: Supervisor, n: object, group: object) -> dict[str, Any]:
    names = [g.name for g in sup.settings.groups]
    if group is None:
        index = 0
    elif isinstance(group, str) and group in names:
        index = names.index(group)
    else:
        return {"ok": False, "error": f"unknown group {group!r}; groups: {'; '.join(names)}"}
    text = str(n).strip()
    try:
        value = int(text)
    except ValueError:
        return {"ok": False, "error": f"scale takes N, +N or -N, not {n!r}"}
    size = sup.sizes[index] + value if text[:1] in "+-" else value
    if size < 0:
        return {"ok": False, "error": f"scale {text} would make {size} workers; the least is 0"}
    if size > MAX_SCALE:
        return {"ok": False, "error": f"scale {text} would make {size} workers; the most is {MAX_SCALE}"}
    if sup.stop_level is not None:
        return {"ok": False, "error": "the supervisor is stopping"}
    sup.scale(index, size)
    return {"ok": True, "group": names[index], "size": size}


def health(sup: Supervisor, check: object) -> dict[str, Any]:
    """live: the loop answers and a mold serves; ready: also not stopping, a worker registered with rq
    and Redis answering. A paused (or draining) supervisor stays ready: it is healthy, just idle."""
    live = any(m.ready for m in sup.molds.values()) or sup.serving_generation > 0
    if check == "live":
        return {"ok": live, "live": live}
    if check != "ready":
        return {"ok": False, "error": f"health checks are 'live' and 'ready', not {check!r}"}
    ready_workers = sum(1 for w in sup.workers.values() if w.ready and w.stop_level is None)
    redis_ok = sup.redis_answers()
    ok = live and ready_workers > 0 and redis_ok and sup.stop_level is None
    return {"ok": ok, "live": live, "ready_workers": ready_workers, "redis": redis_ok}


# --------------------------------------------------------------------------- client side


class ControlError(Exception):
    """Why ctl could not talk to the supervisor, in words a person can act on."""


def request(run_dir: str, message: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    path = socket_path(run_dir)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        _connect(sock, path, time.monotonic() + timeout)
        protocol.send(sock, message)
        reply = protocol.LineBuffer().recv(sock)
    except FileNotFoundError:
        raise ControlError(
            f"no supervisor is running here: no control socket at {path} (RESQUE_STARTER_RUN_DIR={run_dir})"
        ) from None
    except PermissionError:
        raise ControlError(f"permission denied on {path}: {_owner(path)}; run ctl as that user") from None
    except ConnectionRefusedError:
        raise ControlError(
            f"no supervisor answers on {path} (the stale socket of a dead supervisor)"
        ) from None
    except TimeoutError:
        raise ControlError(f"the supervisor did not answer on {path} within {timeout:.0f}s") from None
    except OSError as exc:
        if exc.errno == errno.ENOTDIR:
            raise ControlError(f"{run_dir} is not a directory (RESQUE_STARTER_RUN_DIR)") from None
        raise ControlError(f"cannot reach the supervisor on {path}: {exc.strerror}") from None
    finally:
        sock.close()
    if reply is None:
        raise ControlError(f"the supervisor closed {path} without answering")
    return reply


def _connect(sock: socket.socket, path: str, deadline: float) -> None:
    """A Unix socket refuses at once (EAGAIN) while its listen backlog is full: retry until the deadline."""
    while True:
        try:
            sock.connect(path)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise TimeoutError from None
            time.sleep(0.01)


def _owner(path: str) -> str:
    """Who owns the socket, or the nearest directory above it we may look at (a 0700 run dir)."""
    current = path
    while True:
        try:
            uid = os.stat(current).st_uid
            break
        except OSError:
            parent = os.path.dirname(current)
            if parent == current:
                return "it belongs to another user"
            current = parent
    try:
        name = f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        name = f"uid {uid}"
    return f"{'it' if current == path else current} belongs to {name}"


def format_status(status: dict[str, Any]) -> str:
    """The readable table of `ctl status`."""
    if status["stopping"]:
        flags = f"STOPPING ({status['stopping']})  "
    else:
        flags = "DRAINING  " if status["draining"] else "PAUSED  " if status["paused"] else ""
    jobs = status["jobs"]
    lines = [
        f"supervisor pid {status['pid']}  up {_age(status['uptime'])}  generation {status['generation']}  "
        f"{flags}redis {status['redis_url']}  app {','.join(status['app']) or '-'}",
        "groups: " + "; ".join(f"{g['name']}={g['size']}" for g in status["groups"]),
        f"jobs: {jobs['done']} done, {jobs['failed']} failed, {jobs['requeued']} requeued; "
        f"{status['restarts']} worker restart(s), {status['reloads']} reload(s)",
    ]
    if status.get("reload_error"):
        lines.append(f"last reload failed: {status['reload_error']}")
    for m in status["molds"]:
        lines.append(f"mold gen={m['generation']} pid {m['pid']} {'ready' if m['ready'] else 'starting'}")
    header = ("GROUP", "SLOT", "PID", "GEN", "STATE", "JOB", "FUNC", "AGE", "DONE", "FAIL", "USS", "PSS")
    rows = [header]
    for w in status["workers"]:
        rows.append(
            (
                w["group"],
                str(w["slot"]),
                str(w["pid"] or "-"),
                str(w["generation"]),
                w["state"],
                (w["job_id"] or "-")[:12],
                w["job_func"] or "-",
                _age(w["job_age"]) if w["job_age"] is not None else "-",
                str(w["jobs_done"]),
                str(w["jobs_failed"]),
                _size(w["uss"]),
                _size(w["pss"]),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines += ["  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in rows]
    return "\n".join(lines)


def _age(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def _size(value: int | None) -> str:
    if value is None:
        return "-"
    return f"{value / 2**20:.1f}M"


def drain(run_dir: str, timeout: float, out: Callable[[str], None]) -> bool:
    """Stop intake, then block until every worker has paused with no job, or the timeout passes.

    A worker counts only once it has acknowledged the pause: one still "idle" may have just taken a
    job it has not reported yet. True when drained.
    """
    request(run_dir, {"cmd": "drain"})
    deadline = time.monotonic() + timeout
    reported: set[str] = set()
    while True:
        workers = request(run_dir, {"cmd": "status"})["status"]["workers"]
        waiting = [w for w in workers if w["state"] not in ("paused", "stopping")]
        if not waiting:
            out("drained: no job is running")
            return True
        for w in waiting:
            who = f"worker[{w['slot']}] pid {w['pid']}"
            line = (
                f"waiting for job {w['job_id']} ({w['job_func']}) on {who}"
                if w["state"] == "busy"
                else f"waiting for {who} to pause"
            )
            if line not in reported:
                reported.add(line)
                out(line)
        if time.monotonic() >= deadline:
            busy = sum(1 for w in waiting if w["state"] == "busy")
            unpaused = len(waiting) - busy
            out(f"timed out after {timeout:g}s: {busy} job(s) running, {unpaused} worker(s) not paused")
            return False
        time.sleep(0.1)
