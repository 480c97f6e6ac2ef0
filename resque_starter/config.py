"""Settings: one declaration per setting (`SETTINGS`), read from flags > environment > config file > default.

Each declaration gives the name (the config file's name, the Settings field), the kind of value with its
bounds (kinds.py), the default, the doc line and its section; from it come the environment variable
(RESQUE_STARTER_NAME), the flag (--name), the parser, the error line and the settings table of
docs/configuration.md (`python -m resque_starter.settings_doc`). gunicorn's config.py is the model.

The config file never runs in this process: config_file.py runs it in a child with a deadline and gets
plain values back; its hooks are `FileHook`s, run from the file read again where they are called.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from resque_starter import connection, kinds
from resque_starter.classes import CLASS_RULES, SERIALIZER, check_classes  # noqa: F401 - re-exported
from resque_starter.connection import mask_url
from resque_starter.errors import (  # noqa: F401 - re-exported: every module imports them from here
    EXIT_APP_IMPORT,
    EXIT_CONFIG,
    EXIT_CRASH_LOOP,
    EXIT_INTERRUPTED,
    EXIT_OK,
    PREFIX,
    ConfigError,
    override_label,
)
from resque_starter.kinds import Invalid, Kind


@dataclass(frozen=True)
class Group:
    """A set of worker slots sharing one queue list, in priority order, and the settings its workers
    run with instead of the global ones (`group_overrides` in the config file), as (field, value)."""

    queues: tuple[str, ...]
    size: int
    overrides: tuple[tuple[str, Any], ...] = ()
    window: tuple[int, int] | None = None  # MIN:MAX when the group autoscales (autoscale.py)

    @property
    def name(self) -> str:
        return ",".join(self.queues)


@dataclass(frozen=True)
class Hooks:
    before_fork: Callable[[Settings], Any] | None = None
    warmup: Callable[[Settings], Any] | None = None
    after_fork: Callable[[Any, int], Any] | None = None
    before_exit: Callable[[Settings], Any] | None = None


MAX_GROUP_SIZE = 1024  # workers in one group (CONCURRENCY, GROUPS, TTIN, `ctl scale`): no fork bomb by typo


@dataclass(frozen=True)
class Settings:
    """The values of SETTINGS (a test keeps names and defaults equal to the declarations), and the hooks."""

    redis_url: str | None = None
    require_redis_url: bool = False
    app: tuple[str, ...] = ()
    path: tuple[str, ...] = ()
    concurrency: int = 1
    queues: tuple[str, ...] = ("default",)
    groups: tuple[Group, ...] = (Group(("default",), 1),)
    dequeue_strategy: str = "default"
    worker_class: str = "rq.Worker"
    job_class: str | None = None
    queue_class: str | None = None
    serializer: str | None = None
    config: str | None = None
    config_timeout: float = 10.0
    pid_file: str | None = None
    run_dir: str = field(default_factory=lambda: run_dir_candidates()[0])
    log_level: str = "INFO"
    log_format: str = "text"
    log_config: str | None = None
    term: str = "graceful"
    drain_timeout: float = 25.0
    shutdown_grace: float = 5.0
    stuck_grace: float | None = 30.0
    progress_timeout: float | None = None
    requeue_interrupted: bool = True
    max_requeues: int = 3
    max_jobs: int | None = None
    max_lifetime: float | None = None
    max_memory: int | None = None
    with_scheduler: bool = False
    worker_ttl: int | None = None
    job_monitoring_interval: int | None = None
    maintenance_interval: int | None = None
    result_ttl: int | None = None
    reload_surge: int = 1
    refork_after: int | None = None
    prefork_horse: bool = False
    metrics_port: int | None = None
    autoscale: tuple[int, int] | None = None
    autoscale_wait: float = 1.0
    autoscale_cooldown: float = 60.0
    pod_deletion_cost: bool = False
    pod_deletion_cost_interval: float = 10.0
    lease_ttl: float = 15.0
    hooks: Hooks = field(default_factory=Hooks)

    def for_group(self, index: int) -> Settings:
        """The settings the workers of group `index` run with: the global ones, then its overrides."""
        return dataclasses.replace(self, **dict(self.groups[index].overrides))

    def describe(self) -> dict[str, Any]:
        """The settings as JSON-ready data for logs and `ctl status`: password masked, hooks by name."""
        shown: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "redis_url" and value is not None:
                value = mask_url(value)
            elif f.name == "hooks":
                value = [name for name in HOOK_NAMES if getattr(value, name) is not None]
            elif f.name == "groups":
                value = [_describe_group(g) for g in value]
            elif isinstance(value, tuple):
                value = list(value)
            shown[f.name] = value
        return shown


def run_dir_candidates() -> list[str]:
    """Where the run dir is when RESQUE_STARTER_RUN_DIR is unset, best first: the supervisor takes the
    first, `ctl` the first that holds a control socket (a root shell may have XDG_RUNTIME_DIR set where
    a root service has not). Never a fixed name in /tmp, which any local user could create first: the
    per-uid one there is the last resort, and rundir.make refuses it unless it is ours."""
    found = []
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isabs(xdg) and os.access(xdg, os.W_OK | os.X_OK):
        found.append(os.path.join(xdg, "resque-starter"))
    if os.access("/run/resque-starter", os.W_OK | os.X_OK) or os.access("/run", os.W_OK | os.X_OK):
        found.append("/run/resque-starter")
    return [*found, f"/tmp/resque-starter-{os.getuid()}"]


def _describe_group(group: Group) -> dict[str, Any]:
    shown: dict[str, Any] = {"queues": list(group.queues), "size": group.size}
    if group.window is not None:
        shown["autoscale"] = list(group.window)
    if group.overrides:
        shown["overrides"] = dict(group.overrides)
    return shown


HOOK_NAMES = tuple(f.name for f in fields(Hooks))


def _redis_url(value: object) -> str:
    try:
        return connection.check_url(value)
    except connection.BadURL as e:
        raise Invalid(str(e)) from None


def _groups(value: object) -> tuple[Group, ...]:
    return tuple(
        Group(queues, size, window=span) for queues, size, span in kinds.group_pairs(value, MAX_GROUP_SIZE)
    )


# ---- the declarations


@dataclass(frozen=True)
class Setting:
    """One setting, declared once: everything else about it is derived from this."""

    name: str  # the Settings field and the config file's name
    kind: Kind  # parser, bounds and the allowed text
    doc: str  # one line: --help and the settings table
    section: str
    default_doc: str | None = None  # the table's default when the declared value does not tell it
    in_file: bool = True  # False: only a flag or the environment sets it (it governs the file itself)

    @property
    def env(self) -> str:
        return PREFIX + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def default(self) -> Any:
        return _DEFAULTS[self.name]

    def shown_default(self) -> str:
        return self.default_doc or f"`{self.kind.show(self.default)}`"


_DEFAULTS = {f.name: getattr(Settings(), f.name) for f in fields(Settings)}
_SECONDS = kinds.whole(1, 86400, "a whole number of seconds from 1 to 86400 (a day)")
_COUNT = kinds.whole(1, 10**9)
_RUN = "Application"
_RQ = "rq"
_WORK = "Workers and queues"
_STOP = "Stopping"
_MEM = "Recycling and memory"
_OPS = "Files, logs and metrics"

SETTINGS = (
    Setting(
        "app",
        kinds.MODULES,
        "the module(s) the mold imports once before forking the workers: your tasks and what they use",
        _RUN,
        "none (nothing is preloaded; a warning says so)",
    ),
    Setting(
        "path",
        kinds.DIRECTORIES,
        "directories put first on the mold's sys.path, like gunicorn's --pythonpath; the working "
        "directory is on it anyway, last, as with `rq worker`",
        _RUN,
    ),
    Setting(
        "config",
        kinds.path(),
        "a Python config file: settings as lowercase names, hooks as functions (docs/configuration.md)",
        _RUN,
        in_file=False,
    ),
    Setting(
        "config_timeout",
        kinds.duration(300, allow_zero=False),
        "how long the config file may run (at start and on each HUP) before it counts as broken",
        _RUN,
        in_file=False,
    ),
    Setting(
        "redis_url",
        Kind(connection.ALLOWED, _redis_url),
        "the Redis to use; REDIS_URL is read too (this one wins)",
        "Redis",
        "unset: an embedded `redis-server` child on a "
        "unix socket in the run dir, with a warning that nothing is shared or kept",
    ),
    Setting(
        "require_redis_url",
        kinds.BOOLEAN,
        "make an unset Redis URL an error (exit 2) instead of starting an embedded redis-server",
        "Redis",
    ),
    Setting(
        "concurrency",
        kinds.whole(0, MAX_GROUP_SIZE),
        "worker slots",
        _WORK,
        "the CPUs available to the container (cgroup `cpu.max` or CFS quota, else the affinity mask)",
    ),
    Setting("queues", kinds.QUEUES, "queue names in priority order", _WORK),
    Setting(
        "groups",
        Kind(
            "groups of QUEUES=SIZE separated by semicolons, such as high,default=3; low=1:8, "
            f"each size from 0 to {MAX_GROUP_SIZE} or MIN:MAX to autoscale the group",
            _groups,
        ),
        "several worker groups, each with its queues and size (replaces QUEUES and CONCURRENCY)",
        _WORK,
        "one group: QUEUES with CONCURRENCY workers",
    ),
    Setting(
        "dequeue_strategy", kinds.choice("default", "round_robin", "random"), "rq's dequeue strategy", _WORK
    ),
    Setting(
        "with_scheduler", kinds.BOOLEAN, "run rq's scheduler in the first worker of the first group", _WORK
    ),
    Setting(
        "requeue_interrupted",
        kinds.BOOLEAN,
        "put jobs interrupted by a stop back at the front of their queue",
        _WORK,
    ),
    Setting(
        "max_requeues",
        kinds.whole(0, 1000),
        "how often one job may be requeued that way before it is failed with a reason",
        _WORK,
    ),
    Setting(
        "autoscale",
        kinds.off(kinds.window(MAX_GROUP_SIZE)),
        "MIN:MAX: the first group's workers grow while its jobs wait and shrink when idle "
        "(other groups: a MIN:MAX size in GROUPS)",
        _WORK,
    ),
    Setting(
        "autoscale_wait",
        kinds.duration(3600, allow_zero=True),
        "autoscale grows while the oldest waiting job has waited longer than this",
        _WORK,
    ),
    Setting(
        "autoscale_cooldown",
        kinds.duration(86400, allow_zero=False),
        "autoscale stops one idle worker after nothing waited for this long",
        _WORK,
    ),
    Setting(
        "prefork_horse", kinds.BOOLEAN, "fork the next work-horse while the worker waits for a job", _WORK
    ),
    Setting(
        "worker_class",
        kinds.dotted_path(CLASS_RULES["worker_class"][0]),
        "rq's worker class: rq.Worker (a fork per job), rq.SimpleWorker, or yours",
        _RQ,
    ),
    Setting("job_class", kinds.dotted_path(CLASS_RULES["job_class"][0]), "rq's job class", _RQ, "rq's"),
    Setting("queue_class", kinds.dotted_path(CLASS_RULES["queue_class"][0]), "rq's queue class", _RQ, "rq's"),
    Setting("serializer", SERIALIZER, "rq's serializer", _RQ, "rq's"),
    Setting("worker_ttl", _SECONDS, "rq's worker_ttl", _RQ, "rq's"),
    Setting("job_monitoring_interval", _SECONDS, "rq's job_monitoring_interval", _RQ, "rq's"),
    Setting("maintenance_interval", _SECONDS, "rq's maintenance_interval", _RQ, "rq's"),
    Setting(
        "result_ttl",
        kinds.whole(
            -1,
            315_360_000,
            "a whole number of seconds from -1 to 315360000 "
            "(ten years; -1 keeps results forever, 0 keeps none)",
        ),
        "rq's default_result_ttl",
        _RQ,
        "rq's",
    ),
    Setting(
        "term",
        kinds.choice("graceful", "quick"),
        "what SIGTERM means: a graceful stop (as QUIT) or a quick one (as INT)",
        _STOP,
    ),
    Setting(
        "drain_timeout",
        kinds.duration(86400, allow_zero=True),
        "how long a graceful stop waits for running jobs before it interrupts them",
        _STOP,
    ),
    Setting(
        "shutdown_grace",
        kinds.duration(300, allow_zero=True),
        "how long a job interrupted by a stop (resque_starter.job.Shutdown) may take to end before SIGKILL; "
        "counted within DRAIN_TIMEOUT",
        _STOP,
    ),
    Setting(
        "stuck_grace",
        kinds.off(kinds.duration(86400, allow_zero=True)),
        "how long past its rq timeout a job running in the worker (SimpleWorker) may run before the "
        "supervisor dumps its stack and kills it",
        _STOP,
    ),
    Setting(
        "progress_timeout",
        kinds.off(kinds.duration(86400, allow_zero=False)),
        "`ctl health --progress` fails when a job waited this long on a queue the pod serves while no "
        "worker took one, or every worker is stuck past its job's timeout + STUCK_GRACE",
        _STOP,
    ),
    Setting(
        "lease_ttl",
        kinds.duration(3600, allow_zero=False, minimum=3),  # refreshed every TTL/3: at most once a second
        "a pod whose lease in Redis is not refreshed for this long is dead: another pod settles its jobs",
        _STOP,
    ),
    Setting("max_jobs", kinds.off(_COUNT), "recycle a worker after this many jobs", _MEM),
    Setting(
        "max_lifetime",
        kinds.off(kinds.duration(30 * 86400, allow_zero=False)),
        "recycle a worker after this long (±10 % jitter)",
        _MEM,
    ),
    Setting(
        "max_memory",
        kinds.off(kinds.size(64)),
        "recycle a worker whose private memory (USS) is above this, between jobs",
        _MEM,
    ),
    Setting(
        "refork_after", kinds.off(_COUNT), "make a worker the new mold after it ran this many jobs", _MEM
    ),
    Setting(
        "reload_surge", kinds.whole(1, MAX_GROUP_SIZE), "extra worker processes allowed during a reload", _MEM
    ),
    Setting(
        "run_dir",
        kinds.path(94, " (its control.sock must fit a unix socket's 108)"),
        "directory of the control socket (and the embedded Redis's socket); used only if it is ours",
        _OPS,
        default_doc="`$XDG_RUNTIME_DIR/resque-starter`, else `/run/resque-starter` if writable, "
        "else `/tmp/resque-starter-UID` (see operating.md)",
    ),
    Setting("pid_file", kinds.path(), "write the supervisor's pid here, atomically", _OPS),
    Setting("log_level", kinds.choice("DEBUG", "INFO", "WARNING", "ERROR"), "log level", _OPS),
    Setting(
        "log_format",
        kinds.choice("text", "json"),
        "log format on stderr: text, or one JSON object a line",
        _OPS,
    ),
    Setting(
        "log_config",
        kinds.path(),
        "a logging.config.dictConfig file (JSON; YAML with PyYAML) used instead of LOG_LEVEL and LOG_FORMAT",
        _OPS,
    ),
    Setting(
        "metrics_port",
        kinds.off(kinds.whole(1, 65535)),
        "serve /healthz, /readyz and /metrics on this port",
        _OPS,
    ),
    Setting(
        "pod_deletion_cost",
        kinds.BOOLEAN,
        "set the pod's controller.kubernetes.io/pod-deletion-cost to its busy workers (needs RBAC)",
        _OPS,
    ),
    Setting(
        "pod_deletion_cost_interval",
        kinds.duration(3600, allow_zero=False),
        "at most one PATCH of that annotation per this long, and only when it changed",
        _OPS,
    ),
)
SETTING = {s.name: s for s in SETTINGS}
ENV_NAMES = frozenset(s.env for s in SETTINGS)


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting; None means "not given", so the environment and file still apply. A
    boolean flag alone means true (`--with-scheduler`); `--with-scheduler=false` still works."""
    for s in SETTINGS:
        help_text = f"{s.doc} [{s.env}]".replace("%", "%%")
        if s.kind.boolean:
            parser.add_argument(s.flag, dest=s.name, nargs="?", const="true", metavar="BOOL", help=help_text)
        else:
            parser.add_argument(s.flag, dest=s.name, default=None, metavar="VALUE", help=help_text)
