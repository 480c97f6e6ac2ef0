"""Loading the settings: flags > environment > config file > default, each value parsed by its
declaration (config.SETTINGS); the config file runs meanwhile in a child (config_file.Evaluation)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from resque_starter import cgroups, config_file, kinds
from resque_starter.config import (
    ENV_NAMES,
    HOOK_NAMES,
    PREFIX,
    SETTING,
    SETTINGS,
    ConfigError,
    Group,
    Hooks,
    Setting,
    Settings,
    override_label,
)
from resque_starter.connection import mask_url
from resque_starter.kinds import Invalid


@dataclass(frozen=True)
class _Raw:
    """A value as given, and where: the name the error message shows."""

    label: str
    value: object


class Loading:
    """Settings being loaded; the config file, if any, runs meanwhile in a child (config_file.Evaluation).

    `flags` is vars(argparse namespace) (None = not given; other keys are ignored). An empty environment
    variable counts as unset, as a compose `${VAR}` of an unset variable yields one. The supervisor
    watches `evaluation` in its loop (a HUP); `load` waits for it (start-up)."""

    def __init__(self, flags: Mapping[str, object], environ: Mapping[str, str]) -> None:
        self._flags, self._environ = flags, environ
        raw = _pick(SETTING["config"], flags, environ, {}, None)
        self.path: str | None = None if raw is None else _parse(SETTING["config"], raw)
        self._label = raw.label if raw is not None else ""
        self.evaluation: config_file.Evaluation | None = None
        if self.path is not None:
            import_path = [*self._before_file("path"), os.getcwd()]
            timeout = self._before_file("config_timeout")
            self.evaluation = config_file.Evaluation(self.path, timeout, import_path)

    def _before_file(self, name: str) -> Any:
        raw = _pick(SETTING[name], self._flags, self._environ, {}, None)
        return SETTING[name].default if raw is None else _parse(SETTING[name], raw)

    def settings(self) -> Settings:
        """The loaded settings (once the evaluation is done); ConfigError names the first bad value."""
        file_values: dict[str, object] = {}
        hooks = Hooks()
        if self.evaluation is not None:
            assert self.path is not None
            try:
                namespace = self.evaluation.result()
            except config_file.ConfigFileError as e:
                raise ConfigError(self._label, self.path, str(e)) from None
            file_values, hooks = _from_file(namespace, self.path, self._label)
        return _assemble(self._flags, self._environ, file_values, self.path, hooks)

    def wait(self) -> Settings:
        if self.evaluation is not None:
            self.evaluation.wait()
        return self.settings()


def load(flags: Mapping[str, object], environ: Mapping[str, str]) -> Settings:
    """Settings from flags > environment > config file > defaults; ConfigError names the first bad one."""
    return Loading(flags, environ).wait()


def _assemble(
    flags: Mapping[str, object],
    environ: Mapping[str, str],
    file_values: dict[str, object],
    path: str | None,
    hooks: Hooks,
) -> Settings:
    raws = {s.name: _pick(s, flags, environ, file_values, path) for s in SETTINGS if s.name != "config"}
    parsed = {name: _parse(SETTING[name], raw) for name, raw in raws.items() if raw is not None}
    parsed["config"] = path
    parsed["groups"] = _autoscale_first(_groups_of(parsed, raws), parsed.get("autoscale"), raws)
    if "group_overrides" in file_values:
        assert path is not None
        parsed["groups"] = _override_groups(parsed["groups"], file_values["group_overrides"], path)
    parsed["concurrency"] = sum(group.size for group in parsed["groups"])
    parsed["queues"] = parsed["groups"][0].queues
    if parsed.get("redis_url") is None and parsed.get("require_redis_url"):
        required = f"a Redis URL is required since {PREFIX}REQUIRE_REDIS_URL is true"
        raise ConfigError("REDIS_URL", None, required)
    return Settings(**parsed, hooks=hooks)


def _pick(
    setting: Setting,
    flags: Mapping[str, object],
    environ: Mapping[str, str],
    file: Mapping[str, object],
    path: str | None,
) -> _Raw | None:
    if flags.get(setting.name) is not None:
        return _Raw(f"{setting.env} ({setting.flag})", flags[setting.name])
    for name in (setting.env, "REDIS_URL") if setting.name == "redis_url" else (setting.env,):
        if environ.get(name):
            return _Raw(name, environ[name])
    if setting.name in file:
        return _Raw(f"{setting.env} (in {path})", file[setting.name])
    return None


def _parse(setting: Setting, raw: _Raw) -> Any:
    try:
        return setting.kind(raw.value)
    except Invalid as e:
        value = raw.value
        shown = (
            mask_url(value, strict=True) if setting.name == "redis_url" and isinstance(value, str) else value
        )
        raise ConfigError(raw.label, shown, str(e)) from None


def _groups_of(parsed: dict[str, Any], raws: Mapping[str, _Raw | None]) -> tuple[Group, ...]:
    """GROUPS, or the one group QUEUES x CONCURRENCY; setting GROUPS and either of those is ambiguous."""
    groups = raws["groups"]
    if groups is None:
        concurrency = parsed["concurrency"] if "concurrency" in parsed else cgroups.cpu_count()
        return (Group(parsed.get("queues", ("default",)), concurrency),)
    clash = [raw.label for raw in (raws["queues"], raws["concurrency"]) if raw is not None]
    if clash:
        allowed = f"GROUPS replaces QUEUES and CONCURRENCY, but {' and '.join(clash)} is set too"
        raise ConfigError(groups.label, groups.value, allowed)
    return parsed["groups"]


def _autoscale_first(
    groups: tuple[Group, ...], window: tuple[int, int] | None, raws: Mapping[str, _Raw | None]
) -> tuple[Group, ...]:
    """AUTOSCALE is the first group's window; a MIN:MAX size for it in GROUPS too is ambiguous."""
    if window is None:
        return groups
    first = groups[0]
    if first.window is not None:
        raw = raws["autoscale"]
        assert raw is not None
        allowed = f"AUTOSCALE is the first group's window, but GROUPS gives it one too ({first.name})"
        raise ConfigError(raw.label, raw.value, allowed)
    return (dataclasses.replace(first, window=window), *groups[1:])


# Settings a group may set for its own workers (`group_overrides` in the config file).
OVERRIDABLE = ("worker_class", "max_jobs", "max_lifetime", "max_memory")
_OVERRIDES_SHAPE = (
    "a dict of group name to a dict of settings, such as "
    "{'low': {'worker_class': 'rq.SimpleWorker', 'max_jobs': 100}}"
)


def _override_groups(groups: tuple[Group, ...], given: object, path: str) -> tuple[Group, ...]:
    """Attach `group_overrides` to the groups; each key names a group as `ctl status` shows it."""
    label = f"group_overrides (in {path})"
    if not isinstance(given, dict):
        raise ConfigError(label, given, _OVERRIDES_SHAPE)
    index_of = {group.queues: index for index, group in enumerate(groups)}
    overrides: dict[int, tuple[tuple[str, Any], ...]] = {}
    for key, settings in given.items():
        try:
            index = index_of.get(kinds.QUEUES(key))
        except Invalid:
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
    return setting, _parse(SETTING[setting], _Raw(override_label(group, setting, path), value))


def _from_file(namespace: dict[str, object], path: str, label: str) -> tuple[dict[str, object], Hooks]:
    """A config file's settings, and its hooks as FileHooks; a misspelt name is an error."""
    only_outside = {s.name: f"{s.env} or {s.flag}" for s in SETTINGS if not s.in_file}
    names = [*(s.name for s in SETTINGS if s.in_file), "group_overrides"]
    try:
        found, hooks = config_file.sort_names(namespace, names, HOOK_NAMES, only_outside)
    except config_file.ConfigFileError as e:
        raise ConfigError(label, path, str(e)) from None
    return found, Hooks(**{name: config_file.FileHook(path, name) for name in hooks})


def with_hooks(settings: Settings) -> Settings:
    """The settings with the config file's hooks as functions of this process: the mold calls this once,
    so that its workers inherit the functions instead of running the file again each."""
    wanted = [name for name in HOOK_NAMES if isinstance(getattr(settings.hooks, name), config_file.FileHook)]
    if not wanted:
        return settings
    try:
        functions = config_file.hook_functions(str(settings.config), wanted)
    except config_file.ConfigFileError as e:
        raise ConfigError(f"{PREFIX}CONFIG", settings.config, str(e)) from None
    hooks = dataclasses.replace(settings.hooks, **{name: functions[name] for name in wanted})
    return dataclasses.replace(settings, hooks=hooks)


def warnings(environ: Mapping[str, str], settings: Settings) -> list[str]:
    """What is probably wrong but not an error, one line each: an unknown RESQUE_STARTER_* variable
    (a typo is otherwise ignored in silence), and no app to preload."""
    lines = []
    for name in sorted(environ):
        if name.startswith(PREFIX) and name not in ENV_NAMES:
            close = kinds.close_match(name, sorted(ENV_NAMES))
            hint = f"; did you mean {close}?" if close else f" (see {DOCS})"
            lines.append(f"{name} is not a setting of resque-starter and is ignored{hint}")
    if not settings.app:
        lines.append(
            f"{PREFIX}APP is not set: the mold imports no application, so nothing is preloaded and shared "
            "between the workers (set it to your tasks' module, such as myapp.tasks)"
        )
    return lines


DOCS = "docs/configuration.md"
