"""apns.outcome: every status and reason of reference section 4.2 and its class (4.3)."""

from __future__ import annotations

import json

import pytest

from apns.outcome import REASONS, Outcome, OutcomeClass, classify

D, T, R, C, X = (
    OutcomeClass.DELIVERED,
    OutcomeClass.TOKEN_DEAD,
    OutcomeClass.RETRY,
    OutcomeClass.CREDENTIALS,
    OutcomeClass.REJECTED,
)

# (status, reason, expected class): the reference's table 4.2, row by row.
REFERENCE_TABLE = [
    (400, "BadCollapseId", X),
    (400, "BadDeviceToken", T),
    (400, "BadExpirationDate", X),
    (400, "BadMessageId", X),
    (400, "BadPriority", X),
    (400, "BadTopic", X),
    (400, "DeviceTokenNotForTopic", T),
    (400, "DuplicateHeaders", X),
    (400, "IdleTimeout", R),
    (400, "InvalidPushType", X),
    (400, "MissingDeviceToken", X),
    (400, "MissingTopic", X),
    (400, "PayloadEmpty", X),
    (400, "TopicDisallowed", X),
    (403, "BadCertificate", C),
    (403, "BadCertificateEnvironment", C),
    (403, "ExpiredProviderToken", C),
    (403, "Forbidden", C),
    (403, "InvalidProviderToken", C),
    (403, "MissingProviderToken", C),
    (403, "UnrelatedKeyIdInToken", C),
    (403, "BadEnvironmentKeyIdInToken", C),
    (404, "BadPath", X),
    (405, "MethodNotAllowed", X),
    (410, "ExpiredToken", T),
    (410, "Unregistered", T),
    (413, "PayloadTooLarge", X),
    (429, "TooManyProviderTokenUpdates", R),
    (429, "TooManyRequests", R),
    (500, "InternalServerError", R),
    (503, "ServiceUnavailable", R),
    (503, "Shutdown", R),
]


def test_table_covers_every_documented_reason() -> None:
    assert {reason for _, reason, _ in REFERENCE_TABLE} == set(REASONS)
    assert len(REFERENCE_TABLE) == 32


@pytest.mark.parametrize(("status", "reason", "expected"), REFERENCE_TABLE)
def test_classify_reference_table(status: int, reason: str, expected: OutcomeClass) -> None:
    assert classify(status, reason) is expected


@pytest.mark.parametrize(("status", "reason", "expected"), REFERENCE_TABLE)
def test_from_response_reference_table(status: int, reason: str, expected: OutcomeClass) -> None:
    apns_id = "0a1b2c3d-0000-4000-8000-000000000001"
    body = json.dumps({"reason": reason}).encode()
    out = Outcome.from_response(
        status, [(b"content-type", b"application/json"), (b"apns-id", apns_id.encode())], body
    )
    assert (out.klass, out.status, out.reason, out.apns_id) == (expected, status, reason, apns_id)
    assert out.timestamp_ms is None


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (200, D),
        (400, X),
        (403, C),
        (404, X),
        (405, X),
        (410, T),
        (413, X),
        (429, R),
        (500, R),
        (502, R),
        (503, R),
        (599, R),
        (418, X),
    ],
)
def test_classify_by_status_when_reason_unknown(status: int, expected: OutcomeClass) -> None:
    assert classify(status, None) is expected
    assert classify(status, "SomethingNew") is expected


def test_success() -> None:
    out = Outcome.from_response(200, [(b"apns-id", b"abc"), (b"apns-unique-id", b"u")], b"")
    assert out == Outcome(D, 200, None, "abc")


def test_unregistered_carries_timestamp() -> None:
    body = b'{"reason":"Unregistered","timestamp":1700000000123}'
    out = Outcome.from_response(410, [(b"apns-id", b"x")], body)
    assert (out.klass, out.reason, out.timestamp_ms) == (T, "Unregistered", 1700000000123)


@pytest.mark.parametrize("ts", ["1700000000123", 1.5, True, None])
def test_timestamp_of_wrong_type_is_ignored(ts: object) -> None:
    body = json.dumps({"reason": "Unregistered", "timestamp": ts}).encode()
    out = Outcome.from_response(410, [], body)
    assert (out.klass, out.timestamp_ms) == (T, None)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"<html>502</html>",
        b"\xff\xfe\x00",
        b"[1, 2]",
        b'{"reason": 5}',
        b'{"no": "reason"}',
        b"null",
        b"[" * 100_000,
    ],
)
@pytest.mark.parametrize(("status", "expected"), [(400, X), (403, C), (410, T), (429, R), (500, R)])
def test_garbage_body_never_raises(body: bytes, status: int, expected: OutcomeClass) -> None:
    out = Outcome.from_response(status, [(b"apns-id", b"id-1")], body)
    assert (out.klass, out.status, out.reason, out.apns_id) == (
        expected,
        status,
        "UnparsableResponse",
        "id-1",
    )
    assert out.detail is not None


@pytest.mark.parametrize(
    ("value", "expected"), [(b"30", 30.0), (b" 1.5 ", 1.5), (b"-1", None), (b"soon", None)]
)
def test_retry_after(value: bytes, expected: float | None) -> None:
    out = Outcome.from_response(429, [(b"Retry-After", value)], b'{"reason":"TooManyRequests"}')
    assert (out.klass, out.retry_after) == (R, expected)


def test_header_names_are_case_insensitive() -> None:
    out = Outcome.from_response(200, [(b"APNS-ID", b"abc")], b"")
    assert out.apns_id == "abc"


def test_connection_lost() -> None:
    out = Outcome.connection_lost("GOAWAY Shutdown", apns_id="abc")
    assert (out.klass, out.status, out.apns_id, out.detail) == (R, None, "abc", "GOAWAY Shutdown")
    assert Outcome.connection_lost("reset").apns_id is None
