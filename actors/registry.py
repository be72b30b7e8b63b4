"""The node-side registry: devices, their users, push permissions and analysis consent.

A registration carries one device and its user. Re-registering a device updates it in
place: a rotated token replaces the old one (kept as ``previous_token``), a device that
moves to another user records ``previous_user_id`` and ``user_changed_at_ms``, and a
registration older than the one stored is ignored (requests can arrive out of order).
One token belongs to one device: a token registered under a new device id leaves the
old device row.

A token APNs declared dead (410, with its timestamp) is *retired*: the device stays in
the registry but is no longer a target, until a registration newer than APNs's
timestamp revives it. Retirements are remembered per token, so a stale registration
that arrives late with a retired token does not bring it back.

User-level data (contact ids, attributes, consent) is stored once per user and follows
the latest registration of any of that user's devices; permissions are per device (iOS
grants them per installation).

Fan-out never loads the audience at once: :meth:`Registry.targets` streams
:class:`DeviceRecord` batches by keyset pagination. All times are unix milliseconds
supplied by the caller (APNs reports token invalidation in milliseconds).
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import zoneinfo
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache, lru_cache
from typing import Any, Final, Literal

from actors.storage import Store

Environment = Literal["production", "sandbox"]
ENVIRONMENTS: Final = frozenset({"production", "sandbox"})
Change = Literal["registered", "updated", "stale"]

_DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}")
_TOKEN = re.compile(r"(?:[0-9a-f]{2}){32,100}")
_TOPIC = re.compile(r"[A-Za-z0-9][A-Za-z0-9.\-_]{0,254}")
_OS_VERSION = re.compile(r"[0-9]{1,4}(?:\.[0-9]{1,4}){0,3}")  # ASCII digits only
_APP_VERSION = re.compile(r"[0-9A-Za-z][0-9A-Za-z.+\-_ ()]{0,31}")
_LOCALE = re.compile(r"[A-Za-z]{2,3}(?:[_\-][A-Za-z0-9]{2,8})*")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}")  # categories, event kinds, attributes
_MAX_LIST: Final = 100
_MAX_ATTRIBUTES_BYTES: Final = 16 * 1024
_SQL_CHUNK: Final = 500


class InvalidField(ValueError):
    """A registration field is missing or malformed; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


@dataclass(frozen=True, slots=True)
class Permissions:
    alert: bool = True  # alert / foreground presentation
    background: bool = True  # background (content-available) pushes
    categories_allowed: tuple[str, ...] | None = None  # None: every category
    categories_refused: tuple[str, ...] = ()

    def permits(self, push_type: str, category: str | None = None) -> bool:
        """May a push of this APNs push type and notification category be sent?"""
        if push_type == "background" and not self.background:
            return False
        if push_type == "alert" and not self.alert:
            return False
        if category is not None:
            if category in self.categories_refused:
                return False
            if self.categories_allowed is not None and category not in self.categories_allowed:
                return False
        return True


@dataclass(frozen=True, slots=True)
class Consent:
    events: bool = False  # may the user's app events be analysed at all
    event_kinds: tuple[str, ...] = ()  # which kinds

    def allows(self, kind: str) -> bool:
        return self.events and kind in self.event_kinds


@dataclass(frozen=True, slots=True)
class Registration:
    device_id: str
    token: str  # hex APNs device token
    environment: str  # "production" | "sandbox"
    topic: str  # bundle id
    model: str
    os_version: str
    app_version: str
    locale: str
    time_zone: str  # IANA name
    user_id: str
    contact_ids: tuple[str, ...] = ()
    attributes: Mapping[str, Any] = field(default_factory=dict)
    permissions: Permissions = Permissions()
    consent: Consent = Consent()


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    device_id: str
    token: str
    environment: str
    topic: str
    model: str
    os_version: str
    app_version: str
    locale: str
    time_zone: str
    user_id: str
    contact_ids: tuple[str, ...]
    attributes: Mapping[str, Any]
    permissions: Permissions
    consent: Consent
    registered_at_ms: int  # first registration
    updated_at_ms: int  # latest registration
    token_updated_at_ms: int
    previous_token: str | None = None
    previous_user_id: str | None = None
    user_changed_at_ms: int | None = None
    retired_at_ms: int | None = None  # APNs's timestamp when the token was declared dead

    @property
    def active(self) -> bool:
        return self.retired_at_ms is None

    def fields(self) -> dict[str, Any]:
        """The flat view classification rules read (``actors.rules``). No token in it."""
        flat: dict[str, Any] = {
            "device.id": self.device_id,
            "device.model": self.model,
            "device.os_version": self.os_version,
            "device.app_version": self.app_version,
            "device.locale": self.locale,
            "device.time_zone": self.time_zone,
            "device.environment": self.environment,
            "device.topic": self.topic,
            "user.id": self.user_id,
            "user.contact_ids": list(self.contact_ids),
            "permissions.alert": self.permissions.alert,
            "permissions.background": self.permissions.background,
            "permissions.categories_allowed": (
                None
                if self.permissions.categories_allowed is None
                else list(self.permissions.categories_allowed)
            ),
            "permissions.categories_refused": list(self.permissions.categories_refused),
            "consent.events": self.consent.events,
            "consent.event_kinds": list(self.consent.event_kinds),
        }
        for name, value in self.attributes.items():
            flat[f"user.attributes.{name}"] = value
        return flat


@dataclass(frozen=True, slots=True)
class Registered:
    record: DeviceRecord
    change: Change  # "stale": older than what is stored, ignored
    token_rotated: bool = False
    user_changed: bool = False
    revived: bool = False


# -- validation ----------------------------------------------------------------------------


@cache
def _time_zones() -> frozenset[str]:
    # Not "localtime" (the server's own zone) nor "Factory": no place a device can be in.
    return (frozenset(zoneinfo.available_timezones()) | {"UTC"}) - {"localtime", "Factory", "posixrules"}


def _text(
    name: str,
    value: object,
    pattern: re.Pattern[str] | None = None,
    *,
    limit: int = 128,
    secret: bool = False,
) -> str:
    """``secret``: the value is never repeated in the error (a device token)."""
    if not isinstance(value, str) or not value:
        raise InvalidField(name, "must be a non-empty string")
    if len(value) > limit:
        raise InvalidField(name, f"longer than {limit} characters")
    if pattern is not None and not pattern.fullmatch(value):
        shown = f"{len(value)} characters" if secret else repr(value[:40])
        raise InvalidField(name, f"malformed: {shown}")
    if not value.isprintable() or value != value.strip():
        raise InvalidField(name, "must be printable, without surrounding spaces")
    return value


def _names(name: str, values: object, pattern: re.Pattern[str] = _NAME) -> tuple[str, ...]:
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise InvalidField(name, "must be a list of strings")
    if len(values) > _MAX_LIST:
        raise InvalidField(name, f"more than {_MAX_LIST} entries")
    checked = [_text(f"{name}[{i}]", v, pattern, limit=256) for i, v in enumerate(values)]
    return tuple(dict.fromkeys(checked))


def _scalar(name: str, value: object) -> bool:
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidField(name, "must be a finite number")
        return True
    return value is None or isinstance(value, str | int | bool)


def _attributes(values: object) -> dict[str, Any]:
    if not isinstance(values, Mapping):
        raise InvalidField("attributes", "must be a mapping")
    checked: dict[str, Any] = {}
    for key, value in values.items():
        if not isinstance(key, str) or not _NAME.fullmatch(key):
            raise InvalidField("attributes", f"bad attribute name {str(key)[:40]!r}")
        where = f"attributes.{key}"
        if isinstance(value, list | tuple):
            if not all(_scalar(where, v) for v in value):
                raise InvalidField(where, "list items must be strings, numbers, booleans or null")
            value = list(value)
        elif not _scalar(where, value):
            raise InvalidField(where, "must be a string, number, boolean, null or list of those")
        checked[key] = value
    # Bytes as UTF-8 (the escaped form would count an emoji as 12).
    if len(json.dumps(checked, separators=(",", ":"), ensure_ascii=False).encode()) > _MAX_ATTRIBUTES_BYTES:
        raise InvalidField("attributes", f"larger than {_MAX_ATTRIBUTES_BYTES} bytes")
    return checked


def validate(reg: Registration) -> Registration:
    """Check every field; return the normalised registration (token lower-cased)."""
    token = reg.token.lower() if isinstance(reg.token, str) else reg.token
    if not isinstance(reg.environment, str) or reg.environment not in ENVIRONMENTS:
        raise InvalidField("environment", "must be 'production' or 'sandbox'")
    time_zone = _text("time_zone", reg.time_zone, limit=64)
    if time_zone not in _time_zones():
        raise InvalidField("time_zone", f"unknown IANA time zone {time_zone!r}")
    perms, consent = reg.permissions, reg.consent
    if not isinstance(perms.alert, bool) or not isinstance(perms.background, bool):
        raise InvalidField("permissions", "alert and background must be booleans")
    if not isinstance(consent.events, bool):
        raise InvalidField("consent.events", "must be a boolean")
    return Registration(
        device_id=_text("device_id", reg.device_id, _DEVICE_ID),
        token=_text("token", token, _TOKEN, limit=200, secret=True),
        environment=reg.environment,
        topic=_text("topic", reg.topic, _TOPIC, limit=255),
        model=_text("model", reg.model, limit=64),
        os_version=_text("os_version", reg.os_version, _OS_VERSION, limit=32),
        app_version=_text("app_version", reg.app_version, _APP_VERSION, limit=32),
        locale=_text("locale", reg.locale, _LOCALE, limit=35),
        time_zone=time_zone,
        user_id=_text("user_id", reg.user_id),
        contact_ids=_names("contact_ids", reg.contact_ids, re.compile(r"\S+")),
        attributes=_attributes(reg.attributes),
        permissions=Permissions(
            alert=perms.alert,
            background=perms.background,
            categories_allowed=(
                None
                if perms.categories_allowed is None
                else _names("permissions.categories_allowed", perms.categories_allowed)
            ),
            categories_refused=_names("permissions.categories_refused", perms.categories_refused),
        ),
        consent=Consent(
            events=consent.events,
            event_kinds=_names("consent.event_kinds", consent.event_kinds),
        ),
    )


# -- rows ------------------------------------------------------------------------------------


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


# Explicit columns, in the order _record unpacks them.
_SELECT: Final = """
    SELECT d.device_id, d.token, d.environment, d.topic, d.model, d.os_version,
        d.app_version, d.locale, d.time_zone, d.user_id, d.previous_user_id,
        d.user_changed_at_ms, d.alert, d.background, d.categories_allowed,
        d.categories_refused, d.previous_token, d.token_updated_at_ms, d.retired_at_ms,
        d.registered_at_ms, d.updated_at_ms,
        u.contact_ids, u.attributes, u.consent_events, u.consent_event_kinds
    FROM devices AS d JOIN users AS u ON u.user_id = d.user_id
"""


# Building a record is on every send's path (a node verifies each item against it) and
# every fan-out page's: 50 us a row with a json.loads per list column and new permission
# and consent objects each time. Most devices share their permissions and consent, so
# short ones (at most _SHARED_TEXT characters of lists) are built once and shared
# (immutable; at most _SHARED_ENTRIES of each kept). Contact ids are per user: parsed
# per record, never kept.
_SHARED_TEXT: Final = 256
_SHARED_ENTRIES: Final = 1024


def _strings(text: str) -> tuple[str, ...]:
    return () if text == "[]" else tuple(json.loads(text))


def _permissions(alert: int, background: int, allowed: str, refused: str) -> Permissions:
    return Permissions(
        alert=bool(alert),
        background=bool(background),
        categories_allowed=None if allowed == "null" else _strings(allowed),
        categories_refused=_strings(refused),
    )


def _consent(events: int, kinds: str) -> Consent:
    return Consent(events=bool(events), event_kinds=_strings(kinds))


_shared_permissions = lru_cache(maxsize=_SHARED_ENTRIES)(_permissions)
_shared_consent = lru_cache(maxsize=_SHARED_ENTRIES)(_consent)


def _record(row: Sequence[Any]) -> DeviceRecord:
    (
        device_id, token, environment, topic, model, os_version, app_version, locale,
        time_zone, user_id, previous_user_id, user_changed_at_ms, alert, background,
        allowed, refused, previous_token, token_updated_at_ms, retired_at_ms,
        registered_at_ms, updated_at_ms, contact_ids, attributes, consent_events,
        consent_event_kinds,
    ) = row  # fmt: skip
    shared = len(allowed) + len(refused) + len(consent_event_kinds) <= _SHARED_TEXT
    return DeviceRecord(
        device_id=device_id,
        token=token,
        environment=environment,
        topic=topic,
        model=model,
        os_version=os_version,
        app_version=app_version,
        locale=locale,
        time_zone=time_zone,
        user_id=user_id,
        contact_ids=_strings(contact_ids),
        attributes={} if attributes == "{}" else json.loads(attributes),
        permissions=(_shared_permissions if shared else _permissions)(alert, background, allowed, refused),
        consent=(_shared_consent if shared else _consent)(consent_events, consent_event_kinds),
        registered_at_ms=registered_at_ms,
        updated_at_ms=updated_at_ms,
        token_updated_at_ms=token_updated_at_ms,
        previous_token=previous_token,
        previous_user_id=previous_user_id,
        user_changed_at_ms=user_changed_at_ms,
        retired_at_ms=retired_at_ms,
    )


def _get(conn: sqlite3.Connection, device_id: str) -> DeviceRecord | None:
    row = conn.execute(_SELECT + " WHERE d.device_id = ?", (device_id,)).fetchone()
    return None if row is None else _record(row)


def _chunked(values: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for value in values:
        chunk.append(value)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class Registry:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def register(self, registration: Registration, *, now_ms: int) -> Registered:
        """Store or update a device and its user; raises :class:`InvalidField`."""
        reg = validate(registration)
        return await self.store.transaction(lambda conn: self.register_in(conn, reg, now_ms))

    async def register_many(
        self, registrations: Sequence[Registration], *, now_ms: int
    ) -> list[Registered]:
        """Register a batch in one transaction (bulk imports); all valid or none stored."""
        regs = [validate(r) for r in registrations]
        return await self.store.transaction(
            lambda conn: [self.register_in(conn, reg, now_ms) for reg in regs]
        )

    @staticmethod
    def register_in(conn: sqlite3.Connection, reg: Registration, now_ms: int) -> Registered:
        """:meth:`register` inside the caller's transaction; ``reg`` already validated."""
        old = _get(conn, reg.device_id)
        if old is not None and now_ms < old.updated_at_ms:
            return Registered(old, "stale")
        retired = conn.execute(
            "SELECT retired_at_ms FROM retired_tokens WHERE token = ?", (reg.token,)
        ).fetchone()
        retired_at = None
        if retired is not None:
            if now_ms <= retired["retired_at_ms"]:
                retired_at = retired["retired_at_ms"]  # registered before APNs said dead
            else:
                conn.execute("DELETE FROM retired_tokens WHERE token = ?", (reg.token,))
        # A token belongs to one device: a reinstall under a new device id takes it over.
        conn.execute(
            "DELETE FROM devices WHERE token = ? AND device_id != ?", (reg.token, reg.device_id)
        )
        conn.execute(
            """INSERT INTO users (user_id, contact_ids, attributes, consent_events,
                   consent_event_kinds, updated_at_ms) VALUES (?, ?, ?, ?, ?, ?)
               ON CONFLICT (user_id) DO UPDATE SET contact_ids = excluded.contact_ids,
                   attributes = excluded.attributes, consent_events = excluded.consent_events,
                   consent_event_kinds = excluded.consent_event_kinds,
                   updated_at_ms = excluded.updated_at_ms
               WHERE excluded.updated_at_ms >= users.updated_at_ms""",
            (
                reg.user_id,
                _dumps(list(reg.contact_ids)),
                _dumps(dict(reg.attributes)),
                reg.consent.events,
                _dumps(list(reg.consent.event_kinds)),
                now_ms,
            ),
        )
        token_rotated = old is not None and old.token != reg.token
        user_changed = old is not None and old.user_id != reg.user_id
        if old is None:
            previous_token, token_at = None, now_ms
            previous_user, user_changed_at = None, None
        else:
            previous_token = old.token if token_rotated else old.previous_token
            token_at = now_ms if token_rotated else old.token_updated_at_ms
            previous_user = old.user_id if user_changed else old.previous_user_id
            user_changed_at = now_ms if user_changed else old.user_changed_at_ms
        perms = reg.permissions
        allowed = None if perms.categories_allowed is None else list(perms.categories_allowed)
        conn.execute(
            """INSERT INTO devices (device_id, token, environment, topic, model, os_version,
                   app_version, locale, time_zone, user_id, previous_user_id,
                   user_changed_at_ms, alert, background, categories_allowed,
                   categories_refused, previous_token, token_updated_at_ms, retired_at_ms,
                   registered_at_ms, updated_at_ms)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT (device_id) DO UPDATE SET token = excluded.token,
                   environment = excluded.environment, topic = excluded.topic,
                   model = excluded.model, os_version = excluded.os_version,
                   app_version = excluded.app_version, locale = excluded.locale,
                   time_zone = excluded.time_zone, user_id = excluded.user_id,
                   previous_user_id = excluded.previous_user_id,
                   user_changed_at_ms = excluded.user_changed_at_ms,
                   alert = excluded.alert, background = excluded.background,
                   categories_allowed = excluded.categories_allowed,
                   categories_refused = excluded.categories_refused,
                   previous_token = excluded.previous_token,
                   token_updated_at_ms = excluded.token_updated_at_ms,
                   retired_at_ms = excluded.retired_at_ms,
                   updated_at_ms = excluded.updated_at_ms""",
            (
                reg.device_id,
                reg.token,
                reg.environment,
                reg.topic,
                reg.model,
                reg.os_version,
                reg.app_version,
                reg.locale,
                reg.time_zone,
                reg.user_id,
                previous_user,
                user_changed_at,
                perms.alert,
                perms.background,
                _dumps(allowed),
                _dumps(list(perms.categories_refused)),
                previous_token,
                token_at,
                retired_at,
                now_ms if old is None else old.registered_at_ms,
                now_ms,
            ),
        )
        record = _get(conn, reg.device_id)
        assert record is not None
        return Registered(
            record,
            "registered" if old is None else "updated",
            token_rotated=token_rotated,
            user_changed=user_changed,
            revived=old is not None and not old.active and record.active,
        )

    async def retire_token(self, token: str, at_ms: int) -> int:
        """APNs declared ``token`` dead at ``at_ms``: retire the device holding it unless it
        registered after that. Returns how many devices were retired (0 or 1)."""
        return await self.store.transaction(lambda conn: self.retire_token_in(conn, token, at_ms))

    @staticmethod
    def retire_token_in(conn: sqlite3.Connection, token: str, at_ms: int) -> int:
        """:meth:`retire_token` inside the caller's transaction."""
        token = token.lower()
        conn.execute(
            """INSERT INTO retired_tokens (token, retired_at_ms) VALUES (?, ?)
               ON CONFLICT (token) DO UPDATE
               SET retired_at_ms = max(retired_at_ms, excluded.retired_at_ms)""",
            (token, at_ms),
        )
        return conn.execute(
            """UPDATE devices SET retired_at_ms = ?
               WHERE token = ? AND updated_at_ms <= ? AND retired_at_ms IS NULL""",
            (at_ms, token, at_ms),
        ).rowcount

    async def unregister(self, device_id: str) -> bool:
        """Forget a device (its user stays). Returns whether it was there."""
        return await self.store.execute("DELETE FROM devices WHERE device_id = ?", (device_id,)) > 0

    async def get(self, device_id: str) -> DeviceRecord | None:
        return await self.store.read(lambda conn: _get(conn, device_id))

    async def get_many(self, device_ids: Iterable[str]) -> dict[str, DeviceRecord]:
        """The records of those device ids that are registered, by device id."""
        ids = list(device_ids)  # consumed here, not in the database thread
        return await self.store.read(lambda conn: self.records_in(conn, ids))

    @staticmethod
    def records_in(conn: sqlite3.Connection, device_ids: Iterable[str]) -> dict[str, DeviceRecord]:
        """:meth:`get_many` inside the caller's transaction (or snapshot)."""
        found: dict[str, DeviceRecord] = {}
        for chunk in _chunked(dict.fromkeys(device_ids), _SQL_CHUNK):
            marks = ",".join("?" * len(chunk))
            for row in conn.execute(_SELECT + f" WHERE d.device_id IN ({marks})", chunk):
                found[row["device_id"]] = _record(row)
        return found

    @staticmethod
    def devices_of_users_in(
        conn: sqlite3.Connection, user_ids: Iterable[str], *, topic: str
    ) -> list[DeviceRecord]:
        """The active devices of ``topic`` of those users, by device id (for small targets;
        :meth:`targets` streams large ones)."""
        records: list[DeviceRecord] = []
        for chunk in _chunked(dict.fromkeys(user_ids), _SQL_CHUNK):
            marks = ",".join("?" * len(chunk))
            records += [
                _record(row)
                for row in conn.execute(
                    _SELECT + f" WHERE d.user_id IN ({marks}) AND d.topic = ? "
                    "AND d.retired_at_ms IS NULL ORDER BY d.device_id",
                    [*chunk, topic],
                )
            ]
        records.sort(key=lambda r: r.device_id)
        return records

    async def targets(
        self,
        *,
        device_ids: Iterable[str] | None = None,
        user_ids: Iterable[str] | None = None,
        topic: str | None = None,
        where: Callable[[DeviceRecord], bool] | None = None,
        include_retired: bool = False,
        batch: int = 1000,
    ) -> AsyncIterator[list[DeviceRecord]]:
        """Stream the devices of a push target in batches of at most ``batch``.

        By ``device_ids``, by ``user_ids`` (all their devices), or everyone when neither
        is given; optionally only one ``topic``; ``where`` filters each batch (attribute
        rules). Id iterables are consumed lazily, ``batch`` ids at a time. Retired
        devices are left out unless ``include_retired``.
        """
        if device_ids is not None and user_ids is not None:
            raise ValueError("give device_ids or user_ids, not both")
        if batch < 1:
            raise ValueError("batch must be >= 1")
        conditions = ["d.device_id > :after"]
        params: dict[str, Any] = {}
        if topic is not None:
            conditions.append("d.topic = :topic")
            params["topic"] = topic
        if not include_retired:
            conditions.append("d.retired_at_ms IS NULL")

        def query(extra: str) -> str:
            clauses = " AND ".join([*conditions, extra] if extra else conditions)
            return f"{_SELECT} WHERE {clauses} ORDER BY d.device_id LIMIT :limit"

        async def pages(sql: str, values: dict[str, Any]) -> AsyncIterator[list[DeviceRecord]]:
            async for rows in self.store.iterate(
                sql, values, key="device_id", start="", batch=batch
            ):
                records = [_record(r) for r in rows]
                if where is not None:
                    records = [r for r in records if where(r)]
                if records:
                    yield records

        if device_ids is None and user_ids is None:
            async for records in pages(query(""), params):
                yield records
            return
        column = "d.device_id" if device_ids is not None else "d.user_id"
        ids = device_ids if device_ids is not None else user_ids
        assert ids is not None
        for chunk in _chunked(ids, min(batch, _SQL_CHUNK)):
            names = {f"id{i}": value for i, value in enumerate(chunk)}
            marks = ",".join(f":{name}" for name in names)
            async for records in pages(query(f"{column} IN ({marks})"), {**params, **names}):
                yield records
