"""JSON-lines messages between the supervisor, the mold, the workers and `ctl`.

One message is one JSON object on one line. Sockets are Unix stream sockets; a spawn request
carries the worker's status socket as an SCM_RIGHTS file descriptor.
"""

from __future__ import annotations

import json
import os
import socket
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

MAX_LINE = 64 * 1024
# A worker's exit code when Redis could not be reached (EX_TEMPFAIL): the supervisor names the cause.
EXIT_REDIS_UNREACHABLE = 75
MAX_OUTBOX = 1024 * 1024  # bytes PID 1 holds for one child that does not read; more means it is hung


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


class Outbox:
    """What PID 1 has to say to one child, written only as far as its socket takes it without blocking
    (the loop calls `flush` again when the socket is writable). Bounded: `put` refuses a message that
    would take it past `limit`, for a child that stops reading must not grow PID 1 or stop its loop.
    File descriptors passed along are the outbox's to close, once sent or dropped."""

    def __init__(self, sock: socket.socket, limit: int = MAX_OUTBOX) -> None:
        self._sock = sock
        self._limit = limit
        self._chunks: deque[tuple[memoryview, list[int]]] = deque()
        self._size = 0

    @property
    def pending(self) -> bool:
        return bool(self._chunks)

    def put(self, message: dict[str, Any], fds: list[int] | None = None) -> bool:
        """Queue one message and send what can be sent now; False (fds closed) when it does not fit.
        OSError when the peer is gone."""
        data = encode(message)
        if self._size + len(data) > self._limit:
            _close(fds or [])
            return False
        self._chunks.append((memoryview(data), list(fds or [])))
        self._size += len(data)
        self.flush()
        return True

    def flush(self) -> None:
        """Send as much as the socket takes now; OSError (not would-block) when the peer is gone."""
        while self._chunks:
            data, fds = self._chunks[0]
            try:
                if fds:  # the descriptors travel with the first byte of their message
                    sent = socket.send_fds(self._sock, [data], fds, socket.MSG_DONTWAIT)
                else:
                    sent = self._sock.send(data, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            _close(fds)
            self._size -= sent
            if sent < len(data):
                self._chunks[0] = (data[sent:], [])
            else:
                self._chunks.popleft()

    def close(self) -> None:
        """Drop what was not sent, closing the descriptors it held."""
        for _, fds in self._chunks:
            _close(fds)
        self._chunks.clear()
        self._size = 0


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


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
