"""A synchronous client for the pushd control socket (stdlib sockets only, no trio needed).

    from pushd.client import Client, RequestFailed

    with Client() as pushd:               # socket from default_socket_path()
        pushd.ping()
        pushd.register(device_id="d1", token=hex_token, topic="com.example.app", ...)
        try:
            accepted = pushd.push({"aps": {"alert": "hi"}, "topic": "com.example.app"},
                                  {"users": ["u1"]})
        except RequestFailed as exc:
            print(exc.code, exc.message, exc.field)
        final = pushd.wait(accepted["message_id"], timeout=60)

Every op has a method; :meth:`Client.call` reaches any op by name. docs/client.md is the guide.

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
from collections.abc import Callable, Iterable, Mapping
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


class WaitTimeout(PushdError, TimeoutError):
    """:meth:`Client.wait` gave up: the message still had pending items (or its fan-out
    was still running) when the timeout expired. ``state`` is the last state seen."""

    def __init__(self, message_id: str, timeout: float, state: dict[str, Any]) -> None:
        pending = pending_items(state)
        super().__init__(
            f"message {message_id} not settled after {timeout:g} s "
            f"({pending} item(s) pending, fan-out {state.get('fanout', '?')})"
        )
        self.message_id = message_id
        self.timeout = timeout
        self.state = state


def pending_items(state: Mapping[str, Any]) -> int:
    """Items of a message state (a ``message`` result) still queued or leased."""
    states = state.get("states") or {}
    return int(states.get("queued", 0)) + int(states.get("leased", 0))


def settled(state: Mapping[str, Any]) -> bool:
    """True when nothing of the message is queued or leased and its fan-out is not
    running any more: every item has its final state (sent, failed, skipped, dead or
    expired). A fan-out that ``failed`` also ends the wait; check ``state["fanout"]``."""
    return pending_items(state) == 0 and state.get("fanout") != "running"


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

    # -- the push pipeline -------------------------------------------------------------

    def register(self, **fields: Any) -> dict[str, Any]:
        """Register (or update) one device: ``device_id``, ``token``, ``environment``,
        ``topic``, ``model``, ``os_version``, ``app_version``, ``locale``, ``time_zone``,
        ``user_id``, ``contact_ids``, ``attributes``, ``permissions``, ``consent``.
        Returns ``{device_id, change, token_rotated, user_changed, revived}``."""
        result: dict[str, Any] = self.call("register", **fields)
        return result

    def register_many(self, devices: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
        """Register up to 1000 devices in one request, all or none (an error names the
        entry, e.g. ``devices[3].locale``). Returns ``{registered, changes}``."""
        result: dict[str, Any] = self.call("register_many", devices=[dict(d) for d in devices])
        return result

    def unregister(self, device_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.call("unregister", device_id=device_id)
        return result

    def device(self, device_id: str) -> dict[str, Any]:
        """One device as the daemon knows it (token redacted)."""
        result: dict[str, Any] = self.call("device", device_id=device_id)
        return result

    def push(
        self,
        notification: Mapping[str, Any],
        target: Mapping[str, Any],
        *,
        priority: int = 10,
        ttl: float | None = None,
        expiration: int | None = None,
        category: str | None = None,
        follow_up: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Hand a notification to pushd. ``target`` is one of ``{"devices": [...]}``,
        ``{"users": [...]}``, ``{"classes": [...]}``, ``{"filter": rule}``, ``{"all": True}``.
        Returns ``{message_id, targeted}`` once the message is stored durably."""
        args: dict[str, Any] = {
            "notification": dict(notification), "target": dict(target), "priority": priority,
        }
        optional = {"ttl": ttl, "expiration": expiration, "category": category,
                    "follow_up": None if follow_up is None else dict(follow_up)}
        args.update({k: v for k, v in optional.items() if v is not None})
        result: dict[str, Any] = self.call("push", **args)
        return result

    def message(self, message_id: str, page: int = 0, page_size: int = 100) -> dict[str, Any]:
        """A message's progress: counts per ``states``/``outcomes``/``reasons``, ``fanout``
        ("running", "done" or "failed") and one page of per-device outcomes."""
        result: dict[str, Any] = self.call(
            "message", message_id=message_id, page=page, page_size=page_size
        )
        return result

    def classes(self) -> list[dict[str, Any]]:
        """The configured device classes, in match order: ``[{id, description, rule}]``."""
        result = self.call("classes")
        classes: list[dict[str, Any]] = result["classes"] if isinstance(result, Mapping) else result
        return classes

    def report(
        self,
        user_id: str,
        name: str,
        *,
        device_id: str | None = None,
        attributes: Mapping[str, Any] | None = None,
        at: float | None = None,
    ) -> Any:
        """Report an app event (opened a notification, made a purchase...) for push
        analysis. ``at`` is unix seconds (default: when the daemon receives it)."""
        args: dict[str, Any] = {"user_id": user_id, "name": name}
        if device_id is not None:
            args["device_id"] = device_id
        if attributes is not None:
            args["attributes"] = dict(attributes)
        if at is not None:
            args["at"] = at
        return self.call("report", **args)

    def wait(
        self,
        message_id: str,
        *,
        timeout: float | None,
        poll: float = 0.2,
        page_size: int = 100,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll :meth:`message` until the message is settled (see :func:`settled`) and
        return its final state. ``on_progress(state)`` is called after every poll.
        :class:`WaitTimeout` if it is still pending after ``timeout`` seconds (None: no
        limit). Other requests may use this client between polls."""
        if poll <= 0:
            raise ValueError("poll must be positive")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            state = self.message(message_id, page_size=page_size)
            if on_progress is not None:
                on_progress(state)
            if settled(state):
                return state
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise WaitTimeout(message_id, timeout or 0.0, state)
                time.sleep(min(poll, remaining))
            else:
                time.sleep(poll)

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
