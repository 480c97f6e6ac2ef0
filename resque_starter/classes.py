"""The class settings (worker, job and queue class, serializer): checked in the mold, where the app is.

The supervisor checks only their syntax (kinds.dotted_path): importing them would import rq and the
application into PID 1, whose every page each new mold copies.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from resque_starter import kinds
from resque_starter.errors import PREFIX, ConfigError, override_label


def _resolve(path: str) -> object:
    """Import `path`'s longest module prefix and walk the rest as attributes, like rq does."""
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(path)


def _is_subclass(base: str) -> Callable[[object], bool]:
    return lambda obj: isinstance(obj, type) and issubclass(obj, _resolve(base))  # type: ignore[arg-type]


def _is_serializer(obj: object) -> bool:
    return callable(getattr(obj, "dumps", None)) and callable(getattr(obj, "loads", None))


# setting -> (what is allowed, the test an imported object must pass)
CLASS_RULES: dict[str, tuple[str, Callable[[object], bool]]] = {
    "worker_class": (
        "the dotted path of a rq.worker.BaseWorker subclass, such as rq.SimpleWorker",
        _is_subclass("rq.worker.BaseWorker"),
    ),
    "job_class": (
        "the dotted path of a rq.job.Job subclass, such as myapp.jobs.MyJob",
        _is_subclass("rq.job.Job"),
    ),
    "queue_class": (
        "the dotted path of a rq.queue.Queue subclass, such as myapp.queues.MyQueue",
        _is_subclass("rq.queue.Queue"),
    ),
    "serializer": (
        "json, pickle, or the dotted path of an object with dumps() and loads(), "
        "such as rq.serializers.JSONSerializer",
        _is_serializer,
    ),
}
SERIALIZER_ALIASES = ("json", "pickle")  # rq.serializers.SERIALIZER_ALIASES, without importing rq here


def _serializer(value: object) -> str:
    if isinstance(value, str) and value.strip() in SERIALIZER_ALIASES:
        return value.strip()
    return kinds.dotted_path(CLASS_RULES["serializer"][0])(value)


SERIALIZER = kinds.Kind(CLASS_RULES["serializer"][0], _serializer)


def check_classes(settings: Any) -> str | None:
    """Import every configured class path of `settings` (a config.Settings) and check it is what it must
    be; one line when not. Runs in the mold, after the application import, since most paths name the
    application's code."""
    checks = [(f"{PREFIX}{name.upper()}", name, getattr(settings, name)) for name in CLASS_RULES]
    for group in settings.groups:
        path = dict(group.overrides).get("worker_class")
        checks.append((override_label(group.name, "worker_class", settings.config), "worker_class", path))
    for variable, name, path in checks:
        if path is None or (name == "serializer" and path in SERIALIZER_ALIASES):
            continue
        allowed, fits = CLASS_RULES[name]
        try:
            obj = _resolve(path)
        except (ImportError, AttributeError) as exc:
            return str(ConfigError(variable, path, f"{allowed} (cannot import it: {exc})"))
        if not fits(obj):
            return str(ConfigError(variable, path, f"{allowed} (it is not one)"))
    return None
