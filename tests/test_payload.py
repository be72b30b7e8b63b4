"""apns.payload: push types, validation (errors name the field), encoding and round trips."""

from __future__ import annotations

import dataclasses
import json
import pickle
from typing import Any

import msgpack
import pytest

from apns.payload import (
    Alert,
    Aps,
    EncodedNotification,
    InvalidNotification,
    Notification,
    PushType,
    Sound,
    normalize_token,
    redact_token,
)

TOPIC = "com.example.app"
UUID = "123e4567-e89b-12d3-a456-426614174000"

# a minimal valid aps for every push type
BASE_APS: dict[PushType, dict[str, Any]] = {
    PushType.ALERT: {"alert": "hi"},
    PushType.BACKGROUND: {"content-available": 1},
    PushType.LOCATION: {},
    PushType.VOIP: {},
    PushType.COMPLICATION: {"alert": "x"},
    PushType.FILEPROVIDER: {},
    PushType.MDM: {},
    PushType.LIVEACTIVITY: {"event": "update", "timestamp": 1, "content-state": {"n": 1}},
    PushType.PUSHTOTALK: {},
    PushType.WIDGETS: {"content-changed": True},
    PushType.CONTROLS: {"content-changed": True},
}

SUFFIXES = {
    PushType.ALERT: "",
    PushType.BACKGROUND: "",
    PushType.LOCATION: ".location-query",
    PushType.VOIP: ".voip",
    PushType.COMPLICATION: ".complication",
    PushType.FILEPROVIDER: ".pushkit.fileprovider",
    PushType.MDM: "",
    PushType.LIVEACTIVITY: ".push-type.liveactivity",
    PushType.PUSHTOTALK: ".voip-ptt",
    PushType.WIDGETS: ".push-type.widgets",
    PushType.CONTROLS: ".push-type.controls",
}


def make(push_type: PushType = PushType.ALERT, **extra: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"aps": dict(BASE_APS[push_type]), "topic": TOPIC}
    d["push_type"] = push_type.value
    d.update(extra)
    return d


def headers(n: Notification) -> dict[bytes, bytes]:
    h = n.encode().headers
    assert len({name for name, _ in h}) == len(h)
    return dict(h)


# --- push types ---------------------------------------------------------------


def test_all_eleven_push_types() -> None:
    assert {p.value for p in PushType} == {
        "alert",
        "background",
        "location",
        "voip",
        "complication",
        "fileprovider",
        "mdm",
        "liveactivity",
        "pushtotalk",
        "widgets",
        "controls",
    }


@pytest.mark.parametrize("push_type", list(PushType))
def test_topic_suffix(push_type: PushType) -> None:
    suffix = SUFFIXES[push_type]
    assert push_type.topic_suffix == suffix
    n = Notification.from_dict(make(push_type))
    h = headers(n)
    assert h[b"apns-topic"] == (TOPIC + suffix).encode()
    assert h[b"apns-push-type"] == push_type.value.encode()
    # not appended twice
    again = Notification.from_dict(make(push_type, topic=TOPIC + suffix))
    assert headers(again)[b"apns-topic"] == (TOPIC + suffix).encode()


@pytest.mark.parametrize("push_type", list(PushType))
def test_default_priority(push_type: PushType) -> None:
    expected = b"5" if push_type is PushType.BACKGROUND else b"10"
    assert headers(Notification.from_dict(make(push_type)))[b"apns-priority"] == expected


ALLOWED = {
    PushType.BACKGROUND: {5},
    PushType.LOCATION: {10, 5},
    PushType.LIVEACTIVITY: {10, 5},
}


@pytest.mark.parametrize("push_type", list(PushType))
@pytest.mark.parametrize("priority", [10, 5, 1])
def test_priority_rules(push_type: PushType, priority: int) -> None:
    d = make(push_type, priority=priority)
    if priority in ALLOWED.get(push_type, {10, 5, 1}):
        assert headers(Notification.from_dict(d))[b"apns-priority"] == str(priority).encode()
    else:
        with pytest.raises(InvalidNotification) as info:
            Notification.from_dict(d)
        assert info.value.field == "priority"


@pytest.mark.parametrize("priority", [0, 7, 11, "10", 10.0, True])
def test_priority_values(priority: object) -> None:
    with pytest.raises(InvalidNotification, match=r"^priority: must be 10 or 5 or 1"):
        Notification.from_dict(make(priority=priority))


def test_background_priority_10_is_an_error() -> None:
    with pytest.raises(InvalidNotification) as info:
        Notification.from_dict(make(PushType.BACKGROUND, priority=10))
    assert str(info.value) == "priority: must be 5 for background pushes"


# --- sizes --------------------------------------------------------------------


def _sized(push_type: PushType, size: int, filler: str = "x") -> dict[str, Any]:
    d = make(push_type)
    d["custom"] = {"d": ""}
    overhead = len(Notification.from_dict(d).encode().body)
    d["custom"] = {"d": filler * ((size - overhead) // len(filler.encode()))}
    return d


@pytest.mark.parametrize(
    ("push_type", "limit"),
    [(PushType.ALERT, 4096), (PushType.VOIP, 5120), (PushType.WIDGETS, 4096)],
)
def test_size_limit(push_type: PushType, limit: int) -> None:
    at_limit = Notification.from_dict(_sized(push_type, limit))
    assert len(at_limit.encode().body) == limit
    over = _sized(push_type, limit)
    over["custom"]["d"] += "x"
    with pytest.raises(InvalidNotification) as info:
        Notification.from_dict(over)
    assert str(info.value) == f"payload: is {limit + 1} bytes; the limit is {limit} for {push_type}"
    # constructing directly defers the size check to encode(), before anything is sent
    direct = Notification(
        aps=Aps.from_dict(over["aps"]), topic=TOPIC, push_type=push_type, custom=over["custom"]
    )
    with pytest.raises(InvalidNotification, match=r"^payload: "):
        direct.encode()


def test_size_counts_utf8_bytes() -> None:
    d = _sized(PushType.ALERT, 4096, filler="é")  # 2 bytes each, sent unescaped
    body = Notification.from_dict(d).encode().body
    assert len(body) in (4095, 4096)
    assert "é".encode() in body
    d["custom"]["d"] += "éé"
    with pytest.raises(InvalidNotification, match=r"^payload: "):
        Notification.from_dict(d)


# --- encoding -----------------------------------------------------------------


def test_encode_headers_and_body() -> None:
    n = Notification.from_dict(
        {
            "aps": {"alert": {"title": "T", "body": "B"}, "badge": 3, "sound": "default"},
            "topic": TOPIC,
            "priority": 5,
            "expiration": 1_700_000_000,
            "collapse_id": "group-1",
            "apns_id": UUID,
            "custom": {"order": 42},
            "extra": [1, "two"],
        }
    )
    e = n.encode()
    assert e.headers == [
        (b"apns-push-type", b"alert"),
        (b"apns-topic", b"com.example.app"),
        (b"apns-priority", b"5"),
        (b"apns-expiration", b"1700000000"),
        (b"apns-collapse-id", b"group-1"),
        (b"apns-id", UUID.encode()),
    ]
    assert e.body == (
        b'{"aps":{"alert":{"title":"T","body":"B"},"badge":3,"sound":"default"},'
        b'"order":42,"extra":[1,"two"]}'
    )
    assert json.loads(e.body)["aps"]["badge"] == 3
    assert n.encode() is e  # cached


def test_minimal_headers() -> None:
    e = Notification(aps=Aps(alert="hi"), topic=TOPIC).encode()
    assert e.headers == [
        (b"apns-push-type", b"alert"),
        (b"apns-topic", b"com.example.app"),
        (b"apns-priority", b"10"),
    ]
    assert e.body == b'{"aps":{"alert":"hi"}}'
    assert e.apns_id is None


def test_with_apns_id() -> None:
    e = Notification(aps=Aps(alert="hi"), topic=TOPIC, apns_id=UUID).encode()
    other = "00000000-0000-4000-8000-000000000001"
    e2 = e.with_apns_id(other)
    assert isinstance(e2, EncodedNotification)
    assert e2.body is e.body
    assert [v for k, v in e2.headers if k == b"apns-id"] == [other.encode()]
    assert e.apns_id == UUID and e2.apns_id == other  # the original is untouched
    e3 = Notification(aps=Aps(alert="hi"), topic=TOPIC).encode().with_apns_id(other)
    assert e3.headers[-1] == (b"apns-id", other.encode())
    with pytest.raises(InvalidNotification, match=r"^apns_id: "):
        e.with_apns_id(UUID.upper())


def test_every_aps_key_is_encoded() -> None:
    aps = {
        "alert": {
            "title": "t",
            "subtitle": "s",
            "body": "b",
            "launch-image": "img.png",
            "title-loc-key": "TK",
            "title-loc-args": ["a"],
            "subtitle-loc-key": "SK",
            "subtitle-loc-args": ["b", "c"],
            "loc-key": "LK",
            "loc-args": [],
        },
        "badge": 0,
        "sound": {"critical": 1, "name": "alarm.caf", "volume": 0.5},
        "thread-id": "th",
        "category": "cat",
        "content-available": 1,
        "mutable-content": 1,
        "target-content-id": "win",
        "interruption-level": "time-sensitive",
        "relevance-score": 7.5,
        "filter-criteria": "work",
        "stale-date": 1_700_000_100,
        "content-state": {"score": [1, 2], "nested": {"ok": True, "none": None}},
        "timestamp": 1_700_000_000,
        "event": "start",
        "dismissal-date": 1_700_000_200,
        "attributes-type": "Match",
        "attributes": {"home": "A"},
        "input-push-token": 1,
        "input-push-channel": "chan",
    }
    n = Notification.from_dict({"aps": aps, "topic": TOPIC, "push_type": "liveactivity"})
    assert json.loads(n.encode().body) == {"aps": aps}
    assert Notification.from_dict(n.to_dict()) == n


# --- round trips --------------------------------------------------------------


@pytest.mark.parametrize("push_type", list(PushType))
def test_round_trip(push_type: PushType) -> None:
    d = make(
        push_type,
        expiration=0,
        collapse_id="c" * 64,
        apns_id=UUID,
        custom={"k": {"v": [1, 2.5, None, True]}},
        priority=5,
    )
    n = Notification.from_dict(d)
    again = Notification.from_dict(n.to_dict())
    assert again == n
    assert again.encode() == n.encode()
    # through msgpack, as the queue stores it
    packed = msgpack.packb(n.to_dict())
    assert Notification.from_dict(msgpack.unpackb(packed)) == n
    assert Notification.from_dict(msgpack.unpackb(packed, use_list=False)) == n


def test_round_trip_minimal_and_custom_at_top_level() -> None:
    n = Notification.from_dict({"aps": {"badge": 1}, "topic": TOPIC, "user": "u1"})
    assert n.custom == {"user": "u1"}
    assert n.to_dict() == {
        "aps": {"badge": 1},
        "push_type": "alert",
        "topic": TOPIC,
        "custom": {"user": "u1"},
    }
    assert Notification.from_dict(n.to_dict()) == n


def test_constructed_equals_parsed() -> None:
    built = Notification(
        aps=Aps(
            alert=Alert(title="T", loc_args=("x",)), sound=Sound(name="s", critical=1, volume=1)
        ),
        topic=TOPIC,
        custom={"a": 1},
    )
    parsed = Notification.from_dict(
        {
            "aps": {
                "alert": {"title": "T", "loc-args": ["x"]},
                "sound": {"critical": 1, "name": "s", "volume": 1},
            },
            "topic": TOPIC,
            "a": 1,
        }
    )
    assert built == parsed
    assert built.encode() == parsed.encode()


def test_apns_id_case_normalized_from_dict() -> None:
    n = Notification.from_dict(make(apns_id=UUID.upper()))
    assert n.apns_id == UUID


def test_push_type_string_accepted_in_constructor() -> None:
    n = Notification(aps=Aps(), topic=TOPIC, push_type="voip")  # type: ignore[arg-type]
    assert n.push_type is PushType.VOIP


# --- validation: every field --------------------------------------------------

LONG = "x" * 65

# (change to the base alert notification, field named in the error)
INVALID: list[tuple[dict[str, Any], str]] = [
    ({"topic": ""}, "topic"),
    ({"topic": "com.example app"}, "topic"),
    ({"topic": "com.example\r\nx: y"}, "topic"),
    ({"topic": 5}, "topic"),
    ({"push_type": "banner"}, "push_type"),
    ({"priority": 3}, "priority"),
    ({"expiration": -1}, "expiration"),
    ({"expiration": "soon"}, "expiration"),
    ({"expiration": 1.5}, "expiration"),
    ({"collapse_id": LONG}, "collapse_id"),
    ({"collapse_id": "é" * 33}, "collapse_id"),  # 66 bytes
    ({"collapse_id": ""}, "collapse_id"),
    ({"collapse_id": "a\nb"}, "collapse_id"),
    ({"collapse_id": 5}, "collapse_id"),
    ({"apns_id": "not-a-uuid"}, "apns_id"),
    ({"apns_id": UUID.replace("-", "")}, "apns_id"),
    ({"apns_id": 5}, "apns_id"),
    ({"custom": {"aps": 1}}, "custom.aps"),
    ({"custom": []}, "custom"),
    ({"custom": {"x": {1, 2}}}, "custom.x"),
    ({"custom": {"x": {"y": float("nan")}}}, "custom.x.y"),
    ({"custom": {"x": [1, object()]}}, "custom.x[1]"),
    ({"custom": {"x": 1}, "x": 2}, "x"),
    ({"aps": []}, "aps"),
    ({"aps": {"alert": 5}}, "aps.alert"),
    ({"aps": {"alert": {}}}, "aps.alert"),
    ({"aps": {"alert": {"title": 5}}}, "aps.alert.title"),
    ({"aps": {"alert": {"subtitle": 1}}}, "aps.alert.subtitle"),
    ({"aps": {"alert": {"subtitle": None, "body": 1}}}, "aps.alert.body"),
    ({"aps": {"alert": {"launch-image": 1}}}, "aps.alert.launch-image"),
    ({"aps": {"alert": {"title-loc-key": 1}}}, "aps.alert.title-loc-key"),
    ({"aps": {"alert": {"title-loc-args": "a"}}}, "aps.alert.title-loc-args"),
    ({"aps": {"alert": {"subtitle-loc-key": []}}}, "aps.alert.subtitle-loc-key"),
    ({"aps": {"alert": {"subtitle-loc-args": [1]}}}, "aps.alert.subtitle-loc-args[0]"),
    ({"aps": {"alert": {"loc-key": 1}}}, "aps.alert.loc-key"),
    ({"aps": {"alert": {"loc-args": ["a", 2]}}}, "aps.alert.loc-args[1]"),
    ({"aps": {"alert": {"titel": "x"}}}, "aps.alert.titel"),
    ({"aps": {"badge": -1}}, "aps.badge"),
    ({"aps": {"badge": "1"}}, "aps.badge"),
    ({"aps": {"badge": True}}, "aps.badge"),
    ({"aps": {"sound": ""}}, "aps.sound"),
    ({"aps": {"sound": 1}}, "aps.sound"),
    ({"aps": {"sound": {"critical": 1}}}, "aps.sound.name"),
    ({"aps": {"sound": {"name": 1}}}, "aps.sound.name"),
    ({"aps": {"sound": {"name": "a", "critical": 2}}}, "aps.sound.critical"),
    ({"aps": {"sound": {"name": "a", "volume": 1.5}}}, "aps.sound.volume"),
    ({"aps": {"sound": {"name": "a", "volume": "1"}}}, "aps.sound.volume"),
    ({"aps": {"sound": {"name": "a", "loud": 1}}}, "aps.sound.loud"),
    ({"aps": {"alert": "x", "thread-id": 1}}, "aps.thread-id"),
    ({"aps": {"alert": "x", "category": ""}}, "aps.category"),
    ({"aps": {"alert": "x", "content-available": 2}}, "aps.content-available"),
    ({"aps": {"alert": "x", "content-available": True}}, "aps.content-available"),
    ({"aps": {"alert": "x", "mutable-content": "1"}}, "aps.mutable-content"),
    ({"aps": {"alert": "x", "target-content-id": 3}}, "aps.target-content-id"),
    ({"aps": {"alert": "x", "interruption-level": "urgent"}}, "aps.interruption-level"),
    ({"aps": {"alert": "x", "relevance-score": "high"}}, "aps.relevance-score"),
    ({"aps": {"alert": "x", "relevance-score": 1.5}}, "aps.relevance-score"),
    ({"aps": {"alert": "x", "relevance-score": float("inf")}}, "aps.relevance-score"),
    ({"aps": {"alert": "x", "filter-criteria": 1}}, "aps.filter-criteria"),
    ({"aps": {"alert": "x", "custom-key": 1}}, "aps.custom-key"),
    ({"aps": {}}, "aps"),  # an alert push needs alert, badge or sound
    # Live Activity keys outside liveactivity
    ({"aps": {"alert": "x", "stale-date": 1}}, "aps.stale-date"),
    ({"aps": {"alert": "x", "content-state": {}}}, "aps.content-state"),
    ({"aps": {"alert": "x", "timestamp": 1}}, "aps.timestamp"),
    ({"aps": {"alert": "x", "event": "end"}}, "aps.event"),
    ({"aps": {"alert": "x", "dismissal-date": 1}}, "aps.dismissal-date"),
    ({"aps": {"alert": "x", "attributes-type": "A"}}, "aps.attributes-type"),
    ({"aps": {"alert": "x", "attributes": {}}}, "aps.attributes"),
    ({"aps": {"alert": "x", "input-push-token": 1}}, "aps.input-push-token"),
    ({"aps": {"alert": "x", "input-push-channel": "c"}}, "aps.input-push-channel"),
    ({"aps": {"alert": "x", "content-changed": True}}, "aps.content-changed"),
    # background: only content-available: 1
    ({"push_type": "background", "aps": {}}, "aps.content-available"),
    ({"push_type": "background", "aps": {"content-available": 0}}, "aps.content-available"),
    ({"push_type": "background", "aps": {"content-available": 1, "badge": 1}}, "aps.badge"),
    ({"push_type": "background", "aps": {"content-available": 1, "alert": "x"}}, "aps.alert"),
    ({"push_type": "background", "aps": {"content-available": 1, "sound": "a"}}, "aps.sound"),
    # liveactivity
    ({"push_type": "liveactivity", "aps": {"timestamp": 1}}, "aps.event"),
    ({"push_type": "liveactivity", "aps": {"event": "pause"}}, "aps.event"),
    (
        {"push_type": "liveactivity", "aps": {"event": "update", "content-state": {}}},
        "aps.timestamp",
    ),
    (
        {"push_type": "liveactivity", "aps": {"event": "update", "timestamp": 1}},
        "aps.content-state",
    ),
    (
        {
            "push_type": "liveactivity",
            "aps": {"event": "update", "timestamp": 1.5, "content-state": {}},
        },
        "aps.timestamp",
    ),
    (
        {
            "push_type": "liveactivity",
            "aps": {"event": "update", "timestamp": 1, "content-state": []},
        },
        "aps.content-state",
    ),
    (
        {
            "push_type": "liveactivity",
            "aps": {"event": "start", "attributes-type": "A", "attributes": {}},
        },
        "aps.alert",
    ),
    (
        {"push_type": "liveactivity", "aps": {"event": "start", "alert": "x", "attributes": {}}},
        "aps.attributes-type",
    ),
    (
        {
            "push_type": "liveactivity",
            "aps": {"event": "start", "alert": "x", "attributes-type": "A"},
        },
        "aps.attributes",
    ),
    (
        {"push_type": "liveactivity", "aps": {"event": "end", "dismissal-date": -5}},
        "aps.dismissal-date",
    ),
    ({"push_type": "liveactivity", "aps": {"event": "end", "stale-date": "x"}}, "aps.stale-date"),
    (
        {"push_type": "liveactivity", "aps": {"event": "end", "input-push-token": 2}},
        "aps.input-push-token",
    ),
    (
        {"push_type": "liveactivity", "aps": {"event": "end", "input-push-channel": ""}},
        "aps.input-push-channel",
    ),
    (
        {"push_type": "liveactivity", "aps": {"event": "end", "attributes": {"k": {1: 2}}}},
        "aps.attributes.k",
    ),
    # widgets and controls
    ({"push_type": "widgets", "aps": {}}, "aps.content-changed"),
    ({"push_type": "controls", "aps": {"content-changed": 1}}, "aps.content-changed"),
    ({"push_type": "controls", "aps": {"content-changed": False}}, "aps.content-changed"),
]


@pytest.mark.parametrize(("change", "field"), INVALID)
def test_invalid_field(change: dict[str, Any], field: str) -> None:
    d = make()
    d.update(change)
    with pytest.raises(InvalidNotification) as info:
        Notification.from_dict(d)
    assert info.value.field == field
    assert str(info.value) == f"{field}: {info.value.message}"
    assert info.value.message


def test_every_aps_key_has_a_validation_case() -> None:
    checked = {f.split(".")[1].split("[")[0] for _, f in INVALID if f.startswith("aps.")}
    assert {key for _, key in Aps.KEYS} <= checked
    alert_checked = {
        f.split(".")[2].split("[")[0] for _, f in INVALID if f.startswith("aps.alert.")
    }
    assert {key for _, key in Alert.KEYS} <= alert_checked


def test_error_messages() -> None:
    with pytest.raises(InvalidNotification) as info:
        Notification.from_dict(make(aps={"alert": {"title": 5}}))
    assert str(info.value) == "aps.alert.title: must be a string"
    with pytest.raises(InvalidNotification) as info:
        Notification.from_dict(make(collapse_id=LONG))
    assert str(info.value) == "collapse_id: is 65 bytes; the limit is 64"


def test_missing_topic_and_not_a_map() -> None:
    with pytest.raises(InvalidNotification) as info:
        Notification.from_dict({"aps": {"alert": "x"}})
    assert info.value.field == "topic"
    with pytest.raises(InvalidNotification) as info:
        Notification.from_dict([("aps", {})])  # type: ignore[arg-type]
    assert info.value.field == "notification"


def test_collapse_id_64_bytes() -> None:
    assert Notification.from_dict(make(collapse_id="x" * 64)).collapse_id == "x" * 64
    multibyte = "é" * 32  # 64 bytes
    e = Notification.from_dict(make(collapse_id=multibyte)).encode()
    assert dict(e.headers)[b"apns-collapse-id"] == multibyte.encode()


def test_relevance_score_any_number_for_live_activities() -> None:
    aps = dict(BASE_APS[PushType.LIVEACTIVITY], **{"relevance-score": 250})
    n = Notification.from_dict({"aps": aps, "topic": TOPIC, "push_type": "liveactivity"})
    assert n.aps.relevance_score == 250


def test_direct_construction_validates() -> None:
    with pytest.raises(InvalidNotification, match=r"^aps\.badge: "):
        Aps(badge=-3)
    with pytest.raises(InvalidNotification, match=r"^aps\.alert\.title: "):
        Alert(title=3)  # type: ignore[arg-type]
    with pytest.raises(InvalidNotification, match=r"^aps\.sound\.volume: "):
        Sound(name="a", volume=2)
    with pytest.raises(InvalidNotification, match=r"^aps: "):
        Notification(aps={"alert": "x"}, topic=TOPIC)  # type: ignore[arg-type]


def test_compact_repr() -> None:
    aps = Aps(alert=Alert(title="T"), badge=2)
    assert repr(aps) == "Aps(alert=Alert(title='T'), badge=2)"


def test_notification_pickles() -> None:
    n = Notification.from_dict(make(PushType.LIVEACTIVITY, custom={"a": [1]}))
    again = pickle.loads(pickle.dumps(n))
    assert again == n and again.encode() == n.encode()


def test_invalid_notification_pickles() -> None:
    e = pickle.loads(pickle.dumps(InvalidNotification("aps.badge", "bad")))
    assert (e.field, e.message, str(e)) == ("aps.badge", "bad", "aps.badge: bad")
    assert isinstance(e, ValueError)


# --- tokens -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("A1B2c3d4", "a1b2c3d4"),
        ("  abcd\n", "abcd"),
        ("ab" * 32, "ab" * 32),
        ("0f" * 80, "0f" * 80),  # 160 hex characters, seen in production
    ],
)
def test_normalize_token(raw: str, expected: str) -> None:
    assert normalize_token(raw) == expected


@pytest.mark.parametrize(
    "raw", ["", "   ", "abc", "zz", "ab cd", "<abcd>", "0x12", "ab" * 600, None, b"ab"]
)
def test_normalize_token_rejects(raw: Any) -> None:
    with pytest.raises(InvalidNotification) as info:
        normalize_token(raw)
    assert info.value.field == "token"
    if isinstance(raw, str) and len(raw) > 4:
        assert raw.strip() not in str(info.value)


def test_redact_token() -> None:
    token = "a1b2c3d4" + "e" * 56
    assert redact_token(token) == "a1b2c3d4…(64)"
    assert "e" * 8 not in redact_token(token)
    assert redact_token("abcd") == "a…(4)"
    assert redact_token("") == "…(0)"


def test_caller_changes_do_not_leak_in() -> None:
    custom = {"k": [1]}
    state = {"n": 1}
    aps = {"event": "update", "timestamp": 1, "content-state": state}
    n = Notification.from_dict(
        {"aps": aps, "topic": TOPIC, "push_type": "liveactivity", "custom": custom}
    )
    body = n.encode().body
    custom["k"].append(2)
    state["n"] = 2
    fresh = Notification.from_dict(n.to_dict())
    assert fresh.encode().body == body
    assert fresh == n


def test_replace_revalidates_and_reencodes() -> None:
    n = Notification.from_dict(make())
    assert n.encode().apns_id is None
    changed = dataclasses.replace(n, apns_id=UUID, priority=5)
    assert changed.encode().apns_id == UUID
    assert dict(changed.encode().headers)[b"apns-priority"] == b"5"
    with pytest.raises(InvalidNotification, match=r"^priority: "):
        dataclasses.replace(n, push_type=PushType.BACKGROUND, priority=10)
