"""Central: accepts pushes, resolves and classifies the audience, applies permissions,
seals an identification code for every (message, device), and writes the pre-push
messages to the durable queue.

Acceptance is atomic: a push is validated whole (any bad field is refused with its
name), then its message row — notification, target, priority, expiration, follow-up —
is written in one transaction, and only then is the message id returned. The fan-out
(resolve → classify → permission check → seal → enqueue) streams over the registry in
batches and is resumable: every message whose fan-out has not been marked done is
fanned out again when central starts, and enqueueing is idempotent per (message,
device), so a crash in the middle neither loses nor doubles a device.

Small targets (listed device or user ids) are fanned out before the reply, so a
single-device push is in the queue the moment it is acknowledged; broad targets
(classes, filters, everyone) fan out in central's background task, one message at a
time, while central keeps accepting pushes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
import time
import uuid
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

import structlog
import trio

from actors.base import ActorContext, receive_within
from actors.followup import FollowUp, FollowUpError
from actors.idcode import IdCode
from actors.live import LiveRef
from actors.messages import Enqueued, Envelope, Handoff, PushAccepted, SubmitPush
from actors.queuestore import URGENT_PRIORITY, ItemRow, MessageRow, QueueStore
from actors.registry import DeviceRecord, Registry
from actors.rules import Rule, RuleError, compile_rule
from actors.storage import StorageTimeout
from actors.urgency import Urgency
from apns.payload import InvalidNotification, Notification, PushType

log = structlog.get_logger("actors.central")

MAX_LISTED_IDS = 10_000
CLASSIFY_SLICE = 50  # devices classified and sealed per turn of a fan-out (see apns READ_CHUNK)
SMALL_TARGET = 1_000  # listed ids up to this many are fanned out before the reply
ACCEPT_BATCH = 64  # pushes waiting in central's inbox stored together in one transaction
UNCLASSIFIED = "unclassified"  # the class id of a device no class rule matches
FANOUT_ATTEMPTS = 3  # a fan-out failing this often is given up (recorded), not retried forever


class Failed(RuntimeError):
    """A push that could not be accepted for a reason of pushd's own (not the input)."""


class NotAccepted(RuntimeError):
    """A push central did not take up (it is stopping): nothing was stored."""


async def refuse_waiting(inbox: trio.MemoryReceiveChannel[Envelope]) -> int:
    """Answer every push waiting in ``inbox`` as not accepted (pushd is shutting down);
    returns how many."""
    answered = 0
    while True:
        try:
            envelope = inbox.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            return answered
        await envelope.answer(NotAccepted("pushd is shutting down"))
        answered += 1


MAX_TTL = 30 * 86_400  # APNs stores a notification for at most 30 days


class Rejected(ValueError):
    """A push refused as a whole; ``field`` names the offending argument."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


@dataclass(frozen=True)
class Target:
    """Who a push is for: exactly one of devices, users, classes, filter, everyone."""

    devices: tuple[str, ...] | None = None
    users: tuple[str, ...] | None = None
    classes: tuple[str, ...] | None = None
    filter: Any = None  # the rule spec as given (compiled on use)
    everyone: bool = False

    @classmethod
    def parse(cls, spec: Any, known_classes: set[str]) -> Target:
        if not isinstance(spec, Mapping) or not spec:
            raise Rejected(
                "target", "must be a map with one of devices, users, classes, filter, all"
            )
        keys = set(spec)
        unknown = keys - {"devices", "users", "classes", "filter", "all"}
        if unknown:
            raise Rejected(f"target.{sorted(unknown)[0]}", "unknown target kind")
        if len(keys) != 1:
            raise Rejected("target", "give exactly one of devices, users, classes, filter, all")
        (kind,) = keys
        value = spec[kind]
        if kind == "all":
            if value is not True:
                raise Rejected("target.all", "must be true")
            return cls(everyone=True)
        if kind == "filter":
            try:
                compile_rule(value, "target.filter")
            except RuleError as exc:
                raise Rejected(exc.path, exc.message) from None
            return cls(filter=value)
        if (
            not isinstance(value, list)
            or not value
            or not all(isinstance(v, str) and v for v in value)
        ):
            raise Rejected(f"target.{kind}", "must be a non-empty list of strings")
        if len(value) > MAX_LISTED_IDS:
            raise Rejected(f"target.{kind}", f"at most {MAX_LISTED_IDS} ids; use a class or filter")
        ids = tuple(dict.fromkeys(value))
        if kind == "classes":
            missing = [c for c in ids if c not in known_classes]
            if missing:
                raise Rejected("target.classes", f"unknown class {missing[0]!r}")
            return cls(classes=ids)
        return cls(devices=ids) if kind == "devices" else cls(users=ids)

    def to_dict(self) -> dict[str, Any]:
        if self.everyone:
            return {"all": True}
        if self.filter is not None:
            return {"filter": self.filter}
        for kind in ("devices", "users", "classes"):
            value = getattr(self, kind)
            if value is not None:
                return {kind: list(value)}
        raise AssertionError("empty target")

    @property
    def small(self) -> bool:
        listed = self.devices if self.devices is not None else self.users
        return listed is not None and len(listed) <= SMALL_TARGET


@dataclass(frozen=True)
class Verdict:
    """Whether a device may receive a message now, and if not, why."""

    class_id: str | None
    reason: str | None  # None: may be sent


def judge(
    record: DeviceRecord,
    *,
    classifier_classify: Any,
    push_type: str,
    category: str | None,
    target_classes: tuple[str, ...] | None = None,
    target_filter: Rule | None = None,
) -> Verdict:
    """Classify a device and check permissions (shared by central and the node's re-check)."""
    fields = record.fields()
    if target_filter is not None and not target_filter.matches(fields):
        return Verdict(None, "not_targeted")
    class_id = classifier_classify(fields)
    if target_classes is not None and class_id not in target_classes:
        return Verdict(class_id, "not_targeted")
    if not record.active:
        return Verdict(class_id, "token_retired")
    if not record.permissions.permits(push_type, category):
        if push_type == "background" and not record.permissions.background:
            return Verdict(class_id, "no_background_permission")
        if push_type == "alert" and not record.permissions.alert:
            return Verdict(class_id, "no_alert_permission")
        return Verdict(class_id, "category_refused")
    return Verdict(class_id, None)


def category_of(notification: Mapping[str, Any], explicit: str | None) -> str | None:
    if explicit is not None:
        return explicit
    aps = notification.get("aps")
    if isinstance(aps, Mapping):
        value = aps.get("category")
        if isinstance(value, str):
            return value
    return None


class CentralActor:
    def __init__(
        self,
        ctx: ActorContext,
        *,
        inbox: trio.MemoryReceiveChannel[Envelope],
        queue_notes: trio.MemorySendChannel[Enqueued],
        registry: Registry,
        queue: QueueStore,
        live: LiveRef,
        handoffs: list[trio.MemorySendChannel[Handoff | None]] | None = None,
        node_names: list[str] | None = None,
        urgency: Urgency | None = None,
    ) -> None:
        self.ctx = ctx
        self.inbox = inbox
        self.queue_notes = queue_notes
        self.registry = registry
        self.queue = queue
        self.live = live
        # The nodes' express-lane inboxes and names (index = shard), shared with the
        # pipeline: an urgent push is leased to its node in the accepting transaction.
        self.handoffs = handoffs if handoffs is not None else []
        self.node_names = node_names if node_names is not None else []
        self.urgency = urgency if urgency is not None else Urgency()
        self._fanout_wanted = trio.Event()
        self._failures: dict[str, int] = {}  # message id -> failed fan-out attempts

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        async with self.inbox, self.queue_notes, trio.open_nursery() as nursery:
            nursery.start_soon(self._fanout_loop)
            task_status.started()
            while not self.ctx.stopping.is_set():
                self.ctx.heartbeat.beat()
                got, envelope = await receive_within(self.inbox, self.ctx.heartbeat.interval)
                if got:
                    assert envelope is not None
                    batch = [envelope]
                    while len(batch) < ACCEPT_BATCH:  # whatever else is waiting: one commit
                        try:
                            batch.append(self.inbox.receive_nowait())
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                    if len(batch) == 1:
                        await self._handle(envelope)
                    else:
                        await self._handle_many(batch)
            # Stopping: what is still in the inbox is not accepted, and its askers are told
            # so now (not left waiting for the end of the drain, to see their connection
            # closed and not know whether the push was stored). Senders that come later find
            # the inbox closed.
            await refuse_waiting(self.inbox)
            nursery.cancel_scope.cancel()

    # -- acceptance -------------------------------------------------------------------

    async def _handle(self, envelope: Envelope) -> None:
        """Answer every request exactly once — accepted, rejected or failed — and never
        let one bad request take central down."""
        msg = envelope.message
        if not isinstance(msg, SubmitPush):
            await envelope.answer(Rejected("op", f"central does not handle {msg.kind}"))
            return
        try:
            accepted = await self.accept(msg)
        except Rejected as exc:
            await envelope.answer(exc)
            return
        except StorageTimeout as exc:
            await self._answer_timeout(envelope, exc)
            return
        except Exception as exc:
            log.exception("push could not be accepted")
            await envelope.answer(Failed(f"{type(exc).__name__}: {exc}"))
            return
        await envelope.answer(accepted)

    async def _answer_timeout(self, envelope: Envelope, exc: StorageTimeout) -> None:
        log.error("push store timed out", error=str(exc), handed_over=exc.handed_over)
        if not exc.handed_over:  # never started: a retry cannot double anything
            await envelope.answer(Failed(f"storage is overloaded; the push was not accepted: {exc}"))
            return
        # The write still completes (all or nothing) but we cannot tell which: do not
        # invite a blind retry that could double the notification. (Its urgent items, if it
        # commits, were leased for a hand-off that never came: the sweep hands them out
        # again when the lease runs out.)
        await envelope.answer(
            Failed(f"storage did not confirm in time; the push may have been accepted: {exc}")
        )

    async def _handle_many(self, envelopes: list[Envelope]) -> None:
        """A burst of pushes: the small ones are stored together in one transaction; a
        broad one, or a burst that fails as a whole, falls back to one at a time."""
        small: list[tuple[Envelope, MessageRow, Target]] = []
        for envelope in envelopes:
            msg = envelope.message
            if not isinstance(msg, SubmitPush):
                await self._handle(envelope)
                continue
            try:
                row, target = self._validate(msg)
            except Rejected as exc:
                await envelope.answer(exc)
                continue
            except Exception:
                await self._handle(envelope)  # answers it as a failure, with the log
                continue
            if target.small:
                small.append((envelope, row, target))
            else:
                await self._handle(envelope)
        if not small:
            return
        try:
            prepared, handed = await self._store_small([(row, target) for _, row, target in small])
        except StorageTimeout as exc:
            # Not a failure of one push: retrying them one at a time could store twice
            # what the timed-out write still commits. Each gets the timeout's answer.
            for envelope, _, _ in small:
                await self._answer_timeout(envelope, exc)
            return
        except Exception:
            log.exception("batched accept failed; accepting one at a time")
            for envelope, _, _ in small:
                await self._handle(envelope)
            return
        for (envelope, _, _), (row, items, shards, sendable) in zip(small, prepared, strict=True):
            self._note(shards, sendable, row.priority, handed)
            log.info(
                "push accepted",
                message_id=row.message_id,
                targeted=len(items),
                priority=row.priority,
            )
            await envelope.answer(PushAccepted(message_id=row.message_id, targeted=len(items)))

    async def accept(self, msg: SubmitPush) -> PushAccepted:
        """Validate and store a push durably. Small targets are fanned out in the same
        transaction; broad ones are stored with their target and fanned out in the
        background (the reply then counts the candidates of that app)."""
        row, target = self._validate(msg)
        if target.small:
            accepted = await self.accept_small(row, target)
        else:
            targeted = await self._count(target, row.notification["topic"])
            await self.queue.create_message(dataclasses.replace(row, audience=targeted), line="urgent")
            self._schedule()
            accepted = PushAccepted(message_id=row.message_id, targeted=targeted)
        log.info(
            "push accepted",
            message_id=row.message_id,
            targeted=accepted.targeted,
            priority=row.priority,
            target=next(iter(row.target)),
        )
        return accepted

    def _validate(self, msg: SubmitPush) -> tuple[MessageRow, Target]:
        live = self.live.current
        notification_in = dict(msg.notification)
        try:
            notification = Notification.from_dict(notification_in)
            notification.encode()  # size limits and header rules, before anything is stored
        except InvalidNotification as exc:
            raise Rejected(f"notification.{exc.field}", exc.message) from None
        target = Target.parse(msg.target, {c.id for c in live.classifier.classes})
        if not isinstance(msg.priority, int) or not 0 <= msg.priority <= 10:
            raise Rejected("priority", "must be an integer from 0 to 10")
        now = time.time()
        if msg.expiration is not None and msg.ttl is not None:
            raise Rejected("ttl", "give ttl or expiration, not both")
        if msg.expiration is not None:
            if msg.expiration <= now:
                raise Rejected("expiration", "is in the past")
            if msg.expiration > now + MAX_TTL:
                raise Rejected(
                    "expiration", "is more than 30 days ahead (APNs stores at most 30 days)"
                )
            expiration = float(msg.expiration)
        elif msg.ttl is not None:
            if not 0 < msg.ttl <= MAX_TTL:
                raise Rejected(
                    "ttl", f"must be more than 0 and at most {MAX_TTL} seconds (30 days)"
                )
            expiration = now + msg.ttl
        else:
            expiration = now + live.default_ttl
        if notification.expiration:  # its own apns-expiration (0: APNs tries once, stores nothing)
            if notification.expiration <= now:
                raise Rejected("notification.expiration", "is in the past")
            # The queue gives up on it no later than APNs would: never sent after it.
            expiration = min(expiration, float(notification.expiration))
        message_id = str(uuid.uuid4())
        stored = notification.to_dict()
        if notification.collapse_id is None and notification.push_type is not PushType.LIVEACTIVITY:
            # The message id as default collapse id: a device shows a duplicate once.
            stored["collapse_id"] = message_id
        if notification.expiration is None:
            stored["expiration"] = int(expiration)
        meta: dict[str, Any] = {"category": category_of(stored, msg.category)}
        absolute = [float(t) for t in (msg.expiration, notification.expiration) if t]
        if absolute:
            # An absolute deadline the client set (not a ttl): no re-push goes out after it.
            meta["until"] = min(absolute)
        if msg.follow_up is not None:
            try:
                follow_up = FollowUp.parse(
                    msg.follow_up,
                    default_deadline=live.default_deadline,
                    default_max=live.max_repushes,
                )
            except FollowUpError as exc:
                raise Rejected(exc.field, exc.message) from None
            reminder = follow_up.reminder
            if reminder is not None:
                # A reminder is checked against the permissions of the original push, so it
                # must be the same kind of push: same topic, push type and category.
                if reminder.get("topic") != notification.topic:
                    raise Rejected("follow_up.reminder.topic", "must be the push's topic")
                if reminder.get("push_type", "alert") != str(notification.push_type):
                    raise Rejected("follow_up.reminder.push_type", "must be the push's push type")
                reminder_category = category_of(reminder, None)
                if reminder_category is not None and reminder_category != meta["category"]:
                    raise Rejected(
                        "follow_up.reminder.aps.category", "must be the push's category (or absent)"
                    )
            meta["follow_up"] = follow_up.to_dict()
        if msg.parent_id is not None:
            meta["parent_id"] = msg.parent_id
        row = MessageRow(
            message_id=message_id,
            notification=stored,
            priority=msg.priority,
            push_type=str(notification.push_type),
            created_at=now,
            audience=0,
            target=target.to_dict(),
            expiration=expiration,
            collapse_id=stored.get("collapse_id"),
            meta=meta,
        )
        return row, target

    async def _count(self, target: Target, topic: str) -> int:
        if target.devices is not None or target.users is not None:
            column = "device_id" if target.devices is not None else "user_id"
            ids = list(target.devices or target.users or ())
            total = 0
            for i in range(0, len(ids), 500):
                chunk = ids[i : i + 500]
                row = await self.queue.store.fetchone(  # an accept: skips bulk work
                    f"SELECT count(*) FROM devices WHERE topic = ? AND retired_at_ms IS NULL "
                    f"AND {column} IN ({','.join('?' * len(chunk))})",
                    [topic, *chunk],
                    line="urgent",
                )
                total += row[0] if row else 0
            return total
        # Broad targets: the candidates (devices of the app); the fan-out narrows them
        # down by class or filter, and `message` reports exact per-device outcomes.
        row = await self.queue.store.fetchone(  # an accept: skips bulk work
            "SELECT count(*) FROM devices WHERE topic = ? AND retired_at_ms IS NULL", (topic,), line="urgent"
        )
        return row[0] if row else 0

    # -- fan-out ----------------------------------------------------------------------

    def _schedule(self) -> None:
        """A broad fan-out is waiting in the store (``fanout_done = 0``)."""
        self._fanout_wanted.set()

    async def _fanout_loop(self) -> None:
        """Fan out, oldest first, every message the store says is not fanned out yet —
        after a crash as well as after an accept: the store is the work list."""
        while True:
            self._fanout_wanted = trio.Event()  # before the query: no wake-up is missed
            row = await self.queue.store.fetchone(
                "SELECT message_id FROM messages WHERE fanout_done = 0 ORDER BY created_at LIMIT 1"
            )
            if row is None:
                await self._fanout_wanted.wait()
                continue
            message_id = row[0]
            try:
                await self.fan_out(message_id)
                self._failures.pop(message_id, None)
            except Exception as exc:
                # One bad message must not take central down with it: it is tried again
                # (idempotent) a few times, then the failure is recorded and skipped.
                self._failures[message_id] = self._failures.get(message_id, 0) + 1
                log.exception(
                    "fan-out failed", message_id=message_id, attempt=self._failures[message_id]
                )
                if self._failures.get(message_id, 0) >= FANOUT_ATTEMPTS:
                    del self._failures[message_id]
                    await self.queue.store.execute(
                        "UPDATE messages SET fanout_done = -1 WHERE message_id = ?", (message_id,)
                    )
                    log.error(
                        "fan-out given up",
                        message_id=message_id,
                        error=f"{type(exc).__name__}: {exc}",
                    )

    def _items(
        self, message: MessageRow, spec: Target, batch: list[DeviceRecord]
    ) -> tuple[list[ItemRow], set[int], int]:
        """Classify, check and seal one batch of resolved devices: (items, shards with
        sendable items, how many are sendable). Devices that may not receive the message
        become skipped items with their reason; devices outside the target are dropped."""
        live = self.live.current
        target_filter = (
            compile_rule(spec.filter, "target.filter") if spec.filter is not None else None
        )
        category = message.meta.get("category")
        items: list[ItemRow] = []
        shards: set[int] = set()
        sendable = 0
        issued = int(time.time() * 1000)
        for record in batch:
            verdict = judge(
                record,
                classifier_classify=live.classifier.classify,
                push_type=message.push_type,
                category=category,
                target_classes=spec.classes,
                target_filter=target_filter,
            )
            if verdict.reason == "not_targeted":
                continue
            code = IdCode(
                message.message_id,
                record.device_id,
                record.user_id,
                verdict.class_id or UNCLASSIFIED,
                issued,
            )
            shard = live.shard_of(record.device_id, record.attributes)
            items.append(
                ItemRow(
                    device_id=record.device_id,
                    shard=shard,
                    idcode=live.codes.seal(code),
                    skip_reason=verdict.reason,
                )
            )
            if verdict.reason is None:
                shards.add(shard)
                sendable += 1
        return items, shards, sendable

    def _target_of(self, message: MessageRow) -> Target:
        known = {c.id for c in self.live.current.classifier.classes} | set(
            message.target.get("classes", [])
        )
        return Target.parse(message.target, known)

    async def _store_small(
        self, pushes: list[tuple[MessageRow, Target]]
    ) -> tuple[list[tuple[MessageRow, list[ItemRow], set[int], int]], set[int]]:
        """Resolve, classify and seal small targets and store them, messages and items, in
        ONE transaction (one trip to the database thread for a whole burst).

        Priority-10 items are also leased there, a lane-sized round per shard, to the
        node whose express lane has room, and handed to it in memory: an urgent push is
        on its way to APNs without a wake-up and a lease of its own. Returns the stored
        pushes and the shards whose urgent work was all handed over (no wake needed)."""
        now = time.time()
        live = self.live.current
        owners = self._handoff_owners(live.node_count)
        limit = max(1, live.node_batch // max(1, live.node_lanes))

        def write(
            conn: sqlite3.Connection,
        ) -> tuple[list[tuple[MessageRow, list[ItemRow], set[int], int]], dict[int, Handoff]]:
            prepared = []
            known: dict[str, DeviceRecord] = {}  # the records read now, for hand-offs
            for row, target in pushes:
                topic = row.notification["topic"]
                if target.devices is not None:
                    found = Registry.records_in(conn, target.devices)
                    records = [r for r in found.values() if r.topic == topic and r.active]
                else:
                    records = Registry.devices_of_users_in(conn, target.users or (), topic=topic)
                known.update((r.device_id, r) for r in records)
                items, shards, sendable = self._items(row, target, records)
                prepared.append(
                    (dataclasses.replace(row, audience=len(items)), items, shards, sendable)
                )
            self.queue.create_many_in(conn, [(row, items) for row, items, _, _ in prepared], now)
            urgent: dict[int, list[MessageRow]] = {}
            for row, _, shards, _ in prepared:
                if row.priority >= URGENT_PRIORITY:
                    for shard in shards & owners.keys():
                        urgent.setdefault(shard, []).append(row)
            handed = {}
            for shard, rows in sorted(urgent.items()):
                leased = self.queue.lease_new_in(
                    conn, rows, shard=shard, owner=owners[shard], limit=limit, now=time.time(),
                    lease_seconds=live.lease_seconds,
                )  # fmt: skip
                if leased:
                    handed[shard] = Handoff(leased, {i.device_id: known[i.device_id] for i in leased})
            return prepared, handed

        # Accepting is what a waiting client sees: it skips the line of bulk store work.
        prepared, handed = await self.queue.store.transaction(write, line="urgent")
        read_at = trio.current_time()  # the records were read in that transaction
        served = set()
        for shard, handoff in handed.items():
            handoff = dataclasses.replace(handoff, read_at=read_at)
            # The node may have been stopped (a reload shrank the nodes) while the
            # transaction ran: hand over only to a node still listed as running.
            running = shard < len(self.node_names) and self.node_names[shard] == owners[shard]
            if not (running and self._hand_over(shard, handoff)):
                log.warning("urgent items not handed over; back to the queue", shard=shard, items=len(handoff.items))
                await self.queue.unlease([item.item_id for item in handoff.items], owner=owners[shard])
                continue
            # Bulk work steps aside from now until the express lane has sent them (it
            # takes this count over); a node listed as running takes what is in its
            # inbox, also when it stops or restarts.
            self.urgency.add()
            if len(handoff.items) < limit:
                served.add(shard)  # nothing new and urgent left behind on that shard
        return prepared, served

    def _hand_over(self, shard: int, handoff: Handoff) -> bool:
        try:
            self.handoffs[shard].send_nowait(handoff)
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    def _handoff_owners(self, node_count: int) -> dict[int, str]:
        """Shards whose node can take a hand-off now -> that node's name (its lease owner).
        Central is the only sender of hand-offs and sends them one at a time, so a slot
        free now is still free after the transaction; the node's waker may add one kick."""
        if self.ctx.stopping.is_set():
            return {}
        owners = {}
        for shard in range(min(node_count, len(self.node_names), len(self.handoffs))):
            stats = self.handoffs[shard].statistics()
            if stats.max_buffer_size - stats.current_buffer_used >= 2:
                owners[shard] = self.node_names[shard]
        return owners

    async def accept_small(self, row: MessageRow, target: Target) -> PushAccepted:
        """Listed device or user ids: resolve, classify and store the message with all its
        items in one transaction, so it is in the queue the moment it is acknowledged."""
        ((row, items, shards, sendable),), handed = await self._store_small([(row, target)])
        self._note(shards, sendable, row.priority, handed)
        return PushAccepted(message_id=row.message_id, targeted=len(items))

    async def fan_out(self, message_id: str) -> int:
        """Resolve, classify, check and enqueue a message's audience in batches, streaming
        over the registry (resumable: enqueueing is idempotent per device). Returns the
        number of items written (sendable and skipped)."""
        message = await self.queue.get_message(message_id)
        if message is None:
            return 0
        spec = self._target_of(message)
        total = 0
        async for batch in self.registry.targets(
            device_ids=spec.devices,
            user_ids=spec.users,
            topic=message.notification["topic"],
            batch=self.live.current.store_batch,
        ):
            self.ctx.heartbeat.beat()
            items, shards, sendable = [], set(), 0
            for start in range(0, len(batch), CLASSIFY_SLICE):
                # Classifying and sealing is pure CPU: give other tasks (an urgent accept)
                # a turn between slices instead of holding the loop for a whole page,
                # and wait while an urgent push is on its way (actors.urgency).
                await self.urgency.step_aside()
                some, some_shards, some_sendable = self._items(message, spec, batch[start : start + CLASSIFY_SLICE])
                items += some
                shards |= some_shards
                sendable += some_sendable
            if not items:
                continue
            await self.queue.enqueue(message_id, items, now=time.time())
            total += len(items)
            if shards:
                self._note(shards, sendable, message.priority)
        await self.queue.store.execute(
            "UPDATE messages SET fanout_done = 1, audience = max(audience, ?) WHERE message_id = ?",
            (total, message_id),
        )
        log.info("fan-out done", message_id=message_id, items=total)
        return total

    def _note(
        self, shards: set[int], sendable: int, priority: int, handed: AbstractSet[int] = frozenset()
    ) -> None:
        # The queue's sweep and the nodes' polls find the work anyway; a hint may be dropped.
        urgent = priority >= URGENT_PRIORITY
        if urgent:
            shards = shards - handed  # already on their way: nothing for a woken lane
        if not shards:
            return
        note = Enqueued(shards=sorted(shards), count=sendable, urgent=urgent)
        with contextlib.suppress(trio.WouldBlock):
            self.queue_notes.send_nowait(note)
