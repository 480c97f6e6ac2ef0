"""Logging on stderr as text or JSON lines, one line per record, every record tagged with the process
role and, while a job runs, the job (id, function, queue; at its end also duration and outcome).

The tags go on every LogRecord under one attribute of ours (a record factory, so records from any
logger, handler or configuration have them, and rq's or an app's own `extra={"job_id": ...}` never
collides with them). `ContextFilter` copies them to `role`, `job_id`, `job_func` and `job_queue` for
the formats of a user's own logging configuration (RESQUE_STARTER_LOG_CONFIG, a dictConfig file),
which may also use the formatters below by name (`resque_starter.logs.TextFormatter`, `...JsonFormatter`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

from resque_starter.errors import PREFIX, ConfigError

_role = "supervisor"
_job: tuple[str, str, str] | None = None  # (id, function, queue) of the job this process runs

TAGS = "resque_starter"  # the LogRecord attribute: (role, (job id, function, queue) or None)
# What a record carries about its job, in both formats; the end of a job adds the last two (logged with
# extra={"job_duration": seconds, "job_outcome": outcome}).
JOB_FIELDS = ("job_id", "job_func", "job_queue", "job_duration", "job_outcome")
_TEXT_KEYS = {"job_id": "job", "job_func": "func", "job_queue": "queue", "job_duration": "duration",
              "job_outcome": "outcome"}  # fmt: skip
LOG_CONFIG_ENV = PREFIX + "LOG_CONFIG"


def _tagged_factory(make: Any) -> Any:
    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record: logging.LogRecord = make(*args, **kwargs)
        setattr(record, TAGS, (_role, _job))
        return record

    factory.resque_starter = True  # type: ignore[attr-defined]
    return factory


def _install_factory() -> None:
    current = logging.getLogRecordFactory()
    if not getattr(current, "resque_starter", False):
        logging.setLogRecordFactory(_tagged_factory(current))


def _tags(record: logging.LogRecord) -> tuple[str, list[tuple[str, Any]]]:
    """The record's role and its job fields (name, value), in JOB_FIELDS order."""
    role, job = getattr(record, TAGS, (_role, None))
    items = list(zip(JOB_FIELDS, job, strict=False)) if job else []
    items += [(name, value) for name in JOB_FIELDS[3:] if (value := getattr(record, name, None)) is not None]
    return role, items


class ContextFilter(logging.Filter):
    """For a user's own formats: sets %(role)s and %(job_id)s, %(job_func)s, %(job_queue)s (empty
    outside a job) on each record, leaving any the record already has (an `extra` of the caller's)."""

    def filter(self, record: logging.LogRecord) -> bool:
        role, items = _tags(record)
        for name, value in {"role": role, **dict.fromkeys(JOB_FIELDS[:3], ""), **dict(items)}.items():
            record.__dict__.setdefault(name, value)
        return True


class TextFormatter(logging.Formatter):
    """`time LEVEL [role pid job=... func=... queue=...] message`, in UTC, always one line: a newline in
    the message or a traceback is written as the two characters \\n, so no line lacks its prefix."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s [%(starter_tags)s] %(message)s")
        self.converter = time.gmtime

    def formatMessage(self, record: logging.LogRecord) -> str:
        role, items = _tags(record)
        record.starter_tags = f"{role} {record.process}" + "".join(
            f" {_TEXT_KEYS[k]}={_shown(v)}" for k, v in items
        )
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\r", "\\r").replace("\n", "\\n")


def _shown(value: Any) -> str:
    return f"{value:.6f}".rstrip("0").rstrip(".") if isinstance(value, float) else str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts, level, role, pid, logger, msg, the job's fields while one runs
    (job_id, job_func, job_queue; at its end job_duration in seconds and job_outcome), exc."""

    def format(self, record: logging.LogRecord) -> str:
        role, items = _tags(record)
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "role": role,
            "pid": record.process,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(items)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup(level: str = "INFO", fmt: str = "text", config_path: str | None = None) -> None:
    """Route every logger (ours and rq's) to one stderr handler, formatted once; or, with a config
    file, configure logging from it (a dictConfig in JSON, or YAML when PyYAML is installed). A file
    that cannot be read or applied is a ConfigError naming RESQUE_STARTER_LOG_CONFIG."""
    _install_factory()
    if config_path is not None:
        _apply_config(config_path)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("rq.worker", "rq.job", "rq.scheduler", "rq"):
        # rq installs its own handlers in Worker.bootstrap unless a handler is present; keep ours.
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True


def _apply_config(path: str) -> None:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(LOG_CONFIG_ENV, path, f"a readable file ({exc.strerror})") from None
    config = _parse(path, text)
    if not isinstance(config, dict) or config.get("version") != 1:
        raise ConfigError(LOG_CONFIG_ENV, path, 'a logging.config.dictConfig mapping with "version": 1')
    import logging.config  # with logging.handlers and pickle: only for those who use it

    try:
        logging.config.dictConfig(config)
    except (ValueError, TypeError, AttributeError, ImportError) as exc:
        raise ConfigError(LOG_CONFIG_ENV, path, f"a valid logging.config.dictConfig ({exc})") from None


def _parse(path: str, text: str) -> Any:
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml  # type: ignore[import-untyped]
        except ImportError:
            raise ConfigError(LOG_CONFIG_ENV, path, "JSON, or YAML with PyYAML installed") from None
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(LOG_CONFIG_ENV, path, f"valid YAML ({exc})") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ConfigError(LOG_CONFIG_ENV, path, f"valid JSON ({exc})") from None


def set_role(role: str) -> None:
    """Name this process in every later record: supervisor, mold gen=2, worker[0] ..."""
    global _role
    _role = role


def set_job(job_id: str | None, func: str = "", queue: str = "") -> None:
    """Tag every later record of this process with the job it runs (None: no job). A fork inherits it:
    rq's work-horse starts with its job's tags."""
    global _job
    _job = None if job_id is None else (job_id, func, queue)


def pid_role() -> str:
    return f"{_role} {os.getpid()}"
