"""Node: leases its shard's messages, verifies and re-checks them, sends them to APNs."""

from __future__ import annotations

from typing import Any

import trio

from actors.base import ActorContext
from actors.messages import Delivered


class NodeActor:
    def __init__(
        self, ctx: ActorContext, *, index: int, deliveries: trio.MemorySendChannel[Delivered]
    ) -> None:
        self.ctx = ctx
        self.index = index
        self.deliveries = deliveries

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        async with self.deliveries:
            task_status.started()
            await self.ctx.idle()
