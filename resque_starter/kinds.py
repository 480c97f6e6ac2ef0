"""The kinds of value a setting takes: each parses a string (a flag, an environment variable) or a native
value (the config file), checks its bounds, and says in one phrase what it allows.

The phrase is both the end of the exit-2 line a bad value gets and the "allowed" column of the generated
settings table (docs/configuration.md), so the two cannot disagree.
"""

from __future__ import annotations

import keyword
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class Invalid(Exception):
    """A value a kind refuses; its text is what is allowed (with the reason, when one helps)."""


@dataclass(frozen=True)
class Kind:
    """A parser and the phrase for what it allows."""

    allowed: str
    parse: Callable[[object], Any]
    boolean: bool = False  # a flag of this kind may be given without a value, meaning true
    format: Callable[[Any], str] = str  # how the docs show a value of this kind

    def __call__(self, value: object) -> Any:
        return self.parse(value)

    def show(self, value: object) -> str:
        """A value as the settings table shows it, in the syntax a flag or variable takes."""
        if value is None or value == ():
            return "off" if self.allowed.endswith(", or off") else "none"
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, tuple):
            return ",".join(map(str, value))
        return self.format(value)


MAX_ITEMS = 64  # entries of one list (queues, modules, path directories)
MAX_NAME = 255  # characters of one queue name, module name or class path
MAX_PATH = 4096  # PATH_MAX


def whole(minimum: int, maximum: int, allowed: str | None = None) -> Kind:
    text = allowed or f"a whole number from {minimum} to {maximum}"

    def parse(value: object) -> int:
        if isinstance(value, str) and re.fullmatch(r"[+-]?[0-9]{1,18}", value.strip()):
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= maximum:
            raise Invalid(text)
        return value

    return Kind(text, parse)


_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def _boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise Invalid(BOOLEAN.allowed)


BOOLEAN = Kind("true or false (also 1/0, yes/no, on/off)", _boolean, boolean=True)

_DURATION = re.compile(r"([0-9]{1,12}(?:\.[0-9]{0,9})?|\.[0-9]{1,9})\s*([smh]?)", re.IGNORECASE)
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600}


def _shown(seconds: float) -> str:
    """90 -> 90s, 3600 -> 1h: the shortest spelling a duration setting takes back."""
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def duration(maximum: float, allow_zero: bool, minimum: float = 0.0) -> Kind:
    bounds = f"from 0 to {_shown(maximum)}" if allow_zero else f"over 0 and at most {_shown(maximum)}"
    if minimum:
        bounds = f"from {_shown(minimum)} to {_shown(maximum)}"
    text = f"a duration {bounds}, in seconds or with a unit: 90, 90s, 1.5m, 2h"

    def parse(value: object) -> float:
        seconds = _seconds(value)
        if (
            seconds is None
            or seconds < max(minimum, 0)
            or (seconds == 0 and not allow_zero)
            or seconds > maximum
        ):
            raise Invalid(text)
        return seconds

    return Kind(text, parse, format=_shown)


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


def size(maximum_tib: int) -> Kind:
    text = f"a size over 0 and at most {maximum_tib}T, in bytes or with a unit: 536870912, 1024K, 512M, 1G"

    def parse(value: object) -> int:
        if isinstance(value, str) and (match := _SIZE.fullmatch(value.strip())):
            value = round(float(match[1]) * _BYTES[(match[2] or "").upper()])
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= maximum_tib << 40:
            raise Invalid(text)
        return value

    return Kind(text, parse)


def window(maximum: int) -> Kind:
    """MIN:MAX worker counts, 0 <= MIN <= MAX <= maximum and MAX >= 1 (RESQUE_STARTER_AUTOSCALE)."""
    text = f"MIN:MAX, whole numbers with 0 <= MIN <= MAX <= {maximum} and MAX >= 1, such as 2:8"

    def parse(value: object) -> tuple[int, int]:
        if isinstance(value, tuple | list) and len(value) == 2:  # (2, 8) from a config file
            value = ":".join(map(str, value))
        parts = value.split(":") if isinstance(value, str) else []
        if len(parts) != 2 or not all(p.strip().isdigit() and len(p.strip()) < 8 for p in parts):
            raise Invalid(text)
        low, high = int(parts[0]), int(parts[1])
        if not 0 <= low <= high <= maximum or high < 1:
            raise Invalid(text)
        return low, high

    return Kind(text, parse, format=lambda v: f"{v[0]}:{v[1]}")


def off(kind: Kind) -> Kind:
    """Accept `off` too (None), for the knobs that are off by default."""
    text = f"{kind.allowed}, or off"

    def parse(value: object) -> Any:
        if isinstance(value, str) and value.strip().lower() == "off":
            return None
        try:
            return kind(value)
        except Invalid as e:
            raise Invalid(f"{e}, or off") from None

    return Kind(text, parse, format=kind.format)


def choice(*options: str) -> Kind:
    """Case-insensitive; the value is stored in the spelling of `options`."""
    text = "one of " + ", ".join(options)

    def parse(value: object) -> str:
        if isinstance(value, str):
            for option in options:
                if option.lower() == value.strip().lower():
                    return option
        raise Invalid(text)

    return Kind(text, parse)


def items(value: object, what: str, separator: str = ",") -> list[str]:
    """A separated string or a list/tuple of strings, as stripped items; at most MAX_ITEMS of them."""
    where = "separated by commas" if separator == "," else f"separated by {separator!r}"
    if isinstance(value, str):
        found = [item.strip() for item in value.split(separator)]
    elif isinstance(value, list | tuple) and all(isinstance(item, str) for item in value):
        found = [item.strip() for item in value]
    else:
        raise Invalid(f"{what} {where} (or a list of strings in the config file)")
    if len(found) > MAX_ITEMS:
        raise Invalid(f"{what} {where}, at most {MAX_ITEMS} of them ({len(found)} are given)")
    return found


_QUEUE_NAME = re.compile(rf"[A-Za-z0-9_.:-]{{1,{MAX_NAME}}}")
_QUEUES_WHAT = f"queue names of A-Z a-z 0-9 _ . : - (at most {MAX_NAME} characters)"


def _queues(value: object) -> tuple[str, ...]:
    names = items(value, _QUEUES_WHAT)
    for name in names:
        if not _QUEUE_NAME.fullmatch(name):
            problem = f"{name!r} has a character outside A-Za-z0-9_.:-"
            if len(name) > MAX_NAME:
                problem = f"{name[:20]!r}... is longer than {MAX_NAME} characters"
            elif not name:
                problem = "an empty name"
            raise Invalid(f"{_QUEUES_WHAT}, separated by commas, none twice ({problem})")
        if names.count(name) > 1:
            raise Invalid(f"{_QUEUES_WHAT}, separated by commas, none twice ({name!r} is listed twice)")
    return tuple(names)


QUEUES = Kind(f"{_QUEUES_WHAT}, separated by commas, none twice", _queues)


def is_dotted(path: str) -> bool:
    return len(path) <= MAX_NAME and all(
        part.isidentifier() and not keyword.iskeyword(part) for part in path.split(".")
    )


def _modules(value: object) -> tuple[str, ...]:
    what = "dotted module names such as myapp.tasks"
    names = items(value, what)
    for name in names:
        if not is_dotted(name):
            raise Invalid(f"{what}, separated by commas ({name[:40]!r} is not a dotted module name)")
    return tuple(names)


MODULES = Kind("dotted module names such as myapp.tasks, separated by commas", _modules)


def dotted_path(what: str) -> Kind:
    """Syntax only: the mold imports the path and checks what it names (config.check_classes), so the
    supervisor stays free of rq and the application."""

    def parse(value: object) -> str:
        path = value.strip() if isinstance(value, str) else ""
        if "." not in path or not is_dotted(path):
            raise Invalid(what)
        if path.startswith("rq.") and any(part.startswith("_") for part in path.split(".")):
            raise Invalid(f"{what}: {path} is private to rq")
        return path

    return Kind(what, parse)


def path(maximum: int = MAX_PATH, why: str = "") -> Kind:
    """A path: anything but empty, no NUL (no path can hold one), at most `maximum` bytes."""
    text = f"a non-empty path of at most {maximum} bytes{why}"

    def parse(value: object) -> str:
        if not isinstance(value, str) or not value.strip() or "\0" in value:
            raise Invalid(text)
        if len(value.strip().encode(errors="surrogateescape")) > maximum:
            raise Invalid(text)
        return value.strip()

    return Kind(text, parse)


def _directories(value: object) -> tuple[str, ...]:
    what = "directories separated by ':' (or a list of them in the config file)"
    found = tuple(entry for entry in items(value, what, separator=":") if entry)
    for entry in found:
        if "\0" in entry or len(entry.encode(errors="surrogateescape")) > MAX_PATH:
            raise Invalid(f"{what}, each a path of at most {MAX_PATH} bytes")
    return found


DIRECTORIES = Kind(f"directories separated by ':', at most {MAX_ITEMS}", _directories)


def group_pairs(value: object, max_size: int) -> list[tuple[tuple[str, ...], int, tuple[int, int] | None]]:
    """`high,default=3; low=1:8` (or in the config file a dict {queues: size} or a list of pairs), as
    (queues, size, autoscale window) triples; a MIN:MAX size autoscales the group and starts it at MIN.
    No two groups with the same queues."""
    pairs: list[tuple[str, object, object]] = []
    if isinstance(value, str):
        for segment in filter(None, (s.strip() for s in value.split(";"))):
            before, equals, after = segment.rpartition("=")
            pairs.append((segment, before if equals else None, after))
    elif isinstance(value, dict):
        pairs = [(f"{q!r}: {n!r}", q, n) for q, n in value.items()]
    elif isinstance(value, list | tuple) and all(isinstance(p, list | tuple) and len(p) == 2 for p in value):
        pairs = [(repr(tuple(p)), p[0], p[1]) for p in value]
    if not pairs:
        raise Invalid("groups of QUEUES=SIZE separated by semicolons, such as high,default=3; low=1")
    if len(pairs) > MAX_ITEMS:
        raise Invalid(f"at most {MAX_ITEMS} groups of QUEUES=SIZE ({len(pairs)} are given)")
    groups: list[tuple[tuple[str, ...], int, tuple[int, int] | None]] = []
    for number, (shown, queues, count) in enumerate(pairs, 1):
        where = f"group {number} {shown!r}"
        if queues is None:
            raise Invalid(f"{where}: expected QUEUES=SIZE such as high,default=3")
        try:
            names = _queues(queues)
        except Invalid as e:
            raise Invalid(f"{where}: {e}") from None
        span: tuple[int, int] | None = None
        try:
            if isinstance(count, str) and ":" in count:
                span = window(max_size)(count)
                group_size = span[0]
            else:
                group_size = whole(0, max_size)(count)
        except Invalid:
            raise Invalid(
                f"{where}: size must be a whole number from 0 to {max_size}, or MIN:MAX to autoscale"
            ) from None
        for earlier, (other, _, _) in enumerate(groups, 1):
            if other == names:
                raise Invalid(f"{where}: the same queues as group {earlier}; merge their sizes")
        groups.append((names, group_size, span))
    return groups


def close_match(name: str, known: list[str]) -> str | None:
    """The known name `name` is probably a typo of, for a did-you-mean."""
    import difflib  # only for names that are not settings (the supervisor's memory)

    close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
    return close[0] if close else None
