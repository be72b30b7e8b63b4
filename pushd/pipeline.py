"""The actors and what they share: the store, the channels, the live settings.

``Pipeline.open(config)`` opens the store; ``start`` starts every actor under the
supervisor with ``nursery.start`` (the simulator first when ``apns.environment =
"simulator"``, then queue, analyzer, central and the nodes); ``apply`` puts a reloaded
config in force (node count, rules, code keys, credentials, limits) without dropping
in-flight work.  The channels are created here, bounded, with sizes from
``[channels]``; each actor incarnation gets clones of its ends and closes them itself.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import structlog
import trio

from actors.analyzer import AnalyzerActor
from actors.base import ActorContext
from actors.central import CentralActor
from actors.messages import AppEvent, Delivered, Enqueued, Envelope, RegistryChanged
from actors.node import NodeActor
from actors.queue import QueueActor
from actors.storage import Store, open_store
from pushd.config import Config

if TYPE_CHECKING:
    from pushd.supervisor import Supervisor

log = structlog.get_logger("pushd.pipeline")

AnalyzerInput = Delivered | AppEvent | RegistryChanged


class Pipeline:
    def __init__(self, config: Config, store: Store) -> None:
        self.config = config
        self.store = store
        ch = config.channels
        self.central_send, self.central_recv = trio.open_memory_channel[Envelope](ch.central)
        self.queue_send, self.queue_recv = trio.open_memory_channel[Enqueued](ch.queue)
        self.analyzer_send, self.analyzer_recv = trio.open_memory_channel[AnalyzerInput](ch.analyzer)
        self.node_names: list[str] = []

    @classmethod
    @asynccontextmanager
    async def open(cls, config: Config) -> AsyncIterator[Pipeline]:
        config.state_dir.mkdir(parents=True, exist_ok=True)
        async with open_store(config.database_path) as store:
            pipeline = cls(config, store)
            try:
                yield pipeline
            finally:
                for ch in (
                    pipeline.central_send, pipeline.central_recv, pipeline.queue_send,
                    pipeline.queue_recv, pipeline.analyzer_send, pipeline.analyzer_recv,
                ):
                    ch.close()

    # -- actors ---------------------------------------------------------------------

    async def start(self, nursery: trio.Nursery, supervisor: Supervisor) -> None:
        await nursery.start(supervisor.supervise, "queue", self._queue)
        await nursery.start(supervisor.supervise, "analyzer", self._analyzer)
        await nursery.start(supervisor.supervise, "central", self._central)
        await self._scale_nodes(nursery, supervisor, self.config.nodes.count)

    def _queue(self, ctx: ActorContext) -> QueueActor:
        return QueueActor(ctx, inbox=self.queue_recv.clone())

    def _analyzer(self, ctx: ActorContext) -> AnalyzerActor:
        return AnalyzerActor(ctx, inbox=self.analyzer_recv.clone())

    def _central(self, ctx: ActorContext) -> CentralActor:
        return CentralActor(ctx, inbox=self.central_recv.clone(), queue=self.queue_send.clone())

    def _node(self, index: int) -> Any:
        def factory(ctx: ActorContext) -> NodeActor:
            return NodeActor(ctx, index=index, deliveries=self.analyzer_send.clone())

        return factory

    async def _scale_nodes(self, nursery: trio.Nursery, supervisor: Supervisor, count: int) -> None:
        while len(self.node_names) < count:
            name = f"node-{len(self.node_names)}"
            await nursery.start(supervisor.supervise, name, self._node(len(self.node_names)))
            self.node_names.append(name)
        while len(self.node_names) > count:
            name = self.node_names.pop()
            handle = supervisor.actors[name]
            handle.request_stop()
            await handle.done.wait()
            del supervisor.actors[name]

    async def apply(self, config: Config, nursery: trio.Nursery, supervisor: Supervisor) -> None:
        old = self.config
        self.config = config
        if config.nodes.count != old.nodes.count:
            log.info("scaling nodes", old=old.nodes.count, new=config.nodes.count)
            await self._scale_nodes(nursery, supervisor, config.nodes.count)

    # -- control ops and figures ------------------------------------------------------

    def handlers(self, daemon: Any) -> dict[str, Any]:
        return {}

    async def stats(self) -> dict[str, Any]:
        return {"nodes": len(self.node_names)}

    def status_line(self) -> str:
        return f"{len(self.node_names)} nodes"
