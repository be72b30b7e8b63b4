"""Supervision: restart with jittered exponential backoff, escalation, isolation,
graceful stop, and watchdog pings that stop when an actor wedges."""

from __future__ import annotations

import random
from typing import Any

import pytest
import trio
import trio.testing

from actors.base import ActorContext
from pushd.daemon import watchdog_loop
from pushd.supervisor import ActorEscalation, ActorState, RestartPolicy, Supervisor

POLICY = RestartPolicy(backoff_initial=1.0, backoff_max=8.0, max_crashes=5, crash_window=60.0, heartbeat_interval=1.0)


class Scripted:
    """An actor whose incarnations crash ``crashes`` times, then run until stopped."""

    def __init__(self, crashes: int, *, crash_after_start: bool = True) -> None:
        self.crashes = crashes
        self.crash_after_start = crash_after_start
        self.starts: list[float] = []
        self.progress = 0

    def factory(self, ctx: ActorContext) -> Any:
        outer = self

        class Incarnation:
            async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
                outer.starts.append(trio.current_time())
                if outer.crashes > 0 and not outer.crash_after_start:
                    outer.crashes -= 1
                    raise RuntimeError("boom before start")
                task_status.started()
                if outer.crashes > 0:
                    outer.crashes -= 1
                    await trio.sleep(0.1)
                    raise RuntimeError("boom")
                while not ctx.stopping.is_set():
                    outer.progress += 1
                    ctx.heartbeat.beat()
                    with trio.move_on_after(0.5):
                        await ctx.stopping.wait()

        return Incarnation()


async def test_restarts_with_jittered_exponential_backoff(autojump_clock: trio.testing.MockClock) -> None:
    sup = Supervisor(POLICY, rng=random.Random(7))
    actor = Scripted(crashes=3)
    async with trio.open_nursery() as nursery:
        handle = await nursery.start(sup.supervise, "a", actor.factory)
        await trio.sleep(30)
        assert handle.state is ActorState.RUNNING
        assert handle.restarts == 3
        assert handle.last_error == "RuntimeError: boom"
        gaps = [b - a - 0.1 for a, b in zip(actor.starts, actor.starts[1:], strict=False)]
        for n, gap in enumerate(gaps, start=1):
            base = min(POLICY.backoff_max, POLICY.backoff_initial * 2 ** (n - 1))
            assert 0.5 * base - 1e-6 <= gap <= base + 1e-6, (n, gap)
        handle.request_stop()
        await handle.done.wait()
    assert handle.state is ActorState.STOPPED
    assert len(actor.starts) == 4


async def test_backoff_is_capped() -> None:
    sup = Supervisor(POLICY, rng=random.Random(1))
    assert all(sup.backoff(n) <= POLICY.backoff_max for n in range(1, 40))
    assert sup.backoff(30) >= POLICY.backoff_max / 2


async def test_keeps_crashing_escalates(autojump_clock: trio.testing.MockClock) -> None:
    sup = Supervisor(POLICY, rng=random.Random(3))
    actor = Scripted(crashes=100)
    with pytest.RaisesGroup(pytest.RaisesExc(ActorEscalation, match="actor bad crashed 5 times")):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.supervise, "bad", actor.factory)
            await trio.sleep_forever()
    assert sup.actors["bad"].state is ActorState.FAILED
    assert len(actor.starts) == 5


async def test_crashes_spread_beyond_the_window_do_not_escalate(autojump_clock: trio.testing.MockClock) -> None:
    policy = RestartPolicy(backoff_initial=40.0, backoff_max=40.0, max_crashes=2, crash_window=10.0)
    sup = Supervisor(policy, rng=random.Random(3))
    actor = Scripted(crashes=4)
    async with trio.open_nursery() as nursery:
        handle = await nursery.start(sup.supervise, "slow", actor.factory)
        await trio.sleep(400)
        assert handle.state is ActorState.RUNNING and handle.restarts == 4
        handle.request_stop()


async def test_ready_waits_for_a_start_that_needed_restarts(autojump_clock: trio.testing.MockClock) -> None:
    sup = Supervisor(POLICY, rng=random.Random(5))
    actor = Scripted(crashes=2, crash_after_start=False)
    async with trio.open_nursery() as nursery:
        handle = await nursery.start(sup.supervise, "late", actor.factory)
        assert handle.state is ActorState.RUNNING
        assert len(actor.starts) == 3
        handle.request_stop()


async def test_a_crashing_node_does_not_disturb_another(autojump_clock: trio.testing.MockClock) -> None:
    sup = Supervisor(POLICY, rng=random.Random(9))
    flaky, steady = Scripted(crashes=4), Scripted(crashes=0)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.supervise, "node-0", flaky.factory)
        h1 = await nursery.start(sup.supervise, "node-1", steady.factory)
        before = steady.progress
        await trio.sleep(40)
        assert sup.actors["node-0"].restarts == 4
        assert len(steady.starts) == 1 and h1.restarts == 0
        assert steady.progress > before + 50
        sup.request_stop_all()


class RecordingNotifier:
    def __init__(self) -> None:
        self.events: list[tuple[float, str]] = []

    def watchdog_interval(self) -> float | None:
        return 1.0

    def watchdog(self) -> None:
        self.events.append((trio.current_time(), "WATCHDOG=1"))

    def status(self, text: str) -> None:
        self.events.append((trio.current_time(), f"STATUS={text}"))


async def test_watchdog_pings_stop_when_an_actor_wedges(autojump_clock: trio.testing.MockClock) -> None:
    sup = Supervisor(POLICY)
    wedge = trio.Event()

    def factory(ctx: ActorContext) -> Any:
        class Wedgeable:
            async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
                task_status.started()
                while not wedge.is_set():
                    ctx.heartbeat.beat()
                    await trio.sleep(0.5)
                await trio.sleep_forever()  # stuck: no more heartbeats

        return Wedgeable()

    notifier = RecordingNotifier()
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.supervise, "node-0", factory)
        nursery.start_soon(watchdog_loop, sup, notifier, 5.0)
        await trio.sleep(10)
        pings_before = [t for t, e in notifier.events if e == "WATCHDOG=1"]
        assert len(pings_before) >= 10
        wedge.set()
        wedged_at = trio.current_time()
        await trio.sleep(30)
        late = [t for t, e in notifier.events if e == "WATCHDOG=1" and t > wedged_at + 5.0 + 1.0]
        assert late == []
        assert any(e == "STATUS=wedged: node-0" for _, e in notifier.events)
        assert sup.stale(5.0) == ["node-0"]
        nursery.cancel_scope.cancel()


async def test_drain_lets_in_flight_work_finish_by_the_deadline(autojump_clock: trio.testing.MockClock) -> None:
    from pushd.daemon import drain

    sup = Supervisor(POLICY)
    finished: list[str] = []

    def worker(name: str, work: float) -> Any:
        def factory(ctx: ActorContext) -> Any:
            class Worker:
                async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
                    task_status.started()
                    await ctx.stopping.wait()
                    await trio.sleep(work)  # in-flight work finishing after the stop request
                    finished.append(name)

            return Worker()

        return factory

    async with trio.open_nursery() as nursery:
        await nursery.start(sup.supervise, "quick", worker("quick", 2.0))
        await nursery.start(sup.supervise, "slow", worker("slow", 100.0))
        t0 = trio.current_time()
        left = await drain(sup, 10.0)
        assert trio.current_time() - t0 == pytest.approx(10.0)
        assert left == ["slow"]
        assert finished == ["quick"]
        assert sup.actors["quick"].state is ActorState.STOPPED
        nursery.cancel_scope.cancel()
    assert finished == ["quick"]


async def test_a_message_received_as_the_wait_runs_out_is_not_dropped(mock_clock: trio.testing.MockClock) -> None:
    from actors.base import ActorContext, Heartbeat, StopAwareWaits

    ctx = ActorContext("lane", Heartbeat(1.0))
    waits = StopAwareWaits(ctx)
    send, recv = trio.open_memory_channel[str](1)
    got: list[tuple[bool, str | None]] = []

    async def waiter() -> None:
        got.append(await waits.receive(recv, 1.0))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waits.watch)
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        send.send_nowait("hand-off")
        mock_clock.jump(2.0)  # the wait's deadline passes before the waiter runs again
        await trio.testing.wait_all_tasks_blocked()
        assert got == [(True, "hand-off")]
        # A stop ends a wait in progress at once, and a wait begun after it at once.
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        ctx.stopping.set()
        await trio.testing.wait_all_tasks_blocked()
        assert got[1:] == [(False, None)]
        assert await waits.receive(recv, 1.0) == (False, None)
        assert trio.current_time() == 2.0 and send.statistics().current_buffer_used == 0


async def test_an_actor_that_hangs_while_restarting_counts_as_wedged(autojump_clock: trio.testing.MockClock) -> None:
    from pushd.supervisor import START_GRACE

    sup = Supervisor(POLICY)
    starts = 0

    def factory(ctx: ActorContext) -> Any:
        class Actor:
            async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
                nonlocal starts
                starts += 1
                if starts == 1:
                    task_status.started()
                    await trio.sleep(1)
                    raise RuntimeError("crash")
                await trio.sleep_forever()  # the restart never finishes starting

        return Actor()

    async with trio.open_nursery() as nursery:
        await nursery.start(sup.supervise, "queue", factory)
        await trio.sleep(10)  # crashed, backed off, restarting
        assert sup.actors["queue"].state is ActorState.STARTING
        assert sup.stale(5.0) == []  # a start may take a while
        await trio.sleep(START_GRACE)
        assert sup.stale(5.0) == ["queue"]
        nursery.cancel_scope.cancel()
