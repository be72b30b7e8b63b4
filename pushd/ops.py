"""Control ops of the push pipeline: register, unregister, device, push, message, classes.

Every op validates its whole input first and answers ``invalid_argument`` naming the
field; nothing is stored until the input is known to be good.
"""

from __future__ import annotations

import contextlib
import math
import sqlite3
import time
from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import msgpack
import structlog
import trio

from actors.analyzer import (
    apply_consents_in,
    followup_summary,
    handle_event_in,
    handle_registration_in,
)
from actors.central import Failed, NotAccepted, Rejected
from actors.messages import AppEvent, Envelope, PushAccepted, RegistryChanged, SubmitPush
from actors.queuestore import URGENT_PRIORITY, UnknownMessage
from actors.registry import Consent, InvalidField, Permissions, Registered, Registration, Registry
from actors.registry import validate as validate_registration
from apns.payload import redact_token
from pushd.control import Peer
from pushd.protocol import ErrorCode, OpError, get_arg, reject_unknown_args

if TYPE_CHECKING:
    from pushd.pipeline import Pipeline

log = structlog.get_logger("pushd.ops")

PUSH_TIMEOUT = 60.0  # how long a push request waits for central's answer

REGISTER_ARGS = (
    "device_id", "token", "environment", "topic", "model", "os_version", "app_version",
    "locale", "time_zone", "user_id", "contact_ids", "attributes", "permissions", "consent",
)
PUSH_ARGS = (
    "notification", "target", "priority", "ttl", "expiration", "category", "follow_up",
)


def _invalid(field: str, message: str) -> OpError:
    return OpError(ErrorCode.INVALID_ARGUMENT, f"{field}: {message}", field=field)


def _str_list(args: Mapping[str, Any], name: str, prefix: str = "") -> tuple[str, ...]:
    value = args.get(name, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _invalid(prefix + name, "must be a list of strings")
    return tuple(value)


def parse_registration(args: Mapping[str, Any]) -> Registration:
    reject_unknown_args(args, REGISTER_ARGS)
    text = {
        name: get_arg(args, name, str)
        for name in ("device_id", "token", "topic", "model", "os_version", "app_version", "locale", "time_zone", "user_id")
    }
    environment = get_arg(args, "environment", str, "production")
    attributes = get_arg(args, "attributes", dict, {})
    perms_in = get_arg(args, "permissions", dict, {})
    consent_in = get_arg(args, "consent", dict, {})
    for key in perms_in:
        if key not in ("alert", "background", "categories_allowed", "categories_refused"):
            raise _invalid(f"permissions.{key}", "unknown key")
    for key in consent_in:
        if key not in ("events", "event_kinds"):
            raise _invalid(f"consent.{key}", "unknown key")
    allowed = perms_in.get("categories_allowed")
    if allowed is not None:
        allowed = _str_list(perms_in, "categories_allowed", "permissions.")
    for name in ("alert", "background"):
        if not isinstance(perms_in.get(name, True), bool):
            raise _invalid(f"permissions.{name}", "must be a boolean")
    if not isinstance(consent_in.get("events", False), bool):
        raise _invalid("consent.events", "must be a boolean")
    return Registration(
        environment=environment,
        contact_ids=_str_list(args, "contact_ids"),
        attributes=attributes,
        permissions=Permissions(
            alert=perms_in.get("alert", True),
            background=perms_in.get("background", True),
            categories_allowed=allowed,
            categories_refused=_str_list(perms_in, "categories_refused", "permissions."),
        ),
        consent=Consent(
            events=consent_in.get("events", False),
            event_kinds=_str_list(consent_in, "event_kinds", "consent."),
        ),
        **text,
    )


def _consent_of(record: Any) -> tuple[str, tuple[str, ...]]:
    """(user id, event kinds that may be analysed): none unless events are allowed."""
    return record.user_id, tuple(record.consent.event_kinds) if record.consent.events else ()


def device_view(record: Any) -> dict[str, Any]:
    """A device as the control socket shows it: the token redacted."""
    return {
        "device_id": record.device_id,
        "token": redact_token(record.token),
        "environment": record.environment,
        "topic": record.topic,
        "model": record.model,
        "os_version": record.os_version,
        "app_version": record.app_version,
        "locale": record.locale,
        "time_zone": record.time_zone,
        "user_id": record.user_id,
        "contact_ids": list(record.contact_ids),
        "attributes": dict(record.attributes),
        "permissions": {
            "alert": record.permissions.alert,
            "background": record.permissions.background,
            "categories_allowed": None
            if record.permissions.categories_allowed is None
            else list(record.permissions.categories_allowed),
            "categories_refused": list(record.permissions.categories_refused),
        },
        "consent": {"events": record.consent.events, "event_kinds": list(record.consent.event_kinds)},
        "registered_at_ms": record.registered_at_ms,
        "updated_at_ms": record.updated_at_ms,
        "previous_user_id": record.previous_user_id,
        "user_changed_at_ms": record.user_changed_at_ms,
        "retired_at_ms": record.retired_at_ms,
        "active": record.active,
    }


class Ops:
    def __init__(self, pipeline: Pipeline, daemon: Any) -> None:
        self.p = pipeline
        self.daemon = daemon

    def table(self) -> dict[str, Any]:
        return {
            "register": self.register,
            "register_many": self.register_many,
            "unregister": self.unregister,
            "device": self.device,
            "push": self.push,
            "message": self.message,
            "classes": self.classes,
            "report": self.report,
        }

    async def _notify_analyzer(self, change: RegistryChanged) -> None:
        """Registry changes are evidence for follow-ups. A brand-new device has none, and
        consent is applied synchronously, so only updates of known devices matter. If the
        analyzer's inbox is full the hint is dropped: a follow-up's registry condition is
        re-checked at its deadline anyway."""
        if change.change == "registered":
            return
        try:
            self.p.analyzer_send.send_nowait(change)
        except trio.WouldBlock:
            self.p.counters["registry_hints_dropped"] += 1

    async def _register(self, registrations: list[Registration]) -> list[Registered]:
        """Store validated registrations and apply their consent in one transaction: events
        outside it are deleted and the follow-ups that needed them stop, together with the
        change (not later, when the analyzer gets to it; and never the one without the
        other)."""
        now = time.time()

        def write(conn: sqlite3.Connection) -> tuple[list[Registered], tuple[int, int], list[tuple[str, str]]]:
            results = [Registry.register_in(conn, reg, int(now * 1000)) for reg in registrations]
            changed = [r.record for r in results if r.change != "stale"]
            consent = apply_consents_in(conn, [_consent_of(record) for record in changed], now)
            # follow-ups whose registry condition the new data meets end now, with it
            handled = handle_registration_in(conn, changed, now)
            return results, consent, handled

        results, (deleted, stopped), handled = await self.p.store.transaction(write)
        if deleted or stopped:
            log.info("consent applied", users=len(results), events_deleted=deleted, followups_stopped=stopped)
        for root_id, device_id in handled:
            log.info("handled", message_id=root_id, device_id=device_id)
        return results

    async def register(self, args: dict[str, Any], peer: Peer) -> Any:
        try:
            registration = validate_registration(parse_registration(args))
        except InvalidField as exc:
            raise _invalid(exc.field, exc.message) from None
        (result,) = await self._register([registration])
        record = result.record
        await self._notify_analyzer(
            RegistryChanged(
                device_id=record.device_id,
                user_id=record.user_id,
                change=result.change,
                app_version=record.app_version,
                at=time.time(),
            )
        )
        return {
            "device_id": record.device_id,
            "change": result.change,
            "token_rotated": result.token_rotated,
            "user_changed": result.user_changed,
            "revived": result.revived,
        }

    async def register_many(self, args: dict[str, Any], peer: Peer) -> Any:
        """Bulk registration (imports, benchmarks): up to 1000 devices, all or none."""
        reject_unknown_args(args, ("devices",))
        devices = get_arg(args, "devices", list)
        if not 1 <= len(devices) <= 1000:
            raise _invalid("devices", "must hold 1 to 1000 registrations")
        registrations = []
        for i, item in enumerate(devices):
            if not isinstance(item, dict):
                raise _invalid(f"devices[{i}]", "must be a map")
            try:
                registrations.append(validate_registration(parse_registration(item)))
            except OpError as exc:
                raise _invalid(f"devices[{i}].{exc.field}", exc.message) from None
            except InvalidField as exc:
                raise _invalid(f"devices[{i}].{exc.field}", exc.message) from None
        results = await self._register(registrations)
        for result in results:
            if result.change != "stale":
                await self._notify_analyzer(
                    RegistryChanged(
                        device_id=result.record.device_id,
                        user_id=result.record.user_id,
                        change=result.change,
                        app_version=result.record.app_version,
                        at=time.time(),
                    )
                )
        return {"registered": len(results), "changes": dict(Counter(r.change for r in results))}

    async def unregister(self, args: dict[str, Any], peer: Peer) -> Any:
        reject_unknown_args(args, ("device_id",))
        device_id = get_arg(args, "device_id", str)
        record = await self.p.registry.get(device_id)
        if not await self.p.registry.unregister(device_id):
            raise OpError(ErrorCode.NOT_FOUND, f"no device {device_id!r}", field="device_id")
        await self._notify_analyzer(
            RegistryChanged(
                device_id=device_id,
                user_id=record.user_id if record else None,
                change="unregistered",
                at=time.time(),
            )
        )
        return {"device_id": device_id, "removed": True}

    async def device(self, args: dict[str, Any], peer: Peer) -> Any:
        reject_unknown_args(args, ("device_id",))
        device_id = get_arg(args, "device_id", str)
        record = await self.p.registry.get(device_id)
        if record is None:
            raise OpError(ErrorCode.NOT_FOUND, f"no device {device_id!r}", field="device_id")
        return device_view(record)

    async def push(self, args: dict[str, Any], peer: Peer) -> Any:
        if self.daemon.draining:
            raise OpError(ErrorCode.UNAVAILABLE, "pushd is shutting down; not accepting pushes")
        reject_unknown_args(args, PUSH_ARGS)
        priority = get_arg(args, "priority", int, 10)
        ttl = get_arg(args, "ttl", (int, float), None) if args.get("ttl") is not None else None
        expiration = get_arg(args, "expiration", int, None) if args.get("expiration") is not None else None
        category = get_arg(args, "category", str, None) if args.get("category") is not None else None
        follow_up = get_arg(args, "follow_up", dict, None) if args.get("follow_up") is not None else None
        request = SubmitPush(
            notification=get_arg(args, "notification", dict),
            target=get_arg(args, "target", dict),
            priority=priority,
            ttl=None if ttl is None else float(ttl),
            expiration=expiration,
            category=category,
            follow_up=follow_up,
        )
        reply_send, reply_recv = trio.open_memory_channel[Any](1)
        # An urgent push: the node's bulk lanes step aside while it is being accepted.
        urgent = self.p.urgency.hold() if priority >= URGENT_PRIORITY else contextlib.nullcontext()
        with urgent:
            async with reply_recv:
                try:
                    with trio.fail_after(PUSH_TIMEOUT):
                        await self.p.central_send.send(Envelope(request, reply_send))
                        answer = await reply_recv.receive()
                except trio.TooSlowError:
                    raise OpError(
                        ErrorCode.UNAVAILABLE,
                        f"central did not answer within {PUSH_TIMEOUT:g}s (restarting or overloaded); "
                        "the push may not have been accepted",
                    ) from None
                except (trio.EndOfChannel, trio.BrokenResourceError):
                    raise OpError(ErrorCode.UNAVAILABLE, "central stopped; push not accepted") from None
        if isinstance(answer, NotAccepted):
            raise OpError(ErrorCode.UNAVAILABLE, f"{answer}; push not accepted")
        if isinstance(answer, Rejected):
            raise _invalid(answer.field, answer.message)
        if isinstance(answer, Failed):
            raise OpError(ErrorCode.INTERNAL, f"push not accepted: {answer}")
        assert isinstance(answer, PushAccepted)
        return {"message_id": answer.message_id, "targeted": answer.targeted}

    async def message(self, args: dict[str, Any], peer: Peer) -> Any:
        reject_unknown_args(args, ("message_id", "page", "page_size"))
        message_id = get_arg(args, "message_id", str)
        page = get_arg(args, "page", int, 0)
        page_size = get_arg(args, "page_size", int, 100)
        if not 0 <= page <= 1_000_000_000:
            raise _invalid("page", "must be within 0..1000000000")
        if not 1 <= page_size <= 10_000:
            raise _invalid("page_size", "must be within 1..10000")
        try:
            state = await self.p.queue.message_state(message_id, page=page, page_size=page_size)
        except UnknownMessage:
            raise OpError(ErrorCode.NOT_FOUND, f"no message {message_id!r}", field="message_id") from None
        row = await self.p.store.fetchone("SELECT fanout_done FROM messages WHERE message_id = ?", (message_id,))
        state["fanout"] = {0: "running", 1: "done", -1: "failed"}.get(row[0] if row else 1, "done")
        state["follow_up"] = await followup_summary(self.p.queue, message_id)
        return state

    async def report(self, args: dict[str, Any], peer: Peer) -> Any:
        """Record an app event for a user, only within the consent they gave."""
        reject_unknown_args(args, ("user_id", "device_id", "name", "attributes", "at"))
        user_id = get_arg(args, "user_id", str)
        device_id = get_arg(args, "device_id", str, None) if args.get("device_id") is not None else None
        name = get_arg(args, "name", str)
        attributes = get_arg(args, "attributes", dict, {})
        now = time.time()
        at = float(get_arg(args, "at", (int, float), now))
        if not (math.isfinite(at) and 0 <= at <= now + 86_400):
            raise _invalid("at", "must be unix seconds, not more than a day ahead")
        if not name or len(name) > 64:
            raise _invalid("name", "must be 1 to 64 characters")
        if not all(isinstance(k, str) for k in attributes):
            raise _invalid("attributes", "keys must be strings")
        packed = msgpack.packb(attributes, use_bin_type=True)
        event = AppEvent(user_id=user_id, device_id=device_id, name=name, attributes=attributes, at=at)
        handled: list[tuple[str, str]] = []

        def store_event(conn: sqlite3.Connection) -> str:
            # The consent check and the insert in one transaction: a registration that
            # withdraws the consent (and deletes the user's events) comes wholly before it
            # (refused here) or wholly after it (and deletes this event too).
            row = conn.execute(
                "SELECT device_id FROM devices WHERE user_id = ? AND (? IS NULL OR device_id = ?) LIMIT 1",
                (user_id, device_id, device_id),
            ).fetchone()
            if row is None:
                return "not_found"
            record = Registry.records_in(conn, [row[0]]).get(row[0])
            if record is None or not record.consent.allows(name):
                return "not_allowed"
            conn.execute(
                "INSERT INTO events (user_id, device_id, name, attributes, at) VALUES (?, ?, ?, ?, ?)",
                (user_id, device_id, name, packed, at),
            )
            # Its effect in the same transaction: the follow-ups it settles end (and their
            # queued re-pushes are withdrawn) now, not when the analyzer gets a hint that
            # a full inbox could drop.
            handled.extend(handle_event_in(conn, event, now))
            return "stored"

        result = await self.p.store.transaction(store_event)
        if result == "not_found":
            field = "device_id" if device_id is not None else "user_id"
            raise OpError(ErrorCode.NOT_FOUND, f"no registered device for user {user_id!r}", field=field)
        if result == "not_allowed":
            raise OpError(
                ErrorCode.NOT_ALLOWED,
                f"user {user_id!r} has not consented to analysis of {name!r} events; nothing stored",
                field="name",
            )
        for root_id, handled_device in handled:
            log.info("handled", message_id=root_id, device_id=handled_device)
        return {"stored": True}

    async def classes(self, args: dict[str, Any], peer: Peer) -> Any:
        reject_unknown_args(args, ())
        return {"classes": self.p.live.current.classifier.describe()}
