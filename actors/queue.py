"""Queue: the durable queue's housekeeping.

The queue itself is the ``items`` table (``actors.queuestore``); central writes to it and
nodes lease from it directly. This actor keeps it moving:

* wakes the node that owns a shard when central (or the analyzer) reports new work —
  through each node's small wake channel, so a burst of reports costs one wake-up; a
  report of priority-10 work wakes the node's express lane (urgent pushes that central
  handed to the express lane directly are not reported: they need no wake-up);
* every ``sweep_interval`` seconds: hands leases that ran out (a crashed or stopped node's
  work) back to the queue, marks items of expired messages as expired, moves work of
  shards no node owns any more (after the node count shrank) to a live shard, and wakes
  nodes that have work again.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import Any

import structlog
import trio

from actors.base import ActorContext, receive_within
from actors.live import LiveRef
from actors.messages import Enqueued
from actors.queuestore import QueueStore

log = structlog.get_logger("actors.queue")


SWEEP_STALL = 60.0  # seconds; a sweep is bounded work (purges are batched), normally < 1 s
WAKE_SLOTS = 4  # a node's wake channel: ordinary wakes use at most half of it


def wake(channels: Sequence[trio.MemorySendChannel[bool]], shard: int, urgent: bool = False) -> None:
    """Non-blocking wake-up of the node owning ``shard``; ``urgent``: the new work includes
    priority-10 items (for the node's express lane). Pending wakes coalesce: an ordinary
    wake is dropped when two are pending, an urgent one only when the channel is full
    (of wakes that will wake the express lane anyway), so a burst of ordinary wakes during
    a fan-out never crowds out an urgent one."""
    if not channels:
        return
    channel = channels[shard % len(channels)]
    if not urgent and channel.statistics().current_buffer_used >= WAKE_SLOTS // 2:
        return
    with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
        channel.send_nowait(urgent)


class QueueActor:
    def __init__(
        self,
        ctx: ActorContext,
        *,
        inbox: trio.MemoryReceiveChannel[Enqueued],
        queue: QueueStore,
        live: LiveRef,
        wakes: list[trio.MemorySendChannel[bool]],
    ) -> None:
        self.ctx = ctx
        self.inbox = inbox
        self.queue = queue
        self.live = live
        self.wakes = wakes  # shared list owned by the pipeline; index = shard
        self._sweep_started: float | None = None

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        async with self.inbox, trio.open_nursery() as nursery:
            await self.sweep()
            # Housekeeping runs beside the wake-ups, never in front of them: a sweep waits
            # for the database like any bulk work, and a wake must not wait for a sweep.
            nursery.start_soon(self._sweeper)
            task_status.started()
            while not self.ctx.stopping.is_set():
                if not self._sweep_stalled():
                    self.ctx.heartbeat.beat()
                got, note = await receive_within(self.inbox, self.ctx.heartbeat.interval)
                if got:
                    assert note is not None
                    for shard in note.shards:
                        wake(self.wakes, shard, note.urgent)
            nursery.cancel_scope.cancel()

    async def _sweeper(self) -> None:
        while True:
            await trio.sleep(self.live.current.sweep_interval)
            self._sweep_started = trio.current_time()
            await self.sweep()
            self._sweep_started = None

    def _sweep_stalled(self) -> bool:
        """A sweep running for longer than :data:`SWEEP_STALL` is wedged: the actor then
        stops proving progress, so the watchdog (and systemd) notice, as they would if
        the sweep ran in the wake-up loop itself."""
        started = self._sweep_started
        return started is not None and trio.current_time() - started > SWEEP_STALL

    async def sweep(self) -> None:
        now = time.time()
        live = self.live.current
        reclaimed = await self.queue.reclaim_expired_leases(now)
        expired = await self.queue.expire_due(now)
        moved = await self.queue.reshard(live.node_count)
        purged = await self.purge(now - live.retention)
        if reclaimed or expired or moved or purged:
            log.info("queue sweep", reclaimed=reclaimed, expired=expired, moved=moved, purged=purged)
        for shard in range(live.node_count):
            ready = await self.queue.next_ready_time(shard)
            if ready is not None and ready <= now:
                wake(self.wakes, shard)

    async def purge(self, before: float) -> int:
        """Retention: delete what finished before ``before`` — messages with their items
        (a bounded amount per sweep), app events, and closed follow-ups — but never a
        message or a user's events that an open follow-up still needs."""
        purged = await self.queue.purge_finished(before=before, max_items=5000)
        purged += await self.queue.store.execute(
            """DELETE FROM events WHERE at < ? AND user_id NOT IN
                   (SELECT user_id FROM followups WHERE state IN ('pending', 'waiting'))""",
            (before,),
        )
        purged += await self.queue.store.execute(
            "DELETE FROM followups WHERE state IN ('handled', 'gave_up', 'stopped') AND updated_at < ?",
            (before,),
        )
        return purged
