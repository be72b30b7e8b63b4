"""An ``httpx.AsyncBaseTransport`` over pushd's own trio-native HTTP/2 connection pool.

    async with open_transport("api.push.apple.com", 443, ssl_context) as transport:
        async with httpx.AsyncClient(transport=transport, base_url=...) as client:
            response = await client.post("/3/device/<token>", headers=..., content=...)

Every request goes to the pool's host, whatever the URL's host says (the ``:authority``
follows the URL).  The hot path (``apns.sender``) bypasses httpx and submits prebuilt header
lists to the pool directly; this transport is for code that wants httpx's interface.

Failures surface as httpx exceptions, as the transport interface expects:
``httpx.ConnectError`` (no connection came up in time), ``httpx.ReadTimeout`` (no answer
in time; the stream was reset) and ``httpx.RemoteProtocolError`` (the connection died with
the request in flight).  Requests the server never processed (GOAWAY, REFUSED_STREAM) are
re-sent on another connection.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx
import trio

from apns.connection import (
    ConnectionPool,
    ConnectionSettings,
    Failure,
    Headers,
    Request,
    Response,
    refuses_credentials,
)

__all__ = ["APNsTransport", "open_transport"]

#: Header names that are connection-specific in HTTP/1.1 and forbidden in HTTP/2 (RFC 9113
#: 8.2.2); ``host`` becomes ``:authority``.
_DROPPED = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"host"}
)
_MAX_HANDBACKS = 10


class APNsTransport(httpx.AsyncBaseTransport):
    """Send httpx requests over ``pool`` (which must be running)."""

    def __init__(self, pool: ConnectionPool, *, timeout: float = 10.0) -> None:
        self._pool = pool
        self._timeout = timeout

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout", {})
        read_timeout = timeouts.get("read") or self._timeout
        connect_timeout = timeouts.get("connect") or self._timeout
        url = request.url
        headers: Headers = [
            (b":method", request.method.encode("ascii")),
            (b":scheme", url.raw_scheme),
            (b":authority", url.netloc),
            (b":path", url.raw_path),
        ]
        for name, value in request.headers.raw:
            name = name.lower()
            if name not in _DROPPED and not (name == b"te" and value.lower() != b"trailers"):
                headers.append((name, value))
        body = await request.aread()

        for _ in range(_MAX_HANDBACKS):
            done = trio.Event()
            pending = Request(headers, body, trio.current_time() + read_timeout, _setter(done))
            while not self._pool.submit(pending):
                if self._pool.refusal is not None:
                    raise httpx.ConnectError(
                        f"APNs refused the credentials: {self._pool.refusal}", request=request
                    )
                with trio.move_on_after(connect_timeout) as scope:
                    await self._pool.wait_ready()
                if scope.cancelled_caught:
                    raise httpx.ConnectError(
                        f"no connection to {self._pool.host}:{self._pool.port}", request=request
                    )
            await done.wait()
            result = pending.result
            if isinstance(result, Response):
                return httpx.Response(
                    result.status,
                    headers=[(k, v) for k, v in result.headers if not k.startswith(b":")],
                    content=result.body,
                    extensions={"http_version": b"HTTP/2"},
                    request=request,
                )
            if result is Failure.TIMEOUT:
                raise httpx.ReadTimeout(pending.detail, request=request)
            if result is Failure.LOST:
                raise httpx.RemoteProtocolError(pending.detail, request=request)
            if refuses_credentials(pending.goaway_reason):
                raise httpx.ConnectError(
                    f"APNs refused the credentials: {pending.goaway_reason}", request=request
                )
            # Failure.NOT_SENT: never processed; send it again
        raise httpx.RemoteProtocolError("request refused by every connection", request=request)


def _setter(event: trio.Event) -> Callable[[Request], None]:
    def on_done(_request: Request) -> None:
        event.set()

    return on_done


@asynccontextmanager
async def open_transport(
    host: str,
    port: int,
    ssl_context: ssl.SSLContext,
    *,
    connections: int = 1,
    settings: ConnectionSettings | None = None,
    request_timeout: float = 10.0,
) -> AsyncIterator[APNsTransport]:
    """A running pool and a transport over it, for the duration of the block."""
    pool = ConnectionPool(
        host, port, ssl_context, settings or ConnectionSettings(), size=connections
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        try:
            yield APNsTransport(pool, timeout=request_timeout)
        finally:
            nursery.cancel_scope.cancel()
