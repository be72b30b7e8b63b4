"""The daemon in-process: readiness, sd_notify order, reload (applied and rejected),
control ops, and a second daemon refused on a live socket."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from pushd.client import Client, RequestFailed
from pushd.config import load_config
from pushd.control import SocketInUse
from pushd.daemon import AlreadyRunning, Daemon
from pushd.sdnotify import Notifier

BASE = """
[daemon]
state_dir = "state"
shutdown_timeout = 5.0
[control]
socket = "ctl.sock"
[supervisor]
heartbeat_interval = 0.2
heartbeat_timeout = 5.0
[nodes]
count = {nodes}
"""


def write_config(root: Path, nodes: int = 2, extra: str = "") -> Path:
    path = root / "pushd.toml"
    path.write_text(BASE.format(nodes=nodes) + extra)
    return path


@asynccontextmanager
async def running(config_path: Path, notifier: Notifier | None = None) -> AsyncIterator[Daemon]:
    daemon = Daemon(load_config(config_path), notifier=notifier or Notifier(None))
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        try:
            yield daemon
        finally:
            daemon.request_stop()


async def call(path: Path, op: str, **args: object) -> object:
    def do() -> object:
        with Client(path, timeout=5) as client:
            return client.call(op, **args)

    return await trio.to_thread.run_sync(do)


def datagrams(sock: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


async def test_notify_order_ready_reloading_stopping(short_tmp: Path) -> None:
    notify_path = short_tmp / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    sock.setblocking(False)
    cfg = write_config(short_tmp)
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": str(notify_path)})
    async with running(cfg, notifier) as daemon:
        states = {a["state"] for a in daemon.supervisor.describe()}
        assert states == {"running"}
        await call(short_tmp / "ctl.sock", "reload")
    got = datagrams(sock)
    kinds = [next(line for line in d.splitlines() if "=" in line).split("=")[0] for d in got]
    firsts = [k for k in kinds if k in ("READY", "RELOADING", "STOPPING")]
    assert firsts[:4] == ["READY", "RELOADING", "READY", "STOPPING"], got
    ready = next(d for d in got if d.startswith("READY=1"))
    assert "STATUS=6/6 actors running" in ready  # simulator, queue, analyzer, central, 2 nodes
    reloading = next(d for d in got if d.startswith("RELOADING=1"))
    assert "MONOTONIC_USEC=" in reloading
    sock.close()


async def test_reload_applies_node_count_and_rejects_an_invalid_file(short_tmp: Path) -> None:
    cfg = write_config(short_tmp, nodes=2)
    ctl = short_tmp / "ctl.sock"
    async with running(cfg) as daemon:
        cfg.write_text(BASE.format(nodes=3) + "[daemon.extra]\n")  # invalid: unknown table
        with pytest.raises(RequestFailed) as info:
            await call(ctl, "reload")
        assert info.value.code == "invalid_argument"
        assert "daemon.extra" in info.value.message and str(cfg) in info.value.message
        assert daemon.config.nodes.count == 2

        write_config(short_tmp, nodes=3)
        result = await call(ctl, "reload")
        assert result == {"ok": True, "changed": ["nodes.count"], "restart_required": []}
        status = await call(ctl, "status")
        assert isinstance(status, dict)
        assert [a["name"] for a in status["actors"]][-3:] == ["node-0", "node-1", "node-2"]

        write_config(short_tmp, nodes=1, extra='[storage]\npath = "elsewhere.db"\n')
        result = await call(ctl, "reload")
        assert result == {"ok": True, "changed": ["nodes.count"], "restart_required": ["storage.path"]}
        status = await call(ctl, "status")
        assert isinstance(status, dict)
        assert [a["name"] for a in status["actors"] if a["name"].startswith("node")] == ["node-0"]
        assert daemon.config.storage.path == "pushd.sqlite3"

        # Running actors beat at the interval they started with: a shorter timeout now
        # would count them as wedged and stop the watchdog pings. It waits for a restart.
        timeout = daemon.config.supervisor.heartbeat_timeout
        cfg.write_text(BASE.format(nodes=1).replace(f"heartbeat_timeout = {timeout}", "heartbeat_timeout = 2.5"))
        result = await call(ctl, "reload")
        assert result["restart_required"] == ["supervisor.heartbeat_timeout"]
        assert daemon.config.supervisor.heartbeat_timeout == timeout


async def test_the_daemon_ops_refuse_arguments_they_do_not_take(short_tmp: Path) -> None:
    cfg = write_config(short_tmp)
    ctl = short_tmp / "ctl.sock"
    async with running(cfg):
        for op in ("ping", "status", "stats", "reload"):
            with pytest.raises(RequestFailed) as info:
                await call(ctl, op, config="/other.toml")  # a reload from another file, say
            assert (info.value.code, info.value.field) == ("invalid_argument", "config"), op


async def test_a_reload_under_way_at_stop_finishes_first_and_its_new_nodes_drain(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pushd.daemon

    left_over: list[list[str]] = []
    grace: list[float] = []
    drain = pushd.daemon.drain

    async def recording_drain(supervisor: Any, grace_period: float) -> list[str]:
        grace.append(grace_period)
        left = await drain(supervisor, grace_period)
        left_over.append(left)
        return left

    monkeypatch.setattr(pushd.daemon, "drain", recording_drain)
    cfg = write_config(short_tmp, nodes=2)
    ctl = short_tmp / "ctl.sock"

    async def reload() -> None:
        with contextlib.suppress(Exception):  # the reply may be lost to the shutdown
            await call(ctl, "reload")

    async with trio.open_nursery() as nursery, running(cfg) as daemon:
        pipeline = daemon._pipeline
        assert pipeline is not None
        apply = pipeline.apply

        async def slow_apply(*args: Any, **kwargs: Any) -> None:
            await trio.sleep(0.5)  # the reload is under way when the stop comes
            await apply(*args, **kwargs)

        monkeypatch.setattr(pipeline, "apply", slow_apply)
        write_config(short_tmp, nodes=3)
        nursery.start_soon(reload)
        await trio.sleep(0.2)
        # Leaving `running` asked the daemon to stop: node-2, started by the reload, was
        # asked to stop too and finished, instead of being cancelled at the end.
    assert "node-2" in daemon.supervisor.actors
    assert left_over == [[]]
    # the wait for the reload comes out of shutdown_timeout: the whole stop stays within it
    timeout = daemon.config.daemon.shutdown_timeout
    assert len(grace) == 1 and 0 < grace[0] < timeout - 0.2


async def test_second_daemon_is_refused(short_tmp: Path) -> None:
    cfg = write_config(short_tmp)
    async with running(cfg):
        # Same state directory: the instance lock refuses it before it touches the store.
        with pytest.raises(AlreadyRunning, match="another pushd"):
            await Daemon(load_config(cfg), notifier=Notifier(None)).run()
        # Another state directory but the same live socket: refused, no actor started.
        (short_tmp / "b").mkdir()
        other_cfg = load_config(write_config(short_tmp / "b"))
        other_cfg = other_cfg.model_copy(
            update={"control": other_cfg.control.model_copy(update={"socket": str(short_tmp / "ctl.sock")})}
        )
        other = Daemon(other_cfg, notifier=Notifier(None))
        with pytest.raises(SocketInUse, match="in use"):
            await other.run()
        assert other.supervisor.actors == {}
        assert (await call(short_tmp / "ctl.sock", "ping"))["pong"] is True  # type: ignore[index]


async def test_stats_and_status_ops(short_tmp: Path) -> None:
    cfg = write_config(short_tmp)
    async with running(cfg):
        stats = await call(short_tmp / "ctl.sock", "stats")
        assert isinstance(stats, dict) and stats["restarts"] == 0
        status = await call(short_tmp / "ctl.sock", "status")
        assert isinstance(status, dict) and status["draining"] is False


async def test_reload_replaces_rules_and_code_keys_live(short_tmp: Path) -> None:
    cfg = write_config(short_tmp)
    ctl = short_tmp / "ctl.sock"
    async with running(cfg) as daemon:
        assert await call(ctl, "classes") == {"classes": []}
        extra = (
            '[codes]\ncurrent = "k2"\nkeys = { k1 = "file:codes-k1.key", k2 = "file:codes-k2.key" }\n'
            '[[classes]]\nid = "beta"\nrule = { field = "user.attributes.beta", eq = true }\n'
        )
        write_config(short_tmp, extra=extra)
        result = await call(ctl, "reload")
        assert isinstance(result, dict) and set(result["changed"]) == {"classes", "codes.current", "codes.keys"}
        classes = await call(ctl, "classes")
        assert isinstance(classes, dict) and [c["id"] for c in classes["classes"]] == ["beta"]
        assert daemon.pipeline.live.current.codes.current == "k2"
        assert (short_tmp / "state" / "codes-k2.key").exists()


async def test_reload_that_cannot_be_applied_is_refused_and_the_daemon_keeps_running(short_tmp: Path) -> None:
    cfg = write_config(short_tmp)
    ctl = short_tmp / "ctl.sock"
    async with running(cfg) as daemon:
        bad_configs = [
            '[codes]\ncurrent = "k2"\nkeys = { k2 = "hex:abcd" }\n',  # a secret far too short
            '[apns]\nenvironment = "sandbox"\nkey_file = "missing.p8"\nkey_id = "ABCDEFGHIJ"\nteam_id = "ABCDEFGHIJ"\n',
        ]
        for extra in bad_configs:
            write_config(short_tmp, extra=extra)
            with pytest.raises(RequestFailed) as info:
                await call(ctl, "reload")
            assert info.value.code == "invalid_argument", info.value.message
        assert daemon.config.apns.environment == "simulator"
        assert {a["state"] for a in daemon.supervisor.describe()} == {"running"}
        write_config(short_tmp, nodes=3)
        assert (await call(ctl, "reload"))["changed"] == ["nodes.count"]  # type: ignore[index]


async def test_a_token_refresh_above_its_limit_still_starts_using_the_limit(short_tmp: Path) -> None:
    # Up to 3599 s was accepted before connections kept their tokens (3000 was shipped):
    # an installed config with it starts, warns, and uses 2100 s.
    from structlog.testing import capture_logs

    cfg = write_config(short_tmp, extra="[apns]\ntoken_refresh = 3000.0\n")
    with capture_logs() as logs:
        async with running(cfg) as daemon:
            pipeline = daemon._pipeline
            assert pipeline is not None
            sender = pipeline.live.current.sender_config
            assert sender is not None
            auth = sender().auth
            assert auth is not None and auth.refresh_interval == 2100.0
    warned = [e for e in logs if e["event"].startswith("apns.token_refresh is above its limit")]
    assert warned and warned[0]["configured"] == 3000.0 and warned[0]["used"] == 2100.0
