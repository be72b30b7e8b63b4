"""actors.registry: register/update, rotation, user moves, retire/revive, streaming targets."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from actors.registry import (
    Consent,
    DeviceRecord,
    InvalidField,
    Permissions,
    Registration,
    Registry,
)
from actors.storage import open_store

T = 1_700_000_000_000  # ms


def token(n: int) -> str:
    return f"{n:064x}"


def registration(
    device: str = "dev-1", user: str = "user-1", n: int = 1, **changes: object
) -> Registration:
    reg = Registration(
        device_id=device,
        token=token(n),
        environment="production",
        topic="com.example.app",
        model="iPhone15,2",
        os_version="17.4.1",
        app_version="3.2.0",
        locale="fr_FR",
        time_zone="Europe/Paris",
        user_id=user,
        contact_ids=("mail:a@example.com",),
        attributes={"plan": "gold", "age": 41, "tags": ["a", "b"]},
        permissions=Permissions(alert=True, background=False, categories_refused=("promo",)),
        consent=Consent(events=True, event_kinds=("purchase", "open")),
    )
    return replace(reg, **changes)  # type: ignore[arg-type]


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[Registry]:
    async with open_store(tmp_path / "r.sqlite") as store:
        yield Registry(store)


async def test_register_stores_device_user_permissions_and_consent(registry: Registry) -> None:
    result = await registry.register(registration(), now_ms=T)
    assert result.change == "registered"
    record = await registry.get("dev-1")
    assert record == result.record
    assert record is not None and record.active
    assert record.token == token(1)
    assert record.contact_ids == ("mail:a@example.com",)
    assert record.consent.allows("purchase") and not record.consent.allows("location")
    assert record.permissions.permits("alert", "news")
    assert not record.permissions.permits("alert", "promo")
    assert not record.permissions.permits("background")
    fields = record.fields()
    assert fields["device.os_version"] == "17.4.1"
    assert fields["device.app_version"] == "3.2.0"
    assert fields["device.model"] == "iPhone15,2"
    assert fields["device.locale"] == "fr_FR"
    assert fields["user.id"] == "user-1"
    assert fields["user.attributes.plan"] == "gold"
    assert fields["user.attributes.tags"] == ["a", "b"]
    assert fields["permissions.alert"] is True
    assert all(token(1) not in str(v) for v in fields.values())
    assert await registry.get("nobody") is None


async def test_a_record_read_back_has_every_field_in_its_place(registry: Registry) -> None:
    """Every column lands in its own field (records are built by position): a user move,
    a token rotation and an update at distinct times make the fields distinct."""
    await registry.register(registration(user="u0", n=1), now_ms=T)
    await registry.register(registration(user="u1", n=1), now_ms=T + 5)
    await registry.register(registration(user="u1", n=2), now_ms=T + 10)
    allowed = Permissions(alert=False, background=True, categories_allowed=("news", "sport"))
    await registry.register(
        registration(user="u1", n=2, app_version="3.3.0", permissions=allowed), now_ms=T + 20
    )
    record = await registry.get("dev-1")
    assert record == DeviceRecord(
        device_id="dev-1",
        token=token(2),
        environment="production",
        topic="com.example.app",
        model="iPhone15,2",
        os_version="17.4.1",
        app_version="3.3.0",
        locale="fr_FR",
        time_zone="Europe/Paris",
        user_id="u1",
        contact_ids=("mail:a@example.com",),
        attributes={"plan": "gold", "age": 41, "tags": ["a", "b"]},
        permissions=allowed,
        consent=Consent(events=True, event_kinds=("purchase", "open")),
        registered_at_ms=T,
        updated_at_ms=T + 20,
        token_updated_at_ms=T + 10,
        previous_token=token(1),
        previous_user_id="u0",
        user_changed_at_ms=T + 5,
        retired_at_ms=None,
    )
    assert record.permissions.permits("alert", "news") is False  # alert off
    assert await registry.get_many(["dev-1"]) == {"dev-1": record}


async def test_reregistering_updates_in_place_and_ignores_stale_requests(
    registry: Registry,
) -> None:
    await registry.register(registration(), now_ms=T)
    updated = await registry.register(
        registration(app_version="3.3.0", attributes={"plan": "free"}), now_ms=T + 10
    )
    assert updated.change == "updated"
    assert updated.record.app_version == "3.3.0"
    assert updated.record.attributes == {"plan": "free"}
    assert (updated.record.registered_at_ms, updated.record.updated_at_ms) == (T, T + 10)
    stale = await registry.register(registration(app_version="3.1.0"), now_ms=T + 5)
    assert stale.change == "stale"
    record = await registry.get("dev-1")
    assert record is not None and record.app_version == "3.3.0"


async def test_a_rotated_token_replaces_the_old_one(registry: Registry) -> None:
    await registry.register(registration(n=1), now_ms=T)
    result = await registry.register(registration(n=2), now_ms=T + 1)
    assert result.token_rotated
    assert (result.record.token, result.record.previous_token) == (token(2), token(1))
    assert result.record.token_updated_at_ms == T + 1
    # A token is one device's: a reinstall under a new id takes the token over.
    await registry.register(registration(device="dev-2", n=2), now_ms=T + 2)
    assert await registry.get("dev-1") is None
    taken = await registry.get("dev-2")
    assert taken is not None and taken.token == token(2)


async def test_a_device_moving_to_another_user_is_recorded(registry: Registry) -> None:
    await registry.register(registration(user="alice"), now_ms=T)
    moved = await registry.register(registration(user="bob"), now_ms=T + 7)
    assert moved.user_changed
    assert moved.record.user_id == "bob"
    assert (moved.record.previous_user_id, moved.record.user_changed_at_ms) == ("alice", T + 7)
    again = await registry.register(registration(user="bob"), now_ms=T + 8)
    assert not again.user_changed
    assert (again.record.previous_user_id, again.record.user_changed_at_ms) == ("alice", T + 7)


async def test_retired_tokens_come_back_only_with_a_newer_registration(registry: Registry) -> None:
    await registry.register(registration(), now_ms=T)
    # APNs says the token died before the device last registered: keep it.
    assert await registry.retire_token(token(1), T - 1) == 0
    assert await registry.retire_token(token(1).upper(), T + 100) == 1
    record = await registry.get("dev-1")
    assert record is not None and record.retired_at_ms == T + 100 and not record.active
    assert [b async for b in registry.targets()] == []
    # A registration from before APNs's timestamp (arriving late) does not revive it...
    late = await registry.register(replace(registration(), model="iPhone16,1"), now_ms=T + 50)
    assert not late.record.active and not late.revived
    # ...not even under a new device id...
    other = await registry.register(registration(device="dev-9"), now_ms=T + 60)
    assert not other.record.active
    # ...one after it does.
    revived = await registry.register(registration(device="dev-9"), now_ms=T + 101)
    assert revived.record.active and revived.revived
    # A rotated token is not the retired one.
    await registry.retire_token(token(1), T + 200)
    fresh = await registry.register(registration(device="dev-9", n=5), now_ms=T + 150)
    assert fresh.record.active


async def test_unregister_and_get_many(registry: Registry) -> None:
    for i in range(5):
        await registry.register(registration(device=f"dev-{i}", n=i + 1), now_ms=T)
    assert await registry.unregister("dev-3")
    assert not await registry.unregister("dev-3")
    found = await registry.get_many(["dev-0", "dev-3", "dev-4", "dev-0", "ghost"])
    assert sorted(found) == ["dev-0", "dev-4"]
    assert all(isinstance(r, DeviceRecord) for r in found.values())


async def test_targets_stream_in_bounded_batches(tmp_path: Path) -> None:
    async with open_store(tmp_path / "r.sqlite") as store:
        registry = Registry(store)
        regs = [
            registration(
                device=f"dev-{i:05d}",
                user=f"user-{i % 100:03d}",
                n=i + 1,
                attributes={"plan": "gold" if i % 100 % 3 == 0 else "free"},  # per user
                topic="com.example.app" if i % 10 else "com.example.other",
            )
            for i in range(1000)
        ]
        results = await registry.register_many(regs, now_ms=T)
        assert {r.change for r in results} == {"registered"}

        async def collect(**kwargs: object) -> tuple[list[int], list[str]]:
            sizes: list[int] = []
            ids: list[str] = []
            async for records in registry.targets(batch=128, **kwargs):  # type: ignore[arg-type]
                sizes.append(len(records))
                ids.extend(r.device_id for r in records)
            return sizes, ids

        sizes, ids = await collect()
        assert sizes == [128] * 7 + [104]
        assert ids == sorted(r.device_id for r in regs)

        sizes, ids = await collect(topic="com.example.other")
        assert len(ids) == 100 and max(sizes) <= 128

        sizes, ids = await collect(user_ids=iter(["user-007", "user-042", "ghost"]))
        assert ids == sorted(f"dev-{i:05d}" for i in range(1000) if i % 100 in (7, 42))

        wanted = [f"dev-{i:05d}" for i in range(0, 1000, 2)] + ["ghost"]
        sizes, ids = await collect(device_ids=iter(wanted))
        assert len(ids) == 500 and max(sizes) <= 128

        sizes, ids = await collect(where=lambda r: r.attributes.get("plan") == "gold")
        assert ids == [f"dev-{i:05d}" for i in range(1000) if i % 100 % 3 == 0]
        assert max(sizes) <= 128

        with pytest.raises(ValueError):
            await collect(device_ids=["a"], user_ids=["b"])


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"device_id": ""}, "device_id"),
        ({"device_id": "bad id"}, "device_id"),
        ({"token": "xyz"}, "token"),
        ({"token": "ab" * 10}, "token"),
        ({"environment": "staging"}, "environment"),
        ({"topic": "-nope"}, "topic"),
        ({"os_version": "seventeen"}, "os_version"),
        ({"os_version": "\u0661\u0667.\u0661"}, "os_version"),  # Arabic-Indic digits: no semver rule would match
        ({"time_zone": "localtime"}, "time_zone"),  # the server's zone, not the device's
        ({"app_version": ""}, "app_version"),
        ({"locale": "french!"}, "locale"),
        ({"time_zone": "Mars/Olympus"}, "time_zone"),
        ({"user_id": " padded "}, "user_id"),
        ({"attributes": {"bad key!": 1}}, "attributes"),
        ({"attributes": {"nested": {"a": 1}}}, "attributes.nested"),
        ({"attributes": {"x": float("nan")}}, "attributes.x"),
        (
            {"permissions": Permissions(categories_refused=("ok", "not ok"))},
            "permissions.categories_refused[1]",
        ),
        ({"consent": Consent(events=True, event_kinds="purchase")}, "consent.event_kinds"),  # type: ignore[arg-type]
    ],
)
async def test_invalid_fields_are_named(
    registry: Registry, changes: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidField) as info:
        await registry.register(registration(**changes), now_ms=T)
    assert info.value.field == field
    assert await registry.get("dev-1") is None


async def test_a_malformed_token_is_not_repeated_in_the_error(registry: Registry) -> None:
    bad = "ab12cd34" * 8 + "zz"
    with pytest.raises(InvalidField) as info:
        await registry.register(registration(token=bad), now_ms=T)
    assert info.value.field == "token" and "ab12cd34" not in str(info.value), str(info.value)


async def test_attribute_size_is_counted_in_utf8_bytes(registry: Registry) -> None:
    # 5,600 bytes as UTF-8; 16,800 characters as escaped JSON (the old measure)
    await registry.register(registration(attributes={"nick": "\U0001f600" * 1400}), now_ms=T)
    with pytest.raises(InvalidField) as info:
        await registry.register(registration(device="dev-2", n=2, attributes={"nick": "\U0001f600" * 4200}), now_ms=T)
    assert info.value.field == "attributes"


async def test_registry_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite"
    async with open_store(path) as store:
        registry = Registry(store)
        await registry.register(registration(user="alice"), now_ms=T)
        before = (await registry.register(registration(user="bob", n=2), now_ms=T + 1)).record
        await registry.retire_token(token(9), T)
    async with open_store(path) as store:
        registry = Registry(store)
        assert await registry.get("dev-1") == before
        late = await registry.register(registration(device="dev-x", n=9), now_ms=T - 5)
        assert not late.record.active
