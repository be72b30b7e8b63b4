"""The closed set of messages the actors exchange.

In-process they travel as these objects over bounded trio memory channels; whenever
they cross a process boundary they travel as msgpack (``encode`` / ``decode``): a
two-element array ``[kind, {field: value}]``, validated on receipt.  Every field is a
msgpack-native type (str, int, float, bool, None, bytes, list, dict).

A request that needs an answer travels in an ``Envelope`` together with a one-shot
reply channel; the reply channel never crosses a process boundary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Union, get_type_hints

import msgpack
import trio

if TYPE_CHECKING:
    from actors.queuestore import LeasedItem
    from actors.registry import DeviceRecord

__all__ = [
    "AppEvent",
    "DecodeError",
    "Delivered",
    "Enqueued",
    "Envelope",
    "Handoff",
    "Message",
    "PushAccepted",
    "RegistryChanged",
    "SubmitPush",
    "decode",
    "encode",
]


class DecodeError(ValueError):
    """A frame is not a valid message: names the kind and the field."""


@dataclass(frozen=True, slots=True)
class SubmitPush:
    """control -> central: accept a notification for a target, durably."""

    kind: ClassVar[str] = "submit_push"
    notification: dict[str, Any]
    target: dict[str, Any]
    priority: int = 10
    ttl: float | None = None
    expiration: int | None = None
    category: str | None = None
    follow_up: dict[str, Any] | None = None
    parent_id: str | None = None  # set on a regenerated re-push


@dataclass(frozen=True, slots=True)
class PushAccepted:
    """central -> control: the push is durable; fan-out runs in the background."""

    kind: ClassVar[str] = "push_accepted"
    message_id: str
    targeted: int


@dataclass(frozen=True, slots=True)
class Enqueued:
    """central/analyzer -> queue: new work is durable on these shards."""

    kind: ClassVar[str] = "enqueued"
    shards: list[int]
    count: int
    urgent: bool = False  # some of it is priority 10: wake the express lanes


@dataclass(frozen=True, slots=True)
class Delivered:
    """node -> analyzer: the final outcome of one (message, device)."""

    kind: ClassVar[str] = "delivered"
    message_id: str
    device_id: str
    user_id: str
    outcome: str  # apns.outcome.OutcomeClass value, or "skipped"
    reason: str | None
    apns_id: str | None
    at: float  # unix seconds


@dataclass(frozen=True, slots=True)
class AppEvent:
    """control -> analyzer: something the user did in the app (within consent)."""

    kind: ClassVar[str] = "app_event"
    user_id: str
    device_id: str | None
    name: str
    attributes: dict[str, Any] = field(default_factory=dict)
    at: float = 0.0


@dataclass(frozen=True, slots=True)
class RegistryChanged:
    """control -> analyzer: a device registered, re-registered or left."""

    kind: ClassVar[str] = "registry_changed"
    device_id: str
    user_id: str | None
    change: str  # "registered" | "updated" | "unregistered" | "token_retired" | "consent_withdrawn"
    app_version: str | None = None
    at: float = 0.0


Message = SubmitPush | PushAccepted | Enqueued | Delivered | AppEvent | RegistryChanged
_KINDS: dict[str, type[Any]] = {
    cls.kind: cls
    for cls in (SubmitPush, PushAccepted, Enqueued, Delivered, AppEvent, RegistryChanged)
}


@dataclass(slots=True)
class Envelope:
    """A message with a one-shot reply channel (in-process only)."""

    message: Message
    reply: trio.MemorySendChannel[Any] | None = None

    async def answer(self, value: Any) -> None:
        if self.reply is None:
            return
        async with self.reply:
            # The asker may have given up; nothing to do then.
            with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                self.reply.send_nowait(value)


@dataclass(frozen=True, slots=True)
class Handoff:
    """central -> node's express lane (in-process only, like Envelope): priority-10 items
    that central leased to the node in the transaction that accepted them, with their
    devices' current records, so that the express lane sends them at once instead of
    being woken to lease them. The queue holds the truth: the items are leased to the
    node, so a hand-off that is never sent (lost with the process, or with a lane that
    crashed while taking it) is handed out again by the sweep once its lease runs out;
    the node leaves a hand-off whose lease is nearly over to the queue, and reads the
    records again if the hand-off waited (``read_at``: trio time they were read; unknown
    means read again)."""

    items: list[LeasedItem]
    records: dict[str, DeviceRecord]  # device id -> record
    read_at: float = -math.inf


def encode(message: Message) -> bytes:
    fields = {f.name: getattr(message, f.name) for f in dataclasses.fields(message)}
    return msgpack.packb([message.kind, fields], use_bin_type=True)


def _accepts(annotation: Any, value: Any) -> bool:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_accepts(a, value) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        (item,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_accepts(item, v) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    return isinstance(value, annotation)


def decode(data: bytes) -> Message:
    """Parse and validate one message; raises DecodeError naming what is wrong."""
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:
        raise DecodeError(f"not msgpack: {exc}") from None
    if not (isinstance(obj, list) and len(obj) == 2 and isinstance(obj[0], str) and isinstance(obj[1], dict)):
        raise DecodeError("expected [kind, {fields}]")
    kind, fields = obj
    cls = _KINDS.get(kind)
    if cls is None:
        raise DecodeError(f"unknown message kind {kind!r}")
    hints = get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for name in fields:
        if name not in known:
            raise DecodeError(f"{kind}.{name}: unknown field")
    for name, f in known.items():
        if name not in fields:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise DecodeError(f"{kind}.{name}: missing")
            continue
        if not _accepts(hints[name], fields[name]):
            raise DecodeError(f"{kind}.{name}: expected {hints[name]}, got {type(fields[name]).__name__}")
    return typing.cast(Message, cls(**fields))
