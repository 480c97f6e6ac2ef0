"""The agent: the one child that talks to Redis on the supervisor's behalf, so PID 1 never does.

A mold forks it (so it has the application's job, queue and serializer classes, for settling jobs)
and the supervisor adopts it, tracks it as a row of its own, respawns it when it exits and kills it
when it stops reporting. It dies with the supervisor (PR_SET_PDEATHSIG, and a parent check each
turn): a dead pod's lease must expire, never be kept alive by a leftover agent.

Its life is a loop of periodic duties; between them it reads the supervisor's messages. Reports go
over its socketpair as the workers' do (protocol.py):

- {"event": "redis", "ok": bool}: every PROBE_INTERVAL; readiness, and the agent's heartbeat
- {"event": "swept"}: once, when every lease due at its start (and its predecessor's) is settled
- {"event": "settled", "pod": id, "counts": {...}}: it settled a dead pod's jobs
- {"event": "queues", "queues": {name: {...}}}: every queue_gauges.INTERVAL (AUTOSCALE_INTERVAL when a
  group autoscales), the pod's queue gauges
- {"event": "lease-lost", "by": id}: another pod took this pod's lease over; the agent then exits
- {"event": "released"}: after {"op": "release"}, the lease is removed; the agent then exits

The supervisor sends {"op": "hold", "workers": {name: [queues]}, "more": bool} whenever what the pod holds
changes (in parts for a big pod), and {"op": "release"} at the end of a clean stop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from setproctitle import setproctitle

from resque_starter import logs, orphans, protocol, queue_gauges
from resque_starter.config import Settings
from resque_starter.connection import connect, mask_url
from resque_starter.lease import Leases, Taken

log = logging.getLogger("resque_starter.agent")

PROBE_INTERVAL = 1.0  # how often Redis is asked (readiness) and expired leases are looked for
REDIS_TIMEOUT = 2.0  # a Redis that does not answer within this is reported down
SEND_TIMEOUT = 5.0
POD_FILE = "pod-id"  # in the run dir: the id of the pod that last ran there (see predecessor())


@dataclass
class Duty:
    """Something the agent does every `interval` seconds; `due` is when next."""

    interval: float
    run: Callable[[], None]
    due: float = 0.0


def client(url: str) -> redis.Redis:
    """The agent's Redis client: the workers' connection options, and a bound on every reply."""
    from resque_starter.worker import DRIVER_INFO

    return connect(
        url, socket_connect_timeout=REDIS_TIMEOUT, socket_timeout=REDIS_TIMEOUT, driver_info=DRIVER_INFO
    )


def predecessor(run_dir: str, pod: str) -> str:
    """The pod that ran in this run dir before us (a container restarted in place), or "".

    One live supervisor owns a run dir (its control socket), so whoever ran here before is dead: its
    lease can be settled at once instead of after its TTL. The file then names us."""
    path = os.path.join(run_dir, POD_FILE)
    previous = ""
    with contextlib.suppress(FileNotFoundError):
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd) as f:
            previous = f.read(256).strip()
    if previous != pod:
        tmp = f"{path}.{os.urandom(8).hex()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(pod + "\n")
        os.replace(tmp, path)
    return "" if previous == pod else previous


class Agent:
    def __init__(self, settings: Settings, sock: socket.socket, supervisor: int, request: dict[str, Any]):
        assert settings.redis_url is not None
        self.settings = settings
        self.sock = sock
        self.supervisor = supervisor
        self.leases = Leases(client(settings.redis_url), str(request["pod"]), settings.lease_ttl)
        self.established = bool(request.get("established"))
        self.first = bool(request.get("first"))  # the supervisor's first lease (not one after a loss)
        self.held: dict[str, list[str]] | None = None  # what the lease does not name yet
        self.predecessor = ""
        self.unfinished: Taken | None = None  # a lease taken over whose settling Redis interrupted
        self.swept = False
        self.redis_ok: bool | None = None
        self.done = False
        self._inbox = protocol.LineBuffer()
        self._incoming: dict[str, list[str]] = {}
        self.refresh = Duty(settings.lease_ttl / 3, self._refresh)
        self.queues = list(dict.fromkeys(q for group in settings.groups for q in group.queues))
        autoscaling = any(group.window is not None for group in settings.groups)
        self.duties = [
            self.refresh,
            Duty(PROBE_INTERVAL, self._probe),
            Duty(queue_gauges.AUTOSCALE_INTERVAL if autoscaling else queue_gauges.INTERVAL, self._gauges),
        ]

    def run(self) -> None:
        try:
            previous = predecessor(self.settings.run_dir, self.leases.pod)
        except OSError as exc:
            log.warning("cannot read or write %s in %s: %s", POD_FILE, self.settings.run_dir, exc)
        else:
            self.predecessor = previous if self.first else ""
        if self.predecessor:
            log.info("pod %s ran in this run dir before: settling its lease at once", self.predecessor)
        while not self.done:
            if os.getppid() != self.supervisor:
                log.warning("the supervisor is gone; the agent exits and this pod's lease expires")
                return
            now = time.monotonic()
            for duty in self.duties:
                if duty.due <= now and not self.done:
                    duty.due = now + duty.interval
                    self._perform(duty)
            wait = min(duty.due for duty in self.duties) - time.monotonic()
            if not self.done and select.select([self.sock], [], [], max(0.0, wait))[0]:
                self._read()

    def _perform(self, duty: Duty) -> None:
        """Run one duty; Redis failing is reported (not ready) and the duty tried again when due. Any
        other failure (a dead pod's job the app's classes cannot load) is logged and the agent goes on:
        it must not crash-loop, nor leave the pod unready, over one dead pod; that pod's lease is tried
        again once the hold on it runs out (lease.SETTLE_HOLD)."""
        try:
            duty.run()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            self._report_redis(False, str(exc))
        except redis.RedisError as exc:
            log.error("agent: %s", exc)
            self._report_redis(False, str(exc))
        except Exception:
            log.exception("agent: %s failed", duty.run.__name__)
            self.unfinished = None

    def _report_redis(self, ok: bool, error: str = "") -> None:
        if ok != self.redis_ok:
            if ok:
                log.info("agent: Redis at %s answers", mask_url(self.settings.redis_url or ""))
            else:
                log.warning("agent: Redis at %s: %s", mask_url(self.settings.redis_url or ""), error)
        self.redis_ok = ok
        self.send({"event": "redis", "ok": ok})

    def _read(self) -> None:
        try:
            data = self.sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            self.done = True  # the supervisor hung up
            return
        for message in self._inbox.feed(data):
            if message.get("op") == "hold":  # in parts for a big pod: "more" until the last one
                self._incoming.update(message.get("workers") or {})
                if not message.get("more"):
                    self.held, self._incoming = self._incoming, {}
                    self.refresh.due = 0.0
            elif message.get("op") == "release":
                self._release()

    def _release(self) -> None:
        try:
            released = self.leases.release()
        except redis.RedisError as exc:
            log.warning(
                "could not release the lease of pod %s (%s): it expires instead", self.leases.pod, exc
            )
        else:
            log.info("released the lease of pod %s" if released else "pod %s: the lease was taken over",
                     self.leases.pod)  # fmt: skip
        self.send({"event": "released"})
        self.done = True

    def _refresh(self) -> None:
        held = self.held
        fields = {} if self.established else {"host": socket.gethostname(), "pid": str(self.supervisor)}
        lost = self.leases.refresh(self.established, held, **fields)
        if lost is not None:
            log.error("the lease of pod %s was taken over by pod %s", self.leases.pod, lost or "(unknown)")
            self.send({"event": "lease-lost", "by": lost})
            self.done = True
            return
        self.held = None
        if not self.established:
            self.established = True
            self.send({"event": "leased"})

    def _probe(self) -> None:
        """One round trip that is both the readiness probe and the look for an expired lease; then
        settle each lease taken over, until none is due."""
        while not self.done:
            taken = self.unfinished or self.leases.take(self.predecessor)
            self._report_redis(True)
            if taken is None:
                break
            self.unfinished = taken
            log.warning("settling the jobs of %s: %d worker(s)", taken.describe(), len(taken.workers))
            counts = self.leases.settle(taken, self.settings, lambda: self._report_redis(True))
            self.unfinished = None
            log.warning("settled %s: %s", taken.describe(), counts)
            self.send({"event": "settled", "pod": taken.pod, "counts": counts})
        if not self.swept:
            self.swept = True
            self.predecessor = ""
            self.send({"event": "swept"})

    def _gauges(self) -> None:
        """The pod's queues: waiting, the oldest waiting job's age, started (queue_gauges)."""
        self.send({"event": "queues", "queues": queue_gauges.read(self.leases.connection, self.queues)})

    def send(self, message: dict[str, Any]) -> None:
        try:
            protocol.send(self.sock, message)
        except OSError:
            self.done = True  # the supervisor is gone or no longer reads: nothing to do for it


def run_agent(settings: Settings, request: dict[str, Any], status_fd: int, supervisor: int) -> None:
    """The agent's whole life, in a grandchild of the mold adopted by the supervisor."""
    if not orphans.await_adoption(supervisor):
        return  # the supervisor died before adopting us: a dead pod must have no agent
    orphans.die_with_parent(supervisor)
    logs.set_role("agent")
    setproctitle(f"resque-starter: agent pod={request['pod']}")
    sock = socket.socket(fileno=status_fd)
    sock.settimeout(SEND_TIMEOUT)
    Agent(settings, sock, supervisor, request).run()
