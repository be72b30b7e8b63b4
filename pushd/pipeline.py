"""The actors and what they share: the store, the channels, the live settings.

``Pipeline.open(config)`` opens the store; ``start`` starts every actor under the
supervisor with ``nursery.start`` (the simulator first when ``apns.environment =
"simulator"``, then queue, analyzer, central and the nodes); ``apply`` puts a reloaded
config in force (node count, rules, code keys, credentials, limits) without dropping
in-flight work. The channels are created here, bounded, with sizes from
``[channels]``; each actor incarnation gets clones of its ends and closes them itself.
The analyzer → central cycle goes through the durable queue, never through a channel.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import structlog
import trio

from actors.analyzer import AnalyzerActor, followup_totals
from actors.base import ActorContext
from actors.central import CentralActor, refuse_waiting
from actors.idcode import CodeKeys
from actors.live import Live, LiveRef
from actors.messages import Delivered, Enqueued, Envelope, Handoff, RegistryChanged
from actors.node import HANDOFF_SLOTS, NodeActor
from actors.queue import WAKE_SLOTS, QueueActor
from actors.queuestore import QueueStore
from actors.registry import Registry
from actors.rules import Classifier
from actors.storage import Store, open_store
from actors.urgency import Urgency
from pushd.apnsconf import SimulatorActor, SimulatorSetup, sender_config_factory
from pushd.config import Config
from pushd.supervisor import ActorEscalation, Supervisor

log = structlog.get_logger("pushd.pipeline")

NODE_START_TIMEOUT = 30.0  # seconds the nodes a reload adds have to start (restarts included)

AnalyzerInput = Delivered | RegistryChanged


def build_live(cfg: Config, *, sender_config: Callable[..., Any] | None, generation: int) -> Live:
    return Live(
        classifier=Classifier.from_config([c.model_dump() for c in cfg.classes]),
        codes=CodeKeys.from_config(
            cfg.codes.keys, cfg.codes.current, base_dir=cfg.state_dir, create_missing=True
        ),
        node_count=cfg.nodes.count,
        node_batch=cfg.nodes.batch,
        node_lanes=cfg.nodes.lanes,
        lease_seconds=cfg.nodes.lease_seconds,
        shard_by=cfg.nodes.shard_by,
        region_attribute=cfg.nodes.region_attribute,
        regions=tuple(cfg.nodes.regions),
        retry_initial=cfg.queue.retry_initial,
        retry_max=cfg.queue.retry_max,
        max_attempts=cfg.queue.max_attempts,
        default_ttl=cfg.queue.default_ttl,
        retention=cfg.queue.retention,
        sweep_interval=cfg.queue.sweep_interval,
        store_batch=cfg.storage.batch_size,
        default_deadline=cfg.analyzer.default_deadline,
        max_repushes=cfg.analyzer.max_repushes,
        sender_config=sender_config,
        apns_generation=generation,
        apns_environment=cfg.apns.environment,
    )


class Pipeline:
    def __init__(self, config: Config, store: Store) -> None:
        self.config = config
        self.store = store
        self.registry = Registry(store)
        self.queue = QueueStore(
            store, aging_seconds=config.queue.aging_seconds, max_attempts=config.queue.max_attempts
        )
        ch = config.channels
        self.central_send, self.central_recv = trio.open_memory_channel[Envelope](ch.central)
        self.queue_send, self.queue_recv = trio.open_memory_channel[Enqueued](ch.queue)
        self.analyzer_send, self.analyzer_recv = trio.open_memory_channel[AnalyzerInput](ch.analyzer)
        # Wake channels, one per node (index = shard); a wake says whether the new work
        # is urgent (priority 10). Pending wakes coalesce (see actors.queue.wake).
        self.wake_sends: list[trio.MemorySendChannel[bool]] = []
        self.wake_recvs: list[trio.MemoryReceiveChannel[bool]] = []
        # Each node's express-lane inbox (index = shard): central hands it urgent items it
        # leased in the accepting transaction; the node's waker kicks it (None).
        self.handoff_sends: list[trio.MemorySendChannel[Handoff | None]] = []
        self.handoff_recvs: list[trio.MemoryReceiveChannel[Handoff | None]] = []
        self.node_names: list[str] = []
        self.counters: Counter[str] = Counter()
        self.urgency = Urgency()  # priority-10 pushes in flight: bulk work steps aside
        store.pace = self.urgency.wait_if_urgent
        self.sim_setup = SimulatorSetup.prepare(config) if config.apns.environment == "simulator" else None
        self.sim_port: list[int] = []
        self.sim_actor: SimulatorActor | None = None
        self.apns_generation = 0
        self.live = LiveRef(
            build_live(config, sender_config=self._sender_factory(config), generation=0)
        )

    def _sender_factory(self, cfg: Config) -> Callable[..., Any]:
        return sender_config_factory(cfg, sim=self.sim_setup, port_ref=self.sim_port)

    @classmethod
    @asynccontextmanager
    async def open(cls, config: Config) -> AsyncIterator[Pipeline]:
        config.state_dir.mkdir(parents=True, exist_ok=True)
        async with open_store(config.database_path) as store:
            pipeline = cls(config, store)
            try:
                yield pipeline
            finally:
                pipeline.close_channels()

    async def refuse_waiting(self) -> int:
        """After the drain: answer the pushes still waiting in central's inbox (central was
        not running to do it: restarting after a crash when the drain began) as not
        accepted, and close the inbox, so that pushes still being sent to it are refused
        the same way. Returns how many were answered."""
        answered = await refuse_waiting(self.central_recv)
        self.central_recv.close()
        return answered

    def close_channels(self) -> None:
        channels: list[trio.abc.SendChannel[Any] | trio.abc.ReceiveChannel[Any]] = [
            self.central_send, self.queue_send, self.analyzer_send, *self.wake_sends, *self.handoff_sends,
            self.central_recv, self.queue_recv, self.analyzer_recv, *self.wake_recvs, *self.handoff_recvs,
        ]
        for channel in channels:
            assert isinstance(channel, (trio.MemorySendChannel, trio.MemoryReceiveChannel))
            channel.close()

    # -- actors ---------------------------------------------------------------------

    async def start(self, nursery: trio.Nursery, supervisor: Supervisor) -> None:
        # The instance lock makes this the only process on the store: every lease in it
        # belongs to a process that died. Hand them out again now, not after lease_seconds.
        now = time.time()
        await self.store.execute("UPDATE items SET lease_until = ? WHERE state = 'leased'", (now,))
        reclaimed = await self.queue.reclaim_expired_leases(now)
        if reclaimed:
            log.info("leases of a previous run reclaimed", items=reclaimed)
        if self.sim_setup is not None:
            await nursery.start(supervisor.supervise, "apns-simulator", self._simulator)
        await nursery.start(supervisor.supervise, "queue", self._queue)
        await nursery.start(supervisor.supervise, "analyzer", self._analyzer)
        await nursery.start(supervisor.supervise, "central", self._central)
        await self._scale_nodes(nursery, supervisor, self.config.nodes.count)

    def _simulator(self, ctx: ActorContext) -> SimulatorActor:
        assert self.sim_setup is not None
        self.sim_actor = SimulatorActor(ctx, self.config, self.sim_setup, self.sim_port)
        return self.sim_actor

    def _queue(self, ctx: ActorContext) -> QueueActor:
        return QueueActor(
            ctx, inbox=self.queue_recv.clone(), queue=self.queue, live=self.live, wakes=self.wake_sends
        )

    def _analyzer(self, ctx: ActorContext) -> AnalyzerActor:
        return AnalyzerActor(
            ctx,
            inbox=self.analyzer_recv.clone(),
            queue=self.queue,
            registry=self.registry,
            live=self.live,
            queue_notes=self.queue_send.clone(),
        )

    def _central(self, ctx: ActorContext) -> CentralActor:
        return CentralActor(
            ctx,
            inbox=self.central_recv.clone(),
            queue_notes=self.queue_send.clone(),
            registry=self.registry,
            queue=self.queue,
            live=self.live,
            handoffs=self.handoff_sends,
            node_names=self.node_names,
            urgency=self.urgency,
        )

    def _node(self, index: int) -> Callable[[ActorContext], NodeActor]:
        def factory(ctx: ActorContext) -> NodeActor:
            return NodeActor(
                ctx,
                index=index,
                wake=self.wake_recvs[index].clone(),
                handoffs=self.handoff_recvs[index].clone(),
                express_kick=self.handoff_sends[index].clone(),
                deliveries=self.analyzer_send.clone(),
                queue=self.queue,
                live=self.live,
                counters=self.counters,
                urgency=self.urgency,
            )

        return factory

    async def _scale_nodes(self, nursery: trio.Nursery, supervisor: Supervisor, count: int) -> None:
        while len(self.wake_sends) < count:
            send, recv = trio.open_memory_channel[bool](WAKE_SLOTS)
            self.wake_sends.append(send)
            self.wake_recvs.append(recv)
            handoff_send, handoff_recv = trio.open_memory_channel[Handoff | None](HANDOFF_SLOTS)
            self.handoff_sends.append(handoff_send)
            self.handoff_recvs.append(handoff_recv)
        while len(self.node_names) < count:
            index = len(self.node_names)
            name = f"node-{index}"
            await nursery.start(supervisor.supervise, name, self._node(index))
            self.node_names.append(name)
        while len(self.node_names) > count:
            name = self.node_names.pop()
            handle = supervisor.actors[name]
            handle.request_stop()
            await handle.done.wait()
            del supervisor.actors[name]
        # Work queued for shards that no node owns any more moves at the next sweep.

    def prepare(self, config: Config) -> Live:
        """Build (and so check) everything a reload would put in force, without applying
        it: code keys (files created if missing), rules, and the APNs credentials (the
        key or certificate is loaded). Raises ValueError/OSError naming the problem."""
        if (config.apns.environment == "simulator") != (self.config.apns.environment == "simulator"):
            raise ValueError("apns.environment: switching to or from the simulator needs a restart")
        generation = self.apns_generation + (config.apns != self.config.apns)
        live = build_live(config, sender_config=self._sender_factory(config), generation=generation)
        if config.apns != self.config.apns:
            assert live.sender_config is not None
            live.sender_config()  # loads the key / certificate now, not in every node later
        return live

    async def apply(self, config: Config, live: Live, nursery: trio.Nursery, supervisor: Supervisor) -> None:
        """Put ``config`` (checked by :meth:`prepare`) in force. If a node it adds cannot
        start (its supervisor gives up), the previous settings and node count are put
        back, the nodes it started are stopped, and ValueError names the problem: the
        work queued meanwhile for the new shards moves back at the next sweep."""
        old, old_live = self.config, self.live.current
        self._set(config, live.apns_generation)
        # Shrink: nodes first (so the sweep re-shards for the new count); grow: settings first.
        if config.nodes.count < old.nodes.count:
            await self._scale_nodes(nursery, supervisor, config.nodes.count)
        self.live.current = live
        if config.nodes.count > old.nodes.count:
            try:
                with trio.fail_after(NODE_START_TIMEOUT):  # a start that hangs fails too
                    await self._scale_nodes(nursery, supervisor, config.nodes.count)
            except (ActorEscalation, trio.TooSlowError) as exc:
                failed = f"node-{len(self.node_names)}"
                self._set(old, old_live.apns_generation)
                self.live.current = old_live
                supervisor.actors.pop(failed, None)
                await self._scale_nodes(nursery, supervisor, old.nodes.count)
                why = str(exc) if isinstance(exc, ActorEscalation) else f"not started within {NODE_START_TIMEOUT:g}s"
                raise ValueError(f"{failed} could not start, {old.nodes.count} kept: {why}") from exc
        log.info("pipeline settings applied", nodes=config.nodes.count, apns_generation=self.apns_generation)

    def _set(self, config: Config, apns_generation: int) -> None:
        self.config = config
        self.apns_generation = apns_generation
        self.queue.aging_seconds = config.queue.aging_seconds
        self.queue.max_attempts = config.queue.max_attempts

    # -- control ops and figures ------------------------------------------------------

    def handlers(self, daemon: Any) -> dict[str, Any]:
        from pushd.ops import Ops

        return Ops(self, daemon).table()

    async def stats(self) -> dict[str, Any]:
        counts = await self.queue.counts()
        return {
            "nodes": len(self.node_names),
            "queue": counts,
            "deliveries": dict(self.counters),
            "urgent": {"in_flight": self.urgency.count, "bulk_steps_aside": self.urgency.waits},
            "follow_ups": await followup_totals(self.queue),
        }

    def status_line(self) -> str:
        c = self.counters
        return f"{len(self.node_names)} nodes; sent {c['sent']}, failed {c['failed']}, skipped {c['skipped']}"
