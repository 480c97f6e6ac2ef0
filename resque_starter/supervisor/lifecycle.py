"""The loop and its lifecycle: start, wait, queued signals turned into commands, one reconcile()
that reaps and runs the converge steps, the embedded Redis kept alive, and the cleanup at exit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import selectors
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from setproctitle import setproctitle

from resque_starter import commands, config, config_file, rundir, watchdog
from resque_starter.config import EXIT_CONFIG, EXIT_INTERRUPTED, ConfigError
from resque_starter.control_server import ControlServer
from resque_starter.listener import Listener
from resque_starter.process_table import describe_status
from resque_starter.states import StopLevel, WorkerState
from resque_starter.supervisor.state import (
    BEFORE_EXIT_TIMEOUT,
    HANDLED,
    MAX_LOOP_FAULTS,
    MOLD_STALL,
    PR_SET_CHILD_SUBREAPER,
    REDIS_POLL,
    SupervisorState,
    log,
)

if TYPE_CHECKING:
    from resque_starter.embedded_redis import EmbeddedRedis


class Lifecycle(SupervisorState):
    def run(self) -> int:
        """Start, loop until the desired state is 'stopped' and reached, clean up; the exit code."""
        try:
            self._start()
            while True:
                try:
                    self.reconcile()
                    if self.exit_code is not None:
                        break
                    self._wait(self._next_timeout())
                    self._handle_signals()
                except ConfigError:
                    raise
                except Exception:
                    self._on_loop_fault()
                    if self.exit_code is not None:
                        break
        except ConfigError as exc:
            log.error("%s", exc)
            self._abort_children()
            self.exit_code = EXIT_CONFIG
        finally:
            signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)  # the outcome is decided; keep late signals out
            self._cleanup()
        return self.exit_code if self.exit_code is not None else EXIT_INTERRUPTED

    def _start(self) -> None:
        setproctitle(self._title())
        if os.getpid() != 1:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
                log.warning("prctl(PR_SET_CHILD_SUBREAPER) failed: errno %d", ctypes.get_errno())
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wake_read, self._wake_write = read_end, write_end
        signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        for sig in HANDLED:
            signal.signal(sig, self._on_signal)
        self._selector.register(read_end, selectors.EVENT_READ, self._drain_wakeup)
        rundir.make(self.settings.run_dir)
        # first the control socket: it refuses a run dir that a running supervisor answers in, before
        # anything of that one's (its pid file, its embedded Redis's socket) is replaced
        self._control = ControlServer(self.settings.run_dir, self._selector, self.command)
        if self.settings.pid_file:
            rundir.write_pid_file(self.settings.pid_file)
            self._pid_file_written = self.settings.pid_file
        if self.settings.redis_url is None:
            from resque_starter import embedded_redis

            self._redis = embedded_redis.start(self.settings.run_dir)
            log.warning(
                "REDIS_URL is not set: started an embedded redis-server at %s; nothing is shared with other "
                "hosts and nothing is kept after exit (set REDIS_URL, or RESQUE_STARTER_REQUIRE_REDIS_URL=1 "
                "to make this an error)",
                self._redis.url,
            )
            self.settings = dataclasses.replace(self.settings, redis_url=self._redis.url)
        if self.settings.pod_deletion_cost:
            from resque_starter import deletion_cost

            self._annotator = deletion_cost.Annotator(deletion_cost.target(self._environ, self.settings))
        if self.settings.metrics_port is not None:
            from resque_starter.metrics import MetricsServer

            self._metrics = MetricsServer(self.settings.metrics_port, self._selector, self.command)
        log.info(
            "supervisor pid %d: %d worker(s) on %s, app=%s, redis=%s",
            os.getpid(),
            sum(self.sizes),
            "; ".join(g.name for g in self.settings.groups),
            ",".join(self.settings.app) or "-",
            config.mask_url(self.settings.redis_url or ""),
        )

    def _cleanup(self) -> None:
        for mold in list(self.molds.values()):
            self._stop_mold(mold)
        if self.agent is not None:
            self._kill_agent(self.agent)
        if self._redis is not None:
            self._redis.stop()
        if self._annotator is not None:
            self._annotator.close()  # its child exits at the end of its input
        # anything left (molds, embedded redis) is reaped so nothing becomes a zombie of our parent
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                time.sleep(0.02)
        if self._control is not None:
            self._control.close()
        if self._metrics is not None:
            self._metrics.close()
        if self.settings.hooks.before_exit is not None:
            self._run_before_exit()
        if self._pid_file_written:
            rundir.remove_pid_file(self._pid_file_written)
        log.info("supervisor exiting with code %s", self.exit_code)

    def _run_before_exit(self) -> None:
        """The before_exit hook, in a child with a deadline: a hook that hangs or calls os._exit cannot
        keep PID 1 from exiting, and one from the config file is read there (config_file.FileHook)."""
        hook = self.settings.hooks.before_exit
        assert hook is not None
        pid = config_file.fork_isolated()
        if pid == 0:
            code = 0
            try:
                hook(self.settings)
            except BaseException:
                log.exception("before_exit hook raised")
                code = 1
            finally:
                logging.shutdown()
                os._exit(code)
        if config_file.wait_or_kill(pid, BEFORE_EXIT_TIMEOUT) is None:
            log.error("before_exit hook did not finish within %.0fs; killed it", BEFORE_EXIT_TIMEOUT)

    def _on_loop_fault(self) -> None:
        """A bug in a loop step must not unwind PID 1 (the container, and every running job, would go
        with it): log it and stop quickly, as INT does, exit 1; each further fault escalates the stop,
        and a loop that keeps failing kills what is left."""
        log.exception("the supervisor's loop failed; stopping quickly")
        self._faults += 1
        self._pending_exit = self._pending_exit or EXIT_INTERRUPTED
        if self._faults > MAX_LOOP_FAULTS:
            log.error("the supervisor's loop failed %d times; killing every worker", self._faults)
            self._abort_children()
            self.exit_code = self._pending_exit
            return
        self.request_stop(StopLevel.QUICK)

    def _abort_children(self) -> None:
        for w in self.workers.values():
            if w.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.pid, signal.SIGKILL)

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signals.append(signum)

    def _drain_wakeup(self, fd: int) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(fd, 4096):
                pass

    def _wait(self, timeout: float | None) -> None:
        for key, _ in self._selector.select(timeout):
            try:  # an earlier callback of this batch may have closed it (a client dropped) or changed it
                current = self._selector.get_key(key.fileobj)
            except (KeyError, ValueError):
                continue
            callback: Callable[[Any], None] = current.data
            callback(current.fileobj)
        for server in self._listeners():
            server.expire()

    def _listeners(self) -> list[Listener[Any]]:
        return [server for server in (self._control, self._metrics) if server is not None]

    def _next_timeout(self) -> float | None:
        """Sleep until the next deadline (backoff, drain, stop escalation and reports, the agent); forever
        when idle. One already past was acted on by the reconcile just done, or waits for a child's exit."""
        now = time.monotonic()
        deadlines = [until for _, until in self.backoff.values()]
        if self._redis is not None and self._redis.deadline is not None:
            deadlines.append(now + REDIS_POLL)
        deadlines += [
            min(m.pending.values()) + MOLD_STALL for m in self.molds.values() if m.pending and not m.hung
        ]
        if self.stop_deadline is not None:
            deadlines += [self.stop_deadline, self._stop_report_at]
        for w in self.workers.values():
            deadlines += [
                t for t in (w.kill_at, watchdog.next_due(w, self.settings.stuck_grace)) if t is not None
            ]
        deadlines = [until for until in deadlines + self._agent_deadlines() if until > now]
        if self._evaluation is not None:
            deadlines.append(self._evaluation.deadline)
        deadlines += [due for server in self._listeners() if (due := server.next_deadline()) is not None]
        if self._signals:
            return 0
        return max(0.0, min(deadlines) - now) if deadlines else None

    def _handle_signals(self) -> None:
        """Each signal is the command it stands for (commands.SIGNALS), validated alike."""
        while self._signals:
            signum = self._signals.pop(0)
            request = commands.for_signal(signum, self.settings.term)
            if request is None:  # SIGCHLD: only wakes the loop to reap
                continue
            log.info("received %s", signal.Signals(signum).name)
            self.command(request, via=signal.Signals(signum).name)

    def reconcile(self) -> None:
        """Reap, then converge the process table toward the desired state."""
        self._reap()
        if self.exit_code is not None:
            return
        self._kill_hung_molds()
        self._converge_redis()
        self._update_serving()
        self._converge_reload()
        self._converge_molds()
        if self.exit_code is not None:
            return
        self._converge_agent()
        if self.stop_level is None:
            self._converge_autoscale()
            self._converge_slots()
            self._converge_refork()
        else:
            self._converge_stop()
        self._converge_deadlines()
        self._converge_pause()
        self._converge_recoveries()
        if self._annotator is not None:  # idle pods first: the cost is the busy workers
            self._annotator.update(sum(w.state == WorkerState.BUSY for w in self.workers.values()))
        setproctitle(self._title())

    def _on_redis_exit(self, server: EmbeddedRedis, status: int) -> None:
        """Restart the embedded redis-server: spawned here, then polled by _converge_redis, so the loop
        goes on meanwhile. One that cannot come back stops the supervisor gracefully, saying why."""
        how = describe_status(status)
        if server.deadline is not None:
            self._redis_lost(f"it exited before it answered ({how})")
            return
        log.error("embedded redis-server exited (%s); restarting it", how)
        try:
            server.spawn()
        except OSError as exc:
            self._redis_lost(f"it could not be started ({exc})")

    def _converge_redis(self) -> None:
        server = self._redis
        if server is None or server.deadline is None:
            return
        if server.answers():
            log.info("embedded redis-server restarted at %s", server.url)
        elif time.monotonic() > server.deadline:
            self._redis_lost(f"it did not answer within {server.start_timeout:.0f}s")

    def _redis_lost(self, why: str) -> None:
        assert self._redis is not None
        self._redis.deadline = None
        log.error("the embedded redis-server could not be restarted: %s; stopping (exit 1)", why)
        self._pending_exit = self._pending_exit or EXIT_INTERRUPTED
        self.request_stop(StopLevel.GRACEFUL)
