"""APNs credentials: ES256 provider tokens (reference section 5) and TLS contexts (section 6).

Token rule (:class:`TokenAuth`):

- The normal token's ``iat`` is ``floor(now / refresh_interval) * refresh_interval``, and the
  signature is deterministic ECDSA (RFC 6979). So every process sharing a key derives the
  same byte-identical token at the same time, and the token changes exactly once per
  ``refresh_interval`` (which must lie in [1200, 2100] s, so a token is at least 20 minutes
  apart from the previous one; the upper bound: see the connection rule).
- :meth:`TokenAuth.token_rejected` (after ExpiredProviderToken / InvalidProviderToken)
  mints a fresh token with ``iat = floor(now)``, but only if the rejected token is the one
  currently in use and that token's ``iat`` is at least 20 minutes old. Otherwise it does
  nothing (a burst of in-flight rejections of one token mints at most one replacement,
  and a key never changes token twice within 20 minutes, which would earn
  TooManyProviderTokenUpdates).
- A forced token stays in use until both 20 minutes have passed since its ``iat`` and the
  bucket has moved on past it; then the bucket token takes over again.

Connection rule (:class:`ConnectionToken`, one per HTTP/2 connection): APNs refuses a
connection a new token less than 20 minutes after the previous one first appeared on it
(``429 TooManyProviderTokenUpdates``, and the connection stays refused for a while). A
connection opened shortly before the shared token changes would be refused at the change,
so each connection keeps the token it first sent until it has sent it for
``MIN_TOKEN_INTERVAL + SWITCH_MARGIN`` seconds, then takes the current one. A token is then
at most ``refresh_interval + 1260`` s old when a connection lets it go: 3360 s with the
largest ``refresh_interval`` (2100 s), four minutes inside APNs's hour.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import re
import secrets
import ssl
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import pkcs12

__all__ = [
    "ConnectionToken",
    "CredentialsError",
    "TokenAuth",
    "generate_signing_key",
    "make_ssl_context",
]

#: APNs refuses a token change more often than this on one connection (and per key).
MIN_TOKEN_INTERVAL = 1200.0
#: APNs refuses tokens older than this.
MAX_TOKEN_AGE = 3600.0
#: Seconds beyond MIN_TOKEN_INTERVAL a connection keeps its token (the time it takes a request
#: to reach APNs, which starts its 20 minutes when the token arrives, not when it was sent).
SWITCH_MARGIN = 60.0
#: The largest refresh_interval: a connection may keep a token MIN_TOKEN_INTERVAL +
#: SWITCH_MARGIN after the bucket moved on, and it must still be inside MAX_TOKEN_AGE then,
#: with minutes to spare for clock skew.
MAX_REFRESH_INTERVAL = 2100.0
DEFAULT_REFRESH_INTERVAL = 1800.0

_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


class CredentialsError(ValueError):
    """A key or certificate could not be used. The message never contains key material."""


def _b64url(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _check_id(value: str, name: str) -> None:
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise ValueError(f"{name}: must be 1-64 letters, digits, '.', '-' or '_'")


def _load_p256_key(key_pem: bytes, source: str) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        # the original message is dropped on purpose: never risk echoing key material
        raise CredentialsError(
            f"{source}: not an unencrypted PEM private key (expected an APNs .p8 key)"
        ) from None
    except Exception:  # cryptography raises UnsupportedAlgorithm and others
        raise CredentialsError(f"{source}: cannot load the private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise CredentialsError(f"{source}: not an EC P-256 private key (APNs needs ES256)")
    return key


class TokenAuth:
    """ES256 provider tokens for one (key, team); see the module docstring for the rule."""

    def __init__(
        self,
        *,
        key_pem: bytes,
        key_id: str,
        team_id: str,
        refresh_interval: float = DEFAULT_REFRESH_INTERVAL,
        clock: Callable[[], float] = time.time,
        _source: str = "key_pem",
    ) -> None:
        _check_id(key_id, "key_id")
        _check_id(team_id, "team_id")
        if not (
            isinstance(refresh_interval, int | float)
            and MIN_TOKEN_INTERVAL <= refresh_interval <= MAX_REFRESH_INTERVAL
        ):
            raise ValueError(
                f"refresh_interval: must be within [{MIN_TOKEN_INTERVAL:.0f}, "
                f"{MAX_REFRESH_INTERVAL:.0f}] seconds, got {refresh_interval!r}"
            )
        self._key = _load_p256_key(key_pem, _source)
        self.key_id = key_id
        self.team_id = team_id
        self.refresh_interval = float(refresh_interval)
        self._clock = clock
        self._header = _b64url(
            json.dumps({"alg": "ES256", "kid": key_id}, separators=(",", ":")).encode()
        )
        self._iat = -1
        self._authorization = b""
        # a forced token: in use while now < _forced_until
        self._forced_until = -math.inf

    @classmethod
    def from_file(
        cls,
        path: Path,
        *,
        key_id: str,
        team_id: str,
        refresh_interval: float = DEFAULT_REFRESH_INTERVAL,
        clock: Callable[[], float] = time.time,
    ) -> TokenAuth:
        """Load the ``.p8`` key at ``path``; CredentialsError if missing, unreadable or not P-256."""
        path = Path(path)
        try:
            key_pem = path.read_bytes()
        except OSError as e:
            raise CredentialsError(f"{path}: cannot read signing key: {e.strerror}") from None
        return cls(
            key_pem=key_pem,
            key_id=key_id,
            team_id=team_id,
            refresh_interval=refresh_interval,
            clock=clock,
            _source=str(path),
        )

    def _bucket_iat(self, now: float) -> int:
        return int(math.floor(now / self.refresh_interval) * self.refresh_interval)

    def _mint(self, iat: int) -> None:
        claims = _b64url(
            json.dumps({"iss": self.team_id, "iat": iat}, separators=(",", ":")).encode()
        )
        signing_input = self._header + b"." + claims
        der = self._key.sign(signing_input, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
        r, s = decode_dss_signature(der)
        signature = _b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))
        self._iat = iat
        self._authorization = b"bearer " + signing_input + b"." + signature

    def authorization(self) -> bytes:
        """The ``authorization`` header value, ``b"bearer <jwt>"``; cached between refreshes."""
        now = self._clock()
        if now < self._forced_until:
            return self._authorization
        iat = self._bucket_iat(now)
        if iat != self._iat:
            self._mint(iat)
        return self._authorization

    @property
    def iat(self) -> int:
        """The ``iat`` of the token :meth:`authorization` returns now."""
        self.authorization()
        return self._iat

    def token_rejected(self, authorization: bytes) -> bool:
        """Report that APNs refused ``authorization`` (Expired/InvalidProviderToken).

        Mints a fresh token (``iat = floor(now)``) if ``authorization`` is the current token
        and that token is at least 20 minutes old; returns whether it did.
        """
        current = self.authorization()
        if authorization != current:
            return False  # already replaced
        now = self._clock()
        if now - self._iat < MIN_TOKEN_INTERVAL:
            return False
        iat = math.floor(now)
        self._mint(iat)
        next_bucket = self._bucket_iat(iat) + self.refresh_interval
        self._forced_until = max(iat + MIN_TOKEN_INTERVAL, next_bucket)
        return True

    def for_connection(self) -> ConnectionToken:
        """The token holder of one new HTTP/2 connection (see the connection rule)."""
        return ConnectionToken(self)


class ConnectionToken:
    """The provider token one HTTP/2 connection sends; see the module's connection rule."""

    __slots__ = ("_auth", "_since", "_value")

    def __init__(self, auth: TokenAuth) -> None:
        self._auth = auth
        self._value = b""
        self._since = -math.inf  # when this connection first sent _value (monotonic)

    @property
    def value(self) -> bytes:
        """The token this connection sends (b"" before its first request)."""
        return self._value

    def authorization(self, now: float) -> bytes:
        """The ``authorization`` header value for a request this connection sends now;
        ``now`` is a monotonic clock (the 20 minutes are elapsed time, not wall time)."""
        current = self._auth.authorization()
        if current == self._value:
            return current
        if now - self._since >= MIN_TOKEN_INTERVAL + SWITCH_MARGIN:
            self._value, self._since = current, now
        return self._value


def generate_signing_key(
    path: Path, *, key_id: str = "SIMKEY0001", team_id: str = "SIMTEAM001"
) -> tuple[Path, bytes]:
    """Write a new P-256 private key as PKCS#8 PEM (mode 0600) and return (path, public PEM).

    For running pushd against the simulator without Apple credentials. If ``path`` is an
    existing directory the file is ``AuthKey_<key_id>.p8`` inside it, as Apple names
    them. ``key_id`` and ``team_id`` are checked as :class:`TokenAuth` would check them.
    An existing file is never overwritten (FileExistsError).
    """
    _check_id(key_id, "key_id")
    _check_id(team_id, "team_id")
    path = Path(path)
    if path.is_dir():
        path = path / f"AuthKey_{key_id}.p8"
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return path, public_pem


def make_ssl_context(
    *,
    ca_file: Path | None = None,
    client_cert: Path | None = None,
    client_key: Path | None = None,
    password: str | None = None,
) -> ssl.SSLContext:
    """A client TLS context for APNs: TLS 1.2+, ALPN h2, certificate and hostname checks on.

    ``ca_file`` replaces the system roots (e.g. the simulator's CA). ``client_cert`` is a
    PEM certificate (with ``client_key``, or the key in the same file) or a PKCS#12 bundle
    (``.p12``/``.pfx``); ``password`` decrypts the key or bundle. Raises CredentialsError.
    """
    if client_key is not None and client_cert is None:
        raise CredentialsError("client_key: given without client_cert")
    try:
        ctx = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=str(ca_file) if ca_file is not None else None
        )
    except (OSError, ssl.SSLError) as e:
        raise CredentialsError(f"{ca_file}: cannot load CA certificates: {e}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["h2"])
    # create_default_context already does these; being explicit guards against changes
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = True
    if client_cert is not None:
        client_cert = Path(client_cert)
        if client_cert.suffix.lower() in (".p12", ".pfx"):
            if client_key is not None:
                raise CredentialsError(f"{client_cert}: a PKCS#12 bundle carries its own key")
            _load_pkcs12(ctx, client_cert, password)
        else:
            try:
                # a callable, so that OpenSSL never prompts on a terminal for a missing password
                ctx.load_cert_chain(
                    client_cert,
                    str(client_key) if client_key else None,
                    password=lambda: password or "",
                )
            except (OSError, ssl.SSLError) as e:
                raise CredentialsError(
                    f"{client_cert}: cannot load client certificate/key: {_ssl_reason(e)}"
                ) from None
    return ctx


def _ssl_reason(e: OSError) -> str:
    if isinstance(e, ssl.SSLError):
        return e.reason or str(e)
    return e.strerror or str(e)


def _load_pkcs12(ctx: ssl.SSLContext, path: Path, password: str | None) -> None:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CredentialsError(f"{path}: cannot read client certificate: {e.strerror}") from None
    try:
        key, cert, extra = pkcs12.load_key_and_certificates(
            data, password.encode() if password is not None else None
        )
    except ValueError:
        raise CredentialsError(
            f"{path}: cannot open the PKCS#12 bundle (wrong password or not PKCS#12)"
        ) from None
    if key is None or cert is None:
        raise CredentialsError(f"{path}: the PKCS#12 bundle lacks a private key or certificate")
    # ssl can only load from files: write the key (encrypted with a one-time passphrase)
    # and the chain to a private temp file, load it, and remove it at once.
    passphrase = secrets.token_urlsafe(32)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(passphrase.encode()),
    )
    pem += cert.public_bytes(serialization.Encoding.PEM)
    for c in extra:
        pem += c.public_bytes(serialization.Encoding.PEM)
    fd, tmp = tempfile.mkstemp(prefix="pushd-cert-", suffix=".pem")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        ctx.load_cert_chain(tmp, password=passphrase)
    except (OSError, ssl.SSLError) as e:
        raise CredentialsError(
            f"{path}: cannot use the PKCS#12 certificate/key: {_ssl_reason(e)}"
        ) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
