"""apns.simulator driven by a plain h2 client over trio TLS on loopback."""

from __future__ import annotations

import base64
import json
import ssl
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import pytest
import trio

from apns.simulator import (
    SimConfig,
    SimKey,
    Simulator,
    TlsFiles,
    generate_signing_key,
    generate_tls,
    sign_provider_token,
)

TOPIC = "com.example.app"
TOKEN = "ab" * 32
KID, TEAM = "KEYID00001", "TEAMID0001"
BASE_TIME = 1_800_000_000.0


# --------------------------------------------------------------------------- a tiny client


@dataclass
class Reply:
    stream_id: int
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    reset_code: int | None = None
    data_frames: int = 0
    done: trio.Event = field(default_factory=trio.Event)

    @property
    def reason(self) -> str | None:
        return json.loads(self.body)["reason"] if self.body else None

    @property
    def json(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.body)
        return result


class Client:
    """One HTTP/2 connection: a reader task, explicit sends, replies per stream."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=True,
                header_encoding=None,
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
            )
        )
        self.replies: dict[int, Reply] = {}
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.settings_changes: list[dict[int, int]] = []
        self.changed = trio.Event()
        self.closed = trio.Event()
        self.protocol_error: h2.exceptions.ProtocolError | None = None
        self.send_lock = trio.StrictFIFOLock()

    async def start(self, nursery: trio.Nursery) -> None:
        self.h2.initiate_connection()
        await self.flush()
        nursery.start_soon(self._reader)

    async def flush(self) -> None:
        async with self.send_lock:
            data = self.h2.data_to_send()
            if data:
                await self.stream.send_all(data)

    async def _reader(self) -> None:
        try:
            while True:
                data = await self.stream.receive_some(65536)
                if not data:
                    break
                for event in self.h2.receive_data(data):
                    self._on_event(event)
                await self.flush()
                self._notify()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except h2.exceptions.ProtocolError as exc:
            self.protocol_error = exc
        finally:
            self.closed.set()
            self._notify()

    def _notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def _on_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            reply = self.replies[event.stream_id]
            headers = {k.decode(): v.decode() for k, v in event.headers or ()}
            reply.status = int(headers.pop(":status"))
            reply.headers = headers
        elif isinstance(event, h2.events.DataReceived):
            self.replies[event.stream_id].body += event.data or b""
            self.replies[event.stream_id].data_frames += 1
            self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            self.replies[event.stream_id].done.set()
        elif isinstance(event, h2.events.StreamReset):
            reply = self.replies[event.stream_id]
            reply.reset_code = event.error_code
            reply.done.set()
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self.settings_changes.append(
                {int(code): change.new_value for code, change in event.changed_settings.items()}
            )
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = event

    @property
    def max_streams(self) -> int:
        return self.h2.remote_settings.max_concurrent_streams

    def send(
        self,
        headers: list[tuple[str, str]],
        body: bytes = b'{"aps":{"alert":"hi"}}',
    ) -> Reply:
        stream_id = self.h2.get_next_available_stream_id()
        self.replies[stream_id] = Reply(stream_id)
        encoded = [(k.encode(), v.encode()) for k, v in headers]
        self.h2.send_headers(stream_id, encoded, end_stream=not body)
        if body:
            self.h2.send_data(stream_id, body, end_stream=True)
        return self.replies[stream_id]

    async def post(
        self, headers: list[tuple[str, str]], body: bytes = b'{"aps":{"alert":"hi"}}'
    ) -> Reply:
        reply = self.send(headers, body)
        await self.flush()
        with trio.fail_after(5):
            await reply.done.wait()
        return reply

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        with trio.fail_after(5):
            while not condition():
                await self.changed.wait()


def request_headers(
    token: str = TOKEN,
    *,
    jwt: str | None,
    topic: str | None = TOPIC,
    extra: list[tuple[str, str]] | None = None,
    method: str = "POST",
    path: str | None = None,
) -> list[tuple[str, str]]:
    headers = [
        (":method", method),
        (":scheme", "https"),
        (":path", path if path is not None else f"/3/device/{token}"),
        (":authority", "localhost"),
    ]
    if jwt is not None:
        headers.append(("authorization", f"bearer {jwt}"))
    if topic is not None:
        headers.append(("apns-topic", topic))
    return headers + (extra or [])


def client_context(ca_file: Path | None, *, alpn: bool = True) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    if alpn:
        context.set_alpn_protocols(["h2"])
    return context


async def open_client(
    sim: Simulator, nursery: trio.Nursery, *, alpn: bool = True, ca_file: Path | None = None
) -> Client:
    raw = await trio.open_tcp_stream("127.0.0.1", sim.port)
    stream: trio.abc.Stream = raw
    if sim.config.tls:
        assert sim.tls is not None
        context = client_context(ca_file or sim.tls.ca_file, alpn=alpn)
        ssl_stream = trio.SSLStream(raw, context, server_hostname="localhost")
        await ssl_stream.do_handshake()
        stream = ssl_stream
    client = Client(stream)
    await client.start(nursery)
    return client


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return generate_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def signing() -> tuple[SimKey, bytes]:
    key, private_pem = generate_signing_key(KID, TEAM)
    return key, private_pem


def fake_wall_clock() -> float:
    return BASE_TIME + trio.current_time()


def make_jwt(
    private_pem: bytes, iat: float | None = None, *, kid: str = KID, team: str = TEAM
) -> str:
    issued = int(fake_wall_clock() if iat is None else iat)
    return sign_provider_token(private_pem, kid, team, issued)


@dataclass
class Env:
    sim: Simulator
    nursery: trio.Nursery
    private_pem: bytes
    _jwt: str | None = None

    def jwt(self, iat: float | None = None) -> str:
        """The test's provider token (one per test, as a provider would reuse it), or a
        fresh one issued at ``iat``."""
        if iat is not None:
            return make_jwt(self.private_pem, iat)
        if self._jwt is None:
            self._jwt = make_jwt(self.private_pem)
        return self._jwt

    async def client(self, **kwargs: Any) -> Client:
        return await open_client(self.sim, self.nursery, **kwargs)


@pytest.fixture
async def start(
    nursery: trio.Nursery, tls_files: TlsFiles, signing: tuple[SimKey, bytes]
) -> AsyncIterator[Callable[..., Any]]:
    key, private_pem = signing

    async def _start(**overrides: Any) -> Env:
        config = SimConfig(
            tls_dir=tls_files.ca_file.parent,  # reuses the session's files
            keys=[key],
            wall_clock=fake_wall_clock,
            seed=1,
        )
        for name, value in overrides.items():
            setattr(config, name, value)
        sim = Simulator(config)
        assert sim.tls == tls_files
        await nursery.start(sim.serve)
        return Env(sim, nursery, private_pem)

    yield _start


# --------------------------------------------------------------------------- tests


async def test_success_echoes_apns_id_and_records(start: Callable[..., Any]) -> None:
    env = await start()
    client = await env.client()
    iat = int(fake_wall_clock())
    jwt = env.jwt(iat)
    apns_id = str(uuid.uuid4())
    reply = await client.post(request_headers(jwt=jwt, extra=[("apns-id", apns_id)]), b'{"aps":{}}')
    assert reply.status == 200
    assert reply.headers["apns-id"] == apns_id
    assert reply.body == b""
    assert "apns-unique-id" not in reply.headers  # production

    generated = await client.post(request_headers(jwt=jwt))
    assert generated.status == 200
    assert uuid.UUID(generated.headers["apns-id"]).version == 4
    assert generated.headers["apns-id"] == generated.headers["apns-id"].lower()

    await env.sim.wait_for_requests(2)
    first, second = env.sim.requests
    assert (first.connection_id, first.stream_id, first.status, first.reason) == (1, 1, 200, None)
    assert first.apns_id == apns_id and first.token == TOKEN and first.body == b'{"aps":{}}'
    assert first.headers["apns-topic"] == TOPIC and first.headers[":path"] == f"/3/device/{TOKEN}"
    assert first.jwt_kid == KID and first.jwt_iat == iat
    assert second.apns_id == generated.headers["apns-id"] and second.stream_id == 3


PAYLOAD = b'{"aps":{"alert":"x"}}'
VALIDATION_CASES: list[tuple[str, dict[str, Any], bytes, int, str]] = [
    ("method", {"method": "GET"}, PAYLOAD, 405, "MethodNotAllowed"),
    ("path", {"path": "/2/device/" + TOKEN}, PAYLOAD, 404, "BadPath"),
    ("empty token", {"path": "/3/device/"}, PAYLOAD, 400, "MissingDeviceToken"),
    ("odd token", {"token": "abc"}, PAYLOAD, 400, "BadDeviceToken"),
    ("non-hex token", {"token": "zz" * 32}, PAYLOAD, 400, "BadDeviceToken"),
    ("apns-id", {"extra": [("apns-id", "not-a-uuid")]}, PAYLOAD, 400, "BadMessageId"),
    ("priority", {"extra": [("apns-priority", "7")]}, PAYLOAD, 400, "BadPriority"),
    (
        "background at 10",
        {"extra": [("apns-push-type", "background"), ("apns-priority", "10")]},
        PAYLOAD,
        400,
        "BadPriority",
    ),
    ("expiration", {"extra": [("apns-expiration", "tomorrow")]}, PAYLOAD, 400, "BadExpirationDate"),
    ("collapse id", {"extra": [("apns-collapse-id", "é" * 33)]}, PAYLOAD, 400, "BadCollapseId"),
    ("push type", {"extra": [("apns-push-type", "banner")]}, PAYLOAD, 400, "InvalidPushType"),
    ("topic", {"topic": None}, PAYLOAD, 400, "MissingTopic"),
    (
        "duplicate",
        {"extra": [("apns-priority", "10"), ("apns-priority", "5")]},
        PAYLOAD,
        400,
        "DuplicateHeaders",
    ),
    ("empty body", {}, b"", 400, "PayloadEmpty"),
    ("too large", {}, b"x" * 4097, 413, "PayloadTooLarge"),
    (
        "voip too large",
        {"extra": [("apns-push-type", "voip")], "topic": TOPIC + ".voip"},
        b"x" * 5121,
        413,
        "PayloadTooLarge",
    ),
]


@pytest.mark.parametrize(
    ("overrides", "body", "status", "reason"),
    [case[1:] for case in VALIDATION_CASES],
    ids=[case[0] for case in VALIDATION_CASES],
)
async def test_validation_reasons(
    start: Callable[..., Any], overrides: dict[str, Any], body: bytes, status: int, reason: str
) -> None:
    env = await start()
    client = await env.client()
    headers = request_headers(overrides.pop("token", TOKEN), jwt=env.jwt(), **overrides)
    reply = await client.post(headers, body)
    assert (reply.status, reply.reason) == (status, reason)
    assert reply.headers["content-type"] == "application/json"
    assert set(reply.json) == {"reason"}
    uuid.UUID(reply.headers["apns-id"])
    await env.sim.wait_for_requests(1)
    assert (env.sim.requests[0].status, env.sim.requests[0].reason) == (status, reason)


async def test_accepted_edge_values(start: Callable[..., Any]) -> None:
    env = await start()
    client = await env.client()
    jwt = env.jwt()
    ok = [
        [("apns-priority", "1"), ("apns-expiration", "0"), ("apns-collapse-id", "c" * 64)],
        [("apns-push-type", "widgets")],
        [("apns-push-type", "controls")],
        [("apns-push-type", "background"), ("apns-priority", "5")],
    ]
    for extra in ok:
        reply = await client.post(request_headers(jwt=jwt, extra=extra))
        assert reply.status == 200, extra
    voip = await client.post(
        request_headers(jwt=jwt, topic=TOPIC + ".voip", extra=[("apns-push-type", "voip")]),
        b"x" * 5120,
    )
    assert voip.status == 200
    long_token = await client.post(request_headers("cd" * 80, jwt=jwt), b"x" * 4096)
    assert long_token.status == 200


async def test_topic_rules(start: Callable[..., Any]) -> None:
    env = await start(allowed_topics={TOPIC})
    client = await env.client()
    jwt = env.jwt()
    other = await client.post(request_headers(jwt=jwt, topic="com.other.app"))
    assert (other.status, other.reason) == (400, "TopicDisallowed")
    env.sim.set_token_state(TOKEN, topic=TOPIC + ".voip")
    wrong = await client.post(request_headers(jwt=jwt))
    assert (wrong.status, wrong.reason) == (400, "DeviceTokenNotForTopic")


async def test_token_states(start: Callable[..., Any]) -> None:
    env = await start()
    client = await env.client()
    jwt = env.jwt()
    gone, expired, sandbox = "01" * 32, "02" * 32, "03" * 32
    env.sim.set_token_state(gone, unregistered_at_ms=1_700_000_000_123)
    env.sim.set_token_state(expired, expired=True)
    env.sim.set_token_state(sandbox, environment="development")
    reply = await client.post(request_headers(gone, jwt=jwt))
    assert reply.status == 410 and reply.json == {
        "reason": "Unregistered",
        "timestamp": 1_700_000_000_123,
    }
    reply = await client.post(request_headers(expired, jwt=jwt))
    assert (reply.status, reply.json) == (410, {"reason": "ExpiredToken"})
    reply = await client.post(request_headers(sandbox, jwt=jwt))
    assert (reply.status, reply.reason) == (400, "BadDeviceToken")
    env.sim.clear_token_state(gone)
    assert (await client.post(request_headers(gone, jwt=jwt))).status == 200
    assert env.sim.requests[0].timestamp_ms == 1_700_000_000_123


async def test_development_environment_sends_unique_id(start: Callable[..., Any]) -> None:
    env = await start(environment="development")
    client = await env.client()
    env.sim.set_token_state(TOKEN, environment="production")
    reply = await client.post(request_headers("aa" * 32, jwt=env.jwt()))
    assert reply.status == 200 and uuid.UUID(reply.headers["apns-unique-id"])
    reply = await client.post(request_headers(jwt=env.jwt()))
    assert reply.reason == "BadDeviceToken"


# ---- JWT


async def test_missing_and_invalid_provider_tokens(
    start: Callable[..., Any], signing: tuple[SimKey, bytes]
) -> None:
    env = await start()
    client = await env.client()
    missing = await client.post(request_headers(jwt=None))
    assert (missing.status, missing.reason) == (403, "MissingProviderToken")
    not_bearer = await client.post(
        request_headers(jwt=None, extra=[("authorization", "basic abc")])
    )
    assert not_bearer.reason == "MissingProviderToken"

    _, stranger_pem = generate_signing_key(KID, TEAM)
    invalid = [
        "garbage",
        "a.b.c",
        make_jwt(stranger_pem),  # right kid, wrong key: bad signature
        make_jwt(env.private_pem, kid="UNKNOWNKID"),
        make_jwt(env.private_pem, team="OTHERTEAM1"),  # kid/iss pair unknown
    ]
    _, claims, signature = env.jwt().split(".")
    hs256 = (
        base64.urlsafe_b64encode(b'{"alg":"HS256","kid":"' + KID.encode() + b'"}')
        .rstrip(b"=")
        .decode()
    )
    invalid.append(f"{hs256}.{claims}.{signature}")
    for jwt in invalid:
        reply = await client.post(request_headers(jwt=jwt))
        assert (reply.status, reply.reason) == (403, "InvalidProviderToken"), jwt
    # Still gated: nothing valid was posted, so the limit is still 1.
    assert client.max_streams == 1


async def test_der_signature_accepted(start: Callable[..., Any]) -> None:
    env = await start()
    client = await env.client()
    der = sign_provider_token(env.private_pem, KID, TEAM, int(fake_wall_clock()), der=True)
    assert der.split(".")[2].startswith("ME")  # base64 of 0x30 0x4_: a DER SEQUENCE
    assert (await client.post(request_headers(jwt=der))).status == 200


async def test_expired_provider_token(start: Callable[..., Any]) -> None:
    env = await start()
    client = await env.client()
    old = env.jwt(iat=fake_wall_clock() - 3601)
    reply = await client.post(request_headers(jwt=old))
    assert (reply.status, reply.reason) == (403, "ExpiredProviderToken")
    fresh_enough = env.jwt(iat=fake_wall_clock() - 3500)
    assert (await client.post(request_headers(jwt=fresh_enough))).status == 200


async def test_token_updates_too_often(
    start: Callable[..., Any], autojump_clock: trio.testing.MockClock
) -> None:
    env = await start()
    client = await env.client()
    first = env.jwt()
    assert (await client.post(request_headers(jwt=first))).status == 200
    await trio.sleep(60)
    second = env.jwt(fake_wall_clock())
    assert second != first
    reply = await client.post(request_headers(jwt=second))
    assert (reply.status, reply.reason) == (429, "TooManyProviderTokenUpdates")
    assert (await client.post(request_headers(jwt=first))).status == 200  # the old one still works
    await trio.sleep(1200)
    assert (await client.post(request_headers(jwt=second))).status == 200
    # A fresh connection may use any valid token at once.
    other = await env.client()
    assert (await other.post(request_headers(jwt=env.jwt(fake_wall_clock())))).status == 200


async def test_wedge_after_token_update(
    start: Callable[..., Any], autojump_clock: trio.testing.MockClock
) -> None:
    env = await start(jwt_wedge=300.0)
    client = await env.client()
    first = env.jwt()
    assert (await client.post(request_headers(jwt=first))).status == 200
    await trio.sleep(1)
    assert (await client.post(request_headers(jwt=env.jwt(fake_wall_clock())))).status == 429
    assert (await client.post(request_headers(jwt=first))).reason == "TooManyProviderTokenUpdates"
    await trio.sleep(300)
    assert (await client.post(request_headers(jwt=first))).status == 200


async def test_key_binding_rules(start: Callable[..., Any], signing: tuple[SimKey, bytes]) -> None:
    key, _ = signing
    related, related_pem = generate_signing_key("RELATED001", TEAM)
    key_b, pem_b = generate_signing_key("UNRELATED1", TEAM)
    other_team, pem_t = generate_signing_key("OTHERKEY01", "OTHERTEAM1")
    scoped, pem_s = generate_signing_key("SCOPED0001", "SCOPETEAM1", topics=[TOPIC])
    sandbox, pem_d = generate_signing_key("SANDBOX001", TEAM)
    sandbox.environment = "development"
    primary = SimKey(key.key_id, key.team_id, key.public_key_pem, related_key_id="RELATED001")
    env = await start(keys=[primary, related, key_b, other_team, scoped, sandbox])
    client = await env.client()
    assert (await client.post(request_headers(jwt=env.jwt()))).status == 200

    unrelated = await client.post(request_headers(jwt=make_jwt(pem_b, kid="UNRELATED1")))
    assert (unrelated.status, unrelated.reason) == (403, "UnrelatedKeyIdInToken")
    team = await client.post(
        request_headers(jwt=make_jwt(pem_t, kid="OTHERKEY01", team="OTHERTEAM1"))
    )
    assert (team.status, team.reason) == (403, "UnrelatedKeyIdInToken")
    # The related key is allowed, but it is a new token within 20 minutes.
    rel = await client.post(request_headers(jwt=make_jwt(related_pem, kid="RELATED001")))
    assert (rel.status, rel.reason) == (429, "TooManyProviderTokenUpdates")

    env_client = await env.client()
    bad_env = await env_client.post(request_headers(jwt=make_jwt(pem_d, kid="SANDBOX001")))
    assert (bad_env.status, bad_env.reason) == (403, "BadEnvironmentKeyIdInToken")

    scoped_client = await env.client()
    scoped_jwt = make_jwt(pem_s, kid="SCOPED0001", team="SCOPETEAM1")
    assert (await scoped_client.post(request_headers(jwt=scoped_jwt))).status == 200
    outside = await scoped_client.post(request_headers(jwt=scoped_jwt, topic="com.example.other"))
    assert (outside.status, outside.reason) == (403, "UnrelatedKeyIdInToken")


# ---- streams, SETTINGS, GOAWAY


async def test_stream_limit_one_then_n(start: Callable[..., Any]) -> None:
    env = await start(max_concurrent_streams=50)
    client = await env.client()
    await client.wait_for(lambda: client.h2.remote_settings.max_concurrent_streams == 1)
    assert client.settings_changes[0][h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] == 1
    assert client.settings_changes[0][h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE] == 8000
    assert (await client.post(request_headers(jwt=None))).status == 403  # no valid JWT: still 1
    assert client.max_streams == 1
    assert (await client.post(request_headers(jwt=env.jwt()))).status == 200
    await client.wait_for(lambda: client.max_streams == 50)
    jwt = env.jwt()
    replies = [client.send(request_headers(jwt=jwt)) for _ in range(50)]
    await client.flush()
    for reply in replies:
        with trio.fail_after(5):
            await reply.done.wait()
        assert reply.status == 200


async def test_stream_limit_violation_refused(start: Callable[..., Any]) -> None:
    env = await start()
    client = await env.client()
    await client.wait_for(lambda: client.max_streams == 1)
    # Ignore the limit on purpose: two streams at once before the first valid token.
    client.h2.remote_settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = 10
    client.h2.remote_settings.acknowledge()
    jwt = env.jwt()
    first = client.send(request_headers(jwt=jwt))
    second = client.send(request_headers(jwt=jwt))
    await client.flush()
    with trio.fail_after(5):
        await second.done.wait()
        await first.done.wait()
    assert second.reset_code == h2.errors.ErrorCodes.REFUSED_STREAM
    assert first.status == 200
    assert [r.stream_id for r in env.sim.requests] == [first.stream_id]


async def test_stream_limit_violation_goaway(start: Callable[..., Any]) -> None:
    env = await start(stream_violation="goaway")
    client = await env.client()
    await client.wait_for(lambda: client.max_streams == 1)
    client.h2.remote_settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = 10
    client.h2.remote_settings.acknowledge()
    jwt = env.jwt()
    first = client.send(request_headers(jwt=jwt))
    client.send(request_headers(jwt=jwt))
    await client.flush()
    await client.wait_for(lambda: client.closed.is_set())
    assert client.goaway is not None
    assert client.goaway.additional_data == b"Maximum active streams violated for this endpoint."
    assert client.goaway.last_stream_id == first.stream_id
    assert first.status == 200


async def test_settings_change_mid_connection(start: Callable[..., Any]) -> None:
    env = await start(max_concurrent_streams=20)
    client = await env.client()
    assert (await client.post(request_headers(jwt=env.jwt()))).status == 200
    await client.wait_for(lambda: client.max_streams == 20)
    env.sim.set_max_concurrent_streams(3)
    await client.wait_for(lambda: client.max_streams == 3)
    env.sim.set_max_concurrent_streams(700)
    await client.wait_for(lambda: client.max_streams == 700)
    # A gated connection keeps 1, then gets the new limit once it passes the gate.
    late = await env.client()
    await late.wait_for(lambda: late.max_streams == 1)
    assert (await late.post(request_headers(jwt=env.jwt()))).status == 200
    await late.wait_for(lambda: late.max_streams == 700)


async def test_throttle_on_error(start: Callable[..., Any]) -> None:
    env = await start(throttle_on_error=True, max_concurrent_streams=10)
    client = await env.client()
    jwt = env.jwt()
    assert (await client.post(request_headers(jwt=jwt))).status == 200
    await client.wait_for(lambda: client.max_streams == 10)
    assert (await client.post(request_headers("zz", jwt=jwt))).status == 400
    await client.wait_for(lambda: client.max_streams == 1)
    assert (await client.post(request_headers(jwt=jwt))).status == 200
    await client.wait_for(lambda: client.max_streams == 10)


async def test_goaway_with_last_stream_id(
    start: Callable[..., Any], autojump_clock: trio.testing.MockClock
) -> None:
    env = await start(response_delay=1.0)
    client = await env.client()
    jwt = env.jwt()
    assert (await client.post(request_headers(jwt=jwt))).status == 200  # stream 1
    await client.wait_for(lambda: client.max_streams == 1000)
    in_flight = [client.send(request_headers(jwt=jwt)) for _ in range(4)]  # streams 3, 5, 7, 9
    await client.flush()
    await env.sim.wait_for_received(5)  # the server has read them all (their answers wait 1 s)
    assert env.sim.request_count == 1
    env.sim.goaway(last_stream_id=5, reason="Shutdown")
    await client.wait_for(lambda: client.closed.is_set())
    assert client.goaway is not None
    assert client.goaway.last_stream_id == 5
    assert json.loads(client.goaway.additional_data or b"") == {"reason": "Shutdown"}
    assert [r.status for r in in_flight] == [200, 200, None, None]
    assert sorted(r.stream_id for r in env.sim.requests) == [1, 3, 5]


async def test_schedule_goaway_mid_stream(start: Callable[..., Any]) -> None:
    env = await start(max_concurrent_streams=100)
    env.sim.schedule_goaway(3, reason="Shutdown")
    client = await env.client()
    jwt = env.jwt()
    assert (await client.post(request_headers(jwt=jwt))).status == 200
    await client.wait_for(lambda: client.max_streams == 100)
    batch = [client.send(request_headers(jwt=jwt)) for _ in range(6)]
    await client.flush()
    await client.wait_for(lambda: client.closed.is_set())
    assert client.goaway is not None and client.goaway.last_stream_id == 5
    assert [r.status for r in batch] == [200, 200, None, None, None, None]
    assert env.sim.request_count == 3
    # Only once: a new connection is not cut.
    again = await env.client()
    for _ in range(5):
        assert (await again.post(request_headers(jwt=env.jwt()))).status == 200
    assert again.goaway is None


async def test_idle_timeout(
    start: Callable[..., Any], autojump_clock: trio.testing.MockClock
) -> None:
    env = await start(idle_timeout=30.0)
    client = await env.client()
    assert (await client.post(request_headers(jwt=env.jwt()))).status == 200
    await trio.sleep(20)
    client.h2.ping(b"12345678")
    await client.flush()
    await trio.sleep(20)  # the PING counted as activity
    assert not client.closed.is_set()
    with trio.fail_after(60):
        await client.closed.wait()
    assert client.goaway is not None
    assert json.loads(client.goaway.additional_data or b"") == {"reason": "IdleTimeout"}
    assert trio.current_time() == pytest.approx(50, abs=1)  # 30 s after the PING


async def test_ping_answered(start: Callable[..., Any]) -> None:
    env = await start()
    client = await env.client()
    acks: list[bytes] = []
    original = client._on_event

    def on_event(event: h2.events.Event) -> None:
        if isinstance(event, h2.events.PingAckReceived):
            acks.append(event.ping_data)
        original(event)

    client._on_event = on_event
    client.h2.ping(b"pingpong")
    await client.flush()
    await client.wait_for(lambda: acks == [b"pingpong"])


async def test_large_body_flow_control(start: Callable[..., Any]) -> None:
    """Bodies beyond the stream window: the simulator must open the window as it reads."""
    env = await start(max_concurrent_streams=100)
    client = await env.client()
    jwt = env.jwt()
    assert (await client.post(request_headers(jwt=jwt))).status == 200
    await client.wait_for(lambda: client.max_streams == 100)
    big = b"x" * 200_000  # > 65535 stream window: needs WINDOW_UPDATEs
    stream_id = client.h2.get_next_available_stream_id()
    client.replies[stream_id] = Reply(stream_id)
    client.h2.send_headers(
        stream_id, [(k.encode(), v.encode()) for k, v in request_headers(jwt=jwt)]
    )
    sent = 0
    while sent < len(big):
        window = client.h2.local_flow_control_window(stream_id)
        if window == 0:
            await client.flush()
            await client.wait_for(lambda: client.h2.local_flow_control_window(stream_id) > 0)
            continue
        chunk = big[sent : sent + min(window, 16384)]
        client.h2.send_data(stream_id, chunk)
        sent += len(chunk)
    client.h2.end_stream(stream_id)
    await client.flush()
    with trio.fail_after(5):
        await client.replies[stream_id].done.wait()
    assert (client.replies[stream_id].status, client.replies[stream_id].reason) == (
        413,
        "PayloadTooLarge",
    )
    record = env.sim.requests[-1]
    assert len(record.body) == 200_000


# ---- faults, latency, ordering


async def test_error_rates_with_seed(start: Callable[..., Any]) -> None:
    expected = {429: "TooManyRequests", 500: "InternalServerError", 503: "ServiceUnavailable"}

    async def run(seed: int) -> list[int | None]:
        env = await start(error_rates={429: 0.2, 500: 0.1, 503: 0.1}, seed=seed)
        client = await env.client()
        jwt = env.jwt()
        replies = [await client.post(request_headers(jwt=jwt))]  # passes the token gate
        await client.wait_for(lambda: client.max_streams == 1000)
        replies += [client.send(request_headers(jwt=jwt)) for _ in range(199)]
        await client.flush()
        await client.wait_for(lambda: all(r.done.is_set() for r in replies))
        for reply in replies:
            assert reply.status is not None
            assert reply.reason == expected.get(reply.status)
        return [r.status for r in replies]

    first = await run(7)
    assert first == await run(7)
    assert first != await run(8)
    assert 0.45 < first.count(200) / 200 < 0.8  # about (0.8*0.9*0.9) = 0.65
    assert {429, 500, 503} <= set(first)


async def test_inject_faults(start: Callable[..., Any]) -> None:
    env = await start()
    client = await env.client()
    jwt = env.jwt()
    env.sim.inject(503, "Shutdown", count=2)
    env.sim.inject(500, token="ef" * 32)
    replies = [await client.post(request_headers(jwt=jwt)) for _ in range(3)]
    assert [(r.status, r.reason) for r in replies] == [
        (503, "Shutdown"),
        (503, "Shutdown"),
        (200, None),
    ]
    assert (await client.post(request_headers("ef" * 32, jwt=jwt))).reason == "InternalServerError"
    assert (await client.post(request_headers("ef" * 32, jwt=jwt))).status == 200


async def test_token_rate_limit(
    start: Callable[..., Any], autojump_clock: trio.testing.MockClock
) -> None:
    env = await start(token_rate_limit=(3, 10.0))
    client = await env.client()
    jwt = env.jwt()
    statuses = [(await client.post(request_headers(jwt=jwt))).status for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    assert (await client.post(request_headers("99" * 32, jwt=jwt))).status == 200
    await trio.sleep(11)
    assert (await client.post(request_headers(jwt=jwt))).status == 200


async def test_response_delay_and_out_of_order(
    start: Callable[..., Any], autojump_clock: trio.testing.MockClock
) -> None:
    env = await start(response_delay=0.5, out_of_order=True, max_concurrent_streams=100)
    client = await env.client()
    jwt = env.jwt()
    assert (await client.post(request_headers(jwt=jwt))).status == 200
    await client.wait_for(lambda: client.max_streams == 100)
    started = trio.current_time()
    ids = [str(uuid.uuid4()) for _ in range(20)]
    replies = [client.send(request_headers(jwt=jwt, extra=[("apns-id", i)])) for i in ids]
    await client.flush()
    order: list[int] = []
    async with trio.open_nursery() as nursery:
        for reply in replies:

            async def wait(reply: Reply = reply) -> None:
                await reply.done.wait()
                order.append(reply.stream_id)

            nursery.start_soon(wait)
    assert [r.headers["apns-id"] for r in replies] == ids
    assert sorted(order) == [r.stream_id for r in replies] != order
    assert 0 < trio.current_time() - started <= 1.0 + 1e-6


async def test_out_of_order_without_delay(start: Callable[..., Any]) -> None:
    env = await start(out_of_order=True, max_concurrent_streams=100)
    client = await env.client()
    jwt = env.jwt()
    assert (await client.post(request_headers(jwt=jwt))).status == 200
    await client.wait_for(lambda: client.max_streams == 100)
    replies = [client.send(request_headers(jwt=jwt)) for _ in range(5)]
    await client.flush()
    await client.wait_for(lambda: all(r.done.is_set() for r in replies))
    answered = [r.stream_id for r in env.sim.requests[1:]]
    assert answered == sorted(answered, reverse=True)


async def test_error_driven_disconnect(start: Callable[..., Any]) -> None:
    env = await start(max_errors=6, bad_device_token_weight=5)
    client = await env.client()
    jwt = env.jwt()
    env.sim.set_token_state("01" * 32, unregistered_at_ms=1)
    for _ in range(3):
        assert (await client.post(request_headers("01" * 32, jwt=jwt))).status == 410  # no error
    assert (
        await client.post(request_headers(jwt=jwt, extra=[("apns-priority", "3")]))
    ).status == 400
    assert not client.closed.is_set()
    assert (await client.post(request_headers("0", jwt=jwt))).reason == "BadDeviceToken"
    await client.wait_for(lambda: client.closed.is_set())
    assert client.goaway is not None


# ---- transport


async def test_no_alpn_client_accepted(start: Callable[..., Any]) -> None:
    env = await start()
    client = await env.client(alpn=False)
    assert isinstance(client.stream, trio.SSLStream)
    assert client.stream.selected_alpn_protocol() is None
    assert (await client.post(request_headers(jwt=env.jwt()))).status == 200
    # aioapns's shape: no ALPN, and a host header instead of :authority
    headers = [(k, v) for k, v in request_headers(jwt=env.jwt()) if k != ":authority"]
    assert (await client.post([*headers, ("host", "api.push.apple.com")])).status == 200


async def test_alpn_h2_negotiated(start: Callable[..., Any]) -> None:
    env = await start()
    client = await env.client()
    assert isinstance(client.stream, trio.SSLStream)
    assert client.stream.selected_alpn_protocol() == "h2"


async def test_untrusted_ca_rejected(start: Callable[..., Any], tmp_path: Path) -> None:
    env = await start()
    other = generate_tls(tmp_path / "other")
    with pytest.raises(trio.BrokenResourceError) as info:
        await env.client(ca_file=other.ca_file)
    assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)


async def test_generated_tls_in_temp_dir_and_cleartext(
    nursery: trio.Nursery, signing: tuple[SimKey, bytes]
) -> None:
    key, pem = signing
    sim = Simulator(SimConfig(keys=[key]))
    assert sim.tls is not None and sim.tls.ca_file.exists()  # ready before serving
    await nursery.start(sim.serve)
    client = await open_client(sim, nursery)
    jwt = sign_provider_token(pem, KID, TEAM)  # real wall clock, as the config's default
    assert (await client.post(request_headers(jwt=jwt))).status == 200

    plain = Simulator(SimConfig(tls=False, require_auth=False))
    await nursery.start(plain.serve)
    plain_client = await open_client(plain, nursery)
    await plain_client.wait_for(lambda: plain_client.max_streams == 1000)  # no token gate
    assert (await plain_client.post(request_headers(jwt=None))).status == 200


async def test_many_connections(start: Callable[..., Any]) -> None:
    env = await start()
    jwt = env.jwt()

    async def one(i: int) -> None:
        client = await env.client()
        for _ in range(5):
            assert (await client.post(request_headers(f"{i:064x}", jwt=jwt))).status == 200

    async with trio.open_nursery() as nursery:
        for i in range(40):
            nursery.start_soon(one, i)
    assert env.sim.request_count == 200
    assert len({r.connection_id for r in env.sim.requests}) == 40


def test_generate_tls_reuses_files(tmp_path: Path) -> None:
    first = generate_tls(tmp_path)
    content = first.cert_file.read_bytes()
    second = generate_tls(tmp_path)
    assert second.cert_file.read_bytes() == content
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(content)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]


# ---- command line


async def test_command_line_serves_and_records(nursery: trio.Nursery, tmp_path: Path) -> None:
    import signal
    import sys

    key, private_pem = generate_signing_key(KID, TEAM)
    (tmp_path / "key.pem").write_bytes(key.public_key_pem)
    record = tmp_path / "requests.jsonl"
    process = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-m",
            "apns.simulator",
            "--port",
            "0",
            "--tls-dir",
            str(tmp_path / "tls"),
            "--key",
            f"{KID}:{TEAM}:{tmp_path / 'key.pem'}",
            "--streams",
            "7",
            "--record",
            str(record),
            "--unregistered",
            "0f" * 32,
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = b""
        with trio.fail_after(20):
            while not line.endswith(b"\n"):
                line += await process.stdout.receive_some(1)
        host, port = line.decode().removeprefix("listening on ").strip().rsplit(":", 1)
        assert host == "127.0.0.1"
        raw = await trio.open_tcp_stream(host, int(port))
        ssl_stream = trio.SSLStream(
            raw, client_context(tmp_path / "tls" / "ca.pem"), server_hostname="localhost"
        )
        client = Client(ssl_stream)
        await client.start(nursery)
        jwt = sign_provider_token(private_pem, KID, TEAM)
        assert (await client.post(request_headers(jwt=jwt), b'{"aps":{}}')).status == 200
        await client.wait_for(lambda: client.max_streams == 7)
        assert (await client.post(request_headers("zz", jwt=jwt))).reason == "BadDeviceToken"
        gone = await client.post(request_headers("0f" * 32, jwt=jwt))
        assert gone.status == 410 and gone.json["timestamp"] > 1_700_000_000_000
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    lines = [json.loads(x) for x in record.read_text().splitlines()]
    assert [(x["status"], x["reason"], x["token"]) for x in lines] == [
        (200, None, TOKEN),
        (400, "BadDeviceToken", "zz"),
        (410, "Unregistered", "0f" * 32),
    ]
    assert lines[0]["body"] == '{"aps":{}}' and lines[0]["jwt_kid"] == KID
    assert lines[0]["headers"]["apns-topic"] == TOPIC
    assert jwt not in record.read_text()  # the provider token is not written out in full


async def test_httpx_client_interoperates(start: Callable[..., Any]) -> None:
    import httpx

    env = await start()
    env.sim.set_token_state("0f" * 32, unregistered_at_ms=1_650_000_000_000)
    assert env.sim.tls is not None
    context = client_context(env.sim.tls.ca_file)
    headers = {
        "authorization": f"bearer {env.jwt()}",
        "apns-topic": TOPIC,
        "apns-push-type": "alert",
    }
    async with httpx.AsyncClient(http2=True, verify=context) as client:
        base = f"https://localhost:{env.sim.port}/3/device/"
        ok = await client.post(base + TOKEN, headers=headers, content=b'{"aps":{"alert":"hi"}}')
        assert ok.http_version == "HTTP/2" and ok.status_code == 200 and ok.content == b""
        gone = await client.post(base + "0f" * 32, headers=headers, content=b'{"aps":{}}')
        assert gone.status_code == 410
        assert gone.json() == {"reason": "Unregistered", "timestamp": 1_650_000_000_000}
        assert gone.headers["apns-id"] == env.sim.requests[-1].apns_id


async def test_malformed_request_is_reset(start: Callable[..., Any]) -> None:
    env = await start()
    client = await env.client()
    jwt = env.jwt()
    upper = await client.post(request_headers(jwt=jwt, extra=[("APNS-Priority", "10")]))
    assert upper.reset_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
    conn_header = await client.post(request_headers(jwt=jwt, extra=[("connection", "keep-alive")]))
    assert conn_header.reset_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
    assert len(env.sim.protocol_errors) == 2 and "upper-case" in env.sim.protocol_errors[0]
    assert env.sim.requests == []
    # The connection survives a malformed request.
    assert (await client.post(request_headers(jwt=jwt))).status == 200


# ---- certificate auth


async def open_cert_client(
    sim: Simulator, nursery: trio.Nursery, cert: tuple[Path, Path]
) -> Client:
    assert sim.tls is not None
    context = client_context(sim.tls.ca_file)
    context.load_cert_chain(*cert)
    raw = await trio.open_tcp_stream("127.0.0.1", sim.port)
    stream = trio.SSLStream(raw, context, server_hostname="localhost")
    await stream.do_handshake()
    client = Client(stream)
    await client.start(nursery)
    return client


async def test_certificate_auth(
    start: Callable[..., Any], tls_files: TlsFiles, tmp_path: Path
) -> None:
    from apns.simulator import CertIdentity, generate_client_certificate

    env = await start(client_ca_file=tls_files.ca_file)
    multi = generate_client_certificate(tls_files, tmp_path, TOPIC)
    identity = CertIdentity.from_der(ssl.PEM_cert_to_DER_cert(multi[0].read_text()))
    assert identity == CertIdentity(
        TOPIC,
        frozenset({TOPIC, TOPIC + ".voip", TOPIC + ".complication"}),
        frozenset({"development", "production"}),
    )
    client = await open_cert_client(env.sim, env.nursery, multi)
    await client.wait_for(lambda: client.max_streams == 1000)  # no token gate
    assert (await client.post(request_headers(jwt=None))).status == 200  # no JWT needed
    assert (
        await client.post(request_headers(jwt="ignored"))
    ).status == 200  # authorization ignored
    voip = await client.post(request_headers(jwt=None, topic=TOPIC + ".voip"))
    assert voip.status == 200
    assert (await client.post(request_headers(jwt=None, topic=None))).reason == "MissingTopic"
    other = await client.post(request_headers(jwt=None, topic="com.other.app"))
    assert (other.status, other.reason) == (400, "BadTopic")
    location = await client.post(request_headers(jwt=None, topic=TOPIC + ".location-query"))
    assert location.reason == "BadTopic"

    single = generate_client_certificate(
        tls_files, tmp_path / "single", "com.example.solo", extra_topics=()
    )
    solo = await open_cert_client(env.sim, env.nursery, single)
    assert (await solo.post(request_headers(jwt=None, topic=None))).status == 200  # defaults to UID

    # Token clients keep working beside certificate clients.
    token_client = await env.client()
    assert (await token_client.post(request_headers(jwt=env.jwt()))).status == 200


async def test_certificate_wrong_environment_goaway(
    start: Callable[..., Any], tls_files: TlsFiles, tmp_path: Path
) -> None:
    from apns.simulator import generate_client_certificate

    env = await start(client_ca_file=tls_files.ca_file)
    sandbox = generate_client_certificate(tls_files, tmp_path, TOPIC, environments=["development"])
    client = await open_cert_client(env.sim, env.nursery, sandbox)
    await client.wait_for(lambda: client.closed.is_set())
    assert client.goaway is not None
    assert json.loads(client.goaway.additional_data or b"") == {
        "reason": "BadCertificateEnvironment"
    }


async def test_certificate_from_unknown_ca_refused(
    start: Callable[..., Any], tls_files: TlsFiles, tmp_path: Path
) -> None:
    from apns.simulator import generate_client_certificate

    env = await start(client_ca_file=tls_files.ca_file)
    stranger = generate_tls(tmp_path / "stranger")
    cert = generate_client_certificate(stranger, tmp_path, TOPIC)
    with pytest.raises(trio.BrokenResourceError):
        client = await open_cert_client(env.sim, env.nursery, cert)
        # TLS 1.3: the server's verdict on the client certificate arrives after the handshake.
        await client.post(request_headers(jwt=None))
    assert env.sim.requests == []


async def test_error_body_waits_for_the_clients_window(start: Callable[..., Any]) -> None:
    env = await start()
    client = await env.client()
    client.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 5})
    await client.flush()
    env.sim.set_token_state(TOKEN, unregistered_at_ms=1_700_000_000_000)
    reply = await client.post(request_headers(jwt=env.jwt()))
    assert reply.status == 410
    assert reply.json == {"reason": "Unregistered", "timestamp": 1_700_000_000_000}
    assert reply.data_frames == len(reply.body) // 5 + 1  # sent as the window opened


async def test_given_certificate_files(
    nursery: trio.Nursery, tls_files: TlsFiles, signing: tuple[SimKey, bytes]
) -> None:
    key, pem = signing
    config = SimConfig(
        cert_file=tls_files.cert_file,
        key_file=tls_files.key_file,
        ca_file=tls_files.ca_file,
        keys=[key],
    )
    sim = Simulator(config)
    assert sim.tls == TlsFiles(tls_files.ca_file, tls_files.cert_file, tls_files.key_file)
    await nursery.start(sim.serve)
    client = await open_client(sim, nursery)
    assert (
        await client.post(request_headers(jwt=sign_provider_token(pem, KID, TEAM)))
    ).status == 200
    with trio.fail_after(5):
        await sim.wait_until(lambda: len(sim.delivered) == 1)


async def test_simulator_bug_becomes_internal_server_error(
    start: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = await start()
    client = await env.client()
    original = env.sim._validate

    def broken(*args: Any) -> None:
        monkeypatch.setattr(env.sim, "_validate", original)  # only once
        raise RuntimeError("bug")

    monkeypatch.setattr(env.sim, "_validate", broken)
    reply = await client.post(request_headers(jwt=env.jwt()))
    assert (reply.status, reply.reason) == (500, "InternalServerError")
    assert env.sim.internal_errors == 1
    assert (await client.post(request_headers(jwt=env.jwt()))).status == 200


async def test_goaway_immediate_timing(
    start: Callable[..., Any], autojump_clock: trio.testing.MockClock
) -> None:
    """RFC 9113 order: the GOAWAY first, the owed answers after it.  h2 4.x (this test's
    client, like most Python clients) treats frames after a GOAWAY as a protocol error."""
    env = await start(response_delay=1.0, goaway_timing="immediate")
    client = await env.client()
    jwt = env.jwt()
    assert (await client.post(request_headers(jwt=jwt))).status == 200
    await client.wait_for(lambda: client.max_streams == 1000)
    for _ in range(3):  # streams 3, 5, 7
        client.send(request_headers(jwt=jwt))
    await client.flush()
    await env.sim.wait_for_received(4)
    env.sim.goaway(last_stream_id=5, reason="Shutdown")
    await client.wait_for(lambda: client.closed.is_set())
    assert client.goaway is not None and client.goaway.last_stream_id == 5
    assert isinstance(client.protocol_error, h2.exceptions.ProtocolError)  # answers came after
    assert sorted(r.stream_id for r in env.sim.requests) == [1, 3, 5]


async def test_strict_json_and_record_limit(start: Callable[..., Any]) -> None:
    env = await start(strict_json=True, max_records=4)
    client = await env.client()
    jwt = env.jwt()
    assert (await client.post(request_headers(jwt=jwt), b"not json")).reason == "BadPayload"
    assert (await client.post(request_headers(jwt=jwt), b"[1]")).reason == "BadPayload"
    for _ in range(5):
        assert (await client.post(request_headers(jwt=jwt), b'{"aps":{}}')).status == 200
    assert env.sim.request_count == 7
    assert len(env.sim.requests) <= 4
    assert env.sim.requests[-1].stream_id == 13


async def test_header_list_limit_and_empty_topic(start: Callable[..., Any]) -> None:
    env = await start()
    client = await env.client()
    jwt = env.jwt()
    assert (await client.post(request_headers(jwt=jwt, topic=""))).reason == "MissingTopic"
    huge = request_headers(jwt=jwt, extra=[("x-padding", "p" * 9000)])
    client.send(huge)
    await client.flush()
    await client.wait_for(lambda: client.closed.is_set())
    assert client.goaway is not None and client.goaway.error_code != 0  # over MAX_HEADER_LIST_SIZE
