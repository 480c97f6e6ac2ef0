"""The worker process: its entry point in a fresh fork of the mold, its life, and the worker it builds.

`run_worker` opens the worker's own Redis connection (waiting for Redis with backoff), runs the
after_fork hook and then rq's `work()` with StarterMixin (or PreforkHorseMixin) layered over the
configured worker class. A worker asked to become the next mold hands its process over to the mold's
code, which the caller passes in (the mold imports this package, not the other way round).
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import logging
import os
import random
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import NoReturn

import redis
from redis.driver_info import DriverInfo
from rq.utils import import_attribute
from rq.worker import BaseWorker, DequeueStrategy
from rq.worker import Worker as ForkingWorker
from setproctitle import setproctitle

from resque_starter import job as job_api
from resque_starter import stacks
from resque_starter.config import Settings, mask_url
from resque_starter.connection import connect
from resque_starter.protocol import EXIT_REDIS_UNREACHABLE, WorkerSpec
from resque_starter.worker.controls import REDIS_BACKOFF_FIRST, REDIS_BACKOFF_MAX, Context, Controls
from resque_starter.worker.horse import PreforkHorseMixin
from resque_starter.worker.mixin import StarterMixin

log = logging.getLogger("resque_starter.worker")


EXIT_OK = 0
EXIT_FAILED = 1
EXIT_HOOK_FAILED = 70

STATUS_SEND_TIMEOUT = 5.0
THREAD_JOIN_TIMEOUT = 5.0  # how long a promoted worker waits for rq's pubsub thread before it forks
REDIS_CONNECT_TIMEOUT = 5.0
# Given to every client we make: without it, each new connection (every worker, every work-horse)
# looks the version up in the package metadata, running importlib.metadata and an email parser.
DRIVER_INFO = DriverInfo(lib_version=redis.__version__)

# Signals whose handlers a fork may have inherited from the supervisor, the mold or pytest.
_RESET_SIGNALS = (
    signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2,
    signal.SIGCONT, signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD, signal.SIGALRM, signal.SIGWINCH,
)  # fmt: skip


def forks_horses(worker_class: type[BaseWorker]) -> bool:
    """Whether the class forks a horse per job the way rq.Worker does (not SimpleWorker, SpawnWorker)."""
    if not issubclass(worker_class, ForkingWorker):
        return False
    return worker_class.fork_work_horse is ForkingWorker.fork_work_horse


# --- the process ---------------------------------------------------------------------------------


# The mold's entry for a worker promoted to be the next mold: (settings, generation, status socket).
BecomeMold = Callable[[Settings, int, socket.socket], object]


def run_worker(
    settings: Settings, spec: WorkerSpec, status: socket.socket, become_mold: BecomeMold | None = None
) -> NoReturn:
    """Entry point in a freshly forked worker process, run with its group's settings (worker class and
    recycling limits may differ per group). Never returns: 0 after a requested stop or a recycle, 70 when
    the after_fork hook raised, 75 when Redis could not be reached (so the supervisor can say so in the
    reason of the job this cost), 1 on any other failure. A worker promoted to mold runs `become_mold`
    (without one it stops as after a recycle)."""
    code = EXIT_FAILED
    try:
        code = _serve(settings.for_group(spec.group), spec, status, become_mold)
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        log.error("worker[%s] %s: Redis could not be reached (%s); exiting", spec.slot, spec.name, exc)
        code = EXIT_REDIS_UNREACHABLE
    except BaseException:
        log.exception("worker[%s] %s failed", spec.slot, spec.name)
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(code)


def _serve(
    settings: Settings, spec: WorkerSpec, status: socket.socket, become_mold: BecomeMold | None
) -> int:
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    for signum in _RESET_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    context = _make_context(settings, spec, status)
    setproctitle(context.title("starting"))
    status.settimeout(STATUS_SEND_TIMEOUT)
    os.set_inheritable(status.fileno(), False)
    os.register_at_fork(after_in_child=context.close_in_child)
    job_api.share()  # before any fork: the stop page of this worker and its horses
    stacks.register(settings.run_dir)
    context.controls.install()

    worker = _connect(context)
    if worker is None:
        return EXIT_OK
    context.controls.worker = worker
    if settings.hooks.after_fork is not None:
        try:
            settings.hooks.after_fork(worker, spec.slot)
        except BaseException:
            log.exception("worker[%s]: the after_fork hook raised", context.label)
            return EXIT_HOOK_FAILED
    worker.work(
        logging_level=settings.log_level,
        with_scheduler=spec.scheduler,
        dequeue_strategy=DequeueStrategy(settings.dequeue_strategy),
    )
    if not context.controls.stop:
        log.error("worker[%s]: rq's work loop ended without a stop request", context.label)
        return EXIT_FAILED
    if context.promote_to is not None and become_mold is not None:
        _become_mold(context, worker, become_mold)
    return EXIT_OK


def _become_mold(context: Context, worker: StarterMixin, become_mold: BecomeMold) -> None:
    """Reforking: serve the mold protocol on the status socket, keeping everything the jobs loaded.
    Returns only if this process cannot fork safely (a thread still runs); it then exits like a recycle."""
    assert context.promote_to is not None
    worker.connection.close()  # no child may inherit a Redis connection
    thread = getattr(worker, "pubsub_thread", None)
    if thread is not None:
        thread.join(THREAD_JOIN_TIMEOUT)
    if threading.active_count() > 1:
        names = ", ".join(t.name for t in threading.enumerate() if t is not threading.current_thread())
        log.warning("worker[%s]: not promoted to mold: threads still run (%s)", context.label, names)
        return
    status = context.status
    assert status is not None, "run_worker's context has the supervisor's socket"
    context.controls.worker = None
    context.release()
    status.settimeout(None)
    for stream in (sys.stdout, sys.stderr):  # a buffer left here would be written again by every fork
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    # a reforked generation does not refork again: its workers run every job the configured way
    settings = dataclasses.replace(context.settings, refork_after=None)
    become_mold(settings, context.promote_to, status)


def _make_context(settings: Settings, spec: WorkerSpec, status: socket.socket) -> Context:
    group = settings.groups[spec.group]
    label = f"{group.name}:{spec.slot}" if len(settings.groups) > 1 else str(spec.slot)
    deadline = None
    if settings.max_lifetime is not None:
        deadline = time.monotonic() + settings.max_lifetime * random.uniform(0.9, 1.1)
    return Context(settings, spec, Controls(paused=spec.paused), status, group.queues, label, deadline)


def _connect(context: Context) -> StarterMixin | None:
    """Build the worker on a fresh connection, waiting for Redis with exponential backoff. None when
    a stop was requested before Redis answered."""
    url = context.settings.redis_url
    if not url:
        raise ValueError("no Redis URL: the supervisor must pass one to its workers")
    wait = REDIS_BACKOFF_FIRST
    attempt = 1
    while not context.controls.stop:
        try:
            return build_worker(context)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            log.warning(
                "worker[%s]: Redis at %s not reachable (attempt %d: %s); retrying in %.1fs",
                context.label, mask_url(url), attempt, exc, wait,
            )  # fmt: skip
            context.controls.wait(wait)
            wait = min(wait * 2, REDIS_BACKOFF_MAX)
            attempt += 1
    return None


def warm_client(url: str) -> None:
    """In the mold, before its freeze: build a client as a worker does, without connecting, and load
    the idna codec its first connection loads (socket.getaddrinfo encodes host names with it), so no
    worker imports them (modules, unicodedata tables) on pages of its own."""
    connect(url, driver_info=DRIVER_INFO).close()
    codecs.lookup("idna")


def _why_no_prefork(settings: Settings, worker_class: type[BaseWorker]) -> str | None:
    if not forks_horses(worker_class):
        return f"{settings.worker_class} does not fork a horse per job"
    if settings.max_memory is not None:
        # the horse forker shares the worker's pages for good: the worker's USS would not show them
        return "RESQUE_STARTER_MAX_MEMORY needs the worker's memory unshared, and a horse forker shares it"
    return None


def build_worker(context: Context) -> StarterMixin:
    """The configured rq worker class with StarterMixin on top, on its own Redis connection."""
    settings = context.settings
    user_class = import_attribute(settings.worker_class)
    if not (isinstance(user_class, type) and issubclass(user_class, BaseWorker)):
        raise TypeError(f"{settings.worker_class} is not an rq worker class")
    mixin: type[StarterMixin] = StarterMixin
    if settings.prefork_horse:
        why_not = _why_no_prefork(settings, user_class)
        if why_not is None:
            mixin = PreforkHorseMixin
        else:
            log.info("worker[%s]: RESQUE_STARTER_PREFORK_HORSE ignored: %s", context.label, why_not)
    worker_class = type("StarterWorker", (mixin, user_class), {})
    assert settings.redis_url
    connection = connect(
        settings.redis_url, socket_connect_timeout=REDIS_CONNECT_TIMEOUT, driver_info=DRIVER_INFO
    )
    tunables = {
        "worker_ttl": settings.worker_ttl,
        "job_monitoring_interval": settings.job_monitoring_interval,
        "maintenance_interval": settings.maintenance_interval,
        "default_result_ttl": settings.result_ttl,
    }
    return worker_class(
        list(context.queues),
        name=context.spec.name,
        connection=connection,
        job_class=settings.job_class,
        queue_class=settings.queue_class,
        serializer=settings.serializer,
        context=context,
        **{key: value for key, value in tunables.items() if value is not None},
    )
