"""One trio-native HTTP/2 client connection to APNs, and a self-healing pool of them.

The hot path never creates a task per request: a caller builds :class:`Request` objects
(prebuilt header lists), hands them to :meth:`Connection.submit` (or
:meth:`ConnectionPool.submit`), and is told through the request's ``on_done`` callback when
``request.result`` is set.  A connection runs four tasks: a reader (the only caller of
``receive_some``), a writer (the only caller of ``send_all``; it coalesces whatever h2 has
buffered since its last wake-up, so requests submitted in the same tick leave in one write),
a timer for per-request deadlines, and an idle PING watchdog.

Results are either a :class:`Response` or a :class:`Failure`:

- ``Failure.NOT_SENT``: the server never processed the request (still queued locally,
  refused with REFUSED_STREAM, or above a GOAWAY's last stream id): resend it elsewhere.
- ``Failure.LOST``: the connection died with the request in flight.
- ``Failure.TIMEOUT``: no answer before the deadline; the stream was reset, the slot freed.

With token auth each connection adds the ``authorization`` header itself, from its own
:class:`~apns.auth.ConnectionToken` (a young connection keeps its token across the shared
token's change, which APNs would refuse it).
"""

from __future__ import annotations

import bisect
import enum
import json
import math
import random
import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hpack
import structlog
import trio

from apns.auth import ConnectionToken, TokenAuth
from apns.outcome import REASONS, OutcomeClass

log = structlog.get_logger()

Headers = list[tuple[bytes, bytes]]

#: Our receive window for the whole connection (responses are small; this mainly keeps the
#: bytes of responses to streams we reset from ever throttling the connection).
_CONNECTION_WINDOW = 1 << 24
# Bytes per read: ~40 small responses, handled in one turn. Every task's turn is a wait
# for an urgent push at each of its hops (benchmarks: 8 KB turns made the event loop's
# rounds p99 20 ms during a broadcast, and head-of-line p99 ~110 ms; 2 KB with smaller
# slices elsewhere (apns.sender.SUBMIT_SLICE, actors.node.VERIFY_SLICE,
# actors.central.CLASSIFY_SLICE): 17 ms and ~80 ms, the same throughput).
READ_CHUNK = 2048
# Answers after which this connection is finished and a new one opened (apns-reference §4):
# TooManyProviderTokenUpdates: it saw a new provider token too soon after the last one
# (apns.auth.ConnectionToken avoids that; another process sharing the connection's key
# cannot cause it, APNs counts per connection) and stays refused for a while;
# Shutdown: that APNs server is going away; UnrelatedKeyIdInToken: the connection is tied
# to another key; ExpiredProviderToken: APNs wedges the connection afterwards (pushy).
NEW_CONNECTION_REASONS = frozenset(
    {"TooManyProviderTokenUpdates", "Shutdown", "UnrelatedKeyIdInToken", "ExpiredProviderToken"}
)
# seconds a connection must have lived (and answered) for its end to reconnect at once
# instead of after a backoff (ConnectionPool._keep_connected)
HEALTHY_CONNECTION = 10.0
# seconds: the most a connection that answered, then died young, waits to be reopened
YOUNG_RECONNECT_MAX = 1.0

class _H2Connection(h2.connection.H2Connection):
    """h2's client connection, still receiving after a GOAWAY.

    h2 moves its state machine to CLOSED as it parses a GOAWAY, and then refuses every
    later frame of the same read, so the answers APNs still owes to streams up to the
    GOAWAY's last stream id (RFC 9113 §6.8) were lost, and their pushes sent again, when
    they came in the same read as the GOAWAY. We open no new streams after a GOAWAY
    (:meth:`Connection._on_goaway`), so receiving stays open from the frame on."""

    def _receive_goaway_frame(self, frame: Any) -> Any:
        result = super()._receive_goaway_frame(frame)
        self.state_machine.state = h2.connection.ConnectionState.CLIENT_OPEN
        return result


_H2_CONFIG = h2.config.H2Configuration(
    client_side=True,
    validate_outbound_headers=False,
    normalize_outbound_headers=False,
    validate_inbound_headers=False,
    header_encoding=None,
)


class _HeaderEncoder(hpack.Encoder):
    """hpack's encoder, minus two costs that dominate it for pushd's header lists.

    - No Huffman coding: in pure Python it costs more than the rest of the request for the
      literals that change every time (``:path``, ``apns-id``); blocks grow a few dozen bytes.
    - A memo of headers that encode as a bare table index (the ones every request repeats):
      their bytes stay valid until the dynamic table changes, which happens exactly when some
      indexable header does *not* encode as an index, and then the memo is dropped.
    """

    def __init__(self) -> None:
        super().__init__()
        self._memo: dict[tuple[bytes, bytes], bytes] = {}

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        memo = self._memo
        if self.header_table.resized:  # the peer changed the table size
            memo.clear()
            return super().encode(headers, huffman=False)
        block = []
        for header in headers:
            if type(header) is not tuple:  # NeverIndexedHeaderTuple: literal, never cached
                block.append(self.add(header, sensitive=not header.indexable))
                continue
            encoded = memo.get(header)
            if encoded is None:
                encoded = self.add(header, sensitive=False)
                if encoded[0] & 0x80:  # indexed representation
                    memo[header] = encoded
                else:  # added to the dynamic table: every cached index may have moved
                    memo.clear()
            block.append(encoded)
        return b"".join(block)


class Failure(enum.Enum):
    NOT_SENT = "not_sent"
    LOST = "lost"
    TIMEOUT = "timeout"


@dataclass(slots=True)
class Response:
    status: int
    headers: Headers
    body: bytes


class Request:
    """One HTTP/2 request: pseudo-headers first, names lower-case, no connection headers.

    ``on_done(request)`` is called exactly once, synchronously, when ``result`` is set;
    it must be cheap and must not raise.
    """

    __slots__ = (
        "_chunks",
        "_offset",
        "_resp_headers",
        "_status",
        "authorization",
        "body",
        "deadline",
        "detail",
        "goaway_reason",
        "headers",
        "on_done",
        "result",
        "stream_id",
    )

    def __init__(
        self,
        headers: Headers,
        body: bytes,
        deadline: float,
        on_done: Callable[[Request], None],
    ) -> None:
        self.headers = headers
        self.body = body
        self.deadline = deadline
        self.on_done = on_done
        self.result: Response | Failure | None = None
        self.detail = ""
        self.goaway_reason: str | None = None  # APNs reason of the GOAWAY that handed it back
        self.stream_id = 0  # the HTTP/2 stream it went out on; 0 if it never left the queue
        self.authorization = b""  # the provider token the connection sent it with (if any)
        self._offset = 0
        self._status = 0
        self._resp_headers: Headers = []
        self._chunks: list[bytes] = []

    def _finish(self, result: Response | Failure, detail: str = "") -> None:
        if self.result is not None:
            return
        self.result = result
        self.detail = detail
        self.on_done(self)


class ConnectError(Exception):
    """The connection could not be established (TCP, TLS, ALPN or the HTTP/2 preface)."""


@dataclass(slots=True)
class ConnectionSettings:
    max_streams: int = 1000
    connect_timeout: float = 10.0
    idle_ping_interval: float = 60.0
    ping_timeout: float = 10.0
    # Awaited before each read: lets the owner hold back a bulk connection's reading
    # while more urgent work needs the thread (None: a plain checkpoint-free read).
    pace: Callable[[], Awaitable[None]] | None = None


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Jittered exponential backoff: attempt 1 waits base/2..base, doubling up to cap."""
    delay = min(cap, base * 2 ** max(0, attempt - 1))
    return delay / 2 + rng.uniform(0, delay / 2)


class Connection:
    """One HTTP/2 connection over TLS; see the module docstring."""

    def __init__(
        self,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext,
        settings: ConnectionSettings,
        *,
        token: ConnectionToken | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self._ssl_context = ssl_context
        self._settings = settings
        self._token = token  # token auth: adds each request's authorization header
        self._h2 = _H2Connection(config=_H2_CONFIG)
        self._h2.encoder = _HeaderEncoder()
        self._queue: deque[Request] = deque()  # waiting for a stream slot
        self._active: dict[int, Request] = {}  # stream id -> request
        self._deadlines: deque[Request] = deque()  # by deadline, lazily pruned
        self._blocked: dict[int, Request] = {}  # streams whose body waits for window
        self._limit = 1
        self._accepting = False
        self._goaway = False
        self._draining = False  # closing once the open streams are answered (see _drain)
        self.goaway_reason: str | None = None  # the APNs reason in the server's GOAWAY
        self._closed = False
        self._peer_failed = False  # EOF, a broken socket or an unanswered PING
        self.close_reason = ""
        self.responses = 0
        self._wake = trio.Event()
        self._settings_received = trio.Event()
        self._ping_ack = trio.Event()
        self._timer_scope: trio.CancelScope | None = None
        self._cancel_scope = trio.CancelScope()
        self._last_received = 0.0

    # -- public state ------------------------------------------------------------------

    @property
    def accepting(self) -> bool:
        """True while new requests may be submitted."""
        return self._accepting

    @property
    def load(self) -> int:
        """Requests open on a stream or waiting for one."""
        return len(self._active) + len(self._queue)

    @property
    def in_flight(self) -> int:
        """Requests open on a stream."""
        return len(self._active)

    @property
    def stream_limit(self) -> int:
        """The current cap on concurrent streams: min(server's limit, local limit)."""
        return self._limit

    @property
    def goaway_received(self) -> bool:
        return self._goaway

    # -- submitting --------------------------------------------------------------------

    def submit(self, request: Request) -> bool:
        """Queue a request; False (and nothing done) if the connection takes no new work."""
        if not self._accepting:
            return False
        self._track_deadline(request)
        if len(self._active) < self._limit and not self._queue:
            try:
                self._start(request)
            except h2.exceptions.TooManyStreamsError:
                self._queue.append(request)
        else:
            self._queue.append(request)
        self._wake.set()
        return True

    def sends_token(self, authorization: bytes) -> bool:
        """Whether this connection's requests carry ``authorization`` (token auth)."""
        return self._token is not None and self._token.value == authorization

    def drain(self, reason: str) -> None:
        """Take no new requests and close once the open ones are answered (requests still
        waiting for a stream slot are handed back unsent); the pool opens a new one."""
        if not (self._closed or self._draining):
            self._drain(reason)
            if not self._active:
                self.close(reason)

    def close(self, reason: str = "closed") -> None:
        """Stop the connection; outstanding requests fail (queued ones as NOT_SENT)."""
        if not self._closed:
            self._closed = True
            self._accepting = False
            self.close_reason = reason
            self._cancel_scope.cancel()

    # -- the connection's life ---------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, report started once the server's SETTINGS arrived, serve until closed.

        Raises ConnectError if the connection could not be established; once started it
        returns when the connection is over (every request has a result by then).
        """
        settings = self._settings
        try:
            with trio.fail_after(settings.connect_timeout):
                stream = await trio.open_ssl_over_tcp_stream(
                    self.host, self.port, ssl_context=self._ssl_context, https_compatible=True
                )
                await stream.do_handshake()
        except (OSError, trio.BrokenResourceError, trio.TooSlowError, ssl.SSLError) as exc:
            cause = f" ({exc.__cause__!r})" if exc.__cause__ is not None else ""
            raise ConnectError(f"{self.host}:{self.port}: {exc!r}{cause}") from exc
        alpn = stream.selected_alpn_protocol()
        version = stream.version()
        if alpn not in (None, "h2") or version not in ("TLSv1.2", "TLSv1.3"):
            await trio.aclose_forcefully(stream)
            raise ConnectError(f"{self.host}:{self.port}: got {version} with ALPN {alpn!r}")
        self._h2.initiate_connection()
        self._h2.increment_flow_control_window(_CONNECTION_WINDOW)
        self._last_received = trio.current_time()
        started = False
        try:
            with self._cancel_scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._read_loop, stream)
                    nursery.start_soon(self._write_loop, stream)
                    self._wake.set()
                    with trio.move_on_after(settings.connect_timeout):
                        await self._settings_received.wait()
                    if not self._settings_received.is_set():
                        self.close("no SETTINGS from the server in time")
                    else:
                        self._accepting = not self._closed
                        nursery.start_soon(self._timer_loop)
                        nursery.start_soon(self._ping_loop)
                        started = True
                        task_status.started()
            if not started:  # closed (EOF, protocol error) before the server's SETTINGS
                raise ConnectError(f"{self.host}:{self.port}: {self.close_reason}")
        finally:
            self._accepting = False
            self._closed = True
            self.close_reason = self.close_reason or "cancelled"
            self._fail_all()
            with trio.move_on_after(1, shield=True):
                await self._goodbye(stream)
            await trio.aclose_forcefully(stream)
            if started:
                log.info("apns.connection_closed", host=self.host, reason=self.close_reason)

    async def _goodbye(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        """An orderly close when the peer is still answering: GOAWAY, then read until the
        server closes (closing with unread bytes would make the kernel send a RST)."""
        if self._peer_failed:
            return
        try:
            self._h2.close_connection()
            await stream.send_all(self._h2.data_to_send())
            while await stream.receive_some(65536):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, h2.exceptions.ProtocolError):
            pass

    async def _write_loop(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                data = self._h2.data_to_send()
                if data:
                    await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._peer_failed = True
            self.close(f"write failed: {exc!r}")

    async def _read_loop(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        pace = self._settings.pace
        try:
            while True:
                if pace is not None:
                    await pace()
                # Small reads: each is handled in one go (every response in it completes
                # its request), so the chunk bounds how long the loop holds the thread.
                data = await stream.receive_some(READ_CHUNK)
                if not data:
                    self._peer_failed = True
                    self.close("server closed the connection")
                    return
                self._last_received = trio.current_time()
                self._handle_events(self._h2.receive_data(data))
                self._wake.set()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._peer_failed = True
            self.close(f"read failed: {exc!r}")
        except h2.exceptions.ProtocolError as exc:
            self.close(f"protocol error: {exc!r}")

    async def _timer_loop(self) -> None:
        deadlines = self._deadlines
        while True:
            while deadlines and deadlines[0].result is not None:
                deadlines.popleft()
            with trio.CancelScope(
                deadline=deadlines[0].deadline if deadlines else math.inf
            ) as scope:
                self._timer_scope = scope
                await trio.sleep_forever()
            self._timer_scope = None
            now = trio.current_time()
            while deadlines and (deadlines[0].result is not None or deadlines[0].deadline <= now):
                request = deadlines.popleft()
                if request.result is None:
                    self._expire(request)
            self._start_queued()
            self._wake.set()

    async def _ping_loop(self) -> None:
        settings = self._settings
        while True:
            idle_until = self._last_received + settings.idle_ping_interval
            if trio.current_time() < idle_until:
                await trio.sleep_until(idle_until)
                continue
            self._ping_ack = trio.Event()
            self._h2.ping(b"pushd\x00\x00\x00")
            self._wake.set()
            with trio.move_on_after(settings.ping_timeout):
                await self._ping_ack.wait()
            if not self._ping_ack.is_set():
                log.warning("apns.ping_timeout", host=self.host, timeout=settings.ping_timeout)
                self._peer_failed = True
                self.close("no answer to PING")
                return

    # -- stream bookkeeping (all synchronous) ------------------------------------------

    def _track_deadline(self, request: Request) -> None:
        deadlines = self._deadlines
        while deadlines and deadlines[0].result is not None:
            deadlines.popleft()
        if not deadlines or request.deadline >= deadlines[-1].deadline:
            deadlines.append(request)
        else:
            bisect.insort(deadlines, request, key=lambda r: r.deadline)
        scope = self._timer_scope
        if scope is not None and request.deadline < scope.deadline:
            scope.deadline = request.deadline

    def _start(self, request: Request) -> None:
        conn = self._h2
        stream_id = conn.get_next_available_stream_id()
        body = request.body
        headers = request.headers
        if self._token is not None:
            request.authorization = self._token.authorization(trio.current_time())
            headers = [*headers, (b"authorization", request.authorization)]
        conn.send_headers(stream_id, headers, end_stream=not body)
        request.stream_id = stream_id
        self._active[stream_id] = request
        if body:
            self._send_body(stream_id, request)

    def _start_queued(self) -> None:
        queue = self._queue
        while queue and self._accepting and len(self._active) < self._limit:
            request = queue.popleft()
            if request.result is None:
                try:
                    self._start(request)
                except h2.exceptions.TooManyStreamsError:
                    queue.appendleft(request)
                    return

    def _send_body(self, stream_id: int, request: Request) -> None:
        conn = self._h2
        body = request.body
        while request._offset < len(body):
            window = conn.local_flow_control_window(stream_id)
            size = min(window, conn.max_outbound_frame_size, len(body) - request._offset)
            if size <= 0:
                self._blocked[stream_id] = request
                return
            end = request._offset + size
            conn.send_data(stream_id, body[request._offset : end], end_stream=end == len(body))
            request._offset = end
        self._blocked.pop(stream_id, None)

    def _complete(self, stream_id: int, result: Response | Failure, detail: str = "") -> None:
        request = self._active.pop(stream_id, None)
        if request is None:
            return
        if self._blocked.pop(stream_id, None) is not None:
            # Answered before we finished the body: stop sending it.
            self._h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
        request._finish(result, detail)
        if not self._draining and isinstance(result, Response) and result.status in (403, 429, 503):
            reason = _apns_reason(result.body.decode("utf-8", "replace"))
            if reason in NEW_CONNECTION_REASONS:
                # An answer after which APNs wants a new connection (see
                # NEW_CONNECTION_REASONS): finish the rest here, take nothing new; the
                # pool opens another one, where the request is sent again.
                self._drain(reason)
        if (self._goaway or self._draining) and not self._active:
            self.close(self.close_reason or "GOAWAY")

    def _drain(self, reason: str) -> None:
        """Take no new requests; close once the open streams are answered (the pool then
        opens a new connection). Requests still waiting for a stream slot are handed back
        unsent."""
        self._draining = True
        self._accepting = False
        self.close_reason = reason
        queue, self._queue = self._queue, deque()
        for request in queue:
            request._finish(Failure.NOT_SENT, reason)

    def _expire(self, request: Request) -> None:
        stream_id = request.stream_id
        if self._active.get(stream_id) is request:
            self._blocked.pop(stream_id, None)
            self._h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
            self._complete(stream_id, Failure.TIMEOUT, "no answer in time; stream reset")
        else:  # still waiting for a stream slot
            request._finish(Failure.TIMEOUT, "no stream slot in time")

    def _fail_all(self) -> None:
        active, self._active = self._active, {}
        self._blocked.clear()
        for request in active.values():
            request._finish(Failure.LOST, self.close_reason)
        queue, self._queue = self._queue, deque()
        for request in queue:
            request._finish(Failure.NOT_SENT, self.close_reason)

    def _handle_events(self, events: list[h2.events.Event]) -> None:
        for event in events:
            kind = type(event)
            if kind is h2.events.ResponseReceived:
                request = self._active.get(event.stream_id)  # type: ignore[attr-defined]
                if request is not None:
                    headers = event.headers  # type: ignore[attr-defined]
                    request._resp_headers = headers
                    for name, value in headers:
                        if name == b":status":
                            request._status = int(value)
                            break
            elif kind is h2.events.StreamEnded:
                stream_id = event.stream_id  # type: ignore[attr-defined]
                request = self._active.get(stream_id)
                if request is not None:
                    self.responses += 1
                    response = Response(
                        request._status, request._resp_headers, b"".join(request._chunks)
                    )
                    self._complete(stream_id, response)
            elif kind is h2.events.DataReceived:
                stream_id = event.stream_id  # type: ignore[attr-defined]
                self._h2.acknowledge_received_data(
                    event.flow_controlled_length,  # type: ignore[attr-defined]
                    stream_id,
                )
                request = self._active.get(stream_id)
                if request is not None:
                    request._chunks.append(event.data)  # type: ignore[attr-defined]
            elif kind is h2.events.StreamReset:
                self._on_reset(event)  # type: ignore[arg-type]
            elif kind is h2.events.WindowUpdated:
                for stream_id, request in list(self._blocked.items()):
                    self._send_body(stream_id, request)
            elif kind is h2.events.RemoteSettingsChanged:
                self._on_settings()
            elif kind is h2.events.PingAckReceived:
                self._ping_ack.set()
            elif kind is h2.events.ConnectionTerminated:
                self._on_goaway(event)  # type: ignore[arg-type]
        self._start_queued()

    def _on_reset(self, event: h2.events.StreamReset) -> None:
        stream_id = event.stream_id
        if event.error_code == h2.errors.ErrorCodes.REFUSED_STREAM:
            self._complete(stream_id, Failure.NOT_SENT, "stream refused")
        else:
            self._complete(stream_id, Failure.LOST, f"stream reset by server: {event.error_code!r}")

    def _on_settings(self) -> None:
        remote = self._h2.remote_settings.max_concurrent_streams
        self._limit = max(0, min(remote, self._settings.max_streams))
        self._settings_received.set()

    def _on_goaway(self, event: h2.events.ConnectionTerminated) -> None:
        last = event.last_stream_id if event.last_stream_id is not None else 0
        debug = (event.additional_data or b"").decode("utf-8", "replace")
        reason = self.goaway_reason = _apns_reason(debug)
        log.info(
            "apns.goaway",
            host=self.host,
            last_stream_id=last,
            error_code=str(event.error_code),
            debug=debug,
        )
        self._goaway = True
        self._accepting = False
        self.close_reason = f"GOAWAY {debug}".strip()
        for stream_id in [s for s in self._active if s > last]:
            self._active[stream_id].goaway_reason = reason
            self._complete(stream_id, Failure.NOT_SENT, "above GOAWAY last stream id")
        queue, self._queue = self._queue, deque()
        for request in queue:
            request.goaway_reason = reason
            request._finish(Failure.NOT_SENT, "GOAWAY")
        if not self._active:
            self.close(self.close_reason)


def refuses_credentials(goaway_reason: str | None) -> bool:
    """Whether a GOAWAY's APNs reason refuses the credentials (BadCertificateEnvironment...):
    the requests it hands back are not to be re-sent."""
    return goaway_reason is not None and REASONS.get(goaway_reason) is OutcomeClass.CREDENTIALS


def _apns_reason(debug: str) -> str | None:
    """The ``reason`` in APNs's JSON (a GOAWAY's debug data or an error answer's body:
    ``{"reason":"Shutdown"}``), if any."""
    try:
        data = json.loads(debug)
    except ValueError:
        return None
    reason = data.get("reason") if isinstance(data, dict) else None
    return reason if isinstance(reason, str) else None


@dataclass
class PoolStats:
    connects: int = 0
    reconnects: int = 0
    connect_failures: int = 0
    goaways: int = 0
    closes: dict[str, int] = field(default_factory=dict)


class ConnectionPool:
    """``size`` connections to one host; each dead one is replaced, with jittered backoff."""

    def __init__(
        self,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext,
        settings: ConnectionSettings,
        *,
        size: int = 2,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        rng: random.Random | None = None,
        auth: TokenAuth | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self._ssl_context = ssl_context
        self._settings = settings
        self._size = size
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self._rng = rng or random.Random()
        self._auth = auth  # token auth: each connection holds its own token (ConnectionToken)
        self._connections: list[Connection] = []
        self._next = 0
        self._ready = trio.Event()
        self.stats = PoolStats()
        #: The APNs reason (a credentials one) with which the last connection was sent away
        #: before it answered anything; None once a connection answers a request.
        self.refusal: str | None = None

    @property
    def connections(self) -> list[Connection]:
        return list(self._connections)

    def in_flight(self) -> int:
        return sum(c.load for c in self._connections)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep ``size`` connections up until cancelled; started at once (still connecting)."""
        async with trio.open_nursery() as nursery:
            for _ in range(self._size):
                nursery.start_soon(self._keep_connected)
            task_status.started()

    def submit(self, request: Request) -> bool:
        """Give the request to the least-loaded accepting connection; False if none is up."""
        conns = self._connections
        n = len(conns)
        best: Connection | None = None
        start = self._next
        for i in range(n):
            conn = conns[(start + i) % n]
            if conn.accepting and (best is None or conn.load < best.load):
                best = conn
        self._next = (start + 1) % max(n, 1)
        return best is not None and best.submit(request)

    def drain_token(self, authorization: bytes) -> int:
        """Replace the connections that send ``authorization`` (APNs refused it); returns
        how many. Their new connections take the current token at once."""
        holders = [c for c in self._connections if c.accepting and c.sends_token(authorization)]
        for conn in holders:
            conn.drain("provider token refused")
        return len(holders)

    async def wait_ready(self) -> None:
        """Return once a connection accepts requests, or the server refused the credentials."""
        await trio.lowlevel.checkpoint()
        while not any(c.accepting for c in self._connections) and self.refusal is None:
            if self._ready.is_set():
                self._ready = trio.Event()
            await self._ready.wait()

    async def _keep_connected(self) -> None:
        failures = 0
        first = True
        while True:
            token = self._auth.for_connection() if self._auth is not None else None
            conn = Connection(self.host, self.port, self._ssl_context, self._settings, token=token)
            up_at = math.inf
            async with trio.open_nursery() as nursery:
                try:
                    await nursery.start(conn.run)
                except ConnectError as exc:
                    self.stats.connect_failures += 1
                    log.warning("apns.connect_failed", error=str(exc), failures=failures + 1)
                else:
                    self.stats.connects += 1
                    if not first:
                        self.stats.reconnects += 1
                    first = False
                    up_at = trio.current_time()
                    self._connections.append(conn)
                    self._ready.set()
            if conn in self._connections:
                self._connections.remove(conn)
            if conn.goaway_received:
                self.stats.goaways += 1
            if conn.responses:
                self.refusal = None
            elif refuses_credentials(conn.goaway_reason):
                self.refusal = conn.goaway_reason  # e.g. BadCertificateEnvironment
                self._ready.set()
            if conn.close_reason:
                key = conn.close_reason.split(":")[0]
                self.stats.closes[key] = self.stats.closes.get(key, 0) + 1
            # A connection that answered and lived a while was healthy: the next one opens at
            # once. One that died young (APNs closes a connection that makes too many
            # errors, BadDeviceToken among them) counts as a failure even if it answered:
            # APNs may block a provider that connects and disconnects rapidly.
            lived = trio.current_time() - up_at
            healthy = conn.responses and lived >= HEALTHY_CONNECTION
            failures = 0 if healthy else failures + 1
            if failures:
                # One that answered before it died is reopened within YOUNG_RECONNECT_MAX:
                # slow enough not to be a connect storm, quick enough that requests waiting
                # for a connection (request_timeout) do not lose attempts to the wait.
                cap = min(self._backoff_max, YOUNG_RECONNECT_MAX) if conn.responses else self._backoff_max
                await trio.sleep(backoff_delay(failures, self._backoff_base, cap, self._rng))
