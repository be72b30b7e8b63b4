"""The message records: msgpack round trip, and validation on receipt with typed errors."""

from __future__ import annotations

import msgpack
import pytest

from actors.messages import (
    AppEvent,
    DecodeError,
    Delivered,
    Enqueued,
    PushAccepted,
    RegistryChanged,
    SubmitPush,
    decode,
    encode,
)

SAMPLES = [
    SubmitPush(notification={"aps": {"alert": "hi"}}, target={"all": True}, priority=5, follow_up={"deadline": 60}),
    PushAccepted(message_id="m1", targeted=3),
    Enqueued(shards=[0, 1], count=10),
    Delivered("m1", "d1", "u1", "delivered", None, "a-1", 1.5),
    AppEvent("u1", None, "order.paid", {"order": "A1"}, 2.0),
    RegistryChanged("d1", "u1", "updated", "2.0.0", 3.0),
]


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: m.kind)
def test_round_trip(message: object) -> None:
    assert decode(encode(message)) == message  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"\xc1", "not msgpack"),
        (msgpack.packb({"kind": "x"}), "expected [kind, {fields}]"),
        (msgpack.packb(["nope", {}]), "unknown message kind 'nope'"),
        (msgpack.packb(["push_accepted", {"message_id": "m"}]), "push_accepted.targeted: missing"),
        (msgpack.packb(["push_accepted", {"message_id": "m", "targeted": "3"}]), "push_accepted.targeted: expected"),
        (msgpack.packb(["push_accepted", {"message_id": "m", "targeted": True}]), "push_accepted.targeted: expected"),
        (msgpack.packb(["enqueued", {"shards": [1, "2"], "count": 1}]), "enqueued.shards: expected"),
        (msgpack.packb(["enqueued", {"shards": [], "count": 1, "extra": 0}]), "enqueued.extra: unknown field"),
    ],
)
def test_invalid_frames_are_refused_with_the_field_named(raw: bytes, error: str) -> None:
    with pytest.raises(DecodeError, match=error.replace("[", r"\[").replace("]", r"\]")):
        decode(raw)
