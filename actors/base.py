"""What every actor is handed by its supervisor: a heartbeat and a stop request.

An actor is one class with ``async def run(self, *, task_status=trio.TASK_STATUS_IGNORED)``.
It calls ``task_status.started()`` once it is ready to work, beats its heartbeat at
least every ``heartbeat.interval`` seconds while healthy (waits are bounded by that
interval, see ``ActorContext.idle``), and returns once ``stopping`` is set and its
in-flight work is finished.  Returning at any other time counts as a crash.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TypeVar

import trio

__all__ = ["ActorContext", "Heartbeat", "StopAwareWaits", "receive_within"]

T = TypeVar("T")


class Heartbeat:
    """The last time the actor proved it was making progress (trio clock)."""

    __slots__ = ("interval", "last")

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.last = -math.inf

    def beat(self) -> None:
        self.last = trio.current_time()

    def age(self) -> float:
        return trio.current_time() - self.last


@dataclass
class ActorContext:
    name: str
    heartbeat: Heartbeat
    stopping: trio.Event = field(default_factory=trio.Event)

    async def idle(self, wake: trio.Event | None = None) -> None:
        """Wait until ``wake`` is set or a stop is requested, beating the heartbeat at
        least once per interval. Bound it with ``trio.move_on_after`` to wait for a time."""
        while not self.stopping.is_set() and not (wake is not None and wake.is_set()):
            self.heartbeat.beat()
            with trio.move_on_after(self.heartbeat.interval):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_wait_then_cancel, self.stopping, nursery.cancel_scope)
                    if wake is not None:
                        nursery.start_soon(_wait_then_cancel, wake, nursery.cancel_scope)
        self.heartbeat.beat()


async def _wait_then_cancel(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def receive_within(channel: trio.MemoryReceiveChannel[T], seconds: float) -> tuple[bool, T | None]:
    """Receive one message, or give up after ``seconds``: (True, message) or (False, None).

    Only the wait is bounded. The caller handles the message outside any timeout, so
    handling is never cut off half-way by the wait's deadline (a trio receive that is
    cancelled loses nothing)."""
    with trio.move_on_after(seconds):
        return True, await channel.receive()
    return False, None


class StopAwareWaits:
    """Bounded waits on channels that end early when a stop is requested.

    ``watch`` runs as one task beside the waiters and cancels every wait in progress when
    ``ctx.stopping`` is set, so a wait costs no task of its own. A message, once
    received, is always returned: nothing runs between the receive and the return."""

    def __init__(self, ctx: ActorContext) -> None:
        self.ctx = ctx
        self._scopes: set[trio.CancelScope] = set()

    async def watch(self) -> None:
        await self.ctx.stopping.wait()
        for scope in list(self._scopes):
            scope.cancel()

    async def receive(self, channel: trio.MemoryReceiveChannel[T], seconds: float) -> tuple[bool, T | None]:
        """(True, message), or (False, None) when the time ran out or a stop came first."""
        if self.ctx.stopping.is_set():
            await trio.lowlevel.checkpoint()
            return False, None
        with trio.move_on_after(seconds) as scope:
            self._scopes.add(scope)
            try:
                return True, await channel.receive()
            finally:
                self._scopes.discard(scope)
        return False, None
