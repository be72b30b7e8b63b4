"""apns.sender and apns.transport against the bundled simulator, in-process, on loopback."""

from __future__ import annotations

import socket
import ssl
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from apns.auth import TokenAuth, make_ssl_context
from apns.outcome import OutcomeClass
from apns.payload import Aps, EncodedNotification, Notification
from apns.sender import Sender, SenderConfig, open_sender
from apns.simulator import (
    SimConfig,
    SimKey,
    Simulator,
    TlsFiles,
    generate_client_certificate,
    generate_signing_key,
    generate_tls,
)
from apns.transport import open_transport

TOPIC = "com.example.app"
TOKEN = "ab" * 32
WALL_EPOCH = 1_800_000_000.0  # the wall clock of the virtual-time tests, at trio time 0


def wall() -> float:
    """A wall clock that moves with trio's (autojump) clock."""
    return WALL_EPOCH + trio.current_time()


@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return generate_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def signing() -> tuple[SimKey, bytes]:
    return generate_signing_key("KEY0000001", "TEAM000001")


def note(apns_id: str | None = None) -> EncodedNotification:
    return Notification(
        aps=Aps(alert="hi"), topic=TOPIC, apns_id=apns_id or str(uuid.uuid4())
    ).encode()


def token_auth(signing: tuple[SimKey, bytes], clock: Callable[[], float] = wall) -> TokenAuth:
    key, pem = signing
    return TokenAuth(key_pem=pem, key_id=key.key_id, team_id=key.team_id, clock=clock)


@asynccontextmanager
async def running(
    tls: TlsFiles, signing: tuple[SimKey, bytes], sim_config: SimConfig | None = None, **sender: Any
) -> AsyncIterator[tuple[Simulator, Sender]]:
    """A simulator trusting ``signing`` and a sender talking to it."""
    sim_config = sim_config or SimConfig()
    sim_config.cert_file, sim_config.key_file = tls.cert_file, tls.key_file
    sim_config.keys = [signing[0]]
    sim_config.wall_clock = wall
    sim = Simulator(sim_config)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(sim.serve)
        options: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": port,
            "ssl_context": make_ssl_context(ca_file=tls.ca_file),
            "auth": token_auth(signing),
            "connections": 1,
        }
        options.update(sender)
        async with open_sender(SenderConfig(**options)) as s:
            yield sim, s
        nursery.cancel_scope.cancel()


async def test_delivered_and_every_outcome_class(
    tls: TlsFiles, signing: tuple[SimKey, bytes], autojump_clock: trio.testing.MockClock
) -> None:
    async with running(tls, signing, max_attempts=2, backoff_base=1.0) as (sim, sender):
        dead = "cd" * 32
        sim.set_token_state(dead, unregistered_at_ms=1234)
        delivered, token_dead = await sender.send_many([(TOKEN, note()), (dead, note())])
        assert delivered.klass is OutcomeClass.DELIVERED and delivered.status == 200
        assert token_dead.klass is OutcomeClass.TOKEN_DEAD
        assert (token_dead.reason, token_dead.timestamp_ms) == ("Unregistered", 1234)

        sim.inject(400, "BadTopic")
        rejected = await sender.send(TOKEN, note())
        assert (rejected.klass, rejected.reason) == (OutcomeClass.REJECTED, "BadTopic")

        # retried with backoff up to max_attempts (2), then handed back as RETRY
        sim.inject(503, "ServiceUnavailable", count=2)
        apns_id = str(uuid.uuid4())
        before = trio.current_time()
        retry = await sender.send(TOKEN, note(apns_id))
        assert (retry.klass, retry.reason) == (OutcomeClass.RETRY, "ServiceUnavailable")
        assert 0.5 <= trio.current_time() - before <= 1.0 + 0.1  # one jittered backoff
        assert [r.status for r in sim.requests if r.apns_id == apns_id] == [503, 503]

        # a retryable failure followed by success is delivered
        sim.inject(500, "InternalServerError")
        apns_id = str(uuid.uuid4())
        assert (await sender.send(TOKEN, note(apns_id))).klass is OutcomeClass.DELIVERED
        assert [r.status for r in sim.requests if r.apns_id == apns_id] == [500, 200]

        # a malformed token never reaches APNs
        bad = await sender.send("not a token", note())
        assert (bad.klass, bad.reason) == (OutcomeClass.TOKEN_DEAD, "BadDeviceToken")

        stats = sender.stats()
        assert stats["outcomes"] == {
            "delivered": 2,
            "token_dead": 2,
            "retry": 1,
            "credentials": 0,
            "rejected": 1,
        }
        assert stats["retries"] == 2 and stats["in_flight"] == 0


async def test_credentials_failure_returned_not_spun(
    tls: TlsFiles, signing: tuple[SimKey, bytes], autojump_clock: trio.testing.MockClock
) -> None:
    unknown, unknown_pem = generate_signing_key("KEY0000009", "TEAM000001")
    other = TokenAuth(key_pem=unknown_pem, key_id=unknown.key_id, team_id="TEAM000001", clock=wall)
    async with running(tls, signing, auth=other) as (sim, sender):
        outcome = await sender.send(TOKEN, note())
        assert (outcome.klass, outcome.reason) == (OutcomeClass.CREDENTIALS, "InvalidProviderToken")
        assert sim.request_count == 1


async def test_expired_provider_token_refreshed_and_retried_once(
    tls: TlsFiles, signing: tuple[SimKey, bytes], autojump_clock: trio.testing.MockClock
) -> None:
    # tokens are minted for 1800 s buckets; the simulator accepts them for 1300 s only
    await trio.sleep(1800 - (WALL_EPOCH % 1800) + 1500)  # 1500 s into a bucket
    async with running(tls, signing, SimConfig(jwt_max_age=1300)) as (sim, sender):
        outcome = await sender.send(TOKEN, note())
        assert outcome.klass is OutcomeClass.DELIVERED, (outcome, sim.requests)
        first, second = sim.requests
        assert first.reason == "ExpiredProviderToken" and second.status == 200
        assert first.jwt_iat is not None and second.jwt_iat is not None
        assert second.jwt_iat - first.jwt_iat == 1500  # a fresh token, iat = now
        assert sender.stats()["token_refreshes"] == 1

        # refused again right away: TokenAuth will not churn, the sender retries only once
        sim.inject(403, "ExpiredProviderToken", count=5)
        outcome = await sender.send(TOKEN, note())
        assert (outcome.klass, outcome.reason) == (OutcomeClass.CREDENTIALS, "ExpiredProviderToken")
        assert sim.request_count == 4


async def test_after_expired_provider_token_no_connection_resends_the_refused_token(
    tls: TlsFiles, signing: tuple[SimKey, bytes], autojump_clock: trio.testing.MockClock
) -> None:
    # Two connections took the same token (each keeps it up to 21 minutes); APNs calls it
    # expired (here: the simulator accepts tokens for 1300 s only). The request is re-sent
    # with a fresh token, not on the other connection with the refused one.
    await trio.sleep(1800 - (WALL_EPOCH % 1800) + 100)  # 100 s into a token bucket
    async with running(tls, signing, SimConfig(jwt_max_age=1300), connections=2) as (sim, sender):
        await sim.wait_for_connections(2)
        outcomes = await sender.send_many([(TOKEN, note()) for _ in range(6)])
        assert [o.klass for o in outcomes] == [OutcomeClass.DELIVERED] * 6
        assert {r.connection_id for r in sim.requests} == {1, 2}
        await trio.sleep(1210)  # the token is now 1310 s old
        n = len(sim.requests)
        outcome = await sender.send(TOKEN, note())
        tail = [(r.connection_id, r.status, r.reason, r.jwt_iat) for r in sim.requests[n:]]
        assert outcome.klass is OutcomeClass.DELIVERED, tail
        (refused, answered) = sim.requests[n:]
        assert refused.reason == "ExpiredProviderToken" and answered.status == 200
        assert answered.jwt_iat is not None and refused.jwt_iat is not None
        assert answered.jwt_iat > refused.jwt_iat and answered.connection_id > 2
        # both connections that held the refused token were replaced
        assert sim.connection_count == 4 and sender.stats()["token_refreshes"] == 1


async def test_jwt_refresh_timing(
    tls: TlsFiles, signing: tuple[SimKey, bytes], autojump_clock: trio.testing.MockClock
) -> None:
    await trio.sleep(1800 - (WALL_EPOCH % 1800) + 100)  # 100 s into a token bucket
    async with running(tls, signing, idle_ping_interval=600) as (sim, sender):
        for _ in range(12):  # two hours, one push every ten minutes
            assert (await sender.send(TOKEN, note())).klass is OutcomeClass.DELIVERED
            await trio.sleep(600)
        iats = [r.jwt_iat for r in sim.requests]
        assert all(r.status == 200 for r in sim.requests)
        assert len(set(iats)) == 4  # 1800 s buckets, each taken at the first push in it
        assert [iats.count(i) for i in sorted(set(i for i in iats if i is not None))] == [3, 3, 3, 3]
        assert all(0 <= r.time - (r.jwt_iat or 0) < 1800 for r in sim.requests)
        assert sim.connection_count == 1


async def test_a_connection_opened_just_before_the_token_changes_keeps_sending(
    tls: TlsFiles, signing: tuple[SimKey, bytes], autojump_clock: trio.testing.MockClock
) -> None:
    # APNs refuses a connection a new token within 20 minutes of its previous one: a
    # connection opened 10 minutes before the shared token changes keeps its first token
    # past the change (it is then 40 minutes old, inside the hour) and is never refused.
    await trio.sleep(1800 - (WALL_EPOCH % 1800) + 1200)  # 10 minutes before the change
    async with running(tls, signing, SimConfig(jwt_wedge=600.0)) as (sim, sender):
        for _ in range(70):  # 35 minutes, a push every 30 s
            assert (await sender.send(TOKEN, note())).klass is OutcomeClass.DELIVERED
            await trio.sleep(30)
        assert {r.status for r in sim.requests} == {200} and sim.connection_count == 1
        iats = [r.jwt_iat for r in sim.requests]
        first, second = sorted(set(iats))  # type: ignore[type-var]
        assert second - first == 1800
        switch = iats.index(second)
        assert sim.requests[switch].time - sim.requests[0].time >= 1260
        assert all(r.time - (r.jwt_iat or 0) < 3600 for r in sim.requests)


async def test_stream_limit_rises_from_one_then_follows_settings(
    tls: TlsFiles, signing: tuple[SimKey, bytes]
) -> None:
    async with running(tls, signing, SimConfig(max_concurrent_streams=40)) as (sim, sender):
        await sender.pool.wait_ready()
        (conn,) = sender.pool.connections
        assert conn.stream_limit == 1  # token connection before its first accepted request
        outcomes = await sender.send_many([(TOKEN, note()) for _ in range(200)])
        assert all(o.klass is OutcomeClass.DELIVERED for o in outcomes)
        assert conn.stream_limit == 40

        sim.set_max_concurrent_streams(3)
        with trio.fail_after(5):
            while conn.stream_limit != 3:  # noqa: ASYNC110 (bounded poll on a plain attribute)
                await trio.sleep(0.01)
        outcomes = await sender.send_many([(TOKEN, note()) for _ in range(100)])
        assert all(o.klass is OutcomeClass.DELIVERED for o in outcomes)
        # the simulator refuses streams over its limit; none were handed back
        assert sender.stats()["handbacks"] == 0
        assert sim.request_count == 300 and sim.connection_count == 1


async def test_goaway_mid_flight_resends_unanswered_none_lost_none_doubled(
    tls: TlsFiles, signing: tuple[SimKey, bytes]
) -> None:
    async with running(tls, signing, SimConfig(goaway_timing="immediate")) as (sim, sender):
        assert (await sender.send(TOKEN, note())).klass is OutcomeClass.DELIVERED
        sim.schedule_goaway(after_requests=40, reason="Shutdown")  # 39 more on this connection
        ids = [str(uuid.uuid4()) for _ in range(300)]
        outcomes = await sender.send_many([(TOKEN, note(i)) for i in ids])
        assert all(o.klass is OutcomeClass.DELIVERED for o in outcomes)
        assert [o.apns_id for o in outcomes] == ids
        seen = Counter(r.apns_id for r in sim.requests)
        assert all(seen[i] == 1 for i in ids)  # each processed exactly once
        first_conn = [r for r in sim.requests if r.connection_id == 1]
        assert len(first_conn) == 40  # at or below last-stream-id: answered there
        stats = sender.stats()
        assert stats["goaways"] == 1 and stats["reconnects"] == 1
        # Handed back: what went out on the first connection past its last stream id (the
        # batch goes out in slices, so the rest had not left yet and went to the second).
        assert 0 < stats["handbacks"] <= 300 - 39
        assert len([r for r in sim.requests if r.connection_id == 2]) == 300 - 39


async def test_repeated_goaways_on_every_connection_lose_and_double_nothing(
    tls: TlsFiles, signing: tuple[SimKey, bytes]
) -> None:
    config = SimConfig(max_concurrent_streams=30, goaway_timing="immediate")
    # Connections that die young are reopened after a backoff (0.5 s, doubling, by
    # default): kept short here, where every connection is sent away after 37 requests.
    async with running(tls, signing, config, connections=3, backoff_base=0.01, backoff_max=0.05) as (sim, sender):
        sim.schedule_goaway(after_requests=37, every_connection=True, reason="Shutdown")
        ids = [str(uuid.uuid4()) for _ in range(1000)]
        outcomes: list[Any] = []

        async def part(start: int) -> None:
            for i in range(start, len(ids), 200):
                outcomes.extend(await sender.send_many([(TOKEN, note(x)) for x in ids[i : i + 50]]))

        async with trio.open_nursery() as nursery:
            for start in range(0, 200, 50):
                nursery.start_soon(part, start)
        assert sorted(o.apns_id for o in outcomes) == sorted(ids)
        assert all(o.klass is OutcomeClass.DELIVERED for o in outcomes)
        delivered = Counter(r.apns_id for r in sim.requests if r.status == 200)
        assert sorted(delivered) == sorted(ids) and set(delivered.values()) == {1}
        assert sender.stats()["goaways"] >= 20


class FreezableProxy:
    """A TCP forwarder on loopback; ``freeze()`` silently stops forwarding on the
    connections open at that moment (a half-dead path); later connections work."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.frozen: set[int] = set()
        self.connections = 0

    def freeze(self) -> None:
        self.frozen = set(range(1, self.connections + 1))

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
        async with trio.open_nursery() as nursery:
            task_status.started(listener.socket.getsockname()[1])
            while True:
                client = await listener.accept()
                self.connections += 1
                nursery.start_soon(self._pair, self.connections, client)

    async def _pair(self, number: int, client: trio.SocketStream) -> None:
        server = await trio.open_tcp_stream("127.0.0.1", self.target_port)

        async def pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
            while data := await src.receive_some(65536):
                if number not in self.frozen:
                    await dst.send_all(data)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump, client, server)
                nursery.start_soon(pump, server, client)
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(client)
            await trio.aclose_forcefully(server)


async def test_unanswered_ping_replaces_the_connection(
    tls: TlsFiles, signing: tuple[SimKey, bytes], autojump_clock: trio.testing.MockClock
) -> None:
    sim = Simulator(SimConfig(cert_file=tls.cert_file, key_file=tls.key_file, keys=[signing[0]]))
    sim.config.wall_clock = wall
    async with trio.open_nursery() as nursery:
        proxy = FreezableProxy(await nursery.start(sim.serve))
        port = await nursery.start(proxy.serve)
        config = SenderConfig(
            host="127.0.0.1",
            port=port,
            ssl_context=make_ssl_context(ca_file=tls.ca_file),
            auth=token_auth(signing),
            connections=1,
            idle_ping_interval=30,
            ping_timeout=5,
        )
        async with open_sender(config) as sender:
            assert (await sender.send(TOKEN, note())).klass is OutcomeClass.DELIVERED
            await trio.sleep(100)  # idle: PINGs are sent and answered
            assert sender.stats()["reconnects"] == 0
            proxy.freeze()
            start = trio.current_time()
            await trio.sleep(36)  # 30 s idle + 5 s for the PING answer
            stats = sender.stats()
            assert stats["reconnects"] == 1, stats
            assert sender.pool.stats.closes == {"no answer to PING": 1}
            assert trio.current_time() - start <= 36
            assert (await sender.send(TOKEN, note())).klass is OutcomeClass.DELIVERED
            assert proxy.connections == 2
        nursery.cancel_scope.cancel()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_reconnect_with_backoff_while_the_server_is_down(
    tls: TlsFiles, signing: tuple[SimKey, bytes], autojump_clock: trio.testing.MockClock
) -> None:
    port = free_port()
    config = SenderConfig(
        host="127.0.0.1",
        port=port,
        ssl_context=make_ssl_context(ca_file=tls.ca_file),
        auth=token_auth(signing),
        connections=1,
        backoff_base=1.0,
        backoff_max=8.0,
        request_timeout=60.0,
    )
    sim = Simulator(
        SimConfig(port=port, cert_file=tls.cert_file, key_file=tls.key_file, keys=[signing[0]])
    )
    sim.config.wall_clock = wall
    async with trio.open_nursery() as nursery, open_sender(config) as sender:
        outcomes: list[Any] = []

        async def send_one() -> None:
            outcomes.append(await sender.send(TOKEN, note()))

        nursery.start_soon(send_one)  # waits for a connection instead of failing
        await trio.sleep(10)
        # attempts at 0, then after 0.5-1, 1-2, 2-4, 4-8 s: 4 or 5 failures within 10 s
        assert 4 <= sender.pool.stats.connect_failures <= 5
        await trio.sleep(20)
        # then 4-8 s apart (the cap): attempts up to t=30 number 6 (slowest) to 10 (fastest)
        assert 6 <= sender.pool.stats.connect_failures <= 10
        await nursery.start(sim.serve)
        await trio.sleep(8)
        assert len(outcomes) == 1 and outcomes[0].klass is OutcomeClass.DELIVERED
        assert sender.stats()["connects"] == 1
        nursery.cancel_scope.cancel()


async def test_connections_closed_young_for_errors_are_reopened_with_backoff_not_at_once(
    tls: TlsFiles, signing: tuple[SimKey, bytes], autojump_clock: trio.testing.MockClock
) -> None:
    # APNs closes a connection that makes too many errors; here one BadDeviceToken does.
    async with running(tls, signing, SimConfig(max_errors=5, bad_device_token_weight=5)) as (sim, sender):
        sim.set_token_state(TOKEN, environment="development")  # BadDeviceToken here
        end = trio.current_time() + 10
        pushes = 0
        while trio.current_time() < end and pushes < 100:
            outcome = await sender.send(TOKEN, note())
            assert outcome.klass in (OutcomeClass.TOKEN_DEAD, OutcomeClass.RETRY)
            pushes += 1
        # Each connection answered once and was closed. Reconnecting at once opened one per
        # push (100 in no time); now they are at least 0.25 s, then 0.5 s apart (a
        # connection that answered waits at most YOUNG_RECONNECT_MAX = 1 s).
        assert trio.current_time() >= end and 8 <= sim.connection_count <= 21, (pushes, sim.connection_count)


async def test_untrusted_server_certificate_is_refused(
    tls: TlsFiles,
    signing: tuple[SimKey, bytes],
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
) -> None:
    other_ca = generate_tls(tmp_path / "other").ca_file
    async with running(
        tls,
        signing,
        ssl_context=make_ssl_context(ca_file=other_ca),
        max_attempts=1,
        request_timeout=5,
    ) as (sim, sender):
        outcome = await sender.send(TOKEN, note())
        assert (outcome.klass, outcome.detail) == (OutcomeClass.RETRY, "no connection to APNs")
        assert sender.pool.stats.connect_failures >= 1
        assert sim.connection_count == 0  # no TLS session was ever established


async def test_request_timeout_resets_the_stream_and_keeps_the_connection(
    tls: TlsFiles, signing: tuple[SimKey, bytes], autojump_clock: trio.testing.MockClock
) -> None:
    async with running(tls, signing, request_timeout=5, max_attempts=1) as (sim, sender):
        assert (await sender.send(TOKEN, note())).klass is OutcomeClass.DELIVERED
        sim.config.response_delay = 30
        outcomes = await sender.send_many([(TOKEN, note()) for _ in range(10)])
        assert all(o.klass is OutcomeClass.RETRY for o in outcomes)
        assert all(o.detail and o.detail.startswith("timeout") for o in outcomes)
        assert sender.stats()["in_flight"] == 0
        sim.config.response_delay = 0
        assert (await sender.send(TOKEN, note())).klass is OutcomeClass.DELIVERED
        await trio.sleep(60)  # the late answers were dropped with the reset streams
        assert sim.connection_count == 1 and sim.request_count == 2
        assert sender.stats()["outcomes"]["delivered"] == 2


async def test_certificate_auth_and_a_wrong_environment_certificate(
    tls: TlsFiles, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    sim = Simulator(
        SimConfig(cert_file=tls.cert_file, key_file=tls.key_file, client_ca_file=tls.ca_file)
    )
    both = generate_client_certificate(tls, tmp_path / "both", TOPIC)
    dev_only = generate_client_certificate(
        tls, tmp_path / "dev", TOPIC, environments=("development",)
    )
    async with trio.open_nursery() as nursery:
        port = await nursery.start(sim.serve)

        def config(cert: tuple[Path, Path]) -> SenderConfig:
            ctx = make_ssl_context(ca_file=tls.ca_file, client_cert=cert[0], client_key=cert[1])
            return SenderConfig(host="127.0.0.1", port=port, ssl_context=ctx, connections=1)

        async with open_sender(config(both)) as sender:
            outcome = await sender.send(TOKEN, note())
            assert outcome.klass is OutcomeClass.DELIVERED, outcome
            assert "authorization" not in sim.requests[0].headers
        # APNs answers a certificate for the other environment with a GOAWAY
        async with open_sender(config(dev_only)) as sender:
            outcome = await sender.send(TOKEN, note())
            assert (outcome.klass, outcome.reason) == (
                OutcomeClass.CREDENTIALS,
                "BadCertificateEnvironment",
            )
            # later requests are refused at once, while the pool keeps retrying (backing off)
            with trio.fail_after(60):
                while sender.pool.refusal is None:  # noqa: ASYNC110 (bounded poll)
                    await trio.sleep(0.1)
            before = trio.current_time()
            again = await sender.send(TOKEN, note())
            assert (again.klass, again.reason) == (outcome.klass, outcome.reason)
            assert trio.current_time() == before
            assert sender.stats()["handbacks"] == 0
        assert sim.request_count == 1
        nursery.cancel_scope.cancel()


def test_config_environments_and_validation() -> None:
    ctx = ssl.create_default_context()
    assert SenderConfig.for_environment("production", ssl_context=ctx).host == "api.push.apple.com"
    sandbox = SenderConfig.for_environment("sandbox", ssl_context=ctx, port=2197)
    assert (sandbox.host, sandbox.port) == ("api.sandbox.push.apple.com", 2197)
    with pytest.raises(ValueError, match="port"):
        SenderConfig.for_environment("sandbox", ssl_context=ctx, port=8443)
    with pytest.raises(ValueError, match="environment"):
        SenderConfig.for_environment("staging", ssl_context=ctx)
    with pytest.raises(ValueError, match="connections"):
        SenderConfig(host="localhost", ssl_context=ctx, connections=0)


async def test_transport_under_httpx_async_client(
    tls: TlsFiles, signing: tuple[SimKey, bytes]
) -> None:
    sim = Simulator(SimConfig(cert_file=tls.cert_file, key_file=tls.key_file, keys=[signing[0]]))
    auth = token_auth(signing, clock=lambda: WALL_EPOCH)
    sim.config.wall_clock = lambda: WALL_EPOCH
    async with trio.open_nursery() as nursery:
        port = await nursery.start(sim.serve)
        ctx = make_ssl_context(ca_file=tls.ca_file)
        async with (
            open_transport("127.0.0.1", port, ctx) as transport,
            httpx.AsyncClient(transport=transport, base_url=f"https://127.0.0.1:{port}") as client,
        ):
            headers = {
                "authorization": auth.authorization().decode(),
                "apns-topic": TOPIC,
                "apns-push-type": "alert",
            }
            ok = await client.post(
                f"/3/device/{TOKEN}", headers=headers, json={"aps": {"alert": "hi"}}
            )
            assert ok.status_code == 200 and ok.http_version == "HTTP/2"
            assert ok.headers["apns-id"] == sim.requests[0].apns_id
            assert sim.requests[0].headers[":authority"] == f"127.0.0.1:{port}"
            assert sim.requests[0].body == b'{"aps":{"alert":"hi"}}'
            bad = await client.post("/3/device/xyz", headers=headers, content=b"{}")
            assert bad.status_code == 400 and bad.json() == {"reason": "BadDeviceToken"}
        nursery.cancel_scope.cancel()


async def test_answers_that_call_for_a_new_connection_get_one(
    tls: TlsFiles, signing: tuple[SimKey, bytes], autojump_clock: trio.testing.MockClock
) -> None:
    async with running(tls, signing) as (sim, sender):
        assert (await sender.send(TOKEN, note())).klass is OutcomeClass.DELIVERED
        for status, reason in ((503, "Shutdown"), (403, "ExpiredProviderToken")):
            sim.inject(status, reason)
            assert (await sender.send(TOKEN, note())).klass is OutcomeClass.DELIVERED
        # Each refusal finished its connection; the push went again on the next one.
        assert [(r.status, r.reason, r.connection_id) for r in sim.requests] == [
            (200, None, 1), (503, "Shutdown", 1), (200, None, 2), (403, "ExpiredProviderToken", 2), (200, None, 3),
        ]  # fmt: skip
        assert sender.stats()["reconnects"] == 2


async def test_retry_after_is_honoured_and_a_long_one_goes_back_to_the_caller(
    tls: TlsFiles, signing: tuple[SimKey, bytes], autojump_clock: trio.testing.MockClock
) -> None:
    async with running(tls, signing, backoff_max=30.0) as (sim, sender):
        sim.inject(503, "ServiceUnavailable", retry_after=5)
        t0 = trio.current_time()
        assert (await sender.send(TOKEN, note())).klass is OutcomeClass.DELIVERED
        assert trio.current_time() - t0 >= 5  # re-sent no sooner than APNs asked
        sim.inject(429, "TooManyRequests", retry_after=600)
        t0 = trio.current_time()
        outcome = await sender.send(TOKEN, note())
        # Longer than the sender waits (backoff_max): back to the caller at once, with the
        # wait, for the durable queue (which honours it); not re-sent early.
        assert (outcome.klass, outcome.retry_after) == (OutcomeClass.RETRY, 600)
        assert trio.current_time() - t0 < 1 and len(sim.requests) == 3


async def test_a_token_change_on_a_young_connection_moves_sending_to_a_new_connection(
    tls: TlsFiles, signing: tuple[SimKey, bytes], autojump_clock: trio.testing.MockClock
) -> None:
    # The provider token changes every 1800 s for everyone; APNs refuses a connection a new
    # token within 20 minutes of its previous one (here: within 4000 s, so the connection's
    # first change, 21 minutes after its first token, already is too soon) and keeps
    # refusing that connection.
    config = SimConfig(jwt_min_refresh=4000.0, jwt_wedge=600.0)
    async with running(tls, signing, config, backoff_base=1.0) as (sim, sender):
        assert (await sender.send(TOKEN, note())).klass is OutcomeClass.DELIVERED
        await trio.sleep(3001.0)  # the token bucket rolled over
        outcomes = await sender.send_many([(TOKEN, note()) for _ in range(5)])
        assert [o.klass for o in outcomes] == [OutcomeClass.DELIVERED] * 5
        refused = [r for r in sim.requests if r.reason == "TooManyProviderTokenUpdates"]
        assert refused and {r.connection_id for r in refused} == {1}
        assert {r.connection_id for r in sim.requests if r.status == 200} == {1, 2}
        assert sender.stats()["reconnects"] == 1
