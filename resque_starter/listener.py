"""What the control socket and the metrics endpoint share: a listening socket served from the
supervisor's selector loop, non-blocking, holding few connections, each answered once then closed.

PID 1 never blocks on a client: a reply is written as far as the socket takes it and the rest is kept
(bounded by the server) and sent as the client reads (EVENT_WRITE). A client that has not sent its
request, or not read its reply, within CLIENT_TIMEOUT is dropped; so is the oldest past MAX_CLIENTS.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import time
from typing import Generic, TypeVar

MAX_CLIENTS = 32  # connections a server holds at once: idle clients cannot use up the fds
CLIENT_TIMEOUT = 10.0  # seconds a connection may stay, whatever it does: ctl's own timeout

Client = TypeVar("Client")


class Listener(Generic[Client]):
    """Subclasses bind `self.sock`, call `listen()`, implement `new_client` and `read`, and answer with
    `reply`. The supervisor calls `expire()` when `next_deadline()` comes."""

    sock: socket.socket

    def __init__(self, selector: selectors.BaseSelector) -> None:
        self._selector = selector
        self._clients: dict[socket.socket, Client] = {}
        self._deadlines: dict[socket.socket, float] = {}  # in accept order, so the first is the soonest
        self._unsent: dict[socket.socket, memoryview] = {}

    def listen(self) -> None:
        self.sock.listen(64)
        self.sock.setblocking(False)
        self._selector.register(self.sock, selectors.EVENT_READ, self._accept)

    def new_client(self) -> Client:
        raise NotImplementedError

    def read(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def _accept(self, sock: socket.socket) -> None:
        """Every connection waiting, so a burst cannot fill the backlog; past MAX_CLIENTS held
        connections the oldest is dropped."""
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:  # none left, or out of fds: the next wakeup tries again
                return
            if len(self._clients) >= MAX_CLIENTS:
                self.drop(next(iter(self._clients)))
            conn.setblocking(False)
            self._clients[conn] = self.new_client()
            self._deadlines[conn] = time.monotonic() + CLIENT_TIMEOUT
            self._selector.register(conn, selectors.EVENT_READ, self.read)

    def reply(self, conn: socket.socket, data: bytes) -> None:
        """Send the whole answer without blocking, then linger: what the socket does not take now is
        sent as the client reads. The caller bounds `data` (a subclass's largest reply)."""
        self._unsent[conn] = memoryview(data)
        self._selector.modify(conn, selectors.EVENT_WRITE, self._flush)
        self._flush(conn)

    def _flush(self, conn: socket.socket) -> None:
        data = self._unsent[conn]
        try:
            sent = conn.send(data)
        except BlockingIOError:
            return
        except OSError:  # the client is gone: nothing left to tell it
            self.drop(conn)
            return
        if sent < len(data):
            self._unsent[conn] = data[sent:]
            return
        del self._unsent[conn]
        self._linger(conn)

    def _linger(self, conn: socket.socket) -> None:
        """After the reply: half-close, and discard what the client still sends until it closes. Closing
        with unread input (an oversized request) would reset the connection and could lose the reply."""
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_WR)

        def discard(conn: socket.socket) -> None:
            try:
                if conn.recv(65536):
                    return
            except BlockingIOError:
                return
            except OSError:
                pass
            self.drop(conn)

        self._selector.modify(conn, selectors.EVENT_READ, discard)

    def next_deadline(self) -> float | None:
        """When the oldest connection is due to be dropped (time.monotonic), if any is held."""
        return next(iter(self._deadlines.values()), None)

    def expire(self) -> None:
        """Drop every connection held longer than CLIENT_TIMEOUT: a client that never finishes its
        request or never reads its reply holds nothing of ours for long."""
        now = time.monotonic()
        for conn, deadline in list(self._deadlines.items()):
            if deadline > now:
                return
            self.drop(conn)

    def drop(self, conn: socket.socket) -> None:
        self._selector.unregister(conn)
        del self._clients[conn]
        del self._deadlines[conn]
        self._unsent.pop(conn, None)
        conn.close()

    def close_in_child(self) -> None:
        """A forked child must not hold the listening socket or any client."""
        self.sock.close()
        for conn in self._clients:
            conn.close()

    def close(self) -> None:
        for conn in list(self._clients):
            self.drop(conn)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(self.sock)
        self.sock.close()
