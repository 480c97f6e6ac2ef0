"""What every part of the supervisor shares: its timings and limits, the signals it handles, and
SupervisorState, the desired and actual state each part (a mixin) reads and changes.
"""

from __future__ import annotations

import logging
import math
import os
import selectors
import signal
import socket
import time
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

from resque_starter import commands, config_file, loader
from resque_starter.autoscale import Autoscaler, CpuLoad
from resque_starter.config import Settings
from resque_starter.control_server import ControlServer
from resque_starter.job_stats import JobStats
from resque_starter.process_table import Agent, Mold, Recovery, Worker
from resque_starter.protocol import JOB_COUNTERS
from resque_starter.states import Intake, StopLevel

if TYPE_CHECKING:  # imported where used: a supervisor without them does not hold them in memory
    from resque_starter.deletion_cost import Annotator
    from resque_starter.embedded_redis import EmbeddedRedis
    from resque_starter.metrics import MetricsServer

log = logging.getLogger("resque_starter.supervisor")

PR_SET_CHILD_SUBREAPER = 36
MIN_UPTIME = 5.0  # a worker that dies sooner than this, uncommanded, counts as a crash
CRASH_LIMIT = 5  # consecutive crashes of one slot before giving up (exit 4)
BACKOFF_BASE, BACKOFF_MAX = 0.5, 10.0
QUICK_GRACE = 10.0  # seconds a quick stop waits for workers before SIGKILL
# A worker stopped on its own (scale-down, reload) is SIGKILLed this long after DRAIN_TIMEOUT, when its
# own deadline (which kills its job's process at DRAIN_TIMEOUT) did not end it: a SimpleWorker in C code.
DEADLINE_MARGIN = 1.0
BEFORE_EXIT_TIMEOUT = 10.0  # seconds the before_exit hook may take
MOLD_STALL = 5.0  # seconds a mold may leave a request unanswered before it counts as hung
REDIS_POLL = 0.05  # seconds between looks at a restarting embedded redis-server
EARLY_EXIT_TTL = 10.0  # seconds an exit reaped before we knew whose it was stays a candidate
EARLY_EXITS_MAX = 1024
MAX_LOOP_FAULTS = 10  # unexpected exceptions in the loop before it gives up on a stop in order
MAX_SPAWNS_IN_FLIGHT = 64  # spawn requests one mold has unanswered: bounds what a hung mold holds
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


def autoscalers(
    settings: Settings, before: dict[str, Autoscaler], windows: dict[str, tuple[int, int] | None]
) -> dict[str, Autoscaler]:
    """The groups that autoscale, by name. After a reload (`windows`: each group's configured window
    before it) a group whose configured window did not change keeps its scaler, moved window and all,
    or stays off if `ctl scale N` turned it off."""
    found = {}
    for g in settings.groups:
        if g.window is None:
            continue
        if g.name in windows and windows[g.name] == g.window:
            if g.name not in before:
                continue
            scaler = before[g.name]
        else:
            scaler = Autoscaler(*g.window, settings.autoscale_wait, settings.autoscale_cooldown)
        scaler.wait, scaler.cooldown = settings.autoscale_wait, settings.autoscale_cooldown
        found[g.name] = scaler
    return found


class SupervisorState(ABC):
    """The supervisor's state, typed once for every part of it (lifecycle.py, desired.py, converge.py,
    exits.py, molds.py, agent_link.py, reports.py, each a mixin over this class), and the methods one
    part calls on another, declared here so that mypy checks each module on its own."""

    _wake_read: int  # the self-pipe that signals wake the loop with (set by _start)
    _wake_write: int

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
        self.job_metrics = JobStats()  # from the workers' busy and idle events
        self.queue_report: tuple[dict[str, dict[str, Any]], float] | None = None  # the agent's, and when
        # per group: when (time.monotonic()) one of its workers last took a job, or it began to take them
        self.took_at = {g.name: time.monotonic() for g in settings.groups}
        self.autoscalers = autoscalers(settings, {}, {})  # by group name: the groups that autoscale
        self.cpu_load = CpuLoad()
        self.worker_cost = (0.0, 0)  # (time.monotonic(), bytes): the most a worker held lately
        self.worker_cost_read = -math.inf  # when (time.monotonic()) the workers' memory was last read
        self._worker_holdings: tuple[list[Worker], list[int]] | None = None  # what it read then
        self._seq = 0
        self._signals: list[int] = []
        self._selector = selectors.DefaultSelector()
        self._redis: EmbeddedRedis | None = None
        self._control: ControlServer | None = None
        self._metrics: MetricsServer | None = None
        self._annotator: Annotator | None = None  # RESQUE_STARTER_POD_DELETION_COST's child
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

    @abstractmethod
    def request_stop(self, level: StopLevel) -> StopLevel: ...
    @abstractmethod
    def _intake_of(self, group: str) -> Intake: ...
    @property
    @abstractmethod
    def paused(self) -> bool: ...
    @property
    @abstractmethod
    def draining(self) -> bool: ...
    @abstractmethod
    def _converge_reload(self) -> None: ...
    @property
    @abstractmethod
    def _evaluation(self) -> config_file.Evaluation | None: ...
    @abstractmethod
    def command(self, request: commands.Request, via: str = "ctl") -> commands.Reply: ...
    @abstractmethod
    def status(self) -> dict[str, Any]: ...
    @abstractmethod
    def health(self, check: str) -> dict[str, Any]: ...
    @abstractmethod
    def _reap(self) -> None: ...
    @abstractmethod
    def _on_exit(self, pid: int, status: int) -> None: ...
    @abstractmethod
    def _on_redis_exit(self, server: EmbeddedRedis, status: int) -> None: ...
    @abstractmethod
    def _revert_generation(self) -> None: ...
    @abstractmethod
    def _update_serving(self) -> None: ...
    @abstractmethod
    def _converge_molds(self) -> None: ...
    @abstractmethod
    def _converge_slots(self) -> None: ...
    @abstractmethod
    def _converge_stop(self) -> None: ...
    @abstractmethod
    def _holds_intake(self, group: str) -> bool: ...
    @abstractmethod
    def _converge_pause(self) -> None: ...
    @abstractmethod
    def _converge_deadlines(self) -> None: ...
    @abstractmethod
    def _ready_mold(self) -> Mold | None: ...
    @abstractmethod
    def _converge_recoveries(self) -> None: ...
    @abstractmethod
    def _stop_mold(self, mold: Mold) -> None: ...
    @abstractmethod
    def _forget(self, w: Worker) -> None: ...
    @abstractmethod
    def _kill_hung_molds(self) -> None: ...
    @abstractmethod
    def _on_mold_exit(self, mold: Mold, status: int) -> None: ...
    @abstractmethod
    def _take_early_exit(self, pid: int) -> int | None: ...
    @abstractmethod
    def _spawn(self, mold: Mold, group: int, slot: int) -> None: ...
    @abstractmethod
    def _send_mold(
        self, mold: Mold, token: str, message: dict[str, Any], fds: list[int] | None = None
    ) -> None: ...
    @abstractmethod
    def _on_worker_message(self, w: Worker) -> None: ...
    @abstractmethod
    def _converge_refork(self) -> None: ...
    @abstractmethod
    def _adopt_mold(self, w: Worker) -> None: ...
    @abstractmethod
    def _agent_deadlines(self) -> list[float]: ...
    @abstractmethod
    def _converge_agent(self) -> None: ...
    @abstractmethod
    def _kill_agent(self, a: Agent) -> None: ...
    @abstractmethod
    def _drop_agent(self, a: Agent) -> None: ...
    @abstractmethod
    def _on_agent_exit(self, a: Agent, status: int) -> None: ...
    @abstractmethod
    def _lease_released(self) -> bool: ...
    @abstractmethod
    def _stop_worker(self, w: Worker, level: StopLevel, reason: str) -> None: ...
    @abstractmethod
    def _signal(self, w: Worker, sig: int) -> None: ...
    @abstractmethod
    def _slot_label(self, w: Worker) -> str: ...
    @abstractmethod
    def _title(self) -> str: ...
    @abstractmethod
    def queues(self) -> dict[str, dict[str, Any]] | None: ...
    @abstractmethod
    def _converge_autoscale(self) -> None: ...
    @abstractmethod
    def job_stats(self) -> dict[str, Any]: ...
    @abstractmethod
    def demand(self) -> dict[str, Any] | None: ...
