"""Virtual time beside a store's database thread."""

from __future__ import annotations

import math

import trio
import trio.testing

from actors.storage import Store


async def advance_when_idle(clock: trio.testing.MockClock, store: Store) -> None:
    """Run as a task in place of ``clock``'s autojump: jump to the next deadline once every
    task is blocked *and* the store's thread has nothing in flight.

    MockClock's own autojump counts a task waiting for the database thread as idle: when
    the thread takes longer than the threshold in real time (a loaded machine), virtual
    time runs ahead of the work it waits for, and a test that sleeps "5 virtual seconds"
    for a write to land checks too early."""
    clock.autojump_threshold = math.inf
    while True:
        await trio.testing.wait_all_tasks_blocked(cushion=0.002)
        if store.in_flight:  # the thread is working: look again after the cushion
            await trio.lowlevel.checkpoint()
            continue
        jump = trio.lowlevel.current_statistics().seconds_to_next_deadline
        if 0 < jump < math.inf:
            clock.jump(jump)
