"""Central: accepts pushes, resolves and classifies the audience, seals identification
codes, and writes the pre-push messages to the durable queue."""

from __future__ import annotations

from typing import Any

import trio

from actors.base import ActorContext
from actors.messages import Enqueued, Envelope


class CentralActor:
    def __init__(
        self,
        ctx: ActorContext,
        *,
        inbox: trio.MemoryReceiveChannel[Envelope],
        queue: trio.MemorySendChannel[Enqueued],
    ) -> None:
        self.ctx = ctx
        self.inbox = inbox
        self.queue = queue

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        async with self.inbox, self.queue:
            task_status.started()
            while not self.ctx.stopping.is_set():
                self.ctx.heartbeat.beat()
                with trio.move_on_after(self.ctx.heartbeat.interval):
                    envelope = await self.inbox.receive()
                    await envelope.answer(None)
