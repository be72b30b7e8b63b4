"""The durable message queue on SQLite: messages and their per-device items.

One ``messages`` row per pre-push message (notification and target as msgpack, priority,
push type, expiration, collapse id, audience size = "push range"), one ``items`` row per
(message, device) with its identification code, shard and delivery state::

    queued --lease--> leased --ack--> sent | failed | skipped | dead
      ^                 |  \\--retry (not_before)--> queued
      |                 \\--lease ran out (reclaim)--> queued (or dead after max_attempts)
      \\--message expired--> expired

Lease order.  Nodes take items by *priority, waiting time and push range* (the method's
three keys).  They are folded into one static number per item, ``rank``, smallest first::

    rank = enqueued_at - priority * aging_seconds + range_seconds * log10(audience)

which is the same order as ``effective priority = priority + waited / aging_seconds``
(the ``now`` term is common to all items, so it drops out): every ``aging_seconds`` of
waiting is worth one priority step, so low priorities never starve; and a message sent
to ``10**k`` devices ranks as if it had been enqueued ``k * range_seconds`` later, so a
targeted push overtakes the remainder of a broadcast of the same priority for
``k * range_seconds`` after the broadcast started, after which the broadcast's age wins.
Because ``rank`` does not depend on ``now`` it is indexed (partial index on ``(shard,
rank)`` over queued items that are due), so leasing from a million queued rows reads only
the rows it returns. Items not due yet (a retry's ``not_before``, a scheduled send) are
``deferred``: kept out of that index, in one ordered by ``not_before``, and moved back by
the lease that finds them due, so a backlog deferred by an APNs outage costs nothing.

All times are unix seconds (floats) supplied by the caller; the store never reads a clock.
"""

from __future__ import annotations

import math
import sqlite3
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import msgpack

from actors.storage import Line, Store

ItemState = Literal["queued", "leased", "sent", "failed", "expired", "skipped", "dead"]
FinalState = Literal["sent", "failed", "skipped", "dead"]
ITEM_STATES: Final[tuple[str, ...]] = (
    "queued",
    "leased",
    "sent",
    "failed",
    "expired",
    "skipped",
    "dead",
)
URGENT_PRIORITY: Final = 10  # items at this priority are also leased by express lanes
FINAL_STATES: Final = frozenset({"sent", "failed", "skipped", "dead"})
_SQL_CHUNK: Final = 500  # ids per IN (...) list, well under SQLite's variable limit


class UnknownMessage(LookupError):
    def __init__(self, message_id: str) -> None:
        self.message_id = message_id
        super().__init__(f"unknown message {message_id!r}")


@dataclass(frozen=True, slots=True)
class MessageRow:
    message_id: str
    notification: dict[str, Any]
    priority: int
    push_type: str
    created_at: float
    audience: int  # push range: how many devices the message targets
    target: dict[str, Any] = field(default_factory=dict)
    expiration: float | None = None  # unix seconds; None: never expires
    collapse_id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # category, follow-up, parent...
    state: str = "active"  # "active" while any item is queued or leased, else "done"
    enqueued: int = 0  # items enqueued so far


@dataclass(frozen=True, slots=True)
class ItemRow:
    device_id: str
    shard: int
    idcode: bytes
    priority: int | None = None  # None: the message's priority
    not_before: float | None = None  # None: ready at once
    skip_reason: str | None = None  # set: stored directly as "skipped", never leased


@dataclass(frozen=True, slots=True)
class LeasedItem:
    item_id: int
    message: MessageRow
    device_id: str
    shard: int
    idcode: bytes
    priority: int
    enqueued_at: float
    attempts: int  # including this one
    lease_owner: str
    lease_until: float

    @property
    def message_id(self) -> str:
        return self.message.message_id


@dataclass(frozen=True, slots=True)
class ItemResult:
    item_id: int
    state: FinalState
    outcome: str | None = None  # apns.outcome class, or "skipped"
    reason: str | None = None
    apns_id: str | None = None


def _pack(value: Any) -> bytes:
    data: bytes = msgpack.packb(value, use_bin_type=True)
    return data


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False)


def _message_from_row(row: sqlite3.Row) -> MessageRow:
    return MessageRow(
        message_id=row["message_id"],
        notification=_unpack(row["payload"]),
        priority=row["priority"],
        push_type=row["push_type"],
        created_at=row["created_at"],
        audience=row["audience"],
        target=_unpack(row["target"]),
        expiration=row["expiration"],
        collapse_id=row["collapse_id"],
        meta=_unpack(row["meta"]),
        state=row["state"],
        enqueued=row["enqueued"],
    )


def _leased_item(row: sqlite3.Row, message: MessageRow, owner: str, until: float) -> LeasedItem:
    """A row returned by a leasing ``UPDATE ... RETURNING``, as a LeasedItem."""
    return LeasedItem(
        item_id=row["item_id"],
        message=message,
        device_id=row["device_id"],
        shard=row["shard"],
        idcode=row["idcode"],
        priority=row["priority"],
        enqueued_at=row["enqueued_at"],
        attempts=row["attempts"],
        lease_owner=owner,
        lease_until=until,
    )


def _chunks(values: Sequence[Any], size: int = _SQL_CHUNK) -> Iterable[Sequence[Any]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def _marks(n: int) -> str:
    return ",".join("?" * n)


def _settle(conn: sqlite3.Connection, message_ids: Iterable[str], now: float) -> None:
    """Mark messages with no queued or leased item left as done."""
    for message_id in set(message_ids):
        conn.execute(
            """UPDATE messages SET state = 'done', finished_at = ?
               WHERE message_id = ? AND state = 'active' AND NOT EXISTS (
                   SELECT 1 FROM items WHERE message_id = ? AND state IN ('queued', 'leased'))""",
            (now, message_id, message_id),
        )


def _check_final(results: Sequence[ItemResult]) -> None:
    for result in results:
        if result.state not in FINAL_STATES:
            raise ValueError(f"ack state must be one of {sorted(FINAL_STATES)}")


class QueueStore:
    """The durable queue over a :class:`~actors.storage.Store`; every write is one transaction."""

    def __init__(
        self,
        store: Store,
        *,
        aging_seconds: float = 60.0,
        range_seconds: float = 60.0,
        max_attempts: int = 10,
    ) -> None:
        if aging_seconds <= 0 or range_seconds < 0 or max_attempts < 1:
            raise ValueError("aging_seconds > 0, range_seconds >= 0, max_attempts >= 1")
        self.store = store
        self.aging_seconds = aging_seconds
        self.range_seconds = range_seconds
        self.max_attempts = max_attempts

    def rank(self, *, enqueued_at: float, priority: int, audience: int) -> float:
        """The lease order key (smaller leases first); see the module docstring."""
        return (
            enqueued_at
            - priority * self.aging_seconds
            + self.range_seconds * math.log10(max(audience, 1))
        )

    # -- writes -------------------------------------------------------------------------

    async def create_message(self, msg: MessageRow, *, line: Line = "bulk") -> None:
        """Store a message (idempotent: an existing message id is left as it is)."""
        await self.store.transaction(lambda conn: self._create_in(conn, msg), line=line)

    @staticmethod
    def _create_in(conn: sqlite3.Connection, msg: MessageRow) -> None:
        conn.execute(
            """INSERT INTO messages (message_id, payload, priority, push_type, created_at,
                   expiration, collapse_id, target, meta, audience, state)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'active')
               ON CONFLICT (message_id) DO NOTHING""",
            (
                msg.message_id,
                _pack(msg.notification),
                msg.priority,
                msg.push_type,
                msg.created_at,
                msg.expiration,
                msg.collapse_id,
                _pack(msg.target),
                _pack(msg.meta),
                msg.audience,
            ),
        )

    async def set_audience(self, message_id: str, audience: int) -> None:
        """Record the resolved push range (affects items enqueued afterwards)."""
        if (
            await self.store.execute(
                "UPDATE messages SET audience = ? WHERE message_id = ?", (audience, message_id)
            )
            == 0
        ):
            raise UnknownMessage(message_id)

    async def enqueue(self, message_id: str, items: Sequence[ItemRow], *, now: float) -> int:
        """Add one batch of items in one transaction; returns how many were new.

        Idempotent per (message, device): re-enqueueing a batch after a crash adds nothing.
        Items with a ``skip_reason`` are stored as skipped in the same transaction, so no
        node can lease them in between.
        """
        return await self.store.transaction(
            lambda conn: self._enqueue_in(conn, message_id, items, now)
        )

    def create_many_in(
        self,
        conn: sqlite3.Connection,
        batch: Sequence[tuple[MessageRow, Sequence[ItemRow]]],
        now: float,
    ) -> list[int]:
        """Several messages, each with all its items and the end of its fan-out, inside the
        caller's transaction (a burst of small pushes costs one commit). Returns the items
        added per message."""
        added = []
        for msg, items in batch:
            self._create_in(conn, msg)
            added.append(self._enqueue_in(conn, msg.message_id, items, now) if items else 0)
            conn.execute(
                "UPDATE messages SET fanout_done = 1 WHERE message_id = ?", (msg.message_id,)
            )
            if not items:
                _settle(conn, [msg.message_id], now)
        return added

    def _enqueue_in(
        self, conn: sqlite3.Connection, message_id: str, items: Sequence[ItemRow], now: float
    ) -> int:
        msg = conn.execute(
            "SELECT priority, audience FROM messages WHERE message_id = ?", (message_id,)
        ).fetchone()
        if msg is None:
            raise UnknownMessage(message_id)
        rows = []
        for item in items:
            priority = msg["priority"] if item.priority is None else item.priority
            skipped = item.skip_reason is not None
            rows.append(
                (
                    message_id,
                    item.device_id,
                    item.shard,
                    item.idcode,
                    priority,
                    self.rank(enqueued_at=now, priority=priority, audience=msg["audience"]),
                    now,
                    now if item.not_before is None else item.not_before,
                    item.not_before is not None and item.not_before > now,
                    "skipped" if skipped else "queued",
                    "skipped" if skipped else None,
                    item.skip_reason,
                    now,
                )
            )
        before = conn.total_changes
        conn.executemany(
            """INSERT INTO items (message_id, device_id, shard, idcode, priority, rank,
                   enqueued_at, not_before, deferred, state, outcome, reason, updated_at)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT (message_id, device_id) DO NOTHING""",
            rows,
        )
        added = conn.total_changes - before
        conn.execute(
            """UPDATE messages SET enqueued = enqueued + ?,
                   state = CASE WHEN ? > 0 THEN 'active' ELSE state END,
                   finished_at = CASE WHEN ? > 0 THEN NULL ELSE finished_at END
               WHERE message_id = ?""",
            (added, added, added, message_id),
        )
        _settle(conn, [message_id], now)  # done already if the batch was all skipped
        return added

    async def lease(
        self, *, shard: int, owner: str, limit: int, now: float, lease_seconds: float
    ) -> list[LeasedItem]:
        """Lease up to ``limit`` due items of ``shard`` in rank order, for ``lease_seconds``.

        Items of a message whose expiration has passed are marked expired instead.
        """
        if limit < 1:
            return []
        return await self.store.transaction(
            lambda conn: self.lease_in(
                conn, shard=shard, owner=owner, limit=limit, now=now, lease_seconds=lease_seconds
            )
        )

    def lease_in(
        self,
        conn: sqlite3.Connection,
        *,
        shard: int,
        owner: str,
        limit: int,
        now: float,
        lease_seconds: float,
        priorities: Literal["all", "urgent", "ordinary"] = "all",
    ) -> list[LeasedItem]:
        """:meth:`lease` inside the caller's transaction. ``priorities``: ``urgent`` leases
        only items of priority :data:`URGENT_PRIORITY` (a node's express lane),
        ``ordinary`` only the others (the node's other lanes while its express lane keeps
        up with the urgent ones)."""
        if limit < 1:
            return []
        until = now + lease_seconds
        conn.execute(
            """UPDATE items SET deferred = 0
               WHERE shard = ? AND state = 'queued' AND deferred = 1 AND not_before <= ?""",
            (shard, now),
        )
        ready = {
            "all": "items INDEXED BY items_ready WHERE shard = ? AND state = 'queued' AND deferred = 0",
            "urgent": "items INDEXED BY items_urgent WHERE shard = ? AND state = 'queued' "
            f"AND deferred = 0 AND priority >= {URGENT_PRIORITY:d}",
            "ordinary": "items INDEXED BY items_ready WHERE shard = ? AND state = 'queued' "
            f"AND deferred = 0 AND priority < {URGENT_PRIORITY:d}",
        }[priorities]
        rows = conn.execute(
            f"""UPDATE items SET state = 'leased', lease_owner = ?, lease_until = ?,
                   attempts = attempts + 1, updated_at = ?
               WHERE item_id IN (SELECT item_id FROM {ready} ORDER BY rank LIMIT ?)
               RETURNING item_id, message_id, device_id, shard, idcode, priority,
                   enqueued_at, attempts, rank""",
            (owner, until, now, shard, limit),
        ).fetchall()
        if not rows:
            return []
        message_ids = sorted({r["message_id"] for r in rows})
        message_rows = []
        for chunk in _chunks(message_ids):
            message_rows += conn.execute(
                f"SELECT * FROM messages WHERE message_id IN ({_marks(len(chunk))})", chunk
            ).fetchall()
        expired = {
            m["message_id"]
            for m in message_rows
            if m["expiration"] is not None and m["expiration"] <= now
        }
        if expired:
            conn.executemany(
                """UPDATE items SET state = 'expired', outcome = 'expired',
                       reason = 'Expired', lease_owner = NULL, lease_until = NULL,
                       attempts = attempts - 1, updated_at = ?
                   WHERE item_id = ?""",
                [(now, r["item_id"]) for r in rows if r["message_id"] in expired],
            )
            _settle(conn, expired, now)
        messages = {
            m["message_id"]: _message_from_row(m)
            for m in message_rows
            if m["message_id"] not in expired
        }
        live = sorted(
            (r for r in rows if r["message_id"] in messages),
            key=lambda r: (r["rank"], r["item_id"]),
        )
        return [_leased_item(r, messages[r["message_id"]], owner, until) for r in live]

    def lease_new_in(
        self,
        conn: sqlite3.Connection,
        messages: Sequence[MessageRow],
        *,
        shard: int,
        owner: str,
        limit: int,
        now: float,
        lease_seconds: float,
    ) -> list[LeasedItem]:
        """Inside the transaction that just stored ``messages``: lease up to ``limit`` of
        their queued items on ``shard`` (oldest first), for the caller to hand over. The
        messages are taken as given, not read back (they were written in this
        transaction and cannot have expired)."""
        if limit < 1 or not messages:
            return []
        until = now + lease_seconds
        by_id = {m.message_id: m for m in messages}
        ids = list(by_id)
        rows = conn.execute(
            f"""UPDATE items SET state = 'leased', lease_owner = ?, lease_until = ?,
                   attempts = attempts + 1, updated_at = ?
               WHERE item_id IN (SELECT item_id FROM items
                   WHERE message_id IN ({_marks(len(ids))}) AND shard = ?
                       AND state = 'queued' AND deferred = 0
                   ORDER BY item_id LIMIT ?)
               RETURNING item_id, message_id, device_id, shard, idcode, priority,
                   enqueued_at, attempts""",
            (owner, until, now, *ids, shard, limit),
        ).fetchall()
        return [
            _leased_item(r, by_id[r["message_id"]], owner, until)
            for r in sorted(rows, key=lambda r: r["item_id"])
        ]

    async def unlease(self, item_ids: Sequence[int], *, owner: str) -> int:
        """Give items leased to ``owner`` but never sent back to the queue, as if never
        leased (the attempt is not counted); returns how many."""

        def write(conn: sqlite3.Connection) -> int:
            n = 0
            for chunk in _chunks(list(item_ids)):
                n += conn.execute(
                    f"""UPDATE items SET state = 'queued', lease_owner = NULL, lease_until = NULL,
                           attempts = max(0, attempts - 1)
                       WHERE item_id IN ({_marks(len(chunk))}) AND state = 'leased'
                           AND lease_owner = ?""",
                    (*chunk, owner),
                ).rowcount
            return n

        return await self.store.transaction(write, line="urgent")

    async def ack(self, results: Sequence[ItemResult], *, now: float) -> int:
        """Record final outcomes in one transaction; returns how many items changed.

        An item already final is left alone; a late ack for an item whose lease ran out
        and was reclaimed still records the outcome (it was delivered: don't send twice).
        """
        return await self.store.transaction(lambda conn: self.ack_in(conn, results, now))

    @staticmethod
    def withdraw_in(conn: sqlite3.Connection, message_id: str, device_id: str, reason: str, now: float) -> int:
        """Skip the message's item for the device with ``reason`` if it is still queued (due
        or deferred; a leased one is already on its way), inside the caller's transaction:
        a re-push whose follow-up ended before it was sent. Returns 1 if withdrawn."""
        withdrawn = conn.execute(
            """UPDATE items SET state = 'skipped', outcome = 'skipped', reason = ?, updated_at = ?
               WHERE message_id = ? AND device_id = ? AND state = 'queued'""",
            (reason, now, message_id, device_id),
        ).rowcount
        if withdrawn:
            _settle(conn, [message_id], now)
        return int(withdrawn)

    @staticmethod
    def ack_in(conn: sqlite3.Connection, results: Sequence[ItemResult], now: float) -> int:
        """:meth:`ack` inside the caller's transaction."""
        _check_final(results)
        before = conn.total_changes
        touched: list[str] = []
        for chunk in _chunks(results):
            touched += [
                r["message_id"]
                for r in conn.execute(
                    f"SELECT DISTINCT message_id FROM items WHERE item_id IN ({_marks(len(chunk))})",
                    [r.item_id for r in chunk],
                )
            ]
        conn.executemany(
            """UPDATE items SET state = ?, outcome = ?, reason = ?, apns_id = ?,
                   lease_owner = NULL, lease_until = NULL, updated_at = ?
               WHERE item_id = ? AND state IN ('queued', 'leased')""",
            [(r.state, r.outcome, r.reason, r.apns_id, now, r.item_id) for r in results],
        )
        changed = conn.total_changes - before
        _settle(conn, touched, now)
        return changed

    async def retry(
        self, item_ids: Sequence[int], *, not_before: float, reason: str, now: float
    ) -> int:
        """Put leased items back in the queue, not to be leased before ``not_before``."""
        return await self.store.transaction(
            lambda conn: self.retry_in(
                conn, item_ids, not_before=not_before, reason=reason, now=now
            )
        )

    @staticmethod
    def retry_in(
        conn: sqlite3.Connection,
        item_ids: Sequence[int],
        *,
        not_before: float,
        reason: str,
        now: float,
    ) -> int:
        """:meth:`retry` inside the caller's transaction."""
        return conn.executemany(
            """UPDATE items SET state = 'queued', not_before = ?, deferred = ?,
               reason = ?, lease_owner = NULL, lease_until = NULL, updated_at = ?
           WHERE item_id = ? AND state = 'leased'""",
            [(not_before, not_before > now, reason, now, i) for i in item_ids],
        ).rowcount

    async def expire_due(self, now: float) -> int:
        """Mark queued items of messages past their expiration as expired; returns count."""

        def write(conn: sqlite3.Connection) -> int:
            due = [
                r["message_id"]
                for r in conn.execute(
                    """SELECT message_id FROM messages
                       WHERE state = 'active' AND expiration IS NOT NULL AND expiration <= ?""",
                    (now,),
                )
            ]
            count = 0
            for message_id in due:
                count += conn.execute(
                    """UPDATE items SET state = 'expired', outcome = 'expired',
                           reason = 'Expired', updated_at = ?
                       WHERE message_id = ? AND state = 'queued'""",
                    (now, message_id),
                ).rowcount
            _settle(conn, due, now)
            return count

        return await self.store.transaction(write)

    async def reclaim_expired_leases(self, now: float) -> int:
        """Requeue items whose lease ran out (a node died); returns count.

        An item that already used ``max_attempts`` leases is marked dead instead, so a
        notification that crashes nodes cannot loop forever.
        """

        def write(conn: sqlite3.Connection) -> int:
            dead = conn.execute(
                """UPDATE items SET state = 'dead', outcome = 'dead',
                       reason = 'TooManyAttempts', lease_owner = NULL, lease_until = NULL,
                       updated_at = ?
                   WHERE state = 'leased' AND lease_until <= ? AND attempts >= ?
                   RETURNING message_id""",
                (now, now, self.max_attempts),
            ).fetchall()
            requeued = conn.execute(
                """UPDATE items SET state = 'queued', deferred = 0, lease_owner = NULL,
                       lease_until = NULL, reason = 'LeaseExpired', updated_at = ?
                   WHERE state = 'leased' AND lease_until <= ?""",
                (now, now),
            ).rowcount
            _settle(conn, (r["message_id"] for r in dead), now)
            return len(dead) + requeued

        return await self.store.transaction(write)

    async def reshard(self, node_count: int) -> int:
        """Move queued items on shards a smaller node count no longer has onto
        ``shard % node_count``; returns how many moved. Reads only queued items on those
        shards (``INDEXED BY`` the two partial indexes over queued items: SQLite refuses
        the statement rather than scan), never the finished ones: an index seek and an
        empty transaction when there is nothing to move. It runs on every sweep; a scan of
        every item kept (retention is days) cost 22 ms per 100,000 items, in front of
        urgent accepts."""

        def write(conn: sqlite3.Connection) -> int:
            moved = 0
            for deferred, index in ((0, "items_ready"), (1, "items_deferred")):
                moved += conn.execute(
                    f"""UPDATE items SET shard = shard % ? WHERE item_id IN (
                           SELECT item_id FROM items INDEXED BY {index}
                           WHERE shard >= ? AND state = 'queued' AND deferred = {deferred})""",
                    (node_count, node_count),
                ).rowcount
            return moved

        return await self.store.transaction(write)

    async def purge_finished(self, *, before: float, max_items: int = 5000) -> int:
        """Delete messages that finished before ``before`` with their items, at most
        ``max_items`` items per call (one short transaction); call again until it
        returns 0. Returns the number of rows deleted (items and messages)."""

        def write(conn: sqlite3.Connection) -> int:
            deleted = 0
            finished = conn.execute(
                """SELECT message_id FROM messages
                   WHERE state = 'done' AND finished_at < ?
                     AND NOT EXISTS (SELECT 1 FROM followups f
                                     WHERE f.root_id = messages.message_id
                                       AND f.state IN ('pending', 'waiting'))
                   ORDER BY finished_at LIMIT 100""",
                (before,),
            ).fetchall()
            for (message_id,) in finished:
                deleted += conn.execute(
                    """DELETE FROM items WHERE item_id IN (
                           SELECT item_id FROM items WHERE message_id = ? LIMIT ?)""",
                    (message_id, max_items - deleted),
                ).rowcount
                if deleted >= max_items:
                    break
                deleted += conn.execute(
                    "DELETE FROM messages WHERE message_id = ?", (message_id,)
                ).rowcount
            return deleted

        return await self.store.transaction(write)

    # -- reads --------------------------------------------------------------------------

    async def get_message(self, message_id: str) -> MessageRow | None:
        row = await self.store.fetchone(
            "SELECT * FROM messages WHERE message_id = ?", (message_id,)
        )
        return None if row is None else _message_from_row(row)

    async def message_state(
        self, message_id: str, *, page: int = 0, page_size: int = 100
    ) -> dict[str, Any]:
        """Counts per state, outcome and reason, and one page of per-device outcomes."""
        if page < 0 or not 1 <= page_size <= 10_000:
            raise ValueError("page >= 0 and 1 <= page_size <= 10000")

        def read(conn: sqlite3.Connection) -> dict[str, Any] | None:
            msg = conn.execute(
                "SELECT * FROM messages WHERE message_id = ?", (message_id,)
            ).fetchone()
            if msg is None:
                return None
            states: Counter[str] = Counter()
            outcomes: Counter[str] = Counter()
            reasons: Counter[str] = Counter()
            for r in conn.execute(
                """SELECT state, outcome, reason, count(*) AS n FROM items
                   WHERE message_id = ? GROUP BY state, outcome, reason""",
                (message_id,),
            ):
                states[r["state"]] += r["n"]
                if r["outcome"] is not None:
                    outcomes[r["outcome"]] += r["n"]
                if r["reason"] is not None:
                    reasons[r["reason"]] += r["n"]
            devices = [
                dict(r)
                for r in conn.execute(
                    """SELECT device_id, state, outcome, reason, apns_id, attempts,
                           not_before, updated_at
                       FROM items WHERE message_id = ?
                       ORDER BY device_id LIMIT ? OFFSET ?""",
                    (message_id, page_size, page * page_size),
                )
            ]
            total = sum(states.values())
            return {
                "message_id": message_id,
                "state": msg["state"],
                "priority": msg["priority"],
                "push_type": msg["push_type"],
                "created_at": msg["created_at"],
                "expiration": msg["expiration"],
                "finished_at": msg["finished_at"],
                "audience": msg["audience"],
                "enqueued": msg["enqueued"],
                "states": {s: states.get(s, 0) for s in ITEM_STATES},
                "outcomes": dict(outcomes),
                "reasons": dict(reasons),
                "page": page,
                "page_size": page_size,
                "pages": (total + page_size - 1) // page_size,
                "devices": devices,
            }

        result = await self.store.read(read)
        if result is None:
            raise UnknownMessage(message_id)
        return result

    async def counts(self) -> dict[str, Any]:
        """Messages per state and items per state, across the whole queue."""

        def read(conn: sqlite3.Connection) -> dict[str, Any]:
            messages = {
                r["state"]: r["n"]
                for r in conn.execute("SELECT state, count(*) AS n FROM messages GROUP BY state")
            }
            items = {s: 0 for s in ITEM_STATES}
            for r in conn.execute("SELECT state, count(*) AS n FROM items GROUP BY state"):
                items[r["state"]] = r["n"]
            return {"messages": messages, "items": items}

        return await self.store.read(read)

    async def next_ready_time(self, shard: int) -> float | None:
        """When the shard next has work: the earliest due time of a queued item or the
        earliest lease expiry on it (to reclaim); None when it has neither."""

        def read(conn: sqlite3.Connection) -> float | None:
            ready = conn.execute(
                """SELECT not_before FROM items INDEXED BY items_ready
                   WHERE shard = ? AND state = 'queued' AND deferred = 0 LIMIT 1""",
                (shard,),
            ).fetchone()
            (deferred,) = conn.execute(
                """SELECT min(not_before) FROM items INDEXED BY items_deferred
                   WHERE shard = ? AND state = 'queued' AND deferred = 1""",
                (shard,),
            ).fetchone()
            due = None if ready is None else ready[0]
            (lease,) = conn.execute(
                "SELECT min(lease_until) FROM items WHERE shard = ? AND state = 'leased'",
                (shard,),
            ).fetchone()
            times = [t for t in (due, deferred, lease) if t is not None]
            return min(times) if times else None

        return await self.store.read(read)
