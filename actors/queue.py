"""Queue: the durable queue's housekeeping (wake-ups, lease reclaim, expiry)."""

from __future__ import annotations

from typing import Any

import trio

from actors.base import ActorContext
from actors.messages import Enqueued


class QueueActor:
    def __init__(self, ctx: ActorContext, *, inbox: trio.MemoryReceiveChannel[Enqueued]) -> None:
        self.ctx = ctx
        self.inbox = inbox

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        async with self.inbox:
            task_status.started()
            while not self.ctx.stopping.is_set():
                self.ctx.heartbeat.beat()
                with trio.move_on_after(self.ctx.heartbeat.interval):
                    await self.inbox.receive()
