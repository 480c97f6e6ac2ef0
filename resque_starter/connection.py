"""Every Redis connection of resque-starter starts here: the configured URL, checked and masked, and
the one `connect()` that turns it into a redis-py client (workers, recovery, readiness).

URL forms (docs/configuration.md, "Connecting to Redis"):

- `redis://[[user]:password@]host[:port][/db][?option=value&...]`, `rediss://...` (TLS), and
  `unix://[[user]:password@]/path/to/redis.sock[?db=N&...]`: redis-py's own forms.
- `redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service[/db][?...]` (and
  `rediss+sentinel://`, TLS to the Sentinels and the primary): the hosts are Sentinels (port 26379
  by default) asked for the primary of `service`; the user and password are the primary's, and
  `sentinel_username`/`sentinel_password` authenticate to the Sentinels.

Only the query options in `OPTIONS` are accepted, so a typo is one clear line at start-up rather than
a TypeError in every worker. Checking and masking run in the supervisor, which never imports redis-py
(about 17 MB a process): only `connect()` imports it, in the processes that talk to Redis.

No error text built here holds any part of a password, however malformed the URL: the URL is checked
in its strictly masked form (`mask_url(url, strict=True)`), and its secret parts only for the
characters they may not hold.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

if TYPE_CHECKING:
    import redis

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
TLS_SCHEMES = ("rediss", "rediss+sentinel")
SCHEMES = ("redis", "rediss", "unix", *SENTINEL_SCHEMES)
SENTINEL_PORT = 26379
ALLOWED = "a redis://, rediss://, unix://, redis+sentinel:// or rediss+sentinel:// URL"

_BOOLEAN = ("true", "false", "yes", "no", "1", "0")  # as redis-py reads them (it reads "off" as true)


def _boolean(text: str) -> bool:
    return text.lower() in _BOOLEAN


def _seconds(text: str) -> bool:
    try:
        return 0 < float(text) < 1e9
    except ValueError:
        return False


def _readable_file(text: str) -> bool:
    return os.path.isfile(text) and os.access(text, os.R_OK)


def _given(text: str) -> bool:
    return bool(text)


# option -> (its check, what it allows, the schemes that take it)
OPTIONS: dict[str, tuple[Callable[[str], bool], str, tuple[str, ...]]] = {
    "db": (str.isdigit, "a database number", SCHEMES),
    "username": (_given, "an ACL user name", SCHEMES),
    "password": (_given, "a password", SCHEMES),
    "client_name": (lambda text: bool(re.fullmatch(r"\S+", text)), "a name without spaces", SCHEMES),
    "socket_timeout": (_seconds, "seconds > 0", SCHEMES),
    "socket_connect_timeout": (_seconds, "seconds > 0", SCHEMES),
    "socket_keepalive": (_boolean, "true or false", SCHEMES),
    "health_check_interval": (str.isdigit, "whole seconds", SCHEMES),
    "ssl_cert_reqs": (
        lambda text: text in ("none", "optional", "required"),
        "none, optional or required",
        TLS_SCHEMES,
    ),
    "ssl_check_hostname": (_boolean, "true or false", TLS_SCHEMES),
    "ssl_ca_certs": (_readable_file, "a readable PEM file of CA certificates", TLS_SCHEMES),
    "ssl_ca_path": (os.path.isdir, "a directory of CA certificates", TLS_SCHEMES),
    "ssl_certfile": (_readable_file, "a readable PEM certificate (mutual TLS)", TLS_SCHEMES),
    "ssl_keyfile": (_readable_file, "a readable PEM private key (mutual TLS)", TLS_SCHEMES),
    "ssl_password": (_given, "the private key's passphrase", TLS_SCHEMES),
    "ssl_ciphers": (_given, "an OpenSSL cipher list", TLS_SCHEMES),
    "sentinel_username": (_given, "the Sentinels' ACL user name", SENTINEL_SCHEMES),
    "sentinel_password": (_given, "the Sentinels' password", SENTINEL_SCHEMES),
}


class BadURL(ValueError):
    """What is wrong with a Redis URL, as the `allowed` text of a config error: never a secret."""


# ---- masking: where a password may sit, however malformed the URL

_PREFIX = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:/{0,2}")
_PASSWORD_OPTION = re.compile(r"[?&][A-Za-z_]*password=")
# an option's value runs to the next option this module knows: a bare & or # inside is part of it
_NEXT_OPTION = re.compile(r"[?&](?:" + "|".join(OPTIONS) + r"|[A-Za-z_]*password)=")


def _query_start(url: str, start: int) -> int:
    first_option = _NEXT_OPTION.search(url, start)
    return first_option.start() if first_option else len(url)


def _userinfo(url: str, start: int) -> tuple[int, int] | None:
    """Where the user info is: up to the last @ before the query, so a password holding an unencoded
    / ? # or @ is all inside it. An @ past an empty authority is a unix socket's path (unix:///a@b)."""
    at = url.rfind("@", start, _query_start(url, start))
    if at == -1:
        return None
    authority_end = min((i for c in "/?#" if (i := url.find(c, start)) != -1), default=len(url))
    if at < authority_end or authority_end > start or ":" in url[start:at]:
        return start, at
    return None


def _after_colons(url: str) -> list[tuple[int, int]]:
    """What follows each colon outside [IPv6] brackets and before the query, unless it is a port (digits)
    or nothing (scheme://): a password whose user info is malformed (redis://:p/w, redis//:pw,
    user:pw without @host), hidden up to the next @ or the query."""
    end = _query_start(url, 0)
    spans = []
    for colon in re.finditer(":", url[:end]):
        if url.count("[", 0, colon.start()) > url.count("]", 0, colon.start()):
            continue
        token = re.match(r"[^:/?#@,\[\]]*", url[colon.end() : end])
        if token and token[0] and not token[0].isdigit():
            at = url.find("@", colon.end(), end)
            spans.append((colon.end(), end if at == -1 else at))
    return spans


def _secret_spans(url: str, strict: bool) -> list[tuple[int, int]]:
    start = m.end() if (m := _PREFIX.match(url)) else 0
    spans = []
    for option in _PASSWORD_OPTION.finditer(url, start):
        following = _NEXT_OPTION.search(url, option.end())
        spans.append((option.end(), following.start() if following else len(url)))
    userinfo = _userinfo(url, start)
    if strict:
        spans += ([userinfo] if userinfo else []) + _after_colons(url)
    elif userinfo is not None and (colon := url.find(":", *userinfo)) != -1:
        spans.append((colon + 1, userinfo[1]))
    return spans


def mask_url(url: str, strict: bool = False) -> str:
    """`url` with its passwords as *** (user info, ?password=, ?sentinel_password=...) for logs and
    `ctl status`. `strict`, for error lines about a URL that may be malformed, also hides the user name
    (it may be a password whose colon is missing) and what follows any colon but a port."""
    masked, last = [], 0
    for begin, end in sorted(_secret_spans(url, strict)):
        if begin >= last:
            masked.append(url[last:begin] + "***")
        last = max(last, end)
    return "".join(masked) + url[last:]


# ---- checking


def check_url(value: object) -> str:
    """The URL if redis-py (and `connect()` for Sentinel) takes it as meant; BadURL says why not,
    without any part of a password. Checked without importing redis-py."""
    url = value.strip() if isinstance(value, str) else ""
    given, sep, _ = url.partition(":")
    scheme = given.lower()
    if scheme not in SCHEMES:
        named = sep and url.startswith(f"{given}://") and re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", given)
        raise BadURL(f"{ALLOWED} (the scheme is {given!r})" if named else ALLOWED)
    if not url.startswith(f"{scheme}://"):
        raise BadURL(f"{ALLOWED} (write {scheme}:// in lowercase, with both slashes)")
    _check_secrets(url)
    try:
        parts = urlsplit(mask_url(url, strict=True))
    except ValueError:  # an unbalanced [ or ]
        raise BadURL(f"{ALLOWED} (the host is neither a name nor an [IPv6] address)") from None
    if scheme == "unix":
        if parts.hostname or not parts.path or parts.path == "/":
            raise BadURL(f"{ALLOWED} (unix:// takes the socket's path: unix:///run/redis.sock)")
    elif scheme in SENTINEL_SCHEMES:
        _check_sentinel(parts.netloc.rpartition("@")[2], parts.path)
    else:
        _host_port(parts.netloc.rpartition("@")[2])
        db = parts.path.lstrip("/")
        if db and not db.isdigit():
            raise BadURL(f"{ALLOWED} (the database {db!r} is not a number)")
    if parts.fragment:
        raise BadURL(f"{ALLOWED} (a # starts a fragment, which redis-py ignores: write # as %23)")
    _check_options(scheme, parts.query)
    return url


def _check_secrets(url: str) -> None:
    """The characters a user name, password or ...password= value must percent-encode to be read whole."""
    start = m.end() if (m := _PREFIX.match(url)) else 0
    userinfo = _userinfo(url, start)
    if userinfo is not None and re.search(r"[/?#]", url[userinfo[0] : userinfo[1]]):
        why = "a user name or password must write / ? # as %2F %3F %23"
        raise BadURL(f"{ALLOWED} ({why})")
    for begin, end in _secret_spans(url, strict=False):
        if (userinfo is None or begin > userinfo[1]) and re.search(r"[#&+]", url[begin:end]):
            raise BadURL(f"{ALLOWED} (a password option must write # & + as %23 %26 %2B)")


def _host_port(netloc: str, default_port: int | None = None) -> tuple[str, int | None]:
    """`host[:port]` (or `[v6]:port`) as (host, port); BadURL for a port that is no port."""
    try:
        port = urlsplit(f"//{netloc}").port
    except ValueError:
        port = 0
    if port == 0:
        raise BadURL(f"{ALLOWED} (a port is a number from 1 to 65535)")
    host = urlsplit(f"//{netloc}").hostname or ""
    return host, port or default_port


def _check_sentinel(netloc: str, path: str) -> None:
    if not netloc or any(not host for host in netloc.split(",")):
        raise BadURL(f"{ALLOWED} (name the Sentinels: redis+sentinel://host1:26379,host2:26379/SERVICE)")
    for host in netloc.split(","):
        _host_port(host)
    service, _, db = path.strip("/").partition("/")
    if not re.fullmatch(r"[^\s/]+", service) or (db and not db.isdigit()):
        raise BadURL(f"{ALLOWED} (the path of a Sentinel URL is /SERVICE or /SERVICE/DB, e.g. /mymaster/0)")


def _check_options(scheme: str, query: str) -> None:
    given = parse_qs(query, keep_blank_values=True)
    for name, values in given.items():
        if name not in OPTIONS:
            known = ", ".join(key for key, (_, _, schemes) in OPTIONS.items() if scheme in schemes)
            raise BadURL(f"{ALLOWED} (unknown option {name!r}; {scheme}:// takes {known})")
        check, allowed, schemes = OPTIONS[name]
        if scheme not in schemes:
            raise BadURL(f"{ALLOWED} ({name} needs " + " or ".join(f"{s}://" for s in schemes) + ")")
        if len(values) > 1:
            raise BadURL(f"{ALLOWED} ({name} is given twice)")
        if not check(values[0]):
            raise BadURL(f"{ALLOWED} ({name}={values[0]!r}: {allowed})")


# ---- connecting


def connect(url: str, **overrides: Any) -> redis.Redis:
    """A redis-py client for `url` (as `check_url` accepts it); `overrides` are redis-py connection
    options (timeouts, driver_info) that win over the URL's. It connects lazily, on its first command;
    a Sentinel URL's client asks the Sentinels for the primary on every new connection, so after a
    failover the next command (redis-py drops a connection that finds itself on a replica) lands on
    the new primary."""
    import redis

    scheme = url.partition(":")[0].lower()
    if scheme not in SENTINEL_SCHEMES:
        return redis.Redis.from_url(url, **overrides)
    return _sentinel_primary(url, scheme in TLS_SCHEMES, overrides)


def _sentinel_primary(url: str, tls: bool, overrides: dict[str, Any]) -> redis.Redis:
    from redis.connection import parse_url
    from redis.sentinel import Sentinel

    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    service, _, db = parts.path.strip("/").partition("/")
    # the primary's options, read by redis-py itself from the same URL without its Sentinels
    options = parse_url(f"{'rediss' if tls else 'redis'}://{userinfo}{at}/{db}?{parts.query}")
    options.pop("connection_class", None)
    auth = {
        key: options.pop(f"sentinel_{key}")
        for key in ("username", "password")
        if f"sentinel_{key}" in options
    }
    options.update(overrides)
    to_sentinels = {key: value for key, value in options.items() if key.startswith(("socket_", "ssl_"))}
    sentinels = [_host_port(host, SENTINEL_PORT) for host in hosts.split(",")]
    manager = Sentinel(sentinels, sentinel_kwargs={**to_sentinels, **auth, "ssl": tls})
    return manager.master_for(service, ssl=tls, **options)


def primary_address(client: redis.Redis) -> str | None:
    """Where a Sentinel client's connections go (host:port), as of its latest new connection; None for
    other clients. It changes when a connection is made after a failover, with no round trip to ask."""
    address = getattr(client.connection_pool, "master_address", None)
    return None if address is None else "{}:{}".format(*address)


def close(client: redis.Redis) -> None:
    """Close `client`'s connections and, for a Sentinel client, its connections to the Sentinels, which
    `client.close()` leaves open (to be collected with reference cycles): for short-lived clients."""
    client.close()
    manager = getattr(client.connection_pool, "sentinel_manager", None)
    if manager is not None:
        manager.close()
