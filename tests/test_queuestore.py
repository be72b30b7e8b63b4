"""actors.queuestore: lease order, leases, retries, expiry, acks, state paging, durability."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio

from actors.queuestore import (
    ItemResult,
    ItemRow,
    LeasedItem,
    MessageRow,
    QueueStore,
    UnknownMessage,
)
from actors.storage import MIGRATIONS, open_store
from tests.virtual_time import advance_when_idle

T0 = 1_700_000_000.0
AGING = 60.0


@pytest.fixture
def virtual_clock() -> trio.testing.MockClock:
    """Virtual time that a test moves with :func:`advance_when_idle` beside its store (it
    must not jump while the database thread works)."""
    return trio.testing.MockClock()


@pytest.fixture
async def queue(tmp_path: Path) -> AsyncIterator[QueueStore]:
    async with open_store(tmp_path / "q.sqlite") as store:
        yield QueueStore(store, aging_seconds=AGING, range_seconds=60.0, max_attempts=3)


def message(
    message_id: str, *, priority: int = 10, audience: int = 1, expiration: float | None = None
) -> MessageRow:
    return MessageRow(
        message_id=message_id,
        notification={"aps": {"alert": f"hello from {message_id}"}},
        priority=priority,
        push_type="alert",
        created_at=T0,
        audience=audience,
        target={"device_ids": ["..."]},
        expiration=expiration,
        collapse_id="c1",
        meta={"category": "news"},
    )


def items(prefix: str, n: int, *, shard: int = 0) -> list[ItemRow]:
    return [ItemRow(f"{prefix}-{i:06d}", shard, f"code-{prefix}-{i}".encode()) for i in range(n)]


async def push(
    queue: QueueStore,
    message_id: str,
    n: int,
    *,
    now: float = T0,
    priority: int = 10,
    audience: int | None = None,
    expiration: float | None = None,
) -> None:
    await queue.create_message(
        message(
            message_id,
            priority=priority,
            audience=n if audience is None else audience,
            expiration=expiration,
        )
    )
    assert await queue.enqueue(message_id, items(message_id, n), now=now) == n


async def lease_ids(
    queue: QueueStore, *, now: float, limit: int = 100, shard: int = 0
) -> list[str]:
    leased = await queue.lease(shard=shard, owner="n1", limit=limit, now=now, lease_seconds=30)
    return [item.message_id for item in leased]


async def test_higher_priority_leases_first_and_items_carry_their_message(
    queue: QueueStore,
) -> None:
    await push(queue, "low", 3, priority=5)
    await push(queue, "high", 3, priority=10)
    leased = await queue.lease(shard=0, owner="n1", limit=10, now=T0, lease_seconds=30)
    assert [i.message_id for i in leased] == ["high"] * 3 + ["low"] * 3
    first = leased[0]
    assert first.message.notification == {"aps": {"alert": "hello from high"}}
    assert first.message.meta == {"category": "news"}
    assert first.idcode == b"code-high-0"
    assert (first.attempts, first.lease_owner, first.lease_until) == (1, "n1", T0 + 30)
    assert await queue.lease(shard=0, owner="n2", limit=10, now=T0, lease_seconds=30) == []


async def test_waiting_time_raises_priority_by_one_step_per_aging_period(
    queue: QueueStore,
) -> None:
    await push(queue, "old-low", 1, priority=1, now=T0)
    # Nine priority steps are worth nine aging periods of waiting.
    await push(queue, "new-high-later", 1, priority=10, now=T0 + 9 * AGING + 1)
    await push(queue, "new-high-sooner", 1, priority=10, now=T0 + 9 * AGING - 1)
    assert await lease_ids(queue, now=T0 + 10 * AGING) == [
        "new-high-sooner",
        "old-low",
        "new-high-later",
    ]


async def test_low_priority_never_starves_under_a_steady_high_priority_stream(
    queue: QueueStore,
) -> None:
    await push(queue, "low", 1, priority=0, now=T0)
    step = 10.0
    for tick in range(1, 200):
        now = T0 + tick * step
        await push(queue, f"hi-{tick}", 1, priority=10, now=now)
        leased = await lease_ids(queue, now=now, limit=1)
        if leased == ["low"]:
            # Served once its wait outweighed the 10-step priority gap (10 aging periods).
            assert 10 * AGING <= tick * step <= 10 * AGING + step
            return
    pytest.fail("the low-priority item starved")


async def test_a_targeted_push_overtakes_the_rest_of_a_running_broadcast(
    tmp_path: Path,
) -> None:
    async with open_store(tmp_path / "q.sqlite") as store:
        for range_seconds, expect_single_first in ((60.0, True), (0.0, False)):
            queue = QueueStore(store, aging_seconds=AGING, range_seconds=range_seconds)
            tag = f"r{range_seconds:g}"
            await push(queue, f"broadcast-{tag}", 3000, priority=10, audience=100_000, now=T0)
            assert len(await lease_ids(queue, now=T0 + 1, limit=1000)) == 1000
            await push(queue, f"single-{tag}", 1, priority=10, now=T0 + 60)
            first = await lease_ids(queue, now=T0 + 61, limit=1)
            assert (first == [f"single-{tag}"]) is expect_single_first
            await store.execute("DELETE FROM items")


async def test_expired_leases_are_reclaimed_and_then_give_up_after_max_attempts(
    queue: QueueStore,
) -> None:
    await push(queue, "m", 2)
    leased = await queue.lease(shard=0, owner="dead-node", limit=10, now=T0, lease_seconds=30)
    assert len(leased) == 2
    assert await queue.next_ready_time(0) == T0 + 30
    assert await queue.reclaim_expired_leases(T0 + 29) == 0
    assert await queue.reclaim_expired_leases(T0 + 30) == 2
    again = await queue.lease(shard=0, owner="n2", limit=10, now=T0 + 31, lease_seconds=30)
    assert sorted(i.item_id for i in again) == sorted(i.item_id for i in leased)
    assert {i.attempts for i in again} == {2}
    assert await queue.reclaim_expired_leases(T0 + 61) == 2
    await queue.lease(shard=0, owner="n3", limit=10, now=T0 + 62, lease_seconds=30)
    assert await queue.reclaim_expired_leases(T0 + 92) == 2  # third attempt: max_attempts
    state = await queue.message_state("m")
    assert state["states"]["dead"] == 2
    assert state["reasons"] == {"TooManyAttempts": 2}
    assert state["state"] == "done"


async def test_retry_is_not_leased_before_its_time(queue: QueueStore) -> None:
    await push(queue, "m", 1)
    (item,) = await queue.lease(shard=0, owner="n1", limit=1, now=T0, lease_seconds=30)
    assert (
        await queue.retry([item.item_id], not_before=T0 + 100, reason="TooManyRequests", now=T0 + 1)
        == 1
    )
    assert await queue.next_ready_time(0) == T0 + 100
    assert await lease_ids(queue, now=T0 + 99) == []
    (again,) = await queue.lease(shard=0, owner="n1", limit=1, now=T0 + 100, lease_seconds=30)
    assert (again.item_id, again.attempts) == (item.item_id, 2)
    state = await queue.message_state("m")
    assert state["devices"][0]["reason"] == "TooManyRequests"


async def test_expired_messages_are_never_leased(queue: QueueStore) -> None:
    await push(queue, "short", 3, expiration=T0 + 10)
    await push(queue, "other", 2, expiration=T0 + 10)
    await push(queue, "long", 1, priority=1)
    assert await queue.expire_due(T0 + 5) == 0
    assert await queue.expire_due(T0 + 10) == 5
    assert await lease_ids(queue, now=T0 + 11) == ["long"]
    state = await queue.message_state("short")
    assert state["state"] == "done"
    assert state["states"]["expired"] == 3
    assert state["outcomes"] == {"expired": 3}
    # Without a sweep, lease itself refuses to hand out an expired message.
    await push(queue, "lazy", 2, expiration=T0 + 20, now=T0 + 15)
    assert await lease_ids(queue, now=T0 + 21) == []
    assert (await queue.message_state("lazy"))["states"]["expired"] == 2


async def test_ack_records_outcomes_once_and_settles_the_message(queue: QueueStore) -> None:
    await push(queue, "m", 3)
    a, b, c = await queue.lease(shard=0, owner="n1", limit=3, now=T0, lease_seconds=30)
    results = [
        ItemResult(a.item_id, "sent", "success", None, "apns-1"),
        ItemResult(b.item_id, "dead", "token_dead", "Unregistered", "apns-2"),
    ]
    assert await queue.ack(results, now=T0 + 1) == 2
    assert await queue.ack(results, now=T0 + 2) == 0  # already final: unchanged
    assert (await queue.message_state("m"))["state"] == "active"
    # c's lease ran out and was reclaimed, but the late ack still counts: no resend.
    assert await queue.reclaim_expired_leases(T0 + 30) == 1
    assert (
        await queue.ack([ItemResult(c.item_id, "sent", "success", None, "apns-3")], now=T0 + 31)
        == 1
    )
    assert await lease_ids(queue, now=T0 + 32) == []
    state = await queue.message_state("m")
    assert state["state"] == "done"
    assert state["states"] == {
        "queued": 0,
        "leased": 0,
        "sent": 2,
        "failed": 0,
        "expired": 0,
        "skipped": 0,
        "dead": 1,
    }
    assert state["outcomes"] == {"success": 2, "token_dead": 1}
    assert {d["apns_id"] for d in state["devices"]} == {"apns-1", "apns-2", "apns-3"}
    with pytest.raises(ValueError):
        await queue.ack([ItemResult(a.item_id, "queued")], now=T0)  # type: ignore[arg-type]


async def test_message_state_pages_per_device_outcomes(queue: QueueStore) -> None:
    await push(queue, "m", 25)
    pages = [await queue.message_state("m", page=p, page_size=10) for p in range(4)]
    assert [len(p["devices"]) for p in pages] == [10, 10, 5, 0]
    assert pages[0]["pages"] == 3
    seen = [d["device_id"] for p in pages for d in p["devices"]]
    assert seen == [f"m-{i:06d}" for i in range(25)]
    assert pages[0]["states"]["queued"] == 25
    with pytest.raises(UnknownMessage):
        await queue.message_state("nope")


async def test_enqueue_is_idempotent_and_needs_a_known_message(queue: QueueStore) -> None:
    await push(queue, "m", 5)
    assert await queue.enqueue("m", items("m", 8), now=T0) == 3
    assert (await queue.counts())["items"]["queued"] == 8
    message_row = await queue.get_message("m")
    assert message_row is not None and message_row.enqueued == 8
    with pytest.raises(UnknownMessage):
        await queue.enqueue("missing", items("x", 1), now=T0)


async def test_shards_are_leased_separately(queue: QueueStore) -> None:
    await queue.create_message(message("m", audience=4))
    await queue.enqueue("m", items("a", 2, shard=0) + items("b", 2, shard=1), now=T0)
    assert await queue.next_ready_time(1) == T0
    assert await queue.next_ready_time(7) is None
    zero = await queue.lease(shard=0, owner="n0", limit=10, now=T0, lease_seconds=30)
    one = await queue.lease(shard=1, owner="n1", limit=10, now=T0, lease_seconds=30)
    assert [i.device_id for i in zero] == ["a-000000", "a-000001"]
    assert [i.device_id for i in one] == ["b-000000", "b-000001"]


async def test_fewer_nodes_take_over_the_queued_items_of_the_shards_that_went(
    queue: QueueStore,
) -> None:
    await queue.create_message(message("m", audience=5))
    rows = [
        ItemRow("on-0", 0, b"c0"),
        ItemRow("on-2", 2, b"c2"),
        ItemRow("on-3", 3, b"c3"),
        ItemRow("later-on-3", 3, b"c4", not_before=T0 + 60),  # deferred: moves too
    ]
    await queue.enqueue("m", rows, now=T0)
    (leased,) = await queue.lease(shard=2, owner="old", limit=1, now=T0, lease_seconds=30)
    await queue.ack([ItemResult(leased.item_id, "sent", "success")], now=T0)  # finished
    await queue.create_message(message("m2", audience=1))
    await queue.enqueue("m2", [ItemRow("on-2b", 2, b"c5")], now=T0)
    assert await queue.reshard(2) == 3  # on-2b, on-3, later-on-3; the finished one stays
    assert await queue.reshard(2) == 0
    assert await queue.next_ready_time(3) is None
    got = await queue.lease(shard=1, owner="n1", limit=10, now=T0 + 60, lease_seconds=30)
    assert sorted(i.device_id for i in got) == ["later-on-3", "on-3"]
    got = await queue.lease(shard=0, owner="n0", limit=10, now=T0, lease_seconds=30)
    assert sorted(i.device_id for i in got) == ["on-0", "on-2b"]
    assert leased.device_id == "on-2"
    row = await queue.store.fetchone("SELECT shard, state FROM items WHERE device_id = 'on-2'")
    assert row is not None and (row["shard"], row["state"]) == (2, "sent")  # history as it was


async def test_everything_survives_closing_and_reopening(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite"
    async with open_store(path) as store:
        queue = QueueStore(store)
        await push(queue, "m", 10, expiration=T0 + 3600)
        leased = await queue.lease(shard=0, owner="n1", limit=4, now=T0, lease_seconds=30)
        await queue.ack([ItemResult(leased[0].item_id, "sent", "success", None, "id-0")], now=T0)
        before = (await queue.counts(), await queue.message_state("m", page_size=100))
    async with open_store(path) as store:
        queue = QueueStore(store)
        assert (await queue.counts(), await queue.message_state("m", page_size=100)) == before
        assert before[0]["items"] == {
            "queued": 6,
            "leased": 3,
            "sent": 1,
            "failed": 0,
            "expired": 0,
            "skipped": 0,
            "dead": 0,
        }
        reopened = await queue.get_message("m")
        assert reopened == replace(message("m", audience=10, expiration=T0 + 3600), enqueued=10)
        assert await queue.reclaim_expired_leases(T0 + 30) == 3
        assert len(await lease_ids(queue, now=T0 + 31)) == 9


async def test_items_enqueued_as_skipped_are_never_leased(queue: QueueStore) -> None:
    await queue.create_message(message("m", audience=3))
    batch = [
        ItemRow("ok", 0, b"c1"),
        ItemRow("no-alerts", 0, b"c2", skip_reason="alert_not_permitted"),
        ItemRow("refused", 0, b"c3", skip_reason="category_refused"),
    ]
    assert await queue.enqueue("m", batch, now=T0) == 3
    leased = await queue.lease(shard=0, owner="n", limit=9, now=T0, lease_seconds=9)
    assert [i.device_id for i in leased] == ["ok"]
    state = await queue.message_state("m")
    assert state["states"]["skipped"] == 2
    assert state["reasons"] == {"alert_not_permitted": 1, "category_refused": 1}
    assert state["outcomes"] == {"skipped": 2}
    await queue.create_message(message("all-skipped", audience=1))
    await queue.enqueue("all-skipped", [ItemRow("x", 0, b"c", skip_reason="r")], now=T0)
    assert (await queue.message_state("all-skipped"))["state"] == "done"


async def test_a_deferred_retry_does_not_hold_back_ready_items(queue: QueueStore) -> None:
    await push(queue, "first", 1, priority=10)
    await push(queue, "second", 1, priority=1)
    (item,) = await queue.lease(shard=0, owner="n", limit=1, now=T0, lease_seconds=30)
    assert item.message_id == "first"
    await queue.retry([item.item_id], not_before=T0 + 100, reason="ServiceUnavailable", now=T0)
    (second,) = await queue.lease(shard=0, owner="n", limit=9, now=T0 + 50, lease_seconds=30)
    assert second.message_id == "second"
    assert await queue.next_ready_time(0) == T0 + 80  # second's lease, to reclaim
    await queue.ack([ItemResult(second.item_id, "sent", "success")], now=T0 + 51)
    assert await queue.next_ready_time(0) == T0 + 100
    assert await lease_ids(queue, now=T0 + 100) == ["first"]
    assert await queue.next_ready_time(0) == T0 + 130  # its lease, to reclaim


async def test_scheduled_items_wait_for_not_before(queue: QueueStore) -> None:
    await queue.create_message(message("later", audience=1))
    await queue.enqueue("later", [ItemRow("d", 0, b"c", not_before=T0 + 60)], now=T0)
    assert await lease_ids(queue, now=T0 + 59) == []
    assert await queue.next_ready_time(0) == T0 + 60
    assert await lease_ids(queue, now=T0 + 60) == ["later"]


async def test_upgrading_a_version_3_queue_keeps_future_items_deferred(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite"
    far = 4_000_000_000.0  # a not_before well after the migration runs
    async with open_store(path, migrations=MIGRATIONS[:3]) as store:
        await store.execute(
            "INSERT INTO messages (message_id, payload, priority, push_type, created_at,"
            " target, meta, audience, state) VALUES ('m', ?, 10, 'alert', 0, ?, ?, 2, 'active')",
            (b"\x80", b"\x80", b"\x80"),
        )
        await store.executemany(
            "INSERT INTO items (message_id, device_id, shard, idcode, priority, rank,"
            " enqueued_at, not_before, state, updated_at)"
            " VALUES ('m', ?, 0, x'00', 10, 0, 0, ?, 'queued', 0)",
            [("now", 0.0), ("later", far)],
        )
    async with open_store(path) as store:
        queue = QueueStore(store)
        leased = await queue.lease(shard=0, owner="n", limit=9, now=T0, lease_seconds=9)
        assert [i.device_id for i in leased] == ["now"]
        assert await queue.next_ready_time(0) == T0 + 9
        await queue.ack([ItemResult(leased[0].item_id, "sent", "success")], now=T0)
        assert await queue.next_ready_time(0) == far
        assert [
            i.device_id
            for i in await queue.lease(shard=0, owner="n", limit=9, now=far, lease_seconds=9)
        ] == ["later"]


async def test_two_connections_leasing_at_once_never_share_an_item(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite"
    async with open_store(path) as first, open_store(path) as second:
        await push(QueueStore(first), "m", 2000)
        seen: dict[str, list[int]] = {"a": [], "b": []}
        first_leases = {"a": trio.Event(), "b": trio.Event()}

        async def node(name: str, queue: QueueStore) -> None:
            while leased := await queue.lease(
                shard=0, owner=name, limit=50, now=T0, lease_seconds=60
            ):
                seen[name].extend(i.item_id for i in leased)
                # Both have leased once before either goes on (SQLite's busy handler
                # is not fair: one connection could otherwise take every item).
                first_leases[name].set()
                for event in first_leases.values():
                    await event.wait()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(node, "a", QueueStore(first))
            nursery.start_soon(node, "b", QueueStore(second))
        both = seen["a"] + seen["b"]
        assert len(both) == len(set(both)) == 2000
        assert seen["a"] and seen["b"]


async def test_purge_removes_only_messages_finished_before_the_cutoff(queue: QueueStore) -> None:
    await push(queue, "old", 7)
    await push(queue, "recent", 2)
    await push(queue, "running", 3)
    for message_id, at in (("old", T0 + 10), ("recent", T0 + 100)):
        leased = await queue.lease(shard=0, owner="n", limit=100, now=at, lease_seconds=9)
        mine = [i for i in leased if i.message_id == message_id]
        others = [i.item_id for i in leased if i.message_id != message_id]
        await queue.ack([ItemResult(i.item_id, "sent", "success") for i in mine], now=at)
        await queue.retry(others, not_before=at, reason="later", now=at)
    deleted = []
    while n := await queue.purge_finished(before=T0 + 50, max_items=3):
        assert n <= 4  # at most max_items items, plus the message row
        deleted.append(n)
    assert sum(deleted) == 7 + 1
    assert await queue.get_message("old") is None
    assert (await queue.message_state("recent"))["states"]["sent"] == 2
    assert (await queue.message_state("running"))["states"]["queued"] == 3


async def test_express_and_ordinary_leases_split_the_urgent_items_from_the_rest(
    queue: QueueStore,
) -> None:
    await push(queue, "bulk", 4, priority=5)
    await push(queue, "urgent", 2, priority=10)

    async def lease(priorities: str, limit: int = 10) -> list[str]:
        leased = await queue.store.transaction(
            lambda conn: queue.lease_in(
                conn, shard=0, owner="n", limit=limit, now=T0, lease_seconds=30, priorities=priorities  # type: ignore[arg-type]
            )
        )
        return [item.message_id for item in leased]

    assert await lease("ordinary", limit=2) == ["bulk", "bulk"]  # urgent ones are skipped
    assert await lease("urgent") == ["urgent", "urgent"]
    assert await lease("urgent") == []  # and nothing else
    assert await lease("all") == ["bulk", "bulk"]


async def test_ordinary_wakes_never_crowd_out_an_urgent_one() -> None:
    from actors.queue import WAKE_SLOTS, wake

    send, recv = trio.open_memory_channel[bool](WAKE_SLOTS)
    for _ in range(10):  # a fan-out reporting page after page to a busy node
        wake([send], 0)
    wake([send], 0, urgent=True)
    pending = []
    while True:
        try:
            pending.append(recv.receive_nowait())
        except trio.WouldBlock:
            break
    assert pending == [False] * (WAKE_SLOTS // 2) + [True]


async def test_a_wedged_sweep_stops_the_queue_actors_heartbeat(
    tmp_path: Path, virtual_clock: trio.testing.MockClock
) -> None:
    from actors.base import ActorContext, Heartbeat
    from actors.idcode import CodeKeys
    from actors.live import Live, LiveRef
    from actors.queue import SWEEP_STALL, QueueActor
    from actors.rules import Classifier

    async with open_store(tmp_path / "q.sqlite", write_timeout=1e9) as store:
        send, recv = trio.open_memory_channel[Any](8)
        ctx = ActorContext("queue", Heartbeat(1.0))
        live = LiveRef(Live(classifier=Classifier([]), codes=CodeKeys({"k1": b"k" * 32}, "k1"), sweep_interval=5.0))
        actor = QueueActor(ctx, inbox=recv, queue=QueueStore(store), live=live, wakes=[])
        sweeps = 0
        real_sweep = actor.sweep

        async def sweep() -> None:  # the first sweep is real; the next one never ends
            nonlocal sweeps
            sweeps += 1
            if sweeps > 1:
                await trio.sleep_forever()
            await real_sweep()

        actor.sweep = sweep  # type: ignore[method-assign]
        async with send, trio.open_nursery() as nursery:
            nursery.start_soon(advance_when_idle, virtual_clock, store)
            await nursery.start(actor.run)
            await trio.sleep(SWEEP_STALL / 2)  # wedged, but not for long yet: still beating
            assert sweeps == 2 and ctx.heartbeat.age() <= 1.5
            await trio.sleep(SWEEP_STALL)
            # Wedged since the sweep at 5 s: no beats after 5 s + SWEEP_STALL, so the
            # watchdog fires once the age passes heartbeat_timeout.
            assert ctx.heartbeat.age() > 10
            nursery.cancel_scope.cancel()


async def test_new_items_are_leased_for_a_hand_over_and_given_back_if_it_fails(queue: QueueStore) -> None:
    await push(queue, "old", 2)  # queued earlier: not part of the hand-over
    await push(queue, "m1", 3)
    await push(queue, "m2", 1)
    rows = [message("m1", audience=3), message("m2")]

    def lease(conn: sqlite3.Connection) -> list[LeasedItem]:
        return queue.lease_new_in(conn, rows, shard=0, owner="node-0", limit=3, now=T0, lease_seconds=30)

    leased = await queue.store.transaction(lease)
    assert [(i.message_id, i.attempts, i.lease_owner) for i in leased] == [("m1", 1, "node-0")] * 3
    assert leased[0].message is rows[0]  # as given, not read back
    rest = await queue.store.transaction(lease)  # the limit left m2's item for the next one
    assert [i.message_id for i in rest] == ["m2"]
    # Not handed over after all: back in the queue, the attempt not counted; another
    # owner's lease on the same ids is not touched.
    assert await queue.unlease([i.item_id for i in leased], owner="node-1") == 0
    assert await queue.unlease([i.item_id for i in leased], owner="node-0") == 3
    again = await queue.lease(shard=0, owner="n1", limit=10, now=T0 + 1, lease_seconds=30)
    assert sorted((i.message_id, i.attempts) for i in again) == [("m1", 1)] * 3 + [("old", 1)] * 2
