"""Bulk work stepping aside for urgent work (actors.urgency), on a virtual clock."""

from __future__ import annotations

import trio
import trio.testing

from actors.urgency import Urgency


async def test_bulk_work_waits_while_urgent_work_is_in_flight(autojump_clock: trio.testing.MockClock) -> None:
    urgency = Urgency(max_wait=1.0)
    start = trio.current_time()
    await urgency.step_aside()  # nothing urgent: no wait
    assert trio.current_time() == start and urgency.waits == 0

    resumed: list[float] = []

    async def bulk() -> None:
        await urgency.step_aside()
        resumed.append(trio.current_time() - start)

    async with trio.open_nursery() as nursery:
        with urgency.hold():
            urgency.add(2)  # e.g. two hand-offs not sent yet
            nursery.start_soon(bulk)
            await trio.sleep(0.3)
            urgency.release(2)
        # the hold ended at 0.3 s: the waiting bulk step resumes then
    assert resumed == [0.3] and urgency.count == 0 and urgency.waits == 1


async def test_a_count_that_never_comes_down_only_slows_bulk_work(autojump_clock: trio.testing.MockClock) -> None:
    urgency = Urgency(max_wait=0.05)
    urgency.add()  # never released
    start = trio.current_time()
    for _ in range(10):
        await urgency.step_aside()
    assert abs(trio.current_time() - start - 0.5) < 1e-9
    urgency.release(5)  # releasing more than was added does not go below zero
    assert urgency.count == 0
    urgency.add()
    urgency.release()
    await urgency.step_aside()
    assert abs(trio.current_time() - start - 0.5) < 1e-9
