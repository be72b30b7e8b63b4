"""apns.connection and apns.transport at the HTTP/2 level, against the bundled simulator."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio

from apns.auth import make_ssl_context
from apns.connection import (
    ConnectError,
    Connection,
    ConnectionSettings,
    Failure,
    Request,
    Response,
)
from apns.simulator import (
    SimConfig,
    Simulator,
    TlsFiles,
    generate_client_certificate,
    generate_tls,
)
from apns.transport import open_transport

TOKEN = b"ab" * 32


@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return generate_tls(tmp_path_factory.mktemp("tls"))


class Waiter:
    """Counts finished requests; ``await waiter.wait(n)`` until n have finished."""

    def __init__(self) -> None:
        self.finished: list[Request] = []
        self._event = trio.Event()

    def __call__(self, request: Request) -> None:
        self.finished.append(request)
        self._event.set()

    async def wait(self, n: int) -> None:
        while len(self.finished) < n:
            self._event = trio.Event()
            await self._event.wait()


def make_request(
    waiter: Waiter, *, body: bytes = b'{"aps":{"alert":"hi"}}', deadline: float = math.inf
) -> Request:
    headers = [
        (b":method", b"POST"),
        (b":scheme", b"https"),
        (b":authority", b"127.0.0.1"),
        (b":path", b"/3/device/" + TOKEN),
        (b"apns-topic", b"com.example.app"),
        (b"apns-push-type", b"alert"),
    ]
    return Request(headers, body, deadline, waiter)


async def until_received(sim: Simulator, stream_id: int) -> None:
    """Wait until the simulator has seen the request on ``stream_id`` (not yet answered)."""

    def highest() -> int:
        return max((c.h2.highest_inbound_stream_id for c in sim._connections), default=0)

    with trio.fail_after(5):
        while highest() < stream_id:  # noqa: ASYNC110 (bounded poll of the simulator's state)
            await trio.sleep(0.01)


@asynccontextmanager
async def connected(
    tls: TlsFiles, sim_config: SimConfig | None = None, settings: ConnectionSettings | None = None
) -> AsyncIterator[tuple[Simulator, Connection]]:
    sim_config = sim_config or SimConfig()
    sim_config.cert_file, sim_config.key_file = tls.cert_file, tls.key_file
    sim_config.require_auth = False
    sim = Simulator(sim_config)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(sim.serve)
        ssl_context = make_ssl_context(ca_file=tls.ca_file)
        conn = Connection("127.0.0.1", port, ssl_context, settings or ConnectionSettings())
        await nursery.start(conn.run)
        yield sim, conn
        nursery.cancel_scope.cancel()


async def test_responses_and_the_local_stream_cap(tls: TlsFiles) -> None:
    async with connected(
        tls, SimConfig(response_delay=0.05), ConnectionSettings(max_streams=3)
    ) as (sim, conn):
        assert conn.stream_limit == 3  # min(server's 1000, local 3)
        waiter = Waiter()
        requests = [make_request(waiter) for _ in range(10)]
        assert all(conn.submit(r) for r in requests)
        assert (conn.in_flight, conn.load) == (3, 10)
        await waiter.wait(10)
        assert all(isinstance(r.result, Response) and r.result.status == 200 for r in requests)
        assert conn.load == 0 and sim.request_count == 10
        answered = {(b"apns-id", r.apns_id.encode()) for r in sim.requests}
        assert all(answered & set(r.result.headers) for r in requests)  # type: ignore[union-attr]


async def test_error_response_body_and_large_body_flow_control(tls: TlsFiles) -> None:
    async with connected(tls) as (sim, conn):
        waiter = Waiter()
        big = make_request(waiter, body=b"x" * 200_000)  # > the 65,535-byte initial window
        assert conn.submit(big)
        await waiter.wait(1)
        assert isinstance(big.result, Response)
        assert big.result.status == 413
        assert big.result.body == b'{"reason":"PayloadTooLarge"}'
        assert len(sim.requests[0].body) == 200_000


async def test_goaway_answers_up_to_last_stream_and_hands_back_the_rest(tls: TlsFiles) -> None:
    async with connected(tls, SimConfig(response_delay=1.0, goaway_timing="immediate")) as (
        sim,
        conn,
    ):
        waiter = Waiter()
        requests = [make_request(waiter) for _ in range(10)]
        for r in requests:
            conn.submit(r)
        await until_received(sim, 19)
        sim.goaway(last_stream_id=9, reason="Shutdown")  # streams 1,3,..,9: the first five
        await waiter.wait(10)
        assert [type(r.result) for r in requests[:5]] == [Response] * 5
        assert [r.result for r in requests[5:]] == [Failure.NOT_SENT] * 5
        assert not conn.accepting and conn.goaway_received
        assert not conn.submit(make_request(waiter))
        assert sim.request_count == 5


async def test_answers_in_the_same_read_as_a_goaway_are_kept_not_sent_again(tls: TlsFiles) -> None:
    async with connected(tls, SimConfig(goaway_timing="immediate")) as (sim, conn):
        waiter = Waiter()
        conn.submit(make_request(waiter))
        await waiter.wait(1)
        # After the next answer, a GOAWAY whose last stream id covers every stream in
        # flight; the server answers them all right behind it, in the same read.
        sim.schedule_goaway(after_requests=2, last_stream_id=99, reason="Shutdown")
        requests = [make_request(waiter) for _ in range(10)]
        for r in requests:
            conn.submit(r)
        await waiter.wait(11)
        assert [getattr(r.result, "status", r.result) for r in requests] == [200] * 10
        assert conn.goaway_received and not conn.accepting
        assert sim.request_count == 11


async def test_timeout_resets_the_stream_and_the_connection_stays_usable(
    tls: TlsFiles, autojump_clock: trio.testing.MockClock
) -> None:
    async with connected(tls, SimConfig(response_delay=30)) as (sim, conn):
        waiter = Waiter()
        slow = [make_request(waiter, deadline=trio.current_time() + 5) for _ in range(3)]
        for r in slow:
            conn.submit(r)
        await waiter.wait(3)
        assert trio.current_time() == pytest.approx(5, abs=0.5)
        assert [r.result for r in slow] == [Failure.TIMEOUT] * 3
        assert conn.in_flight == 0 and conn.accepting
        sim.config.response_delay = 0
        fast = make_request(waiter, deadline=trio.current_time() + 5)
        conn.submit(fast)
        await waiter.wait(4)
        assert isinstance(fast.result, Response) and fast.result.status == 200
        await trio.sleep(60)
        assert sim.request_count == 1 and sim.connection_count == 1 and conn.accepting


async def test_queued_request_times_out_without_a_stream(
    tls: TlsFiles, autojump_clock: trio.testing.MockClock
) -> None:
    settings = ConnectionSettings(max_streams=1)
    async with connected(tls, SimConfig(response_delay=30), settings) as (_sim, conn):
        waiter = Waiter()
        first = make_request(waiter, deadline=trio.current_time() + 60)
        queued = make_request(waiter, deadline=trio.current_time() + 5)
        conn.submit(first)
        conn.submit(queued)
        await waiter.wait(1)
        assert (queued.result, queued.detail) == (Failure.TIMEOUT, "no stream slot in time")
        await waiter.wait(2)
        assert isinstance(first.result, Response)


async def test_close_fails_in_flight_as_lost_and_queued_as_not_sent(tls: TlsFiles) -> None:
    settings = ConnectionSettings(max_streams=1)
    async with connected(tls, SimConfig(response_delay=5), settings) as (sim, conn):
        waiter = Waiter()
        active, queued = make_request(waiter), make_request(waiter)
        conn.submit(active)
        conn.submit(queued)
        await until_received(sim, 1)
        conn.close("test")
        await waiter.wait(2)
        assert (active.result, queued.result) == (Failure.LOST, Failure.NOT_SENT)
        assert not conn.submit(make_request(waiter))


async def test_untrusted_certificate_is_a_connect_error(tls: TlsFiles, tmp_path: Path) -> None:
    sim = Simulator(SimConfig(cert_file=tls.cert_file, key_file=tls.key_file))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(sim.serve)
        other = make_ssl_context(ca_file=generate_tls(tmp_path / "other").ca_file)
        conn = Connection("127.0.0.1", port, other, ConnectionSettings())
        with pytest.raises(ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await conn.run()
        nursery.cancel_scope.cancel()


async def test_transport_maps_failures_to_httpx_exceptions(
    tls: TlsFiles, autojump_clock: trio.testing.MockClock
) -> None:
    sim = Simulator(
        SimConfig(
            cert_file=tls.cert_file, key_file=tls.key_file, require_auth=False, response_delay=30
        )
    )
    async with trio.open_nursery() as nursery:
        port = await nursery.start(sim.serve)
        ctx = make_ssl_context(ca_file=tls.ca_file)
        async with (
            open_transport("127.0.0.1", port, ctx) as transport,
            httpx.AsyncClient(transport=transport, timeout=5) as client,
        ):
            url = f"https://127.0.0.1:{port}/3/device/{TOKEN.decode()}"
            with pytest.raises(httpx.ReadTimeout):
                await client.post(url, headers={"apns-topic": "com.example.app"}, content=b"{}")
            sim.config.response_delay = 0
            ok = await client.post(url, headers={"apns-topic": "com.example.app"}, content=b"{}")
            assert ok.status_code == 200
        nursery.cancel_scope.cancel()
    # nothing listens any more: no connection comes up
    async with (
        open_transport("127.0.0.1", port, ctx) as transport,
        httpx.AsyncClient(transport=transport, timeout=5) as client,
    ):
        with pytest.raises(httpx.ConnectError):
            await client.post(f"https://127.0.0.1:{port}/3/device/ab", content=b"{}")


def test_header_encoder_round_trips_while_the_table_changes() -> None:
    import random

    import hpack

    from apns.connection import _HeaderEncoder

    rng = random.Random(7)
    encoder, decoder = _HeaderEncoder(), hpack.Decoder()
    for i in range(2000):
        headers: list[tuple[bytes, bytes]] = [
            (b":method", b"POST"),
            (b":scheme", b"https"),
            (b":authority", b"api.push.apple.com"),
            hpack.NeverIndexedHeaderTuple(b":path", b"/3/device/%064x" % rng.getrandbits(256)),
            (b"authorization", b"bearer token-%d" % (i // 300)),  # a new token now and then
            (b"apns-topic", b"com.example.app%d" % rng.randrange(40)),  # forces evictions
            (b"apns-push-type", rng.choice([b"alert", b"background"])),
            (b"apns-collapse-id", b"c" * rng.randrange(1, 5000)),  # sometimes > the table
        ]
        if i == 1000:
            encoder.header_table_size = 1024  # as h2 does when the peer resizes the table
            decoder.max_allowed_table_size = 1024
        block = encoder.encode(headers)
        assert decoder.decode(block, raw=True) == [tuple(h) for h in headers]
    steady = [(b":method", b"POST"), (b"authorization", b"bearer token-6"), (b"apns-topic", b"x")]
    first, second = encoder.encode(steady), encoder.encode(steady)
    assert decoder.decode(first, raw=True) == decoder.decode(second, raw=True) == steady
    assert len(encoder._memo) == 3 and len(second) == 3  # one index byte each, from the memo


async def test_transport_reports_refused_credentials(
    tls: TlsFiles, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    sim = Simulator(
        SimConfig(cert_file=tls.cert_file, key_file=tls.key_file, client_ca_file=tls.ca_file)
    )
    cert, key = generate_client_certificate(
        tls, tmp_path, "com.example.app", environments=("development",)
    )
    async with trio.open_nursery() as nursery:
        port = await nursery.start(sim.serve)
        ctx = make_ssl_context(ca_file=tls.ca_file, client_cert=cert, client_key=key)
        async with (
            open_transport("127.0.0.1", port, ctx) as transport,
            httpx.AsyncClient(transport=transport) as client,
        ):
            with pytest.raises(httpx.ConnectError, match="BadCertificateEnvironment"):
                await client.post(f"https://127.0.0.1:{port}/3/device/ab", content=b"{}")
        nursery.cancel_scope.cancel()


def test_per_message_headers_sent_unindexed_leave_the_table_to_shared_ones() -> None:
    import hpack

    from apns.connection import _HeaderEncoder
    from apns.payload import Notification

    encoder, decoder = _HeaderEncoder(), hpack.Decoder()
    shared = [(b":method", b"POST"), (b"apns-topic", b"com.example.app")]
    for i in range(50):
        note = Notification.from_dict({
            "topic": "com.example.app", "aps": {"alert": "hi"},
            "collapse_id": f"message-{i}", "expiration": 1_900_000_000 + i,
        }).encode().with_unindexed()  # fmt: skip
        block = encoder.encode(shared + note.headers)
        assert decoder.decode(block, raw=True) == [tuple(h) for h in shared + note.headers]
    # Only the first request adds to the table; the shared headers stay one-byte indexes.
    # (topic, push type, priority: :method is in the static table).
    assert len(encoder.header_table.dynamic_entries) == 3 and len(encoder._memo) == 4
    assert len(encoder.encode(shared)) == 2
    indexed = Notification.from_dict(
        {"topic": "com.example.app", "aps": {"alert": "hi"}, "collapse_id": "c"}
    ).encode()
    assert all(type(h) is tuple for h in indexed.headers)  # the default: indexable
