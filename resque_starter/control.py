"""The control socket's client side: `resque-starter ctl`'s requests, its `drain`, and the text it prints.

It talks to control_server.py in the supervisor: one JSON request line, one JSON reply line, which may
be long (`status` of hundreds of workers), so it reads up to the server's largest reply.
"""

from __future__ import annotations

import errno
import os
import pwd
import socket
import time
from collections.abc import Callable
from typing import Any

from resque_starter import protocol
from resque_starter.control_server import MAX_REPLY, socket_path
from resque_starter.states import WorkerState


class ControlError(Exception):
    """Why ctl could not talk to the supervisor, in words a person can act on."""


class Refused(ControlError):
    """The supervisor answered, and refused the command: the message is its reason."""


def command(run_dir: str, message: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """`request`, and its reply when the supervisor carried the command out; Refused otherwise."""
    reply = request(run_dir, message, timeout)
    if not reply.get("ok"):
        raise Refused(str(reply.get("error")))
    return reply


def request(run_dir: str, message: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    path = socket_path(run_dir)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        _connect(sock, path, time.monotonic() + timeout)
        protocol.send(sock, message)
        reply = protocol.LineBuffer(MAX_REPLY).recv(sock)
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


def _window(group: dict[str, Any]) -> str:
    """` (autoscale 1:8)` after an autoscaling group's size, with what holds its growth back."""
    scale = group.get("autoscale")
    if scale is None:
        return ""
    held = f", held by {scale['held']}" if scale["held"] else ""
    return f" (autoscale {scale['min']}:{scale['max']}{held})"


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
        "groups: " + "; ".join(f"{g['name']}={g['size']}{_window(g)}" for g in status["groups"]),
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


def drain(run_dir: str, timeout: float, out: Callable[[str], None], group: str | None = None) -> bool:
    """Stop intake (of every group, or of GROUP), then block until each of those workers has paused
    with no job, or the timeout passes.

    A worker counts only once it has acknowledged the pause: one still "idle" may have just taken a
    job it has not reported yet. True when drained.
    """
    command(run_dir, {"cmd": "drain", "group": group})
    deadline = time.monotonic() + timeout
    reported: set[str] = set()
    settled = (WorkerState.PAUSED, WorkerState.STOPPING)
    while True:
        workers = command(run_dir, {"cmd": "status"})["status"]["workers"]
        waiting = [w for w in workers if w["state"] not in settled and group in (None, w["group"])]
        if not waiting:
            out("drained: no job is running")
            return True
        for w in waiting:
            who = f"worker[{w['slot']}] pid {w['pid']}"
            line = (
                f"waiting for job {w['job_id']} ({w['job_func']}) on {who}"
                if w["state"] == WorkerState.BUSY
                else f"waiting for {who} to pause"
            )
            if line not in reported:
                reported.add(line)
                out(line)
        if time.monotonic() >= deadline:
            busy = sum(1 for w in waiting if w["state"] == WorkerState.BUSY)
            unpaused = len(waiting) - busy
            out(f"timed out after {timeout:g}s: {busy} job(s) running, {unpaused} worker(s) not paused")
            return False
        time.sleep(0.1)


def reload(run_dir: str, timeout: float = 330.0) -> dict[str, Any]:
    """`ctl reload`: ask for it, then wait until it started a generation (its reply then) or was refused
    (Refused with the reason). The supervisor reads the config file in a child, never in its loop, so
    its answer to `reload` only says the reload is under way; `timeout` is past the longest
    CONFIG_TIMEOUT."""
    command(run_dir, {"cmd": "reload"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = command(run_dir, {"cmd": "status"})["status"]
        if not status.get("reloading"):
            if status.get("reload_error"):
                raise Refused(f"{status['reload_error']} (the running generation keeps serving)")
            return {"ok": True, "generation": status["generation"]}
        time.sleep(0.05)
    raise ControlError(f"the reload was still reading its configuration after {timeout:.0f}s")


# The one line `ctl` prints for each command that changes something, filled from its reply.
DONE = {
    "scale": "group {group}: {size} worker(s)",
    "pause": "paused {which}: its workers take no new job until ctl resume",
    "resume": "resumed {which}: its workers take jobs again",
    "reload": "reloading: a new generation starts; the serving one serves until it is ready",
    "stop": "stopping ({stopping}): ctl status shows the workers left",
    "kill-jobs": "kill-jobs: told {workers} worker(s) to kill their running job",
    "kill": "killing job {job} ({worker[job_func]}) on worker {worker[group]}:{worker[slot]} "
    "pid {worker[pid]}",
}


def describe(message: dict[str, Any], reply: dict[str, Any]) -> str:
    """What the supervisor did, in the words of DONE; `which` names the group a request gave, if any."""
    group = message.get("group")
    if "autoscale" in reply:  # scale +N/-N moved an autoscaling group's window
        low, high = reply["autoscale"]
        return f"group {reply['group']}: autoscale {low}:{high} worker(s)"
    return DONE[message["cmd"]].format(which=f"group {group}" if group else "every group", **reply)
