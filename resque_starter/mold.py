"""The mold: one per generation, the only process that imports the application.

It is forked from the supervisor, imports RESQUE_STARTER_APP, runs the before_fork and warmup hooks,
then `gc.collect(); gc.freeze()` so the objects it built stay on shared pages in every worker. It then
serves fork requests from the supervisor: workers, recoveries, the agent. Each fork is a double fork:
the intermediate child exits at once, so the worker (or recovery child, or agent) is adopted by the
supervisor, the subreaper or PID 1, which reaps it and owns its slot. Pitchfork's monitor/mold split
is the model.
"""

from __future__ import annotations

import gc
import importlib
import logging
import os
import signal
import socket
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import NoReturn

from setproctitle import setproctitle

from resque_starter import hugepages, loader, logs, orphans, procmem, protocol
from resque_starter.config import (
    EXIT_APP_IMPORT,
    EXIT_CONFIG,
    ConfigError,
    Settings,
    check_classes,
    mask_url,
)
from resque_starter.protocol import WorkerSpec

log = logging.getLogger("resque_starter.mold")

# The supervisor orchestrates every stop; a terminal's Ctrl-C or Ctrl-\ must not take the mold down.
_IGNORED = (
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGWINCH,
)


def run_mold(settings: Settings, generation: int, sock: socket.socket, promoted: bool = False) -> NoReturn:
    """Import the app, freeze the heap, then fork workers on request until the supervisor hangs up.

    `promoted`: this process is a worker promoted to mold (reforking), with the app and whatever its
    jobs loaded already in memory; it only collects and freezes.
    """
    code = 1
    try:
        # nothing this process forks after the supervisor is gone would be supervised: die with it
        orphans.die_with_parent(os.getppid(), signal.SIGKILL)
        logs.set_role(f"mold gen={generation}")
        origin = " reforked" if promoted else ""
        setproctitle(f"resque-starter: mold gen={generation} app={','.join(settings.app) or '-'}{origin}")
        for sig in _IGNORED:
            signal.signal(sig, signal.SIG_IGN)
        for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGCONT):
            signal.signal(sig, signal.SIG_DFL)
        if not promoted:
            hugepages.gather_heap()  # so that the app's memory can be collapsed into huge pages
        error = None
        if not promoted:
            settings, error = _preload(settings)
        if error is None and not promoted:
            _warm_worker_path(settings)
        if error is not None:
            code, message = error
            protocol.send(sock, {"op": "error", "code": code, "message": message})
        else:
            # every object built so far stays on pages no collection in a worker writes to
            gc.collect()
            gc.freeze()
            procmem.release_free_heap()  # no worker copies a free page of the heap to allocate in it
            hugepages.collapse_heap()  # cheaper forks and exits from here on
            protocol.send(sock, {"op": "ready", "pid": os.getpid()})
            _serve(settings, sock)
            code = 0
    except BaseException:  # the mold must always end with os._exit, never unwind into the supervisor
        log.exception("mold gen=%d failed", generation)
    finally:
        logging.shutdown()
        os._exit(code)


def _preload(settings: Settings) -> tuple[Settings, tuple[int, str] | None]:
    """Put the import path in place, read the config file's hooks, import the app and the configured
    classes, run the mold's hooks. The settings with the hooks as functions (the workers inherit them),
    and (exit code, one line) on failure."""
    # PATH first, like gunicorn's --pythonpath; the working directory last, like `rq worker` (so that a
    # file of the working directory cannot shadow an installed module)
    sys.path[:0] = [entry for entry in settings.path if entry not in sys.path]
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        settings = loader.with_hooks(settings)
    except ConfigError as exc:
        return settings, (EXIT_CONFIG, str(exc))
    return settings, _import_app(settings)


def _import_app(settings: Settings) -> tuple[int, str] | None:
    for module in settings.app:
        try:
            imported = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name is not None and module.startswith(exc.name) and _is_prefix(exc.name, module):
                return EXIT_CONFIG, (
                    f"RESQUE_STARTER_APP={module!r} is not allowed: no module named {exc.name!r} "
                    f"on sys.path (an importable dotted module is required)"
                )
            return _app_failure(f"importing {module}")
        except BaseException:
            return _app_failure(f"importing {module}")
        if getattr(imported, "__file__", None) is None and hasattr(imported, "__path__"):
            where = ", ".join(dict.fromkeys(imported.__path__))
            return EXIT_CONFIG, (
                f"RESQUE_STARTER_APP={module!r} is not allowed: {where} is a directory without "
                f"__init__.py, with no code to preload (an importable module is required)"
            )
    error = check_classes(settings)
    if error is not None:
        return EXIT_CONFIG, error
    for name in ("before_fork", "warmup"):
        hook: Callable[[Settings], object] | None = getattr(settings.hooks, name)
        if hook is not None:
            try:
                hook(settings)
            except BaseException:
                return _app_failure(f"the {name} hook")
    return None


def _warm_worker_path(settings: Settings) -> None:
    """Load here, before the freeze, what every worker would otherwise load for itself after the fork:
    the worker module, what rq's first job builds lazily (datetime.strptime's module and caches, the
    resource module os.wait4 imports), and what a Redis client's first use imports."""
    import resource  # noqa: F401

    from rq.utils import now, str_to_date, utcformat

    import resque_starter.worker

    str_to_date(utcformat(now()))
    if settings.redis_url:
        resque_starter.worker.warm_client(settings.redis_url)


def _is_prefix(name: str, module: str) -> bool:
    return module == name or module.startswith(name + ".")


def _app_failure(what: str) -> tuple[int, str]:
    """Log the traceback once, here; the supervisor exits 3 without a respawn loop."""
    log.error("application failed in %s:\n%s", what, traceback.format_exc().rstrip())
    kind, value = sys.exc_info()[:2]
    return EXIT_APP_IMPORT, f"application failed in {what}: {kind.__name__ if kind else '?'}: {value}"


def _serve(settings: Settings, sock: socket.socket) -> None:
    """Answer fork requests in order; each passed file descriptor belongs to the next spawn request."""
    supervisor = os.getppid()
    buffer = protocol.LineBuffer()
    fds: deque[int] = deque()
    messages: deque[dict[str, object]] = deque()
    while True:
        while not messages:
            data, new_fds, _flags, _addr = socket.recv_fds(sock, 65536, 16)
            if not data:
                return
            fds.extend(new_fds)
            messages.extend(buffer.feed(data))
        message = messages.popleft()
        op = message.get("op")
        if op == "exit":
            return
        if op == "spawn":
            spec = WorkerSpec(**message["spec"])  # type: ignore[arg-type]
            status_fd = fds.popleft()
            worker = partial(_worker_main, settings, spec, status_fd, supervisor)
            pid = _double_fork(sock, worker, close=[status_fd])
            protocol.send(sock, {"op": "forked", "token": spec.name, "pid": pid})
        elif op == "agent":
            status_fd = fds.popleft()
            agent = partial(_agent_main, settings, message, status_fd, supervisor)
            pid = _double_fork(sock, agent, close=[status_fd])
            protocol.send(sock, {"op": "forked", "token": message["token"], "pid": pid})
        elif op == "recover":
            pid = _double_fork(sock, partial(_recovery_main, settings, message, os.getppid()))
            protocol.send(sock, {"op": "forked", "token": message["token"], "pid": pid})
        else:
            log.warning("mold ignores unknown request %r", message)


def _double_fork(sock: socket.socket, target: Callable[[], None], close: list[int] | None = None) -> int:
    """Run target in a grandchild whose parent exits at once; return the grandchild's pid."""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.close(read_end)
            grandchild = os.fork()
            if grandchild == 0:
                os.close(write_end)
                sock.close()
                _run_and_exit(target)
            os.write(write_end, str(grandchild).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    for fd in close or ():
        os.close(fd)
    data = os.read(read_end, 32)
    os.close(read_end)
    os.waitpid(child, 0)
    return int(data)


def _run_and_exit(target: Callable[[], None]) -> NoReturn:
    """The grandchild's whole life: its exit status tells the supervisor whether target succeeded."""
    code = 0
    try:
        target()
    except BaseException:
        log.exception("%s failed", getattr(target, "func", target).__name__)
        code = 1
    finally:
        logging.shutdown()
        os._exit(code)


def _worker_main(settings: Settings, spec: WorkerSpec, status_fd: int, supervisor: int) -> None:
    from resque_starter.worker import run_worker  # imports rq: never in the supervisor, which imports us

    if not orphans.await_adoption(supervisor):
        log.error("worker %s: its supervisor (pid %d) is gone; exiting unstarted", spec.name, supervisor)
        return
    # outside a PID namespace nothing else would stop a worker whose supervisor was SIGKILLed:
    # a quick stop puts its job back at the front of its queue and it exits
    orphans.die_with_parent(supervisor, signal.SIGINT)

    group = settings.groups[spec.group]
    logs.set_role(f"worker[{group.name}:{spec.slot}]" if len(settings.groups) > 1 else f"worker[{spec.slot}]")
    run_worker(settings, spec, socket.socket(fileno=status_fd), become_mold=_promoted)


def _promoted(settings: Settings, generation: int, sock: socket.socket) -> NoReturn:
    """A worker asked to be the mold of `generation` (reforking) becomes it, with what its jobs loaded."""
    run_mold(settings, generation, sock, promoted=True)


def _agent_main(settings: Settings, request: dict[str, object], status_fd: int, supervisor: int) -> None:
    from resque_starter.agent import run_agent

    run_agent(settings, request, status_fd, supervisor)


def _recovery_main(settings: Settings, request: dict[str, object], supervisor: int) -> None:
    """Put a dead worker's claimed and started jobs back (or fail them) with the app's own classes.

    A worker often dies *because* Redis went away, so this waits for Redis with backoff (recovery is
    idempotent, so a retry after a partial run is safe); a stop past its deadline kills it, and it
    gives up by itself once the supervisor, its parent after the double fork, is gone."""
    import redis

    from resque_starter.connection import connect
    from resque_starter.recovery import recover_worker
    from resque_starter.worker import DRIVER_INFO, REDIS_BACKOFF_FIRST, REDIS_BACKOFF_MAX

    logs.set_role("recovery")
    setproctitle(f"resque-starter: recovery {request['worker']}")
    assert settings.redis_url is not None
    connection = connect(settings.redis_url, socket_timeout=30, driver_info=DRIVER_INFO)
    wait = REDIS_BACKOFF_FIRST
    while True:
        try:
            result = recover_worker(
                connection,
                str(request["worker"]),
                list(request["queues"]),  # type: ignore[call-overload]
                requeue=bool(request["requeue"]),
                max_requeues=settings.max_requeues,
                reason=str(request["reason"]),
                job_class=settings.job_class,
                queue_class=settings.queue_class,
                serializer=settings.serializer,
            )
            break
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            log.warning(
                "recovery of worker %s: Redis at %s not reachable (%s); retrying in %.1fs",
                request["worker"], mask_url(settings.redis_url), exc, wait,
            )  # fmt: skip
            time.sleep(wait)
            wait = min(wait * 2, REDIS_BACKOFF_MAX)
            if os.getppid() != supervisor:
                log.error("recovery of worker %s: the supervisor is gone; giving up", request["worker"])
                return
    log.info("recovered worker %s: %s", request["worker"], result)
