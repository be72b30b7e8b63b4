"""The daemon: builds the channels and actors from the config, supervises them, serves
the control socket, speaks sd_notify, and handles signals.

Lifecycle
  start     open the store, start every actor under the supervisor (each with
            ``nursery.start``), then the control socket; READY=1 once all have started.
  SIGHUP    reload: re-read and validate the config; an invalid file keeps the old
  / reload  config and the reply says what is wrong; otherwise apply what can be applied
            live (see ``pushd.config.RESTART_REQUIRED`` for the rest).
  SIGTERM   drain: stop taking new work, ask every actor to stop, wait for them up to
  / SIGINT  ``daemon.shutdown_timeout``, then cancel what is left; exit 0.  A second
            signal cancels at once.
  escalate  an actor that keeps crashing ends the daemon with exit status 1.
"""

from __future__ import annotations

import fcntl
import gc
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO, Any

import structlog
import trio

from pushd import logs
from pushd.config import Config, ConfigError, load_config, merge_for_reload
from pushd.control import ControlServer, Peer, SocketInUse
from pushd.protocol import ErrorCode, OpError, reject_unknown_args
from pushd.sdnotify import Notifier
from pushd.supervisor import ActorEscalation, ActorHandle, RestartPolicy, Supervisor

__all__ = ["EXIT_ESCALATED", "EXIT_OK", "Daemon"]

log = structlog.get_logger("pushd.daemon")

EXIT_OK = 0
EXIT_ESCALATED = 1
SETTLE_TIMEOUT = 1.0  # seconds the last replies get after the drain, before connections close

Handler = Callable[[dict[str, Any], Peer], Awaitable[Any]]


def restart_policy(cfg: Config) -> RestartPolicy:
    s = cfg.supervisor
    return RestartPolicy(
        backoff_initial=s.backoff_initial,
        backoff_max=s.backoff_max,
        max_crashes=s.max_crashes,
        crash_window=s.crash_window,
        heartbeat_interval=s.heartbeat_interval,
    )


def settle_heap() -> None:
    """Collect, then move everything alive into the garbage collector's permanent
    generation (``gc.freeze``): the modules, configuration and actors that live as long
    as the daemon are not scanned again by every full collection. Measured: full
    collections during single-push load went from 683 ms in all (up to 73 ms each, a
    latency spike for whatever was running) to 133 ms (up to 46 ms). Called once ready
    and after every applied reload (unfreezing first, so the replaced configuration's
    reference cycles are collected, not kept)."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class Daemon:
    """One pushd process. ``await daemon.run()`` returns the exit status."""

    def __init__(self, config: Config, *, notifier: Notifier | None = None) -> None:
        self.config = config
        self.notifier = notifier or Notifier.from_environ()
        self.supervisor = Supervisor(restart_policy(config))
        self.started_at = time.time()
        self.draining = False
        self.reloads = 0
        self._stop_requested = trio.Event()
        self._ready = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._pipeline: Any = None  # pushd.pipeline.Pipeline, built in run()
        self._reload_lock = trio.Lock()
        self._control: ControlServer | None = None

    # -- public ---------------------------------------------------------------------

    @property
    def pipeline(self) -> Any:
        """The running pushd.pipeline.Pipeline (None before start): for tests and tools."""
        return self._pipeline

    @property
    def ready(self) -> trio.Event:
        return self._ready

    def request_stop(self) -> None:
        self._stop_requested.set()

    async def run(self, *, task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED) -> int:
        from pushd.pipeline import Pipeline  # the actors and what they share

        cfg = self.config
        escalated: list[ActorEscalation] = []
        refused: list[Exception] = []
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        lock = acquire_instance_lock(cfg.state_dir / "pushd.lock")
        try:
            # Signals are ours from the first moment to the last: a SIGHUP during start-up
            # or drain must not fall back to the default action (terminate).
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                async with Pipeline.open(cfg) as pipeline, trio.open_nursery() as nursery:
                    nursery.start_soon(self._handle_signals, signals, nursery)
                    await self._serve(pipeline, nursery, task_status)
                    nursery.cancel_scope.cancel()
        except* ActorEscalation as group:
            escalated.extend(e for e in group.exceptions if isinstance(e, ActorEscalation))
        except* SocketInUse as group:
            refused.extend(e for e in group.exceptions if isinstance(e, SocketInUse))
        finally:
            lock.close()
        if refused:
            raise refused[0]
        if escalated:
            for exc in escalated:
                log.critical("exiting: an actor keeps crashing", error=str(exc))
            self.notifier.stopping(f"actor escalation: {escalated[0]}")
            return EXIT_ESCALATED
        log.info("pushd stopped")
        return EXIT_OK

    async def _serve(self, pipeline: Any, nursery: trio.Nursery, task_status: trio.TaskStatus[Daemon]) -> None:
        """Start everything, report ready, serve until asked to stop, then drain."""
        cfg = self.config
        self._nursery = nursery
        self._pipeline = pipeline
        control = ControlServer(
            cfg.socket_path,
            self.handlers(),
            mode=cfg.control.mode,
            group=cfg.control.group or None,
            allowed_uids=cfg.control.allowed_uids,
            allowed_gids=cfg.control.allowed_gids,
            max_frame=cfg.control.max_frame,
            max_connections=cfg.control.max_connections,
        )
        self._control = control
        await nursery.start(control.run)  # refuses a live socket before any actor runs
        await pipeline.start(nursery, self.supervisor)
        nursery.start_soon(self._watchdog)
        settle_heap()
        self._ready.set()
        self.notifier.ready(self.status_line())
        log.info(
            "pushd ready",
            socket=str(cfg.socket_path),
            database=str(cfg.database_path),
            nodes=cfg.nodes.count,
            apns=cfg.apns.environment,
        )
        task_status.started(self)
        await self._stop_requested.wait()
        await self._drain()
        if await pipeline.refuse_waiting():
            log.info("pushes still waiting for central answered: not accepted")
        with trio.move_on_after(SETTLE_TIMEOUT):
            await control.settle()

    # -- signals, drain, watchdog ---------------------------------------------------

    async def _handle_signals(self, signals: Any, nursery: trio.Nursery) -> None:
        """SIGHUP: reload (ignored while starting or draining). SIGTERM/SIGINT: drain;
        a second one cancels everything at once."""
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                if not self._ready.is_set() or self.draining:
                    log.warning("SIGHUP ignored", reason="draining" if self.draining else "starting")
                    continue
                nursery.start_soon(self._reload_on_signal)
            elif not self._stop_requested.is_set():
                log.info("signal received; draining", signal=name)
                self._stop_requested.set()
            else:
                log.warning("second signal; exiting at once", signal=name)
                nursery.cancel_scope.cancel()
                return

    async def _reload_on_signal(self) -> None:
        result = await self.reload()
        if not result["ok"]:
            # "setting: message" strings: the log redacts any field named "key" as a secret.
            problems = [f"{p['key']}: {p['message']}" for p in result["problems"]]
            log.error("reload rejected; old config kept", file=result.get("file"), problems=problems)

    async def _drain(self) -> None:
        """Stop taking new work, let in-flight work finish within shutdown_timeout."""
        self.draining = True  # reloads are refused from here on
        timeout = self.config.daemon.shutdown_timeout
        self.notifier.stopping(f"draining (up to {timeout:g}s)")
        # A reload already under way finishes first, so that the node actors it starts are
        # among those asked to stop (not cancelled at the end with work in hand).
        deadline = trio.current_time() + timeout  # for both steps together
        with trio.move_on_at(deadline):
            async with self._reload_lock:
                pass
        await drain(self.supervisor, max(0.0, deadline - trio.current_time()))

    async def _watchdog(self) -> None:
        await watchdog_loop(
            self.supervisor, self.notifier, lambda: self.config.supervisor.heartbeat_timeout, self.status_line
        )

    # -- reload ---------------------------------------------------------------------

    async def reload(self) -> dict[str, Any]:
        """Re-read the config file; apply it or keep the old one. Never raises."""
        async with self._reload_lock:
            source = self.config.source
            if self.draining:
                return {
                    "ok": False,
                    "file": str(source),
                    "problems": [{"key": "(daemon)", "message": "pushd is shutting down; reload refused"}],
                }
            self.notifier.reloading()
            try:
                if source is None:
                    raise ConfigError("<memory>", [])
                new = await trio.to_thread.run_sync(load_config, source)
            except ConfigError as exc:
                self.notifier.ready(self.status_line())
                return {
                    "ok": False,
                    "file": exc.file,
                    "problems": [{"key": p.key, "message": p.message} for p in exc.problems],
                }
            effective, applied, restart = merge_for_reload(self.config, new)
            live = None
            if self._pipeline is not None:
                try:
                    live = self._pipeline.prepare(effective)
                except (ValueError, OSError) as exc:
                    self.notifier.ready(self.status_line())
                    text = str(exc)
                    key = text.split(":", 1)[0] if ":" in text and " " not in text.split(":", 1)[0] else "(apply)"
                    return {
                        "ok": False,
                        "file": str(source),
                        "problems": [{"key": key, "message": text}],
                    }
            policy = self.supervisor.policy
            self.supervisor.policy = restart_policy(effective)  # for the nodes it may start
            if self._pipeline is not None and self._nursery is not None and live is not None:
                try:
                    await self._pipeline.apply(effective, live, self._nursery, self.supervisor)
                except ValueError as exc:  # a node it added could not start: all put back
                    self.supervisor.policy = policy
                    self.notifier.ready(self.status_line())
                    return {"ok": False, "file": str(source), "problems": [{"key": "nodes.count", "message": str(exc)}]}
            self.config = effective
            logs.set_level(effective.daemon.log_level)
            if self._control is not None:
                c = effective.control
                self._control.allow_peers(c.allowed_uids, c.allowed_gids)
                self._control.max_frame = c.max_frame
                self._control.max_connections = c.max_connections
            self.reloads += 1
            settle_heap()  # the old configuration's objects are garbage now
            log.info("config reloaded", changed=applied, restart_required=restart)
            self.notifier.ready(self.status_line())
            return {"ok": True, "changed": applied, "restart_required": restart}

    # -- control ops ----------------------------------------------------------------

    def handlers(self) -> dict[str, Handler]:
        ops: dict[str, Handler] = {
            "ping": self._op_ping,
            "status": self._op_status,
            "stats": self._op_stats,
            "reload": self._op_reload,
        }
        if self._pipeline is not None:
            ops.update(self._pipeline.handlers(self))
        return {name: self._guard(h) for name, h in ops.items()}

    def _guard(self, handler: Handler) -> Handler:
        async def guarded(args: dict[str, Any], peer: Peer) -> Any:
            if not self._ready.is_set():
                raise OpError(ErrorCode.UNAVAILABLE, "pushd is starting; try again shortly")
            return await handler(args, peer)

        return guarded

    async def _op_ping(self, args: dict[str, Any], peer: Peer) -> Any:
        reject_unknown_args(args)  # none taken
        return {"pong": True, "pid": os.getpid(), "version": _version()}

    async def _op_status(self, args: dict[str, Any], peer: Peer) -> Any:
        reject_unknown_args(args)  # none taken
        return {
            "pid": os.getpid(),
            "version": _version(),
            "uptime": round(time.time() - self.started_at, 3),
            "draining": self.draining,
            "config": str(self.config.source) if self.config.source else None,
            "reloads": self.reloads,
            "actors": self.supervisor.describe(),
        }

    async def _op_stats(self, args: dict[str, Any], peer: Peer) -> Any:
        reject_unknown_args(args)  # none taken
        out: dict[str, Any] = {
            "uptime": round(time.time() - self.started_at, 3),
            "restarts": sum(h.restarts for h in self.supervisor.actors.values()),
        }
        if self._pipeline is not None:
            out.update(await self._pipeline.stats())
        return out

    async def _op_reload(self, args: dict[str, Any], peer: Peer) -> Any:
        reject_unknown_args(args)  # none taken
        result = await self.reload()
        if not result["ok"]:
            problems = "; ".join(f"{p['key']}: {p['message']}" for p in result["problems"])
            raise OpError(
                ErrorCode.INVALID_ARGUMENT,
                f"config {result['file']} is invalid, old config kept: {problems}",
                details={"file": result["file"], "problems": result["problems"]},
            )
        return result

    def status_line(self) -> str:
        handles: list[ActorHandle] = list(self.supervisor.actors.values())
        running = sum(1 for h in handles if h.state == "running")
        text = f"{running}/{len(handles)} actors running"
        if self._pipeline is not None:
            text += "; " + self._pipeline.status_line()
        return text


# Stopped only after every other actor has drained: the embedded APNs simulator must
# still answer the notifications the nodes have in flight.
STOP_LAST = ("apns-simulator",)


async def drain(supervisor: Supervisor, grace_period: float) -> list[str]:
    """Ask every actor to stop and give them ``grace_period`` seconds to finish their
    in-flight work (those in :data:`STOP_LAST` once the others are done). Returns the
    names of those still running (the caller cancels them)."""
    first = [h for h in supervisor.actors.values() if h.name not in STOP_LAST]
    last = [h for h in supervisor.actors.values() if h.name in STOP_LAST]
    with trio.move_on_after(grace_period):
        for handle in first:
            handle.request_stop()
        for handle in first:
            await handle.done.wait()
        for handle in last:
            handle.request_stop()
        for handle in last:
            await handle.done.wait()
    left = [h.name for h in supervisor.actors.values() if not h.done.is_set()]
    if left:
        log.warning("shutdown_timeout reached; cancelling", actors=left, grace_period=grace_period)
    else:
        log.info("drained")
    return left


async def watchdog_loop(
    supervisor: Supervisor,
    notifier: Notifier,
    heartbeat_timeout: float | Callable[[], float],
    status: Callable[[], str] = lambda: "running",
) -> None:
    """Send WATCHDOG=1 (and STATUS=) only while every running actor's heartbeat is
    fresh: a wedged actor stops the pings, so systemd restarts the process.
    ``heartbeat_timeout`` may be a function (re-read every round: reload changes it)."""
    period = notifier.watchdog_interval()
    was_stale: list[str] = []
    while True:
        timeout = heartbeat_timeout() if callable(heartbeat_timeout) else heartbeat_timeout
        interval = min(period or 5.0, 5.0, timeout / 2)
        stale = supervisor.stale(timeout)
        if stale:
            if stale != was_stale:
                log.error("actors wedged; withholding watchdog pings", actors=stale)
                notifier.status(f"wedged: {', '.join(stale)}")
        else:
            notifier.watchdog()
            notifier.status(status())
        was_stale = stale
        await trio.sleep(interval)


class AlreadyRunning(Exception):
    """Another pushd uses the same state directory."""


def acquire_instance_lock(path: Path) -> IO[str]:
    """An exclusive lock on ``path`` for the daemon's lifetime: two daemons must never
    share one store. The lock dies with the process (SIGKILL included)."""
    handle = path.open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        pid = handle.read().strip() or "?"
        handle.close()
        raise AlreadyRunning(
            f"another pushd (pid {pid}) is running with state directory {path.parent}; "
            "stop it first or give this one another daemon.state_dir"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pushd")
    except PackageNotFoundError:
        return "0+unknown"
