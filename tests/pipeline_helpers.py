"""Shared helpers for pipeline tests: a daemon on the embedded simulator, a client."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from pushd.client import Client
from pushd.config import load_config
from pushd.daemon import Daemon
from pushd.sdnotify import Notifier

BASE = """
[daemon]
state_dir = "state"
shutdown_timeout = 5.0
[control]
socket = "ctl.sock"
[supervisor]
heartbeat_interval = 0.2
{supervisor}
[nodes]
count = {nodes}
batch = 50
[queue]
sweep_interval = 0.5
retry_initial = 0.2
retry_max = 1.0
max_attempts = 3

[[classes]]
id = "needs-update"
rule = {{ field = "device.app_version", semver_lt = "2.0.0" }}
[[classes]]
id = "vip"
rule = {{ field = "user.attributes.tier", eq = "gold" }}
[[classes]]
id = "everyone"
rule = "always"
"""

TOPIC = "com.example.app"


def write_config(root: Path, nodes: int = 2, extra: str = "", *, supervisor: str = "") -> Path:
    """``supervisor``: more lines of the [supervisor] table (restart backoff, say)."""
    path = root / "pushd.toml"
    path.write_text(BASE.format(nodes=nodes, supervisor=supervisor) + extra)
    return path


@asynccontextmanager
async def running(
    root: Path, nodes: int = 2, extra: str = "", *, supervisor: str = "", notifier: Notifier | None = None
) -> AsyncIterator[Daemon]:
    cfg = write_config(root, nodes, extra, supervisor=supervisor)
    daemon = Daemon(load_config(cfg), notifier=notifier or Notifier(None))
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        try:
            yield daemon
        finally:
            daemon.request_stop()


async def call(root: Path, op: str, **args: Any) -> Any:
    def do() -> Any:
        with Client(root / "ctl.sock", timeout=30) as client:
            return client.call(op, **args)

    return await trio.to_thread.run_sync(do)


def token() -> str:
    return secrets.token_hex(32)


def device(device_id: str, user_id: str, **over: Any) -> dict[str, Any]:
    reg: dict[str, Any] = {
        "device_id": device_id,
        "token": token(),
        "environment": "production",
        "topic": TOPIC,
        "model": "iPhone15,2",
        "os_version": "17.1",
        "app_version": "2.1.0",
        "locale": "en_US",
        "time_zone": "Europe/Berlin",
        "user_id": user_id,
    }
    reg.update(over)
    return reg


def alert(title: str = "hello", **over: Any) -> dict[str, Any]:
    n: dict[str, Any] = {"aps": {"alert": {"title": title, "body": "b"}}, "topic": TOPIC}
    n.update(over)
    return n


def simulator(daemon: Daemon) -> Any:
    return daemon.pipeline.sim_actor.simulator


async def settled(root: Path, message_id: str, deadline: float = 20.0) -> dict[str, Any]:
    """Wait until no item of the message is queued or leased."""
    with trio.fail_after(deadline):
        while True:
            state = await call(root, "message", message_id=message_id, page_size=1000)
            pending = state["states"]["queued"] + state["states"]["leased"]
            if state["enqueued"] > 0 and pending == 0:
                return state
            await trio.sleep(0.05)


def reached(daemon: Daemon, message_id: str) -> dict[str, int]:
    """Which tokens the simulator delivered this message to (collapse id = message id)."""
    out: dict[str, int] = {}
    for r in simulator(daemon).requests:
        if r.headers.get("apns-collapse-id") == message_id and r.status == 200:
            out[r.token] = out.get(r.token, 0) + 1
    return out
