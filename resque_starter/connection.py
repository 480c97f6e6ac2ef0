"""Every Redis connection of resque-starter starts here: the configured URL, checked and masked, and
the one `connect()` that turns it into a redis-py client (workers, recovery, readiness).

The checking and masking run in the supervisor, which never imports redis-py (about 17 MB a process):
only `connect()` imports it, in the processes that talk to Redis.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

if TYPE_CHECKING:
    import redis


class BadURL(ValueError):
    """What is wrong with a Redis URL, as the `allowed` text of a config error: never a secret."""


def check_url(value: object) -> str:
    """redis-py's URL forms, checked without importing redis-py."""
    url = value.strip() if isinstance(value, str) else ""
    allowed = "a redis://, rediss:// or unix:// URL"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise BadURL(f"{allowed} ({e})") from None
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise BadURL(f"{allowed} (the scheme is {parts.scheme!r})" if parts.scheme else allowed)
    if parts.scheme == "unix":
        if not parts.path or parts.path == "/":
            raise BadURL(f"{allowed} (unix:// needs the socket's path: unix:///run/redis.sock)")
    elif port == 0:
        raise BadURL(f"{allowed} (port 0)")
    else:
        db = parts.path.lstrip("/")
        if db and not db.isdigit():
            raise BadURL(f"{allowed} (the database {db!r} is not a number)")
    for key, values in parse_qs(parts.query).items():
        if key == "db" and not values[0].isdigit():
            raise BadURL(f"{allowed} (db={values[0]!r} is not a number)")
    return url


def mask_url(url: str) -> str:
    """Hide the password of a Redis URL (userinfo or ?password=) for logs and `ctl status`."""
    scheme, sep, rest = url.partition("://")
    if sep:
        userinfo, at, host = rest.rpartition("@")
        if at and ":" in userinfo:
            rest = f"{userinfo.partition(':')[0]}:***@{host}"
    return scheme + sep + re.sub(r"(?<=[?&])password=[^&#]*", "password=***", rest)


def connect(url: str, **overrides: Any) -> redis.Redis:
    """A redis-py client for `url` (as `check_url` accepts it); `overrides` are redis-py connection
    options (timeouts, driver_info) that win over the URL's. It connects lazily, on its first command."""
    import redis

    return redis.Redis.from_url(url, **overrides)
