"""A Redis PING over a plain socket: the supervisor's readiness check without redis-py.

Importing redis-py costs a process about 17 MB (it pulls in asyncio and more); the supervisor only ever
needs to know whether Redis answers, and every megabyte it stays smaller is saved in every pod. So
`redis://` and `unix://` URLs (and the embedded Redis) are pinged here; TLS (`rediss://`) and Sentinel
URLs go through `connection.connect()`, as the workers' connections do, since the TLS options and the
Sentinels' discovery of the primary are redis-py's to get right, not this module's to copy.
"""

from __future__ import annotations

import socket
from urllib.parse import SplitResult, parse_qs, unquote, urlsplit


def ping(url: str, timeout: float) -> bool:
    """True when the server at `url` authenticates us (password, ACL user) and answers PONG."""
    try:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "unix"):
            return _ping_with_redis_py(url, timeout)
        query = parse_qs(parts.query)
        password = unquote(parts.password) if parts.password else query.get("password", [None])[0]
        username = unquote(parts.username) if parts.username else query.get("username", [None])[0]
        commands = [["AUTH", *([username] if username else []), password]] if password else []
        commands.append(["PING"])
        with _connect(parts, timeout) as sock:
            sock.sendall(b"".join(_encode(c) for c in commands))
            replies = _read_lines(sock, len(commands))
    except (OSError, ValueError):
        return False
    return replies[-1] == b"+PONG" and all(r.startswith(b"+") for r in replies)


def _ping_with_redis_py(url: str, timeout: float) -> bool:
    import redis

    from resque_starter import connection

    try:
        client = connection.connect(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    except ValueError:  # not a URL redis-py takes
        return False
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        connection.close(client)


def _connect(parts: SplitResult, timeout: float) -> socket.socket:
    if parts.scheme == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(parts.path)
        return sock
    return socket.create_connection((parts.hostname or "localhost", parts.port or 6379), timeout=timeout)


def _encode(command: list[str]) -> bytes:
    out = [f"*{len(command)}\r\n".encode()]
    for arg in command:
        data = arg.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _read_lines(sock: socket.socket, count: int) -> list[bytes]:
    data = b""
    while data.count(b"\r\n") < count:
        chunk = sock.recv(4096)
        if not chunk:
            raise OSError("connection closed")
        data += chunk
    return data.split(b"\r\n")[:count]
