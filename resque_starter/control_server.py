"""The control socket's server side: how `resque-starter ctl` reaches the supervisor, whoever is PID 1.

A Unix stream socket in RUN_DIR, mode 0600. One JSON request line, one JSON reply line, then the
server closes. It runs inside the supervisor's event loop, non-blocking and bounded (listener.Listener),
and hands each request to one function, the supervisor's command dispatcher: it knows nothing else of
the supervisor. The client side is control.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket

from resque_starter import protocol
from resque_starter.commands import Dispatch, Reply
from resque_starter.config import ConfigError
from resque_starter.listener import Listener

log = logging.getLogger("resque_starter.control")

SOCKET_NAME = "control.sock"
# The largest reply kept for one client (status of ~4,000 workers): with MAX_CLIENTS clients reading
# slowly, at most 32 x 8 MiB waits in PID 1. A larger reply is refused with an error that fits.
MAX_REPLY = 8 << 20


def socket_path(run_dir: str) -> str:
    return os.path.join(run_dir, SOCKET_NAME)


class ControlServer(Listener[protocol.LineBuffer]):
    def __init__(self, run_dir: str, selector: selectors.BaseSelector, dispatch: Dispatch) -> None:
        super().__init__(selector)
        self.path = socket_path(run_dir)
        self._dispatch = dispatch
        _remove_stale(self.path, run_dir)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            self.sock.bind(self.path)
        except OSError as exc:
            allowed = f"a writable directory ({exc.strerror})"
            raise ConfigError("RESQUE_STARTER_RUN_DIR", run_dir, allowed) from None
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        self.listen()

    def new_client(self) -> protocol.LineBuffer:
        return protocol.LineBuffer()

    def read(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        buffer = self._clients[conn]
        if not data:
            if buffer.partial:  # the client half-closed in the middle of its request line
                self._answer(conn, {"ok": False, "error": "bad request: end of stream before a newline"})
            else:
                self.drop(conn)
            return
        end = data.find(b"\n")  # one request per connection: what follows its line is never parsed
        messages = buffer.feed(data if end < 0 else data[: end + 1])
        if not messages:
            return
        request = messages[0]
        if "error" in request and "cmd" not in request:
            reply = {"ok": False, "error": f"bad request: {request['error']}"}
        else:
            try:
                reply = self._dispatch(request)
            except Exception as exc:  # a bad request must never take the supervisor down
                log.exception("control request %r failed", request)
                reply = {"ok": False, "error": f"internal error: {exc}"}
        self._answer(conn, reply)

    def _answer(self, conn: socket.socket, reply: Reply) -> None:
        data = protocol.encode(reply)
        if len(data) > MAX_REPLY:
            too_large = f"the reply ({len(data)} bytes) is larger than the {MAX_REPLY} bytes a client is sent"
            data = protocol.encode({"ok": False, "error": too_large})
        self.reply(conn, data)

    def close(self) -> None:
        super().close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def _remove_stale(path: str, run_dir: str) -> None:
    """A socket nobody answers on is a dead supervisor's: replace it; a live one is an error."""
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
        return
    finally:
        probe.close()
    allowed = f"a run dir no other running supervisor uses ({path} answers)"
    raise ConfigError("RESQUE_STARTER_RUN_DIR", run_dir, allowed)
