"""Exit codes and the one-line configuration error, shared by every module that checks a setting."""

from __future__ import annotations

PREFIX = "RESQUE_STARTER_"

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


def override_label(group: str, setting: str, path: str | None) -> str:
    """How an error names one override: group_overrides['low']['max_jobs'] (in conf.py)."""
    return f"group_overrides[{group!r}][{setting!r}] (in {path})"
