"""Urgent work in flight, so that bulk work steps aside for it.

Everything runs on one trio thread; trio has no task priorities, and while a broadcast
keeps that thread busy, every step of an urgent push (read its request, store it, send
it, read the answer) waits for a turn behind the broadcast's lanes. So the pipeline
keeps one count of the priority-10 pushes being accepted, handed over or sent:

* the control op ``push`` holds it while central accepts a priority-10 push;
* a node's express lane holds it from taking a hand-off (central's in-memory hand-over
  of an urgent push) until the round it goes out in is answered, and while it sends
  urgent pushes to fewer than ``actors.node.SMALL_AUDIENCE`` devices that it leased;
* bulk work calls :meth:`Urgency.step_aside` before each slice: the ordinary lanes,
  the bulk connections' reads and batches, a fan-out, non-urgent database work. While
  the count is above zero they wait, at most ``max_wait`` each time.

The wait is bounded, so a count that never came down (a bug) slows bulk work but never
stops it; the ``stats`` op shows the count.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import trio

__all__ = ["Urgency"]


class Urgency:
    def __init__(self, max_wait: float = 0.05) -> None:
        # 20 ms and 50 ms measured alike for head of line (BENCHMARKS.md, 2026-11-28).
        self.max_wait = max_wait
        self.count = 0
        self.waits = 0  # how often bulk work stepped aside (stats)
        self._clear = trio.Event()
        self._clear.set()

    def add(self, n: int = 1) -> None:
        if n <= 0:
            return
        if self.count == 0:
            self._clear = trio.Event()
        self.count += n

    def release(self, n: int = 1) -> None:
        if n <= 0:
            return
        self.count = max(0, self.count - n)
        if self.count == 0:
            self._clear.set()

    @contextmanager
    def hold(self) -> Iterator[None]:
        self.add()
        try:
            yield
        finally:
            self.release()

    async def wait_if_urgent(self) -> None:
        """:meth:`step_aside` without the checkpoint when nothing urgent is in flight: for
        callers that are about to checkpoint anyway (a read, a database call)."""
        if self.count:
            await self.step_aside()

    async def step_aside(self) -> None:
        """For bulk work between two slices: wait while urgent work is in flight (at most
        ``max_wait``), else just a checkpoint."""
        if self.count:
            self.waits += 1
            with trio.move_on_after(self.max_wait):
                await self._clear.wait()
        else:
            await trio.lowlevel.checkpoint()
