"""Follow-ups through the running daemon (real time, short deadlines) against the
embedded simulator: a resend reaches the same device with a new apns-id; reports outside
consent are refused and stored nowhere; a follow-up's bad fields are named."""

from __future__ import annotations

import time
from pathlib import Path

import msgpack
import pytest
import trio

from pushd.client import RequestFailed
from tests.pipeline_helpers import alert, call, device, running, settled, simulator

FOLLOW = {
    "handled": {"event": "order.paid", "match": {"order": "A1"}},
    "deadline": 0.5,
    "spacing": 0.5,
    "max_repushes": 1,
    "strategy": "resend",
}


async def wait_followup(root: Path, message_id: str, key: str, value: int, deadline: float = 15.0) -> dict:
    with trio.fail_after(deadline):
        while True:
            state = await call(root, "message", message_id=message_id)
            summary = state["follow_up"]
            if summary is not None and summary[key] >= value:
                return summary
            await trio.sleep(0.05)


async def test_resend_reaches_the_same_device_with_a_new_apns_id(short_tmp: Path) -> None:
    async with running(short_tmp) as daemon:
        reg = device("d1", "u1", consent={"events": True, "event_kinds": ["order.paid"]})
        await call(short_tmp, "register", **reg)
        await call(short_tmp, "register", **device("d2", "u2", consent={"events": True, "event_kinds": ["order.paid"]}))
        accepted = await call(short_tmp, "push", notification=alert("pay"), target={"devices": ["d1", "d2"]}, follow_up=FOLLOW)
        await settled(short_tmp, accepted["message_id"])
        await call(short_tmp, "report", user_id="u2", name="order.paid", attributes={"order": "A1"})
        summary = await wait_followup(short_tmp, accepted["message_id"], "gave_up", 1)
        assert summary["handled"] == 1 and summary["repushed"] == 1
        to_d1 = [r for r in simulator(daemon).requests if r.token == reg["token"]]
        assert len(to_d1) == 2
        assert to_d1[0].apns_id != to_d1[1].apns_id
        # the reminder replaces the original on the lock screen: same collapse id
        assert to_d1[0].headers["apns-collapse-id"] == to_d1[1].headers["apns-collapse-id"] == accepted["message_id"]
        stats = await call(short_tmp, "stats")
        assert stats["follow_ups"]["handled"] == 1 and stats["follow_ups"]["gave_up"] == 1


async def test_reports_outside_consent_are_refused_and_not_stored(short_tmp: Path) -> None:
    async with running(short_tmp) as daemon:
        await call(short_tmp, "register", **device("d1", "u1", consent={"events": True, "event_kinds": ["app.opened"]}))
        await call(short_tmp, "register", **device("d2", "u2"))  # no consent at all
        for user, name in [("u1", "order.paid"), ("u2", "app.opened")]:
            with pytest.raises(RequestFailed) as info:
                await call(short_tmp, "report", user_id=user, name=name)
            assert info.value.code == "not_allowed" and info.value.field == "name"
        with pytest.raises(RequestFailed) as info:
            await call(short_tmp, "report", user_id="nobody", name="app.opened")
        assert info.value.code == "not_found"
        for at in (float("nan"), float("inf"), -1.0, 4e9):
            with pytest.raises(RequestFailed) as info:
                await call(short_tmp, "report", user_id="u1", name="app.opened", at=at)
            assert (info.value.code, info.value.field) == ("invalid_argument", "at"), at
        assert await call(short_tmp, "report", user_id="u1", name="app.opened") == {"stored": True}
        rows = await daemon.pipeline.store.fetchall("SELECT user_id, name FROM events")
        assert [tuple(r) for r in rows] == [("u1", "app.opened")]


async def test_follow_up_fields_are_validated(short_tmp: Path) -> None:
    async with running(short_tmp):
        cases = [
            ({**FOLLOW, "strategy": "shout"}, "follow_up.strategy"),
            ({**FOLLOW, "deadline": -1}, "follow_up.deadline"),
            ({**FOLLOW, "max_repushes": 99}, "follow_up.max_repushes"),
            ({**FOLLOW, "handled": {}}, "follow_up.handled"),
            ({**FOLLOW, "handled": {"registry": {"field": "device.app_version", "semver_ge": 2}}}, "follow_up.handled.registry.semver_ge"),
            ({**FOLLOW, "reminder": {"aps": {"alert": 1}, "topic": "com.example.app"}}, "follow_up.reminder.aps.alert"),
            ({**FOLLOW, "colour": 1}, "follow_up.colour"),
            (
                {**FOLLOW, "reminder": {"aps": {"alert": "x"}, "topic": "com.example.app", "push_type": "voip"}},
                "follow_up.reminder.push_type",
            ),
            (
                {**FOLLOW, "reminder": {"aps": {"alert": "x", "category": "promo"}, "topic": "com.example.app"}},
                "follow_up.reminder.aps.category",
            ),
        ]
        for follow_up, field in cases:
            with pytest.raises(RequestFailed) as info:
                await call(short_tmp, "push", notification=alert(), target={"all": True}, follow_up=follow_up)
            assert info.value.field == field, (field, info.value.message)


async def test_withdrawing_consent_deletes_events_at_once(short_tmp: Path) -> None:
    async with running(short_tmp) as daemon:
        consent = {"events": True, "event_kinds": ["order.paid", "app.opened"]}
        reg = device("d1", "u1", consent=consent)
        await call(short_tmp, "register", **reg)
        await call(short_tmp, "report", user_id="u1", name="order.paid")
        await call(short_tmp, "report", user_id="u1", name="app.opened")
        # narrow the consent: only app.opened may still be analysed
        await call(short_tmp, "register", **{**reg, "consent": {"events": True, "event_kinds": ["app.opened"]}})
        rows = await daemon.pipeline.store.fetchall("SELECT name FROM events WHERE user_id = 'u1'")
        assert [r[0] for r in rows] == ["app.opened"]
        await call(short_tmp, "register", **{**reg, "consent": {"events": False}})
        assert await daemon.pipeline.store.fetchall("SELECT * FROM events WHERE user_id = 'u1'") == []


async def test_consent_narrowed_to_nothing_or_withdrawn_in_bulk_deletes_events(short_tmp: Path) -> None:
    async with running(short_tmp) as daemon:
        consent = {"events": True, "event_kinds": ["order.paid"]}
        a, b = device("a1", "ua", consent=consent), device("b1", "ub", consent=consent)
        await call(short_tmp, "register_many", devices=[a, b])
        await call(short_tmp, "report", user_id="ua", name="order.paid")
        await call(short_tmp, "report", user_id="ub", name="order.paid")
        await call(short_tmp, "register", **{**a, "consent": {"events": True, "event_kinds": []}})
        await call(short_tmp, "register_many", devices=[{**b, "consent": {"events": False}}])
        assert await daemon.pipeline.store.fetchall("SELECT * FROM events") == []


async def test_no_event_outlives_a_consent_withdrawn_while_it_was_reported(short_tmp: Path) -> None:
    # Reports race with registrations that withdraw the consent (started at several
    # offsets into a burst of reports): each report is either stored before the withdrawal,
    # which deletes it, or refused after it; none is stored after it on the strength of a
    # consent read before it. (A stress test: the race it guards is narrow.)
    async with running(short_tmp) as daemon:
        reg = device("d1", "u1", consent={"events": True, "event_kinds": ["app.opened"]})
        outcomes: list[str] = []

        async def report() -> None:
            try:
                await call(short_tmp, "report", user_id="u1", name="app.opened")
                outcomes.append("stored")
            except RequestFailed as e:
                outcomes.append(e.code)

        for delay in [0.0, 0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015]:
            await call(short_tmp, "register", **reg)
            async with trio.open_nursery() as nursery:
                for _ in range(30):
                    nursery.start_soon(report)
                await trio.sleep(delay)
                await call(short_tmp, "register", **{**reg, "consent": {"events": False}})
            assert await daemon.pipeline.store.fetchall("SELECT * FROM events") == []
        assert set(outcomes) == {"stored", "not_allowed"}


async def test_a_withdrawal_whose_deletion_fails_is_not_stored_either(short_tmp: Path) -> None:
    # The consent and its consequences are one transaction: if deleting the events fails
    # (here: a trigger refuses it), the registration fails too and the old consent stands,
    # instead of a withdrawn consent with the user's events still stored.
    async with running(short_tmp) as daemon:
        store = daemon.pipeline.store
        reg = device("d1", "u1", consent={"events": True, "event_kinds": ["app.opened"]})
        await call(short_tmp, "register", **reg)
        await call(short_tmp, "report", user_id="u1", name="app.opened")
        await store.execute(
            "CREATE TRIGGER refuse BEFORE DELETE ON events BEGIN SELECT RAISE(ABORT, 'disk trouble'); END"
        )
        with pytest.raises(RequestFailed):
            await call(short_tmp, "register", **{**reg, "consent": {"events": False}})
        device_row = await call(short_tmp, "device", device_id="d1")
        assert device_row["consent"]["events"] is True
        assert len(await store.fetchall("SELECT * FROM events")) == 1
        await store.execute("DROP TRIGGER refuse")
        await call(short_tmp, "register", **{**reg, "consent": {"events": False}})
        assert await store.fetchall("SELECT * FROM events") == []


async def test_a_report_settles_its_follow_ups_before_it_is_answered(short_tmp: Path) -> None:
    # The follow-ups an event settles end in the transaction that stores the event: not
    # when the analyzer gets a hint, which a full inbox (here: room for one) would drop,
    # leaving a queued re-push to be sent after the user acted.
    async with running(short_tmp, extra="[channels]\nanalyzer = 1\n") as daemon:
        users = [f"u{i}" for i in range(12)]
        consent = {"events": True, "event_kinds": ["order.paid"]}
        for i, user in enumerate(users):
            await call(short_tmp, "register", **device(f"d{i}", user, consent=consent))
        follow = {**FOLLOW, "deadline": 3600, "spacing": 3600}
        accepted = await call(short_tmp, "push", notification=alert("pay"), target={"users": users}, follow_up=follow)
        await settled(short_tmp, accepted["message_id"])
        await wait_followup(short_tmp, accepted["message_id"], "delivered", len(users))
        async with trio.open_nursery() as nursery:
            for user in users:
                nursery.start_soon(
                    lambda user=user: call(short_tmp, "report", user_id=user, name="order.paid", attributes={"order": "A1"})
                )
        rows = await daemon.pipeline.store.fetchall("SELECT state FROM followups")
        assert [r[0] for r in rows] == ["handled"] * len(users)


async def test_a_registration_settles_its_registry_condition_follow_ups_before_it_is_answered(short_tmp: Path) -> None:
    # Likewise for a registry condition: the registration that meets it ends the follow-up
    # in its own transaction, whatever happens to the analyzer's hint.
    async with running(short_tmp, extra="[channels]\nanalyzer = 1\n") as daemon:
        regs = [device(f"d{i}", f"u{i}", app_version="1.0.0") for i in range(12)]
        for reg in regs:
            await call(short_tmp, "register", **reg)
        follow = {"handled": {"registry": {"field": "device.app_version", "semver_ge": "2.0.0"}}, "deadline": 3600}
        accepted = await call(short_tmp, "push", notification=alert("update"), target={"devices": [r["device_id"] for r in regs]}, follow_up=follow)
        await settled(short_tmp, accepted["message_id"])
        await wait_followup(short_tmp, accepted["message_id"], "delivered", len(regs))
        async with trio.open_nursery() as nursery:
            for reg in regs:
                nursery.start_soon(lambda reg=reg: call(short_tmp, "register", **{**reg, "app_version": "2.1.0"}))
        rows = await daemon.pipeline.store.fetchall("SELECT state, handled_at >= delivered_at FROM followups")
        assert [tuple(r) for r in rows] == [("handled", 1)] * len(regs)


async def test_an_absolute_expiration_bounds_the_re_pushes_a_ttl_does_not(short_tmp: Path) -> None:
    async with running(short_tmp) as daemon:
        await call(short_tmp, "register", **device("d1", "u1"))
        at = int(time.time()) + 600
        by_expiration = await call(
            short_tmp, "push", notification=alert(), target={"devices": ["d1"]}, follow_up=FOLLOW, expiration=at
        )
        by_own = await call(
            short_tmp, "push", notification=alert(expiration=at), target={"devices": ["d1"]}, follow_up=FOLLOW
        )
        by_ttl = await call(short_tmp, "push", notification=alert(), target={"devices": ["d1"]}, follow_up=FOLLOW, ttl=600)
        # a ttl shorter than the notification's own expiration: the bound is the latter
        by_both = await call(
            short_tmp, "push", notification=alert(expiration=at), target={"devices": ["d1"]}, follow_up=FOLLOW, ttl=60
        )
        until = {}
        for accepted in (by_expiration, by_own, by_ttl, by_both):
            row = await daemon.pipeline.store.fetchone(
                "SELECT meta FROM messages WHERE message_id = ?", (accepted["message_id"],)
            )
            assert row is not None
            until[accepted["message_id"]] = msgpack.unpackb(row[0], raw=False).get("until")
        assert until[by_expiration["message_id"]] == until[by_own["message_id"]] == until[by_both["message_id"]] == at
        assert until[by_ttl["message_id"]] is None


async def test_a_stored_follow_up_that_no_longer_parses_is_stopped_not_in_the_way(short_tmp: Path) -> None:
    # A follow-up stored by an older version with a spec this one refuses (here a rule
    # nested deeper than the limit added since): registrations of its device and reports
    # of its user go through, and the follow-up is stopped as invalid_follow_up.
    async with running(short_tmp) as daemon:
        store = daemon.pipeline.store
        consent = {"events": True, "event_kinds": ["app.opened"]}
        await call(short_tmp, "register", **device("d1", "u1", consent=consent))
        rule: object = {"field": "device.app_version", "semver_ge": "2.0.0"}
        for _ in range(40):
            rule = {"not": rule}
        spec = {"handled": {"registry": rule}, "deadline": 3600.0, "max_repushes": 1, "spacing": 3600.0, "strategy": "resend"}
        t = time.time()
        await store.execute(
            "INSERT INTO messages (message_id, payload, priority, push_type, created_at, target, meta, audience, state) "
            "VALUES ('old', ?, 10, 'alert', ?, ?, ?, 1, 'done')",
            (msgpack.packb({"aps": {"alert": "x"}}), t, msgpack.packb({"devices": ["d1"]}),
             msgpack.packb({"category": None, "follow_up": spec})),
        )
        await store.execute(
            "INSERT INTO followups (root_id, device_id, user_id, class_id, state, delivered_at, last_delivered_at, "
            "due_at, updated_at, repushes) VALUES ('old', 'd1', 'u1', 'everyone', 'pending', ?, ?, ?, ?, 0)",
            (t, t, t + 3600, t),
        )
        await call(short_tmp, "report", user_id="u1", name="app.opened")
        await call(short_tmp, "register", **device("d1", "u1", consent=consent, app_version="1.2.0"))
        assert len(await store.fetchall("SELECT * FROM events")) == 1
        row = await store.fetchone("SELECT state, reason FROM followups WHERE root_id = 'old'")
        assert row is not None and tuple(row) == ("stopped", "invalid_follow_up")
