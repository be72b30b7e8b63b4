from __future__ import annotations

import dataclasses
import hashlib
import hmac
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.idcode import (
    CodeKeys,
    IdCode,
    InvalidCode,
    check_identity,
    generate_secret,
)

K1 = bytes(range(32))
K2 = bytes(range(100, 140))
CODE = IdCode(
    message_id="m-42",
    device_id="d-7",
    user_id="u-9",
    class_id="needs-update",
    issued_at=1_795_000_000_123,
)


def ring(current: str = "k1", **keys: bytes) -> CodeKeys:
    return CodeKeys(keys or {"k1": K1}, current)


def reason(keys: CodeKeys, sealed: bytes) -> str:
    with pytest.raises(InvalidCode) as info:
        keys.open(sealed)
    return info.value.reason


def test_round_trip() -> None:
    keys = ring()
    sealed = keys.seal(CODE)
    assert isinstance(sealed, bytes)
    assert keys.open(sealed) == CODE


def test_layout() -> None:
    sealed = ring().seal(CODE)
    assert sealed[0] == 1
    assert sealed[1] == 2 and sealed[2:4] == b"k1"
    body = sealed[4:-32]
    assert msgpack.unpackb(body) == ["m-42", "d-7", "u-9", "needs-update", 1_795_000_000_123]
    assert sealed[-32:] == hmac.digest(K1, sealed[:-32], hashlib.sha256)


def test_empty_user_id_round_trips() -> None:
    keys = ring()
    code = dataclasses.replace(CODE, user_id="")
    assert keys.open(keys.seal(code)) == code


# Deterministic: the same examples on every run, no example database on disk.
deterministic = settings(derandomize=True, database=None)

codes = st.builds(
    IdCode,
    message_id=st.text(min_size=1, max_size=40),
    device_id=st.text(min_size=1, max_size=80),
    user_id=st.text(max_size=40),
    class_id=st.text(min_size=1, max_size=64),
    issued_at=st.integers(min_value=0, max_value=2**63 - 1),
)


@deterministic
@given(codes)
def test_round_trip_any_code(code: IdCode) -> None:
    keys = ring()
    assert keys.open(keys.seal(code)) == code


def test_every_byte_flip_is_detected() -> None:
    keys = ring()
    sealed = keys.seal(CODE)
    for i in range(len(sealed)):
        for bit in range(8):
            tampered = bytearray(sealed)
            tampered[i] ^= 1 << bit
            with pytest.raises(InvalidCode):
                keys.open(bytes(tampered))


def test_every_truncation_and_extension_is_detected() -> None:
    keys = ring()
    sealed = keys.seal(CODE)
    for n in range(len(sealed)):
        with pytest.raises(InvalidCode):
            keys.open(sealed[:n])
    for extra in (b"\x00", b"\x90", sealed[-1:]):
        with pytest.raises(InvalidCode):
            keys.open(sealed + extra)


@deterministic
@given(codes, st.data())
def test_random_corruption_is_detected(code: IdCode, data: st.DataObject) -> None:
    keys = ring()
    sealed = keys.seal(code)
    i = data.draw(st.integers(min_value=0, max_value=len(sealed) - 1))
    mask = data.draw(st.integers(min_value=1, max_value=255))
    tampered = bytearray(sealed)
    tampered[i] ^= mask
    with pytest.raises(InvalidCode):
        keys.open(bytes(tampered))


@pytest.mark.parametrize(
    "change",
    [
        {"message_id": "m-43"},
        {"device_id": "d-8"},
        {"user_id": "u-10"},
        {"user_id": ""},
        {"class_id": "default"},
        {"issued_at": 1_795_000_000_124},
    ],
)
def test_field_change_breaks_the_seal(change: dict[str, object]) -> None:
    keys = ring()
    sealed = keys.seal(CODE)
    forged_body = keys.seal(dataclasses.replace(CODE, **change))[4:-32]  # type: ignore[arg-type]
    forged = sealed[:4] + forged_body + sealed[-32:]  # original tag on a changed body
    assert reason(keys, forged) == "bad_seal"


def test_reasons() -> None:
    keys = ring()
    sealed = keys.seal(CODE)
    assert reason(keys, b"") == "malformed"
    assert reason(keys, sealed[:20]) == "malformed"
    assert reason(keys, b"\x02" + sealed[1:]) == "unsupported_version"
    assert reason(keys, sealed[:1] + b"\xff" + sealed[2:]) == "malformed"  # kid overruns
    assert reason(keys, sealed[:2] + b"\xff\xfe" + sealed[4:]) == "malformed"  # kid not ASCII
    assert reason(keys, sealed[:2] + b"k9" + sealed[4:]) == "unknown_key"
    assert reason(keys, sealed[:-1] + bytes([sealed[-1] ^ 1])) == "bad_seal"
    assert reason(keys, sealed + b"\x00" * 5000) == "malformed"  # too long
    with pytest.raises(InvalidCode) as info:
        keys.open("not bytes")  # type: ignore[arg-type]
    assert info.value.reason == "malformed"


def test_validly_sealed_garbage_body_is_malformed() -> None:
    """Only reachable with the key (a bug or a leaked key), but still never a crash."""
    prefix = b"\x01\x02k1"
    for body in (
        b"\xc1",  # never-used msgpack byte
        msgpack.packb(["m", "d", "u", "c"]),
        msgpack.packb(["m", "d", "u", "c", 1, 2]),
        msgpack.packb({"m": 1}),
        msgpack.packb(["m", "d", "u", "c", -1]),
        msgpack.packb(["m", "d", "u", "c", "1"]),
        msgpack.packb(["m", b"d", "u", "c", 1]),
        msgpack.packb(["", "d", "u", "c", 1]),
        msgpack.packb(["m", "d", "u", "c", 1]) + b"\x00",  # trailing data
    ):
        signed = prefix + body
        sealed = signed + hmac.digest(K1, signed, hashlib.sha256)
        assert reason(ring(), sealed) == "malformed", body


def test_wrong_key_same_kid_is_bad_seal() -> None:
    sealed = ring().seal(CODE)
    assert reason(CodeKeys({"k1": K2}, "k1"), sealed) == "bad_seal"


def test_rotation() -> None:
    old = CodeKeys({"k1": K1}, "k1")
    sealed_old = old.seal(CODE)
    # Reload 1: add k2 and make it current; codes sealed with k1 still open.
    rotated = CodeKeys({"k1": K1, "k2": K2}, "k2")
    sealed_new = rotated.seal(CODE)
    assert sealed_new[2:4] == b"k2"
    assert rotated.open(sealed_old) == CODE
    assert rotated.open(sealed_new) == CODE
    # Reload 2: drop k1; its codes are rejected, k2's still open.
    retired = CodeKeys({"k2": K2}, "k2")
    assert reason(retired, sealed_old) == "unknown_key"
    assert retired.open(sealed_new) == CODE
    assert retired.key_ids == frozenset({"k2"})
    assert retired.current == "k2"


def test_kid_is_authenticated() -> None:
    """Renaming the kid to another key in the ring does not verify."""
    keys = CodeKeys({"k1": K1, "k2": K2}, "k1")
    sealed = keys.seal(CODE)
    assert reason(keys, sealed[:2] + b"k2" + sealed[4:]) == "bad_seal"


def test_key_ring_validation() -> None:
    with pytest.raises(ValueError, match=r"'short'.*31 bytes"):
        CodeKeys({"k1": K1, "short": bytes(31)}, "k1")
    with pytest.raises(ValueError, match="'k3' is not in the key ring"):
        CodeKeys({"k1": K1}, "k3")
    with pytest.raises(ValueError, match="key id"):
        CodeKeys({"bad id": K1}, "bad id")
    with pytest.raises(ValueError, match="key id"):
        CodeKeys({"x" * 33: K1}, "x" * 33)
    with pytest.raises(ValueError, match=r"'k1'.*bytes"):
        CodeKeys({"k1": K1.hex()}, "k1")  # type: ignore[dict-item]


def test_generate_secret() -> None:
    a, b = generate_secret(), generate_secret()
    assert a != b
    assert len(bytes.fromhex(a)) == 32
    keys = CodeKeys.from_config({"k": f"hex:{a}"}, "k")
    assert keys.open(keys.seal(CODE)) == CODE


def test_from_config_hex_and_file(tmp_path: Path) -> None:
    (tmp_path / "k2.key").write_text(K2.hex() + "\n")
    absolute = tmp_path / "k3.key"
    absolute.write_text(K1.hex())
    keys = CodeKeys.from_config(
        {"k1": f"hex:{K1.hex().upper()}", "k2": "file:k2.key", "k3": f"file:{absolute}"},
        "k2",
        base_dir=tmp_path,
    )
    assert CodeKeys({"k2": K2}, "k2").open(keys.seal(CODE)) == CODE
    assert keys.open(CodeKeys({"k1": K1}, "k1").seal(CODE)) == CODE
    assert keys.open(CodeKeys({"k3": K1}, "k3").seal(CODE)) == CODE


def test_from_config_creates_a_missing_key_file_once(tmp_path: Path) -> None:
    first = CodeKeys.from_config(
        {"k1": "file:k1.key"}, "k1", base_dir=tmp_path, create_missing=True
    )
    key_file = tmp_path / "k1.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert len(bytes.fromhex(key_file.read_text().strip())) == 32
    again = CodeKeys.from_config(
        {"k1": "file:k1.key"}, "k1", base_dir=tmp_path, create_missing=True
    )
    assert again.open(first.seal(CODE)) == CODE  # the existing secret was kept
    with pytest.raises(ValueError, match=r"'k2'.*cannot read"):
        CodeKeys.from_config({"k2": "file:k2.key"}, "k2", base_dir=tmp_path)  # not created


def test_from_config_errors_name_the_key_and_hide_the_secret(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'k1'.*not hex") as info:
        CodeKeys.from_config({"k1": "hex:" + "zz" * 32}, "k1")
    assert "zz" not in str(info.value)
    with pytest.raises(ValueError, match=r"'k1'.*'hex:<secret>' or 'file:<path>'") as info:
        CodeKeys.from_config({"k1": K1.hex()}, "k1")  # no scheme
    assert K1.hex() not in str(info.value)
    with pytest.raises(ValueError, match=r"'k1'.*not hex"):
        CodeKeys.from_config({"k1": "hex:" + K1.hex()[:-1]}, "k1")  # odd length
    with pytest.raises(ValueError, match=r"'k1'.*16 bytes"):
        CodeKeys.from_config({"k1": "hex:" + bytes(16).hex()}, "k1")
    with pytest.raises(ValueError, match=r"'k2'.*cannot read"):
        CodeKeys.from_config({"k2": f"file:{tmp_path / 'missing'}"}, "k2")
    with pytest.raises(ValueError, match=r"'k2'.*cannot create"):
        CodeKeys.from_config(
            {"k2": "file:no/such/dir.key"}, "k2", base_dir=tmp_path, create_missing=True
        )
    with pytest.raises(ValueError, match="'k3'"):
        CodeKeys.from_config({"k3": 12345}, "k3")  # type: ignore[dict-item]


def test_idcode_validation() -> None:
    with pytest.raises(ValueError, match="device_id"):
        dataclasses.replace(CODE, device_id="")
    with pytest.raises(TypeError, match="message_id"):
        dataclasses.replace(CODE, message_id=42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="issued_at"):
        dataclasses.replace(CODE, issued_at=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="issued_at"):
        dataclasses.replace(CODE, issued_at=True)
    with pytest.raises(ValueError, match="issued_at"):
        dataclasses.replace(CODE, issued_at=-1)


def test_check_identity() -> None:
    check_identity(CODE, device_id="d-7", user_id="u-9")
    with pytest.raises(InvalidCode) as info:
        check_identity(CODE, device_id="d-8", user_id="u-9")
    assert info.value.reason == "device_mismatch"
    with pytest.raises(InvalidCode) as info:
        check_identity(CODE, device_id="d-7", user_id="u-other")  # device changed hands
    assert info.value.reason == "user_mismatch"
