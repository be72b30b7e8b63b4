"""Identification codes: who a pre-push message is for, sealed with HMAC-SHA256.

Central builds one :class:`IdCode` per (message, device) and seals it with the current key of
a :class:`CodeKeys` ring; the node opens it (seal and key id valid) and then checks, with
:func:`check_identity`, that the device id and user id still equal what the registry holds.

Sealed layout (all of it authenticated by the tag)::

    version (1 byte, 0x01) | kid length (1 byte) | kid (ASCII) | msgpack body | tag (32 bytes)

where the body is the msgpack array ``[message_id, device_id, user_id, class_id, issued_at]``
and the tag is ``HMAC-SHA256(secret[kid], everything before the tag)``. The body is decoded
only after the tag has been verified.

Key ring config (``[codes]``): ``{kid: value}`` where a value is ``"hex:<secret>"`` (at least
32 bytes, i.e. 64 hex digits, as made by :func:`generate_secret`) or ``"file:<path>"`` naming a
file that holds the hex secret (relative paths resolve against ``base_dir``; with
``create_missing`` a missing file is created with a fresh secret, mode 0600). Keys rotate by
reload: add the new key, make it current, drop the old one once codes sealed with it have
drained from the queue.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import msgpack

__all__ = [
    "MIN_SECRET_BYTES",
    "CodeKeys",
    "IdCode",
    "InvalidCode",
    "check_identity",
    "generate_secret",
]

VERSION: Final = 1
MIN_SECRET_BYTES: Final = 32
TAG_BYTES: Final = 32
MAX_SEALED_BYTES: Final = 4096  # far above any real code; bounds the work on garbage input
_KID = re.compile(r"[A-Za-z0-9._\-]{1,32}")
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})+")
_MAX_ISSUED_AT: Final = 2**63 - 1


class InvalidCode(Exception):
    """A code failed verification. ``reason`` is one of:

    ``malformed`` (cannot be parsed), ``unsupported_version``, ``unknown_key`` (kid not in the
    ring), ``bad_seal`` (tag mismatch: tampered or wrong key), ``device_mismatch`` and
    ``user_mismatch`` (from :func:`check_identity`)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class IdCode:
    """What a code asserts. ``user_id`` may be empty (a device with no signed-in user)."""

    message_id: str
    device_id: str
    user_id: str
    class_id: str
    issued_at: int  # milliseconds since the Unix epoch

    def __post_init__(self) -> None:
        for name in ("message_id", "device_id", "user_id", "class_id"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise TypeError(f"IdCode.{name} must be a str, not {type(value).__name__}")
            if not value and name != "user_id":
                raise ValueError(f"IdCode.{name} must not be empty")
        if type(self.issued_at) is not int:
            raise TypeError(f"IdCode.issued_at must be an int, not {type(self.issued_at).__name__}")
        if not 0 <= self.issued_at <= _MAX_ISSUED_AT:
            raise ValueError("IdCode.issued_at out of range")


def _check_kid(kid: object) -> None:
    if not isinstance(kid, str) or not _KID.fullmatch(kid):
        raise ValueError(f"code key {kid!r}: a key id is 1-32 letters, digits, '.', '_', '-'")


def _check_secret(kid: str, secret: object) -> None:
    if not isinstance(secret, bytes):
        raise ValueError(f"code key {kid!r}: the secret must be bytes")
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(
            f"code key {kid!r}: secret is {len(secret)} bytes, at least {MIN_SECRET_BYTES} needed"
        )


def key_problem(kid: str, value: str) -> str | None:
    """What is wrong with a configured code key (``hex:<secret>`` or ``file:<path>``), as far
    as can be told without reading files (``pushd check-config``): the checks the key ring
    makes at start-up; None if nothing. Never shows the secret."""
    if not isinstance(value, str) or not value.startswith(("file:", "hex:")):
        return "must start with 'file:' or 'hex:'"
    try:
        _check_kid(kid)
        if value.startswith("file:"):
            return None  # read (or created) at start-up
        _check_secret(kid, _load_secret(kid, value, None, create_missing=False))
    except ValueError as exc:
        return str(exc)
    return None


def generate_secret() -> str:
    """A fresh 32-byte secret, hex-encoded, ready for the config."""
    return secrets.token_hex(MIN_SECRET_BYTES)


class CodeKeys:
    """A key ring: key id -> secret, and the id of the key new codes are sealed with."""

    __slots__ = ("_current", "_current_prefix", "_macs")

    def __init__(self, keys: Mapping[str, bytes], current: str) -> None:
        macs: dict[str, hmac.HMAC] = {}
        for kid, secret in keys.items():
            _check_kid(kid)
            _check_secret(kid, secret)
            # Keyed once; each tag copies it (a third of the cost of keying per tag).
            macs[kid] = hmac.new(secret, digestmod=hashlib.sha256)
        if current not in macs:
            raise ValueError(f"current code key {current!r} is not in the key ring")
        self._macs = macs
        self._current = current
        self._current_prefix = _prefix(current)

    @classmethod
    def from_config(
        cls,
        keys: Mapping[str, str],
        current: str,
        *,
        base_dir: Path | None = None,
        create_missing: bool = False,
    ) -> CodeKeys:
        """Build from config values ``"hex:<secret>"`` or ``"file:<path>"`` (see module docs).

        Raises ValueError naming the key id (never showing the secret)."""
        secrets_by_kid = {
            kid: _load_secret(kid, value, base_dir, create_missing) for kid, value in keys.items()
        }
        return cls(secrets_by_kid, current)

    @property
    def current(self) -> str:
        return self._current

    @property
    def key_ids(self) -> frozenset[str]:
        return frozenset(self._macs)

    def seal(self, code: IdCode) -> bytes:
        body = msgpack.packb(
            [code.message_id, code.device_id, code.user_id, code.class_id, code.issued_at]
        )
        signed = self._current_prefix + body
        return signed + _tag(self._macs[self._current], signed)

    def open(self, sealed: bytes) -> IdCode:
        """Verify and decode ``sealed``; raise :class:`InvalidCode` if anything is off."""
        if not isinstance(sealed, bytes | bytearray | memoryview):
            raise InvalidCode("malformed", f"expected bytes, not {type(sealed).__name__}")
        data = bytes(sealed)
        if len(data) > MAX_SEALED_BYTES:
            raise InvalidCode("malformed", "too long")
        if len(data) < 2 + TAG_BYTES:
            raise InvalidCode("malformed", "too short")
        if data[0] != VERSION:
            raise InvalidCode("unsupported_version", f"version {data[0]}")
        kid_end = 2 + data[1]
        if len(data) < kid_end + TAG_BYTES:
            raise InvalidCode("malformed", "too short")
        try:
            kid = data[2:kid_end].decode("ascii")
        except UnicodeDecodeError:
            raise InvalidCode("malformed", "key id is not ASCII") from None
        mac = self._macs.get(kid)
        if mac is None:
            raise InvalidCode("unknown_key", f"key id {kid!r}")
        signed, tag = data[:-TAG_BYTES], data[-TAG_BYTES:]
        if not hmac.compare_digest(_tag(mac, signed), tag):
            raise InvalidCode("bad_seal")
        return _decode_body(signed[kid_end:])


def check_identity(code: IdCode, *, device_id: str, user_id: str) -> None:
    """Raise :class:`InvalidCode` unless the code names this device and user (as the registry
    holds them now)."""
    if code.device_id != device_id:
        raise InvalidCode("device_mismatch")
    if code.user_id != user_id:
        raise InvalidCode("user_mismatch")


def _prefix(kid: str) -> bytes:
    raw = kid.encode("ascii")
    return bytes((VERSION, len(raw))) + raw


def _tag(keyed: hmac.HMAC, signed: bytes) -> bytes:
    mac = keyed.copy()
    mac.update(signed)
    return mac.digest()


def _decode_body(body: bytes) -> IdCode:
    try:
        fields = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise InvalidCode("malformed", f"body: {exc}") from None
    if not isinstance(fields, list) or len(fields) != 5:
        raise InvalidCode("malformed", "body is not a 5-item array")
    try:
        return IdCode(*fields)
    except (TypeError, ValueError) as exc:
        raise InvalidCode("malformed", str(exc)) from None


def _load_secret(kid: str, value: str, base_dir: Path | None, create_missing: bool) -> bytes:
    if not isinstance(value, str):
        raise ValueError(f"code key {kid!r}: expected 'hex:<secret>' or 'file:<path>'")
    if value.startswith("hex:"):
        encoded = value[len("hex:") :]
    elif value.startswith("file:"):
        path = Path(value[len("file:") :])
        if base_dir is not None:
            path = base_dir / path  # an absolute path stays as it is
        encoded = _read_secret_file(kid, path, create_missing)
    else:
        raise ValueError(f"code key {kid!r}: expected 'hex:<secret>' or 'file:<path>'")
    if not _HEX.fullmatch(encoded):
        # Never echo the value: it is (meant to be) a secret.
        raise ValueError(f"code key {kid!r}: the secret is not hex (use generate_secret())")
    return bytes.fromhex(encoded)


def _read_secret_file(kid: str, path: Path, create_missing: bool) -> str:
    if create_missing:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # keep the existing secret
        except OSError as exc:
            raise ValueError(f"code key {kid!r}: cannot create {str(path)!r}: {exc}") from None
        else:
            with os.fdopen(fd, "w", encoding="ascii") as file:
                file.write(generate_secret() + "\n")
    try:
        return path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"code key {kid!r}: cannot read {str(path)!r}: {exc}") from None
