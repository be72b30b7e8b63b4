"""Node: leases its shard's messages, verifies and re-checks each one, sends it to APNs
over its persistent HTTP/2 connections, records the outcome and reports deliveries.

For every leased (message, device):

1. **verify** the identification code: the seal and key id hold, it names this message
   and this device, and the user id in it is the device's user **now** — a device that
   moved to another user never gets the previous user's message;
2. **re-check** against the latest registry data: the token is not retired, the device
   still satisfies its class's rule if the message went to classes (a "please update"
   notice is not sent to a device that has updated since) and the user still permits
   this push type and category;
3. **send** the survivors in one batch through the sender (one apns-id per attempt);
4. **record**: delivered → sent; token dead → failed and the token retired in the
   registry; retryable or credentials trouble → back in the queue with backoff until
   ``max_attempts``, then dead-lettered; other rejections → failed with APNs's reason.
   Every message that is not sent gets a recorded reason.

The node finishes the batch in hand when asked to stop; what it has not leased stays in
the queue, and what it leased but could not finish is reclaimed when the lease runs out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import sqlite3
import time
import uuid
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any, Literal

import structlog
import trio

from actors.analyzer import Outcome as FollowUpOutcome
from actors.analyzer import record_outcomes
from actors.base import ActorContext, StopAwareWaits
from actors.idcode import InvalidCode
from actors.live import Live, LiveRef
from actors.messages import Delivered, Handoff
from actors.queuestore import ItemResult, LeasedItem, MessageRow, QueueStore
from actors.registry import DeviceRecord, Registry
from actors.urgency import Urgency
from apns.outcome import Outcome, OutcomeClass
from apns.payload import EncodedNotification, InvalidNotification, Notification
from apns.sender import Sender

log = structlog.get_logger("actors.node")

# A message to fewer devices than this sends its own headers (collapse id, expiration) as
# HPACK literals, leaving the connection's header table to the headers every request shares.
INDEXED_AUDIENCE = 16
# The express lane's inbox: hand-offs from central (which sends one only while two slots
# are free) and at most one kick from the node's waker.
HANDOFF_SLOTS = 4
VERIFY_SLICE = 8  # items verified and encoded per turn of a lane (see apns READ_CHUNK)
SMALL_AUDIENCE = 100  # an express round with a message to fewer devices holds the urgency
STALE_HANDOFF = 5.0  # seconds: a handed item whose lease ends sooner is left to the queue
# seconds: a hand-off older than this (it waited for an express round, or for the node to
# restart) has its devices read again before the re-check, as a lease would have them
HANDOFF_RECHECK = 0.25
OUTCOME_SLOTS = 8  # express rounds waiting to be recorded before the lane waits for them
EXPRESS_ROUNDS = 4  # express rounds in flight at once


@dataclass(frozen=True)
class Refusal:
    state: str  # "skipped" (may not be sent now) or "dead" (must never be sent)
    reason: str


def class_of(item: LeasedItem, live: Live) -> str:
    """The class id sealed in the item's code ("" when the code does not open)."""
    try:
        return live.codes.open(item.idcode).class_id
    except InvalidCode:
        return ""


def targets_classes(message: MessageRow) -> bool:
    """Whether the message went to classes (a re-push: its original did), the only case in
    which a device that left its class may not have it: a push to users or devices is
    theirs whatever class their device moved to since."""
    return bool(message.target.get("classes") or message.meta.get("target_classes"))


def verify(item: LeasedItem, record: DeviceRecord | None, live: Live) -> Refusal | None:
    """Steps 1 and 2 above. None: may be sent."""
    try:
        code = live.codes.open(item.idcode)
    except InvalidCode as exc:
        return Refusal("dead", f"invalid_code:{exc.reason}")
    if code.message_id != item.message_id or code.device_id != item.device_id:
        return Refusal("dead", "invalid_code:mismatch")
    if record is None:
        return Refusal("skipped", "device_unregistered")
    if record.user_id != code.user_id:
        return Refusal("skipped", "user_changed")
    if not record.active:
        return Refusal("skipped", "token_retired")
    message = item.message
    if record.topic != message.notification.get("topic"):
        return Refusal("skipped", "topic_changed")
    if code.class_id and code.class_id != "unclassified" and targets_classes(message):
        rule = live.classifier.rule(code.class_id)
        if rule is None:
            return Refusal("skipped", "class_removed")
        if not rule.matches(record.fields()):
            return Refusal("skipped", "class_changed")
    category = message.meta.get("category")
    if not record.permissions.permits(message.push_type, category):
        return Refusal("skipped", "permission_withdrawn")
    if (
        live.apns_environment in ("production", "sandbox")
        and record.environment != live.apns_environment
    ):
        return Refusal("skipped", "wrong_environment")
    return None


@dataclass
class Round:
    """One batch's outcomes, written in the transaction that leases the next batch."""

    results: list[ItemResult]
    followups: list[FollowUpOutcome]
    retries: dict[tuple[float, str], list[int]]  # (delay, reason) -> item ids
    dead_tokens: list[tuple[str, int]]  # (token, APNs timestamp in ms)
    delivered: list[Delivered]
    now: float


class SenderHandle:
    """A sender with its cancel scope; retired (cancelled) once no lane uses it."""

    def __init__(self, sender: Sender, generation: int) -> None:
        self.sender = sender
        self.generation = generation
        self.scope = trio.CancelScope()
        self.users = 0
        self.retired = False

    def release(self) -> None:
        self.users -= 1
        if self.retired and self.users == 0:
            self.scope.cancel()

    def retire(self) -> None:
        self.retired = True
        if self.users == 0:
            self.scope.cancel()


class NodeActor:
    def __init__(
        self,
        ctx: ActorContext,
        *,
        index: int,
        wake: trio.MemoryReceiveChannel[bool],
        handoffs: trio.MemoryReceiveChannel[Handoff | None],
        express_kick: trio.MemorySendChannel[Handoff | None],
        deliveries: trio.MemorySendChannel[Delivered],
        queue: QueueStore,
        live: LiveRef,
        counters: Counter[str] | None = None,
        urgency: Urgency | None = None,
    ) -> None:
        self.ctx = ctx
        self.index = index
        self.name = ctx.name
        self.wake = wake
        # The express lane's inbox: central's hand-offs, and the waker's kicks (None).
        self.handoffs = handoffs
        self.express_kick = express_kick
        self.deliveries = deliveries
        self.queue = queue
        self.live = live
        self.counters: Counter[str] = counters if counters is not None else Counter()
        self.urgency = urgency if urgency is not None else Urgency()
        self._encoded: OrderedDict[str, EncodedNotification | InvalidNotification] = OrderedDict()
        self._log = log.bind(node=self.name)
        self._urgent_backlog = False  # the express lane's last lease was a full one
        self._held_handoffs = 0  # express lane: hand-offs taken, urgency not yet released
        self._kicked = False  # express lane: a wake-up was found among the hand-offs
        self._waits = StopAwareWaits(ctx)  # the lanes' idle waits

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        async with self.wake, self.handoffs, self.express_kick, self.deliveries, trio.open_nursery() as nursery:
            self._senders = nursery
            self._current = await self._start_sender()
            # The express lane's own connection: an urgent push is not queued behind a
            # broadcast's streams (or its flow-control window) on a shared connection.
            self._express = await self._start_sender(connections=1)
            # Wake-ups go to ONE idle lane (a lane that finds more work wakes the next), so a
            # wake does not cost every lane an empty lease.
            self._kick_send, self._kick_recv = trio.open_memory_channel[None](1)
            # The express lane's outcomes are written by a task of their own, so that the
            # lane is free for the next urgent push while they are (see _write_outcomes).
            self._outcomes, outcomes = trio.open_memory_channel[Round](OUTCOME_SLOTS)
            task_status.started()
            async with trio.open_nursery() as lanes:
                lanes.start_soon(self._waker)
                lanes.start_soon(self._waits.watch)
                written = trio.Event()
                lanes.start_soon(self._write_outcomes, outcomes, written)
                # Several lanes lease and send concurrently, each a slice of the batch: a
                # new message waits for the next free lane, not for a whole batch. The
                # express lane leases only priority-10 items, so an urgent push does not
                # wait for lanes busy with a broadcast.
                async with self._outcomes, trio.open_nursery() as work:
                    for lane in range(self.live.current.node_lanes):
                        work.start_soon(self._lane, lane)
                    work.start_soon(functools.partial(self._lane, -1, express=True))
                await written.wait()  # every outcome of the express lane is recorded
                lanes.cancel_scope.cancel()
            self._current.retire()
            self._express.retire()
            nursery.cancel_scope.cancel()

    async def _waker(self) -> None:
        """Passes the queue's wake-ups on to the lanes."""
        async for urgent in self.wake:
            # Every wake reaches the express lane (urgent items come from re-pushes and
            # sweeps too, whose wakes do not say so); an ordinary lane as well unless the
            # work is known to be urgent and the express lane is free to take it.
            if self._kick_express() and urgent:
                continue
            self._wake_a_lane()

    def _kick_express(self) -> bool:
        """Wake the express lane unless something is already waiting in its inbox (one
        kick at most: the rest of the inbox is kept for central's hand-offs)."""
        if self.express_kick.statistics().current_buffer_used:
            return False
        try:
            self.express_kick.send_nowait(None)
        except trio.WouldBlock:
            return False
        return True

    def _wake_a_lane(self) -> None:
        with contextlib.suppress(trio.WouldBlock):
            self._kick_send.send_nowait(None)

    async def _express_round(
        self, items: list[LeasedItem], records: dict[str, DeviceRecord], handle: SenderHandle, held: int
    ) -> None:
        try:
            done = await self.process(items, records, handle.sender)
            await self._outcomes.send(done)  # recorded by _write_outcomes
        finally:
            handle.release()
            self.urgency.release(held)
            self._express_slots.release()

    async def _lane(self, lane: int, *, express: bool = False) -> None:
        try:
            if express:
                self._express_slots = trio.Semaphore(EXPRESS_ROUNDS)
                async with trio.open_nursery() as self._express_rounds:
                    await self._rounds(lane, express=True)
            else:
                await self._rounds(lane, express=False)
        finally:
            if express:  # hand-offs taken but never sent: their urgency ends here
                self.urgency.release(self._held_handoffs)
                self._held_handoffs = 0

    async def _rounds(self, lane: int, *, express: bool) -> None:
        done: Round | None = None  # the last batch's outcomes, not yet written
        kick: trio.MemoryReceiveChannel[Any] = self.handoffs if express else self._kick_recv
        handed: Handoff | None = None  # express lane: items central leased to this node
        # Express lane: lease (urgent items queued, not handed over) when woken or polled,
        # or while its leases come back full; not after each hand-off.
        lease_wanted = True
        polled = False  # the last idle wait ended by time, not by a wake-up
        while True:
            self.ctx.heartbeat.beat()
            stopping = self.ctx.stopping.is_set()
            live = self.live.current
            limit = 0 if stopping else max(1, live.node_batch // max(1, live.node_lanes))
            if not express and not stopping:
                await self.urgency.wait_if_urgent()  # an urgent push is on its way: let it pass
            items: list[LeasedItem] = []
            records: dict[str, DeviceRecord] = {}
            if express:
                # Every hand-off waiting in the inbox goes out in this round, together:
                # under load they batch up like a lease does (also when stopping: they
                # are in hand).
                handed = self._take_handoffs(handed, limit=limit or None)
                if self._kicked:
                    self._kicked, lease_wanted = False, True
            if done is not None or (limit and handed is None and lease_wanted):
                # One trip to the database thread per round: the last batch's outcomes
                # and the next lease (with its devices' records) in one transaction.
                leased = await self.queue.store.transaction(
                    functools.partial(
                        self._finish_and_lease,
                        done=done,
                        limit=0 if handed is not None else limit,
                        lease_seconds=live.lease_seconds,
                        # Urgent items go to the express lane; the other lanes take them
                        # too only while it has more than it can lease in one round.
                        priorities="urgent" if express else "all" if self._urgent_backlog else "ordinary",
                    ),
                    line="urgent" if express else "send",
                )
                if done is not None:
                    self._report(done)  # written: even if the lease half failed
                    done = None
                if isinstance(leased, Exception):
                    raise leased
                items, records = leased
                if polled and items:
                    # Work found by the periodic poll, not by a wake-up: a retry that fell
                    # due, or a wake-up that went missing (the stats op shows the count).
                    self.counters["found_by_poll"] += 1
                polled = False
                if express and handed is None:
                    self._urgent_backlog = len(items) == limit
                    if self._urgent_backlog:
                        self._wake_a_lane()  # more urgent work than one round: help
            handed_round = handed is not None
            read_at = math.inf  # when a hand-off's records were read
            if handed is not None:
                items, records, read_at, handed = handed.items, handed.records, handed.read_at, None
            elif stopping:
                return
            # A new sender after the last batch's outcomes are written, not before.
            if live.apns_generation != self._current.generation and lane == 0:
                self._log.info("APNs settings changed; replacing sender")
                old, self._current = self._current, await self._start_sender()
                old.retire()  # cancelled once the lanes still using it are done with it
            if live.apns_generation != self._express.generation and express:
                old, self._express = self._express, await self._start_sender(connections=1)
                old.retire()
            if items:
                if len(items) == limit and not express:
                    self._wake_a_lane()  # there is probably more: let another lane lease too
                if express:
                    # Rounds of urgent pushes to a few devices overlap (up to
                    # EXPRESS_ROUNDS): the next one does not wait for the previous one's
                    # answer, and bulk work steps aside while they are sent. A round of a
                    # priority-10 broadcast is one at a time, like any lane's, and does not
                    # hold the urgency. (Hand-offs were counted by central when sent.)
                    small = handed_round or any(i.message.audience < SMALL_AUDIENCE for i in items)
                    await self._express_slots.acquire()
                    if trio.current_time() - read_at > HANDOFF_RECHECK:
                        # The hand-off waited (for a free round, or in the inbox while the
                        # node restarted): the records central read when it accepted it may
                        # no longer be the latest, and the re-check (verify) is made on the
                        # devices as they are now, as a lease would have them.
                        ids = {item.device_id for item in items}
                        records = await self.queue.store.read(
                            functools.partial(Registry.records_in, device_ids=ids), line="urgent"
                        )
                        self.counters["handoffs_reread"] += 1
                    own = int(small and not handed_round)
                    self.urgency.add(own)
                    held, self._held_handoffs = self._held_handoffs + own, 0
                    self._express.users += 1
                    if small:
                        self._express_rounds.start_soon(self._express_round, items, records, self._express, held)
                    else:
                        await self._express_round(items, records, self._express, held)
                    lease_wanted = self._urgent_backlog and not handed_round
                    continue
                handle = self._current
                handle.users += 1
                try:
                    done = await self.process(items, records, handle.sender, bulk=True)
                finally:
                    handle.release()
                continue
            # Idle until woken (new work, a retry falling due: the queue actor's sweep) or
            # handed work, or for one heartbeat interval, whichever comes first.
            got, message = await self._waits.receive(kick, self.ctx.heartbeat.interval)
            polled = not got
            if isinstance(message, Handoff):
                handed = self._take(message, [], {})
            else:
                lease_wanted = True  # woken, or the poll interval passed

    async def _write_outcomes(self, rounds: trio.MemoryReceiveChannel[Round], written: trio.Event) -> None:
        """The express lane's outcomes, recorded as they come: every round waiting is
        written in one transaction. Ends once the lane is done and all are written."""
        async with rounds:
            async for first in rounds:
                batch = [first]
                with contextlib.suppress(trio.WouldBlock, trio.EndOfChannel):
                    while True:
                        batch.append(rounds.receive_nowait())

                def write(conn: sqlite3.Connection, batch: list[Round] = batch) -> None:
                    for done in batch:
                        self._finish_and_lease(conn, done, limit=0, lease_seconds=0)

                await self.queue.store.transaction(write, line="urgent")
                for done in batch:
                    self._report(done)
        written.set()

    def _take_handoffs(self, first: Handoff | None, *, limit: int | None) -> Handoff | None:
        """``first`` and the hand-offs waiting in the inbox (a kick among them sets
        ``_kicked``: the lane then leases too), merged into one, while the merged round
        is under ``limit`` items (a lane round; None: all)."""
        items = list(first.items) if first is not None else []
        records = dict(first.records) if first is not None else {}
        read_at = first.read_at if first is not None else math.inf
        while limit is None or len(items) < limit:
            try:
                message = self.handoffs.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            if isinstance(message, Handoff):
                self._take(message, items, records)
                read_at = min(read_at, message.read_at)
            else:
                self._kicked = True  # a wake-up: urgent work may be queued, not handed over
        return Handoff(items, records, read_at) if items else None

    def _take(self, handoff: Handoff, items: list[LeasedItem], records: dict[str, DeviceRecord]) -> Handoff | None:
        """Add a hand-off's items to ``items``. Items whose lease is (nearly) over are
        left to the queue: a sweep hands them out again, so sending them here could send
        them twice (a hand-off can wait in the inbox while the node restarts)."""
        fresh_until = time.time() + STALE_HANDOFF
        fresh = [item for item in handoff.items if item.lease_until > fresh_until]
        self.counters["handed_over"] += len(fresh)
        self.counters["handoffs_stale"] += len(handoff.items) - len(fresh)
        # Central counted the hand-off as urgent work in flight; this lane releases it
        # once the round its items go out in is answered (at once if none go out).
        if not fresh:
            self.urgency.release()
        else:
            self._held_handoffs += 1
            items += fresh
            records.update((item.device_id, handoff.records[item.device_id]) for item in fresh)
        return Handoff(items, records, handoff.read_at) if items else None

    def _finish_and_lease(
        self,
        conn: sqlite3.Connection,
        done: Round | None,
        *,
        limit: int,
        lease_seconds: float,
        priorities: Literal["all", "urgent", "ordinary"] = "all",
    ) -> tuple[list[LeasedItem], dict[str, DeviceRecord]] | Exception:
        """In the database thread, one transaction: record a finished batch (follow-ups
        first, see actors.analyzer.record_outcomes; dead tokens; final outcomes; retries),
        then lease up to ``limit`` items and read their devices' current records. If the
        lease half fails, it is rolled back alone and its error returned, so that the
        outcomes still commit (the caller raises it afterwards)."""
        if done is not None:
            if done.followups:
                record_outcomes(conn, done.followups, done.now)
            for token, at_ms in done.dead_tokens:
                Registry.retire_token_in(conn, token, at_ms)
            if done.results:
                QueueStore.ack_in(conn, done.results, done.now)
            for (delay, reason), ids in done.retries.items():
                QueueStore.retry_in(
                    conn, ids, not_before=done.now + delay, reason=reason, now=done.now
                )
        if not limit:
            return [], {}
        conn.execute("SAVEPOINT lease")
        try:
            items = self.queue.lease_in(
                conn,
                shard=self.index,
                owner=self.name,
                limit=limit,
                now=time.time(),  # now, not when the round queued for the database
                lease_seconds=lease_seconds,
                priorities=priorities,
            )
            records = Registry.records_in(conn, {item.device_id for item in items}) if items else {}
        except Exception as exc:
            conn.execute("ROLLBACK TO SAVEPOINT lease")
            conn.execute("RELEASE SAVEPOINT lease")
            return exc
        conn.execute("RELEASE SAVEPOINT lease")
        return items, records

    def _report(self, done: Round) -> None:
        # Delivery records are informational for the analyzer (its state is already
        # durable): never block sending on a busy analyzer.
        for d in done.delivered:
            try:
                self.deliveries.send_nowait(d)
            except trio.WouldBlock:
                self.counters["delivery_records_dropped"] += 1

    async def _start_sender(self, connections: int | None = None) -> SenderHandle:
        live = self.live.current
        assert live.sender_config is not None, "no APNs sender configured"
        config = live.sender_config()
        if connections is not None:  # the express lane's
            config = dataclasses.replace(config, connections=connections)
        else:  # bulk sending steps aside for urgent pushes (actors.urgency)
            config = dataclasses.replace(
                config, pace=self.urgency.step_aside, read_pace=self.urgency.wait_if_urgent
            )
        handle = SenderHandle(Sender(config), live.apns_generation)

        async def run_sender(
            *, task_status: trio.TaskStatus[Sender] = trio.TASK_STATUS_IGNORED
        ) -> None:
            with handle.scope:
                await handle.sender.run(task_status=task_status)

        await self._senders.start(run_sender)
        return handle

    def _encode(self, item: LeasedItem) -> EncodedNotification | InvalidNotification:
        cached = self._encoded.get(item.message_id)
        if cached is None:
            try:
                cached = Notification.from_dict(item.message.notification).encode()
                if item.message.audience < INDEXED_AUDIENCE:
                    cached = cached.with_unindexed()
            except InvalidNotification as exc:
                cached = exc
            self._encoded[item.message_id] = cached
            if len(self._encoded) > 256:
                self._encoded.popitem(last=False)
        return cached

    async def process(
        self,
        items: list[LeasedItem],
        records: dict[str, DeviceRecord],
        sender: Sender,
        *,
        bulk: bool = False,
    ) -> Round:
        """Verify, re-check and send one leased batch; the outcomes, to be written with the
        next lease (:meth:`_finish_and_lease`)."""
        live = self.live.current
        results: list[ItemResult] = []
        delivered: list[Delivered] = []
        retries: dict[tuple[float, str], list[int]] = {}
        dead_tokens: list[tuple[str, int]] = []
        batch: list[tuple[LeasedItem, DeviceRecord, EncodedNotification]] = []
        now = time.time()

        followups: list[FollowUpOutcome] = []

        def final(
            item: LeasedItem, state: str, outcome: str, reason: str | None, apns_id: str | None
        ) -> None:
            results.append(
                ItemResult(item.item_id, state, outcome=outcome, reason=reason, apns_id=apns_id)  # type: ignore[arg-type]
            )
            record = records.get(item.device_id)
            if "follow_up" in item.message.meta:
                user_id = record.user_id if record else ""
                followups.append(
                    FollowUpOutcome(
                        message=item.message,
                        device_id=item.device_id,
                        user_id=user_id,
                        class_id=class_of(item, live),
                        outcome=outcome,
                        reason=reason,
                        at=now,
                    )
                )
                # The record wakes the analyzer's timer; messages without a follow-up
                # give it nothing to do, so they send none.
                delivered.append(
                    Delivered(
                        message_id=item.message_id,
                        device_id=item.device_id,
                        user_id=user_id,
                        outcome=outcome,
                        reason=reason,
                        apns_id=apns_id,
                        at=now,
                    )
                )
            self.counters[f"{state}"] += 1

        for n, item in enumerate(items):
            if n % VERIFY_SLICE == 0 and (n or bulk):
                # A big round in slices: other tasks get turns in between, and bulk work
                # waits while an urgent push is on its way (see actors.urgency).
                if bulk:
                    await self.urgency.step_aside()
                else:
                    await trio.lowlevel.checkpoint()
            record = records.get(item.device_id)
            refusal = verify(item, record, live)
            if refusal is not None:
                self._log.info("not sent", message_id=item.message_id, reason=refusal.reason)
                final(
                    item,
                    refusal.state,
                    "skipped" if refusal.state == "skipped" else "dead",
                    refusal.reason,
                    None,
                )
                continue
            assert record is not None
            encoded = self._encode(item)
            if isinstance(encoded, InvalidNotification):
                final(item, "dead", "rejected", f"invalid_notification:{encoded.field}", None)
                continue
            batch.append((item, record, encoded.with_apns_id(str(uuid.uuid4()))))

        if batch:
            outcomes = await sender.send_many([(record.token, enc) for _, record, enc in batch])
            now = time.time()
            for (item, record, enc), outcome in zip(batch, outcomes, strict=True):
                self._record(item, record, enc, outcome, live, final, retries)
                if outcome.klass is OutcomeClass.TOKEN_DEAD:
                    dead_tokens.append((record.token, outcome.timestamp_ms or int(now * 1000)))
        return Round(results, followups, retries, dead_tokens, delivered, now)

    def _record(
        self,
        item: LeasedItem,
        record: DeviceRecord,
        enc: EncodedNotification,
        outcome: Outcome,
        live: Live,
        final: Any,
        retries: dict[tuple[float, str], list[int]],
    ) -> None:
        apns_id = outcome.apns_id or enc.apns_id
        reason = outcome.reason
        klass = outcome.klass
        if klass is OutcomeClass.DELIVERED:
            final(item, "sent", str(klass), None, apns_id)
        elif klass is OutcomeClass.TOKEN_DEAD:
            final(item, "failed", str(klass), reason, apns_id)
        elif klass is OutcomeClass.REJECTED:
            self._log.warning(
                "rejected by APNs", message_id=item.message_id, apns_id=apns_id, reason=reason
            )
            final(item, "failed", str(klass), reason, apns_id)
        else:  # RETRY, CREDENTIALS
            if klass is OutcomeClass.CREDENTIALS:
                self._log.error("APNs refused our credentials", reason=reason, apns_id=apns_id)
            if item.attempts >= live.max_attempts:
                final(item, "dead", str(klass), reason or "ConnectionLost", apns_id)
            else:
                delay = live.retry_delay(item.attempts)
                if outcome.retry_after:
                    delay = max(delay, outcome.retry_after)
                retries.setdefault((delay, reason or "ConnectionLost"), []).append(item.item_id)
                self.counters["retried"] += 1
