"""Analyzer: after a notification is delivered, judges from the user's data — only what
the user authorised — whether they handled the matter, and re-pushes when they did not.

Inputs (its inbox): delivery records from the nodes and registry changes. App events
settle follow-ups where they are stored: ``report`` calls :func:`handle_event_in` in the
transaction that stores the event.

State lives in SQLite (``followups``, ``events``), so a million pending follow-ups cost
rows, not memory. One timer per actor: it sleeps until the earliest ``due_at`` of a
pending follow-up (or until a message arrives), never a task per follow-up.

At a deadline with no evidence: re-push by the follow-up's strategy, through the durable
queue (never a blocking send back to central):

* ``resend`` — the same notification (or the reminder) to the same device, new apns-id;
* ``regenerate`` — the original target re-resolved for that device on the latest
  registry data (class, filter, permissions); a device that no longer qualifies gets
  nothing, one that does gets a new message with a new identification code.

A re-push is a child message ``<root>.r<n>``: creating it and its item is idempotent,
so a restart in the middle of a firing neither loses nor doubles it. Follow-ups stop
when handled, at ``max_repushes`` (gave up), when the token dies, when the device is
unregistered, or when the permission or the consent is withdrawn — withdrawing consent
also deletes that user's stored events.

Follow-up states: ``pending`` (waiting for its deadline), ``waiting`` (re-push queued,
waiting for its delivery), ``handled``, ``gave_up``, ``stopped`` (with a reason).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import structlog
import trio

from actors.base import ActorContext, receive_within
from actors.central import Target, judge
from actors.followup import FollowUp
from actors.idcode import IdCode
from actors.live import LiveRef
from actors.messages import AppEvent, Delivered, Enqueued, RegistryChanged
from actors.queuestore import URGENT_PRIORITY, ItemRow, MessageRow, QueueStore
from actors.registry import DeviceRecord, Registry
from actors.rules import compile_rule

log = structlog.get_logger("actors.analyzer")

AnalyzerInput = Delivered | RegistryChanged
FIRE_BATCH = 200
RECONCILE_INTERVAL = 300.0  # seconds between sweeps for follow-ups stuck in 'waiting'
RECONCILE_BATCH = 1000  # follow-up rows per reconcile transaction
MIN_REPUSH_LIFE = 60.0  # seconds: the shortest time in the queue a re-push is given


@dataclass(frozen=True)
class Outcome:
    """A final outcome of one (message, device), as the node records it."""

    message: MessageRow
    device_id: str
    user_id: str
    class_id: str
    outcome: str  # "delivered", "token_dead", "skipped", ...
    reason: str | None
    at: float


INVALID = "invalid_follow_up"  # a stored spec this version no longer accepts (a stricter rule check)


def spec_of(meta: dict[str, Any] | bytes, cache: dict[Any, FollowUp | None], key: Any) -> FollowUp | None:
    """A root message's follow-up spec (``meta`` as stored, or its msgpack bytes), parsed
    once per ``key`` in ``cache``; None if it no longer parses: the follow-up is then
    stopped as :data:`INVALID` where it is met, instead of failing the registration, the
    report or the actor that met it."""
    if key in cache:
        return cache[key]
    try:
        fields = msgpack.unpackb(meta, raw=False) if isinstance(meta, bytes) else meta
        spec: FollowUp | None = FollowUp.parse(fields["follow_up"])
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("stored follow-up no longer valid", message_id=key, error=str(exc))
        spec = None
    cache[key] = spec
    return spec


def _stop_invalid(conn: sqlite3.Connection, root_id: str, device_id: str, now: float) -> bool:
    return end_followup_in(conn, root_id, device_id, "state = 'stopped', reason = ?", (INVALID,), INVALID, now)


def record_outcomes(conn: sqlite3.Connection, outcomes: Sequence[Outcome], now: float) -> None:
    """Create or advance the follow-ups of delivered messages, inside the caller's
    transaction. The node calls this *before* it acks the items: a crash in between
    leaves the items leased (sent again after restart) and this write idempotent, so a
    delivered notification with a follow-up never goes without its follow-up row."""
    specs: dict[Any, FollowUp | None] = {}  # parsed once per message, not once per device
    for o in outcomes:
        meta = o.message.meta
        if "follow_up" not in meta:
            continue
        root_id = meta.get("root_id", o.message.message_id)
        spec = spec_of(meta, specs, o.message.message_id)
        if spec is None:
            continue  # never parsed again: no follow-up from it
        if root_id == o.message.message_id:
            if o.outcome == "delivered":
                conn.execute(
                    """INSERT INTO followups (root_id, device_id, user_id, class_id, state, delivered_at,
                           last_delivered_at, due_at, updated_at)
                       VALUES (?, ?, ?, ?, 'pending', ?, ?, ?, ?)
                       ON CONFLICT (root_id, device_id) DO NOTHING""",
                    (root_id, o.device_id, o.user_id, o.class_id, o.at, o.at, o.at + spec.deadline, now),
                )
        # (Only the follow-up's current re-push moves it: a late record of an earlier one,
        # a duplicate after a restart, say, must not.)
        elif o.outcome == "delivered":
            conn.execute(
                """UPDATE followups SET state = 'pending', last_delivered_at = ?, due_at = ?, updated_at = ?,
                       repushes_sent = repushes_sent + 1
                   WHERE root_id = ? AND device_id = ? AND state = 'waiting' AND repushes = ?""",
                (o.at, o.at + spec.spacing, now, root_id, o.device_id, meta.get("repush")),
            )
        else:
            # The re-push was not delivered: a dead token, a withdrawn permission...
            conn.execute(
                """UPDATE followups SET state = 'stopped', reason = ?, due_at = NULL, updated_at = ?
                   WHERE root_id = ? AND device_id = ? AND state = 'waiting' AND repushes = ?""",
                (f"repush_{o.outcome}:{o.reason}", now, root_id, o.device_id, meta.get("repush")),
            )


class AnalyzerActor:
    def __init__(
        self,
        ctx: ActorContext,
        *,
        inbox: trio.MemoryReceiveChannel[AnalyzerInput],
        queue: QueueStore,
        registry: Registry,
        live: LiveRef,
        queue_notes: trio.MemorySendChannel[Enqueued] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ctx = ctx
        self.inbox = inbox
        self.queue = queue
        self.store = queue.store
        self.registry = registry
        self.live = live
        self.queue_notes = queue_notes
        self.clock = clock
        self._messages: OrderedDict[str, MessageRow | None] = OrderedDict()
        self._specs: dict[Any, FollowUp | None] = {}  # by root id (bounded like _messages)

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(self.inbox)
            if self.queue_notes is not None:
                await stack.enter_async_context(self.queue_notes)
            await self.reconcile(self.clock())
            task_status.started()
            next_reconcile = self.clock() + RECONCILE_INTERVAL
            while not self.ctx.stopping.is_set():
                self.ctx.heartbeat.beat()
                now = self.clock()
                if now >= next_reconcile:
                    await self.reconcile(now)
                    next_reconcile = now + RECONCILE_INTERVAL
                due = await self.next_due()
                if due is not None and due <= now:
                    await self.fire_due(now)
                    await self._drain_inbox()  # a long backlog of deadlines must not starve the inbox
                    continue
                wait = min(self.ctx.heartbeat.interval, next_reconcile - now)
                if due is not None:
                    wait = min(wait, due - now)
                got, message = await receive_within(self.inbox, wait)
                if got:
                    assert message is not None
                    await self.handle(message)

    async def _drain_inbox(self, limit: int = 1000) -> None:
        for _ in range(limit):
            try:
                message = self.inbox.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                return
            await self.handle(message)

    async def reconcile(self, now: float) -> int:
        """Close or resume follow-ups stuck in ``waiting`` whose re-push item is final:
        delivered (its record was lost) -> pending again; expired, dead, failed or
        skipped -> stopped with that reason. Returns how many rows changed."""
        rows = await self.store.fetchall(
            """SELECT f.root_id, f.device_id, i.state, i.reason, i.updated_at, m.meta
               FROM followups f
               JOIN items i ON i.message_id = f.root_id || '.r' || f.repushes AND i.device_id = f.device_id
               LEFT JOIN messages m ON m.message_id = f.root_id
               WHERE f.state = 'waiting' AND i.state NOT IN ('queued', 'leased')"""
        )
        changed = 0
        specs: dict[Any, FollowUp | None] = {}

        def write(conn: sqlite3.Connection, chunk: list[Any]) -> int:
            n = 0
            for root_id, device_id, state, reason, updated_at, meta in chunk:
                if meta is None:
                    n += end_followup_in(
                        conn, root_id, device_id, "state = 'stopped', reason = ?", ("message_gone",), "message_gone", now
                    )
                elif state == "sent":
                    spec = spec_of(meta, specs, root_id)
                    if spec is None:
                        n += _stop_invalid(conn, root_id, device_id, now)
                        continue
                    n += conn.execute(
                        """UPDATE followups SET state = 'pending', last_delivered_at = ?, due_at = ?,
                               updated_at = ?, repushes_sent = repushes_sent + 1
                           WHERE root_id = ? AND device_id = ? AND state = 'waiting'""",
                        (updated_at, updated_at + spec.spacing, now, root_id, device_id),
                    ).rowcount
                else:
                    why = f"repush_{state}:{reason}"
                    n += end_followup_in(conn, root_id, device_id, "state = 'stopped', reason = ?", (why,), why, now)
            return n

        # In transactions of RECONCILE_BATCH rows, beating the heartbeat between them: a
        # broadcast's re-push that expired in the queue leaves as many rows as devices.
        for i in range(0, len(rows), RECONCILE_BATCH):
            self.ctx.heartbeat.beat()
            chunk = rows[i : i + RECONCILE_BATCH]
            changed += await self.store.transaction(functools.partial(write, chunk=chunk))
        if changed:
            log.info("follow-ups reconciled", changed=changed)
        return changed

    # -- inputs -----------------------------------------------------------------------

    async def handle(self, message: AnalyzerInput) -> None:
        if isinstance(message, Delivered):
            await self.on_delivered(message)
        elif isinstance(message, RegistryChanged):
            await self.on_registry_change(message)

    async def _message(self, message_id: str) -> MessageRow | None:
        if message_id in self._messages:
            self._messages.move_to_end(message_id)
            return self._messages[message_id]
        row = await self.queue.get_message(message_id)
        self._messages[message_id] = row
        if len(self._messages) > 1024:
            gone, _ = self._messages.popitem(last=False)
            self._specs.pop(gone, None)
        return row

    async def _spec(self, root_id: str) -> tuple[MessageRow, FollowUp] | None:
        root = await self._message(root_id)
        if root is None or "follow_up" not in root.meta:
            return None
        spec = spec_of(root.meta, self._specs, root_id)
        return None if spec is None else (root, spec)

    async def on_delivered(self, d: Delivered) -> None:
        """A delivery record only wakes the timer (a new follow-up may be due sooner than
        the one it sleeps for): the node has already written the follow-up state durably
        (``record_outcomes``), and ``reconcile`` repairs what a lost record leaves."""

    async def on_registry_change(self, change: RegistryChanged) -> None:
        record = await self.registry.get(change.device_id)
        if record is None:
            await self.store.execute(
                """UPDATE followups SET state = 'stopped', reason = 'device_unregistered', due_at = NULL,
                       updated_at = ? WHERE device_id = ? AND state IN ('pending', 'waiting')""",
                (self.clock(), change.device_id),
            )
            return
        await withdraw_consent(
            self.store, record.user_id, allowed_kinds=record.consent.event_kinds if record.consent.events else ()
        )
        at = change.at or self.clock()
        for root_id, device_id in await self.store.transaction(lambda conn: handle_registration_in(conn, [record], at)):
            log.info("handled", message_id=root_id, device_id=device_id)

    # -- state changes ------------------------------------------------------------------

    async def _handled(self, root_id: str, device_id: str, at: float) -> None:
        changed = await self._end(
            root_id, device_id, "state = 'handled', handled_at = ?", (at,), withdraw_reason="handled"
        )
        if changed:
            log.info("handled", message_id=root_id, device_id=device_id)

    async def _stop(self, root_id: str, device_id: str, reason: str, state: str = "stopped") -> None:
        await self._end(root_id, device_id, "state = ?, reason = ?", (state, reason), withdraw_reason=reason)

    async def _end(
        self, root_id: str, device_id: str, assignments: str, params: tuple[Any, ...], *, withdraw_reason: str
    ) -> bool:
        now = self.clock()
        return await self.store.transaction(
            lambda conn: end_followup_in(conn, root_id, device_id, assignments, params, withdraw_reason, now)
        )

    # -- the timer ----------------------------------------------------------------------

    async def next_due(self) -> float | None:
        row = await self.store.fetchone("SELECT min(due_at) FROM followups WHERE state = 'pending'")
        return None if row is None else row[0]

    async def _evidence(self, spec: FollowUp, record: DeviceRecord, delivered_at: float) -> float | None:
        """When the user handled the matter, or None."""
        if spec.event is not None:
            rows = await self.store.fetchall(
                "SELECT attributes, at FROM events WHERE user_id = ? AND name = ? AND at >= ? ORDER BY at",
                (record.user_id, spec.event, delivered_at),
            )
            for attributes, at in rows:
                if spec.event_matches(spec.event, msgpack.unpackb(attributes, raw=False)):
                    return float(at)
        rule = spec.registry_rule()
        if rule is not None and rule.matches(record.fields()):
            # already true when delivered (or no change recorded since): handled at delivery
            return max(record.updated_at_ms / 1000, delivered_at)
        return None

    async def fire_due(self, now: float) -> int:
        rows = await self.store.fetchall(
            """SELECT root_id, device_id, user_id, delivered_at, repushes, class_id FROM followups
               WHERE state = 'pending' AND due_at <= ? ORDER BY due_at LIMIT ?""",
            (now, FIRE_BATCH),
        )
        repushes: dict[tuple[str, int], list[tuple[DeviceRecord, str | None]]] = {}
        for root_id, device_id, user_id, delivered_at, count, sent_class in rows:
            self.ctx.heartbeat.beat()
            found = await self._spec(root_id)
            if found is None:
                gone = await self._message(root_id) is None
                await self._stop(root_id, device_id, "message_gone" if gone else INVALID)
                continue
            root, spec = found
            record = await self.registry.get(device_id)
            if record is None:
                await self._stop(root_id, device_id, "device_unregistered")
                continue
            if record.user_id != user_id:
                await self._stop(root_id, device_id, "user_changed")
                continue
            if spec.event is not None and not record.consent.allows(spec.event):
                await self._stop(root_id, device_id, "consent_withdrawn")
                continue
            handled_at = await self._evidence(spec, record, delivered_at)
            if handled_at is not None:
                await self._handled(root_id, device_id, handled_at)
                continue
            if count >= spec.max_repushes:
                await self._stop(root_id, device_id, "max_repushes", state="gave_up")
                continue
            until = root.meta.get("until")
            if until is not None and until <= now + MIN_REPUSH_LIFE:
                await self._stop(root_id, device_id, "expired")  # the client's own deadline
                continue
            if not record.active:
                await self._stop(root_id, device_id, "token_dead")
                continue
            reason = self._disqualified(root, spec, record, sent_class)
            if reason is not None:
                await self._stop(root_id, device_id, reason)
                continue
            repushes.setdefault((root_id, count + 1), []).append((record, sent_class))
        for (root_id, n), records in repushes.items():
            found = await self._spec(root_id)
            assert found is not None
            await self._repush(found[0], found[1], n, records, now)
        return len(rows)

    def _disqualified(
        self, root: MessageRow, spec: FollowUp, record: DeviceRecord, sent_class: str | None
    ) -> str | None:
        live = self.live.current
        category = root.meta.get("category")
        if spec.strategy == "resend":
            if not record.permissions.permits(root.push_type, category):
                return "permission_withdrawn"
            # The node re-checks the class of a push to classes too; stopping here keeps the
            # follow-up honest.
            if root.target.get("classes") and sent_class and sent_class != "unclassified":
                rule = live.classifier.rule(sent_class)
                if rule is None or not rule.matches(record.fields()):
                    return "class_changed"
            return None
        target = Target.parse(root.target, set(root.target.get("classes", [])))
        if target.devices is not None and record.device_id not in target.devices:
            return "no_longer_qualifies:not_targeted"
        if target.users is not None and record.user_id not in target.users:
            return "no_longer_qualifies:not_targeted"
        verdict = judge(
            record,
            classifier_classify=live.classifier.classify,
            push_type=root.push_type,
            category=category,
            target_classes=target.classes,
            target_filter=compile_rule(target.filter, "target.filter") if target.filter is not None else None,
        )
        if verdict.reason is not None:
            return f"no_longer_qualifies:{verdict.reason}"
        return None

    async def _repush(
        self, root: MessageRow, spec: FollowUp, n: int, targets: list[tuple[DeviceRecord, str | None]], now: float
    ) -> None:
        records = [record for record, _ in targets]
        sent_classes = {record.device_id: c for record, c in targets}
        live = self.live.current
        child_id = f"{root.message_id}.r{n}"
        notification = dict(spec.reminder) if spec.reminder is not None else dict(root.notification)
        notification.setdefault("collapse_id", root.collapse_id or root.message_id)
        # as long as the original had (a ttl is relative), never past the client's deadline
        expiration = now + max(MIN_REPUSH_LIFE, (root.expiration or now + live.default_ttl) - root.created_at)
        if root.meta.get("until") is not None:
            expiration = min(expiration, root.meta["until"])
        notification["expiration"] = int(expiration)
        child = MessageRow(
            message_id=child_id,
            notification=notification,
            priority=root.priority,
            push_type=root.push_type,
            created_at=now,
            audience=len(records),
            target={"devices": [r.device_id for r in records]},
            expiration=expiration,
            collapse_id=notification.get("collapse_id"),
            meta={
                "root_id": root.message_id,
                "repush": n,
                "strategy": spec.strategy,
                "follow_up": root.meta["follow_up"],
                "category": root.meta.get("category"),
                **({"target_classes": root.target["classes"]} if root.target.get("classes") else {}),
            },
        )
        issued = int(now * 1000)
        items = []
        for record in records:
            class_id = (
                live.classifier.classify(record.fields()) or "unclassified"
                if spec.strategy == "regenerate"
                else sent_classes.get(record.device_id) or "unclassified"
            )
            if spec.strategy == "regenerate" and root.target.get("classes"):
                # keep the class the device qualified by, so the node re-checks that rule
                class_id = next(
                    (c for c in root.target["classes"] if (r := live.classifier.rule(c)) and r.matches(record.fields())),
                    class_id,
                )
            shard = live.shard_of(record.device_id, record.attributes)
            code = live.codes.seal(IdCode(child_id, record.device_id, record.user_id, class_id, issued))
            items.append(ItemRow(device_id=record.device_id, shard=shard, idcode=code))

        def write(conn: sqlite3.Connection) -> list[ItemRow]:
            # One transaction: the follow-ups' move to 'waiting', the child message, its
            # items and the end of its fan-out are stored together or not at all. (Apart, a
            # crash in between left a re-push queued that an ended follow-up did not know
            # to withdraw, or a child message that central's fan-out would enqueue.) Only
            # the follow-ups still pending get a re-push: one a report or a registration
            # ended since fire_due looked (the user acted meanwhile) gets none.
            moved = {
                row[0]
                for r in records
                for row in conn.execute(
                    """UPDATE followups SET state = 'waiting', repushes = ?, due_at = NULL, updated_at = ?
                       WHERE root_id = ? AND device_id = ? AND state = 'pending' AND repushes = ?
                       RETURNING device_id""",
                    (n, now, root.message_id, r.device_id, n - 1),
                )
            }
            mine = [item for item in items if item.device_id in moved]
            if not mine:
                return mine
            if conn.execute("SELECT 1 FROM messages WHERE message_id = ?", (child_id,)).fetchone():
                # a later batch of the same re-push (a broadcast fires FIRE_BATCH at a time)
                conn.execute(
                    "UPDATE messages SET audience = audience + ? WHERE message_id = ?", (len(mine), child_id)
                )
                self.queue.create_many_in(conn, [(child, mine)], now)
            else:
                first = dataclasses.replace(
                    child, audience=len(mine), target={"devices": [item.device_id for item in mine]}
                )
                self.queue.create_many_in(conn, [(first, mine)], now)
            return mine

        made = await self.store.transaction(write)
        if not made:
            return
        log.info("re-push", message_id=root.message_id, repush=n, devices=len(made), strategy=spec.strategy)
        if self.queue_notes is not None:
            with contextlib.suppress(trio.WouldBlock):
                self.queue_notes.send_nowait(
                    Enqueued(
                        shards=sorted({item.shard for item in made}), count=len(made),
                        urgent=root.priority >= URGENT_PRIORITY,
                    )
                )


def handle_event_in(conn: sqlite3.Connection, e: AppEvent, now: float) -> list[tuple[str, str]]:
    """End, as handled, the open follow-ups of ``e``'s user that the event settles (and
    withdraw their queued re-pushes), inside the caller's transaction: ``report`` calls it
    in the transaction that stores the event, so no event is stored without its effect.
    Returns the (root id, device id) pairs ended."""
    rows = conn.execute(
        """SELECT f.root_id, f.device_id, f.delivered_at, m.meta FROM followups f
           JOIN messages m ON m.message_id = f.root_id
           WHERE f.user_id = ? AND f.state IN ('pending', 'waiting')""",
        (e.user_id,),
    ).fetchall()
    specs: dict[Any, FollowUp | None] = {}
    handled = []
    for root_id, device_id, delivered_at, meta in rows:
        spec = spec_of(meta, specs, root_id)
        if spec is None:
            _stop_invalid(conn, root_id, device_id, now)
            continue
        if e.at >= delivered_at and spec.event_matches(e.name, e.attributes) and end_followup_in(
            conn, root_id, device_id, "state = 'handled', handled_at = ?", (e.at,), "handled", now
        ):
            handled.append((root_id, device_id))
    return handled


def handle_registration_in(
    conn: sqlite3.Connection, records: Sequence[DeviceRecord], now: float
) -> list[tuple[str, str]]:
    """End, as handled, the open follow-ups of these devices whose registry condition their
    new data meets (and withdraw their queued re-pushes), inside the registration's
    transaction. Returns the (root id, device id) pairs ended."""
    specs: dict[Any, FollowUp | None] = {}  # a bulk registration meets the same roots again
    handled = []
    for record in records:
        rows = conn.execute(
            """SELECT f.root_id, m.meta FROM followups f JOIN messages m ON m.message_id = f.root_id
               WHERE f.device_id = ? AND f.state IN ('pending', 'waiting')""",
            (record.device_id,),
        ).fetchall()
        for root_id, meta in rows:
            spec = spec_of(meta, specs, root_id)
            if spec is None:
                _stop_invalid(conn, root_id, record.device_id, now)
                continue
            rule = spec.registry_rule()
            if rule is not None and rule.matches(record.fields()) and end_followup_in(
                conn, root_id, record.device_id, "state = 'handled', handled_at = ?", (now,), "handled", now
            ):
                handled.append((root_id, record.device_id))
    return handled


def end_followup_in(
    conn: sqlite3.Connection,
    root_id: str,
    device_id: str,
    assignments: str,
    params: tuple[Any, ...],
    withdraw_reason: str,
    now: float,
) -> bool:
    """End an open follow-up (``assignments``: its new state, from this module's code
    only), and in the same transaction withdraw its last re-push if that is still queued
    (waiting for a retry, say): the follow-up is over, the reminder is not sent."""
    ended = conn.execute(
        f"""UPDATE followups SET {assignments}, due_at = NULL, updated_at = ?
            WHERE root_id = ? AND device_id = ? AND state IN ('pending', 'waiting')
            RETURNING repushes""",
        (*params, now, root_id, device_id),
    ).fetchall()
    for (repushes,) in ended:
        if repushes:
            QueueStore.withdraw_in(conn, f"{root_id}.r{repushes}", device_id, withdraw_reason, now)
    return bool(ended)


async def withdraw_consent(store: Any, user_id: str, *, allowed_kinds: Sequence[str] = ()) -> tuple[int, int]:
    """The user no longer lets pushd analyse (some of) their events: delete the stored
    events of every kind not in ``allowed_kinds`` and stop the follow-ups that would
    need them. Follow-ups judged on registry data go on. Returns (deleted, stopped)."""
    return await apply_consents(store, [(user_id, tuple(allowed_kinds))])


async def apply_consents(store: Any, consents: Sequence[tuple[str, tuple[str, ...]]]) -> tuple[int, int]:
    """``withdraw_consent`` for many users at once, in one transaction."""
    now = time.time()
    deleted, stopped = await store.transaction(lambda conn: apply_consents_in(conn, consents, now))
    if deleted or stopped:
        log.info("consent applied", users=len(consents), events_deleted=deleted, followups_stopped=stopped)
    return deleted, stopped


def apply_consents_in(
    conn: sqlite3.Connection, consents: Sequence[tuple[str, tuple[str, ...]]], now: float
) -> tuple[int, int]:
    """:func:`apply_consents` inside the caller's transaction (a registration's: so that
    the consent and its consequences are stored together or not at all). Only users that
    have stored events or open follow-ups cost more than a query per 500 users."""
    allowed = dict(consents)  # user id -> kinds that may still be analysed
    users = list(allowed)
    deleted = stopped = 0
    specs: dict[Any, FollowUp | None] = {}
    for i in range(0, len(users), 500):
        chunk = users[i : i + 500]
        marks = ",".join("?" * len(chunk))
        with_events = [r[0] for r in conn.execute(
            f"SELECT DISTINCT user_id FROM events WHERE user_id IN ({marks})", chunk
        )]
        for user_id in with_events:
            kinds = allowed[user_id]
            kind_marks = ",".join("?" * len(kinds))
            deleted += conn.execute(
                f"DELETE FROM events WHERE user_id = ? AND name NOT IN ({kind_marks})"
                if kinds
                else "DELETE FROM events WHERE user_id = ?",
                (user_id, *kinds),
            ).rowcount
        rows = conn.execute(
            f"""SELECT f.user_id, f.root_id, f.device_id, m.meta FROM followups f
                JOIN messages m ON m.message_id = f.root_id
                WHERE f.user_id IN ({marks}) AND f.state IN ('pending', 'waiting')""",
            chunk,
        ).fetchall()
        for user_id, root_id, device_id, meta in rows:
            spec = spec_of(meta, specs, root_id)
            if spec is None:
                stopped += _stop_invalid(conn, root_id, device_id, now)
                continue
            if spec.event is not None and spec.event not in allowed[user_id]:
                stopped += end_followup_in(
                    conn, root_id, device_id, "state = 'stopped', reason = ?", ("consent_withdrawn",),
                    "consent_withdrawn", now,
                )
    return deleted, stopped


async def followup_summary(queue: QueueStore, message_id: str) -> dict[str, Any] | None:
    """Per message: delivered, handled, re-pushed, gave up, stopped, and time to handle."""
    rows = await queue.store.fetchall(
        """SELECT state, count(*), sum(repushes) FROM followups WHERE root_id = ? GROUP BY state""",
        (message_id,),
    )
    if not rows:
        return None
    states = {state: n for state, n, _ in rows}
    times = [
        r[0]
        for r in await queue.store.fetchall(
            """SELECT handled_at - delivered_at FROM followups
               WHERE root_id = ? AND state = 'handled' ORDER BY 1""",
            (message_id,),
        )
    ]
    sent_repushes = await queue.store.fetchone(
        "SELECT sum(repushes_sent) FROM followups WHERE root_id = ?", (message_id,)
    )
    return {
        "delivered": sum(states.values()),
        "handled": states.get("handled", 0),
        "pending": states.get("pending", 0) + states.get("waiting", 0),
        "gave_up": states.get("gave_up", 0),
        "stopped": states.get("stopped", 0),
        # re-pushes sent: one withdrawn (the user acted first), skipped or expired is not
        "repushed": (sent_repushes[0] or 0) if sent_repushes else 0,
        "time_to_handle": {
            "p50": times[len(times) // 2] if times else None,
            "max": times[-1] if times else None,
        },
    }


async def followup_totals(queue: QueueStore) -> dict[str, Any]:
    """All follow-ups by state; ``repushed``: re-pushes delivered."""
    rows = await queue.store.fetchall("SELECT state, count(*), sum(repushes_sent) FROM followups GROUP BY state")
    out: dict[str, Any] = {state: n for state, n, _ in rows}
    out["repushed"] = sum(r or 0 for _, _, r in rows)
    return out
