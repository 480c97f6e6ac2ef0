"""A Redis PING over a plain socket: the supervisor's readiness check without redis-py.

Importing redis-py costs a process about 17 MB (it pulls in asyncio and more); the supervisor only ever
needs to know whether Redis answers, and every megabyte it stays smaller is saved in every pod.
"""

from __future__ import annotations

import socket
from urllib.parse import SplitResult, parse_qs, unquote, urlsplit


def ping(url: str, timeout: float) -> bool:
    """True when the server at `url` (redis://, rediss://, unix://) authenticates us and answers PONG."""
    try:
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        password = unquote(parts.password) if parts.password else query.get("password", [None])[0]
        username = unquote(parts.username) if parts.username else None
        commands = [["AUTH", *([username] if username else []), password]] if password else []
        commands.append(["PING"])
        with _connect(parts.scheme, parts, query, timeout) as sock:
            sock.sendall(b"".join(_encode(c) for c in commands))
            replies = _read_lines(sock, len(commands))
    except (OSError, ValueError):
        return False
    return replies[-1] == b"+PONG" and all(r.startswith(b"+") for r in replies)


def _connect(scheme: str, parts: SplitResult, query: dict[str, list[str]], timeout: float) -> socket.socket:
    if scheme == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(parts.path)
        return sock
    if scheme not in ("redis", "rediss"):
        raise ValueError(f"not a Redis URL scheme: {scheme}")
    host = parts.hostname or "localhost"
    sock = socket.create_connection((host, parts.port or 6379), timeout=timeout)
    if scheme == "redis":
        return sock
    import ssl

    context = ssl.create_default_context()
    if query.get("ssl_cert_reqs", [""])[0].lower() in ("none", "optional"):
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context.wrap_socket(sock, server_hostname=host)


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
