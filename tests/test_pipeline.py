"""The push pipeline end to end through the control socket, against the embedded
simulator, whose request log is the ground truth."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from pushd.client import RequestFailed
from tests.pipeline_helpers import alert, call, device, reached, running, settled, simulator


async def register_all(root: Path, regs: list[dict]) -> dict[str, str]:
    tokens = {}
    for reg in regs:
        await call(root, "register", **reg)
        tokens[reg["device_id"]] = reg["token"]
    return tokens


async def test_targets_reach_exactly_the_right_devices(short_tmp: Path) -> None:
    regs = [
        device("d1", "u1", app_version="1.5.0"),
        device("d2", "u1"),
        device("d3", "u2", attributes={"tier": "gold"}),
        device("d4", "u3", attributes={"tier": "silver"}),
        device("d5", "u4", topic="com.other.app"),
    ]
    async with running(short_tmp) as daemon:
        tok = await register_all(short_tmp, regs)

        async def push_to(target: dict) -> set[str]:
            accepted = await call(short_tmp, "push", notification=alert(), target=target)
            state = await settled(short_tmp, accepted["message_id"])
            assert state["states"]["sent"] == len(reached(daemon, accepted["message_id"]))
            return {d for d, t in tok.items() if t in reached(daemon, accepted["message_id"])}

        assert await push_to({"devices": ["d2", "d4"]}) == {"d2", "d4"}
        assert await push_to({"users": ["u1"]}) == {"d1", "d2"}
        assert await push_to({"classes": ["needs-update"]}) == {"d1"}
        assert await push_to({"classes": ["vip"]}) == {"d3"}
        assert await push_to({"filter": {"field": "user.attributes.tier", "in": ["gold", "silver"]}}) == {"d3", "d4"}
        assert await push_to({"all": True}) == {"d1", "d2", "d3", "d4"}  # d5 is another app

        # every request carried a valid identification and the standard headers
        for r in simulator(daemon).requests:
            assert r.headers["apns-topic"] == "com.example.app"
            assert r.status == 200, (r.status, r.reason)


async def test_invalid_input_names_the_field_and_stores_nothing(short_tmp: Path) -> None:
    async with running(short_tmp):
        cases = [
            ({"notification": alert(), "target": {"devicez": ["x"]}}, "target.devicez"),
            ({"notification": alert(), "target": {"classes": ["nope"]}}, "target.classes"),
            ({"notification": alert(), "target": {"all": True}, "priority": 42}, "priority"),
            ({"notification": {"aps": {"alert": 5}, "topic": "com.example.app"}, "target": {"all": True}}, "notification.aps.alert"),
            ({"notification": alert(), "target": {"filter": {"field": "device.os_version", "semver_lt": 17}}}, "target.filter.semver_lt"),
            ({"notification": alert(), "target": {"all": True}, "colour": "red"}, "colour"),
            ({"notification": alert(), "target": {"all": True}, "ttl": 1e30}, "ttl"),
            ({"notification": alert(), "target": {"all": True}, "expiration": 2**62}, "expiration"),
            ({"notification": alert(expiration=1), "target": {"all": True}}, "notification.expiration"),
        ]
        for args, field in cases:
            with pytest.raises(RequestFailed) as info:
                await call(short_tmp, "push", **args)
            assert info.value.code == "invalid_argument"
            assert info.value.field == field, (field, info.value.message)
        with pytest.raises(RequestFailed) as info:
            await call(short_tmp, "register", **device("bad", "u1", time_zone="Mars/Base"))
        assert info.value.field == "time_zone"
        with pytest.raises(RequestFailed) as info:
            await call(short_tmp, "register", **device("bad", "u1", token="xyz"))
        assert info.value.field == "token"
        stats = await call(short_tmp, "stats")
        assert stats["queue"]["messages"] == {}
        with pytest.raises(RequestFailed) as info:
            await call(short_tmp, "device", device_id="bad")
        assert info.value.code == "not_found"


async def test_stale_class_and_permission_skips_are_recorded(short_tmp: Path) -> None:
    async with running(short_tmp) as daemon:
        tok = await register_all(
            short_tmp,
            [
                device("old", "u1", app_version="1.0.0"),
                device("nobg", "u2", permissions={"background": False}),
                device("nopromo", "u3", permissions={"categories_refused": ["promo"]}),
                device("ok", "u4"),
            ],
        )
        promo = await call(
            short_tmp, "push", notification=alert(aps={"alert": "sale", "category": "promo"}), target={"all": True}
        )
        state = await settled(short_tmp, promo["message_id"])
        assert state["reasons"].get("category_refused") == 1
        assert {d for d, t in tok.items() if t in reached(daemon, promo["message_id"])} == {"old", "nobg", "ok"}

        bg = await call(
            short_tmp,
            "push",
            notification={"aps": {"content-available": 1}, "push_type": "background", "topic": "com.example.app"},
            target={"devices": ["nobg", "ok"]},
            priority=5,
        )
        state = await settled(short_tmp, bg["message_id"])
        assert state["reasons"] == {"no_background_permission": 1}
        assert set(reached(daemon, bg["message_id"])) == {tok["ok"]}


async def test_dead_token_is_retired_and_not_used_again(short_tmp: Path) -> None:
    async with running(short_tmp) as daemon:
        tok = await register_all(short_tmp, [device("gone", "u1"), device("here", "u2")])
        await trio.sleep(0.01)
        simulator(daemon).set_token_state(tok["gone"], unregistered_at_ms=int(time.time() * 1000))
        first = await call(short_tmp, "push", notification=alert(), target={"all": True})
        state = await settled(short_tmp, first["message_id"])
        assert state["reasons"] == {"Unregistered": 1}
        assert (await call(short_tmp, "device", device_id="gone"))["active"] is False
        before = len(simulator(daemon).requests)
        second = await call(short_tmp, "push", notification=alert(), target={"all": True})
        assert second["targeted"] == 1
        await settled(short_tmp, second["message_id"])
        assert [r.token for r in simulator(daemon).requests[before:]] == [tok["here"]]
        # a registration newer than APNs's timestamp revives it
        await trio.sleep(0.01)
        await call(short_tmp, "register", **device("gone", "u1", token=tok["gone"]))
        assert (await call(short_tmp, "device", device_id="gone"))["active"] is True


async def enqueue_direct(
    daemon, device_id: str, *, user_id: str, class_id: str, delay: float = 0.5, tamper=None, priority: int = 10,
    target: dict | None = None,
) -> str:
    """A pre-push message written straight into the queue (as central would), due after
    ``delay`` seconds so the test can change the world before a node sees it."""
    import uuid

    from actors.idcode import IdCode
    from actors.queuestore import ItemRow, MessageRow

    p = daemon.pipeline
    live = p.live.current
    message_id = str(uuid.uuid4())
    now = time.time()
    await p.queue.create_message(
        MessageRow(
            message_id=message_id,
            notification={**alert(), "collapse_id": message_id},
            priority=priority,
            push_type="alert",
            created_at=now,
            audience=1,
            target=target or {"devices": [device_id]},
            expiration=now + 600,
            collapse_id=message_id,
        )
    )
    sealed = live.codes.seal(IdCode(message_id, device_id, user_id, class_id, int(now * 1000)))
    if tamper is not None:
        sealed = tamper(sealed)
    shard = live.shard_of(device_id)
    await p.queue.enqueue(message_id, [ItemRow(device_id, shard, sealed, not_before=now + delay)], now=now)
    return message_id


async def test_forged_or_altered_codes_and_moved_devices_are_never_sent(short_tmp: Path) -> None:
    from actors.idcode import CodeKeys, IdCode

    async with running(short_tmp) as daemon:
        tok = await register_all(short_tmp, [device("d1", "u1"), device("d2", "u2")])
        forger = CodeKeys({"k1": b"x" * 32}, "k1")  # same key id, wrong secret

        def forge(sealed: bytes) -> bytes:
            return forger.seal(IdCode("m", "d1", "u1", "everyone", 1))

        def flip(sealed: bytes) -> bytes:
            return sealed[:-1] + bytes([sealed[-1] ^ 1])

        forged = await enqueue_direct(daemon, "d1", user_id="u1", class_id="everyone", tamper=forge, delay=0)
        altered = await enqueue_direct(daemon, "d1", user_id="u1", class_id="everyone", tamper=flip, delay=0)
        wrong_user = await enqueue_direct(daemon, "d2", user_id="u1", class_id="everyone", delay=0)
        moved = await enqueue_direct(daemon, "d1", user_id="u1", class_id="everyone", delay=1.0)
        # d1 moves to another user before the node gets to the message sealed for u1
        await call(short_tmp, "register", **device("d1", "u9", token=tok["d1"]))
        for mid, reason in [
            (forged, "invalid_code:bad_seal"),
            (altered, "invalid_code:bad_seal"),
            (wrong_user, "user_changed"),
            (moved, "user_changed"),
        ]:
            state = await settled(short_tmp, mid)
            assert state["reasons"] == {reason: 1}, (mid, state["reasons"])
            assert reached(daemon, mid) == {}
        assert simulator(daemon).requests == []


async def test_device_updated_since_classification_is_not_sent_the_update_notice(short_tmp: Path) -> None:
    async with running(short_tmp) as daemon:
        tok = await register_all(short_tmp, [device("old", "u1", app_version="1.2.0")])
        to_class = {"classes": ["needs-update"]}
        mid = await enqueue_direct(daemon, "old", user_id="u1", class_id="needs-update", delay=1.0, target=to_class)
        # the same device's class, sealed in a push to the device itself: incidental
        own = await enqueue_direct(daemon, "old", user_id="u1", class_id="needs-update", delay=1.0)
        await call(short_tmp, "register", **device("old", "u1", token=tok["old"], app_version="2.0.0"))
        state = await settled(short_tmp, mid)
        assert state["reasons"] == {"class_changed": 1}
        assert reached(daemon, mid) == {}
        assert (await settled(short_tmp, own))["states"]["sent"] == 1


async def test_a_single_device_push_overtakes_a_running_broadcast(short_tmp: Path) -> None:
    from actors.registry import Registration

    async with running(short_tmp, nodes=1) as daemon:
        regs = [device(f"b{i:04d}", f"u{i}") for i in range(600)]
        await daemon.pipeline.registry.register_many(
            [Registration(**{k: v for k, v in r.items()}) for r in regs], now_ms=int(time.time() * 1000)
        )
        await register_all(short_tmp, [device("vip", "boss")])
        simulator(daemon).config.response_delay = 0.002
        broadcast = await call(short_tmp, "push", notification=alert("sale"), target={"all": True}, priority=5)
        with trio.fail_after(20):
            await simulator(daemon).wait_for_requests(100)  # the broadcast is being sent
        single = await call(short_tmp, "push", notification=alert("for you"), target={"devices": ["vip"]}, priority=10)
        await settled(short_tmp, single["message_id"])
        state = await settled(short_tmp, broadcast["message_id"])
        assert state["states"]["sent"] == 601
        order = [r.headers.get("apns-collapse-id") for r in simulator(daemon).requests]
        position = order.index(single["message_id"])
        assert position < len(order) - 100, f"single push answered at {position} of {len(order)}"
        # The broadcast's lanes stepped aside for it, and the urgency ended with it.
        stats = await call(short_tmp, "stats")
        assert stats["urgent"]["bulk_steps_aside"] > 0 and stats["urgent"]["in_flight"] == 0


async def test_an_urgent_push_takes_the_express_lane_while_every_ordinary_lane_is_busy(
    short_tmp: Path,
) -> None:
    from actors.registry import Registration

    # One node, batch 50 over 4 lanes: 48 broadcast notifications in flight, each answered
    # only after 2 s, so every ordinary lane waits ~2 s per round.
    async with running(short_tmp, nodes=1) as daemon:
        regs = [device(f"b{i:04d}", f"u{i}") for i in range(150)]
        await daemon.pipeline.registry.register_many(
            [Registration(**r) for r in regs], now_ms=int(time.time() * 1000)
        )
        await register_all(short_tmp, [device("vip", "boss")])
        sim = simulator(daemon)
        sim.config.response_delay = 2.0
        broadcast = await call(short_tmp, "push", notification=alert("sale"), target={"all": True}, priority=5)
        with trio.fail_after(20):
            await sim.wait_for_received(48)  # the first round is in flight: no lane is free
        single = await call(short_tmp, "push", notification=alert("for you"), target={"devices": ["vip"]}, priority=10)
        await settled(short_tmp, single["message_id"])
        answered = {r.headers.get("apns-collapse-id"): r.time for r in sim.requests}
        first_round = min(r.time for r in sim.requests)
        # Sent by the express lane at once, so answered with the first round; through an
        # ordinary lane it would have waited for a lane and been answered 2 s later.
        assert answered[single["message_id"]] - first_round < 1.2
        sim.config.response_delay = 0.0
        state = await settled(short_tmp, broadcast["message_id"])
        assert state["states"]["sent"] == 151  # the broadcast reached vip too


async def test_an_urgent_push_is_handed_to_its_node_and_an_urgent_backlog_still_drains(
    short_tmp: Path,
) -> None:
    async with running(short_tmp, nodes=1) as daemon:
        tok = await register_all(short_tmp, [device(f"d{i}", f"u{i}") for i in range(80)])
        handed = lambda stats: stats["deliveries"].get("handed_over", 0)  # noqa: E731
        urgent = await call(short_tmp, "push", notification=alert("now"), target={"devices": ["d0"]}, priority=10)
        await settled(short_tmp, urgent["message_id"])
        # Leased in the accepting transaction and handed to the express lane in memory.
        assert handed(await call(short_tmp, "stats")) == 1
        normal = await call(short_tmp, "push", notification=alert("later"), target={"devices": ["d1"]}, priority=5)
        await settled(short_tmp, normal["message_id"])
        assert handed(await call(short_tmp, "stats")) == 1  # ordinary work is leased by the lanes
        # A burst while the express lane waits on slow answers: more than its inbox holds
        # (at most 3 hand-offs of a lane round, 12 items, each); the rest it leases.
        simulator(daemon).config.response_delay = 0.5
        ids: list[str] = []

        async def one(i: int) -> None:
            answer = await call(short_tmp, "push", notification=alert(f"n{i}"), target={"devices": [f"d{i}"]}, priority=10)
            ids.append(answer["message_id"])

        async with trio.open_nursery() as nursery:
            for i in range(2, 80):
                nursery.start_soon(one, i)
        for message_id in ids:
            await settled(short_tmp, message_id)
        delivered = [reached(daemon, m) for m in ids]
        assert all(list(d.values()) == [1] for d in delivered)  # each once, none twice
        assert {t for d in delivered for t in d} == {tok[f"d{i}"] for i in range(2, 80)}
        stats = await call(short_tmp, "stats")
        assert stats["queue"]["items"]["sent"] == 80 and 1 < handed(stats) < 79  # some via the lease path


async def test_a_hand_off_whose_lease_is_ending_is_left_to_the_queue_not_sent_twice(short_tmp: Path) -> None:
    from actors.messages import Handoff

    async with running(short_tmp, nodes=1) as daemon:
        tok = await register_all(short_tmp, [device("d0", "u0")])
        p = daemon.pipeline
        # Due in 2 s, so no lane leases it first; leased here as due, for 1 s.
        mid = await enqueue_direct(daemon, "d0", user_id="u0", class_id="everyone", delay=2.0)
        # As if a hand-off had waited in the inbox (a node restarting) until its lease was
        # nearly over: the sweep is about to hand the item out again.
        leased = await p.queue.lease(shard=0, owner="node-0", limit=1, now=time.time() + 2.0, lease_seconds=1.0)
        assert [i.message_id for i in leased] == [mid]
        records = await p.registry.get_many(["d0"])
        p.handoff_sends[0].send_nowait(Handoff(leased, records))
        await settled(short_tmp, mid)
        assert reached(daemon, mid) == {tok["d0"]: 1}  # sent once: by the lane that re-leased it
        stats = await call(short_tmp, "stats")
        assert stats["deliveries"]["handoffs_stale"] == 1 and stats["urgent"]["in_flight"] == 0


async def test_a_hand_off_that_waited_is_checked_against_the_devices_as_they_are_now(short_tmp: Path) -> None:
    async with running(short_tmp, nodes=1) as daemon:
        tok = await register_all(short_tmp, [device(f"d{i}", f"u{i}") for i in range(5)])
        sim = simulator(daemon)
        sim.config.response_delay = 1.0
        # Four urgent pushes on slow answers take every express round (EXPRESS_ROUNDS) ...
        for i in range(1, 5):
            await call(short_tmp, "push", notification=alert(f"n{i}"), target={"devices": [f"d{i}"]}, priority=10)
        # ... so the fifth, handed over in memory with d0's record as it was, waits.
        urgent = await call(short_tmp, "push", notification=alert("for u0"), target={"devices": ["d0"]}, priority=10)
        # Meanwhile d0 moves to another user, who does not allow alerts.
        await call(short_tmp, "register", **device("d0", "u9", token=tok["d0"], permissions={"alert": False}))
        state = await settled(short_tmp, urgent["message_id"])
        assert reached(daemon, urgent["message_id"]) == {}
        assert state["reasons"] == {"user_changed": 1}, state["reasons"]
        stats = await call(short_tmp, "stats")
        assert stats["deliveries"]["handed_over"] == 5 and stats["deliveries"]["handoffs_reread"] >= 1


async def test_bulk_registration_is_all_or_nothing(short_tmp: Path) -> None:
    async with running(short_tmp):
        good = [device(f"m{i}", "u1") for i in range(5)]
        bad = [*good[:2], device("mx", "u1", locale="??")]
        with pytest.raises(RequestFailed) as info:
            await call(short_tmp, "register_many", devices=[device("z1", "u1"), *bad])
        assert info.value.field == "devices[3].locale"
        with pytest.raises(RequestFailed):
            await call(short_tmp, "device", device_id="z1")
        result = await call(short_tmp, "register_many", devices=good)
        assert result == {"registered": 5, "changes": {"registered": 5}}
        assert (await call(short_tmp, "device", device_id="m4"))["user_id"] == "u1"


async def test_retention_purges_finished_messages_and_old_data(short_tmp: Path) -> None:
    import trio as _trio

    from actors.base import ActorContext, Heartbeat
    from actors.queue import QueueActor

    async with running(short_tmp) as daemon:
        await register_all(short_tmp, [device("d1", "u1", consent={"events": True, "event_kinds": ["x"]})])
        done = await call(short_tmp, "push", notification=alert(), target={"all": True})
        await settled(short_tmp, done["message_id"])
        await call(short_tmp, "report", user_id="u1", name="x")
        p = daemon.pipeline
        _, recv = _trio.open_memory_channel(1)
        janitor = QueueActor(ActorContext("t", Heartbeat(1)), inbox=recv, queue=p.queue, live=p.live, wakes=[])
        assert await janitor.purge(time.time() - 3600) == 0  # nothing is old enough yet
        assert await janitor.purge(time.time() + 1) >= 3  # item, message, event
        with pytest.raises(RequestFailed) as info:
            await call(short_tmp, "message", message_id=done["message_id"])
        assert info.value.code == "not_found"
        assert await p.store.fetchall("SELECT * FROM events") == []


async def test_retryable_answers_go_back_to_the_queue_and_are_sent_later(short_tmp: Path) -> None:
    async with running(short_tmp) as daemon:
        tok = await register_all(short_tmp, [device("d1", "u1")])
        # More failures than the sender retries at once (apns.max_attempts = 3): the item
        # goes back to the durable queue with backoff and is leased again.
        simulator(daemon).inject(503, "ServiceUnavailable", count=4, token=tok["d1"])
        accepted = await call(short_tmp, "push", notification=alert(), target={"devices": ["d1"]})
        state = await settled(short_tmp, accepted["message_id"])
        assert state["states"]["sent"] == 1
        assert state["devices"][0]["attempts"] == 2
        statuses = [r.status for r in simulator(daemon).requests if r.token == tok["d1"]]
        assert statuses == [503, 503, 503, 503, 200]


async def test_a_notification_is_never_sent_after_its_own_expiration(short_tmp: Path) -> None:
    from actors.registry import Registration

    async with running(short_tmp, nodes=1) as daemon:
        regs = [device(f"b{i:04d}", f"u{i}") for i in range(600)]
        await daemon.pipeline.registry.register_many(
            [Registration(**r) for r in regs], now_ms=int(time.time() * 1000)
        )
        await register_all(short_tmp, [device("x", "ux"), device("y", "uy")])
        # A slow broadcast ahead of them keeps two low-priority pushes queued past the
        # notification's own expiration (its apns-expiration; no ttl given) ...
        sim = simulator(daemon)
        sim.config.response_delay = 0.4  # the broadcast takes ~5 s to drain
        await call(short_tmp, "push", notification=alert("sale"), target={"all": True}, priority=5)
        with trio.fail_after(20):
            await sim.wait_for_requests(20)
        expires = int(time.time()) + 2  # 1-2 s ahead: never in the past when central takes it
        own = await call(
            short_tmp, "push", notification=alert("flash", expiration=expires),
            target={"devices": ["x"]}, priority=0,
        )  # fmt: skip
        # ... and the same expiry given to the push itself, the control.
        push_level = await call(
            short_tmp, "push", notification=alert("flash"), target={"devices": ["y"]},
            priority=0, expiration=expires,
        )  # fmt: skip
        row = await daemon.pipeline.queue.get_message(own["message_id"])
        assert row is not None and row.expiration == expires  # not the default ttl's day
        for accepted in (own, push_level):
            state = await settled(short_tmp, accepted["message_id"], deadline=60)
            assert state["states"]["expired"] == 1, (state["states"], state["reasons"])
            assert reached(daemon, accepted["message_id"]) == {}


async def test_a_burst_of_pushes_is_accepted_together_and_each_answered(short_tmp: Path) -> None:
    async with running(short_tmp) as daemon:
        tok = await register_all(short_tmp, [device(f"d{i}", f"u{i}") for i in range(10)])
        answers: dict[int, object] = {}

        async def one(i: int) -> None:
            target = {"devices": [f"d{i % 10}"]} if i != 7 else {"classes": ["no-such-class"]}
            try:
                answers[i] = await call(short_tmp, "push", notification=alert(f"n{i}"), target=target)
            except RequestFailed as exc:
                answers[i] = exc

        async with trio.open_nursery() as nursery:
            for i in range(40):
                nursery.start_soon(one, i)
        assert isinstance(answers[7], RequestFailed) and answers[7].field == "target.classes"
        accepted = {i: a for i, a in answers.items() if i != 7}
        assert all(isinstance(a, dict) and a["targeted"] == 1 for a in accepted.values())
        assert len({a["message_id"] for a in accepted.values()}) == 39  # type: ignore[index]
        for a in accepted.values():
            await settled(short_tmp, a["message_id"])  # type: ignore[index]
        assert sum(len(reached(daemon, a["message_id"])) for a in accepted.values()) == 39  # type: ignore[index]
        assert set(tok.values()) == {r.token for r in simulator(daemon).requests}


async def test_what_lives_as_long_as_the_daemon_is_out_of_the_collectors_way(short_tmp: Path) -> None:
    import gc

    gc.unfreeze()
    async with running(short_tmp):
        assert gc.get_freeze_count() > 0  # frozen once ready: full collections skip it
        gc.unfreeze()
        assert (await call(short_tmp, "reload"))["ok"]
        assert gc.get_freeze_count() > 0  # and again after a reload
    gc.unfreeze()  # leave the test process as it was


async def test_a_batch_in_flight_at_stop_is_finished_and_recorded(short_tmp: Path) -> None:
    from actors.storage import open_store

    async with running(short_tmp, nodes=1) as daemon:
        await register_all(short_tmp, [device("d1", "u1"), device("d2", "u1")])
        sim = simulator(daemon)
        sim.config.response_delay = 1.0
        pushed = await call(short_tmp, "push", notification=alert(), target={"devices": ["d1", "d2"]})
        with trio.fail_after(10):
            await sim.wait_for_received(2)  # in flight when the stop comes
    # Stopped (drained): the lane waited for the answers and wrote them in its last round.
    assert len(sim.requests) == 2
    async with open_store(short_tmp / "state" / "pushd.sqlite3") as store:
        rows = await store.fetchall(
            "SELECT state, lease_owner FROM items WHERE message_id = ?", (pushed["message_id"],)
        )
    assert [tuple(r) for r in rows] == [("sent", None), ("sent", None)]


async def test_pushes_waiting_for_central_at_shutdown_are_told_they_were_not_accepted(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A busy central (0.3 s per accept) with pushes waiting in its inbox when the drain
    # begins: each client hears either accepted (and the push is stored) or "unavailable:
    # not accepted" (and it is not); none is left to see its connection closed, not
    # knowing whether to send again.
    from actors.central import CentralActor

    slow_store = CentralActor._store_small

    async def busy(self: CentralActor, *args: object, **kwargs: object) -> object:
        await trio.sleep(0.3)
        return await slow_store(self, *args, **kwargs)  # type: ignore[arg-type]

    async def one_by_one(self: CentralActor, batch: list[Any]) -> None:
        for envelope in batch:
            await self._handle(envelope)

    monkeypatch.setattr(CentralActor, "_store_small", busy)
    monkeypatch.setattr(CentralActor, "_handle_many", one_by_one)
    outcomes: list[str] = []
    async with running(short_tmp, nodes=1) as daemon:
        await call(short_tmp, "register", **device("d1", "u1"))

        async def one(i: int) -> None:
            try:
                accepted = await call(short_tmp, "push", notification=alert(f"n{i}"), target={"devices": ["d1"]})
                outcomes.append(accepted["message_id"])
            except RequestFailed as e:
                assert e.code == "unavailable", e
                outcomes.append("not accepted")

        async with trio.open_nursery() as nursery:
            for i in range(10):  # arriving while central is busy with the ones before
                nursery.start_soon(one, i)
                await trio.sleep(0.05)
            daemon.request_stop()  # what SIGTERM does
        database = daemon.pipeline.store.path
    with sqlite3.connect(database) as db:
        stored = {r[0] for r in db.execute("SELECT message_id FROM messages")}
    assert len(outcomes) == 10 and "not accepted" in outcomes
    assert {o for o in outcomes if o != "not accepted"} == stored


def node_1_never_starts(monkeypatch: pytest.MonkeyPatch, *, hangs: bool) -> None:
    """node-1 (a node a reload adds) crashes at every start, or never reports started."""
    from actors.node import NodeActor

    start = NodeActor.run

    async def run(self: NodeActor, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        if self.index == 1:
            if hangs:
                await trio.sleep_forever()
            raise RuntimeError("node-1 cannot start")
        await start(self, task_status=task_status)

    monkeypatch.setattr(NodeActor, "run", run)


async def test_a_reload_whose_new_node_cannot_start_keeps_the_old_node_count(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # nodes.count 1 -> 2, and node-1 fails at every start: the reload is refused with the
    # reason, node-0 alone goes on with every shard (nothing stranded on a shard no node
    # serves), and systemd hears READY=1 again.
    from pushd.sdnotify import Notifier
    from tests.pipeline_helpers import write_config

    node_1_never_starts(monkeypatch, hangs=False)

    class Recorded(Notifier):
        def __init__(self) -> None:
            super().__init__(None)
            self.sent: list[str] = []

        def send(self, **fields: Any) -> None:
            self.sent.append(",".join(fields))

    quick = "backoff_initial = 0.05\nbackoff_max = 0.1\nmax_crashes = 2"
    notifier = Recorded()
    async with running(short_tmp, nodes=1, supervisor=quick, notifier=notifier) as daemon:
        write_config(short_tmp, nodes=2, supervisor=quick)
        with pytest.raises(RequestFailed) as info:
            await call(short_tmp, "reload")
        assert "node-1 could not start, 1 kept" in info.value.message
        assert notifier.sent[-1].startswith("READY")
        assert daemon.pipeline.live.current.node_count == 1 and daemon.pipeline.node_names == ["node-0"]
        status = await call(short_tmp, "status")
        assert [a["name"] for a in status["actors"] if a["name"].startswith("node")] == ["node-0"]
        ids = [f"d{i}" for i in range(12)]
        await call(short_tmp, "register_many", devices=[device(d, "u" + d) for d in ids])
        accepted = await call(short_tmp, "push", notification=alert(), target={"devices": ids})
        assert (await settled(short_tmp, accepted["message_id"]))["states"]["sent"] == 12


async def test_a_push_waiting_while_central_restarts_at_shutdown_is_told_it_was_not_accepted(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Central crashed and waits to be restarted when the drain begins: it never runs again
    # to answer its inbox, so the daemon answers what is left there after the drain.
    from actors.central import CentralActor

    handle = CentralActor._handle
    crashed: list[int] = []

    async def crash_once(self: CentralActor, envelope: Any) -> None:
        if not crashed:
            crashed.append(1)
            raise RuntimeError("central crashes")
        await handle(self, envelope)

    monkeypatch.setattr(CentralActor, "_handle", crash_once)
    second: list[str] = []
    slow_restart = "backoff_initial = 8.0\nbackoff_max = 8.0"
    async with running(short_tmp, nodes=1, supervisor=slow_restart) as daemon, trio.open_nursery() as nursery:
        await call(short_tmp, "register", **device("d1", "u1"))

        async def first() -> None:  # taken by central as it crashes: no answer to give
            with contextlib.suppress(Exception):
                await call(short_tmp, "push", notification=alert("first"), target={"devices": ["d1"]})

        nursery.start_soon(first)
        for _ in range(100):  # central crashed and is backing off (8 s)
            if daemon.supervisor.actors["central"].state == "backoff":
                break
            await trio.sleep(0.05)
        assert daemon.supervisor.actors["central"].state == "backoff"

        async def push() -> None:
            try:
                await call(short_tmp, "push", notification=alert("second"), target={"devices": ["d1"]})
                second.append("accepted")
            except RequestFailed as e:
                second.append(f"{e.code}: {e.message}")

        nursery.start_soon(push)
        await trio.sleep(0.5)
        daemon.request_stop()
    assert second == ["unavailable: pushd is shutting down; push not accepted"]


async def test_a_reload_whose_new_node_hangs_at_start_is_rolled_back_too(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pushd.pipeline
    from tests.pipeline_helpers import write_config

    node_1_never_starts(monkeypatch, hangs=True)
    monkeypatch.setattr(pushd.pipeline, "NODE_START_TIMEOUT", 0.5)
    async with running(short_tmp, nodes=1) as daemon:
        write_config(short_tmp, nodes=2)
        with pytest.raises(RequestFailed) as info:
            await call(short_tmp, "reload")
        assert "node-1 could not start, 1 kept: not started within 0.5s" in info.value.message
        assert daemon.pipeline.node_names == ["node-0"] and "node-1" not in daemon.supervisor.actors
        assert daemon.pipeline.live.current.node_count == 1
