"""The configuration loader: the rules of docs/configuration.md, each a row of a table, and property tests."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resque_starter import cgroups, config
from resque_starter.config import ConfigError, Group, Settings
from resque_starter.loader import load

P = "RESQUE_STARTER_"
AVAILABLE = len(os.sched_getaffinity(0))


def env_load(**variables: str) -> Settings:
    """load() from environment variables named without the prefix (REDIS_URL keeps its own name)."""
    return load({}, {(k if k == "REDIS_URL" else P + k): v for k, v in variables.items()})


def flag_load(**flags: str) -> Settings:
    return load(flags, {})


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def assert_one_line(error: ConfigError, *fragments: str) -> None:
    message = str(error)
    assert len(message.splitlines()) == 1, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


# ---- good values: (variable, text, field, parsed value)

GOOD = [
    ("CONCURRENCY", "0", "concurrency", 0),
    ("CONCURRENCY", " 7 ", "concurrency", 7),
    ("MAX_REQUEUES", "0", "max_requeues", 0),
    ("RELOAD_SURGE", "2", "reload_surge", 2),
    ("MAX_JOBS", "1", "max_jobs", 1),
    ("MAX_JOBS", "off", "max_jobs", None),
    ("REFORK_AFTER", "100", "refork_after", 100),
    ("WORKER_TTL", "420", "worker_ttl", 420),
    ("JOB_MONITORING_INTERVAL", "30", "job_monitoring_interval", 30),
    ("MAINTENANCE_INTERVAL", "600", "maintenance_interval", 600),
    ("RESULT_TTL", "-1", "result_ttl", -1),
    ("RESULT_TTL", "0", "result_ttl", 0),
    ("RESULT_TTL", "500", "result_ttl", 500),
    ("METRICS_PORT", "1", "metrics_port", 1),
    ("METRICS_PORT", "65535", "metrics_port", 65535),
    ("METRICS_PORT", "OFF", "metrics_port", None),
    *[("WITH_SCHEDULER", word, "with_scheduler", True) for word in ("true", "TRUE", "1", "yes", "On")],
    *[("WITH_SCHEDULER", word, "with_scheduler", False) for word in ("false", "False", "0", "no", "OFF")],
    ("REQUIRE_REDIS_URL", "no", "require_redis_url", False),
    ("REQUEUE_INTERRUPTED", "false", "requeue_interrupted", False),
    ("PREFORK_HORSE", "yes", "prefork_horse", True),
    ("DRAIN_TIMEOUT", "90", "drain_timeout", 90.0),
    ("DRAIN_TIMEOUT", "90s", "drain_timeout", 90.0),
    ("DRAIN_TIMEOUT", "1.5m", "drain_timeout", 90.0),
    ("DRAIN_TIMEOUT", "0", "drain_timeout", 0.0),
    ("DRAIN_TIMEOUT", "2.5", "drain_timeout", 2.5),
    ("MAX_LIFETIME", "15m", "max_lifetime", 900.0),
    ("MAX_LIFETIME", "2h", "max_lifetime", 7200.0),
    ("MAX_LIFETIME", "2H", "max_lifetime", 7200.0),
    ("MAX_MEMORY", "512M", "max_memory", 512 << 20),
    ("MAX_MEMORY", "512MB", "max_memory", 512 << 20),
    ("MAX_MEMORY", "512Mi", "max_memory", 512 << 20),
    ("MAX_MEMORY", "512mib", "max_memory", 512 << 20),
    ("MAX_MEMORY", "1G", "max_memory", 1 << 30),
    ("MAX_MEMORY", "1.5G", "max_memory", 3 << 29),
    ("MAX_MEMORY", "1024K", "max_memory", 1 << 20),
    ("MAX_MEMORY", "1048576", "max_memory", 1 << 20),
    ("MAX_MEMORY", "off", "max_memory", None),
    ("DEQUEUE_STRATEGY", "round_robin", "dequeue_strategy", "round_robin"),
    ("DEQUEUE_STRATEGY", "RANDOM", "dequeue_strategy", "random"),
    ("TERM", "quick", "term", "quick"),
    ("LOG_LEVEL", "debug", "log_level", "DEBUG"),
    ("LOG_LEVEL", "Warning", "log_level", "WARNING"),
    ("LOG_FORMAT", "JSON", "log_format", "json"),
    ("QUEUES", "high,default", "queues", ("high", "default")),
    ("QUEUES", " high , low ", "queues", ("high", "low")),
    ("QUEUES", "a.b:c-d_E9", "queues", ("a.b:c-d_E9",)),
    ("APP", "myapp.tasks", "app", ("myapp.tasks",)),
    ("APP", "a, b.c,_d.e2", "app", ("a", "b.c", "_d.e2")),
    ("WORKER_CLASS", "rq.Worker", "worker_class", "rq.Worker"),
    ("WORKER_CLASS", "rq.SimpleWorker", "worker_class", "rq.SimpleWorker"),
    ("WORKER_CLASS", "rq.worker.RoundRobinWorker", "worker_class", "rq.worker.RoundRobinWorker"),
    ("WORKER_CLASS", "myapp.workers.Mine", "worker_class", "myapp.workers.Mine"),
    ("JOB_CLASS", "rq.job.Job", "job_class", "rq.job.Job"),
    ("QUEUE_CLASS", "rq.Queue", "queue_class", "rq.Queue"),
    ("SERIALIZER", "rq.serializers.JSONSerializer", "serializer", "rq.serializers.JSONSerializer"),
    ("SERIALIZER", "json", "serializer", "json"),
    ("SERIALIZER", "pickle", "serializer", "pickle"),
    ("SERIALIZER", "myapp.codec.Msgpack", "serializer", "myapp.codec.Msgpack"),
    ("REDIS_URL", "redis://127.0.0.1:6379/0", "redis_url", "redis://127.0.0.1:6379/0"),
    ("REDIS_URL", "rediss://:pw@127.0.0.1:6380", "redis_url", "rediss://:pw@127.0.0.1:6380"),
    ("REDIS_URL", "unix:///run/redis.sock?db=1", "redis_url", "unix:///run/redis.sock?db=1"),
    ("RUN_DIR", "/run/rs", "run_dir", "/run/rs"),
    ("PID_FILE", "/run/rs.pid", "pid_file", "/run/rs.pid"),
]


@pytest.mark.parametrize(("variable", "text", "field", "expected"), GOOD)
def test_good_values_from_environment_and_flags(
    variable: str, text: str, field: str, expected: object
) -> None:
    assert getattr(env_load(**{variable: text}), field) == expected
    assert getattr(flag_load(**{field: text}), field) == expected


# ---- bad values: (variable, text, fragment of the allowed text)

WHOLE = "a whole number"
DURATION = "a duration"
SIZE = "a size over 0 and at most 64T"
BOOL = "true or false"
QUEUE = "queue names"
URL = "a redis://, rediss://, unix://, redis+sentinel:// or rediss+sentinel:// URL"

BAD = [
    ("CONCURRENCY", "-1", f"{WHOLE} from 0 to 1024"),
    ("CONCURRENCY", "1025", f"{WHOLE} from 0 to 1024"),
    ("CONCURRENCY", "x", f"{WHOLE} from 0 to 1024"),
    ("CONCURRENCY", "1.5", f"{WHOLE} from 0 to 1024"),
    ("CONCURRENCY", "\u0664", f"{WHOLE} from 0 to 1024"),  # an Arabic-Indic 4: int() takes it, we don't
    ("MAX_REQUEUES", "-1", f"{WHOLE} from 0 to 1000"),
    ("MAX_REQUEUES", "1001", f"{WHOLE} from 0 to 1000"),
    ("RELOAD_SURGE", "0", f"{WHOLE} from 1 to 1024"),
    ("RELOAD_SURGE", "1025", f"{WHOLE} from 1 to 1024"),
    ("MAX_JOBS", "0", f"{WHOLE} from 1 to 1000000000, or off"),
    ("MAX_JOBS", "1000000001", f"{WHOLE} from 1 to 1000000000, or off"),
    ("REFORK_AFTER", "0", f"{WHOLE} from 1 to 1000000000, or off"),
    ("REFORK_AFTER", "1000000001", f"{WHOLE} from 1 to 1000000000, or off"),
    ("WORKER_TTL", "0", "seconds from 1 to 86400"),
    ("WORKER_TTL", "100000000000000000", "seconds from 1 to 86400"),
    ("JOB_MONITORING_INTERVAL", "-5", "seconds from 1 to 86400"),
    ("JOB_MONITORING_INTERVAL", "86401", "seconds from 1 to 86400"),
    ("MAINTENANCE_INTERVAL", "10m", "seconds from 1 to 86400"),
    ("MAINTENANCE_INTERVAL", "86401", "seconds from 1 to 86400"),
    ("RESULT_TTL", "-2", "-1 keeps results forever"),
    ("RESULT_TTL", "100000000000000000", "from -1 to 315360000"),
    ("METRICS_PORT", "0", f"{WHOLE} from 1 to 65535"),
    ("METRICS_PORT", "65536", f"{WHOLE} from 1 to 65535"),
    ("WITH_SCHEDULER", "2", BOOL),
    ("WITH_SCHEDULER", "y", BOOL),
    ("PREFORK_HORSE", "truee", BOOL),
    ("REQUIRE_REDIS_URL", "enabled", BOOL),
    ("DRAIN_TIMEOUT", "-1", f"{DURATION} from 0 to 24h"),
    ("DRAIN_TIMEOUT", "600h", f"{DURATION} from 0 to 24h"),
    ("DRAIN_TIMEOUT", "86401", f"{DURATION} from 0 to 24h"),
    ("DRAIN_TIMEOUT", "1e3", f"{DURATION} from 0 to 24h"),
    ("DRAIN_TIMEOUT", "5d", f"{DURATION} from 0 to 24h"),
    ("DRAIN_TIMEOUT", "inf", f"{DURATION} from 0 to 24h"),
    ("MAX_LIFETIME", "0", f"{DURATION} over 0 and at most 720h"),
    ("MAX_LIFETIME", "721h", f"{DURATION} over 0 and at most 720h"),
    ("MAX_LIFETIME", "m", f"{DURATION} over 0 and at most 720h"),
    ("MAX_MEMORY", "0", SIZE),
    ("MAX_MEMORY", "65T", SIZE),
    ("MAX_MEMORY", "512X", SIZE),
    ("MAX_MEMORY", "-1M", SIZE),
    ("MAX_MEMORY", "M", SIZE),
    ("MAX_MEMORY", "0.0001K", SIZE),
    ("DEQUEUE_STRATEGY", "roundrobin", "one of default, round_robin, random"),
    ("TERM", "hard", "one of graceful, quick"),
    ("LOG_LEVEL", "WARN", "one of DEBUG, INFO, WARNING, ERROR"),
    ("LOG_LEVEL", "CRITICAL", "one of DEBUG, INFO, WARNING, ERROR"),
    ("LOG_FORMAT", "xml", "one of text, json"),
    ("QUEUES", "my queue", "'my queue' has a character outside"),
    ("QUEUES", "a,,b", "an empty name"),
    ("QUEUES", "a,", "an empty name"),
    ("QUEUES", "a,b,a", "'a' is listed twice"),
    ("QUEUES", "caf\u00e9", "has a character outside"),
    ("APP", "my-app", "'my-app' is not a dotted module name"),
    ("APP", "1app", "is not a dotted module name"),
    ("APP", "a..b", "is not a dotted module name"),
    ("APP", "myapp.class", "is not a dotted module name"),
    ("APP", "a,", "'' is not a dotted module name"),
    ("WORKER_CLASS", "Worker", "dotted path of a rq.worker.BaseWorker subclass"),
    ("WORKER_CLASS", "rq..Worker", "dotted path"),
    ("WORKER_CLASS", "rq.worker._signames", "private to rq"),
    ("SERIALIZER", "yaml", "json, pickle, or the dotted path"),
    ("REDIS_URL", "http://127.0.0.1", URL),
    ("REDIS_URL", "127.0.0.1:6379", URL),
    ("REDIS_URL", "redis://127.0.0.1:99999", "a port is a number from 1 to 65535"),
    ("REDIS_URL", "unix://", "unix:// takes the socket's path"),
    ("RUN_DIR", "   ", "a non-empty path"),
    ("RUN_DIR", "/" + "r" * 94, "a non-empty path of at most 94 bytes"),
    ("PID_FILE", "/" + "p" * 4096, "a non-empty path of at most 4096 bytes"),
    ("CONFIG_TIMEOUT", "0", f"{DURATION} over 0 and at most 5m"),
    ("CONFIG_TIMEOUT", "301", f"{DURATION} over 0 and at most 5m"),
    ("QUEUES", ",".join(f"q{i}" for i in range(65)), "at most 64 of them (65 are given)"),
    ("QUEUES", "q" * 256, "is longer than 255 characters"),
    ("APP", "a." * 128 + "b", "is not a dotted module name"),
    ("PATH", ":".join(f"/d{i}" for i in range(65)), "at most 64 of them"),
    ("PID_FILE", "a\0b", "a non-empty path"),
    ("GROUPS", "low", "group 1 'low': expected QUEUES=SIZE"),
    ("GROUPS", "high=1; low=x", "group 2 'low=x': size must be a whole number from 0 to 1024"),
    ("GROUPS", "high=1; low=-1", "group 2 'low=-1': size must be"),
    ("GROUPS", "high=1; low=1025", "group 2 'low=1025': size must be a whole number from 0 to 1024"),
    ("GROUPS", "a=1; b b=2", "group 2 'b b=2': queue names"),
    ("GROUPS", "a,a=1", "group 1 'a,a=1': queue names"),
    ("GROUPS", "=3", "group 1 '=3': queue names"),
    ("GROUPS", " ; ", "groups of QUEUES=SIZE separated by semicolons"),
    ("GROUPS", "high=1; low=3:1", "group 2 'low=3:1': size must be a whole number from 0 to 1024, or MIN:"),
    ("GROUPS", "low=0:0", "group 1 'low=0:0': size must be"),
]


@pytest.mark.parametrize(("variable", "text", "allowed"), BAD)
def test_bad_environment_value_is_one_line_naming_variable_value_and_allowed(
    variable: str, text: str, allowed: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        env_load(**{variable: text})
    name = variable if variable == "REDIS_URL" else P + variable
    assert_one_line(caught.value, f"{name}={text!r} is not allowed: ", allowed)


@pytest.mark.parametrize(("variable", "text", "allowed"), BAD)
def test_bad_flag_value_names_the_flag(variable: str, text: str, allowed: str) -> None:
    field = variable.lower()
    flag = "--" + field.replace("_", "-")
    with pytest.raises(ConfigError) as caught:
        flag_load(**{field: text})
    assert_one_line(caught.value, f"{P}{variable} ({flag})={text!r} is not allowed: ", allowed)


@pytest.mark.parametrize(
    "field", ["queues", "app", "run_dir", "pid_file", "config", "redis_url", "concurrency"]
)
def test_empty_flag_is_an_error(field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        flag_load(**{field: ""})
    assert_one_line(caught.value, f"(--{field.replace('_', '-')})=''")


def test_empty_environment_variable_counts_as_unset() -> None:
    assert env_load(QUEUES="", CONCURRENCY="", PID_FILE="", REDIS_URL="") == env_load()
    fallback = "redis://127.0.0.1/3"
    assert load({}, {P + "REDIS_URL": "", "REDIS_URL": fallback}).redis_url == fallback


# ---- defaults and precedence


def test_defaults() -> None:
    settings = load({}, {})
    assert settings.concurrency == cgroups.cpu_count()
    assert settings.groups == (Group(("default",), cgroups.cpu_count()),)
    assert settings.queues == ("default",)
    assert settings.redis_url is None
    assert settings.config is None
    default = Settings()
    for name in (
        "worker_class",
        "run_dir",
        "log_level",
        "log_format",
        "term",
        "drain_timeout",
        "max_requeues",
    ):
        assert getattr(settings, name) == getattr(default, name)


@pytest.mark.parametrize(
    ("field", "in_file", "in_env", "in_flag", "expected"),
    [
        ("concurrency", "3", "4", "5", (3, 4, 5)),
        ("log_level", "'debug'", "error", "warning", ("DEBUG", "ERROR", "WARNING")),
        ("drain_timeout", "10", "1m", "2h", (10.0, 60.0, 7200.0)),
        ("queues", "['a', 'b']", "c", "d,e", (("a", "b"), ("c",), ("d", "e"))),
        ("with_scheduler", "True", "no", "yes", (True, False, True)),
        (
            "redis_url",
            "'redis://h/1'",
            "redis://h/2",
            "redis://h/3",
            ("redis://h/1", "redis://h/2", "redis://h/3"),
        ),
    ],
)
def test_precedence_flag_over_environment_over_file_over_default(
    tmp_path: Path, field: str, in_file: str, in_env: str, in_flag: str, expected: tuple[object, ...]
) -> None:
    path = write(tmp_path / "conf.py", f"{field} = {in_file}\n")
    env = {P + "CONFIG": path}
    from_file = load({}, env)
    from_env = load({}, {**env, P + field.upper(): in_env})
    from_flag = load({field: in_flag}, {**env, P + field.upper(): in_env})
    default = load({}, {})
    assert tuple(getattr(s, field) for s in (from_file, from_env, from_flag)) == expected
    assert getattr(default, field) != expected[0]


def test_config_flag_wins_over_config_environment(tmp_path: Path) -> None:
    by_env = write(tmp_path / "env.py", "concurrency = 1\n")
    by_flag = write(tmp_path / "flag.py", "concurrency = 2\n")
    settings = load({"config": by_flag}, {P + "CONFIG": by_env})
    assert (settings.concurrency, settings.config) == (2, by_flag)


def test_resque_starter_redis_url_wins_over_redis_url() -> None:
    ours, theirs = "redis://127.0.0.1/1", "redis://127.0.0.1/2"
    assert env_load(REDIS_URL=theirs).redis_url == theirs
    assert load({}, {"REDIS_URL": theirs, P + "REDIS_URL": ours}).redis_url == ours
    assert load({"redis_url": "unix:///r.sock"}, {"REDIS_URL": theirs, P + "REDIS_URL": ours}).redis_url == (
        "unix:///r.sock"
    )


def test_required_redis_url_missing_is_an_error_on_redis_url() -> None:
    with pytest.raises(ConfigError) as caught:
        env_load(REQUIRE_REDIS_URL="1")
    assert_one_line(caught.value, "REDIS_URL is not set", "required", f"{P}REQUIRE_REDIS_URL")
    assert caught.value.variable == "REDIS_URL"
    assert env_load(REQUIRE_REDIS_URL="1", REDIS_URL="redis://127.0.0.1").redis_url == "redis://127.0.0.1"


def test_unknown_flag_keys_are_ignored() -> None:
    assert load({"command": "run", "json": True, "concurrency": None}, {}) == load({}, {})


# ---- groups


def test_groups_replace_queues_and_concurrency() -> None:
    settings = env_load(GROUPS="high,default=3; low=1; reports=0")
    assert settings.groups == (Group(("high", "default"), 3), Group(("low",), 1), Group(("reports",), 0))
    assert settings.concurrency == 4
    assert settings.queues == ("high", "default")


def test_a_min_max_size_autoscales_a_group_from_min() -> None:
    settings = env_load(GROUPS="high=2; low=1:8")
    assert settings.groups == (Group(("high",), 2), Group(("low",), 1, window=(1, 8)))
    one = Group(("a",), cgroups.cpu_count(), window=(2, 4))
    assert env_load(AUTOSCALE="2:4", QUEUES="a").groups == (one,)
    assert env_load(AUTOSCALE="2:4", GROUPS="a=1; b=0:3").groups[0].window == (2, 4)


def test_autoscale_and_a_window_for_the_first_group_in_groups_is_an_error() -> None:
    with pytest.raises(ConfigError) as caught:
        env_load(AUTOSCALE="1:4", GROUPS="a=1:2; b=1")
    assert_one_line(caught.value, f"{P}AUTOSCALE='1:4'", "GROUPS gives it one too (a)")


def test_a_queue_may_serve_two_groups() -> None:
    settings = env_load(GROUPS="high,default=2;default=1;")
    assert [g.queues for g in settings.groups] == [("high", "default"), ("default",)]


def test_without_groups_one_group_of_queues_and_concurrency() -> None:
    assert env_load(QUEUES="a,b", CONCURRENCY="3").groups == (Group(("a", "b"), 3),)


@pytest.mark.parametrize("other", ["QUEUES", "CONCURRENCY"])
def test_groups_with_queues_or_concurrency_is_an_error(other: str) -> None:
    with pytest.raises(ConfigError) as caught:
        env_load(GROUPS="a=1", **{other: "1"})
    assert_one_line(caught.value, f"{P}GROUPS='a=1'", "replaces QUEUES and CONCURRENCY", f"{P}{other} is set")


def test_groups_in_environment_clash_with_concurrency_in_file(tmp_path: Path) -> None:
    path = write(tmp_path / "c.py", "concurrency = 2\n")
    with pytest.raises(ConfigError) as caught:
        env_load(GROUPS="a=1", CONFIG=path)
    assert_one_line(caught.value, f"{P}CONCURRENCY (in {path}) is set")


@pytest.mark.parametrize(
    "native",
    ['{"high,default": 3, ("low",): "1"}', '[("high,default", 3), (["low"], 1)]', '"high,default=3; low=1"'],
)
def test_groups_in_config_file_as_dict_pairs_or_text(tmp_path: Path, native: str) -> None:
    settings = env_load(CONFIG=write(tmp_path / "c.py", f"groups = {native}\n"))
    assert settings.groups == (Group(("high", "default"), 3), Group(("low",), 1))


def test_bad_native_group_in_config_file(tmp_path: Path) -> None:
    path = write(tmp_path / "c.py", 'groups = {"a": 1, "b": 2.5}\n')
    with pytest.raises(ConfigError) as caught:
        env_load(CONFIG=path)
    assert_one_line(caught.value, f"{P}GROUPS (in {path})=", "group 2 \"'b': 2.5\": size must be")


# ---- the config file


def test_config_file_native_values_strings_hooks_and_ignored_names(tmp_path: Path) -> None:
    path = write(
        tmp_path / "conf.py",
        """
import os
from math import ceil
from collections import OrderedDict

TIMEOUT = 5
concurrency = ceil(3.5)
queues = ["high", "default"]
drain_timeout = 10
max_lifetime = "15m"
max_memory = 1024
with_scheduler = True
metrics_port = None
app = ("myapp.tasks",)

def helper():
    return os.getpid()

def before_fork(settings):
    return "before_fork", settings

def warmup(settings):
    return "warmup"

def after_fork(worker, slot):
    return ("after_fork", slot)

def before_exit(settings):
    return "before_exit"
""",
    )
    settings = env_load(CONFIG=path)
    assert settings.concurrency == 4
    assert settings.queues == ("high", "default")
    assert settings.drain_timeout == 10.0
    assert settings.max_lifetime == 900.0
    assert settings.max_memory == 1024
    assert settings.with_scheduler is True
    assert settings.metrics_port is None
    assert settings.app == ("myapp.tasks",)
    assert settings.config == path
    assert settings.hooks.before_fork(settings) == ("before_fork", settings)
    assert settings.hooks.warmup(settings) == "warmup"
    assert settings.hooks.after_fork(None, 7) == ("after_fork", 7)
    assert settings.hooks.before_exit(settings) == "before_exit"


@pytest.mark.parametrize(
    ("text", "allowed"),
    [
        ("concurency = 4\n", "concurency is not a setting or hook; did you mean concurrency?"),
        ("queue = 'a'\n", "did you mean queues?"),
        ("def before_forks(s): pass\n", "did you mean before_fork?"),
        ("CONCURRENCY = 4\n", "settings are lowercase: write concurrency instead of CONCURRENCY"),
        ("after_fork = 3\n", "hook after_fork must be a function, not int"),
        ("config = 'other.py'\n", "cannot name another config file"),
        (
            "config_timeout = 60\n",
            "config_timeout is set by RESQUE_STARTER_CONFIG_TIMEOUT or --config-timeout only",
        ),
        ("def before_exit(s): pass\nbefore_exit = 1\n", "hook before_exit must be a function, not int"),
        ("x = (\n", "SyntaxError at line 1"),
        ("raise RuntimeError('boom\\nagain')\n", "it raised RuntimeError: boom again"),
        ("import sys\nsys.exit(3)\n", "it raised SystemExit: 3"),
        ("import no_such_module_here\n", "it raised ModuleNotFoundError"),
    ],
)
def test_bad_config_file(tmp_path: Path, text: str, allowed: str) -> None:
    path = write(tmp_path / "conf.py", text)
    with pytest.raises(ConfigError) as caught:
        env_load(CONFIG=path)
    assert_one_line(caught.value, f"{P}CONFIG={path!r} is not allowed: ", allowed)


def test_bad_value_in_config_file_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "conf.py", "concurrency = -2\n")
    with pytest.raises(ConfigError) as caught:
        env_load(CONFIG=path)
    assert_one_line(
        caught.value, f"{P}CONCURRENCY (in {path})=-2 is not allowed: a whole number from 0 to 1024"
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("concurrency", "True"),
        ("drain_timeout", "float('nan')"),
        ("drain_timeout", "10**400"),
        ("max_lifetime", "'1' * 400"),
        ("with_scheduler", "1"),
        ("queues", "[1, 2]"),
        ("max_memory", "1.5"),
        ("log_level", "10"),
        ("queues", "[object()]"),
        ("concurrency", "__import__('decimal').Decimal(3)"),
        ("groups", "{'a': lambda: 1}"),
    ],
)
def test_wrong_native_types_in_config_file(tmp_path: Path, field: str, value: str) -> None:
    path = write(tmp_path / "conf.py", f"{field} = {value}\n")
    with pytest.raises(ConfigError) as caught:
        env_load(CONFIG=path)
    assert_one_line(caught.value, f"{P}{field.upper()} (in {path})=")


def test_missing_directory_and_unreadable_config_file(tmp_path: Path) -> None:
    loop = tmp_path / "loop.py"
    loop.symlink_to(loop)
    cases = [
        (str(tmp_path / "missing.py"), "No such file or directory"),
        (str(tmp_path), "not a directory"),
        (str(loop), "a readable Python file (Too many levels of symbolic links)"),
    ]
    for path, allowed in cases:
        with pytest.raises(ConfigError) as caught:
            env_load(CONFIG=path)
        assert_one_line(caught.value, f"{P}CONFIG={path!r}", allowed)
        with pytest.raises(ConfigError) as caught:
            flag_load(config=path)
        assert_one_line(caught.value, f"{P}CONFIG (--config)={path!r}", allowed)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_config_file_without_read_permission(tmp_path: Path) -> None:
    path = tmp_path / "conf.py"
    path.write_text("concurrency = 1\n")
    path.chmod(0)
    with pytest.raises(ConfigError) as caught:
        env_load(CONFIG=str(path))
    assert_one_line(caught.value, "Permission denied")


def test_the_supervisor_never_imports_application_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "userapp_never_imported.py").write_text("raise SystemExit('imported!')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    name = "userapp_never_imported"
    settings = env_load(
        APP=name,
        WORKER_CLASS=f"{name}.W",
        JOB_CLASS=f"{name}.J",
        QUEUE_CLASS=f"{name}.Q",
        SERIALIZER=f"{name}.S",
    )
    assert settings.worker_class == f"{name}.W"
    assert name not in sys.modules


@pytest.mark.parametrize(
    ("variable", "path", "allowed"),
    [
        ("WORKER_CLASS", "rq.NoSuchWorker", "cannot import it"),
        ("WORKER_CLASS", "rq.nosuch.Worker", "cannot import it"),
        (
            "WORKER_CLASS",
            "rq.Queue",
            "rq.worker.BaseWorker subclass, such as rq.SimpleWorker (it is not one)",
        ),
        ("JOB_CLASS", "rq.Worker", "rq.job.Job subclass"),
        ("QUEUE_CLASS", "rq.job.Job", "rq.queue.Queue subclass"),
        ("SERIALIZER", "rq.Worker", "dumps() and loads()"),
    ],
)
def test_check_classes_imports_and_checks_what_a_path_names(variable: str, path: str, allowed: str) -> None:
    """The mold runs this after the app import; the supervisor's loader only checks the syntax."""
    settings = env_load(**{variable: path})
    error = config.check_classes(settings)
    assert error is not None and "\n" not in error
    assert error.startswith(f"RESQUE_STARTER_{variable}={path!r} is not allowed: ") and allowed in error


def test_check_classes_accepts_rq_names_and_aliases() -> None:
    settings = env_load(
        WORKER_CLASS="rq.worker.RoundRobinWorker",
        JOB_CLASS="rq.job.Job",
        QUEUE_CLASS="rq.Queue",
        SERIALIZER="json",
    )
    assert config.check_classes(settings) is None


def test_the_loader_imports_neither_rq_nor_redis_py_nor_what_only_some_supervisors_use() -> None:
    """rq and redis-py are 17+ MB a process: the supervisor stays small; the mold loads them for the
    workers. What only some supervisors use (the metrics endpoint and prometheus_client, the embedded
    Redis, a config file's runner, a config error's suggestions) is imported when used: every page the
    supervisor holds is copied by the molds it forks."""
    code = (
        "import sys, os\n"
        "from resque_starter import loader, supervisor, cli\n"
        "env = {'REDIS_URL': 'rediss://:pw@127.0.0.1:6390/1', 'RESQUE_STARTER_WORKER_CLASS': 'rq.Worker'}\n"
        "loader.load({}, env)\n"
        "lazy = ('rq', 'redis', 'prometheus_client', 'difflib', 'pickle', 'ctypes')\n"
        "ours = ('resque_starter.metrics', 'resque_starter.embedded_redis')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in lazy or m in ours))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---- flags


def test_add_flags_one_string_flag_per_setting() -> None:
    parser = argparse.ArgumentParser()
    config.add_flags(parser)
    everything = {f.name for f in dataclasses.fields(Settings)} - {"hooks"}
    assert {var.name for var in config.SETTINGS} == everything
    defaults = vars(parser.parse_args([]))
    assert defaults == dict.fromkeys(everything)
    args = parser.parse_args(
        [
            "--with-scheduler",
            "true",
            "--redis-url",
            "redis://127.0.0.1",
            "--drain-timeout",
            "5s",
            "--concurrency",
            "2",
            "--job-monitoring-interval",
            "9",
        ]
    )
    settings = load(vars(args), {})
    assert settings.with_scheduler is True
    assert (settings.redis_url, settings.drain_timeout, settings.concurrency) == ("redis://127.0.0.1", 5.0, 2)
    assert settings.job_monitoring_interval == 9


def test_boolean_flags_alone_mean_true_and_still_take_a_value() -> None:
    parser = argparse.ArgumentParser()
    config.add_flags(parser)
    booleans = [s for s in config.SETTINGS if s.kind.boolean]
    assert {s.name for s in booleans} >= {"with_scheduler", "prefork_horse", "require_redis_url"}
    for s in booleans:
        alone = load(vars(parser.parse_args([s.flag])), {"REDIS_URL": "redis://127.0.0.1"})
        assert getattr(alone, s.name) is True, s.flag
        for text, expected in (("false", False), ("true", True)):
            args = vars(parser.parse_args([f"{s.flag}={text}"]))
            assert getattr(load(args, {"REDIS_URL": "redis://127.0.0.1"}), s.name) is expected


def test_settings_type_matches_the_declarations() -> None:
    """One declaration per setting: the Settings fields and defaults are the declared ones, in order."""
    declared = [s.name for s in config.SETTINGS]
    assert len(set(declared)) == len(declared)
    assert set(declared) == {f.name for f in dataclasses.fields(Settings)} - {"hooks"}
    for s in config.SETTINGS:
        assert getattr(Settings(), s.name) == s.default, s.name
        assert s.kind.allowed and s.doc and s.section, s.name


def test_every_declared_default_is_a_value_its_kind_accepts() -> None:
    """The default, written as a flag would give it, parses back to itself (computed defaults aside)."""
    for s in config.SETTINGS:
        if s.default in (None, ()) or s.name == "groups":
            continue
        assert s.kind(s.kind.show(s.default)) == s.default, s.name


def test_the_settings_table_in_the_docs_is_generated_from_the_declarations() -> None:
    """docs/configuration.md holds the table `python -m resque_starter.settings_doc` writes; regenerate
    it when a declaration changes."""
    from resque_starter import settings_doc

    page = settings_doc.PAGE.read_text()
    assert settings_doc.render(page) == page, "run python -m resque_starter.settings_doc"
    for s in config.SETTINGS:
        assert f"`{s.env}`<br>`{s.flag}`" in page
        assert s.kind.allowed.replace("|", "\\|") in page
    check = subprocess.run(
        [sys.executable, "-m", "resque_starter.settings_doc", "--check"], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr


def test_every_flag_is_named_after_its_variable() -> None:
    parser = argparse.ArgumentParser()
    config.add_flags(parser)
    squeezed_help = "".join(parser.format_help().split())
    for var in config.SETTINGS:
        flag = "--" + var.env.removeprefix(P).lower().replace("_", "-")
        assert getattr(parser.parse_args([flag, "v"]), var.name) == "v"
        assert var.env in squeezed_help


# ---- cgroups


def cgroup(tmp: Path, files: dict[str, str], own: str = "0::/") -> tuple[str, str]:
    """A fake /sys/fs/cgroup holding `files`, and a fake /proc/self/cgroup saying where we are in it."""
    root = tmp / "sys"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text + "\n")
    root.mkdir(exist_ok=True)
    (tmp / "proc").write_text(own + "\n")
    return str(root), str(tmp / "proc")


@pytest.mark.parametrize(
    ("files", "cpus"),
    [
        ({"cpu.max": "200000 100000"}, 2),
        ({"cpu.max": "150000 100000"}, 2),
        ({"cpu.max": "50000 100000"}, 1),
        ({"cpu.max": "1000 100000"}, 1),
        ({"cpu.max": "6400000 100000"}, 64),
        ({"cpu.max": "max 100000"}, None),
        ({"cpu.max": "garbage"}, None),
        ({"cpu/cpu.cfs_quota_us": "300000", "cpu/cpu.cfs_period_us": "100000"}, 3),
        ({"cpu,cpuacct/cpu.cfs_quota_us": "100000", "cpu,cpuacct/cpu.cfs_period_us": "100000"}, 1),
        ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),
        ({"cpu/cpu.cfs_quota_us": "100000", "cpu/cpu.cfs_period_us": "0"}, None),
        ({}, None),
    ],
)
def test_cpu_count_from_cgroup(tmp_path: Path, files: dict[str, str], cpus: int | None) -> None:
    root, proc = cgroup(tmp_path, files)
    assert cgroups.cpu_count(root, proc) == (AVAILABLE if cpus is None else min(cpus, AVAILABLE))
    if cpus is not None:
        assert math.ceil(cgroups.cpu_quota(root, proc) or 0) == cpus


@pytest.mark.parametrize(
    ("files", "limit"),
    [
        ({"memory.max": "536870912"}, 512 << 20),
        ({"memory.max": "max"}, None),
        ({"memory/memory.limit_in_bytes": "1073741824"}, 1 << 30),
        ({"memory/memory.limit_in_bytes": "9223372036854771712"}, None),
        ({}, None),
    ],
)
def test_memory_limit_from_cgroup(tmp_path: Path, files: dict[str, str], limit: int | None) -> None:
    assert cgroups.memory_limit(*cgroup(tmp_path, files)) == limit


NESTED_V2 = "0::/system.slice/jobs.service"
NESTED_V1 = "12:cpu,cpuacct:/jobs\n4:memory:/jobs\n1:name=systemd:/jobs"


@pytest.mark.parametrize(
    ("own", "files", "limit"),
    [
        # a systemd service (or a container without a cgroup namespace): its own cgroup sits deeper
        (NESTED_V2, {"memory.max": "max", "system.slice/jobs.service/memory.max": "268435456"}, 256 << 20),
        # the least limit along the ancestry binds: the slice's, here
        (
            NESTED_V2,
            {"system.slice/memory.max": "134217728", "system.slice/jobs.service/memory.max": "268435456"},
            128 << 20,
        ),
        (NESTED_V1, {"memory/jobs/memory.limit_in_bytes": "268435456"}, 256 << 20),
        # a container mounts its own cgroup as the root: the path it is told is not under the mount
        ("0::/kubepods/pod1/abc", {"memory.max": "536870912"}, 512 << 20),
        ("", {"memory.max": "536870912"}, 512 << 20),
    ],
    ids=["v2-service", "v2-slice-binds", "v1-service", "v2-container", "no-proc-file"],
)
def test_memory_limit_is_the_least_along_our_own_cgroups_ancestry(
    tmp_path: Path, own: str, files: dict[str, str], limit: int
) -> None:
    assert cgroups.memory_limit(*cgroup(tmp_path, files, own)) == limit


@pytest.mark.parametrize(
    ("own", "files", "cpus"),
    [
        (NESTED_V2, {"cpu.max": "max 100000", "system.slice/jobs.service/cpu.max": "150000 100000"}, 1.5),
        (
            NESTED_V1,
            {
                "cpu,cpuacct/cpu.cfs_quota_us": "-1",
                "cpu,cpuacct/jobs/cpu.cfs_quota_us": "50000",
                "cpu,cpuacct/jobs/cpu.cfs_period_us": "100000",
            },
            0.5,
        ),
    ],
    ids=["v2-service", "v1-service"],
)
def test_cpu_quota_is_read_from_our_own_cgroup(
    tmp_path: Path, own: str, files: dict[str, str], cpus: float
) -> None:
    assert cgroups.cpu_quota(*cgroup(tmp_path, files, own)) == cpus


@pytest.mark.parametrize(
    ("own", "files", "used", "cpu"),
    [
        (
            NESTED_V2,
            {
                "system.slice/jobs.service/memory.current": str(300 << 20),
                "system.slice/jobs.service/memory.stat": f"anon 1\ninactive_file {100 << 20}\nactive_file 5",
                "system.slice/jobs.service/cpu.stat": "usage_usec 2500000\nuser_usec 2000000",
            },
            200 << 20,
            2.5,
        ),
        (
            NESTED_V1,
            {
                "memory/jobs/memory.usage_in_bytes": str(64 << 20),
                "memory/jobs/memory.stat": f"cache 9\ntotal_inactive_file {16 << 20}",
                "cpu,cpuacct/jobs/cpuacct.usage": "1500000000",
            },
            48 << 20,
            1.5,
        ),
        ("0::/", {}, None, None),
    ],
    ids=["v2-service", "v1-service", "none"],
)
def test_the_cgroups_working_set_and_cpu_time(
    tmp_path: Path, own: str, files: dict[str, str], used: int | None, cpu: float | None
) -> None:
    """What autoscale weighs growth against: memory in use less reclaimable inactive file cache (the
    kubelet's working set), and CPU seconds used, both of our own cgroup."""
    where = cgroup(tmp_path, files, own)
    assert cgroups.memory_used(*where) == used
    assert cgroups.cpu_usage(*where) == cpu


# ---- describing (masking a URL: test_connection.py)


def test_describe_masks_the_password_and_names_hooks(tmp_path: Path) -> None:
    path = write(tmp_path / "c.py", "def after_fork(worker, slot): pass\n")
    settings = load(
        {}, {"REDIS_URL": "redis://:hunter2@127.0.0.1/0", P + "CONFIG": path, P + "GROUPS": "a,b=2"}
    )
    described = settings.describe()
    text = json.dumps(described)
    assert "hunter2" not in text
    assert described["redis_url"] == "redis://:***@127.0.0.1/0"
    assert described["hooks"] == ["after_fork"]
    assert described["groups"] == [{"queues": ["a", "b"], "size": 2}]
    assert described["queues"] == ["a", "b"]
    assert set(described) == {f.name for f in dataclasses.fields(Settings)}


# ---- property: any text in any variable gives Settings or a one-line ConfigError

TEXT = (
    st.text()
    | st.from_regex(r"rq(\.[A-Za-z][A-Za-z_]{0,12}){1,3}", fullmatch=True)
    | st.sampled_from(["0", "-1", "1.5m", "512Mi", "a=1; b=x", "redis://:pw@h:1/2", "unix://", "off", "TRUE"])
)


def assert_loads_or_one_line_error(flags: dict[str, object], environ: dict[str, str]) -> None:
    try:
        result = load(flags, environ)
    except ConfigError as e:
        assert len(str(e).splitlines()) == 1, str(e)
    else:
        assert isinstance(result, Settings)


@settings(max_examples=400, deadline=None)
@given(var=st.sampled_from(config.SETTINGS), text=TEXT, as_flag=st.booleans())
def test_any_text_gives_settings_or_one_line_config_error(
    var: config.Setting, text: str, as_flag: bool
) -> None:
    if as_flag:
        assert_loads_or_one_line_error({var.name: text}, {})
    else:
        assert_loads_or_one_line_error({}, {var.env: text.replace("\0", "")})


NATIVE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: (
        st.lists(inner, max_size=3) | st.tuples(inner, inner) | st.dictionaries(st.text(), inner, max_size=3)
    ),
    max_leaves=6,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(var=st.sampled_from([v for v in config.SETTINGS if v.name != "config"]), value=NATIVE)
def test_any_native_value_in_config_file_gives_settings_or_one_line_error(
    var: config.Setting, value: object
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = write(
            Path(tmp) / "c.py", f"import pickle\n{var.name} = pickle.loads({pickle.dumps(value)!r})\n"
        )
        assert_loads_or_one_line_error({}, {P + "CONFIG": path})
