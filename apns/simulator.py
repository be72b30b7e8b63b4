"""A faithful APNs simulator: TLS + raw HTTP/2 (h2 state machine) on trio.

It serves ``POST /3/device/<token>`` the way apns-reference.md §8 describes: the
same status codes and reason strings, ES256 provider-token checks, the
one-stream-until-the-first-valid-token rule, optional client-certificate auth,
SETTINGS changes and GOAWAY on demand, token lifecycle states, injected faults,
latency and reordering, and a record of every answered request for tests.

Shape: one trio task per connection reads, feeds h2, answers every request that
completed in that read and writes once.  A second task per connection flushes
frames produced out of band (``goaway()``, ``set_max_concurrent_streams()``,
delayed answers).  A task per request exists only when ``response_delay`` asks
for one.  Answers are written as pre-encoded header blocks (see
``_ServerH2Connection.send_header_block``); measured ceiling in
benchmarks/SIMULATOR.md.

Behaviour the reference marks UNCERTAIN is a ``SimConfig`` knob.  In process::

    key, private_pem = generate_signing_key("KEYID00001", "TEAMID0001")
    sim = Simulator(SimConfig(keys=[key]))       # TLS files: sim.tls (a temp dir)
    port = await nursery.start(sim.serve)
    # a client trusts sim.tls.ca_file, connects to https://localhost:<port>, and signs
    # its JWT with private_pem (sign_provider_token() does it for tests)

From a shell: ``python -m apns.simulator --help`` (``pushd sim`` delegates to ``main``).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import datetime
import fcntl
import ipaddress
import json
import random
import re
import signal
import ssl
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import h2.stream
import hpack.hpack
import structlog
import trio
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.x509.oid import NameOID
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hyperframe.frame import GoAwayFrame

__all__ = [
    "PUSH_TYPES",
    "CertIdentity",
    "RecordedRequest",
    "SimConfig",
    "SimKey",
    "Simulator",
    "TlsFiles",
    "TokenState",
    "generate_client_certificate",
    "generate_signing_key",
    "generate_tls",
    "main",
    "sign_provider_token",
]

PUSH_TYPES = frozenset(
    {
        "alert",
        "background",
        "voip",
        "complication",
        "fileprovider",
        "mdm",
        "location",
        "liveactivity",
        "pushtotalk",
        "controls",
        "widgets",
    }
)
MAX_PAYLOAD = 4096
MAX_VOIP_PAYLOAD = 5120
MAX_COLLAPSE_ID_BYTES = 64
STREAM_VIOLATION_TEXT = b"Maximum active streams violated for this endpoint."
# Reasons a real APNs attaches to each injected status.
DEFAULT_FAULT_REASONS = {
    429: "TooManyRequests",
    500: "InternalServerError",
    503: "ServiceUnavailable",
}

# Apple's push certificate extensions (apns-reference.md §6).
OID_DEVELOPMENT = x509.ObjectIdentifier("1.2.840.113635.100.6.3.1")
OID_PRODUCTION = x509.ObjectIdentifier("1.2.840.113635.100.6.3.2")
OID_TOPICS = x509.ObjectIdentifier("1.2.840.113635.100.6.3.6")
_ENVIRONMENT_OIDS = {OID_DEVELOPMENT: "development", OID_PRODUCTION: "production"}

log = structlog.get_logger()

_UUID_RE = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)
_HEX_RE = re.compile(r"^[0-9a-fA-F]+$")
_DEVICE_PREFIX = "/3/device/"
_READ_SIZE = 65536
_CONNECTION_WINDOW = 16 * 1024 * 1024
_HANDSHAKE_TIMEOUT = 10.0


# --------------------------------------------------------------------------- config


@dataclass
class SimKey:
    """A provider signing key the simulator trusts (token-based auth)."""

    key_id: str
    team_id: str
    public_key_pem: bytes  # an EC P-256 public key; a PKCS#8 private key (.p8) also works
    topics: frozenset[str] | None = None  # None: a team key, any topic of the team
    environment: str | None = None  # "production" / "development"; None: both
    related_key_id: str | None = None  # the one key a topic-specific key may share connections with


@dataclass
class TokenState:
    """What the simulator knows about one device token."""

    unregistered_at_ms: int | None = None  # 410 Unregistered with this timestamp
    expired: bool = False  # 410 ExpiredToken
    topic: str | None = None  # registered topic; another topic -> DeviceTokenNotForTopic
    environment: str | None = None  # registered environment; the other one -> BadDeviceToken


@dataclass
class SimConfig:
    host: str = "127.0.0.1"
    port: int = 0
    tls: bool = True  # False: cleartext HTTP/2 with prior knowledge (h2c)
    cert_file: Path | None = None  # server certificate (PEM); None: generated
    key_file: Path | None = None
    ca_file: Path | None = None  # with cert_file: the CA clients should trust (for Simulator.tls)
    tls_dir: Path | None = None  # where generated CA/cert go (reused if present); None: a temp dir
    environment: str = "production"  # "production" or "development"

    # HTTP/2
    max_concurrent_streams: int = 1000
    token_initial_streams: int | None = 1  # before the first valid JWT on a connection; None: full
    stream_violation: Literal["refuse", "goaway"] = "refuse"  # RST_STREAM REFUSED_STREAM or GOAWAY
    idle_timeout: float | None = None  # seconds without frames -> GOAWAY {"reason":"IdleTimeout"}
    goaway_grace: float = 5.0  # after a GOAWAY, how long to wait for in-flight streams to complete
    # When answers are still owed on streams <= last-stream-id: "after_answers" sends the GOAWAY
    # once they are written (new streams are ignored meanwhile); "immediate" sends it at once and
    # the answers after it, which RFC 9113 allows but h2-based clients (h2 4.x goes CLOSED on
    # GOAWAY) cannot read.
    goaway_timing: Literal["after_answers", "immediate"] = "after_answers"

    # authentication
    client_ca_file: Path | None = None  # set: accept client certificates this CA signed (cert auth)
    cert_topic_reason: str = "BadTopic"  # a topic the certificate does not cover (UNCERTAIN)
    keys: list[SimKey] = field(default_factory=list)
    require_auth: bool = True  # False: requests without credentials are accepted (benchmarks)
    jwt_max_age: float = 3600.0  # older iat -> ExpiredProviderToken
    # a new JWT sooner than this after the last one on a connection -> TooManyProviderTokenUpdates
    jwt_min_refresh: float = 1200.0
    # after TooManyProviderTokenUpdates, reject the connection's requests this long
    jwt_wedge: float = 0.0
    # another team's key on a connection bound to one team (UNCERTAIN; pushy says
    # InvalidProviderToken)
    team_mismatch_reason: str = "UnrelatedKeyIdInToken"
    # a topic outside a topic-specific key's set (UNCERTAIN; pushy says InvalidProviderToken)
    key_topic_reason: str = "UnrelatedKeyIdInToken"
    # for JWT iat and 410 timestamps; intervals (refresh, rate limits) use trio's clock
    wall_clock: Callable[[], float] = time.time

    # validation
    allowed_topics: set[str] | None = None  # None: any topic
    topic_disallowed_reason: str = "TopicDisallowed"  # or "BadTopic" (UNCERTAIN)
    background_priority10_reason: str | None = "BadPriority"  # None: accept (UNCERTAIN)
    # reject a body that is not a JSON object with BadPayload (not proven Apple behaviour)
    strict_json: bool = False
    unique_id: bool | None = None  # send apns-unique-id; None: in the development environment only

    # faults
    # status (429, 500, 503) -> probability per request, drawn from Random(seed)
    error_rates: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    token_rate_limit: tuple[int, float] | None = None  # (K, W): more than K per token in W s -> 429
    throttle_on_error: bool = False  # a 4xx (not 410) drops the stream limit to 1 until a 200
    max_errors: int | None = None  # error score at which the connection is closed (410 is no error)
    bad_device_token_weight: int = 5  # BadDeviceToken counts this much towards max_errors

    # latency and ordering
    response_delay: float = 0.0  # seconds before each answer (a task per request while > 0)
    # True: answers leave in another order than requests came: each delay is drawn from
    # uniform(0, 2 * response_delay) (seeded), or without a delay the answers to one read
    # are written in reverse.
    out_of_order: bool = False

    # recording
    record: bool = True
    max_records: int | None = None  # keep at most about this many (oldest dropped); None: all


@dataclass
class RecordedRequest:
    """One answered request.  Requests never answered (refused over the stream limit,
    malformed, reset by the client, or above a GOAWAY's last-stream-id) are not recorded."""

    connection_id: int
    stream_id: int
    headers: dict[str, str]  # includes the pseudo-headers; a repeated header keeps its last value
    body: bytes
    token: str
    apns_id: str  # the apns-id echoed in the response
    status: int
    reason: str | None
    jwt_iat: int | None
    jwt_kid: str | None
    time: float  # wall clock when answered
    timestamp_ms: int | None = None  # the 410 timestamp, if any

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; the provider token in ``authorization`` is shortened."""
        data = asdict(self)
        data["body"] = self.body.decode("utf-8", "replace")
        authorization = self.headers.get("authorization")
        if authorization is not None and len(authorization) > 24:
            data["headers"] = dict(self.headers, authorization=authorization[:24] + "...")
        return data


@dataclass
class TlsFiles:
    ca_file: Path
    cert_file: Path
    key_file: Path
    ca_key_file: Path | None = None


@dataclass(frozen=True)
class CertIdentity:
    """What a provider client certificate says: its bundle ID (Subject UID), every topic it
    covers, and the environments it may push to (empty: not stated, both allowed)."""

    uid: str
    topics: frozenset[str]
    environments: frozenset[str]

    @classmethod
    def from_der(cls, der: bytes) -> CertIdentity:
        cert = x509.load_der_x509_certificate(der)
        uids = cert.subject.get_attributes_for_oid(NameOID.USER_ID)
        uid = str(uids[0].value) if uids else ""
        topics = {uid} if uid else set()
        environments = set()
        for extension in cert.extensions:
            oid = extension.oid
            if oid in _ENVIRONMENT_OIDS:
                environments.add(_ENVIRONMENT_OIDS[oid])
            elif oid == OID_TOPICS and isinstance(extension.value, x509.UnrecognizedExtension):
                topics.update(_der_topics(extension.value.value))
        return cls(uid, frozenset(topics), frozenset(environments))


def _der_items(data: bytes) -> list[tuple[int, bytes]]:
    """The (tag, content) items of a DER SEQUENCE's body."""
    items = []
    i = 0
    while i + 2 <= len(data):
        tag, length = data[i], data[i + 1]
        i += 2
        if length & 0x80:
            count = length & 0x7F
            length = int.from_bytes(data[i : i + count], "big")
            i += count
        items.append((tag, data[i : i + length]))
        i += length
    return items


def _der_topics(value: bytes) -> list[str]:
    """Topics in Apple's 1.2.840.113635.100.6.3.6 extension: a SEQUENCE of UTF8String topic,
    SEQUENCE {UTF8String kind} pairs."""
    outer = _der_items(value)
    if len(outer) != 1 or outer[0][0] != 0x30:
        return []
    return [
        content.decode("utf-8", "replace")
        for tag, content in _der_items(outer[0][1])
        if tag == 0x0C
    ]


def _der(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 128:
        return bytes((tag, n)) + content
    size = (n.bit_length() + 7) // 8
    return bytes((tag, 0x80 | size)) + n.to_bytes(size, "big") + content


@dataclass
class _Response:
    stream_id: int
    status: int
    reason: str | None
    apns_id: str
    token: str
    headers: dict[str, str]
    body: bytes
    jwt_iat: int | None
    jwt_kid: str | None
    timestamp_ms: int | None = None
    retry_after: int | None = None  # seconds, sent as a Retry-After header


@dataclass
class _Jwt:
    reason: str | None  # None: signature and structure valid
    kid: str | None = None
    iss: str | None = None
    iat: int | None = None
    key: SimKey | None = None


@dataclass
class _GoawayPlan:
    after_requests: int
    last_stream_id: int | None
    error_code: int
    reason: str | None
    every_connection: bool


@dataclass
class _Fault:
    status: int
    reason: str
    token: str | None
    remaining: int
    retry_after: int | None = None


class _Rejected(Exception):
    def __init__(
        self, status: int, reason: str, timestamp_ms: int | None = None, retry_after: int | None = None
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.timestamp_ms = timestamp_ms
        self.retry_after = retry_after


_PSEUDO_HEADERS = frozenset({":method", ":scheme", ":path", ":authority"})
_CONNECTION_HEADERS = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"}
)


def _malformed(headers: list[tuple[str, str]]) -> str | None:
    """RFC 9113 §8.2-8.3 request checks (what h2's inbound validation does, cheaper):
    a reason if the request is malformed, else None."""
    regular_seen = False
    for name, value in headers:
        if name.startswith(":"):
            if regular_seen:
                return f"pseudo-header {name} after a regular header"
            if name not in _PSEUDO_HEADERS:
                return f"unknown pseudo-header {name}"
        else:
            regular_seen = True
            if name != name.lower():
                return f"upper-case header name {name!r}"
            if name in _CONNECTION_HEADERS or (name == "te" and value != "trailers"):
                return f"connection-specific header {name!r}"
    return None


class _HuffmanCache:
    """Memoises hpack's pure-Python Huffman decoder.  Providers send the same JWT (and,
    per device, the same :path) as a literal on every request, and decoding it was the
    largest single cost per request.  The function is pure, so sharing the cache with
    anything else in the process that uses hpack is harmless."""

    def __init__(self, decode: Callable[[bytes], bytes]) -> None:
        self.decode = decode
        self.cache: dict[bytes, bytes] = {}

    def __call__(self, data: bytes | bytearray | memoryview | None) -> bytes:
        key = b"" if data is None else bytes(data)
        result = self.cache.get(key)
        if result is None:
            result = self.decode(key)
            if len(self.cache) >= 8192:
                self.cache.clear()
            self.cache[key] = result
        return result


def _install_huffman_cache() -> None:
    if not isinstance(hpack.hpack.decode_huffman, _HuffmanCache):
        hpack.hpack.decode_huffman = _HuffmanCache(hpack.hpack.decode_huffman)  # type: ignore[assignment]


class _ServerH2Connection(h2.connection.H2Connection):
    """h2 counts open inbound streams (a walk over every stream) on each HEADERS frame, only
    to enforce a limit the simulator enforces itself.  Skip the walk, but still let it run
    now and then: it is also what prunes closed streams from ``streams``."""

    _skipped = 0

    @property
    def open_inbound_streams(self) -> int:
        self._skipped += 1
        if self._skipped >= 256:
            self._skipped = 0
            return super().open_inbound_streams
        return 0

    def send_header_block(self, stream_id: int, header_block: bytes, *, end_stream: bool) -> bytes:
        """What ``send_headers()`` does to the stream state, for a header block the caller
        encoded without touching the HPACK dynamic table (static-indexed fields and literals
        without indexing), so h2's encoder, which is never used, stays in step with the peer.
        Saves h2's per-response encoding work.  Returns the HEADERS frame to write."""
        stream = self.streams.get(stream_id)
        if stream is None:
            raise h2.exceptions.StreamClosedError(stream_id)
        self.state_machine.process_input(h2.connection.ConnectionInputs.SEND_HEADERS)
        stream.state_machine.process_input(h2.stream.StreamInputs.SEND_HEADERS)
        flags = 0x4  # END_HEADERS
        if end_stream:
            stream.state_machine.process_input(h2.stream.StreamInputs.SEND_END_STREAM)
            flags |= 0x1  # END_STREAM
        return (
            len(header_block).to_bytes(3, "big")
            + bytes((0x1, flags))
            + stream_id.to_bytes(4, "big")
            + header_block
        )


def _literal(name: bytes, value: bytes) -> bytes:
    """HPACK literal header field without indexing, new name, no Huffman (RFC 7541 §6.2.2)."""
    return b"\x00" + _hpack_length(name) + name + _hpack_length(value) + value


def _hpack_length(data: bytes) -> bytes:
    n = len(data)
    if n < 127:
        return bytes((n,))
    out = bytearray((127,))
    n -= 127
    while n >= 128:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_STATUS_STATIC = {200: 8, 204: 9, 206: 10, 304: 11, 400: 12, 404: 13, 500: 14}  # RFC 7541 App. A


def _status_field(status: int) -> bytes:
    index = _STATUS_STATIC.get(status)
    if index is not None:
        return bytes((0x80 | index,))  # indexed header field
    value = str(status).encode("ascii")
    return b"\x08" + _hpack_length(value) + value  # literal without indexing, name = entry 8


_STATUS_200 = _status_field(200)
# content-type (static name 31) as a literal without indexing: 4-bit prefix 15, then 16.
_JSON_CONTENT_TYPE = b"\x0f\x10" + _hpack_length(b"application/json") + b"application/json"


class _UnenforcedSettings(h2.settings.Settings):
    """Local settings whose stream limit h2 does not enforce: the simulator does,
    so that it can answer a violation the configured way (RST or GOAWAY)."""

    @property
    def max_concurrent_streams(self) -> int:
        return 2**31 - 1

    @max_concurrent_streams.setter
    def max_concurrent_streams(self, value: int) -> None:
        self[SettingCodes.MAX_CONCURRENT_STREAMS] = value


# --------------------------------------------------------------------------- helpers


def _b64url_decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _load_public_key(pem: bytes) -> ec.EllipticCurvePublicKey:
    key: Any
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError:
        key = serialization.load_pem_private_key(pem, password=None).public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("APNs signing keys are EC P-256 keys")
    return key


def generate_signing_key(
    key_id: str = "SIMKEY0001",
    team_id: str = "SIMTEAM001",
    topics: Iterable[str] | None = None,
) -> tuple[SimKey, bytes]:
    """A fresh P-256 key: the SimKey to trust and the PKCS#8 (.p8-style) private PEM."""
    private = ec.generate_private_key(ec.SECP256R1())
    private_pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    sim_key = SimKey(key_id, team_id, public_pem, None if topics is None else frozenset(topics))
    return sim_key, private_pem


def sign_provider_token(
    private_key_pem: bytes, key_id: str, team_id: str, iat: int | None = None, *, der: bool = False
) -> str:
    """An ES256 provider token (JWT). ``der=True`` signs the way pushy does (DER signature)."""
    private = serialization.load_pem_private_key(private_key_pem, password=None)
    if not isinstance(private, ec.EllipticCurvePrivateKey):
        raise ValueError("APNs signing keys are EC P-256 keys")
    header = _b64url(json.dumps({"alg": "ES256", "kid": key_id}).encode())
    claims = _b64url(
        json.dumps({"iss": team_id, "iat": int(time.time()) if iat is None else iat}).encode()
    )
    signing_input = f"{header}.{claims}".encode("ascii")
    signature = private.sign(signing_input, ec.ECDSA(hashes.SHA256()))
    if not der:
        r, s = decode_dss_signature(signature)
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return f"{header}.{claims}.{_b64url(signature)}"


def generate_tls(directory: Path, hostname: str = "localhost") -> TlsFiles:
    """A self-signed CA and a server certificate it signed (SAN hostname, localhost,
    127.0.0.1, ::1), written as PEM files in ``directory``; reused if already there."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(
        ca_file=directory / "ca.pem",
        cert_file=directory / "server.pem",
        key_file=directory / "server-key.pem",
        ca_key_file=directory / "ca-key.pem",
    )
    # Several processes (a test and the simulator it starts) may ask at once: one generates.
    with (directory / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        paths = (files.ca_file, files.cert_file, files.key_file, files.ca_key_file)
        if not all(p is not None and p.exists() for p in paths):
            _create_tls(files, hostname)
    return files


def _create_tls(files: TlsFiles, hostname: str) -> None:
    assert files.ca_key_file is not None
    now = datetime.datetime.now(datetime.UTC)
    not_before = now - datetime.timedelta(days=1)
    not_after = now + datetime.timedelta(days=3650)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pushd APNs simulator CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(hostname)]
    if hostname != "localhost":
        names.append(x509.DNSName("localhost"))
    names += [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.OID_SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    def private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    files.ca_key_file.write_bytes(private_pem(ca_key))
    files.ca_key_file.chmod(0o600)
    files.key_file.write_bytes(private_pem(server_key))
    files.key_file.chmod(0o600)
    files.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.cert_file.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))


def generate_client_certificate(
    tls: TlsFiles,
    directory: Path,
    bundle_id: str,
    *,
    environments: Iterable[str] = ("development", "production"),
    extra_topics: Iterable[str] = (".voip", ".complication"),
) -> tuple[Path, Path]:
    """A provider client certificate signed by ``tls``'s CA, shaped like Apple's: Subject UID
    = bundle ID, the environment OIDs, and the topics extension listing the bundle ID and
    ``bundle_id + suffix`` for each of ``extra_topics``.  Returns (cert_file, key_file)."""
    if tls.ca_key_file is None:
        raise ValueError("generate_client_certificate needs the CA key (TlsFiles.ca_key_file)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = serialization.load_pem_private_key(tls.ca_key_file.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(tls.ca_file.read_bytes())
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("unexpected CA key type")
    key = ec.generate_private_key(ec.SECP256R1())
    topics = [bundle_id] + [bundle_id + suffix for suffix in extra_topics]
    kinds = ["app"] + [suffix.lstrip(".") for suffix in extra_topics]
    topic_body = b"".join(
        _der(0x0C, topic.encode()) + _der(0x30, _der(0x0C, kind.encode()))
        for topic, kind in zip(topics, kinds, strict=True)
    )
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.USER_ID, bundle_id),
                    x509.NameAttribute(NameOID.COMMON_NAME, f"Apple Push Services: {bundle_id}"),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.ExtendedKeyUsage([x509.OID_CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.UnrecognizedExtension(OID_TOPICS, _der(0x30, topic_body)), critical=False
        )
    )
    for environment in environments:
        oid = OID_DEVELOPMENT if environment == "development" else OID_PRODUCTION
        builder = builder.add_extension(
            x509.UnrecognizedExtension(oid, b"\x05\x00"), critical=False
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", bundle_id)
    cert_file, key_file = directory / f"{safe}.pem", directory / f"{safe}-key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_file.chmod(0o600)
    return cert_file, key_file


# --------------------------------------------------------------------------- simulator


class Simulator:
    """The APNs stand-in.  Create it outside or inside trio; run ``serve()`` in a nursery."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config if config is not None else SimConfig()
        self.port: int = 0
        self.requests: list[RecordedRequest] = []
        self.request_count = 0  # answered requests, including records dropped by max_records
        self.received_count = 0  # well-formed requests whose HEADERS arrived (answered or not)
        self.connection_count = 0  # connections accepted so far
        self.tls: TlsFiles | None = None
        self._keys: dict[str, tuple[SimKey, ec.EllipticCurvePublicKey]] = {}
        self._jwt_cache: dict[str, _Jwt] = {}
        for key in self.config.keys:
            self.add_key(key)
        self._tokens: dict[str, TokenState] = {}
        self._rng = random.Random(self.config.seed)
        self._max_streams = self.config.max_concurrent_streams
        self._connections: set[_Connection] = set()
        self.protocol_errors: list[str] = []  # malformed requests, answered with RST_STREAM
        self.internal_errors = 0  # simulator bugs (logged; a 500, or the connection dropped)
        self._goaway_plans: list[_GoawayPlan] = []
        self._faults: list[_Fault] = []
        self._token_hits: dict[str, list[float]] = {}
        self._listeners: list[Callable[[RecordedRequest], None]] = []
        self._changed = trio.Event()
        self._ssl_context: Any = self._make_ssl_context() if self.config.tls else None
        _install_huffman_cache()

    # ---- configuration at run time

    def add_key(self, key: SimKey) -> None:
        self._keys[key.key_id] = (key, _load_public_key(key.public_key_pem))
        self._jwt_cache.clear()

    def set_token_state(
        self,
        token: str,
        *,
        unregistered_at_ms: int | None = None,
        expired: bool = False,
        topic: str | None = None,
        environment: str | None = None,
    ) -> None:
        """Register a device token (topic, environment) or mark it unregistered/expired."""
        self._tokens[token.lower()] = TokenState(unregistered_at_ms, expired, topic, environment)

    def clear_token_state(self, token: str) -> None:
        self._tokens.pop(token.lower(), None)

    def inject(
        self,
        status: int,
        reason: str | None = None,
        *,
        count: int = 1,
        token: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        """Answer the next ``count`` requests (to ``token``, if given) with this status (and a
        ``Retry-After`` header of that many seconds, if given)."""
        chosen = (
            reason
            if reason is not None
            else DEFAULT_FAULT_REASONS.get(status, "InternalServerError")
        )
        self._faults.append(
            _Fault(status, chosen, None if token is None else token.lower(), count, retry_after)
        )

    def set_max_concurrent_streams(self, n: int) -> None:
        """Advertise a new stream limit: a SETTINGS frame now on every live connection that
        has passed the token gate, and the limit later ones get once they pass it."""
        self._max_streams = n
        for connection in list(self._connections):
            connection.set_stream_limit(n, only_if_open=True)

    def goaway(
        self, *, last_stream_id: int | None = None, error_code: int = 0, reason: str | None = None
    ) -> None:
        """GOAWAY on every live connection.  Streams up to ``last_stream_id`` (default: the
        highest seen) are still answered, higher ones are neither processed nor recorded; the
        socket closes once the answered ones are done."""
        for connection in list(self._connections):
            connection.send_goaway(last_stream_id, error_code, reason)

    def schedule_goaway(
        self,
        after_requests: int,
        *,
        last_stream_id: int | None = None,
        error_code: int = 0,
        reason: str | None = "Shutdown",
        every_connection: bool = False,
    ) -> None:
        """Once a connection has answered ``after_requests`` requests, GOAWAY it with
        last-stream-id = the stream of that last answer (or ``last_stream_id``): requests
        still in flight on higher streams go unanswered.  Once, or on every connection."""
        self._goaway_plans.append(
            _GoawayPlan(after_requests, last_stream_id, error_code, reason, every_connection)
        )

    def add_listener(self, callback: Callable[[RecordedRequest], None]) -> None:
        """Call ``callback`` with every answered request (synchronously; keep it cheap)."""
        self._listeners.append(callback)

    @property
    def live_connections(self) -> int:
        return len(self._connections)

    @property
    def delivered(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.status == 200]

    async def wait_for_requests(self, n: int) -> None:
        """Return once at least ``n`` requests have been answered in total."""
        while self.request_count < n:
            await self._changed.wait()

    async def wait_for_received(self, n: int) -> None:
        """Return once at least ``n`` requests have arrived (HEADERS read), answered or not:
        with ``response_delay`` set, a test can act while they are in flight."""
        while self.received_count < n:
            await self._changed.wait()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Return once ``predicate()`` holds; it is re-checked whenever requests arrive or are
        answered and connections are accepted (wrap it in ``trio.fail_after`` to bound it)."""
        while not predicate():
            await self._changed.wait()

    async def wait_for_connections(self, n: int) -> None:
        """Return once at least ``n`` connections have been accepted in total."""
        while self.connection_count < n:
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # ---- serving

    def _make_ssl_context(self) -> ssl.SSLContext:
        cfg = self.config
        if cfg.cert_file is not None:
            if cfg.key_file is None:
                raise ValueError("cert_file needs key_file")
            cert_file, key_file = cfg.cert_file, cfg.key_file
            self.tls = TlsFiles(
                ca_file=cfg.ca_file or cfg.cert_file, cert_file=cert_file, key_file=key_file
            )
        else:
            directory = cfg.tls_dir
            if directory is None:
                directory = Path(tempfile.mkdtemp(prefix="pushd-sim-tls-"))
            self.tls = generate_tls(directory)
            cert_file, key_file = self.tls.cert_file, self.tls.key_file
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(cert_file, key_file)
        context.set_alpn_protocols(["h2"])
        if cfg.client_ca_file is not None:
            context.verify_mode = ssl.CERT_OPTIONAL
            context.load_verify_locations(cafile=str(cfg.client_ca_file))
        return context

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, call ``task_status.started(port)``, and serve until cancelled."""
        listeners = await trio.open_tcp_listeners(self.config.port, host=self.config.host)
        sockname = listeners[0].socket.getsockname()
        self.port = int(sockname[1])
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(self._accept_loop, listener, nursery)
            task_status.started(self.port)

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError:
                    await trio.sleep(0.01)  # EMFILE and friends: back off, keep serving
                    continue
                nursery.start_soon(self._handle_client, stream)

    async def _handle_client(self, raw: trio.SocketStream) -> None:
        stream: trio.abc.Stream = raw
        alpn: str | None = None
        identity: CertIdentity | None = None
        if self._ssl_context is not None:
            ssl_stream = trio.SSLStream(
                raw, self._ssl_context, server_side=True, https_compatible=True
            )
            try:
                with trio.fail_after(_HANDSHAKE_TIMEOUT):
                    await ssl_stream.do_handshake()
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
                await trio.aclose_forcefully(raw)
                return
            alpn = ssl_stream.selected_alpn_protocol()
            if alpn not in (None, "h2"):
                await trio.aclose_forcefully(ssl_stream)
                return
            peer = ssl_stream.getpeercert(binary_form=True)
            if peer:
                identity = CertIdentity.from_der(peer)
            stream = ssl_stream
        self.connection_count += 1
        connection = _Connection(self, self.connection_count, stream, alpn, identity)
        self._connections.add(connection)
        self._notify()
        try:
            await connection.run()
        except Exception:  # a simulator bug: drop this connection, keep serving the others
            log.exception("simulator connection failed", connection_id=connection.id)
            self.internal_errors += 1
        finally:
            self._connections.discard(connection)

    # ---- request evaluation (pure bookkeeping; no I/O)

    def _verify_jwt(self, token: str) -> _Jwt:
        cached = self._jwt_cache.get(token)
        if cached is not None:
            return cached
        result = self._check_jwt(token)
        if len(self._jwt_cache) > 10_000:
            self._jwt_cache.clear()
        self._jwt_cache[token] = result
        return result

    def _check_jwt(self, token: str) -> _Jwt:
        invalid = "InvalidProviderToken"
        parts = token.split(".")
        if len(parts) != 3:
            return _Jwt(invalid)
        try:
            header = json.loads(_b64url_decode(parts[0]))
            claims = json.loads(_b64url_decode(parts[1]))
            signature = _b64url_decode(parts[2])
        except (ValueError, binascii.Error):
            return _Jwt(invalid)
        if not isinstance(header, dict) or not isinstance(claims, dict):
            return _Jwt(invalid)
        kid, iss, iat = header.get("kid"), claims.get("iss"), claims.get("iat")
        result = _Jwt(
            invalid,
            kid=kid if isinstance(kid, str) else None,
            iss=iss if isinstance(iss, str) else None,
            iat=iat if isinstance(iat, int) and not isinstance(iat, bool) else None,
        )
        if (
            header.get("alg") != "ES256"
            or result.kid is None
            or result.iss is None
            or result.iat is None
        ):
            return result
        entry = self._keys.get(result.kid)
        if entry is None or entry[0].team_id != result.iss:
            return result
        key, public = entry
        signing_input = f"{parts[0]}.{parts[1]}".encode("ascii")
        candidates = []
        if len(signature) == 64:  # JWS raw r||s
            r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
            candidates.append(encode_dss_signature(r, s))
        if signature[:1] == b"\x30":  # DER, as pushy and Apple's own sample send
            candidates.append(signature)
        for candidate in candidates:
            try:
                public.verify(candidate, signing_input, ec.ECDSA(hashes.SHA256()))
            except InvalidSignature:
                continue
            result.reason = None
            result.key = key
            return result
        return result

    def _evaluate(self, conn: _Connection, stream: _Stream) -> _Response:
        headers = stream.headers
        apns_id = headers.get("apns-id")
        echoed = apns_id if apns_id is not None and _UUID_RE.match(apns_id) else str(uuid.uuid4())
        path = headers.get(":path", "")
        token = path[len(_DEVICE_PREFIX) :] if path.startswith(_DEVICE_PREFIX) else ""
        try:
            self._validate(conn, stream, token, apns_id)
            status, reason, timestamp, retry_after = 200, None, None, None
        except _Rejected as rejection:
            status, reason, timestamp = rejection.status, rejection.reason, rejection.timestamp_ms
            retry_after = rejection.retry_after
        except Exception:  # a simulator bug: answer as APNs would, keep serving
            log.exception("simulator failed to evaluate a request", stream_id=stream.stream_id)
            self.internal_errors += 1
            status, reason, timestamp, retry_after = 500, "InternalServerError", None, None
        return _Response(
            stream_id=stream.stream_id,
            status=status,
            reason=reason,
            apns_id=echoed,
            token=token,
            headers=headers,
            body=bytes(stream.body),
            jwt_iat=None if stream.jwt is None else stream.jwt.iat,
            jwt_kid=None if stream.jwt is None else stream.jwt.kid,
            timestamp_ms=timestamp,
            retry_after=retry_after,
        )

    def _validate(
        self, conn: _Connection, stream: _Stream, token: str, apns_id: str | None
    ) -> None:
        cfg = self.config
        headers = stream.headers
        if headers.get(":method") != "POST":
            raise _Rejected(405, "MethodNotAllowed")
        path = headers.get(":path", "")
        if not path.startswith(_DEVICE_PREFIX):
            raise _Rejected(404, "BadPath")
        if not token:
            raise _Rejected(400, "MissingDeviceToken")
        if len(token) % 2 or not _HEX_RE.match(token):
            raise _Rejected(400, "BadDeviceToken")
        if stream.duplicate:
            raise _Rejected(400, "DuplicateHeaders")
        if apns_id is not None and not _UUID_RE.match(apns_id):
            raise _Rejected(400, "BadMessageId")

        topic = self._authenticate(conn, stream, headers.get("apns-topic") or None)
        if topic is None:
            raise _Rejected(400, "MissingTopic")
        if cfg.allowed_topics is not None and topic not in cfg.allowed_topics:
            raise _Rejected(400, cfg.topic_disallowed_reason)
        push_type = headers.get("apns-push-type")
        if push_type is not None and push_type not in PUSH_TYPES:
            raise _Rejected(400, "InvalidPushType")
        priority = headers.get("apns-priority")
        if priority is not None and priority not in ("10", "5", "1"):
            raise _Rejected(400, "BadPriority")
        if (
            push_type == "background"
            and priority in (None, "10")
            and cfg.background_priority10_reason is not None
        ):
            raise _Rejected(400, cfg.background_priority10_reason)
        expiration = headers.get("apns-expiration")
        if expiration is not None and not (expiration.isascii() and expiration.isdigit()):
            raise _Rejected(400, "BadExpirationDate")
        collapse_id = headers.get("apns-collapse-id")
        if collapse_id is not None and len(collapse_id.encode("utf-8")) > MAX_COLLAPSE_ID_BYTES:
            raise _Rejected(400, "BadCollapseId")
        body = stream.body
        if not body:
            raise _Rejected(400, "PayloadEmpty")
        limit = MAX_VOIP_PAYLOAD if push_type == "voip" or topic.endswith(".voip") else MAX_PAYLOAD
        if len(body) > limit:
            raise _Rejected(413, "PayloadTooLarge")
        if cfg.strict_json:
            try:
                parsed = json.loads(bytes(body))
            except ValueError:
                parsed = None
            if not isinstance(parsed, dict):
                raise _Rejected(400, "BadPayload")

        key = token.lower()
        state = self._tokens.get(key)
        if state is not None:
            if state.environment is not None and state.environment != cfg.environment:
                raise _Rejected(400, "BadDeviceToken")
            if state.topic is not None and state.topic != topic:
                raise _Rejected(400, "DeviceTokenNotForTopic")
            if state.unregistered_at_ms is not None:
                raise _Rejected(410, "Unregistered", state.unregistered_at_ms)
            if state.expired:
                raise _Rejected(410, "ExpiredToken")

        if cfg.token_rate_limit is not None:
            count, window = cfg.token_rate_limit
            now = trio.current_time()
            hits = [t for t in self._token_hits.get(key, ()) if now - t < window]
            hits.append(now)
            self._token_hits[key] = hits
            if len(hits) > count:
                raise _Rejected(429, "TooManyRequests")

        for fault in self._faults:
            if fault.token is None or fault.token == key:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._faults.remove(fault)
                raise _Rejected(fault.status, fault.reason, retry_after=fault.retry_after)
        for status, rate in cfg.error_rates.items():
            if rate > 0 and self._rng.random() < rate:
                raise _Rejected(status, DEFAULT_FAULT_REASONS.get(status, "InternalServerError"))

    def _authenticate(self, conn: _Connection, stream: _Stream, topic: str | None) -> str | None:
        """Check the credential; return the topic to use (a single-topic certificate lends
        its bundle ID when the request names none)."""
        cfg = self.config
        identity = conn.identity
        if identity is not None:  # certificate auth: authorization is ignored
            if topic is None:
                if len(identity.topics) == 1:
                    return identity.uid
                raise _Rejected(400, "MissingTopic")
            if topic not in identity.topics:
                raise _Rejected(400, cfg.cert_topic_reason)
            return topic
        authorization = stream.headers.get("authorization")
        if authorization is None:
            if cfg.require_auth:
                raise _Rejected(403, "MissingProviderToken")
            conn.open_gate()
            return topic
        scheme, _, credential = authorization.partition(" ")
        if scheme.lower() != "bearer" or not credential.strip():
            raise _Rejected(403, "MissingProviderToken")
        jwt = self._verify_jwt(credential.strip())
        stream.jwt = jwt
        if jwt.reason is not None or jwt.key is None or jwt.iat is None:
            raise _Rejected(403, jwt.reason or "InvalidProviderToken")
        key = jwt.key
        if key.environment is not None and key.environment != cfg.environment:
            raise _Rejected(403, "BadEnvironmentKeyIdInToken")
        if cfg.wall_clock() - jwt.iat > cfg.jwt_max_age:
            raise _Rejected(403, "ExpiredProviderToken")

        now = trio.current_time()
        if now < conn.wedged_until:
            raise _Rejected(429, "TooManyProviderTokenUpdates")
        credential = credential.strip()
        if conn.bound_key is None:
            conn.bound_key = key
            conn.current_jwt = credential
            conn.jwt_since = now
        else:
            bound = conn.bound_key
            if key.team_id != bound.team_id:
                raise _Rejected(403, cfg.team_mismatch_reason)
            related = (
                key.key_id == bound.key_id
                or bound.related_key_id == key.key_id
                or key.related_key_id == bound.key_id
            )
            if not related:
                raise _Rejected(403, "UnrelatedKeyIdInToken")
            if credential != conn.current_jwt:
                if now - conn.jwt_since < cfg.jwt_min_refresh:
                    conn.wedged_until = now + cfg.jwt_wedge
                    raise _Rejected(429, "TooManyProviderTokenUpdates")
                conn.current_jwt = credential
                conn.jwt_since = now
        if key.topics is not None and topic is not None and topic not in key.topics:
            raise _Rejected(403, cfg.key_topic_reason)
        conn.open_gate()
        return topic

    def _record(self, conn: _Connection, response: _Response) -> None:
        self.request_count += 1
        if self.config.record or self._listeners:
            record = RecordedRequest(
                connection_id=conn.id,
                stream_id=response.stream_id,
                headers=response.headers,
                body=response.body,
                token=response.token,
                apns_id=response.apns_id,
                status=response.status,
                reason=response.reason,
                jwt_iat=response.jwt_iat,
                jwt_kid=response.jwt_kid,
                time=self.config.wall_clock(),
                timestamp_ms=response.timestamp_ms,
            )
            if self.config.record:
                self.requests.append(record)
                limit = self.config.max_records
                if limit is not None and len(self.requests) > limit:
                    del self.requests[: len(self.requests) - limit // 2]
            for listener in self._listeners:
                listener(record)
        self._notify()

    def _goaway_plan_for(self, conn: _Connection) -> _GoawayPlan | None:
        for plan in self._goaway_plans:
            if conn.answered >= plan.after_requests:
                if not plan.every_connection:
                    self._goaway_plans.remove(plan)
                return plan
        return None


class _Stream:
    __slots__ = ("body", "duplicate", "headers", "jwt", "stream_id")

    def __init__(self, stream_id: int, headers: dict[str, str], duplicate: bool) -> None:
        self.stream_id = stream_id
        self.headers = headers
        self.duplicate = duplicate
        self.body = bytearray()
        self.jwt: _Jwt | None = None


class _Connection:
    def __init__(
        self,
        sim: Simulator,
        conn_id: int,
        stream: trio.abc.Stream,
        alpn: str | None,
        identity: CertIdentity | None,
    ) -> None:
        cfg = sim.config
        self.sim = sim
        self.id = conn_id
        self.alpn = alpn
        self.identity = identity
        self._stream = stream
        config = h2.config.H2Configuration(
            client_side=False,
            header_encoding=None,
            validate_inbound_headers=False,  # _malformed() does it, as a stream error
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.h2 = _ServerH2Connection(config=config)
        gated = identity is None and cfg.require_auth and cfg.token_initial_streams is not None
        self.gate_open = not gated
        initial_streams = cfg.token_initial_streams if gated else sim._max_streams
        assert initial_streams is not None
        self.h2.local_settings = _UnenforcedSettings(
            client=False,
            initial_values={
                SettingCodes.HEADER_TABLE_SIZE: 4096,
                SettingCodes.MAX_CONCURRENT_STREAMS: initial_streams,
                SettingCodes.INITIAL_WINDOW_SIZE: 65535,
                SettingCodes.MAX_FRAME_SIZE: 16384,
                SettingCodes.MAX_HEADER_LIST_SIZE: 8000,
            },
        )
        # h2 applies an advertised header-list limit only once it is acknowledged; these
        # initial settings are in force from the start, so apply it now.
        self.h2.decoder.max_header_list_size = 8000
        self._streams: dict[int, _Stream] = {}
        self._pending_bodies: dict[int, bytes] = {}
        self._delayed: set[int] = set()  # streams whose answer waits in a task
        self._active: set[int] = set()  # streams opened and not yet fully answered or reset
        self._goaway_frame: bytes | None = None  # held back until owed answers are written
        self._unique_id = cfg.unique_id or (
            cfg.unique_id is None and cfg.environment == "development"
        )
        # Frames built outside h2 (answers, GOAWAY); h2's own bytes are moved in before each
        # one is added, so the order on the wire is the order of the calls.
        self._out = bytearray()
        self._send_lock = trio.StrictFIFOLock()
        self._kick = trio.Event()
        self._nursery: trio.Nursery | None = None
        self.goaway_last: int | None = None
        self._goaway_deadline = float("inf")
        self._peer_gone = False
        self.answered = 0
        self.error_score = 0
        self.throttled = False
        self.bound_key: SimKey | None = None
        self.current_jwt: str | None = None
        self.jwt_since = 0.0
        self.wedged_until = float("-inf")
        self._last_activity = 0.0

    # ---- control from outside the connection task

    def _wake(self) -> None:
        self._kick.set()

    def open_gate(self) -> None:
        if not self.gate_open:
            self.gate_open = True
            self._update_limit(self.sim._max_streams)

    def set_stream_limit(self, n: int, *, only_if_open: bool) -> None:
        if only_if_open and not self.gate_open:
            return
        self._update_limit(n)
        self._wake()

    def _update_limit(self, n: int) -> None:
        if self.goaway_last is None and not self._peer_gone:
            self.h2.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: n})

    def send_goaway(self, last_stream_id: int | None, error_code: int, reason: str | None) -> None:
        if self.goaway_last is not None or self._peer_gone:
            return
        last = self.h2.highest_inbound_stream_id if last_stream_id is None else last_stream_id
        debug = b"" if reason is None else json.dumps({"reason": reason}).encode()
        self._goaway(last, error_code, debug)

    def _goaway(self, last: int, error_code: int, debug: bytes) -> None:
        # Built by hand, not with h2's close_connection(): h2 would then refuse to send the
        # answers still owed on streams <= last.
        frame = GoAwayFrame(
            stream_id=0, last_stream_id=last, error_code=error_code, additional_data=debug
        )
        self.goaway_last = last
        self._goaway_deadline = trio.current_time() + self.sim.config.goaway_grace
        for stream_id in [s for s in self._streams if s > last]:
            del self._streams[stream_id]
        self._active = {s for s in self._active if s <= last}
        self._delayed = {s for s in self._delayed if s <= last}
        self._goaway_frame = frame.serialize()
        if self.sim.config.goaway_timing == "immediate":
            self._release_goaway()
        self._wake()

    def _release_goaway(self) -> None:
        if self._goaway_frame is not None:
            self._out += self.h2.data_to_send()
            self._out += self._goaway_frame
            self._goaway_frame = None

    # ---- the connection task

    async def run(self) -> None:
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(_CONNECTION_WINDOW - 65535)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._writer)
                await self._flush()
                identity = self.identity
                if (
                    identity
                    and identity.environments
                    and self.sim.config.environment not in identity.environments
                ):
                    self.send_goaway(0, ErrorCodes.NO_ERROR, "BadCertificateEnvironment")
                    await self._flush_or_finish()
                    return
                await self._read_loop()
                nursery.cancel_scope.cancel()
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away (a reset, a killed process): an ordinary end
        finally:
            with trio.move_on_after(1, shield=True):
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await self._stream.aclose()

    def _read_deadline(self) -> float:
        if self.goaway_last is not None:
            return self._goaway_deadline
        if self.sim.config.idle_timeout is not None:
            return self._last_activity + self.sim.config.idle_timeout
        return float("inf")

    async def _read_loop(self) -> None:
        self._last_activity = trio.current_time()
        while True:
            with trio.move_on_at(self._read_deadline()) as scope:
                data = await self._stream.receive_some(_READ_SIZE)
            if scope.cancelled_caught:
                if self.goaway_last is not None:
                    self._release_goaway()
                    await self._flush()
                    return  # grace period over
                self.send_goaway(None, 0, "IdleTimeout")
                if await self._flush_or_finish():
                    return
                continue
            if not data:
                return
            self._last_activity = trio.current_time()
            try:
                self._handle(self.h2.receive_data(data))
            except h2.exceptions.ProtocolError:
                await self._flush()  # h2 queued its GOAWAY
                return
            if await self._flush_or_finish():
                return

    async def _writer(self) -> None:
        while True:
            await self._kick.wait()
            self._kick = trio.Event()
            await self._flush_or_finish()

    async def _flush(self) -> None:
        async with self._send_lock:
            data = self.h2.data_to_send()
            if self._out:
                data = bytes(self._out) + data
                self._out.clear()
            if data:
                await self._stream.send_all(data)

    async def _flush_or_finish(self) -> bool:
        """Flush; if the connection is over (peer left, or our GOAWAY has nothing left to
        wait for), send the held-back GOAWAY too, stop the connection and return True."""
        done = self._peer_gone or (self.goaway_last is not None and not self._active)
        if done:
            self._release_goaway()
        await self._flush()
        if done and self._nursery is not None:
            self._nursery.cancel_scope.cancel()
        return done

    # ---- events

    def _handle(self, events: list[h2.events.Event]) -> None:
        completed: list[_Stream] = []
        received = self.sim.received_count
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                self._on_request(event)
            elif isinstance(event, h2.events.DataReceived):
                stream = self._streams.get(event.stream_id)
                if stream is not None and event.data:
                    stream.body += event.data
                if event.flow_controlled_length:
                    with contextlib.suppress(h2.exceptions.StreamClosedError):
                        self.h2.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
            elif isinstance(event, h2.events.StreamEnded):
                stream = self._streams.pop(event.stream_id, None)
                if stream is not None:
                    completed.append(stream)
            elif isinstance(event, h2.events.StreamReset):
                self._active.discard(event.stream_id)
                self._streams.pop(event.stream_id, None)
                self._pending_bodies.pop(event.stream_id, None)
                self._delayed.discard(event.stream_id)
            elif isinstance(event, h2.events.WindowUpdated):
                self._send_pending_bodies()
            elif isinstance(event, h2.events.ConnectionTerminated):
                self._peer_gone = True
        if self.sim.received_count != received:
            self.sim._notify()
        if completed:
            self._complete(completed)

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        stream_id = event.stream_id
        if self.goaway_last is not None and stream_id > self.goaway_last:
            return  # after our GOAWAY: ignored, never processed
        # h2 has parsed the whole read before we see its events, so count open streams
        # ourselves, as they were when this one arrived, against the acknowledged limit.
        limit = self.h2.local_settings[SettingCodes.MAX_CONCURRENT_STREAMS]
        if len(self._active) >= limit:
            if self.sim.config.stream_violation == "refuse":
                self.h2.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            else:
                last = max(self._active, default=0)
                self._goaway(last, ErrorCodes.PROTOCOL_ERROR, STREAM_VIOLATION_TEXT)
            return
        self._active.add(stream_id)
        pairs = [
            (
                name.decode("utf-8", "replace") if isinstance(name, bytes) else name,
                value.decode("utf-8", "replace") if isinstance(value, bytes) else value,
            )
            for name, value in event.headers or ()
        ]
        problem = _malformed(pairs)
        if problem is not None:
            self.sim.protocol_errors.append(f"connection {self.id} stream {stream_id}: {problem}")
            self.h2.reset_stream(stream_id, ErrorCodes.PROTOCOL_ERROR)
            self._active.discard(stream_id)
            return
        headers = dict(pairs)
        self._streams[stream_id] = _Stream(stream_id, headers, len(headers) != len(pairs))
        self.sim.received_count += 1

    def _complete(self, completed: list[_Stream]) -> None:
        cfg = self.sim.config
        responses = [self.sim._evaluate(self, stream) for stream in completed]
        if cfg.response_delay > 0 and self._nursery is not None:
            for response in responses:
                delay = cfg.response_delay
                if cfg.out_of_order:
                    delay = self.sim._rng.uniform(0, 2 * cfg.response_delay)
                self._delayed.add(response.stream_id)
                self._nursery.start_soon(self._answer_later, response, delay)
            return
        if cfg.out_of_order:
            responses.reverse()
        for response in responses:
            self._respond(response)

    async def _answer_later(self, response: _Response, delay: float) -> None:
        await trio.sleep(delay)
        if response.stream_id not in self._delayed:
            return  # reset by the client meanwhile
        self._delayed.discard(response.stream_id)
        self._respond(response)
        self._wake()  # the writer task flushes every answer that is due, in one write

    def _respond(self, response: _Response) -> None:
        stream_id = response.stream_id
        if self.goaway_last is not None and stream_id > self.goaway_last:
            return
        if stream_id not in self._active:
            return  # reset by the client
        apns_id = response.apns_id.encode("ascii")
        try:
            if response.status == 200:
                block = _STATUS_200 + _literal(b"apns-id", apns_id)
                if self._unique_id:
                    block += _literal(b"apns-unique-id", str(uuid.uuid4()).encode("ascii"))
                frame = self.h2.send_header_block(stream_id, block, end_stream=True)
                self._out += self.h2.data_to_send()
                self._out += frame
                self._active.discard(stream_id)
            else:
                payload: dict[str, Any] = {"reason": response.reason}
                if response.timestamp_ms is not None:
                    payload["timestamp"] = response.timestamp_ms
                body = json.dumps(payload, separators=(",", ":")).encode()
                block = (
                    _status_field(response.status)
                    + _JSON_CONTENT_TYPE
                    + _literal(b"apns-id", apns_id)
                )
                if response.retry_after is not None:
                    block += _literal(b"retry-after", str(response.retry_after).encode("ascii"))
                frame = self.h2.send_header_block(stream_id, block, end_stream=False)
                self._out += self.h2.data_to_send()
                self._out += frame
                if self.h2.local_flow_control_window(stream_id) >= len(body):
                    self.h2.send_data(stream_id, body, end_stream=True)
                    self._active.discard(stream_id)
                else:  # the client's window is too small: send it as the window opens
                    self._pending_bodies[stream_id] = body
                    self._send_pending_bodies()
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self._active.discard(stream_id)
            return  # the client reset the stream or the connection is going
        self.answered += 1
        self.sim._record(self, response)
        self._after_answer(response)

    def _send_pending_bodies(self) -> None:
        for stream_id, body in list(self._pending_bodies.items()):
            try:
                window = self.h2.local_flow_control_window(stream_id)
                if window <= 0:
                    continue
                if window < len(body):
                    self.h2.send_data(stream_id, body[:window])
                    self._pending_bodies[stream_id] = body[window:]
                    continue
                self.h2.send_data(stream_id, body, end_stream=True)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                pass
            del self._pending_bodies[stream_id]
            self._active.discard(stream_id)

    def _after_answer(self, response: _Response) -> None:
        cfg = self.sim.config
        status = response.status
        if 400 <= status < 500 and status != 410:
            self.error_score += (
                cfg.bad_device_token_weight if response.reason == "BadDeviceToken" else 1
            )
            if cfg.throttle_on_error and not self.throttled and self.gate_open:
                self.throttled = True
                self._update_limit(1)
        elif status == 200 and self.throttled:
            self.throttled = False
            self._update_limit(self.sim._max_streams)
        if (
            cfg.max_errors is not None
            and self.error_score >= cfg.max_errors
            and self.goaway_last is None
        ):
            self._goaway(response.stream_id, ErrorCodes.NO_ERROR, b"")
            return
        if self.goaway_last is None:
            plan = self.sim._goaway_plan_for(self)
            if plan is not None:
                last = response.stream_id if plan.last_stream_id is None else plan.last_stream_id
                debug = b"" if plan.reason is None else json.dumps({"reason": plan.reason}).encode()
                self._goaway(last, plan.error_code, debug)


# --------------------------------------------------------------------------- command line


def _parse_key(spec: str) -> SimKey:
    parts = spec.split(":", 2)
    if len(parts) != 3:
        raise argparse.ArgumentTypeError("expected KID:TEAM:PEM_PATH")
    kid, team, path = parts
    pem = Path(path).read_bytes()
    try:
        _load_public_key(pem)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{path}: {exc}") from exc
    return SimKey(kid, team, pem)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pushd sim", description="Run the bundled APNs simulator."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=2197)
    parser.add_argument("--tls-dir", type=Path, help="generate (or reuse) ca.pem/server.pem here")
    parser.add_argument("--cert", type=Path, help="server certificate PEM (with --cert-key)")
    parser.add_argument("--cert-key", type=Path, help="server private key PEM")
    parser.add_argument("--no-tls", action="store_true", help="cleartext HTTP/2 (prior knowledge)")
    parser.add_argument(
        "--key",
        type=_parse_key,
        action="append",
        default=[],
        metavar="KID:TEAM:PEM_PATH",
        help="trust this signing key (public PEM or .p8); repeatable",
    )
    parser.add_argument("--no-auth", action="store_true", help="accept requests without a JWT")
    parser.add_argument(
        "--client-ca", type=Path, metavar="PEM", help="accept client certificates this CA signed"
    )
    parser.add_argument(
        "--unregistered",
        action="append",
        default=[],
        metavar="TOKEN",
        help="answer 410 Unregistered (timestamp: start time) for this token; repeatable",
    )
    parser.add_argument(
        "--expired",
        action="append",
        default=[],
        metavar="TOKEN",
        help="answer 410 ExpiredToken for this token; repeatable",
    )
    parser.add_argument("--streams", type=int, default=1000, help="MAX_CONCURRENT_STREAMS")
    parser.add_argument(
        "--initial-streams",
        type=int,
        default=1,
        metavar="N",
        help="stream limit on a token connection before its first valid JWT (0: no gate)",
    )
    parser.add_argument(
        "--environment", choices=("production", "development"), default="production"
    )
    parser.add_argument("--record", type=Path, help="append each request to FILE as a JSON line")
    parser.add_argument("--rate-429", type=float, default=0.0, metavar="P")
    parser.add_argument("--rate-500", type=float, default=0.0, metavar="P")
    parser.add_argument("--rate-503", type=float, default=0.0, metavar="P")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--out-of-order", action="store_true")
    parser.add_argument("--idle-timeout", type=float)
    return parser


def config_from_args(args: argparse.Namespace) -> SimConfig:
    rates = {429: args.rate_429, 500: args.rate_500, 503: args.rate_503}
    return SimConfig(
        host=args.host,
        port=args.port,
        tls=not args.no_tls,
        cert_file=args.cert,
        key_file=args.cert_key,
        tls_dir=args.tls_dir,
        environment=args.environment,
        max_concurrent_streams=args.streams,
        token_initial_streams=args.initial_streams or None,
        keys=list(args.key),
        require_auth=not args.no_auth,
        client_ca_file=args.client_ca,
        error_rates={status: p for status, p in rates.items() if p > 0},
        seed=args.seed,
        response_delay=args.delay,
        out_of_order=args.out_of_order,
        idle_timeout=args.idle_timeout,
        record=False,
    )


async def _run_cli(args: argparse.Namespace) -> None:
    config = config_from_args(args)
    record_path: Path | None = args.record
    sim = Simulator(config)
    now_ms = int(config.wall_clock() * 1000)
    for token in args.unregistered:
        sim.set_token_state(token, unregistered_at_ms=now_ms)
    for token in args.expired:
        sim.set_token_state(token, expired=True)
    record_file = None
    if record_path is not None:
        record_file = record_path.open("a", encoding="utf-8")

        def write(record: RecordedRequest) -> None:
            assert record_file is not None
            record_file.write(json.dumps(record.to_json(), separators=(",", ":")) + "\n")
            record_file.flush()

        sim.add_listener(write)
    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                port = await nursery.start(sim.serve)
                if sim.tls is not None:
                    print(f"ca file {sim.tls.ca_file}", file=sys.stderr, flush=True)
                print(f"listening on {config.host}:{port}", flush=True)
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break
    finally:
        if record_file is not None:
            record_file.close()


def main(argv: list[str] | None = None) -> int:
    """``pushd sim``: serve until SIGINT/SIGTERM.  Prints ``listening on HOST:PORT``."""
    args = _build_parser().parse_args(argv)
    if (args.cert is None) != (args.cert_key is None):
        print("pushd sim: --cert and --cert-key go together", file=sys.stderr)
        return 2
    trio.run(_run_cli, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
