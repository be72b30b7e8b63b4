"""The APNs notification model: push types, the ``aps`` dictionary, validation and encoding.

Everything here follows the protocol reference (``apns-reference.md`` sections 2 and 3).
A :class:`Notification` is validated when it is constructed (directly or through
:meth:`Notification.from_dict`); :meth:`Notification.encode` additionally checks the
body size and caches the result, so encoding the same notification for many device
tokens costs one JSON serialisation.

Every validation error is an :class:`InvalidNotification` whose ``field`` is the
path of the offending value in the input map, e.g. ``aps.alert.title``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, Final, NoReturn

import hpack

__all__ = [
    "Alert",
    "Aps",
    "EncodedNotification",
    "InvalidNotification",
    "Notification",
    "PushType",
    "Sound",
    "normalize_token",
    "redact_token",
]

MAX_PAYLOAD = 4096
MAX_VOIP_PAYLOAD = 5120
MAX_COLLAPSE_ID_BYTES = 64
#: Sanity bound on a device token's hex length. Apple says not to assume a size; tokens
#: of 64, 108 and 160 hex characters are known. This only keeps absurd input out of :path.
MAX_TOKEN_HEX = 1024


class InvalidNotification(ValueError):
    """A notification (or device token) failed validation; ``field`` names the input path."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.field, self.message))


def _fail(field: str, message: str) -> NoReturn:
    raise InvalidNotification(field, message)


class PushType(StrEnum):
    """The values of ``apns-push-type`` (reference section 2.2)."""

    ALERT = "alert"
    BACKGROUND = "background"
    LOCATION = "location"
    VOIP = "voip"
    COMPLICATION = "complication"
    FILEPROVIDER = "fileprovider"
    MDM = "mdm"
    LIVEACTIVITY = "liveactivity"
    PUSHTOTALK = "pushtotalk"
    WIDGETS = "widgets"
    CONTROLS = "controls"

    @property
    def topic_suffix(self) -> str:
        """What ``apns-topic`` needs after the bundle ID ("" for alert, background and mdm)."""
        return _TOPIC_SUFFIX[self]

    @property
    def allowed_priorities(self) -> tuple[int, ...]:
        """The ``apns-priority`` values this push type may use."""
        return _ALLOWED_PRIORITIES.get(self, (10, 5, 1))

    @property
    def default_priority(self) -> int:
        """The priority sent when a notification does not set one."""
        return 5 if self is PushType.BACKGROUND else 10

    @property
    def max_payload(self) -> int:
        """The body size limit in bytes: 5120 for voip, 4096 otherwise."""
        return MAX_VOIP_PAYLOAD if self is PushType.VOIP else MAX_PAYLOAD


_TOPIC_SUFFIX: dict[PushType, str] = {
    PushType.ALERT: "",
    PushType.BACKGROUND: "",
    PushType.LOCATION: ".location-query",
    PushType.VOIP: ".voip",
    PushType.COMPLICATION: ".complication",
    PushType.FILEPROVIDER: ".pushkit.fileprovider",
    PushType.MDM: "",  # the topic is the UID from the MDM certificate's Subject
    PushType.LIVEACTIVITY: ".push-type.liveactivity",
    PushType.PUSHTOTALK: ".voip-ptt",
    PushType.WIDGETS: ".push-type.widgets",
    PushType.CONTROLS: ".push-type.controls",
}

_ALLOWED_PRIORITIES: dict[PushType, tuple[int, ...]] = {
    PushType.BACKGROUND: (5,),  # "using priority 10 is an error" (A-SEND, A-BG)
    PushType.LOCATION: (10, 5),
    PushType.LIVEACTIVITY: (10, 5),
}

_PUSH_TYPE_NAMES = ", ".join(p.value for p in PushType)

# ---------------------------------------------------------------------------
# small validators; ``path`` is the field path used in the error


def _is_int(value: object) -> bool:
    return type(value) is int  # bool is not an int here


def _is_number(value: object) -> bool:
    return (type(value) is int or type(value) is float) and math.isfinite(value)


def _check_str(value: object, path: str) -> None:
    if not isinstance(value, str):
        _fail(path, "must be a string")
    if not value:
        _fail(path, "must not be empty")


def _check_str_list(value: object, path: str) -> None:
    if not isinstance(value, tuple):
        _fail(path, "must be a list of strings")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            _fail(f"{path}[{i}]", "must be a string")


def _check_unix_time(value: object, path: str) -> None:
    if not _is_int(value):
        _fail(path, "must be an integer (UNIX time in seconds)")
    if value < 0:  # type: ignore[operator]
        _fail(path, "must not be negative")


def _check_zero_or_one(value: object, path: str) -> None:
    if not _is_int(value) or value not in (0, 1):
        _fail(path, "must be 0 or 1")


def _plain_json(value: object, path: str) -> Any:
    """A validated copy of ``value`` made of plain JSON types (dict, list, str, finite
    numbers, bool, None; string keys). Tuples become lists, mappings become dicts, so
    equal content compares equal and later changes to the caller's objects do not leak in.
    """
    if value is None or isinstance(value, str | bool) or _is_int(value):
        return value
    if type(value) is float:
        if not math.isfinite(value):
            _fail(path, "must be a finite number")
        return value
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                _fail(path, f"keys must be strings, got {type(key).__name__}")
            out[key] = _plain_json(item, f"{path}.{key}")
        return out
    if isinstance(value, list | tuple):
        return [_plain_json(item, f"{path}[{i}]") for i, item in enumerate(value)]
    _fail(path, f"must be a JSON value, got {type(value).__name__}")


def _plain_json_map(value: object, path: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        _fail(path, "must be a map")
    result: dict[str, Any] = _plain_json(value, path)
    return result


def _as_map(value: object, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        _fail(path, "must be a map")
    return value


def _compact_repr(obj: object, keys: tuple[tuple[str, str], ...]) -> str:
    """``Name(a=1, b='x')`` with only the attributes that are set."""
    args = ", ".join(
        f"{attr}={value!r}" for attr, _ in keys if (value := getattr(obj, attr)) is not None
    )
    return f"{type(obj).__name__}({args})"


def _list_to_tuple(value: object) -> object:
    return tuple(value) if isinstance(value, list) else value


# ---------------------------------------------------------------------------
# the aps dictionary


@dataclass(frozen=True, kw_only=True, slots=True, repr=False)
class Alert:
    """The dictionary form of ``aps.alert`` (A-GEN Table 2)."""

    title: str | None = None
    subtitle: str | None = None
    body: str | None = None
    launch_image: str | None = None
    title_loc_key: str | None = None
    title_loc_args: tuple[str, ...] | None = None
    subtitle_loc_key: str | None = None
    subtitle_loc_args: tuple[str, ...] | None = None
    loc_key: str | None = None
    loc_args: tuple[str, ...] | None = None

    #: (attribute, JSON key) in output order
    KEYS: ClassVar[tuple[tuple[str, str], ...]] = (
        ("title", "title"),
        ("subtitle", "subtitle"),
        ("body", "body"),
        ("launch_image", "launch-image"),
        ("title_loc_key", "title-loc-key"),
        ("title_loc_args", "title-loc-args"),
        ("subtitle_loc_key", "subtitle-loc-key"),
        ("subtitle_loc_args", "subtitle-loc-args"),
        ("loc_key", "loc-key"),
        ("loc_args", "loc-args"),
    )

    def __post_init__(self) -> None:
        present = False
        for attr, key in self.KEYS:
            value = getattr(self, attr)
            if value is None:
                continue
            present = True
            path = f"aps.alert.{key}"
            if attr.endswith("_args"):
                _check_str_list(value, path)
            elif not isinstance(value, str):
                _fail(path, "must be a string")
        if not present:
            _fail("aps.alert", "must not be empty")

    def __repr__(self) -> str:
        return _compact_repr(self, self.KEYS)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Alert:
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            attr = _ALERT_ATTR.get(key)
            if attr is None:
                _fail(f"aps.alert.{key}", "unknown key")
            kwargs[attr] = _list_to_tuple(value)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for attr, key in self.KEYS:
            value = getattr(self, attr)
            if value is not None:
                out[key] = list(value) if isinstance(value, tuple) else value
        return out


_ALERT_ATTR = {key: attr for attr, key in Alert.KEYS}


@dataclass(frozen=True, kw_only=True, slots=True)
class Sound:
    """The dictionary form of ``aps.sound``, for critical alerts (A-GEN Table 3)."""

    name: str
    critical: int | None = None
    volume: float | None = None

    def __post_init__(self) -> None:
        _check_str(self.name, "aps.sound.name")
        if self.critical is not None:
            _check_zero_or_one(self.critical, "aps.sound.critical")
        if self.volume is not None and (not _is_number(self.volume) or not 0 <= self.volume <= 1):
            _fail("aps.sound.volume", "must be a number from 0 to 1")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Sound:
        for key in d:
            if key not in ("name", "critical", "volume"):
                _fail(f"aps.sound.{key}", "unknown key")
        if "name" not in d:
            _fail("aps.sound.name", "is required")
        return cls(name=d["name"], critical=d.get("critical"), volume=d.get("volume"))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.critical is not None:
            out["critical"] = self.critical
        out["name"] = self.name
        if self.volume is not None:
            out["volume"] = self.volume
        return out


_INTERRUPTION_LEVELS = ("passive", "active", "time-sensitive", "critical")
_EVENTS = ("start", "update", "end")
#: aps keys that only make sense in a liveactivity push
_LIVE_ACTIVITY_KEYS = (
    "stale-date",
    "content-state",
    "timestamp",
    "event",
    "dismissal-date",
    "attributes-type",
    "attributes",
    "input-push-token",
    "input-push-channel",
)


@dataclass(frozen=True, kw_only=True, slots=True, repr=False)
class Aps:
    """The ``aps`` dictionary (A-GEN Table 1, A-LA, A-WK). ``None`` means absent."""

    alert: str | Alert | None = None
    badge: int | None = None
    sound: str | Sound | None = None
    thread_id: str | None = None
    category: str | None = None
    content_available: int | None = None
    mutable_content: int | None = None
    target_content_id: str | None = None
    interruption_level: str | None = None
    relevance_score: float | None = None
    filter_criteria: str | None = None
    # Live Activities
    stale_date: int | None = None
    content_state: Mapping[str, Any] | None = None
    timestamp: int | None = None
    event: str | None = None
    dismissal_date: int | None = None
    attributes_type: str | None = None
    attributes: Mapping[str, Any] | None = None
    input_push_token: int | None = None
    input_push_channel: str | None = None
    # widgets and controls
    content_changed: bool | None = None

    _json: dict[str, Any] = field(init=False, repr=False, compare=False, hash=False)

    #: (attribute, JSON key) in output order
    KEYS: ClassVar[tuple[tuple[str, str], ...]] = (
        ("alert", "alert"),
        ("badge", "badge"),
        ("sound", "sound"),
        ("thread_id", "thread-id"),
        ("category", "category"),
        ("content_available", "content-available"),
        ("mutable_content", "mutable-content"),
        ("target_content_id", "target-content-id"),
        ("interruption_level", "interruption-level"),
        ("relevance_score", "relevance-score"),
        ("filter_criteria", "filter-criteria"),
        ("stale_date", "stale-date"),
        ("content_state", "content-state"),
        ("timestamp", "timestamp"),
        ("event", "event"),
        ("dismissal_date", "dismissal-date"),
        ("attributes_type", "attributes-type"),
        ("attributes", "attributes"),
        ("input_push_token", "input-push-token"),
        ("input_push_channel", "input-push-channel"),
        ("content_changed", "content-changed"),
    )

    def __post_init__(self) -> None:
        if self.alert is not None and not isinstance(self.alert, str | Alert):
            _fail("aps.alert", "must be a string or a map")
        if self.badge is not None and (not _is_int(self.badge) or self.badge < 0):
            _fail("aps.badge", "must be a non-negative integer")
        if self.sound is not None:
            if isinstance(self.sound, str):
                _check_str(self.sound, "aps.sound")
            elif not isinstance(self.sound, Sound):
                _fail("aps.sound", "must be a string or a map")
        for attr, key in (
            ("thread_id", "thread-id"),
            ("category", "category"),
            ("target_content_id", "target-content-id"),
            ("filter_criteria", "filter-criteria"),
            ("attributes_type", "attributes-type"),
            ("input_push_channel", "input-push-channel"),
        ):
            value = getattr(self, attr)
            if value is not None:
                _check_str(value, f"aps.{key}")
        if self.content_available is not None:
            _check_zero_or_one(self.content_available, "aps.content-available")
        if self.mutable_content is not None:
            _check_zero_or_one(self.mutable_content, "aps.mutable-content")
        if (
            self.interruption_level is not None
            and self.interruption_level not in _INTERRUPTION_LEVELS
        ):
            _fail("aps.interruption-level", f"must be one of {', '.join(_INTERRUPTION_LEVELS)}")
        if self.relevance_score is not None and not _is_number(self.relevance_score):
            _fail("aps.relevance-score", "must be a number")
        for attr, key in (
            ("stale_date", "stale-date"),
            ("timestamp", "timestamp"),
            ("dismissal_date", "dismissal-date"),
        ):
            value = getattr(self, attr)
            if value is not None:
                _check_unix_time(value, f"aps.{key}")
        if self.content_state is not None:
            object.__setattr__(
                self, "content_state", _plain_json_map(self.content_state, "aps.content-state")
            )
        if self.attributes is not None:
            object.__setattr__(
                self, "attributes", _plain_json_map(self.attributes, "aps.attributes")
            )
        if self.event is not None and self.event not in _EVENTS:
            _fail("aps.event", f"must be one of {', '.join(_EVENTS)}")
        if self.input_push_token is not None and (
            not _is_int(self.input_push_token) or self.input_push_token != 1
        ):
            _fail("aps.input-push-token", "must be 1")
        if self.content_changed is not None and not isinstance(self.content_changed, bool):
            _fail("aps.content-changed", "must be a boolean")
        object.__setattr__(self, "_json", self._build_json())

    def _build_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for attr, key in self.KEYS:
            value = getattr(self, attr)
            if value is None:
                continue
            if isinstance(value, Alert | Sound):
                value = value.to_dict()
            out[key] = value
        return out

    def present_keys(self) -> list[str]:
        """The JSON keys that are set, in output order."""
        return list(self._json)

    def __repr__(self) -> str:
        return _compact_repr(self, self.KEYS)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Aps:
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            attr = _APS_ATTR.get(key)
            if attr is None:
                _fail(f"aps.{key}", "unknown key (custom keys belong beside aps, not inside it)")
            if attr == "alert" and isinstance(value, Mapping):
                value = Alert.from_dict(value)
            elif attr == "sound" and isinstance(value, Mapping):
                value = Sound.from_dict(value)
            kwargs[attr] = value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The ``aps`` dictionary as sent (a fresh copy)."""
        return dict(self._json)


_APS_ATTR = {key: attr for attr, key in Aps.KEYS}

# ---------------------------------------------------------------------------
# the notification

_TOPIC_RE = re.compile(r"[A-Za-z0-9._-]+")
_UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_NOTIFICATION_KEYS = frozenset(
    ("aps", "custom", "push_type", "topic", "priority", "expiration", "collapse_id", "apns_id")
)
PER_MESSAGE_HEADERS: Final = frozenset((b"apns-collapse-id", b"apns-expiration"))
_JSON_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _check_apns_id(value: object, path: str) -> None:
    if not isinstance(value, str) or not _UUID_RE.fullmatch(value):
        _fail(path, "must be a canonical lower-case UUID (8-4-4-4-12 hex digits)")


@dataclass(frozen=True, slots=True)
class EncodedNotification:
    """A notification ready for the wire: its ``apns-*`` headers and its JSON body."""

    headers: list[tuple[bytes, bytes]]
    body: bytes

    def with_apns_id(self, apns_id: str) -> EncodedNotification:
        """A copy with ``apns-id`` set or replaced (a resend needs a new apns-id)."""
        _check_apns_id(apns_id, "apns_id")
        headers = [h for h in self.headers if h[0] != b"apns-id"]
        headers.append((b"apns-id", apns_id.encode("ascii")))
        return EncodedNotification(headers, self.body)

    def with_unindexed(self, names: frozenset[bytes] = PER_MESSAGE_HEADERS) -> EncodedNotification:
        """A copy whose ``names`` headers are sent as HPACK literals never added to the
        connection's header table. For a message to one or a few devices, indexing its
        own headers (collapse id, expiration) gains nothing and evicts the headers every
        request repeats (topic, push type), which then cost a table search each."""
        headers = [hpack.NeverIndexedHeaderTuple(*h) if h[0] in names else h for h in self.headers]
        return EncodedNotification(headers, self.body)

    @property
    def apns_id(self) -> str | None:
        for name, value in self.headers:
            if name == b"apns-id":
                return value.decode("ascii")
        return None


@dataclass(frozen=True, kw_only=True)
class Notification:
    """One notification for APNs, independent of the device token.

    ``topic`` is the bundle ID; the push type's suffix (e.g. ``.voip``) is appended when
    encoding unless the topic already ends with it. ``priority`` None means the push
    type's default (10, or 5 for background). ``expiration`` is UNIX seconds (0: one
    delivery attempt, no storage). ``custom`` holds the top-level keys besides ``aps``.
    """

    aps: Aps
    topic: str
    push_type: PushType = PushType.ALERT
    custom: Mapping[str, Any] = field(default_factory=dict)
    priority: int | None = None
    expiration: int | None = None
    collapse_id: str | None = None
    apns_id: str | None = None

    _encoded: EncodedNotification | None = field(
        default=None, init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        if not isinstance(self.aps, Aps):
            _fail("aps", "must be an Aps")
        if not isinstance(self.topic, str) or not _TOPIC_RE.fullmatch(self.topic):
            _fail("topic", "must be a bundle ID (letters, digits, '.', '-', '_')")
        if not isinstance(self.push_type, PushType):
            try:
                object.__setattr__(self, "push_type", PushType(self.push_type))
            except ValueError:
                _fail("push_type", f"must be one of {_PUSH_TYPE_NAMES}")
        object.__setattr__(self, "custom", _plain_json_map(self.custom, "custom"))
        if "aps" in self.custom:
            _fail("custom.aps", "'aps' is reserved")
        push_type = self.push_type
        if self.priority is not None:
            allowed = push_type.allowed_priorities
            if not _is_int(self.priority) or self.priority not in allowed:
                _fail(
                    "priority",
                    f"must be {' or '.join(map(str, allowed))} for {push_type.value} pushes",
                )
        if self.expiration is not None:
            _check_unix_time(self.expiration, "expiration")
        if self.collapse_id is not None:
            if not isinstance(self.collapse_id, str) or not self.collapse_id:
                _fail("collapse_id", "must be a non-empty string")
            if _CONTROL_RE.search(self.collapse_id):
                _fail("collapse_id", "must not contain control characters")
            size = len(self.collapse_id.encode("utf-8"))
            if size > MAX_COLLAPSE_ID_BYTES:
                _fail("collapse_id", f"is {size} bytes; the limit is {MAX_COLLAPSE_ID_BYTES}")
        if self.apns_id is not None:
            _check_apns_id(self.apns_id, "apns_id")
        self._check_push_type_rules()

    def _check_push_type_rules(self) -> None:
        """Payload rules that depend on the push type (reference section 3)."""
        aps = self.aps
        push_type = self.push_type
        keys = aps.present_keys()
        if push_type is PushType.BACKGROUND:
            for key in keys:
                if key != "content-available":
                    _fail(
                        f"aps.{key}",
                        "not allowed in a background push (aps holds only content-available: 1)",
                    )
            if aps.content_available != 1:
                _fail("aps.content-available", "must be 1 in a background push")
        elif (
            push_type is PushType.ALERT
            and aps.alert is None
            and aps.badge is None
            and aps.sound is None
        ):
            _fail("aps", "an alert push needs alert, badge or sound")
        if push_type is not PushType.LIVEACTIVITY:
            for key in keys:
                if key in _LIVE_ACTIVITY_KEYS:
                    _fail(f"aps.{key}", "only allowed in a liveactivity push")
            if aps.relevance_score is not None and not 0 <= aps.relevance_score <= 1:
                _fail(
                    "aps.relevance-score",
                    "must be from 0 to 1 (any number only for Live Activities)",
                )
        else:
            if aps.event is None:
                _fail("aps.event", "is required in a liveactivity push")
            required: tuple[str, ...] = ()
            if aps.event == "start":
                required = ("alert", "attributes-type", "attributes")
            elif aps.event == "update":
                required = ("timestamp", "content-state")
            for key in required:
                if key not in keys:
                    _fail(f"aps.{key}", f"is required in a liveactivity {aps.event} push")
        if push_type in (PushType.WIDGETS, PushType.CONTROLS):
            if aps.content_changed is not True:
                _fail("aps.content-changed", f"must be true in a {push_type.value} push")
        elif aps.content_changed is not None:
            _fail("aps.content-changed", "only allowed in widgets and controls pushes")

    @property
    def full_topic(self) -> str:
        """The ``apns-topic`` value: the topic with the push type's suffix."""
        suffix = self.push_type.topic_suffix
        if suffix and not self.topic.endswith(suffix):
            return self.topic + suffix
        return self.topic

    @property
    def effective_priority(self) -> int:
        return self.priority if self.priority is not None else self.push_type.default_priority

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Notification:
        """Build and fully validate (size included) a notification from a plain map.

        Keys: ``aps``, ``custom``, ``push_type``, ``topic``, ``priority``, ``expiration``,
        ``collapse_id``, ``apns_id``; any other top-level key is a custom key.
        """
        if not isinstance(d, Mapping):
            _fail("notification", "must be a map")
        if "topic" not in d:
            _fail("topic", "is required")
        custom: dict[str, Any] = dict(_as_map(d.get("custom", {}), "custom"))
        for key, value in d.items():
            if key in _NOTIFICATION_KEYS:
                continue
            if not isinstance(key, str):
                _fail("notification", f"keys must be strings, got {type(key).__name__}")
            if key in custom:
                _fail(key, "given both at top level and in custom")
            custom[key] = value
        aps = Aps.from_dict(_as_map(d.get("aps", {}), "aps"))
        apns_id = d.get("apns_id")
        if isinstance(apns_id, str):
            apns_id = apns_id.lower()
        notification = cls(
            aps=aps,
            topic=d["topic"],
            push_type=d.get("push_type", PushType.ALERT),
            custom=custom,
            priority=d.get("priority"),
            expiration=d.get("expiration"),
            collapse_id=d.get("collapse_id"),
            apns_id=apns_id,
        )
        notification.encode()  # size check, and the result is cached
        return notification

    def to_dict(self) -> dict[str, Any]:
        """A plain map (msgpack-friendly) that :meth:`from_dict` turns back into an equal notification."""
        out: dict[str, Any] = {
            "aps": self.aps.to_dict(),
            "push_type": self.push_type.value,
            "topic": self.topic,
        }
        if self.custom:
            out["custom"] = dict(self.custom)
        for name in ("priority", "expiration", "collapse_id", "apns_id"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out

    def encode(self) -> EncodedNotification:
        """The headers and body to send; raises InvalidNotification if the body is too large.

        The result is cached: calling this again (for the next device token) is free.
        """
        encoded = self._encoded
        if encoded is not None:
            return encoded
        body_obj: dict[str, Any] = {"aps": self.aps._json}
        body_obj.update(self.custom)
        body = _JSON_ENCODER.encode(body_obj).encode("utf-8")
        limit = self.push_type.max_payload
        if len(body) > limit:
            _fail(
                "payload", f"is {len(body)} bytes; the limit is {limit} for {self.push_type.value}"
            )
        headers = [
            (b"apns-push-type", self.push_type.value.encode("ascii")),
            (b"apns-topic", self.full_topic.encode("ascii")),
            (b"apns-priority", str(self.effective_priority).encode("ascii")),
        ]
        if self.expiration is not None:
            headers.append((b"apns-expiration", str(self.expiration).encode("ascii")))
        if self.collapse_id is not None:
            headers.append((b"apns-collapse-id", self.collapse_id.encode("utf-8")))
        if self.apns_id is not None:
            headers.append((b"apns-id", self.apns_id.encode("ascii")))
        encoded = EncodedNotification(headers, body)
        object.__setattr__(self, "_encoded", encoded)
        return encoded


# ---------------------------------------------------------------------------
# device tokens

_HEX_RE = re.compile(r"[0-9a-f]+")


def normalize_token(token: str) -> str:
    """The canonical form of a device token: lower-case hex, even length, non-empty.

    Surrounding whitespace is stripped and upper-case hex is lowered; anything else
    raises ``InvalidNotification("token", ...)`` (the message never repeats the token).
    """
    if not isinstance(token, str):
        _fail("token", "must be a string")
    t = token.strip().lower()
    if not t:
        _fail("token", "must not be empty")
    if not _HEX_RE.fullmatch(t):
        _fail("token", "must be hexadecimal")
    if len(t) % 2:
        _fail("token", f"must have an even number of hex digits, got {len(t)}")
    if len(t) > MAX_TOKEN_HEX:
        _fail("token", f"is {len(t)} hex digits; the limit is {MAX_TOKEN_HEX}")
    return t


def redact_token(token: str) -> str:
    """A loggable stand-in for a token: a short prefix and the length, e.g. ``a1b2c3d4…(64)``."""
    shown = min(8, len(token) // 4)
    return f"{token[:shown]}…({len(token)})"
