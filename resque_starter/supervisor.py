"""The supervisor: PID 1, the one arbiter, a reconciliation loop.

A signal handler only queues its signal and wakes the loop (set_wakeup_fd). Each signal or control
command only changes the *desired* state: slot counts, generation, paused, stopping + deadline.
One `reconcile()` step then reaps every child and converges the process table toward that state,
so scaling, reload, drain and crash recovery need no special paths of their own. The supervisor
never imports the application: a fork of it is a clean interpreter that becomes the next mold.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import random
import selectors
import signal
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from setproctitle import setproctitle

from resque_starter import (
    cgroups,
    commands,
    config,
    config_file,
    loader,
    procmem,
    protocol,
    rundir,
)
from resque_starter.config import (
    EXIT_APP_IMPORT,
    EXIT_CONFIG,
    EXIT_CRASH_LOOP,
    EXIT_INTERRUPTED,
    EXIT_OK,
    ConfigError,
    Settings,
)
from resque_starter.control_server import ControlServer
from resque_starter.listener import Listener
from resque_starter.process_table import Agent, Mold, Recovery, Worker, describe_status
from resque_starter.protocol import WorkerSpec
from resque_starter.states import Intake, StopLevel, WorkerState

if TYPE_CHECKING:  # imported where used: a supervisor without them does not hold them in memory
    from resque_starter.embedded_redis import EmbeddedRedis
    from resque_starter.metrics import MetricsServer

log = logging.getLogger("resque_starter.supervisor")

PR_SET_CHILD_SUBREAPER = 36
MIN_UPTIME = 5.0  # a worker that dies sooner than this, uncommanded, counts as a crash
CRASH_LIMIT = 5  # consecutive crashes of one slot before giving up (exit 4)
BACKOFF_BASE, BACKOFF_MAX = 0.5, 10.0
QUICK_GRACE = 10.0  # seconds a quick stop waits for workers before SIGKILL
BEFORE_EXIT_TIMEOUT = 10.0  # seconds the before_exit hook may take
MOLD_STALL = 5.0  # seconds a mold may leave a request unanswered before it counts as hung
REDIS_POLL = 0.05  # seconds between looks at a restarting embedded redis-server
EARLY_EXIT_TTL = 10.0  # seconds an exit reaped before we knew whose it was stays a candidate
EARLY_EXITS_MAX = 1024
MAX_LOOP_FAULTS = 10  # unexpected exceptions in the loop before it gives up on a stop in order
MAX_SPAWNS_IN_FLIGHT = 64  # spawn requests one mold has unanswered: bounds what a hung mold holds
# a worker's own job counters, sent in its "idle" events; Supervisor.jobs sums them over every worker
JOB_COUNTERS = ("done", "failed", "requeued")
STOP_REPORT_EVERY = 5.0  # seconds between the log lines of a stop saying what it still waits for
AGENT_RESPAWN_DELAY = 1.0  # at least this between two agents, should one keep dying
AGENT_REPORT_STALE = 3.0  # readiness: the agent's word on Redis is this old at most
AGENT_MIN_TIMEOUT = 5.0  # an agent silent this long (or TTL/2, if longer) is hung and replaced
RELEASE_WAIT = 3.0  # how long a clean exit waits for the agent to remove the pod's lease
HOLD_CHUNK = 200  # workers per "hold" message, so that a big pod's list stays far below protocol.MAX_LINE
HANDLED = (
    signal.SIGTERM,
    signal.SIGQUIT,
    signal.SIGINT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGCONT,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGHUP,
    signal.SIGCHLD,
)


def _receive(sock: socket.socket) -> bytes | None:
    """What a child sent on its non-blocking socket: None when nothing waits, b"" when it hung up."""
    try:
        return sock.recv(65536)
    except BlockingIOError:
        return None
    except OSError:
        return b""


class Supervisor:
    def __init__(self, settings: Settings, flags: dict[str, str | None], environ: dict[str, str]) -> None:
        self.settings = settings
        self._flags = flags
        self._environ = environ
        self.started = time.time()
        # desired state
        self.sizes = [g.size for g in settings.groups]
        self.generation = 1
        self.intake = dict.fromkeys((g.name for g in settings.groups), Intake.OPEN)
        self.stop_level: StopLevel | None = None
        self.stop_deadline: float | None = None
        # actual state
        self.molds: dict[int, Mold] = {}
        self.workers: dict[str, Worker] = {}
        self.recoveries: dict[str, Recovery] = {}
        self.backoff: dict[tuple[int, int], tuple[int, float]] = {}
        self.early_exits: dict[int, tuple[int, float]] = {}  # pid -> (wait status, when reaped)
        self.serving_generation = 0
        self.reload_error: str | None = None
        self._reload_wanted = False
        self._reloading: loader.Loading | None = None  # the configuration a HUP is reading
        self._config_children: set[int] = set()  # config file readings not reaped yet
        self.interrupted = False
        self.exit_code: int | None = None
        self._pending_exit: int | None = None
        self._faults = 0
        self._generations = 1
        self.restarts = 0
        self.reloads = 0
        self.jobs = dict.fromkeys(JOB_COUNTERS, 0)
        self._seq = 0
        self._signals: list[int] = []
        self._selector = selectors.DefaultSelector()
        self._redis: EmbeddedRedis | None = None
        self._control: ControlServer | None = None
        self._metrics: MetricsServer | None = None
        self._pid_file_written: str | None = None
        self._name_prefix = f"{socket.gethostname()}.{os.getpid()}.{os.urandom(4).hex()}"
        # the agent (agent.py) and the pod's lease in Redis
        self.agent: Agent | None = None
        self.pod_id = self._name_prefix
        self.swept = False  # every lease expired at start-up is settled: workers may take jobs
        self.settled_pods = 0
        self._agent_next = 0.0
        self._leases = 1
        self._lease_established = False
        self._stop_report_at = 0.0

    # ----------------------------------------------------------------- lifecycle

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

    # ----------------------------------------------------------------- event loop

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
        deadlines = [until for until in deadlines + self._agent_deadlines() if until > now]
        if self._evaluation is not None:
            deadlines.append(self._evaluation.deadline)
        deadlines += [due for server in self._listeners() if (due := server.next_deadline()) is not None]
        if self._signals:
            return 0
        return max(0.0, min(deadlines) - now) if deadlines else None

    # ----------------------------------------------------------------- desired state: commands

    def _handle_signals(self) -> None:
        """Each signal is the command it stands for (commands.SIGNALS), validated alike."""
        while self._signals:
            signum = self._signals.pop(0)
            request = commands.for_signal(signum, self.settings.term)
            if request is None:  # SIGCHLD: only wakes the loop to reap
                continue
            log.info("received %s", signal.Signals(signum).name)
            self.command(request, via=signal.Signals(signum).name)

    def command(self, request: commands.Request, via: str = "ctl") -> commands.Reply:
        """One request from a signal, `ctl` or the HTTP endpoint; changes desired state only. A refused
        command that would change something is logged, whoever sent it."""
        reply = commands.dispatch(self, request)
        name = request.get("cmd")
        if not reply["ok"] and isinstance(name, str) and name in commands.CHANGES:
            log.warning("%s %s refused: %s", via, name, reply["error"])
        return reply

    def group_sizes(self) -> dict[str, int]:
        return {g.name: self.sizes[i] for i, g in enumerate(self.settings.groups)}

    def request_stop(self, level: StopLevel) -> StopLevel:
        """Graceful drain, quick stop, or kill; a repeated request escalates one level."""
        if self.stop_level is not None:
            level = max(level, self.stop_level.escalated())
            if level <= self.stop_level:
                return self.stop_level
        if level > StopLevel.GRACEFUL and any(w.state == WorkerState.BUSY for w in self.workers.values()):
            self.interrupted = True
        self.stop_level = level
        timeout = self.settings.drain_timeout if level == StopLevel.GRACEFUL else QUICK_GRACE
        self.stop_deadline = time.monotonic() + timeout
        self._stop_report_at = time.monotonic() + STOP_REPORT_EVERY
        log.info("stopping: %s (deadline in %.1fs)", level.label, timeout)
        return level

    def set_intake(self, intake: Intake, group: str | None = None) -> None:
        """USR2/CONT, `ctl pause|resume|drain [GROUP]`: whether a group's (or every group's) workers take
        new jobs; a drain is a pause that `status` and the metrics report as draining."""
        for name in self.intake if group is None else [group]:
            self.intake[name] = intake
        log.info("%s: %s", f"group {group}" if group else "every group", intake.value)

    def _intake_of(self, group: str) -> Intake:
        """A group's desired intake. One it does not know (new in a reload, or an old worker's group that
        a reload removed) follows the whole supervisor when every group agrees."""
        known = set(self.intake.values())
        return self.intake.get(group) or (known.pop() if len(known) == 1 else Intake.OPEN)

    @property
    def paused(self) -> bool:
        """Every group takes no new job (USR2, `ctl pause`, `ctl drain`)."""
        return all(i is not Intake.OPEN for i in self.intake.values())

    @property
    def draining(self) -> bool:
        """Intake is stopped so running jobs can finish: a `ctl drain` of every group not yet resumed, or a
        graceful stop."""
        drained = all(i is Intake.DRAINING for i in self.intake.values())
        return drained or self.stop_level == StopLevel.GRACEFUL

    def scale(self, group: str, size: int) -> None:
        self.sizes[[g.name for g in self.settings.groups].index(group)] = size
        log.info("group %s: %d worker(s)", group, size)

    def kill_jobs(self) -> int:
        """USR1: every worker kills its running job; workers go on."""
        for w in self.workers.values():
            self._signal(w, signal.SIGUSR1)
        return sum(1 for w in self.workers.values() if w.pid is not None)

    def kill_job(self, job_id: str) -> dict[str, Any] | None:
        """`ctl kill JOB_ID`: USR1 to the worker running this job. What the worker has reported since
        the loop last read is read first, so a job that has just ended is not taken for running (its
        worker's next job would be killed instead)."""
        for w in list(self.workers.values()):
            if (w.job or {}).get("job") != job_id:
                continue
            if w.listening:
                self._on_worker_message(w)
            if w.pid is not None and w.state == WorkerState.BUSY and (w.job or {}).get("job") == job_id:
                log.info("kill job %s on worker[%s] pid %s", job_id, self._slot_label(w), w.pid)
                self._signal(w, signal.SIGUSR1)
                return w.row()
        return None

    def request_reload(self) -> None:
        """HUP: re-read the configuration and start a new generation; the loop swaps workers over.
        Only the wish is recorded here: `_converge_reload` reads the config (the file in a child, never
        in this loop) and starts the generation when the result arrives."""
        self._reload_wanted = True
        self.reload_error = None  # the outcome of this reload, once it is known (`reloading` until then)

    def _converge_reload(self) -> None:
        """Start reading the configuration when a reload is wanted (anew if a reading is under way: the
        file may have changed since it started), and apply it once it is read; a config that fails,
        hangs past its deadline or dies is a refused reload, and the serving generation goes on."""
        if self.stop_level is not None or self._reload_wanted:
            self._cancel_reload()
        if self._reload_wanted and self.stop_level is None:
            self._reload_wanted = False
            try:
                self._reloading = loader.Loading(self._flags, self._environ)
            except ConfigError as exc:
                self._refuse_reload(exc)
                return
            evaluation = self._evaluation
            if evaluation is not None:
                self._config_children.add(evaluation.pid)
                self._selector.register(evaluation.sock, selectors.EVENT_READ, evaluation.on_readable)
                log.info("reload: running %s in pid %d", evaluation.path, evaluation.pid)
        loading = self._reloading
        if loading is None or (self._evaluation is not None and not self._evaluation.done):
            return
        self._cancel_reload()
        try:
            new = loading.settings()
        except ConfigError as exc:
            self._refuse_reload(exc)
            return
        if new.redis_url is None:
            new = dataclasses.replace(new, redis_url=self.settings.redis_url)
        self.sizes = self._sizes_after_reload(new)
        self.intake = {g.name: self._intake_of(g.name) for g in new.groups}
        self.settings = new
        self._generations += 1
        self.generation = self._generations
        self.reloads += 1
        self.reload_error = None
        log.info("reload: starting generation %d", self.generation)

    @property
    def _evaluation(self) -> config_file.Evaluation | None:
        """The config file a HUP is running, if any."""
        return self._reloading.evaluation if self._reloading is not None else None

    def _cancel_reload(self) -> None:
        """Stop watching the reading under way (its child is killed by close() and reaped by _reap)."""
        if self._evaluation is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(self._evaluation.sock)
            self._evaluation.close()
        self._reloading = None

    def _refuse_reload(self, exc: ConfigError) -> None:
        self.reload_error = str(exc)
        log.error("reload refused, the running generation keeps serving: %s", exc)

    def _sizes_after_reload(self, new: Settings) -> list[int]:
        """Groups match by name: one keeps the size it was scaled to (TTIN, `ctl scale`) unless the
        reload changed its configured size; a new group starts at its configured size."""
        old = {g.name: (g.size, self.sizes[i]) for i, g in enumerate(self.settings.groups)}
        return [old[g.name][1] if g.name in old and old[g.name][0] == g.size else g.size for g in new.groups]

    # ----------------------------------------------------------------- reconcile

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
            self._converge_slots()
            self._converge_refork()
        else:
            self._converge_stop()
        self._converge_pause()
        self._converge_recoveries()
        setproctitle(self._title())

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._on_exit(pid, status)

    def _on_exit(self, pid: int, status: int) -> None:
        if pid in self._config_children:
            self._config_children.discard(pid)
            if self._evaluation is not None and self._evaluation.pid == pid:
                self._evaluation.exited(status)
            return
        if self.agent is not None and self.agent.pid == pid:
            self._on_agent_exit(self.agent, status)
            return
        for mold in list(self.molds.values()):
            if mold.pid == pid:
                self._on_mold_exit(mold, status)
                return
        for w in list(self.workers.values()):
            if w.pid == pid:
                self._on_worker_exit(w, status)
                return
        for r in self.recoveries.values():
            if r.pid == pid:
                del self.recoveries[r.worker]
                if status != 0:
                    log.error("recovery of %s failed (%s)", r.worker, describe_status(status))
                return
        self._horse_gone(pid)  # a dead worker's horse, killed by us, may be ours to reap
        if self._redis is not None and pid == self._redis.pid:
            self._on_redis_exit(self._redis, status)
            return
        # a worker or recovery child may die before the mold has told us its pid; or an adopted orphan
        now = time.monotonic()
        self.early_exits[pid] = (status, now)
        while (
            len(self.early_exits) > EARLY_EXITS_MAX
            or now - next(iter(self.early_exits.values()))[1] > EARLY_EXIT_TTL
        ):
            self.early_exits.pop(next(iter(self.early_exits)))
        log.debug("reaped pid %d (%s)", pid, describe_status(status))

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

    def _on_worker_exit(self, w: Worker, status: int) -> None:
        if w.listening:
            self._on_worker_message(w)  # what it said last (a "busy") may still be unread
        self._forget(w)
        uptime = time.monotonic() - w.started_at
        # an exit 0 with a job running (a job calling os._exit(0) in a SimpleWorker) is no clean exit
        clean = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 and w.state != WorkerState.BUSY
        log_fn = log.info if clean or w.stop_level is not None else log.warning
        log_fn(
            "worker[%s] pid %s gen %d exited (%s) after %.1fs",
            self._slot_label(w),
            w.pid,
            w.spec.generation,
            describe_status(status),
            uptime,
        )
        if not clean:
            self._recover(w, status)
        if w.stop_level is not None or self.stop_level is not None:
            return
        self.restarts += 1
        count = self.backoff.get(w.key, (0, 0.0))[0]
        if clean or uptime >= MIN_UPTIME:
            self.backoff.pop(w.key, None)
            return
        count += 1
        delay = min(BACKOFF_MAX, BACKOFF_BASE * 2 ** (count - 1)) * random.uniform(0.8, 1.2)
        self.backoff[w.key] = (count, time.monotonic() + delay)
        if count >= CRASH_LIMIT:
            self._on_crash_loop(w)
        else:
            log.warning(
                "worker[%s] crashed within %.0fs of start; respawning in %.1fs",
                self._slot_label(w),
                MIN_UPTIME,
                delay,
            )

    def _on_crash_loop(self, w: Worker) -> None:
        if w.spec.generation == self.generation and self.serving_generation not in (0, self.generation):
            self.reload_error = f"generation {self.generation}: workers crash at start; reload abandoned"
            log.error("%s; generation %d keeps serving", self.reload_error, self.serving_generation)
            self._revert_generation()
            return
        log.error(
            "crash loop: worker[%s] died within %.0fs of start %d times in a row; giving up",
            self._slot_label(w),
            MIN_UPTIME,
            CRASH_LIMIT,
        )
        self.request_stop(StopLevel.QUICK)
        self._pending_exit = EXIT_CRASH_LOOP

    def _revert_generation(self) -> None:
        """A reload that cannot serve is abandoned: the serving generation and its settings stay."""
        self.generation = self.serving_generation
        serving = self.molds.get(self.serving_generation)
        if serving is not None:
            self.settings = serving.settings
        self.backoff.clear()

    def _recover(self, w: Worker, status: int) -> None:
        """A worker died without cleaning up: kill its orphaned horse, then fix its jobs in Redis."""
        stopping = self.stop_level is not None and self.stop_level >= StopLevel.QUICK
        shutdown = w.stop_level == StopLevel.KILL or stopping
        if w.state == WorkerState.BUSY:  # a stop that costs a job its normal end (killed, failed) exits 1
            self.interrupted = self.interrupted or self.stop_level is not None
        horse = (w.job or {}).get("horse")
        after_pid = None
        if isinstance(horse, int) and self._take_early_exit(horse) is None:
            # not reaped by us, so the pid is still the horse's: kill it before touching its job
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(horse, signal.SIGKILL)
                after_pid = horse
        reason = (
            f"interrupted by shutdown: worker pid {w.pid} ({w.spec.name}) was killed"
            if shutdown
            else f"worker pid {w.pid} ({w.spec.name}) died ({describe_status(status)}) while running this job"
        )
        self.recoveries[w.spec.name] = Recovery(w.spec.name, w.queues, shutdown, reason, after_pid)
        if after_pid is not None:
            self._watch_exit(after_pid)

    def _watch_exit(self, horse: int) -> None:
        """Learn when the killed horse has exited, whoever reaps it. rq's horse, orphaned, is reaped by
        us; a pre-forked horse may be reaped by its forker, and then its exit never reaches us (seen
        in the chaos storm: the recovery waited for the stop deadline)."""
        try:
            fd = os.pidfd_open(horse)
        except ProcessLookupError:  # reaped already
            self._horse_gone(horse)
            return
        except OSError:  # no pidfd (before Linux 5.3): only our own reaping of it tells
            return
        self._selector.register(fd, selectors.EVENT_READ, lambda f: self._on_horse_exit(horse, f))

    def _on_horse_exit(self, horse: int, fd: int) -> None:
        self._selector.unregister(fd)
        os.close(fd)
        self._horse_gone(horse)

    def _horse_gone(self, horse: int) -> None:
        for r in self.recoveries.values():
            if r.after_pid == horse:
                r.after_pid = None

    def _update_serving(self) -> None:
        """The current generation serves once its mold is ready and every worker is its own and ready."""
        mold = self.molds.get(self.generation)
        if mold is None or not mold.ready or self.serving_generation == self.generation:
            return
        if (self.workers or not sum(self.sizes)) and all(
            w.ready and w.spec.generation == self.generation for w in self.workers.values()
        ):
            log.info("generation %d is serving", self.generation)
            self.serving_generation = self.generation

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

    def _converge_slots(self) -> None:
        mold = self.molds.get(self.generation)
        now = time.monotonic()
        limit = sum(self.sizes) + self.settings.reload_surge
        for w in list(self.workers.values()):
            if not w.stopping and (
                w.spec.group >= len(self.sizes) or w.spec.slot >= self.sizes[w.spec.group]
            ):
                self._stop_worker(w, StopLevel.GRACEFUL, "scale down")
        if mold is None or not mold.ready:
            return
        for group, size in enumerate(self.sizes):
            for slot in range(size):
                occupants = [w for w in self.workers.values() if w.key == (group, slot) and not w.stopping]
                current = [w for w in occupants if w.spec.generation == self.generation]
                old = [w for w in occupants if w.spec.generation != self.generation]
                if current:
                    if current[0].ready:
                        for w in old:
                            replaced = f"replaced by generation {self.generation}"
                            self._stop_worker(w, StopLevel.GRACEFUL, replaced)
                    continue
                if self.backoff.get((group, slot), (0, 0.0))[1] > now:
                    continue
                if old and len(self.workers) >= limit:
                    continue
                if mold.hung or len(mold.pending) >= MAX_SPAWNS_IN_FLIGHT:
                    return  # the rest when it has answered
                self._spawn(mold, group, slot)

    def _converge_stop(self) -> None:
        assert self.stop_level is not None and self.stop_deadline is not None
        now = time.monotonic()
        if now >= self.stop_deadline and self.stop_level < StopLevel.KILL and self.workers:
            if self.stop_level == StopLevel.GRACEFUL:
                log.warning(
                    "the drain ran out of time (RESQUE_STARTER_DRAIN_TIMEOUT=%gs) with %s: interrupting them",
                    self.settings.drain_timeout,
                    self._still_running(),
                )
            else:
                log.warning("stop deadline passed with %s; killing them", self._still_running())
            self.request_stop(self.stop_level.escalated())
        elif self.workers and now >= self._stop_report_at:
            self._stop_report_at = now + STOP_REPORT_EVERY
            left = self.stop_deadline - now
            log.info(
                "stopping (%s): waiting for %s; %.0fs left",
                self.stop_level.label,
                self._still_running(),
                left,
            )
        for w in self.workers.values():
            if w.stop_level is None or w.stop_level < self.stop_level:
                self._stop_worker(w, self.stop_level, "shutdown")
        if not self.workers and self.recoveries and time.monotonic() >= self.stop_deadline:
            self._abandon_recoveries()
        if not self.workers and not self.recoveries and self._lease_released():
            self.exit_code = self._pending_exit or (EXIT_INTERRUPTED if self.interrupted else EXIT_OK)

    def _still_running(self) -> str:
        """What a stop waits for, in words: workers, and the jobs they run."""
        jobs = [str(w.job.get("job")) for w in self.workers.values() if w.state == WorkerState.BUSY and w.job]
        shown = f" ({', '.join(jobs[:10])}{', ...' if len(jobs) > 10 else ''})" if jobs else ""
        return f"{len(self.workers)} worker(s), {len(jobs)} running job(s){shown}"

    def _abandon_recoveries(self) -> None:
        """A stop is bounded by its deadline even when a recovery still waits for Redis: rq's own
        maintenance will find those jobs (after its abandoned-job timeout) instead."""
        for r in self.recoveries.values():
            log.error("stop deadline passed: gave up recovering the jobs of dead worker %s; the pod's lease "
                      "still names it, so another pod settles them once it expires", r.worker)  # fmt: skip
            if r.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(r.pid, signal.SIGKILL)
        self.recoveries.clear()
        self.interrupted = True
        if self.agent is not None:  # the lease must expire, not be released
            self._kill_agent(self.agent)

    def _holds_intake(self, group: str) -> bool:
        """A group's workers take no job while it is paused, nor before the expired leases found at start
        are settled (so a dead pod's jobs, requeued at the front, run first)."""
        return not self.swept or self._intake_of(group) is not Intake.OPEN

    def _converge_pause(self) -> None:
        for w in self.workers.values():
            paused = self._holds_intake(w.group)
            # only once ready: before, its handlers may not be installed, and a signal would be lost
            if w.ready and w.paused != paused and not w.stopping:
                w.paused = paused
                self._signal(w, signal.SIGUSR2 if paused else signal.SIGCONT)
                if not paused and w.state == WorkerState.PAUSED:
                    w.state = WorkerState.IDLE  # a worker resumed before its wait for jobs began says nothing

    def _ready_mold(self) -> Mold | None:
        """The current generation's mold, or any ready one, for forking helpers (recoveries, agent)."""
        mold = self.molds.get(self.generation)
        if mold is None or not mold.ready or mold.hung:
            mold = next((m for m in self.molds.values() if m.ready and not m.hung), None)
        return mold

    def _converge_recoveries(self) -> None:
        mold = self._ready_mold()
        if mold is None:
            return
        for r in self.recoveries.values():
            if not r.sent and r.after_pid is None:
                r.sent = True
                token = f"recover:{r.worker}"
                request = {
                    "op": "recover",
                    "token": token,
                    "worker": r.worker,
                    "queues": list(r.queues),
                    "requeue": r.requeue,
                    "reason": r.reason,
                }
                self._send_mold(mold, token, request)

    # ----------------------------------------------------------------- actions on the process table

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

    def _forget(self, w: Worker) -> None:
        self.workers.pop(w.spec.name, None)
        if w.listening:
            self._selector.unregister(w.status)
        w.status.close()

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

    def _take_early_exit(self, pid: int) -> int | None:
        """The exit status reaped for `pid` before we knew whose it was, if `pid` still means that
        process: an entry is stale once it is older than EARLY_EXIT_TTL (the late news it waits for
        comes within milliseconds) or once `pid` is a child of ours again. A child's pid is not reused
        until we reap it, so waitid (WNOWAIT: it reaps nothing) tells truly whether pid was reused."""
        status, reaped = self.early_exits.pop(pid, (None, 0.0))
        if status is None or time.monotonic() - reaped > EARLY_EXIT_TTL:
            return None
        try:
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return status  # not a child of ours: the exit we reaped is the news about pid
        log.debug("pid %d was reused by a new child; its early exit entry is stale", pid)
        return None

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

    def _on_worker_message(self, w: Worker) -> None:
        data = _receive(w.status)
        if data is None:
            return
        if not data:
            self._selector.unregister(w.status)  # the worker is gone or going; reaping tells how
            w.listening = False
            if w.pid is None and w.stopping:  # a spawn its dying mold never forked
                self._forget(w)
            return
        for message in w.buffer.feed(data):
            event = message.get("event")
            if event == "ready":
                w.ready = True
                w.state = WorkerState.PAUSED if w.paused else WorkerState.IDLE
                if w.pid is None:
                    w.pid = int(message.get("pid", 0)) or None
                    if w.stop_level is not None:  # forked by a mold that died before it told us
                        self._signal(w, w.stop_level.signal)
            elif event == "busy":
                w.state, w.job = WorkerState.BUSY, message
            elif event == "idle":
                w.state, w.job = (WorkerState.PAUSED if w.paused else WorkerState.IDLE), None
                self._count_jobs(w, message)
            elif event == "paused" and w.state != WorkerState.BUSY:
                w.state = WorkerState.PAUSED
            elif event == "resumed" and w.state == WorkerState.PAUSED:
                w.state = WorkerState.IDLE
            elif event == "recycle":
                w.stop_reason = f"recycle: {message.get('reason')}"
            elif event == "promote-ready":
                w.promotable = True
            elif message.get("op") == "ready" and w.promoting is not None:
                self._adopt_mold(w)
                return

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

    # ----------------------------------------------------------------- the agent (agent.py)

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

    def _count_jobs(self, w: Worker, message: dict[str, Any]) -> None:
        """Take a worker's own counters, and add what they grew by to totals that outlive the worker."""
        for name in JOB_COUNTERS:
            value = int(message.get(name, getattr(w, name)))
            self.jobs[name] += value - getattr(w, name)
            setattr(w, name, value)

    def _stop_worker(self, w: Worker, level: StopLevel, reason: str) -> None:
        if w.pid is None:
            return  # the mold has not told us its pid yet; the next reconcile (on "forked") stops it
        w.stop_level, w.stop_reason = level, reason
        if level == StopLevel.KILL:
            horse = (w.job or {}).get("horse")
            if isinstance(horse, int):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(horse, signal.SIGKILL)
        self._signal(w, level.signal)

    def _signal(self, w: Worker, sig: int) -> None:
        if w.pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(w.pid, sig)

    # ----------------------------------------------------------------- what commands read

    def status(self) -> dict[str, Any]:
        """The status document (`ctl status --json`, the metrics): its field names are a wire format."""
        order = sorted(self.workers.values(), key=lambda w: (w.spec.group, w.spec.slot, w.spec.generation))
        workers = [w.row() for w in order]
        return {
            "pid": os.getpid(),
            "uptime": round(time.time() - self.started, 3),
            "generation": self.generation,
            "serving_generation": self.serving_generation,
            "groups": [
                {"name": g.name, "queues": list(g.queues), "size": self.sizes[i]}
                for i, g in enumerate(self.settings.groups)
            ],
            "paused": self.paused,
            "draining": self.draining,
            "stopping": self.stop_level.label if self.stop_level is not None else None,
            "molds": [
                {"generation": m.generation, "pid": m.pid, "ready": m.ready, "reforked": m.promoted}
                for m in self.molds.values()
            ],
            "workers": workers,
            "reload_error": self.reload_error,
            "reloading": self._reload_wanted or self._reloading is not None,
            "restarts": self.restarts,
            "reloads": self.reloads,
            "jobs": dict(self.jobs),
            "redis_url": config.mask_url(self.settings.redis_url or ""),
            "app": list(self.settings.app),
            "agent": {
                "pid": self.agent.pid if self.agent else None,
                "pod": self.pod_id,
                "redis": self.redis_answers(),
                "swept": self.swept,
                "settled_pods": self.settled_pods,
            },
        }

    def health(self, check: str) -> dict[str, Any]:
        """live: the loop answers and a mold serves; ready: also not stopping, a worker registered with rq
        and Redis answering. A paused (or draining) supervisor stays ready: it is healthy, just idle."""
        live = any(m.ready for m in self.molds.values()) or self.serving_generation > 0
        if check == "live":
            return {"ok": live, "live": live}
        ready_workers = sum(1 for w in self.workers.values() if w.ready and w.stop_level is None)
        redis_ok = self.redis_answers()
        ok = live and ready_workers > 0 and redis_ok and self.stop_level is None
        return {"ok": ok, "live": live, "ready_workers": ready_workers, "redis": redis_ok}

    def redis_answers(self) -> bool:
        """Whether Redis answered the agent lately: PID 1 itself never waits on the network."""
        a = self.agent
        return a is not None and a.redis_ok and time.monotonic() - a.redis_at < AGENT_REPORT_STALE

    # ----------------------------------------------------------------- small helpers

    def _slot_label(self, w: Worker) -> str:
        if len(self.settings.groups) > 1:
            return f"{w.group}:{w.spec.slot}"
        return str(w.spec.slot)

    def _title(self) -> str:
        live = sum(1 for w in self.workers.values() if w.stop_level is None)
        state = " paused" if self.paused else ""
        if self.stop_level is not None:
            state = f" stopping({self.stop_level.label})"
        return (
            f"resque-starter: supervisor gen={self.generation} workers={live}/{sum(self.sizes)}{state} "
            f"app={','.join(self.settings.app) or '-'}"
        )
