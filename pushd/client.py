"""A synchronous client for the pushd control socket (stdlib sockets only, no trio needed).

    from pushd.client import Client, RequestFailed

    with Client() as pushd:               # socket from default_socket_path()
        pushd.ping()
        try:
            pushd.call("some_op", key="value")
        except RequestFailed as exc:
            print(exc.code, exc.message, exc.field)

One Client holds one connection and sends one request at a time (a lock makes it safe to
share between threads, requests are then serialised). If the daemon restarted since the last
call, the stale connection is noticed before anything is sent and replaced once, transparently;
a request that may have reached the daemon is never re-sent.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from pushd.protocol import (
    PROTOCOL_VERSION,
    ProtocolError,
    Reply,
    decode_payload,
    encode_frame,
    take_frame,
)

# Replies can be much larger than requests (reports); this only guards against garbage.
MAX_REPLY_FRAME = 64 << 20

SOCKET_NAME = "control.sock"
SYSTEM_SOCKET = Path("/run/pushd") / SOCKET_NAME


def default_socket_path() -> Path:
    """Where the daemon's control socket is, when nobody says otherwise.

    1. ``$PUSHD_SOCKET``;
    2. ``$RUNTIME_DIRECTORY/control.sock`` (systemd sets it for the daemon's own unit and
       for ``ExecReload=`` commands; the first entry if it lists several);
    3. ``./var/run/control.sock`` if it exists or ``./config.toml`` exists (the daemon's
       default ``socket = "var/run/control.sock"`` is relative to its config file);
    4. ``/run/pushd/control.sock`` (the systemd unit's ``RuntimeDirectory=pushd``).
    """
    explicit = os.environ.get("PUSHD_SOCKET")
    if explicit:
        return Path(explicit)
    runtime = os.environ.get("RUNTIME_DIRECTORY")
    if runtime:
        return Path(runtime.split(":")[0]) / SOCKET_NAME
    local = Path("var") / "run" / SOCKET_NAME
    if local.exists() or Path("config.toml").exists():
        return local
    return SYSTEM_SOCKET


class PushdError(Exception):
    """Anything that went wrong talking to pushd."""


class ConnectionFailed(PushdError):
    """The daemon could not be reached, or the connection broke or timed out mid-call."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"cannot reach pushd at {path}: {reason}")
        self.path = path
        self.reason = reason


class RequestFailed(PushdError):
    """The daemon answered with an error reply."""

    def __init__(
        self, code: str, message: str, field: str | None = None, details: dict[str, Any] | None = None
    ) -> None:
        where = f" ({field})" if field else ""
        super().__init__(f"{code}{where}: {message}")
        self.code = code
        self.message = message
        self.field = field
        self.details: dict[str, Any] = details or {}


class Client:
    def __init__(self, socket_path: str | Path | None = None, *, timeout: float = 10.0) -> None:
        self.path = Path(socket_path) if socket_path is not None else default_socket_path()
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buffer = bytearray()
        self._next_id = 1
        self._lock = threading.Lock()

    # -- ops: one method per op, all through call() ------------------------------------

    def ping(self) -> Any:
        return self.call("ping")

    def status(self) -> Any:
        return self.call("status")

    def stats(self) -> Any:
        return self.call("stats")

    def reload(self) -> Any:
        return self.call("reload")

    # -- machinery ---------------------------------------------------------------------

    def call(self, op: str, /, **args: Any) -> Any:
        """Send one request and return its result; RequestFailed on an error reply,
        ConnectionFailed if the daemon cannot be reached or does not answer in time."""
        with self._lock:
            request_id = self._next_id
            self._next_id += 1
            frame = encode_frame({"v": PROTOCOL_VERSION, "id": request_id, "op": op, "args": args})
            deadline = time.monotonic() + self.timeout
            sock = self._send(frame, deadline)
            try:
                reply = self._receive_reply(sock, deadline)
            except BaseException:
                self._close()  # the stream is out of step with our requests now
                raise
            if reply.id is None:
                self._close()  # a connection-level error: the daemon is hanging up
            elif reply.id != request_id:
                self._close()
                raise ConnectionFailed(
                    self.path, f"reply id {reply.id!r} does not match request id {request_id}"
                )
            return _result(reply)

    def close(self) -> None:
        with self._lock:
            self._close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._buffer.clear()

    def _connect(self, deadline: float) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(_remaining(deadline))
            sock.connect(os.fspath(self.path))
        except OSError as exc:
            sock.close()
            raise ConnectionFailed(self.path, exc.strerror or str(exc)) from exc
        self._sock = sock
        self._buffer.clear()
        return sock

    def _send(self, frame: bytes, deadline: float) -> socket.socket:
        """Send ``frame``, on the current connection if it is still good. If the daemon hung up
        on a reused connection (it restarted, or closed it as idle) before the request could
        reach it, connect once more and send it there."""
        reused = self._sock is not None and not _peer_closed_or_talking(self._sock)
        if reused:
            assert self._sock is not None
            if self._try_send(self._sock, frame, deadline):
                return self._sock
        sock = self._connect(deadline)
        if not self._try_send(sock, frame, deadline):
            raise ConnectionFailed(self.path, "connection closed by pushd")
        return sock

    def _try_send(self, sock: socket.socket, frame: bytes, deadline: float) -> bool:
        """True if sent; False if the daemon had already hung up (the request did not reach
        it). RequestFailed if it said why before hanging up (not allowed, too many
        connections, frame too large)."""
        try:
            sock.settimeout(_remaining(deadline))
            sock.sendall(frame)
            return True
        except (BrokenPipeError, ConnectionResetError):
            early = self._pending_reply(sock)
            self._close()
            if early is not None:
                _result(early)
            return False
        except OSError as exc:
            self._close()
            raise ConnectionFailed(self.path, f"sending failed: {exc}") from exc

    def _receive_reply(self, sock: socket.socket, deadline: float) -> Reply:
        while True:
            try:
                payload = take_frame(self._buffer, max_size=MAX_REPLY_FRAME)
                if payload is not None:
                    return Reply.parse(decode_payload(payload))
            except ProtocolError as exc:
                raise ConnectionFailed(self.path, f"bad reply from pushd: {exc.message}") from exc
            try:
                sock.settimeout(_remaining(deadline))
                chunk = sock.recv(65536)
            except TimeoutError as exc:
                raise ConnectionFailed(
                    self.path, f"no reply within {self.timeout:g} s"
                ) from exc
            except OSError as exc:
                raise ConnectionFailed(self.path, f"receiving failed: {exc}") from exc
            if not chunk:
                raise ConnectionFailed(self.path, "connection closed by pushd before it replied")
            self._buffer += chunk

    def _pending_reply(self, sock: socket.socket) -> Reply | None:
        """A reply the daemon sent before hanging up, if one is already waiting for us."""
        try:
            sock.setblocking(False)
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                self._buffer += chunk
        except OSError:
            pass
        try:
            payload = take_frame(self._buffer, max_size=MAX_REPLY_FRAME)
            return Reply.parse(decode_payload(payload)) if payload is not None else None
        except ProtocolError:
            return None


def _result(reply: Reply) -> Any:
    if reply.error is not None:
        err = reply.error
        raise RequestFailed(err.code, err.message, err.field, err.details)
    return reply.result


def _remaining(deadline: float) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("deadline exceeded")
    return remaining


def _peer_closed_or_talking(sock: socket.socket) -> bool:
    """True if an idle connection is readable: the daemon closed it (EOF) or sent something
    unasked. Either way it must not carry the next request."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))
