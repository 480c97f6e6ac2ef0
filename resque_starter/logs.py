"""Logging on stderr as text or JSON lines, every record tagged with the process role and slot."""

from __future__ import annotations

import json
import logging
import os
import sys
import time

_role = "supervisor"


class _RoleFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.role = _role
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "role": getattr(record, "role", _role),
            "pid": record.process,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)-7s [%(role)s %(process)d] %(message)s"


def setup(level: str = "INFO", fmt: str = "text") -> None:
    """Route every logger (ours and rq's) to one stderr handler, formatted once."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RoleFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        formatter = logging.Formatter(TEXT_FORMAT)
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("rq.worker", "rq.job", "rq.scheduler", "rq"):
        # rq installs its own handlers in Worker.bootstrap unless a handler is present; keep ours.
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True


def set_role(role: str) -> None:
    """Name this process in every later record: supervisor, mold gen=2, worker[0] ..."""
    global _role
    _role = role


def pid_role() -> str:
    return f"{_role} {os.getpid()}"
