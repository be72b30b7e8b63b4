"""apns.auth: ES256 provider tokens (reference section 5) and the TLS client context."""

from __future__ import annotations

import base64
import datetime as dt
import json
import ssl
import stat
import tempfile
import warnings
from pathlib import Path

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from apns.auth import (
    MIN_TOKEN_INTERVAL,
    SWITCH_MARGIN,
    CredentialsError,
    TokenAuth,
    generate_signing_key,
    make_ssl_context,
)

KEY_ID = "ABC123DEFG"
TEAM_ID = "TEAM123456"


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def key_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    return generate_signing_key(tmp_path_factory.mktemp("keys"), key_id=KEY_ID, team_id=TEAM_ID)


def make_auth(key_pair: tuple[Path, bytes], clock: FakeClock, **kw: float) -> TokenAuth:
    return TokenAuth.from_file(key_pair[0], key_id=KEY_ID, team_id=TEAM_ID, clock=clock, **kw)


def decode(authorization: bytes, public_pem: bytes) -> tuple[dict[str, object], dict[str, object]]:
    scheme, token = authorization.split(b" ")
    assert scheme == b"bearer"
    claims = jwt.decode(token, public_pem, algorithms=["ES256"], options={"verify_iat": False})
    return jwt.get_unverified_header(token), claims


# --- tokens -------------------------------------------------------------------


def test_token_verifies_with_public_key(key_pair: tuple[Path, bytes]) -> None:
    auth = make_auth(key_pair, FakeClock(1_700_000_123.7))
    header, claims = decode(auth.authorization(), key_pair[1])
    assert header == {"alg": "ES256", "kid": KEY_ID}
    assert claims == {"iss": TEAM_ID, "iat": 1_699_999_200}  # floor(now / 1800) * 1800
    assert auth.iat == 1_699_999_200
    assert (auth.key_id, auth.team_id) == (KEY_ID, TEAM_ID)
    # JWS raw r||s signature (64 bytes), not DER
    sig = auth.authorization().split(b".")[2]
    assert len(base64.urlsafe_b64decode(sig + b"==")) == 64


@pytest.mark.parametrize(
    ("now", "interval", "iat"),
    [
        (1800.0, 1800.0, 1800),
        (3599.99, 1800.0, 1800),
        (3600.0, 1800.0, 3600),
        (4199.0, 2100.0, 4200 - 2100),
        (4799.0, 1200.0, 3600),
    ],
)
def test_iat_bucketing(key_pair: tuple[Path, bytes], now: float, interval: float, iat: int) -> None:
    auth = make_auth(key_pair, FakeClock(now), refresh_interval=interval)
    assert auth.iat == iat
    assert decode(auth.authorization(), key_pair[1])[1]["iat"] == iat


def test_two_instances_derive_identical_tokens(key_pair: tuple[Path, bytes]) -> None:
    a = make_auth(key_pair, FakeClock(1_700_000_000.0))
    b = make_auth(key_pair, FakeClock(1_700_000_999.0))  # later, same bucket
    assert a.authorization() == b.authorization()
    with_pem = TokenAuth(
        key_pem=key_pair[0].read_bytes(),
        key_id=KEY_ID,
        team_id=TEAM_ID,
        clock=FakeClock(1_700_000_500.0),
    )
    assert with_pem.authorization() == a.authorization()


def test_refresh_at_configured_age(key_pair: tuple[Path, bytes]) -> None:
    clock = FakeClock(10_000.0)
    auth = make_auth(key_pair, clock, refresh_interval=2000.0)
    first = auth.authorization()
    assert auth.iat == 10_000
    clock.now = 11_999.9  # age 1999.9
    assert auth.authorization() is first
    clock.now = 12_000.0  # age reaches the interval: new token
    second = auth.authorization()
    assert second != first
    assert decode(second, key_pair[1])[1]["iat"] == 12_000
    # age never reaches the interval
    for t in range(12_000, 30_000, 97):
        clock.now = float(t)
        assert 0 <= t - auth.iat < 2000


def test_token_rejected_rate_limit(key_pair: tuple[Path, bytes]) -> None:
    clock = FakeClock(30_000.0)  # bucket iat 30000
    auth = make_auth(key_pair, clock, refresh_interval=1500.0)
    token = auth.authorization()
    # too young (< 20 min): keep it
    clock.now = 31_199.0
    assert auth.token_rejected(token) is False
    assert auth.authorization() is token
    # 20 min old: one fresh token with iat = now
    clock.now = 31_200.5
    assert auth.token_rejected(token) is True
    fresh = auth.authorization()
    assert fresh != token
    assert decode(fresh, key_pair[1])[1]["iat"] == 31_200
    # the other in-flight rejections of the old token do nothing
    assert auth.token_rejected(token) is False
    # the fresh token is not replaced within 20 minutes, even if rejected
    clock.now = 32_399.0
    assert auth.token_rejected(fresh) is False
    assert auth.authorization() is fresh
    # then the bucket token (iat 31500) takes over, and every instance agrees again
    clock.now = 32_400.0
    assert auth.iat == 31_500
    assert auth.authorization() == make_auth(
        key_pair, FakeClock(32_400.0), refresh_interval=1500.0
    ).authorization()


def test_forced_token_held_for_20_minutes(key_pair: tuple[Path, bytes]) -> None:
    clock = FakeClock(1700.0)  # bucket iat 0, age 1700
    auth = make_auth(key_pair, clock, refresh_interval=2000.0)
    assert auth.token_rejected(auth.authorization()) is True
    fresh = auth.authorization()
    assert auth.iat == 1700
    clock.now = 2899.0  # the bucket moved to 2000 but 20 min have not passed
    assert auth.authorization() is fresh
    clock.now = 2900.0
    assert auth.iat == 2000
    assert auth.authorization() != fresh


@pytest.mark.parametrize("interval", [1199.9, 2100.1, 3000.0, 3600.0, 60.0])
def test_refresh_interval_bounds(key_pair: tuple[Path, bytes], interval: float) -> None:
    with pytest.raises(ValueError, match="refresh_interval"):
        make_auth(key_pair, FakeClock(0.0), refresh_interval=interval)


@pytest.mark.parametrize("interval", [1200.0, 2100.0])
def test_refresh_interval_limits_accepted(key_pair: tuple[Path, bytes], interval: float) -> None:
    assert make_auth(key_pair, FakeClock(0.0), refresh_interval=interval).iat == 0


# --- one connection's token ----------------------------------------------------


def jwt_iat(authorization: bytes) -> int:
    claims = authorization.split(b" ")[1].split(b".")[1]
    return int(json.loads(base64.urlsafe_b64decode(claims + b"==="))["iat"])


def test_a_young_connection_keeps_its_token_across_the_change(key_pair: tuple[Path, bytes]) -> None:
    clock = FakeClock(1500.0)  # 300 s before the shared token changes at 1800
    auth = make_auth(key_pair, clock, refresh_interval=1800.0)
    young = auth.for_connection()
    first = young.authorization(clock.now)
    assert jwt_iat(first) == 0
    clock.now = 1800.0  # the shared token changed; APNs would refuse it on this connection
    assert jwt_iat(auth.authorization()) == 1800
    assert young.authorization(clock.now) == first
    assert jwt_iat(auth.for_connection().authorization(clock.now)) == 1800  # a new one takes it at once
    clock.now = 1500.0 + MIN_TOKEN_INTERVAL + SWITCH_MARGIN - 0.1
    assert young.authorization(clock.now) == first
    clock.now = 1500.0 + MIN_TOKEN_INTERVAL + SWITCH_MARGIN
    assert jwt_iat(young.authorization(clock.now)) == 1800


@pytest.mark.parametrize("interval", [1200.0, 1800.0, 2100.0])
def test_a_connection_changes_token_at_most_every_21_minutes_and_never_sends_an_old_one(
    key_pair: tuple[Path, bytes], interval: float
) -> None:
    # connections opened at every point of a bucket, sending every 13 s for three hours:
    # each change on a connection comes >= 1260 s after its last one, and no token sent is
    # older than refresh_interval + 1260 s (3360 s at most: inside APNs's hour)
    clock = FakeClock(0.0)
    auth = make_auth(key_pair, clock, refresh_interval=interval)
    for opened in range(0, int(interval), 97):
        clock.now = 10 * interval + opened
        conn = auth.for_connection()
        last, since = b"", -1e9
        for t in range(0, 3 * 3600, 13):
            clock.now = 10 * interval + opened + t
            value = conn.authorization(clock.now)
            if value != last:
                assert clock.now - since >= MIN_TOKEN_INTERVAL + SWITCH_MARGIN
                last, since = value, clock.now
            assert clock.now - jwt_iat(value) <= interval + MIN_TOKEN_INTERVAL + SWITCH_MARGIN


def test_the_21_minutes_are_elapsed_time_not_wall_time(key_pair: tuple[Path, bytes]) -> None:
    wall = FakeClock(1500.0)
    auth = make_auth(key_pair, wall, refresh_interval=1800.0)
    conn = auth.for_connection()
    first = conn.authorization(100.0)  # monotonic 100
    wall.now = 1500.0 + 2 * 3600  # the wall clock stepped two hours ahead (NTP, resume)
    assert conn.authorization(160.0) == first  # only a minute has passed on this connection
    assert conn.authorization(100.0 + MIN_TOKEN_INTERVAL + SWITCH_MARGIN) != first


def test_a_forced_token_reaches_old_connections_after_their_21_minutes(
    key_pair: tuple[Path, bytes],
) -> None:
    clock = FakeClock(1300.0)
    auth = make_auth(key_pair, clock, refresh_interval=1800.0)
    old = auth.for_connection()
    stale = old.authorization(clock.now)  # iat 0
    clock.now = 1400.0
    assert auth.token_rejected(stale) is True  # e.g. APNs found it expired elsewhere
    assert jwt_iat(auth.for_connection().authorization(clock.now)) == 1400
    assert old.authorization(clock.now) == stale  # not yet 21 minutes on this connection
    clock.now = 1300.0 + MIN_TOKEN_INTERVAL + SWITCH_MARGIN
    assert jwt_iat(old.authorization(clock.now)) == 1400


@pytest.mark.parametrize(("kid", "team"), [("", TEAM_ID), (KEY_ID, 'x"y'), ("a b", TEAM_ID)])
def test_bad_ids(key_pair: tuple[Path, bytes], kid: str, team: str) -> None:
    with pytest.raises(ValueError, match="key_id" if team == TEAM_ID else "team_id"):
        TokenAuth.from_file(key_pair[0], key_id=kid, team_id=team)


# --- key files ----------------------------------------------------------------


def test_generate_signing_key(tmp_path: Path) -> None:
    path, public_pem = generate_signing_key(tmp_path / "sim.p8")
    assert path == tmp_path / "sim.p8"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    pem = path.read_bytes()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    key = serialization.load_pem_private_key(pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)
    assert (
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        == public_pem
    )
    with pytest.raises(FileExistsError):
        generate_signing_key(path)
    in_dir, _ = generate_signing_key(tmp_path, key_id="K1")
    assert in_dir == tmp_path / "AuthKey_K1.p8"


def _pem(key: object, password: bytes | None = None) -> bytes:
    enc: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "not an unencrypted PEM private key"),
        (b"-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n-----END PRIVATE KEY-----\n", "PEM"),
        ("rsa", "not an EC P-256 private key"),
        ("p384", "not an EC P-256 private key"),
        ("encrypted", "not an unencrypted PEM private key"),
    ],
)
def test_from_file_bad_keys(tmp_path: Path, content: bytes | str, message: str) -> None:
    if content == "rsa":
        content = _pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    elif content == "p384":
        content = _pem(ec.generate_private_key(ec.SECP384R1()))
    elif content == "encrypted":
        content = _pem(ec.generate_private_key(ec.SECP256R1()), b"pw")
    assert isinstance(content, bytes)
    path = tmp_path / "bad.p8"
    path.write_bytes(content)
    with pytest.raises(CredentialsError, match=message) as info:
        TokenAuth.from_file(path, key_id=KEY_ID, team_id=TEAM_ID)
    assert str(path) in str(info.value)
    body = b"".join(line for line in content.splitlines() if not line.startswith(b"-----"))
    assert not body or body[:16].decode() not in str(info.value)
    # cryptography's own message is not chained in (it could quote the input)
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__


def test_from_file_missing(tmp_path: Path) -> None:
    with pytest.raises(CredentialsError, match="cannot read signing key"):
        TokenAuth.from_file(tmp_path / "nope.p8", key_id=KEY_ID, team_id=TEAM_ID)


# --- TLS ----------------------------------------------------------------------


class Pki:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        self.ca_cert = self._cert("Test CA", self.ca_key, None, ca=True)
        self.ca_file = root / "ca.pem"
        self.ca_file.write_bytes(self.ca_cert.public_bytes(serialization.Encoding.PEM))
        self.server_key = ec.generate_private_key(ec.SECP256R1())
        self.server_cert = self._cert("localhost", self.server_key, "localhost")
        self.client_key = ec.generate_private_key(ec.SECP256R1())
        self.client_cert = self._cert("com.example.app", self.client_key, None)

    def _cert(
        self, cn: str, key: ec.EllipticCurvePrivateKey, dns: str | None, ca: bool = False
    ) -> x509.Certificate:
        now = dt.datetime.now(dt.UTC)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        issuer = name if ca else self.ca_cert.subject
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if ca:
            builder = builder.add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            ).add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
        else:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.ca_key.public_key()),
                critical=False,
            )
        if dns:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False
            )
        return builder.sign(self.ca_key if not ca else key, hashes.SHA256())

    def server_context(self, *, require_client_cert: bool = False) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        chain = self.root / "server.pem"
        chain.write_bytes(
            _pem(self.server_key) + self.server_cert.public_bytes(serialization.Encoding.PEM)
        )
        ctx.load_cert_chain(chain)
        ctx.set_alpn_protocols(["h2"])
        if require_client_cert:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(self.ca_file)
        return ctx


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def handshake(
    client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext, hostname: str = "localhost"
) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """A TLS handshake through memory BIOs (no sockets)."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=hostname)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(20):
        for name, obj in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return client, server
    raise AssertionError("handshake did not finish")


def test_context_settings(pki: Pki) -> None:
    ctx = make_ssl_context(ca_file=pki.ca_file)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname is True
    client, _ = handshake(ctx, pki.server_context())
    assert client.selected_alpn_protocol() == "h2"
    assert client.version() in ("TLSv1.2", "TLSv1.3")


def test_verification_is_on(pki: Pki) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(make_ssl_context(), pki.server_context())  # system roots: untrusted
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(make_ssl_context(ca_file=pki.ca_file), pki.server_context(), "other.host")


def test_tls_1_1_refused(pki: Pki) -> None:
    """Only the context's minimum version stops TLS 1.1: security level 0 on both sides
    would otherwise allow it (checked by lowering the minimum)."""
    server = pki.server_context()
    server.set_ciphers("DEFAULT:@SECLEVEL=0")
    server.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        server.maximum_version = ssl.TLSVersion.TLSv1_1
    client = make_ssl_context(ca_file=pki.ca_file)
    client.set_ciphers("DEFAULT:@SECLEVEL=0")
    with pytest.raises(ssl.SSLError):
        handshake(client, server)
    client.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    assert handshake(client, server)[0].version() == "TLSv1.1"


@pytest.mark.parametrize("password", [None, "s3cret"])
def test_pkcs12_client_certificate(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, password: str | None
) -> None:
    enc: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password.encode())
        if password
        else serialization.NoEncryption()
    )
    p12 = tmp_path / "push.p12"
    p12.write_bytes(
        pkcs12.serialize_key_and_certificates(b"push", pki.client_key, pki.client_cert, None, enc)
    )
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    ctx = make_ssl_context(ca_file=pki.ca_file, client_cert=p12, password=password)
    assert list(scratch.iterdir()) == []  # the temp copy is gone at once
    _, server = handshake(ctx, pki.server_context(require_client_cert=True))
    peer = server.getpeercert()
    assert peer is not None
    assert (("commonName", "com.example.app"),) in peer["subject"]


def test_pkcs12_wrong_password(pki: Pki, tmp_path: Path) -> None:
    p12 = tmp_path / "push.pfx"
    p12.write_bytes(
        pkcs12.serialize_key_and_certificates(
            b"push",
            pki.client_key,
            pki.client_cert,
            None,
            serialization.BestAvailableEncryption(b"right"),
        )
    )
    with pytest.raises(CredentialsError, match="wrong password"):
        make_ssl_context(client_cert=p12, password="wrong")
    with pytest.raises(CredentialsError, match="wrong password"):
        make_ssl_context(client_cert=p12)


def test_pem_client_certificate(pki: Pki, tmp_path: Path) -> None:
    cert = tmp_path / "client.crt"
    cert.write_bytes(pki.client_cert.public_bytes(serialization.Encoding.PEM))
    key = tmp_path / "client.key"
    key.write_bytes(_pem(pki.client_key, b"pw"))
    ctx = make_ssl_context(ca_file=pki.ca_file, client_cert=cert, client_key=key, password="pw")
    _, server = handshake(ctx, pki.server_context(require_client_cert=True))
    assert server.getpeercert()
    with pytest.raises(CredentialsError, match=r"client\.crt"):
        make_ssl_context(client_cert=cert, client_key=key, password="nope")
    with pytest.raises(CredentialsError, match=r"client\.crt"):
        make_ssl_context(client_cert=cert, client_key=key)  # no password: no prompt, an error
    # key and certificate in one file, unencrypted
    both = tmp_path / "both.pem"
    both.write_bytes(_pem(pki.client_key) + cert.read_bytes())
    _, server = handshake(
        make_ssl_context(ca_file=pki.ca_file, client_cert=both),
        pki.server_context(require_client_cert=True),
    )
    assert server.getpeercert()


def test_credential_errors(tmp_path: Path) -> None:
    with pytest.raises(CredentialsError, match="without client_cert"):
        make_ssl_context(client_key=tmp_path / "k.pem")
    with pytest.raises(CredentialsError, match="cannot read"):
        make_ssl_context(client_cert=tmp_path / "missing.p12")
    with pytest.raises(CredentialsError, match="cannot load client certificate"):
        make_ssl_context(client_cert=tmp_path / "missing.pem")
    with pytest.raises(CredentialsError, match="CA certificates"):
        make_ssl_context(ca_file=tmp_path / "missing-ca.pem")
    garbage = tmp_path / "garbage.p12"
    garbage.write_bytes(b"not pkcs12")
    with pytest.raises(CredentialsError, match="PKCS#12"):
        make_ssl_context(client_cert=garbage)


def test_decode_helper_rejects_foreign_key(key_pair: tuple[Path, bytes], tmp_path: Path) -> None:
    """The verification used above is real: another key's public half fails."""
    _, other_public = generate_signing_key(tmp_path / "other.p8")
    auth = make_auth(key_pair, FakeClock(0.0))
    with pytest.raises(jwt.InvalidSignatureError):
        decode(auth.authorization(), other_public)
    claims_segment = auth.authorization().split(b".")[1]
    assert json.loads(base64.urlsafe_b64decode(claims_segment + b"==")) == {
        "iss": TEAM_ID,
        "iat": 0,
    }
