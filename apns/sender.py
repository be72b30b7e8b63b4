"""The APNs sender: a pool of HTTP/2 connections, auth, retries; never raises for APNs trouble.

    config = SenderConfig.for_environment("sandbox", ssl_context=make_ssl_context(), auth=auth)
    async with open_sender(config) as sender:
        outcomes = await sender.send_many([(token, notification.encode()), ...])

``send_many`` is the batch path: one task submits every request of the batch (prebuilt header
lists, straight to the connections) and is woken when results arrive, so a batch costs no
task per request.  Every item gets an :class:`~apns.outcome.Outcome`:

- requests a connection handed back unprocessed (GOAWAY above last-stream-id, REFUSED_STREAM,
  a connection that died before sending them) are re-sent at once on another connection,
  without counting an attempt;
- ``ExpiredProviderToken``: the token is reported to ``TokenAuth.token_rejected``, every
  connection still sending it is replaced (so is the one that got the answer), and the
  request is re-sent once, on a connection with the current token;
- retryable outcomes (429, 5xx, Shutdown, lost connection, timeout) are re-sent after a
  jittered exponential backoff (at least a ``Retry-After``), up to ``max_attempts`` in all,
  then returned as RETRY for the durable queue to reschedule; a ``Retry-After`` longer than
  ``backoff_max`` returns RETRY at once, for the queue to wait it out;
- everything else (delivered, dead token, credentials, rejected) is returned as it is.
"""

from __future__ import annotations

import bisect
import math
import random
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TypedDict

import structlog
import trio
from hpack import NeverIndexedHeaderTuple

from apns.auth import TokenAuth
from apns.connection import (
    ConnectionPool,
    ConnectionSettings,
    Failure,
    Headers,
    Request,
    Response,
    backoff_delay,
    refuses_credentials,
)
from apns.outcome import Outcome, OutcomeClass
from apns.payload import EncodedNotification, InvalidNotification, normalize_token, redact_token

__all__ = [
    "ENVIRONMENTS",
    "PRODUCTION_HOST",
    "SANDBOX_HOST",
    "Sender",
    "SenderConfig",
    "SenderStats",
    "open_sender",
]

log = structlog.get_logger()

PRODUCTION_HOST = "api.push.apple.com"
SANDBOX_HOST = "api.sandbox.push.apple.com"
ENVIRONMENTS = {"production": PRODUCTION_HOST, "sandbox": SANDBOX_HOST}

#: How often one request may come back unprocessed from a stream (REFUSED_STREAM, above a
#: GOAWAY's last stream id) before it is returned as RETRY.
_MAX_HANDBACKS = 10
SUBMIT_SLICE = 8  # requests put on the wire per turn of the batch's task (see READ_CHUNK)


@dataclass(kw_only=True)
class SenderConfig:
    host: str
    ssl_context: ssl.SSLContext
    port: int = 443
    auth: TokenAuth | None = None  # None: certificate auth (client cert in ssl_context)
    connections: int = 2
    max_streams_per_connection: int = 1000
    request_timeout: float = 10.0
    connect_timeout: float = 10.0
    idle_ping_interval: float = 60.0
    ping_timeout: float = 10.0
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    max_attempts: int = 3
    # The owner's way to hold bulk sending back while urgent work needs the thread:
    # ``pace`` is awaited between slices of a batch (it must checkpoint), ``read_pace``
    # before each read from a connection.
    pace: Callable[[], Awaitable[None]] | None = None
    read_pace: Callable[[], Awaitable[None]] | None = None

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("host: must not be empty")
        if not 0 < self.port < 65536:
            raise ValueError(f"port: must be within 1..65535, got {self.port}")
        for name in ("connections", "max_streams_per_connection", "max_attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")
        for name in (
            "request_timeout",
            "connect_timeout",
            "idle_ping_interval",
            "ping_timeout",
            "backoff_base",
            "backoff_max",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")

    @classmethod
    def for_environment(
        cls, environment: str, *, ssl_context: ssl.SSLContext, port: int = 443, **kwargs: object
    ) -> SenderConfig:
        """Apple's ``production`` or ``sandbox`` host; port 443 or 2197."""
        if environment not in ENVIRONMENTS:
            raise ValueError(f"environment: must be one of {sorted(ENVIRONMENTS)}")
        if port not in (443, 2197):
            raise ValueError(f"port: APNs listens on 443 and 2197, not {port}")
        return cls(
            host=ENVIRONMENTS[environment],
            port=port,
            ssl_context=ssl_context,
            **kwargs,  # type: ignore[arg-type]
        )


class SenderStats(TypedDict):
    in_flight: int  # requests queued or open on the connections now
    connections: int  # connections accepting requests now
    sent: int  # requests submitted (every attempt counts)
    outcomes: dict[str, int]  # final outcomes by OutcomeClass value
    retries: int  # attempts scheduled after a retryable outcome
    handbacks: int  # requests re-sent because a connection never processed them
    token_refreshes: int  # provider tokens re-minted after ExpiredProviderToken
    connects: int
    reconnects: int
    connect_failures: int
    goaways: int


class _Job:
    """One item of a batch, across its attempts."""

    __slots__ = (
        "attempts",
        "batch",
        "due",
        "handbacks",
        "index",
        "notification",
        "path",
        "refreshed",
        "token",
    )

    def __init__(
        self, batch: _Batch, index: int, token: str, notification: EncodedNotification
    ) -> None:
        self.batch = batch
        self.index = index
        self.token = token
        self.path = b"/3/device/" + token.encode("ascii")
        self.notification = notification
        self.attempts = 0
        self.handbacks = 0
        self.refreshed = False
        self.due = 0.0

    def done(self, request: Request) -> None:
        self.batch.sender._request_done(self, request)


class _Batch:
    __slots__ = ("delayed", "outcomes", "ready", "sender", "unfinished", "wake")

    def __init__(self, sender: Sender, size: int) -> None:
        self.sender = sender
        self.outcomes: list[Outcome | None] = [None] * size
        self.unfinished = size
        self.ready: list[_Job] = []  # to submit now
        self.delayed: list[_Job] = []  # sorted by due
        self.wake = trio.Event()


class Sender:
    """See the module docstring. Start with ``await nursery.start(sender.run)``."""

    def __init__(self, config: SenderConfig, *, rng: random.Random | None = None) -> None:
        self.config = config
        self._rng = rng or random.Random()
        self._pool = ConnectionPool(
            config.host,
            config.port,
            config.ssl_context,
            ConnectionSettings(
                max_streams=config.max_streams_per_connection,
                connect_timeout=config.connect_timeout,
                idle_ping_interval=config.idle_ping_interval,
                ping_timeout=config.ping_timeout,
                pace=config.read_pace,
            ),
            size=config.connections,
            backoff_base=config.backoff_base,
            backoff_max=config.backoff_max,
            rng=self._rng,
            auth=config.auth,
        )
        authority = config.host if config.port == 443 else f"{config.host}:{config.port}"
        self._prefix: Headers = [
            (b":method", b"POST"),
            (b":scheme", b"https"),
            (b":authority", authority.encode("ascii")),
        ]
        self._sent = 0
        self._retries = 0
        self._handbacks = 0
        self._token_refreshes = 0
        self._outcomes = dict.fromkeys(OutcomeClass, 0)

    @property
    def pool(self) -> ConnectionPool:
        return self._pool

    async def run(self, *, task_status: trio.TaskStatus[Sender] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the connections until cancelled; ``started(self)`` at once (still connecting)."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self._pool.run)
            task_status.started(self)

    async def send(self, token: str, notification: EncodedNotification) -> Outcome:
        return (await self.send_many([(token, notification)]))[0]

    async def send_many(self, items: Sequence[tuple[str, EncodedNotification]]) -> list[Outcome]:
        """Send every item; one Outcome per item, in order. Never raises for APNs trouble."""
        batch = _Batch(self, len(items))
        for index, (token, notification) in enumerate(items):
            try:
                token = normalize_token(token)
            except InvalidNotification as exc:
                outcome = Outcome(
                    OutcomeClass.TOKEN_DEAD,
                    None,
                    "BadDeviceToken",
                    notification.apns_id,
                    detail=f"rejected locally: {exc}",
                )
                self._finish(batch, index, outcome, token="")
                continue
            batch.ready.append(_Job(batch, index, token, notification))
        await self._drive(batch)
        return [outcome for outcome in batch.outcomes if outcome is not None]

    def stats(self) -> SenderStats:
        pool = self._pool.stats
        return {
            "in_flight": self._pool.in_flight(),
            "connections": sum(c.accepting for c in self._pool.connections),
            "sent": self._sent,
            "outcomes": {klass.value: n for klass, n in self._outcomes.items()},
            "retries": self._retries,
            "handbacks": self._handbacks,
            "token_refreshes": self._token_refreshes,
            "connects": pool.connects,
            "reconnects": pool.reconnects,
            "connect_failures": pool.connect_failures,
            "goaways": pool.goaways,
        }

    # -- the batch loop ------------------------------------------------------------------

    async def _drive(self, batch: _Batch) -> None:
        config = self.config
        while batch.unfinished:
            if batch.ready and self._submit_ready(batch) and batch.ready:
                # The next slice after others had a turn.
                await (config.pace or trio.lowlevel.checkpoint)()
                continue
            if batch.ready:
                if self._pool.refusal is not None:  # APNs refused the credentials outright
                    jobs, batch.ready = batch.ready, []
                    for job in jobs:
                        self._refused(job, self._pool.refusal)
                    continue
                with trio.move_on_after(config.request_timeout):
                    await self._pool.wait_ready()
                    continue
                # no connection came up in time: that costs every waiting job an attempt
                jobs, batch.ready = batch.ready, []
                for job in jobs:
                    job.attempts += 1
                    outcome = Outcome.connection_lost(
                        "no connection to APNs", job.notification.apns_id
                    )
                    self._retry_or_finish(job, outcome)
                continue
            if not batch.unfinished:
                break
            next_due = batch.delayed[0].due if batch.delayed else math.inf
            if not batch.ready and next_due > trio.current_time():
                with trio.move_on_at(next_due):
                    await batch.wake.wait()
                if batch.wake.is_set():
                    batch.wake = trio.Event()
            now = trio.current_time()
            delayed = batch.delayed
            while delayed and delayed[0].due <= now:
                batch.ready.append(delayed.pop(0))

    def _submit_ready(self, batch: _Batch) -> bool:
        """Submit up to :data:`SUBMIT_SLICE` ready jobs (a big batch goes out in slices, so
        that other tasks, an urgent push among them, are not held up for the whole batch);
        False if some are left because no connection is up."""
        pool = self._pool
        deadline = trio.current_time() + self.config.request_timeout
        prefix = self._prefix
        jobs = batch.ready
        for i, job in enumerate(jobs):
            if i == SUBMIT_SLICE:
                batch.ready = jobs[i:]
                return True
            # (token auth: the connection adds the authorization header; see ConnectionToken)
            headers: Headers = [*prefix, NeverIndexedHeaderTuple(b":path", job.path)]
            for header in job.notification.headers:
                if header[0] == b"apns-id":  # unique: kept out of the HPACK table
                    header = NeverIndexedHeaderTuple(*header)
                headers.append(header)
            if not pool.submit(Request(headers, job.notification.body, deadline, job.done)):
                batch.ready = jobs[i:]
                return False
            self._sent += 1
        batch.ready = []
        return True

    # -- results (called synchronously from the connections' reader/timer tasks) ----------

    def _request_done(self, job: _Job, request: Request) -> None:
        result = request.result
        if isinstance(result, Response):
            outcome = Outcome.from_response(result.status, result.headers, result.body)
            if (
                outcome.reason == "ExpiredProviderToken"
                and self.config.auth is not None
                and not job.refreshed
            ):
                job.refreshed = True
                auth = self.config.auth
                if auth.token_rejected(request.authorization):
                    self._token_refreshes += 1
                if auth.authorization() != request.authorization:
                    # there is a newer token: the other connections still sending the
                    # refused one would be refused too (they keep a token 21 minutes)
                    self._pool.drain_token(request.authorization)
                log.info("apns.token_expired", apns_id=outcome.apns_id)
                self._resend_now(job)
                return
            job.attempts += 1
            self._retry_or_finish(job, outcome)
            return
        failure = result if isinstance(result, Failure) else Failure.LOST
        if request.goaway_reason is not None and refuses_credentials(request.goaway_reason):
            self._refused(job, request.goaway_reason)
            return
        if failure is Failure.NOT_SENT and job.handbacks < _MAX_HANDBACKS:
            if request.stream_id:  # refused or above last-stream-id; queued ones are free
                job.handbacks += 1
            self._handbacks += 1
            self._resend_now(job)
            return
        job.attempts += 1
        detail = f"{failure.value}: {request.detail}"
        self._retry_or_finish(job, Outcome.connection_lost(detail, job.notification.apns_id))

    def _refused(self, job: _Job, reason: str) -> None:
        """APNs sent the connection away over its credentials (BadCertificateEnvironment
        comes as a GOAWAY): returned as CREDENTIALS, not retried."""
        outcome = Outcome(
            OutcomeClass.CREDENTIALS, None, reason, job.notification.apns_id, detail="GOAWAY"
        )
        self._finish(job.batch, job.index, outcome, job.token)

    def _resend_now(self, job: _Job) -> None:
        job.batch.ready.append(job)
        job.batch.wake.set()

    def _retry_or_finish(self, job: _Job, outcome: Outcome) -> None:
        config = self.config
        retry_after = outcome.retry_after
        # APNs asks for a longer wait than this batch waits (backoff_max): the outcome goes
        # back to the caller at once (the durable queue honours the Retry-After).
        wait_here = retry_after is None or retry_after <= config.backoff_max
        if outcome.klass is OutcomeClass.RETRY and job.attempts < config.max_attempts and wait_here:
            self._retries += 1
            delay = backoff_delay(job.attempts, config.backoff_base, config.backoff_max, self._rng)
            if retry_after is not None:
                delay = max(delay, retry_after)
            job.due = trio.current_time() + delay
            bisect.insort(job.batch.delayed, job, key=lambda j: j.due)
            log.debug(
                "apns.retry",
                apns_id=outcome.apns_id,
                reason=outcome.reason,
                attempt=job.attempts,
                delay=round(delay, 3),
            )
            job.batch.wake.set()
            return
        self._finish(job.batch, job.index, outcome, job.token)

    def _finish(self, batch: _Batch, index: int, outcome: Outcome, token: str) -> None:
        batch.outcomes[index] = outcome
        batch.unfinished -= 1
        self._outcomes[outcome.klass] += 1
        if outcome.klass is not OutcomeClass.DELIVERED:
            log.info(
                "apns.not_delivered",
                outcome=outcome.klass.value,
                status=outcome.status,
                reason=outcome.reason,
                apns_id=outcome.apns_id,
                token=redact_token(token),
                detail=outcome.detail,
            )
        if not batch.unfinished:
            batch.wake.set()


@asynccontextmanager
async def open_sender(config: SenderConfig) -> AsyncIterator[Sender]:
    """A running Sender for the duration of the block (connections close on exit)."""
    async with trio.open_nursery() as nursery:
        sender: Sender = await nursery.start(Sender(config).run)
        try:
            yield sender
        finally:
            nursery.cancel_scope.cancel()
