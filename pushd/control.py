"""The control socket server: a Unix stream socket speaking :mod:`pushd.protocol`.

The daemon gives :class:`ControlServer` a table of op handlers (``{"ping": ping, ...}``); each
handler gets the request's ``args`` and the connecting :class:`Peer`, returns a msgpack-encodable
result or raises :class:`~pushd.protocol.OpError`. Replace ``server.handlers`` at any time
(reload does); the next request uses the new table.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import platform
import socket
import stat
import struct
import sys
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import trio

from pushd.protocol import (
    DEFAULT_MAX_FRAME,
    PROTOCOL_VERSION,
    ErrorCode,
    OpError,
    ProtocolError,
    Request,
    decode_payload,
    encode_frame,
    error_reply,
    ok_reply,
    read_payload,
    reject_unknown_args,
    request_id_of,
)

log = structlog.get_logger()

_PEERCRED = struct.Struct("3i")
# How long we try to deliver a refusal (too many connections, peer not allowed) before closing.
_REFUSAL_SEND_TIMEOUT = 1.0
# How long we wait for an existing socket to answer when deciding whether it is stale.
_LIVENESS_TIMEOUT = 1.0
# Decoded msgpack takes up to ~80x its size in Python objects (a 1 MiB array of empty
# maps: 72 MiB). Frames above LARGE_FRAME (a register_many, a push to thousands of listed
# devices) are decoded and handled LARGE_FRAMES_AT_ONCE at a time, so that the connection
# limit times the frame limit (64 MiB by default) cannot turn into gigabytes.
FIRST_REQUEST_TIMEOUT = 10.0  # seconds a new connection has to send its first request
LARGE_FRAME = 16 << 10
LARGE_FRAMES_AT_ONCE = 2
LARGE_FRAME_WAIT = 5.0  # seconds a large request waits for a slot (well inside clients' 10 s)
_ACCEPT_RETRY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
# SO_PEERGROUPS (Linux >= 4.13) is missing from Python's socket module; its value is 59 on
# the architectures that use the generic socket option numbers.
_SO_PEERGROUPS: int | None = getattr(socket, "SO_PEERGROUPS", None) or (
    59
    if sys.platform == "linux"
    and platform.machine() in {"x86_64", "aarch64", "i386", "i686", "armv7l", "riscv64"}
    else None
)
_NGROUPS_MAX = 65536


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()  # supplementary groups, where the kernel tells us


Handler = Callable[[dict[str, Any], Peer], Awaitable[Any]]


class SocketInUse(Exception):
    """A live daemon already answers on the control socket path."""

    def __init__(self, path: Path, message: str | None = None) -> None:
        self.path = path
        super().__init__(
            message
            or f"control socket {path} is in use: another pushd is answering on it; "
            "stop that daemon first or configure a different socket path"
        )


def peer_credentials(sock: trio.socket.SocketType | socket.socket) -> Peer:
    """The credentials of the process on the other end of a connected Unix socket, as the
    kernel recorded them at connect() time: SO_PEERCRED (pid, uid, gid) and, where
    available, SO_PEERGROUPS (supplementary groups)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, gid = _PEERCRED.unpack(raw)
    return Peer(pid=pid, uid=uid, gid=gid, groups=_peer_groups(sock))


def _peer_groups(sock: trio.socket.SocketType | socket.socket) -> tuple[int, ...]:
    if _SO_PEERGROUPS is None:
        return ()
    for count in (64, _NGROUPS_MAX):
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 4 * count)
        except OSError as exc:
            if exc.errno == errno.ERANGE:
                continue  # more groups than fit: retry with room for the maximum
            return ()  # e.g. ENOPROTOOPT on kernels before 4.13
        return struct.unpack(f"{len(raw) // 4}I", raw)
    return ()


def peer_allowed(peer: Peer, allowed_uids: Collection[int], allowed_gids: Collection[int]) -> bool:
    """True if the peer's uid, primary gid or one of its supplementary groups is allowed."""
    return (
        peer.uid in allowed_uids
        or peer.gid in allowed_gids
        or any(group in allowed_gids for group in peer.groups)
    )


async def ping(args: dict[str, Any], peer: Peer) -> dict[str, Any]:
    """A ready-made ``ping`` handler: proves the daemon's event loop answers."""
    reject_unknown_args(args)
    return {"pong": True, "protocol": PROTOCOL_VERSION, "pid": os.getpid()}


class ControlServer:
    def __init__(
        self,
        path: Path,
        handlers: Mapping[str, Handler],
        *,
        mode: int = 0o660,
        group: str | None = None,
        allowed_uids: Collection[int] = (),
        allowed_gids: Collection[int] = (),
        max_frame: int = DEFAULT_MAX_FRAME,
        max_connections: int = 64,
        idle_timeout: float = 300.0,
        allow_own_uid: bool = True,
    ) -> None:
        """``group`` (a name or a numeric gid; None or "" keeps the daemon's own) owns the
        socket file; it is looked up now, so a wrong name fails at startup (LookupError).
        The daemon's own uid is always allowed, and so are members of the socket file's
        group when ``mode`` grants that group read and write (the way the systemd unit
        lets backends in: their user in the daemon's group), unless ``allow_own_uid`` is
        False (for tests)."""
        self.path = Path(path)
        self.handlers: Mapping[str, Handler] = handlers
        self.mode = mode
        self.gid = _resolve_group(group) if group else None
        socket_gid = self.gid if self.gid is not None else os.getgid()
        group_rw = mode & 0o060 == 0o060
        # Allowed whatever the configured lists say (kept across reloads: allow_peers).
        self._own_uids = frozenset({os.getuid()}) if allow_own_uid else frozenset()
        self._own_gids = frozenset({socket_gid}) if allow_own_uid and group_rw else frozenset()
        self.allow_peers(allowed_uids, allowed_gids)
        self.max_frame = max_frame
        self._large_frames = trio.CapacityLimiter(LARGE_FRAMES_AT_ONCE)
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.active_connections = 0
        self._in_progress = 0  # requests being handled or answered
        self._settled = trio.Event()  # set (and replaced) whenever that count drops to 0
        self.total_connections = 0
        self.requests_served = 0

    def allow_peers(self, uids: Collection[int], gids: Collection[int]) -> None:
        """Set the configured peers (a reload may change them); the daemon's own uid and
        the socket's group stay allowed."""
        self.allowed_uids = frozenset(uids) | self._own_uids
        self.allowed_gids = frozenset(gids) | self._own_gids

    def stats(self) -> dict[str, int]:
        """Counters for the daemon's ``stats`` op."""
        return {
            "connections_active": self.active_connections,
            "connections_total": self.total_connections,
            "requests": self.requests_served,
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind, listen and serve until cancelled; removes the socket file on exit.

        Raises SocketInUse if another live server answers on the path, FileExistsError if
        the path exists and is not a socket.
        """
        await self._clear_stale_socket()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        identity: tuple[int, int] | None = None
        try:
            await sock.bind(os.fspath(self.path))
            st = os.stat(self.path)
            identity = (st.st_dev, st.st_ino)
            # Nobody can connect before listen(), so the file is never reachable with looser
            # permissions than configured.
            if self.gid is not None:
                os.chown(self.path, -1, self.gid)
            os.chmod(self.path, self.mode)
            sock.listen(socket.SOMAXCONN)
            listener = trio.SocketListener(sock)
            log.info("control socket listening", path=str(self.path), mode=oct(self.mode))
            task_status.started()
            async with trio.open_nursery() as nursery:
                await self._accept_loop(listener, nursery)
        finally:
            sock.close()
            if identity is not None:
                self._remove_socket_file(identity)

    async def _clear_stale_socket(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(
                errno.EEXIST,
                "control socket path exists and is not a socket; refusing to replace it",
                os.fspath(self.path),
            )
        probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with trio.move_on_after(_LIVENESS_TIMEOUT) as scope:
                await probe.connect(os.fspath(self.path))
            if scope.cancelled_caught:
                raise SocketInUse(self.path, f"control socket {self.path} does not answer "
                                  "promptly but accepts connections: another pushd may be "
                                  "running on it; refusing to replace it")
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("replacing stale control socket", path=str(self.path))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            return
        except OSError as exc:
            raise SocketInUse(self.path, f"cannot tell whether control socket {self.path} is "
                              f"in use ({exc}); refusing to replace it") from exc
        finally:
            probe.close()
        raise SocketInUse(self.path)

    def _remove_socket_file(self, identity: tuple[int, int]) -> None:
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == identity:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not remove control socket", path=str(self.path), error=str(exc))

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in _ACCEPT_RETRY_ERRNOS:
                    raise
                log.warning("control socket accept failed; retrying", error=str(exc))
                await trio.sleep(0.1)
                continue
            self.total_connections += 1
            if self.active_connections >= self.max_connections:
                log.warning("control connection refused: too many connections",
                            limit=self.max_connections)
                await self._refuse(stream, OpError(
                    ErrorCode.UNAVAILABLE,
                    f"too many control connections (limit {self.max_connections}); try again later",
                ))
                continue
            self.active_connections += 1
            nursery.start_soon(self._connection_task, stream)

    async def _refuse(self, stream: trio.SocketStream, err: OpError) -> None:
        with trio.move_on_after(_REFUSAL_SEND_TIMEOUT):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(encode_frame(error_reply(None, err)))
        await trio.aclose_forcefully(stream)

    async def _connection_task(self, stream: trio.SocketStream) -> None:
        try:
            peer = peer_credentials(stream.socket)
            logger = log.bind(peer_pid=peer.pid, peer_uid=peer.uid)
            if not peer_allowed(peer, self.allowed_uids, self.allowed_gids):
                logger.warning("control connection refused: peer not allowed", peer_gid=peer.gid)
                await self._refuse(stream, OpError(
                    ErrorCode.NOT_ALLOWED,
                    f"uid {peer.uid} / gid {peer.gid} may not use this control socket",
                ))
                return
            await self._serve(stream, peer, logger)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the peer went away; nothing to tell it
        except Exception:
            log.exception("control connection failed")
        finally:
            self.active_connections -= 1
            await trio.aclose_forcefully(stream)

    async def _serve(self, stream: trio.SocketStream, peer: Peer, logger: Any) -> None:
        buffer = bytearray()
        served = False  # a request came on this connection
        while True:
            try:
                # A connection must send its first request soon (clients connect to send
                # one): silent connections cannot hold the connection limit for long.
                wait = self.idle_timeout if served else min(self.idle_timeout, FIRST_REQUEST_TIMEOUT)
                with trio.move_on_after(wait) as idle:
                    payload = await read_payload(stream, max_size=self.max_frame, buffer=buffer)
                if idle.cancelled_caught:
                    logger.info("closing idle control connection", idle_timeout=wait)
                    return
                served = True
                if payload is None:
                    return
                self._in_progress += 1
                try:
                    reply: bytes | dict[str, Any]
                    if len(payload) > LARGE_FRAME:
                        reply = await self._large(payload, peer, logger)
                    else:
                        reply = await self._dispatch(decode_payload(payload), peer, logger)
                    sent = await self._send(stream, reply)
                finally:
                    self._in_progress -= 1
                    if not self._in_progress:
                        self._settled.set()
                        self._settled = trio.Event()
            except ProtocolError as exc:
                # The byte stream cannot be resynchronised: say why, then hang up.
                logger.warning("bad control frame; closing connection", code=str(exc.code),
                               error=exc.message)
                await self._send(stream, error_reply(None, OpError(exc.code, exc.message)))
                return
            if not sent:
                logger.info("closing control connection: peer does not read its replies")
                return

    async def settle(self) -> None:
        """Return once no request is being handled or answered: at shutdown, so that the
        requests answered last (pushes told they were not accepted) get their replies out
        before the connections are closed. The caller bounds the wait."""
        while self._in_progress:
            await self._settled.wait()

    async def _large(self, payload: bytes, peer: Peer, logger: Any) -> bytes | dict[str, Any]:
        """A large request: decoded and handled once one of LARGE_FRAMES_AT_ONCE slots is
        free; refused, undecoded and undone, if none frees up within LARGE_FRAME_WAIT."""
        acquired = False
        with trio.move_on_after(LARGE_FRAME_WAIT):
            await self._large_frames.acquire()
            acquired = True
        if not acquired:
            logger.warning("large control request refused: others in progress", size=len(payload))
            return error_reply(None, OpError(
                ErrorCode.UNAVAILABLE,
                f"{LARGE_FRAMES_AT_ONCE} large requests in progress for {LARGE_FRAME_WAIT:g}s; "
                "nothing was done, try again",
            ))
        try:
            return await self._dispatch(decode_payload(payload), peer, logger)
        finally:
            self._large_frames.release()

    async def _dispatch(self, obj: Any, peer: Peer, logger: Any) -> bytes:
        """Run one request through its handler; always returns an encoded reply frame."""
        self.requests_served += 1
        request_id = request_id_of(obj)
        op = obj.get("op") if isinstance(obj, dict) else None
        try:
            request = Request.parse(obj)
            handler = self.handlers.get(request.op)
            if handler is None:
                raise OpError(
                    ErrorCode.UNKNOWN_OP,
                    f"unknown op {request.op!r}",
                    field="op",
                    details={"ops": sorted(self.handlers)},
                )
            result = await handler(request.args, peer)
            # Encoding happens here so that an unencodable result is an INTERNAL error too.
            return encode_frame(ok_reply(request_id, result))
        except OpError as err:
            try:
                return encode_frame(error_reply(request_id, err))
            except Exception as exc:  # e.g. details that msgpack cannot encode
                return self._internal_error(request_id, op, exc, logger)
        except Exception as exc:
            return self._internal_error(request_id, op, exc, logger)

    def _internal_error(self, request_id: int | str | None, op: Any, exc: Exception, logger: Any) -> bytes:
        logger.error("control op failed", op=op, exc_info=exc)
        return encode_frame(error_reply(request_id, OpError(
            ErrorCode.INTERNAL,
            f"internal error ({type(exc).__name__}); see the daemon log",
        )))

    async def _send(self, stream: trio.SocketStream, reply: bytes | dict[str, Any]) -> bool:
        """Send one reply; False if the peer did not take it within ``idle_timeout``."""
        data = reply if isinstance(reply, bytes) else encode_frame(reply)
        with trio.move_on_after(self.idle_timeout):
            await stream.send_all(data)
            return True
        return False


def _resolve_group(group: str) -> int:
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise LookupError(f"unknown group {group!r} for the control socket") from None
