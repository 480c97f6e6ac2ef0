"""The mold link: starting and stopping molds, their bounded outboxes, hung molds, their messages,
spawns and forks, requests given back when a mold dies, and reforking (a worker promoted to mold).
"""

from __future__ import annotations

import contextlib
import gc
import os
import selectors
import signal
import socket
import time
from typing import Any

from resque_starter import cgroups, procmem, protocol, stacks
from resque_starter.config import EXIT_APP_IMPORT, EXIT_CONFIG
from resque_starter.process_table import Mold, Worker, describe_status
from resque_starter.protocol import WorkerSpec
from resque_starter.states import StopLevel
from resque_starter.supervisor.state import HANDLED, MOLD_STALL, SupervisorState, log


class MoldLink(SupervisorState):
    def _converge_molds(self) -> None:
        """Start the current generation's mold; stop an old one once it has no workers. The serving
        generation's mold stays until the next one serves: an abandoned reload falls back on it."""
        needed = self.stop_level is None or (self.recoveries and not self.molds)
        if self.generation not in self.molds and needed:
            self._start_mold(self.generation)
        for gen, mold in list(self.molds.items()):
            if gen in (self.generation, self.serving_generation):
                continue
            if not any(w.spec.generation == gen for w in self.workers.values()):
                self._stop_mold(mold)

    def _ready_mold(self) -> Mold | None:
        """The current generation's mold, or any ready one, for forking helpers (recoveries, agent)."""
        mold = self.molds.get(self.generation)
        if mold is None or not mold.ready or mold.hung:
            mold = next((m for m in self.molds.values() if m.ready and not m.hung), None)
        return mold

    def _start_mold(self, generation: int) -> None:
        from resque_starter.mold import run_mold

        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        settings = self.settings
        gc.collect()  # what is garbage now is freed, not frozen with the rest
        gc.freeze()  # neither our collections nor the mold's examine, and so copy, the pages we share
        procmem.release_free_heap()
        pid = os.fork()
        if pid == 0:
            parent_sock.close()
            self._close_in_child()
            run_mold(settings, generation, child_sock)
        child_sock.close()
        parent_sock.setblocking(False)
        mold = Mold(generation, pid, parent_sock, settings)
        self.molds[generation] = mold
        self._selector.register(parent_sock, selectors.EVENT_READ, lambda s: self._on_mold_io(mold))
        log.info("mold gen=%d pid %d: importing %s", generation, pid, ",".join(settings.app) or "nothing")

    def _close_in_child(self) -> None:
        """A fresh fork must not hold the supervisor's sockets, pipes or signal routing."""
        signal.set_wakeup_fd(-1)
        for sig in HANDLED:
            signal.signal(sig, signal.SIG_DFL)
        self._selector.close()
        os.close(self._wake_read)
        os.close(self._wake_write)
        if self._control is not None:
            self._control.close_in_child()
        if self._metrics is not None:
            self._metrics.close_in_child()
        for m in self.molds.values():
            m.sock.close()
        for w in self.workers.values():
            w.status.close()
        if self.agent is not None:
            self.agent.sock.close()
        if self._annotator is not None:
            self._annotator.close()

    def _stop_mold(self, mold: Mold) -> None:
        """A ready mold exits on request (or on the end of its socket, if the request does not fit);
        one still importing (abandoned) cannot read it, so is killed."""
        del self.molds[mold.generation]
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(mold.sock)
        if not mold.ready:
            with contextlib.suppress(ProcessLookupError):
                os.kill(mold.pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            mold.outbox.put({"op": "exit"})
        self._give_back(mold)
        mold.sock.close()

    def _give_back(self, mold: Mold) -> None:
        """What the mold was asked and did not answer goes back to the desired state: a spawn's row
        leaves the slot table (the slot loop asks the next mold for that slot), a recovery is sent
        again. A worker forked just before may exist all the same: its row is kept as stopping, so it
        is stopped once it says who it is, and forgotten when its status socket closes."""
        mold.outbox.close()
        for token in mold.pending:
            w = self.workers.get(token)
            if w is not None and w.pid is None:
                w.stop_level, w.stop_reason = StopLevel.GRACEFUL, f"its mold gen={mold.generation} died"
                if not w.listening:
                    self._forget(w)
            elif token.startswith("recover:") and token[8:] in self.recoveries:
                recovery = self.recoveries[token[8:]]
                recovery.sent = recovery.sent and recovery.pid is not None
            elif token == "agent" and self.agent is not None and self.agent.pid is None:
                self._drop_agent(self.agent)  # the next reconcile asks another mold for one
        mold.pending.clear()

    def _kill_hung_molds(self) -> None:
        """A mold that leaves a request unanswered for MOLD_STALL seconds, or stops reading until its
        outbox is full, is hung (SIGSTOP, a hook stuck on a lock): it is killed, and reaping it gives
        its requests back, so the loop goes on without it."""
        now = time.monotonic()
        for mold in self.molds.values():
            oldest = min(mold.pending.values(), default=now)
            if mold.hung or now - oldest >= MOLD_STALL:
                self._declare_hung(mold, f"left a request unanswered for {now - oldest:.1f}s")

    def _declare_hung(self, mold: Mold, why: str) -> None:
        if mold.hung:
            return
        mold.hung = True
        log.error("mold gen=%d pid %d %s: killing it; its requests go to the next mold", mold.generation,
                  mold.pid, why)  # fmt: skip
        with contextlib.suppress(ProcessLookupError):
            os.kill(mold.pid, signal.SIGKILL)

    def _on_mold_io(self, mold: Mold) -> None:
        """The mold's socket is readable, or writable while requests wait in its outbox."""
        if mold.outbox.pending:
            try:
                mold.outbox.flush()
            except OSError:  # it is gone: reaping it gives its requests back
                mold.outbox.close()
            self._watch_mold(mold)
        self._on_mold_message(mold)

    def _watch_mold(self, mold: Mold) -> None:
        """Wake for the mold's socket being writable only while its outbox holds something."""
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if mold.outbox.pending else 0)
        with contextlib.suppress(KeyError, ValueError):
            key = self._selector.get_key(mold.sock)
            if key.events != events:
                self._selector.modify(mold.sock, events, key.data)

    def _on_mold_message(self, mold: Mold) -> None:
        try:
            data = mold.sock.recv(65536, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(mold.sock)
            return
        for message in mold.buffer.feed(data):
            op = message.get("op")
            if op == "ready":
                mold.ready = True
                log.info("mold gen=%d ready (app imported, heap frozen)", mold.generation)
                self._check_fit(mold)
            elif op == "error":
                code = int(message.get("code", EXIT_APP_IMPORT))
                self._on_mold_error(mold, code, str(message.get("message")))
            elif op == "forked":
                mold.pending.pop(str(message["token"]), None)
                self._on_forked(str(message["token"]), int(message["pid"]))

    def _check_fit(self, mold: Mold) -> None:
        """Warn when the workers cannot fit the container's memory, estimated from the newly imported app."""
        own, app = procmem.read(), procmem.read(mold.pid)
        if own is None or app is None:
            return
        limit, cpus = cgroups.memory_limit(), cgroups.cpu_quota()
        fits, message = procmem.fit(sum(self.sizes), own.uss, app.uss, limit, cpus)
        (log.info if fits else log.warning)("memory: %s", message)

    def _on_mold_error(self, mold: Mold, code: int, message: str) -> None:
        mold.failed = True
        if self.serving_generation == 0:
            log.error("%s", message)
            self.exit_code = code if code in (EXIT_CONFIG, EXIT_APP_IMPORT) else EXIT_APP_IMPORT
            return
        if mold.generation == self.serving_generation:
            log.error("the serving mold died and its restart failed, stopping: %s", message)
            self.request_stop(StopLevel.GRACEFUL)
            self._pending_exit = EXIT_APP_IMPORT
            return
        self.reload_error = f"generation {mold.generation}: {message}"
        log.error("reload failed, generation %d keeps serving: %s", self.serving_generation, message)
        self._revert_generation()

    def _on_mold_exit(self, mold: Mold, status: int) -> None:
        stacks.remove(self.settings.run_dir, mold.pid)  # a mold promoted from a worker registered one
        if self.molds.get(mold.generation) is mold:
            self._on_mold_message(mold)  # an error or "forked" it sent just before exiting may be unread
            del self.molds[mold.generation]
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(mold.sock)
            self._give_back(mold)
            mold.sock.close()
            if not mold.ready and not mold.failed:
                how = describe_status(status)
                self._on_mold_error(mold, EXIT_APP_IMPORT, f"the mold exited before it was ready ({how})")
            elif self.exit_code is None and not mold.failed:
                log.warning(
                    "mold gen=%d exited (%s); starting another", mold.generation, describe_status(status)
                )

    def _on_forked(self, token: str, pid: int) -> None:
        w = self.workers.get(token)
        if w is not None:
            w.pid = pid
        elif token == "agent" and self.agent is not None:
            self.agent.pid = pid
        elif token.startswith("recover:") and token[8:] in self.recoveries:
            self.recoveries[token[8:]].pid = pid
        status = self._take_early_exit(pid)
        if status is not None:
            self._on_exit(pid, status)

    def _spawn(self, mold: Mold, group: int, slot: int) -> None:
        self._seq += 1
        spec = WorkerSpec(
            group=group,
            slot=slot,
            generation=mold.generation,
            name=f"{self._name_prefix}.{self._seq}",
            paused=self._holds_intake(mold.settings.groups[group].name),
            scheduler=self.settings.with_scheduler and group == 0 and slot == 0,
        )
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setblocking(False)
        w = Worker(spec, ours, mold.settings.groups[group].queues, paused=spec.paused)
        self.workers[spec.name] = w
        self._selector.register(ours, selectors.EVENT_READ, lambda s: self._on_worker_message(w))
        self._send_mold(mold, spec.name, {"op": "spawn", "spec": spec.to_dict()}, [theirs.detach()])

    def _send_mold(
        self, mold: Mold, token: str, message: dict[str, Any], fds: list[int] | None = None
    ) -> None:
        """Queue a request; it waits in the mold's bounded outbox while the mold does not read, and
        counts as pending (given back if the mold dies or hangs) until the mold answers "forked"."""
        mold.pending[token] = time.monotonic()
        try:
            if not mold.outbox.put(message, fds):
                self._declare_hung(mold, "stopped reading its requests (its outbox is full)")
        except OSError as exc:  # it is gone: reaping it gives this request back
            log.error("mold gen=%d unreachable: %s", mold.generation, exc)
        self._watch_mold(mold)

    def _converge_refork(self) -> None:
        """Pitchfork's reforking: once per imported generation, ask one worker that ran REFORK_AFTER jobs
        to become the next mold; the slot loop then replaces the other workers from it, as in a reload."""
        mold = self.molds.get(self.generation)
        if (
            self.settings.refork_after is None
            or self.paused
            or mold is None
            or mold.promoted
            or self.serving_generation != self.generation
            or any(w.promoting is not None for w in self.workers.values())
        ):
            return
        for w in self.workers.values():
            current = w.spec.generation == self.generation
            if w.promotable and current and not w.stopping and not w.spec.scheduler:
                self._generations += 1
                w.promoting = self._generations
                log.info("refork: worker[%s] pid %s ran %d job(s); promoting it to mold gen=%d",
                         self._slot_label(w), w.pid, self.settings.refork_after, w.promoting)  # fmt: skip
                with contextlib.suppress(OSError):
                    protocol.send(w.status, {"op": "promote", "generation": w.promoting})
                return

    def _adopt_mold(self, w: Worker) -> None:
        """The promoted worker now serves the mold protocol on its status socket: it leaves the slot
        table and becomes the current generation's mold, unless a reload or stop came meanwhile (then
        it is an outdated mold, which _converge_molds tells to exit)."""
        assert w.promoting is not None
        del self.workers[w.spec.name]
        old = self.molds.get(w.spec.generation)
        mold = Mold(w.promoting, w.pid or 0, w.status, old.settings if old else self.settings, w.buffer)
        mold.ready = mold.promoted = True
        self.molds[mold.generation] = mold
        self._selector.modify(w.status, selectors.EVENT_READ, lambda s: self._on_mold_io(mold))
        if self.stop_level is None and self.generation == w.spec.generation:
            self.generation = mold.generation
            log.info("refork: mold gen=%d pid %s ready; replacing workers from it", mold.generation, mold.pid)
