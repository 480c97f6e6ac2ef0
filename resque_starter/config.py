"""Settings: every knob of DESIGN.md §2, from flags > environment > config file > defaults.

The supervisor reads these and never imports the application; the config file is executed here
(like gunicorn's), so its hooks travel to the mold and the workers by fork.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

EXIT_OK = 0
EXIT_INTERRUPTED = 1
EXIT_CONFIG = 2
EXIT_APP_IMPORT = 3
EXIT_CRASH_LOOP = 4


class ConfigError(Exception):
    """A bad setting: printed as one line, exit code 2."""

    def __init__(self, variable: str, value: object, allowed: str) -> None:
        self.variable = variable
        self.value = value
        self.allowed = allowed
        super().__init__(f"{variable}={value!r} is not allowed: {allowed}")


@dataclass(frozen=True)
class Group:
    """A set of worker slots sharing one queue list, in priority order."""

    queues: tuple[str, ...]
    size: int

    @property
    def name(self) -> str:
        return ",".join(self.queues)


@dataclass(frozen=True)
class Hooks:
    before_fork: Callable[[Settings], Any] | None = None
    warmup: Callable[[Settings], Any] | None = None
    after_fork: Callable[[Any, int], Any] | None = None
    before_exit: Callable[[Settings], Any] | None = None


@dataclass(frozen=True)
class Settings:
    redis_url: str | None = None
    require_redis_url: bool = False
    app: tuple[str, ...] = ()
    concurrency: int = 1
    queues: tuple[str, ...] = ("default",)
    groups: tuple[Group, ...] = (Group(("default",), 1),)
    dequeue_strategy: str = "default"
    worker_class: str = "rq.Worker"
    job_class: str | None = None
    queue_class: str | None = None
    serializer: str | None = None
    config: str | None = None
    pid_file: str | None = None
    run_dir: str = "/tmp/resque-starter"
    log_level: str = "INFO"
    log_format: str = "text"
    term: str = "graceful"
    drain_timeout: float = 25.0
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
    hooks: Hooks = field(default_factory=Hooks)
