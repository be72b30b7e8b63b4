"""From ``[apns]`` / ``[simulator]`` to a sender configuration — and, in the embedded
default (``apns.environment = "simulator"``), the bundled simulator with a generated
CA, server certificate and signing key, so pushd runs with no Apple credentials."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import trio

from actors.base import ActorContext
from apns.auth import MAX_REFRESH_INTERVAL, TokenAuth, generate_signing_key, make_ssl_context
from apns.sender import ENVIRONMENTS, SenderConfig
from apns.simulator import RecordedRequest, SimConfig, SimKey, Simulator, generate_tls
from pushd.config import Config

log = structlog.get_logger("pushd.apns")

SIM_KEY_ID = "SIMKEY0001"
SIM_TEAM_ID = "SIMTEAM001"


@dataclass
class SimulatorSetup:
    """Files for the embedded simulator, generated once under state_dir and reused."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    signing_key: Path
    public_key_pem: bytes

    @classmethod
    def prepare(cls, cfg: Config) -> SimulatorSetup:
        tls_dir = cfg.state_path(cfg.simulator.tls_dir)
        tls_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tls = generate_tls(tls_dir)
        key_path = tls_dir / f"AuthKey_{SIM_KEY_ID}.p8"
        pub_path = tls_dir / f"AuthKey_{SIM_KEY_ID}.pub"
        if not (key_path.exists() and pub_path.exists()):
            key_path.unlink(missing_ok=True)
            _, public = generate_signing_key(key_path, key_id=SIM_KEY_ID, team_id=SIM_TEAM_ID)
            pub_path.write_bytes(public)
        return cls(tls.ca_file, tls.cert_file, tls.key_file, key_path, pub_path.read_bytes())


class SimulatorActor:
    """The bundled APNs simulator as a supervised actor. Its port is fixed after the first
    bind (``port_ref``) so that a restarted simulator is where the nodes expect it."""

    def __init__(self, ctx: ActorContext, cfg: Config, setup: SimulatorSetup, port_ref: list[int]) -> None:
        self.ctx = ctx
        self.cfg = cfg
        self.setup = setup
        self.port_ref = port_ref
        self.simulator: Simulator | None = None

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        s = self.cfg.simulator
        sim = Simulator(
            SimConfig(
                host=s.host,
                port=self.port_ref[0] if self.port_ref else s.port,
                cert_file=self.setup.cert_file,
                key_file=self.setup.key_file,
                max_concurrent_streams=s.max_concurrent_streams,
                keys=[SimKey(SIM_KEY_ID, SIM_TEAM_ID, self.setup.public_key_pem)],
                max_records=10_000 if not s.record else 1_000,
            )
        )
        self.simulator = sim
        if s.record:
            record_path = self.cfg.resolve(s.record)
            record_path.parent.mkdir(parents=True, exist_ok=True)
            out = record_path.open("a", buffering=1)

            def write(req: RecordedRequest) -> None:
                out.write(json.dumps(req.to_json()) + "\n")

            sim.add_listener(write)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(sim.serve)
            if not self.port_ref:
                self.port_ref.append(port)
            log.info("APNs simulator listening", host=s.host, port=port)
            task_status.started()
            await self.ctx.idle()
            nursery.cancel_scope.cancel()


def sender_config_factory(cfg: Config, *, sim: SimulatorSetup | None, port_ref: list[int]) -> Callable[[], SenderConfig]:
    """A function building the SenderConfig (called by each node when it (re)starts its
    sender, so the simulator's port is known by then)."""
    a = cfg.apns
    # Before connections kept their tokens, up to 3599 s was allowed (and 3000 shipped): such
    # a value still starts, used as the largest one that keeps a kept token inside the hour.
    refresh = min(a.token_refresh, MAX_REFRESH_INTERVAL)
    if a.auth == "token" and refresh < a.token_refresh:
        log.warning(
            "apns.token_refresh is above its limit; using the limit",
            file=str(cfg.source), configured=a.token_refresh, used=refresh,
        )
    common: dict[str, Any] = {
        "connections": a.connections,
        "max_streams_per_connection": a.max_streams,
        "request_timeout": a.request_timeout,
        "connect_timeout": a.connect_timeout,
        "idle_ping_interval": a.ping_interval,
        "ping_timeout": a.ping_timeout,
        "max_attempts": a.max_attempts,
    }

    def ca() -> Path | None:
        return cfg.resolve(a.ca_file) if a.ca_file else None

    def auth() -> TokenAuth | None:
        if a.auth != "token":
            return None
        return TokenAuth.from_file(
            cfg.resolve(a.key_file), key_id=a.key_id, team_id=a.team_id, refresh_interval=refresh
        )

    def ssl_context() -> Any:
        if a.auth == "certificate":
            return make_ssl_context(
                ca_file=ca(),
                client_cert=cfg.resolve(a.cert_file),
                client_key=cfg.resolve(a.cert_key_file) if a.cert_key_file else None,
                password=a.cert_password or None,
            )
        return make_ssl_context(ca_file=ca())

    def build() -> SenderConfig:
        if a.environment == "simulator":
            assert sim is not None and port_ref, "simulator not started"
            return SenderConfig(
                host=cfg.simulator.host,
                port=port_ref[0],
                ssl_context=make_ssl_context(ca_file=sim.ca_file),
                auth=TokenAuth.from_file(
                    sim.signing_key, key_id=SIM_KEY_ID, team_id=SIM_TEAM_ID, refresh_interval=refresh
                ),
                **common,
            )
        if a.environment == "custom":
            return SenderConfig(host=a.host, port=a.port, ssl_context=ssl_context(), auth=auth(), **common)
        return SenderConfig(
            host=ENVIRONMENTS[a.environment], port=a.port, ssl_context=ssl_context(), auth=auth(), **common
        )

    return build
