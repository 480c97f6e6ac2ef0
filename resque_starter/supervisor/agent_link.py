"""The agent link (agent.py does the Redis work): its row, its messages, the readiness it reports,
the workers the pod's lease must hold, and the lease released at a clean exit.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import time
from typing import Any

from resque_starter import protocol, queue_gauges
from resque_starter.process_table import Agent, describe_status
from resque_starter.states import StopLevel
from resque_starter.supervisor.state import (
    AGENT_MIN_TIMEOUT,
    AGENT_RESPAWN_DELAY,
    HOLD_CHUNK,
    RELEASE_WAIT,
    SupervisorState,
    _receive,
    log,
)


class AgentLink(SupervisorState):
    def _agent_timeout(self) -> float:
        """Silent this long, the agent is hung; below the lease TTL, so it is replaced before the lease
        expires (the agent refreshes every TTL/3)."""
        return max(AGENT_MIN_TIMEOUT, self.settings.lease_ttl / 2)

    def _agent_deadlines(self) -> list[float]:
        a = self.agent
        if a is None:
            return [self._agent_next]
        if a.releasing is not None:
            return [a.releasing + RELEASE_WAIT]
        return [a.seen + self._agent_timeout()]

    def _held(self) -> dict[str, list[str]]:
        """What the pod's lease must name: every worker, and every dead one until it is recovered."""
        held = {r.worker: list(r.queues) for r in self.recoveries.values()}
        held.update((w.spec.name, list(w.queues)) for w in self.workers.values())
        return held

    def _converge_agent(self) -> None:
        """One agent while the pod runs, and until a clean stop has released the pod's lease."""
        a = self.agent
        now = time.monotonic()
        if a is not None:
            if not a.killed and now - a.seen > self._agent_timeout():
                log.error("agent pid %s sent nothing for %.0fs: hung; replacing it", a.pid, now - a.seen)
                self._kill_agent(a)
            elif a.releasing is None and a.held != (held := self._held()):
                a.held = held
                names = list(held)
                for i in range(0, max(len(names), 1), HOLD_CHUNK):
                    chunk = {name: held[name] for name in names[i : i + HOLD_CHUNK]}
                    self._send_agent(a, {"op": "hold", "workers": chunk, "more": i + HOLD_CHUNK < len(names)})
            return
        finished = self.stop_level is not None and not self.workers and not self.recoveries
        if now < self._agent_next or finished:
            return
        mold = self._ready_mold()
        if mold is None:
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setblocking(False)
        agent = self.agent = Agent(ours)
        self._agent_next = now + AGENT_RESPAWN_DELAY
        self._selector.register(ours, selectors.EVENT_READ, lambda s: self._on_agent_message(agent))
        request = {"op": "agent", "token": "agent", "pod": self.pod_id, "first": self._leases == 1}
        self._send_mold(mold, "agent", {**request, "established": self._lease_established}, [theirs.detach()])

    def _send_agent(self, a: Agent, message: dict[str, Any]) -> None:
        """Never blocks: an agent that does not read its messages is hung."""
        data = protocol.encode(message)
        try:
            sent = a.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            return  # it is gone; reaping tells
        if sent < len(data):
            log.error("agent pid %s does not read its messages: hung; replacing it", a.pid)
            self._kill_agent(a)

    def _kill_agent(self, a: Agent) -> None:
        """SIGKILL: its row goes when it is reaped (or now, if the mold never said its pid)."""
        a.killed = True
        if a.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(a.pid, signal.SIGKILL)
        else:
            self._drop_agent(a)

    def _drop_agent(self, a: Agent) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(a.sock)
        a.sock.close()
        if self.agent is a:
            self.agent = None

    def _on_agent_exit(self, a: Agent, status: int) -> None:
        self._on_agent_message(a)  # what it said just before exiting (lease lost, released)
        self._drop_agent(a)
        if a.releasing is None and self.exit_code is None:
            log.warning("agent pid %d exited (%s); starting another", a.pid, describe_status(status))

    def _on_agent_message(self, a: Agent) -> None:
        data = _receive(a.sock)
        if data is None:
            return
        if not data:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(a.sock)
            return
        a.seen = time.monotonic()
        for message in a.buffer.feed(data):
            event = message.get("event")
            if event == "redis":
                a.redis_ok, a.redis_at = bool(message.get("ok")), a.seen
            elif event == "leased":
                self._lease_established = True
            elif event == "swept" and not self.swept:
                log.info("pod %s: no expired lease left to settle; workers take jobs", self.pod_id)
                self.swept = True
            elif event == "settled":
                self.settled_pods += 1
            elif event == "queues" and (rows := queue_gauges.valid(message.get("queues"))) is not None:
                self.queue_report = (rows, a.seen)
            elif event == "lease-lost":
                self._on_lease_lost(str(message.get("by")))

    def _on_lease_lost(self, by: str) -> None:
        """This pod was out of touch with Redis (or its agent hung) for longer than the lease TTL, and
        another pod settled its jobs: they may be running elsewhere now. Stop ours at once (SIGKILL;
        each worker's recovery is then a no-op or settles a job taken since) and go on under a new lease."""
        log.error("the lease of pod %s expired and pod %s took it over: replacing every worker; jobs they "
                  "ran may run twice", self.pod_id, by or "(another)")  # fmt: skip
        for w in self.workers.values():
            self._stop_worker(w, StopLevel.KILL, "lease lost")
        self._leases += 1
        self.pod_id = f"{self._name_prefix}.{self._leases}"
        self._lease_established = False

    def _lease_released(self) -> bool:
        """At a clean exit, the agent removes the pod's lease (nothing is left to settle); True once done."""
        a = self.agent
        if a is None:
            return True
        now = time.monotonic()
        if a.releasing is None:
            a.releasing = now
            self._send_agent(a, {"op": "release"})
        elif now - a.releasing > RELEASE_WAIT:
            log.warning("the agent did not release the lease in %gs; it expires instead", RELEASE_WAIT)
            self._kill_agent(a)
            self._drop_agent(a)
            return True
        return False
