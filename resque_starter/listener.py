"""What the control socket and the metrics endpoint share: a listening socket served from the
supervisor's selector loop, non-blocking, holding few connections, each answered once then closed."""

from __future__ import annotations

import contextlib
import selectors
import socket
from typing import Generic, TypeVar

MAX_CLIENTS = 32  # connections a server holds at once: idle clients cannot use up the fds

Client = TypeVar("Client")


class Listener(Generic[Client]):
    """Subclasses bind `self.sock`, call `listen()`, and implement `new_client` and `read`."""

    sock: socket.socket

    def __init__(self, selector: selectors.BaseSelector) -> None:
        self._selector = selector
        self._clients: dict[socket.socket, Client] = {}

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
            self._selector.register(conn, selectors.EVENT_READ, self.read)

    def linger(self, conn: socket.socket) -> None:
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

    def drop(self, conn: socket.socket) -> None:
        self._selector.unregister(conn)
        del self._clients[conn]
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
