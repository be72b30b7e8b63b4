"""Push analysis and re-push, at the actor level with a virtual clock (the store is real
SQLite; the clock only jumps when nothing has happened for a few real milliseconds, so
database work never races the timer)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
import trio.testing

from actors.analyzer import (
    AnalyzerActor,
    Outcome,
    followup_summary,
    handle_event_in,
    record_outcomes,
)
from actors.base import ActorContext, Heartbeat
from actors.idcode import CodeKeys
from actors.live import Live, LiveRef
from actors.messages import AppEvent, Delivered, RegistryChanged
from actors.queuestore import MessageRow, QueueStore
from actors.registry import Consent, Registration, Registry
from actors.rules import Classifier
from actors.storage import open_store
from tests.virtual_time import advance_when_idle

BASE = 1_800_000_000.0  # wall-clock origin for the virtual clock
TOPIC = "com.example.app"


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0.05)


def now() -> float:
    return BASE + trio.current_time()


@dataclass
class World:
    store: Any
    queue: QueueStore
    registry: Registry
    live: LiveRef
    inbox: trio.MemorySendChannel[Any]
    nursery: trio.Nursery
    recv: trio.MemoryReceiveChannel[Any]
    actor_scope: trio.CancelScope | None = None

    async def start_analyzer(self) -> None:
        scope = trio.CancelScope()
        self.actor_scope = scope
        # A long heartbeat interval: the loop then wakes only for messages and deadlines,
        # which keeps the number of virtual-clock jumps (each costs real idle time) small.
        ctx = ActorContext("analyzer", Heartbeat(100_000.0))
        actor = AnalyzerActor(
            ctx, inbox=self.recv.clone(), queue=self.queue, registry=self.registry, live=self.live, clock=now
        )

        async def run(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                await actor.run(task_status=task_status)

        await self.nursery.start(run)

    def crash_analyzer(self) -> None:
        assert self.actor_scope is not None
        self.actor_scope.cancel()

    async def register(self, device_id: str, user_id: str, *, app_version: str = "1.0.0", consent: tuple[str, ...] = ("order.paid",)) -> None:
        await self.registry.register(
            Registration(
                device_id=device_id, token=device_id.encode().hex().ljust(64, "0"), environment="production",
                topic=TOPIC, model="iPhone", os_version="17.0", app_version=app_version, locale="en_US",
                time_zone="UTC", user_id=user_id, consent=Consent(events=bool(consent), event_kinds=consent),
            ),
            now_ms=int(now() * 1000),
        )

    async def push(
        self, follow_up: dict[str, Any], target: dict[str, Any] | None = None, *, until: float | None = None
    ) -> str:
        message_id = f"m{int(trio.current_time() * 1000)}"
        await self.queue.create_message(
            MessageRow(
                message_id=message_id,
                notification={"aps": {"alert": "pay"}, "topic": TOPIC, "collapse_id": message_id},
                priority=10, push_type="alert", created_at=now(), audience=1,
                target=target or {"all": True}, expiration=now() + 86400, collapse_id=message_id,
                meta={"follow_up": follow_up, "category": None, **({"until": until} if until else {})},
            )
        )
        return message_id

    async def deliver(
        self, message_id: str, device_id: str, user_id: str, outcome: str = "delivered", class_id: str = "everyone"
    ) -> None:
        """What a node does with a final outcome: the durable follow-up write, then the record."""
        message = await self.queue.get_message(message_id)
        assert message is not None
        at = now()
        entry = Outcome(message, device_id, user_id, class_id, outcome, None, at)
        await self.store.transaction(lambda conn: record_outcomes(conn, [entry], at))
        await self.inbox.send(Delivered(message_id, device_id, user_id, outcome, None, "apns-id", at))

    async def report(self, user_id: str, name: str, **attributes: Any) -> None:
        """What ops.report does: the event stored and its follow-ups settled, together."""
        at = now()
        event = AppEvent(user_id, None, name, attributes, at)

        def write(conn: Any) -> None:
            conn.execute(
                "INSERT INTO events (user_id, device_id, name, attributes, at) VALUES (?, NULL, ?, ?, ?)",
                (user_id, name, msgpack.packb(attributes), at),
            )
            handle_event_in(conn, event, at)

        await self.store.transaction(write)

    async def first_repush(self) -> str:
        """d1 (user u1) was delivered a FOLLOW push and did not act: its first re-push is now
        queued (no node here sends it). Returns the root message id."""
        await self.register("d1", "u1")
        root = await self.push(FOLLOW)
        await self.deliver(root, "d1", "u1")
        await trio.sleep(601)
        assert list(await self.repushes(root)) == [f"{root}.r1"]
        return root

    async def item(self, message_id: str, device_id: str) -> tuple[Any, ...]:
        """(state, reason) of a queue item."""
        row = await self.store.fetchone(
            "SELECT state, reason FROM items WHERE message_id = ? AND device_id = ?", (message_id, device_id)
        )
        assert row is not None
        return tuple(row)

    async def followup(self, root: str, device_id: str) -> dict[str, Any]:
        row = await self.store.fetchone("SELECT * FROM followups WHERE root_id = ? AND device_id = ?", (root, device_id))
        assert row is not None
        return dict(row)

    async def repushes(self, root: str) -> dict[str, tuple[float, list[str]]]:
        rows = await self.store.fetchall(
            "SELECT m.message_id, m.created_at, i.device_id FROM messages m JOIN items i USING (message_id) "
            "WHERE m.message_id LIKE ? ORDER BY m.message_id, i.device_id",
            (root + ".r%",),
        )
        out: dict[str, tuple[float, list[str]]] = {}
        for mid, created, device in rows:
            out.setdefault(mid, (created, []))[1].append(device)
        return out


@asynccontextmanager
async def world(tmp_path: Path) -> AsyncIterator[World]:
    classifier = Classifier.from_config(
        [{"id": "needs-update", "rule": {"field": "device.app_version", "semver_lt": "2.0.0"}},
         {"id": "everyone", "rule": "always"}]
    )
    live = LiveRef(Live(classifier=classifier, codes=CodeKeys({"k1": b"k" * 32}, "k1"), node_count=1))
    # Storage timeouts run on trio's clock; under the virtual clock they must not fire.
    async with open_store(tmp_path / "db.sqlite3", write_timeout=1e9) as store, trio.open_nursery() as nursery:
        clock = trio.lowlevel.current_clock()
        if isinstance(clock, trio.testing.MockClock):
            nursery.start_soon(advance_when_idle, clock, store)
        send, recv = trio.open_memory_channel[Any](100)
        w = World(store, QueueStore(store), Registry(store), live, send, nursery, recv)
        yield w
        nursery.cancel_scope.cancel()


FOLLOW = {"handled": {"event": "order.paid", "match": {"order": "A1"}}, "deadline": 600.0,
          "max_repushes": 2, "spacing": 300.0, "strategy": "resend"}


async def test_handled_before_the_deadline_means_no_repush(tmp_path: Path, clock: trio.testing.MockClock) -> None:
    async with world(tmp_path) as w:
        await w.start_analyzer()
        await w.register("d1", "u1")
        root = await w.push(FOLLOW)
        await w.deliver(root, "d1", "u1")
        await trio.sleep(100)
        await w.report("u1", "order.paid", order="B2")  # another order: not evidence
        await trio.sleep(100)
        await w.report("u1", "order.paid", order="A1")
        await trio.sleep(2000)
        f = await w.followup(root, "d1")
        assert f["state"] == "handled"
        assert f["handled_at"] - f["delivered_at"] == pytest.approx(200, abs=1)
        assert await w.repushes(root) == {}
        summary = await followup_summary(w.queue, root)
        assert summary is not None and summary["handled"] == 1 and summary["repushed"] == 0


async def test_not_handled_repushes_at_the_deadline_up_to_the_maximum_spaced(tmp_path: Path, clock: trio.testing.MockClock) -> None:
    async with world(tmp_path) as w:
        await w.start_analyzer()
        await w.register("d1", "u1")
        root = await w.push(FOLLOW)
        t0 = now()
        await w.deliver(root, "d1", "u1")
        await trio.sleep(601)
        r = await w.repushes(root)
        assert list(r) == [f"{root}.r1"]
        assert r[f"{root}.r1"][0] - t0 == pytest.approx(600, abs=1)
        await trio.sleep(50)
        await w.deliver(f"{root}.r1", "d1", "u1")  # the re-push reached the device at t0+651
        await trio.sleep(299)
        assert len(await w.repushes(root)) == 1  # spacing not over yet
        await trio.sleep(2)
        r = await w.repushes(root)
        assert r[f"{root}.r2"][0] - t0 == pytest.approx(951, abs=1)
        await w.deliver(f"{root}.r2", "d1", "u1")
        await trio.sleep(5000)
        assert len(await w.repushes(root)) == 2  # max_repushes = 2
        f = await w.followup(root, "d1")
        assert (f["state"], f["reason"], f["repushes"]) == ("gave_up", "max_repushes", 2)


async def test_a_repush_still_queued_when_the_user_acts_is_not_sent(tmp_path: Path, clock: trio.testing.MockClock) -> None:
    async with world(tmp_path) as w:
        await w.start_analyzer()
        root = await w.first_repush()  # queued, not sent yet (a retry, say)
        await w.report("u1", "order.paid", order="A1")
        await trio.sleep(10)
        assert (await w.followup(root, "d1"))["state"] == "handled"
        assert await w.item(f"{root}.r1", "d1") == ("skipped", "handled")  # withdrawn: no node can lease it now
        message = await w.queue.get_message(f"{root}.r1")
        state = await w.store.fetchone("SELECT state FROM messages WHERE message_id = ?", (f"{root}.r1",))
        assert message is not None and state[0] == "done"
        summary = await followup_summary(w.queue, root)
        assert summary is not None and (summary["handled"], summary["repushed"]) == (1, 0)  # none was sent


async def test_a_repush_still_queued_when_consent_is_withdrawn_is_not_sent(tmp_path: Path, clock: trio.testing.MockClock) -> None:
    async with world(tmp_path) as w:
        await w.start_analyzer()
        root = await w.first_repush()
        await w.register("d1", "u1", consent=())
        await w.inbox.send(RegistryChanged("d1", "u1", "updated", "1.0.0", now()))
        await trio.sleep(10)
        f = await w.followup(root, "d1")
        assert (f["state"], f["reason"]) == ("stopped", "consent_withdrawn")
        assert await w.item(f"{root}.r1", "d1") == ("skipped", "consent_withdrawn")


async def test_regenerate_skips_devices_that_no_longer_qualify(tmp_path: Path, clock: trio.testing.MockClock) -> None:
    async with world(tmp_path) as w:
        await w.start_analyzer()
        await w.register("old", "u1", app_version="1.0.0")
        await w.register("also-old", "u2", app_version="1.5.0")
        follow = {**FOLLOW, "strategy": "regenerate"}
        root = await w.push(follow, target={"classes": ["needs-update"]})
        await w.deliver(root, "old", "u1")
        await w.deliver(root, "also-old", "u2")
        await trio.sleep(10)
        await w.register("old", "u1", app_version="2.1.0")  # updated in the meantime
        await w.inbox.send(RegistryChanged("old", "u1", "updated", "2.1.0", now()))
        await trio.sleep(600)
        assert {m: d for m, (_, d) in (await w.repushes(root)).items()} == {f"{root}.r1": ["also-old"]}
        f = await w.followup(root, "old")
        assert (f["state"], f["reason"]) == ("stopped", "no_longer_qualifies:not_targeted")


async def test_registry_condition_counts_as_handled(tmp_path: Path, clock: trio.testing.MockClock) -> None:
    async with world(tmp_path) as w:
        await w.start_analyzer()
        await w.register("d1", "u1", app_version="1.0.0", consent=())
        follow = {**FOLLOW, "handled": {"registry": {"field": "device.app_version", "semver_ge": "2.0.0"}}}
        root = await w.push(follow)
        await w.deliver(root, "d1", "u1")
        await trio.sleep(30)
        await w.register("d1", "u1", app_version="2.0.0", consent=())
        await w.inbox.send(RegistryChanged("d1", "u1", "updated", "2.0.0", now()))
        await trio.sleep(1000)
        assert (await w.followup(root, "d1"))["state"] == "handled"
        assert await w.repushes(root) == {}


async def test_a_registry_condition_already_met_at_delivery_is_handled_at_delivery(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    async with world(tmp_path) as w:
        await w.start_analyzer()
        await w.register("d1", "u1", app_version="2.5.0", consent=())
        follow = {**FOLLOW, "handled": {"registry": {"field": "device.app_version", "semver_ge": "2.0.0"}}}
        await trio.sleep(100)
        root = await w.push(follow)
        await w.deliver(root, "d1", "u1")
        await trio.sleep(700)
        f = await w.followup(root, "d1")
        assert f["state"] == "handled" and f["handled_at"] == f["delivered_at"]  # not 100 s before it
        assert (await followup_summary(w.queue, root) or {})["time_to_handle"]["p50"] == 0


async def test_consent_withdrawal_stops_repushes_and_deletes_events(tmp_path: Path, clock: trio.testing.MockClock) -> None:
    async with world(tmp_path) as w:
        await w.start_analyzer()
        await w.register("d1", "u1")
        root = await w.push(FOLLOW)
        await w.deliver(root, "d1", "u1")
        await w.report("u1", "order.paid", order="other")
        await trio.sleep(10)
        await w.register("d1", "u1", consent=())
        await w.inbox.send(RegistryChanged("d1", "u1", "updated", "1.0.0", now()))
        await trio.sleep(2000)
        f = await w.followup(root, "d1")
        assert (f["state"], f["reason"]) == ("stopped", "consent_withdrawn")
        assert await w.repushes(root) == {}
        assert await w.store.fetchall("SELECT * FROM events WHERE user_id = 'u1'") == []


async def test_dead_token_on_a_repush_stops_the_follow_up(tmp_path: Path, clock: trio.testing.MockClock) -> None:
    async with world(tmp_path) as w:
        await w.start_analyzer()
        await w.register("d1", "u1")
        root = await w.push(FOLLOW)
        await w.deliver(root, "d1", "u1")
        await trio.sleep(601)
        await w.deliver(f"{root}.r1", "d1", "u1", outcome="token_dead")
        await trio.sleep(3000)
        f = await w.followup(root, "d1")
        assert f["state"] == "stopped" and f["reason"].startswith("repush_token_dead")
        assert len(await w.repushes(root)) == 1


async def test_restart_restores_pending_follow_ups_without_loss_or_double_firing(tmp_path: Path, clock: trio.testing.MockClock) -> None:
    async with world(tmp_path) as w:
        await w.start_analyzer()
        for i in range(5):
            await w.register(f"d{i}", f"u{i}")
        root = await w.push(FOLLOW)
        for i in range(5):
            await w.deliver(root, f"d{i}", f"u{i}")
        await trio.sleep(100)
        w.crash_analyzer()  # before the deadline
        await trio.sleep(1000)  # nobody watching: the deadline passes while down
        assert await w.repushes(root) == {}
        await w.start_analyzer()  # the new incarnation restores the pending rows
        await trio.sleep(5)
        r = await w.repushes(root)
        assert r[f"{root}.r1"][1] == [f"d{i}" for i in range(5)]
        # a crash after the child was written but before the rows were updated:
        w.crash_analyzer()
        await w.store.execute("UPDATE followups SET state = 'pending', repushes = 0, due_at = ?", (now(),))
        await w.start_analyzer()
        await trio.sleep(5)
        r = await w.repushes(root)
        assert list(r) == [f"{root}.r1"] and len(r[f"{root}.r1"][1]) == 5  # not doubled
        counts = await w.store.fetchall(
            "SELECT device_id, count(*) FROM items WHERE message_id = ? GROUP BY device_id", (f"{root}.r1",)
        )
        assert all(n == 1 for _, n in counts)
        states = {(await w.followup(root, f"d{i}"))["state"] for i in range(5)}
        assert states == {"waiting"}


async def test_one_timer_not_a_task_per_follow_up(tmp_path: Path, clock: trio.testing.MockClock) -> None:
    async with world(tmp_path) as w:
        await w.start_analyzer()
        await w.register("d1", "u1")
        roots = [await w.push({**FOLLOW, "deadline": 600.0 + i}) for i in range(50)]
        for root in roots:
            await w.deliver(root, "d1", "u1")
            await trio.sleep(0.001)
        await trio.sleep(5)
        tasks_before = len(trio.lowlevel.current_root_task().child_nurseries[0].child_tasks)
        await trio.sleep(1)
        tasks_after = len(trio.lowlevel.current_root_task().child_nurseries[0].child_tasks)
        assert tasks_before == tasks_after
        await trio.sleep(700)
        assert sum([len(await w.repushes(r)) for r in roots]) == 50


async def test_a_repush_that_expired_in_the_queue_closes_its_follow_up(tmp_path: Path, clock: trio.testing.MockClock) -> None:
    async with world(tmp_path) as w:
        await w.start_analyzer()
        root = await w.first_repush()
        # The re-push never reaches a node (it expired in the queue): no delivery record.
        await w.store.execute("UPDATE items SET state = 'expired', reason = 'Expired' WHERE message_id = ?", (f"{root}.r1",))
        await trio.sleep(400)  # the next reconcile sweep
        f = await w.followup(root, "d1")
        assert (f["state"], f["reason"]) == ("stopped", "repush_expired:Expired")


async def test_resend_stops_when_the_device_left_its_class(tmp_path: Path, clock: trio.testing.MockClock) -> None:
    async with world(tmp_path) as w:
        await w.start_analyzer()
        await w.register("d1", "u1", app_version="1.0.0")
        root = await w.push(FOLLOW, target={"classes": ["needs-update"]})
        await w.deliver(root, "d1", "u1", class_id="needs-update")
        await w.register("d1", "u1", app_version="2.5.0")  # updated: the "please update" matter is moot
        await trio.sleep(700)
        f = await w.followup(root, "d1")
        assert (f["state"], f["reason"]) == ("stopped", "class_changed")
        assert await w.repushes(root) == {}


async def test_a_repush_that_fails_half_way_leaves_nothing_behind(tmp_path: Path, clock: trio.testing.MockClock) -> None:
    # The child message, its items and the follow-up's move to 'waiting' are one write: if
    # the last part fails (here a trigger refuses it; a crash or a storage timeout alike),
    # no re-push is left queued (or left for central's fan-out) that an ended follow-up
    # would not know to withdraw. The follow-up stays pending and fires again.
    async with world(tmp_path) as w:
        await w.register("d1", "u1")
        root = await w.push(FOLLOW)
        await w.deliver(root, "d1", "u1")
        await trio.sleep(601)
        await w.store.execute(
            "CREATE TRIGGER refuse BEFORE UPDATE OF state ON followups WHEN NEW.state = 'waiting' "
            "BEGIN SELECT RAISE(ABORT, 'disk trouble'); END"
        )
        ctx = ActorContext("analyzer", Heartbeat(100_000.0))
        actor = AnalyzerActor(ctx, inbox=w.recv.clone(), queue=w.queue, registry=w.registry, live=w.live, clock=now)
        with pytest.raises(Exception, match="disk trouble"):
            await actor.fire_due(now())
        assert await w.store.fetchall("SELECT message_id FROM messages WHERE message_id LIKE ?", (root + ".r%",)) == []
        assert (await w.followup(root, "d1"))["state"] == "pending"
        await w.store.execute("DROP TRIGGER refuse")
        await actor.fire_due(now())
        assert list(await w.repushes(root)) == [f"{root}.r1"]
        assert (await w.followup(root, "d1"))["state"] == "waiting"


async def test_no_repush_outlives_the_deadline_the_client_set(tmp_path: Path, clock: trio.testing.MockClock) -> None:
    # The push carried an absolute expiration (700 s from now): the first re-push expires
    # with it, and the second, due after it, is not made; the follow-up stops as expired.
    async with world(tmp_path) as w:
        await w.start_analyzer()
        await w.register("d1", "u1")
        until = now() + 700
        root = await w.push(FOLLOW, until=until)
        await w.deliver(root, "d1", "u1")
        await trio.sleep(601)
        assert list(await w.repushes(root)) == [f"{root}.r1"]
        row = await w.store.fetchone("SELECT expiration FROM messages WHERE message_id = ?", (f"{root}.r1",))
        assert row is not None and row[0] == until
        await w.deliver(f"{root}.r1", "d1", "u1")
        await trio.sleep(400)  # the next check falls after the deadline
        f = await w.followup(root, "d1")
        assert (f["state"], f["reason"]) == ("stopped", "expired")
        assert list(await w.repushes(root)) == [f"{root}.r1"]


async def test_reconcile_closes_a_broadcast_sized_backlog_in_batches(tmp_path: Path, clock: trio.testing.MockClock) -> None:
    # 2,500 follow-ups waiting on a re-push that reached a final state without a record
    # (expired in the queue, or delivered and the record lost): all are closed or resumed,
    # across several transactions.
    from actors.analyzer import RECONCILE_BATCH

    n = 2 * RECONCILE_BATCH + 500
    async with world(tmp_path) as w:
        root = await w.push(FOLLOW)
        await w.store.execute(
            "INSERT INTO messages (message_id, payload, priority, push_type, created_at, target, meta, audience, state) "
            "SELECT message_id || '.r1', payload, priority, push_type, created_at, target, meta, audience, 'done' "
            "FROM messages WHERE message_id = ?",
            (root,),
        )

        def fill(conn: Any) -> None:
            conn.executemany(
                "INSERT INTO followups (root_id, device_id, user_id, class_id, state, delivered_at, "
                "last_delivered_at, due_at, updated_at, repushes) VALUES (?, ?, ?, 'everyone', 'waiting', 0, 0, NULL, 0, 1)",
                [(root, f"d{i}", f"u{i}") for i in range(n)],
            )
            conn.executemany(
                "INSERT INTO items (message_id, device_id, shard, idcode, priority, rank, enqueued_at, not_before, "
                "deferred, state, outcome, reason, updated_at) VALUES (?, ?, 0, x'00', 10, 0, 0, 0, 0, ?, ?, ?, 5)",
                [(root + ".r1", f"d{i}", *(("sent", "delivered", None) if i % 2 else ("expired", "expired", "Expired")))
                 for i in range(n)],
            )

        await w.store.transaction(fill)
        ctx = ActorContext("analyzer", Heartbeat(100_000.0))
        actor = AnalyzerActor(ctx, inbox=w.recv.clone(), queue=w.queue, registry=w.registry, live=w.live, clock=now)
        assert await actor.reconcile(now()) == n
        rows = await w.store.fetchall("SELECT state, reason, count(*), min(due_at) FROM followups GROUP BY 1, 2")
        assert sorted(tuple(r) for r in rows) == [
            ("pending", None, n // 2, 5 + FOLLOW["spacing"]),
            ("stopped", "repush_expired:Expired", n - n // 2, None),
        ]
        assert await actor.reconcile(now()) == 0


async def test_resend_of_a_push_to_users_goes_on_when_the_device_changes_class(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    # The class sealed for a push to users is incidental (the device's first matching
    # class): updating the app does not stop the order reminder.
    async with world(tmp_path) as w:
        await w.start_analyzer()
        await w.register("d1", "u1", app_version="1.0.0")
        root = await w.push(FOLLOW, target={"users": ["u1"]})
        await w.deliver(root, "d1", "u1", class_id="needs-update")
        await w.register("d1", "u1", app_version="2.5.0")
        await trio.sleep(700)
        assert (await w.followup(root, "d1"))["state"] == "waiting"
        assert list(await w.repushes(root)) == [f"{root}.r1"]


async def test_a_late_record_of_an_earlier_repush_does_not_move_the_follow_up(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    async with world(tmp_path) as w:
        await w.start_analyzer()
        root = await w.first_repush()
        await w.deliver(f"{root}.r1", "d1", "u1")
        await trio.sleep(301)  # spacing: r2 is queued, the follow-up waits for it
        assert list(await w.repushes(root)) == [f"{root}.r1", f"{root}.r2"]
        await w.deliver(f"{root}.r1", "d1", "u1")  # r1's record again (a duplicate)
        await w.deliver(f"{root}.r1", "d1", "u1", outcome="token_dead")
        f = await w.followup(root, "d1")
        assert (f["state"], f["repushes"]) == ("waiting", 2)
        await w.deliver(f"{root}.r2", "d1", "u1")
        assert (await w.followup(root, "d1"))["state"] == "pending"


async def test_a_report_landing_while_a_repush_is_being_made_gets_no_repush(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    # fire_due looked for evidence and found none; before it writes the re-push, a report
    # (ops.report settles follow-ups in its own transaction) ends the follow-up. The
    # re-push write then makes nothing for it: no reminder to a user who just acted.

    async with world(tmp_path) as w:
        await w.register("d1", "u1")
        root = await w.push(FOLLOW)
        await w.deliver(root, "d1", "u1")
        await trio.sleep(601)
        ctx = ActorContext("analyzer", Heartbeat(100_000.0))
        actor = AnalyzerActor(ctx, inbox=w.recv.clone(), queue=w.queue, registry=w.registry, live=w.live, clock=now)
        evidence = actor._evidence

        async def evidence_then_report(*args: Any) -> Any:
            found = await evidence(*args)
            t = now()
            event = AppEvent("u1", None, "order.paid", {"order": "A1"}, t)
            assert await w.store.transaction(lambda conn: handle_event_in(conn, event, t)) == [(root, "d1")]
            return found

        actor._evidence = evidence_then_report  # type: ignore[method-assign]
        await actor.fire_due(now())
        assert (await w.followup(root, "d1"))["state"] == "handled"
        assert await w.repushes(root) == {}


async def test_the_sent_repush_count_outlives_retention(tmp_path: Path, clock: trio.testing.MockClock) -> None:
    async with world(tmp_path) as w:
        await w.start_analyzer()
        root = await w.first_repush()
        await w.store.execute("UPDATE items SET state = 'sent', outcome = 'delivered' WHERE message_id = ?", (f"{root}.r1",))
        await w.store.execute("UPDATE messages SET state = 'done', finished_at = ? WHERE message_id = ?", (now(), f"{root}.r1"))
        await w.deliver(f"{root}.r1", "d1", "u1")
        assert (await followup_summary(w.queue, root) or {})["repushed"] == 1
        await w.queue.purge_finished(before=now() + 1)  # r1 is finished and past retention
        assert await w.store.fetchone("SELECT 1 FROM messages WHERE message_id = ?", (f"{root}.r1",)) is None
        assert (await followup_summary(w.queue, root) or {})["repushed"] == 1
