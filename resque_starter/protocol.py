"""JSON-lines messages between the supervisor, the mold, the workers and `ctl`.

One message is one JSON object on one line. Sockets are Unix stream sockets; a spawn request
carries the worker's status socket as an SCM_RIGHTS file descriptor.
"""

from __future__ import annotations

import json
import socket
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

MAX_LINE = 64 * 1024


@dataclass(frozen=True)
class WorkerSpec:
    """What the mold needs to start one worker: which slot, which generation, which rq name."""

    group: int
    slot: int
    generation: int
    name: str
    paused: bool = False
    scheduler: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":"), default=str).encode() + b"\n"


def send(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    """Send one message; blocking sockets only (the mold, the workers, ctl)."""
    data = encode(message)
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.sendall(data)


class LineBuffer:
    """Splits a byte stream into JSON messages; a line over max_line or not JSON becomes an error message."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self._max_line = max_line
        self._buf = bytearray()
        self._pending: deque[dict[str, Any]] = deque()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """Add bytes; return (and consume) every message now complete."""
        self._buf += data  # a bytearray grows in place: a long line read in chunks stays linear
        if b"\n" in data:
            *lines, tail = self._buf.split(b"\n")
            self._buf = bytearray(tail)
            self._pending.extend(parse(line) for line in lines)
        if len(self._buf) > self._max_line:
            self._buf = bytearray()
            self._pending.append({"error": f"message longer than {self._max_line} bytes"})
        messages = list(self._pending)
        self._pending.clear()
        return messages

    @property
    def partial(self) -> bool:
        """Bytes of an unfinished line are waiting for their newline."""
        return bool(self._buf)

    def recv(self, sock: socket.socket) -> dict[str, Any] | None:
        """Block until one whole message arrives; None at end of stream."""
        while not self._pending:
            data = sock.recv(65536)
            if not data:
                return None
            self._pending.extend(self.feed(data))
        return self._pending.popleft()


def parse(line: bytes | bytearray) -> dict[str, Any]:
    try:
        message = json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested too deeply
        return {"error": "not a JSON object"}
    if not isinstance(message, dict):
        return {"error": "not a JSON object"}
    return message
