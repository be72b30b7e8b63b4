"""Supervision of actors: start, restart with jittered exponential backoff, escalate.

``await nursery.start(supervisor.supervise, name, factory)`` returns once the actor's
first incarnation has called ``task_status.started()``; the daemon reports ready only
after every such call has returned.  ``factory(ctx)`` builds a fresh actor for each
incarnation (state that must survive a crash lives in the store).

A crash is an exception out of the actor's ``run`` or a return nobody asked for.  The
actor is restarted after ``backoff_initial * 2**(n-1)`` seconds (capped at
``backoff_max``, with jitter in [50 %, 100 %]), n being its crashes within the window.  ``max_crashes`` crashes within
``crash_window`` seconds make ``supervise`` raise ``ActorEscalation``, which ends the
daemon with a non-zero exit so that systemd restarts the whole process.  Each actor has
its own ``supervise`` task, so a crash in one node never touches another.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

import structlog
import trio

from actors.base import ActorContext, Heartbeat

__all__ = ["ActorEscalation", "ActorHandle", "ActorState", "RestartPolicy", "Supervisor"]

log = structlog.get_logger("pushd.supervisor")


class Actor(Protocol):
    async def run(self, *, task_status: trio.TaskStatus[Any] = ...) -> None: ...


ActorFactory = Callable[[ActorContext], Actor]


class ActorState(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass(frozen=True)
class RestartPolicy:
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    max_crashes: int = 5
    crash_window: float = 60.0
    heartbeat_interval: float = 2.0


# seconds a (re)starting actor may go without a heartbeat before it counts as wedged
START_GRACE = 120.0


class ActorEscalation(Exception):
    """An actor crashed too often; the daemon must exit non-zero."""

    def __init__(self, name: str, crashes: int, window: float, last_error: str) -> None:
        self.name = name
        super().__init__(
            f"actor {name} crashed {crashes} times within {window:g}s; last error: {last_error}"
        )


@dataclass
class ActorHandle:
    name: str
    stopping: trio.Event = field(default_factory=trio.Event)
    done: trio.Event = field(default_factory=trio.Event)
    state: ActorState = ActorState.STARTING
    restarts: int = 0
    last_error: str | None = None
    last_error_at: float | None = None  # wall clock
    started_at: float | None = None  # wall clock
    heartbeat: Heartbeat | None = None
    crash_times: deque[float] = field(default_factory=deque)  # trio clock

    def request_stop(self) -> None:
        """Graceful: the actor finishes in-flight work and returns."""
        self.stopping.set()

    def heartbeat_age(self) -> float | None:
        """Seconds since the actor last proved progress, while it runs or starts."""
        if self.heartbeat is None or self.state not in (ActorState.RUNNING, ActorState.STARTING):
            return None
        return self.heartbeat.age()

    def describe(self) -> dict[str, Any]:
        age = self.heartbeat_age()
        return {
            "name": self.name,
            "state": str(self.state),
            "restarts": self.restarts,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "started_at": self.started_at,
            "heartbeat_age": None if age is None else round(age, 3),
        }


def _describe_error(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Supervisor:
    def __init__(self, policy: RestartPolicy, *, rng: random.Random | None = None) -> None:
        self.policy = policy
        self.actors: dict[str, ActorHandle] = {}
        self._rng = rng or random.Random()

    def backoff(self, consecutive: int) -> float:
        base = min(self.policy.backoff_max, self.policy.backoff_initial * 2 ** (consecutive - 1))
        return base * self._rng.uniform(0.5, 1.0)

    def stale(self, timeout: float) -> list[str]:
        """Actors whose heartbeat is older than ``timeout`` (wedged); one still starting
        (a restart after a crash: a first sweep, a reconcile) gets at least START_GRACE."""
        return [
            h.name
            for h in self.actors.values()
            if (age := h.heartbeat_age()) is not None
            and age > (max(timeout, START_GRACE) if h.state is ActorState.STARTING else timeout)
        ]

    def describe(self) -> list[dict[str, Any]]:
        return [h.describe() for h in self.actors.values()]

    def request_stop_all(self) -> None:
        for h in self.actors.values():
            h.request_stop()

    async def supervise(
        self,
        name: str,
        factory: ActorFactory,
        *,
        task_status: trio.TaskStatus[ActorHandle] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        if name in self.actors and not self.actors[name].done.is_set():
            raise ValueError(f"actor {name} is already supervised")
        handle = ActorHandle(name)
        self.actors[name] = handle
        reported = False
        bound = structlog.get_logger("pushd.supervisor").bind(actor=name)
        try:
            while True:
                ctx = ActorContext(name, Heartbeat(self.policy.heartbeat_interval), handle.stopping)
                ctx.heartbeat.beat()  # starting: a start that hangs is wedged too (stale)
                handle.heartbeat = ctx.heartbeat
                handle.state = ActorState.STARTING
                try:
                    async with trio.open_nursery() as nursery:
                        await nursery.start(factory(ctx).run)
                        ctx.heartbeat.beat()
                        handle.state = ActorState.RUNNING
                        handle.started_at = time.time()
                        bound.debug("actor started", restarts=handle.restarts)
                        if not reported:
                            reported = True
                            task_status.started(handle)
                    if handle.stopping.is_set():
                        handle.state = ActorState.STOPPED
                        return
                    raise RuntimeError("actor returned without being asked to stop")
                except Exception as exc:
                    error = _describe_error(exc)
                    handle.last_error = error
                    handle.last_error_at = time.time()
                    if handle.stopping.is_set():
                        bound.warning("actor failed while stopping", error=error)
                        handle.state = ActorState.STOPPED
                        return
                    now = trio.current_time()
                    handle.crash_times.append(now)
                    while handle.crash_times and handle.crash_times[0] < now - self.policy.crash_window:
                        handle.crash_times.popleft()
                    if len(handle.crash_times) >= self.policy.max_crashes:
                        handle.state = ActorState.FAILED
                        bound.error("actor keeps crashing; giving up", error=error, exc_info=exc)
                        raise ActorEscalation(
                            name, len(handle.crash_times), self.policy.crash_window, error
                        ) from exc
                    # Backoff grows with the crashes inside the window; an actor that
                    # ran quietly for a whole window starts again from backoff_initial.
                    delay = self.backoff(len(handle.crash_times))
                    handle.state = ActorState.BACKOFF
                    bound.error("actor crashed; restarting", error=error, delay=round(delay, 3), exc_info=exc)
                    with trio.move_on_after(delay):
                        await handle.stopping.wait()
                    if handle.stopping.is_set():
                        handle.state = ActorState.STOPPED
                        return
                    handle.restarts += 1
        finally:
            if handle.state not in (ActorState.STOPPED, ActorState.FAILED):
                handle.state = ActorState.STOPPED
            handle.done.set()
