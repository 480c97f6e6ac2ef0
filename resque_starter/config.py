"""Settings: every knob of DESIGN.md §2, from flags > environment > config file > defaults.

The supervisor reads these and never imports the application; the config file is executed here
(like gunicorn's), so its hooks travel to the mold and the workers by fork.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import keyword
import math
import os
import re
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import parse_qs, urlsplit

from resque_starter import cgroups

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
        shown = " is not set" if value is None else f"={value!r} is not allowed"
        # One line whatever a value's repr or the allowed text hold: the CLI prints it as is.
        super().__init__(" ".join(f"{variable}{shown}: {allowed}".splitlines()))


@dataclass(frozen=True)
class Group:
    """A set of worker slots sharing one queue list, in priority order, and the settings its workers
    run with instead of the global ones (`group_overrides` in the config file), as (field, value)."""

    queues: tuple[str, ...]
    size: int
    overrides: tuple[tuple[str, Any], ...] = ()

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


def _describe_group(group: Group) -> dict[str, Any]:
    shown: dict[str, Any] = {"queues": list(group.queues), "size": group.size}
    if group.overrides:
        shown["overrides"] = dict(group.overrides)
    return shown


HOOK_NAMES = tuple(f.name for f in fields(Hooks))
PREFIX = "RESQUE_STARTER_"

Parser = Callable[[object], Any]


class _Invalid(Exception):
    """A parser's complaint, the `allowed` text of the ConfigError the loader builds around it."""


MAX_GROUP_SIZE = 1024  # workers in one group: a typo must not fork-bomb the container

# ---- parsers: each takes a string (flag, environment, config file) or a native value (config file)


def _whole(minimum: int, maximum: int | None = None, allowed: str | None = None) -> Parser:
    text = allowed or (
        f"a whole number from {minimum} to {maximum}" if maximum else f"a whole number >= {minimum}"
    )

    def parse(value: object) -> int:
        if isinstance(value, str) and re.fullmatch(r"[+-]?[0-9]{1,18}", value.strip()):
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise _Invalid(text)
        if value < minimum or (maximum is not None and value > maximum):
            raise _Invalid(text)
        return value

    return parse


_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def _boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise _Invalid("true or false (also 1/0, yes/no, on/off)")


_DURATION = re.compile(r"([0-9]{1,12}(?:\.[0-9]{0,9})?|\.[0-9]{1,9})\s*([smh]?)", re.IGNORECASE)
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600}


def _duration(allow_zero: bool) -> Parser:
    text = f"a duration {'>= 0' if allow_zero else '> 0'} in seconds or with a unit: 90, 90s, 1.5m, 15m, 2h"

    def parse(value: object) -> float:
        seconds = _seconds(value)
        if seconds is None or seconds < 0 or (seconds == 0 and not allow_zero):
            raise _Invalid(text)
        return seconds

    return parse


def _seconds(value: object) -> float | None:
    if isinstance(value, str):
        match = _DURATION.fullmatch(value.strip())
        return float(match[1]) * _SECONDS[match[2].lower()] if match else None
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    try:
        seconds = float(value)
    except OverflowError:  # an int beyond any float
        return None
    return seconds if math.isfinite(seconds) else None


# K, M, G, T are binary multiples in every spelling (512M = 512Mi = 512MB), as with `docker run -m`.
_SIZE = re.compile(r"([0-9]{1,15}(?:\.[0-9]{1,6})?)\s*(?:([KMGT])(?:i|B|iB)?|B)?", re.IGNORECASE)
_BYTES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _size(value: object) -> int:
    text = "a size > 0 in bytes or with a unit: 536870912, 1024K, 512M, 512Mi, 512MB, 1G"
    if isinstance(value, str) and (match := _SIZE.fullmatch(value.strip())):
        value = round(float(match[1]) * _BYTES[(match[2] or "").upper()])
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise _Invalid(text)
    return value


def _off(parse: Parser) -> Parser:
    """Accept `off` too, for the recycling knobs that are off by default."""

    def parse_or_off(value: object) -> Any:
        if isinstance(value, str) and value.strip().lower() == "off":
            return None
        try:
            return parse(value)
        except _Invalid as e:
            raise _Invalid(f"{e}, or off") from None

    return parse_or_off


def _choice(*options: str) -> Parser:
    """Case-insensitive; the value is stored in the spelling of `options`."""

    def parse(value: object) -> str:
        if isinstance(value, str):
            for option in options:
                if option.lower() == value.strip().lower():
                    return option
        raise _Invalid("one of " + ", ".join(options))

    return parse


def _items(value: object, what: str) -> list[str]:
    """A comma-separated string or a list/tuple of strings, as stripped items."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",")]
    if isinstance(value, list | tuple) and all(isinstance(item, str) for item in value):
        return [item.strip() for item in value]
    raise _Invalid(f"{what} separated by commas (or a list of strings in the config file)")


_QUEUE_NAME = re.compile(r"[A-Za-z0-9_.:-]+")


def _queues(value: object) -> tuple[str, ...]:
    what = "queue names of A-Z a-z 0-9 _ . : -"
    names = _items(value, what)
    for name in names:
        if not _QUEUE_NAME.fullmatch(name):
            problem = "an empty name" if not name else f"{name!r} has a character outside A-Za-z0-9_.:-"
            raise _Invalid(f"{what}, separated by commas, none twice ({problem})")
        if names.count(name) > 1:
            raise _Invalid(f"{what}, separated by commas, none twice ({name!r} is listed twice)")
    return tuple(names)


def _is_dotted(path: str) -> bool:
    return all(part.isidentifier() and not keyword.iskeyword(part) for part in path.split("."))


def _modules(value: object) -> tuple[str, ...]:
    what = "dotted module names such as myapp.tasks"
    names = _items(value, what)
    for name in names:
        if not _is_dotted(name):
            raise _Invalid(f"{what}, separated by commas ({name!r} is not a dotted module name)")
    return tuple(names)


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


def _dotted_path(what: str) -> Parser:
    """Syntax only: the mold imports the path and checks what it names (`check_classes`), so the
    supervisor stays free of rq and the application."""

    def parse(value: object) -> str:
        path = value.strip() if isinstance(value, str) else ""
        if "." not in path or not _is_dotted(path):
            raise _Invalid(what)
        if path.startswith("rq.") and any(part.startswith("_") for part in path.split(".")):
            raise _Invalid(f"{what}: {path} is private to rq")
        return path

    return parse


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
    return _dotted_path(CLASS_RULES["serializer"][0])(value)


def check_classes(settings: Settings) -> str | None:
    """Import every configured class path and check it is what it must be; one line when not.
    Runs in the mold, after the application import, since most paths name the application's code."""
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


def _redis_url(value: object) -> str:
    """redis-py's URL forms, checked without importing redis-py (it is 17 MB the supervisor avoids)."""
    url = value.strip() if isinstance(value, str) else ""
    allowed = "a redis://, rediss:// or unix:// URL"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise _Invalid(f"{allowed} ({e})") from None
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise _Invalid(f"{allowed} (the scheme is {parts.scheme!r})" if parts.scheme else allowed)
    if parts.scheme == "unix":
        if not parts.path or parts.path == "/":
            raise _Invalid(f"{allowed} (unix:// needs the socket's path: unix:///run/redis.sock)")
    elif port == 0:
        raise _Invalid(f"{allowed} (port 0)")
    else:
        db = parts.path.lstrip("/")
        if db and not db.isdigit():
            raise _Invalid(f"{allowed} (the database {db!r} is not a number)")
    for key, values in parse_qs(parts.query).items():
        if key == "db" and not values[0].isdigit():
            raise _Invalid(f"{allowed} (db={values[0]!r} is not a number)")
    return url


def _text(value: object) -> str:
    """A path: anything but empty (or with a NUL, which no path can hold)."""
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        raise _Invalid("a non-empty path")
    return value.strip()


def _groups(value: object) -> tuple[Group, ...]:
    """`high,default=3; low=1` (or in the config file a dict {queues: size} or a list of pairs)."""
    if isinstance(value, str):
        pairs = []
        for segment in filter(None, (s.strip() for s in value.split(";"))):
            queues, equals, size = segment.rpartition("=")
            pairs.append((segment, queues if equals else None, size))
    elif isinstance(value, dict):
        pairs = [(f"{q!r}: {n!r}", q, n) for q, n in value.items()]
    elif isinstance(value, list | tuple) and all(isinstance(p, list | tuple) and len(p) == 2 for p in value):
        pairs = [(repr(tuple(p)), p[0], p[1]) for p in value]
    else:
        pairs = []
    if not pairs:
        raise _Invalid("groups of QUEUES=SIZE separated by semicolons, such as high,default=3; low=1")
    groups: list[Group] = []
    for number, pair in enumerate(pairs, 1):
        group = _group(number, *pair)
        for earlier, other in enumerate(groups, 1):
            if other.queues == group.queues:
                same = f"the same queues as group {earlier}; merge their sizes"
                raise _Invalid(f"group {number} {pair[0]!r}: {same}")
        groups.append(group)
    return tuple(groups)


def _group(number: int, shown: str, queues: object, size: object) -> Group:
    where = f"group {number} {shown!r}"
    if queues is None:
        raise _Invalid(f"{where}: expected QUEUES=SIZE such as high,default=3")
    try:
        names = _queues(queues)
    except _Invalid as e:
        raise _Invalid(f"{where}: {e}") from None
    try:
        return Group(names, _whole(0, MAX_GROUP_SIZE)(size))
    except _Invalid:
        raise _Invalid(f"{where}: size must be a whole number from 0 to {MAX_GROUP_SIZE}") from None


# ---- the variables of DESIGN.md §2


@dataclass(frozen=True)
class _Var:
    field: str
    parse: Parser
    help: str

    @property
    def env(self) -> str:
        return PREFIX + self.field.upper()

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")


_whole_seconds = _whole(1, allowed="a whole number of seconds >= 1")

VARIABLES = (
    _Var("redis_url", _redis_url, "Redis URL (redis://, rediss://, unix://); also REDIS_URL"),
    _Var("require_redis_url", _boolean, "refuse to start without a Redis URL instead of embedding one"),
    _Var("app", _modules, "dotted module(s), comma-separated, imported by the mold before forking"),
    _Var("concurrency", _whole(0, MAX_GROUP_SIZE), "number of worker slots (default: CPUs of the container)"),
    _Var("queues", _queues, "queue names in priority order, comma-separated (default: default)"),
    _Var("groups", _groups, "worker groups, e.g. 'high,default=3; low=1' (replaces queues + concurrency)"),
    _Var("dequeue_strategy", _choice("default", "round_robin", "random"), "rq dequeue strategy"),
    _Var("worker_class", _dotted_path(CLASS_RULES["worker_class"][0]), "rq worker class"),
    _Var("job_class", _dotted_path(CLASS_RULES["job_class"][0]), "rq job class"),
    _Var("queue_class", _dotted_path(CLASS_RULES["queue_class"][0]), "rq queue class"),
    _Var("serializer", _serializer, "rq serializer: json, pickle or a dotted path"),
    _Var("config", _text, "Python config file: settings as module constants, hooks as functions"),
    _Var("pid_file", _text, "write the supervisor's pid here"),
    _Var("run_dir", _text, "directory of the control socket and status file"),
    _Var("log_level", _choice("DEBUG", "INFO", "WARNING", "ERROR"), "log level"),
    _Var("log_format", _choice("text", "json"), "log format on stderr"),
    _Var("term", _choice("graceful", "quick"), "what SIGTERM means"),
    _Var("drain_timeout", _duration(allow_zero=True), "how long a graceful stop waits for running jobs"),
    _Var("requeue_interrupted", _boolean, "requeue jobs interrupted by a shutdown"),
    _Var("max_jobs", _off(_whole(1)), "recycle a worker after this many jobs"),
    _Var("max_lifetime", _off(_duration(allow_zero=False)), "recycle a worker after this long (with jitter)"),
    _Var("max_memory", _off(_size), "recycle a worker above this private memory (USS), e.g. 512M"),
    _Var("with_scheduler", _boolean, "run rq's scheduler in worker[0]"),
    _Var("worker_ttl", _whole_seconds, "rq worker_ttl"),
    _Var("job_monitoring_interval", _whole_seconds, "rq job_monitoring_interval"),
    _Var("maintenance_interval", _whole_seconds, "rq maintenance_interval"),
    _Var(
        "result_ttl",
        _whole(-1, allowed="a whole number of seconds >= -1 (-1 keeps results forever, 0 keeps none)"),
        "rq default_result_ttl",
    ),
    _Var("max_requeues", _whole(0), "how often one job may be requeued after interruptions"),
    _Var("reload_surge", _whole(1), "extra worker processes allowed during a reload"),
    _Var("refork_after", _off(_whole(1)), "promote a worker to mold after this many jobs"),
    _Var("prefork_horse", _boolean, "fork the next work-horse while waiting for a job"),
    _Var("metrics_port", _off(_whole(1, 65535)), "serve /healthz, /readyz, /metrics on this port"),
)
_BY_FIELD = {var.field: var for var in VARIABLES}


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One string flag per variable; None means "not given", so the environment and file still apply."""
    for var in VARIABLES:
        help_text = f"{var.help} [{var.env}]"
        parser.add_argument(var.flag, dest=var.field, default=None, metavar="VALUE", help=help_text)


# ---- loading


@dataclass(frozen=True)
class _Raw:
    """A value as given, and where: the name the error message shows."""

    label: str
    value: object


def load(flags: Mapping[str, object], environ: Mapping[str, str]) -> Settings:
    """Settings from flags > environment > config file > defaults; ConfigError names the first bad one.

    `flags` is vars(argparse namespace) (None = not given; other keys are ignored). An empty
    environment variable counts as unset, as a compose `${VAR}` of an unset variable yields one.
    """
    config = _pick(_BY_FIELD["config"], flags, environ, {}, "")
    file_values: dict[str, object] = {}
    path, hooks = None, Hooks()
    if config is not None:
        path = _parse(_BY_FIELD["config"], config)
        file_values, hooks = _read_config_file(path, config.label)
    raws = {
        var.field: _pick(var, flags, environ, file_values, path) for var in VARIABLES if var.field != "config"
    }
    values = {field: _parse(_BY_FIELD[field], raw) for field, raw in raws.items() if raw is not None}
    values["config"] = path
    values["groups"] = _groups_of(values, raws)
    if "group_overrides" in file_values:
        assert path is not None
        values["groups"] = _override_groups(values["groups"], file_values["group_overrides"], path)
    values["concurrency"] = sum(group.size for group in values["groups"])
    values["queues"] = values["groups"][0].queues
    if values.get("redis_url") is None and values.get("require_redis_url"):
        required = f"a Redis URL is required since {PREFIX}REQUIRE_REDIS_URL is true"
        raise ConfigError("REDIS_URL", None, required)
    return Settings(**values, hooks=hooks)


def _pick(
    var: _Var,
    flags: Mapping[str, object],
    environ: Mapping[str, str],
    file: Mapping[str, object],
    path: str | None,
) -> _Raw | None:
    if flags.get(var.field) is not None:
        return _Raw(f"{var.env} ({var.flag})", flags[var.field])
    for name in (var.env, "REDIS_URL") if var.field == "redis_url" else (var.env,):
        if environ.get(name):
            return _Raw(name, environ[name])
    if var.field in file:
        return _Raw(f"{var.env} (in {path})", file[var.field])
    return None


def _parse(var: _Var, raw: _Raw) -> Any:
    try:
        return var.parse(raw.value)
    except _Invalid as e:
        shown = mask_url(raw.value) if var.field == "redis_url" and isinstance(raw.value, str) else raw.value
        raise ConfigError(raw.label, shown, str(e)) from None


def _groups_of(values: dict[str, Any], raws: Mapping[str, _Raw | None]) -> tuple[Group, ...]:
    """GROUPS, or the one group QUEUES x CONCURRENCY; setting GROUPS and either of those is ambiguous."""
    groups = raws["groups"]
    if groups is None:
        concurrency = values["concurrency"] if "concurrency" in values else cgroups.cpu_count()
        return (Group(values.get("queues", ("default",)), concurrency),)
    clash = [raw.label for raw in (raws["queues"], raws["concurrency"]) if raw is not None]
    if clash:
        allowed = f"GROUPS replaces QUEUES and CONCURRENCY, but {' and '.join(clash)} is set too"
        raise ConfigError(groups.label, groups.value, allowed)
    return values["groups"]


# Settings a group may set for its own workers (`group_overrides` in the config file).
OVERRIDABLE = ("worker_class", "max_jobs", "max_lifetime", "max_memory")
_OVERRIDES_SHAPE = (
    "a dict of group name to a dict of settings, such as "
    "{'low': {'worker_class': 'rq.SimpleWorker', 'max_jobs': 100}}"
)


def override_label(group: str, setting: str, path: str | None) -> str:
    """How an error names one override: group_overrides['low']['max_jobs'] (in conf.py)."""
    return f"group_overrides[{group!r}][{setting!r}] (in {path})"


def _override_groups(groups: tuple[Group, ...], given: object, path: str) -> tuple[Group, ...]:
    """Attach `group_overrides` to the groups; each key names a group as `ctl status` shows it."""
    label = f"group_overrides (in {path})"
    if not isinstance(given, dict):
        raise ConfigError(label, given, _OVERRIDES_SHAPE)
    index_of = {group.queues: index for index, group in enumerate(groups)}
    overrides: dict[int, tuple[tuple[str, Any], ...]] = {}
    for key, settings in given.items():
        try:
            index = index_of.get(_queues(key))
        except _Invalid:
            index = None
        if index is None:
            raise ConfigError(label, key, "keys are group names: " + "; ".join(g.name for g in groups))
        name = groups[index].name
        if index in overrides:
            raise ConfigError(label, key, f"group {name} is listed twice")
        if not isinstance(settings, dict):
            allowed = "a dict of settings among " + ", ".join(OVERRIDABLE)
            raise ConfigError(f"group_overrides[{name!r}] (in {path})", settings, allowed)
        overrides[index] = tuple(_override(name, setting, value, path) for setting, value in settings.items())
    return tuple(dataclasses.replace(g, overrides=overrides.get(i, ())) for i, g in enumerate(groups))


def _override(group: str, setting: object, value: object, path: str) -> tuple[str, Any]:
    if setting not in OVERRIDABLE:
        allowed = "a group may override " + ", ".join(OVERRIDABLE)
        raise ConfigError(f"group_overrides[{group!r}] (in {path})", setting, allowed)
    assert isinstance(setting, str)
    return setting, _parse(_BY_FIELD[setting], _Raw(override_label(group, setting, path), value))


def _read_config_file(path: str, label: str) -> tuple[dict[str, object], Hooks]:
    """Run the file; take its lowercase settings and hooks, and flag near-misses of their names."""
    namespace = _run_config_file(path, label)
    values: dict[str, object] = {}
    hooks: dict[str, Any] = {}
    known = [*_BY_FIELD, "group_overrides", *HOOK_NAMES]
    for name, value in namespace.items():
        if name.startswith("_") or isinstance(value, types.ModuleType):
            continue
        if name in HOOK_NAMES:
            if not callable(value):
                raise ConfigError(label, path, f"hook {name} must be a function, not {type(value).__name__}")
            hooks[name] = value
        elif name == "config":
            raise ConfigError(label, path, "the config file cannot name another config file")
        elif name in _BY_FIELD or name == "group_overrides":
            if value is not None:
                values[name] = value
        elif name.lower() in known:
            raise ConfigError(label, path, f"settings are lowercase: write {name.lower()} instead of {name}")
        elif name.islower() and (close := _close_match(name, known)):
            raise ConfigError(label, path, f"{name} is not a setting or hook; did you mean {close}?")
    return values, Hooks(**hooks)


def _close_match(name: str, known: list[str]) -> str | None:
    import difflib  # only for names a config file defines that are not settings (the supervisor's memory)

    close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
    return close[0] if close else None


def _run_config_file(path: str, label: str) -> dict[str, Any]:
    import runpy  # only with a config file (the supervisor's memory)

    if os.path.isdir(path):
        raise ConfigError(label, path, "a Python config file, not a directory")
    try:
        return runpy.run_path(path)
    except OSError as e:
        problem = f"a readable Python file ({e.strerror or e})"
    except SyntaxError as e:
        problem = f"a valid Python file (SyntaxError at line {e.lineno}: {e.msg})"
    except (Exception, SystemExit) as e:
        problem = f"a Python file that runs (it raised {type(e).__name__}: {e})"
    raise ConfigError(label, path, problem)


def mask_url(url: str) -> str:
    """Hide the password of a Redis URL (userinfo or ?password=) for logs and `ctl status`."""
    scheme, sep, rest = url.partition("://")
    if sep:
        userinfo, at, host = rest.rpartition("@")
        if at and ":" in userinfo:
            rest = f"{userinfo.partition(':')[0]}:***@{host}"
    return scheme + sep + re.sub(r"(?<=[?&])password=[^&#]*", "password=***", rest)
