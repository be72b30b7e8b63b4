"""The one SQLite database behind pushd, with a plain trio API.

aiosqlite is asyncio-only: it is opened and closed here under trio through trio-asyncio,
and nowhere else; every call in between is a function run on the raw
``sqlite3.Connection`` in aiosqlite's single worker thread, whose result comes straight
back to the calling trio task (:meth:`Store._call`), so:

* a transaction (:meth:`Store.transaction`) runs as one unit in that thread —
  ``BEGIN IMMEDIATE``, the caller's statements, then ``COMMIT`` or ``ROLLBACK`` —
  and statements from other tasks sharing the connection queue up behind it and
  can never interleave with it;
* a write, once handed to the thread, always finishes (commit or rollback) even if
  the awaiting task is cancelled; the awaiting side is shielded for a bounded time
  (``write_timeout``, the wait for its turn included) so a cancelled caller still
  learns the outcome in the common case, and raises :class:`StorageTimeout` when the
  bound runs out (``handed_over`` says whether the write may still complete, all or
  nothing, or was never started);
* non-urgent work waits in a line before it is handed over (see :class:`Store`).

The asyncio loop: :func:`open_store` reuses the trio-asyncio loop of the calling
task if there is one (the daemon opens ``trio_asyncio.open_loop()`` once around
everything) and otherwise opens its own for the lifetime of the store (tests,
scripts). The store remembers its loop, so any trio task may use it, including
tasks started outside the loop's context.

The schema is versioned with ``PRAGMA user_version``: :data:`MIGRATIONS` is applied
in order, one transaction per step; a database newer than the code is refused
(:class:`SchemaTooNew`).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import aiosqlite
import outcome
import structlog
import trio
import trio_asyncio

log = structlog.get_logger("actors.storage")

T = TypeVar("T")
Params = Sequence[Any] | Mapping[str, Any]

DEFAULT_WRITE_TIMEOUT = 30.0
CHECKPOINT_INTERVAL = 1.0  # seconds between background WAL checkpoints
WAL_SIZE_LIMIT = 64 << 20  # bytes the WAL file is truncated to after a checkpoint
# WAL frames (pages) at a background checkpoint from which, if writes went on meanwhile,
# the store finishes it between two operations (Store.finish_checkpoint): a busy store.
FINISH_FRAMES = 1000
Line = Literal["urgent", "send", "bulk"]


class StorageError(Exception):
    """Base class for storage errors."""


class SchemaTooNew(StorageError):
    def __init__(self, path: Path, db_version: int, code_version: int) -> None:
        self.path = path
        self.db_version = db_version
        self.code_version = code_version
        super().__init__(
            f"{path}: database schema version {db_version} is newer than this pushd "
            f"understands ({code_version}); upgrade pushd or use another database file"
        )


class StorageTimeout(StorageError):
    """A write did not finish within the bound. ``handed_over``: it reached the database
    thread and still commits or rolls back whole (its outcome is unknown); otherwise it
    was never started and nothing was written."""

    def __init__(self, message: str, *, handed_over: bool = True) -> None:
        super().__init__(message)
        self.handed_over = handed_over


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "registry: devices, users, retired tokens",
        (
            """CREATE TABLE users (
                user_id TEXT PRIMARY KEY,
                contact_ids TEXT NOT NULL,
                attributes TEXT NOT NULL,
                consent_events INTEGER NOT NULL,
                consent_event_kinds TEXT NOT NULL,
                updated_at_ms INTEGER NOT NULL
            )""",
            """CREATE TABLE devices (
                device_id TEXT PRIMARY KEY,
                token TEXT NOT NULL,
                environment TEXT NOT NULL,
                topic TEXT NOT NULL,
                model TEXT NOT NULL,
                os_version TEXT NOT NULL,
                app_version TEXT NOT NULL,
                locale TEXT NOT NULL,
                time_zone TEXT NOT NULL,
                user_id TEXT NOT NULL,
                previous_user_id TEXT,
                user_changed_at_ms INTEGER,
                alert INTEGER NOT NULL,
                background INTEGER NOT NULL,
                categories_allowed TEXT NOT NULL,
                categories_refused TEXT NOT NULL,
                previous_token TEXT,
                token_updated_at_ms INTEGER NOT NULL,
                retired_at_ms INTEGER,
                registered_at_ms INTEGER NOT NULL,
                updated_at_ms INTEGER NOT NULL
            )""",
            "CREATE UNIQUE INDEX devices_token ON devices(token)",
            "CREATE INDEX devices_user ON devices(user_id, device_id)",
            """CREATE TABLE retired_tokens (
                token TEXT PRIMARY KEY,
                retired_at_ms INTEGER NOT NULL
            )""",
        ),
    ),
    Migration(
        2,
        "queue: messages and per-device items",
        (
            """CREATE TABLE messages (
                message_id TEXT PRIMARY KEY,
                payload BLOB NOT NULL,
                priority INTEGER NOT NULL,
                push_type TEXT NOT NULL,
                created_at REAL NOT NULL,
                expiration REAL,
                collapse_id TEXT,
                target BLOB NOT NULL,
                meta BLOB NOT NULL,
                audience INTEGER NOT NULL,
                state TEXT NOT NULL,
                enqueued INTEGER NOT NULL DEFAULT 0,
                finished_at REAL
            )""",
            """CREATE INDEX messages_expiry ON messages(expiration)
               WHERE state = 'active' AND expiration IS NOT NULL""",
            """CREATE TABLE items (
                item_id INTEGER PRIMARY KEY,
                message_id TEXT NOT NULL REFERENCES messages(message_id),
                device_id TEXT NOT NULL,
                shard INTEGER NOT NULL,
                idcode BLOB NOT NULL,
                priority INTEGER NOT NULL,
                rank REAL NOT NULL,
                enqueued_at REAL NOT NULL,
                not_before REAL NOT NULL,
                attempts INTEGER NOT NULL DEFAULT 0,
                state TEXT NOT NULL,
                lease_owner TEXT,
                lease_until REAL,
                outcome TEXT,
                reason TEXT,
                apns_id TEXT,
                updated_at REAL NOT NULL
            )""",
            "CREATE UNIQUE INDEX items_message_device ON items(message_id, device_id)",
            "CREATE INDEX items_message_state ON items(message_id, state, outcome, reason)",
            "CREATE INDEX items_ready ON items(shard, rank) WHERE state = 'queued'",
            "CREATE INDEX items_due ON items(shard, not_before) WHERE state = 'queued'",
            "CREATE INDEX items_leases ON items(lease_until) WHERE state = 'leased'",
        ),
    ),
    Migration(
        3,
        "central: fan-out progress (a message not fanned out completely is resumed)",
        (
            "ALTER TABLE messages ADD COLUMN fanout_done INTEGER NOT NULL DEFAULT 0",
            "CREATE INDEX messages_fanout ON messages(created_at) WHERE fanout_done = 0",
        ),
    ),
    Migration(
        4,
        "queue: items waiting for their not_before kept out of the ready index",
        (
            # Without this, every lease walks past all retried-later items (an APNs outage
            # can defer the whole backlog): 200k deferred made one lease take ~70 ms.
            "ALTER TABLE items ADD COLUMN deferred INTEGER NOT NULL DEFAULT 0",
            """UPDATE items SET deferred = 1
               WHERE state = 'queued' AND not_before > CAST(strftime('%s', 'now') AS REAL)""",
            "DROP INDEX items_ready",
            "DROP INDEX items_due",
            "CREATE INDEX items_ready ON items(shard, rank) WHERE state = 'queued' AND deferred = 0",
            """CREATE INDEX items_deferred ON items(shard, not_before)
               WHERE state = 'queued' AND deferred = 1""",
        ),
    ),
    Migration(
        5,
        "analyzer: app events (within consent) and pending follow-ups",
        (
            """CREATE TABLE events (
                event_id INTEGER PRIMARY KEY,
                user_id TEXT NOT NULL,
                device_id TEXT,
                name TEXT NOT NULL,
                attributes BLOB NOT NULL,
                at REAL NOT NULL
            )""",
            "CREATE INDEX events_user ON events(user_id, name, at)",
            """CREATE TABLE followups (
                root_id TEXT NOT NULL,
                device_id TEXT NOT NULL,
                user_id TEXT NOT NULL,
                state TEXT NOT NULL,
                delivered_at REAL NOT NULL,
                last_delivered_at REAL NOT NULL,
                due_at REAL,
                repushes INTEGER NOT NULL DEFAULT 0,
                handled_at REAL,
                reason TEXT,
                updated_at REAL NOT NULL,
                PRIMARY KEY (root_id, device_id)
            )""",
            "CREATE INDEX followups_due ON followups(due_at) WHERE state = 'pending'",
            "CREATE INDEX followups_user ON followups(user_id) WHERE state IN ('pending', 'waiting')",
            "CREATE INDEX followups_device ON followups(device_id) WHERE state IN ('pending', 'waiting')",
        ),
    ),
    Migration(
        6,
        "analyzer: the class a follow-up's device was sent the message for (re-checked on resend)",
        (
            "ALTER TABLE followups ADD COLUMN class_id TEXT",
            "CREATE INDEX followups_waiting ON followups(updated_at) WHERE state = 'waiting'",
        ),
    ),
    Migration(
        7,
        "queue: the urgent items (priority 10) in lease order, for the nodes' express lanes",
        (
            """CREATE INDEX items_urgent ON items(shard, rank)
               WHERE state = 'queued' AND deferred = 0 AND priority >= 10""",
        ),
    ),
    Migration(
        8,
        "analyzer: how many of a follow-up's re-pushes were delivered (kept past retention)",
        (
            "ALTER TABLE followups ADD COLUMN repushes_sent INTEGER NOT NULL DEFAULT 0",
            # from the re-push items still stored (those retention purged are not counted)
            """UPDATE followups SET repushes_sent = (
                   SELECT count(*) FROM items i
                   WHERE i.device_id = followups.device_id AND i.state = 'sent'
                     AND i.message_id > followups.root_id || '.r'
                     AND i.message_id < followups.root_id || '.s')
               WHERE repushes > 0""",
        ),
    ),
)


def _atomically(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    """Run ``fn`` inside BEGIN IMMEDIATE ... COMMIT, rolling back on any error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = fn(conn)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return result


def _snapshot(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    conn.execute("BEGIN DEFERRED")
    try:
        return fn(conn)
    finally:
        conn.execute("ROLLBACK")


class _Reply:
    """Stands in for the asyncio future that aiosqlite's worker thread completes: the
    thread calls ``future.get_loop().call_soon_threadsafe(set_result, future, value)``
    (or ``set_exception``), and aiosqlite's ``set_result`` checks ``done()`` first. Here
    that wakes the waiting trio task directly."""

    __slots__ = ("_task", "_token", "abandoned", "finished")

    def __init__(self, token: trio.lowlevel.TrioToken, task: trio.lowlevel.Task) -> None:
        self._token = token
        self._task = task
        self.abandoned = False  # the waiting task was cancelled (a read): drop the result
        self.finished = False

    def get_loop(self) -> _Reply:
        return self

    def call_soon_threadsafe(self, callback: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(trio.RunFinishedError):  # nobody is waiting any more
            self._token.run_sync_soon(callback, *args)

    def done(self) -> bool:
        return self.finished or self.abandoned

    def set_result(self, value: Any) -> None:
        self.finished = True
        trio.lowlevel.reschedule(self._task, outcome.Value(value))

    def set_exception(self, exc: BaseException) -> None:
        self.finished = True
        trio.lowlevel.reschedule(self._task, outcome.Error(exc))


class Store:
    """One shared connection; see the module docstring for the guarantees."""

    def __init__(
        self,
        db: aiosqlite.Connection,
        loop: trio_asyncio.TrioEventLoop,
        path: Path,
        *,
        write_timeout: float,
    ) -> None:
        self._db = db
        self._loop = loop
        self._token = trio.lowlevel.current_trio_token()
        self.path = path
        self.write_timeout = write_timeout
        self.schema_version = 0
        self.checkpoints = 0  # background WAL checkpoints done (see _checkpointer)
        self.finished_checkpoints = 0  # of which the store finished (finish_checkpoint)
        self.wrote = trio.Event()  # set by every write: the WAL has something to checkpoint
        # The database thread runs one operation at a time, first come first served. So
        # that urgent work (accepting a push, the express lanes) never waits behind a
        # long queue, other work is handed over one operation at a time per line: one
        # node round ("send") and one of everything else ("bulk": fan-out pages, sweeps,
        # control-socket reads); "urgent" work skips the lines and so waits for at most
        # those two (and other urgent work). Two lines, so that a fan-out is not starved
        # by many node lanes.
        self._lines = {"send": trio.Lock(), "bulk": trio.Lock()}
        # Awaited by non-urgent work before it joins its line: the owner's way to hold it
        # back while urgent work is on its way (the pipeline: actors.urgency).
        self.pace: Callable[[], Awaitable[None]] | None = None
        # Operations handed to the database thread whose callers still wait for them (a
        # virtual clock in tests must not move while there are any).
        self.in_flight = 0

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` in the connection's thread; cancellable (for reads: the
        function still runs, its result is dropped).

        The function goes on aiosqlite's own work queue (what ``Connection._execute``
        does: the only way to run several statements as one unit in its thread), but
        its result comes back to this task directly, through trio's thread-safe entry
        point, instead of through an asyncio future and the trio-asyncio loop: under
        load that path cost three trio scheduling rounds per database trip."""
        if not self._db._running:
            raise ValueError("the store is closed")
        reply = _Reply(self._token, trio.lowlevel.current_task())
        conn = self._db._conn
        self._db._tx.put_nowait((reply, lambda: fn(conn)))  # type: ignore[arg-type]  # see _Reply

        def abort(_: Any) -> trio.lowlevel.Abort:
            reply.abandoned = True
            return trio.lowlevel.Abort.SUCCEEDED

        self.in_flight += 1
        try:
            result: T = await trio.lowlevel.wait_task_rescheduled(abort)
        finally:
            self.in_flight -= 1
        return result

    async def _admitted(self, fn: Callable[[sqlite3.Connection], T], line: Line) -> T:
        async with self._turn(line):
            return await self._call(fn)

    @contextlib.asynccontextmanager
    async def _turn(self, line: Line) -> AsyncIterator[None]:
        """Wait for ``line``'s turn (urgent work has no line and never waits to join)."""
        if line == "urgent":
            yield
            return
        if self.pace is not None:
            await self.pace()
        async with self._lines[line]:
            yield

    async def _write(self, fn: Callable[[sqlite3.Connection], T], line: Line) -> T:
        """Run a write in the thread, shielded from cancellation for a bounded time (the
        wait for its turn in its line included)."""
        handed_over = False
        with trio.move_on_after(self.write_timeout, shield=True) as scope:
            async with self._turn(line):
                handed_over = True
                result = await self._call(fn)
            self.wrote.set()
            return result
        assert scope.cancelled_caught
        if not handed_over:
            raise StorageTimeout(
                f"write to {self.path} waited {self.write_timeout}s behind other database "
                "work and was not started: nothing was written",
                handed_over=False,
            )
        raise StorageTimeout(
            f"write to {self.path} did not finish in {self.write_timeout}s; "
            "it will still commit or roll back as a whole"
        )

    async def read(self, fn: Callable[[sqlite3.Connection], T], *, line: Line = "bulk") -> T:
        """Run a read-only function of the raw connection on one consistent snapshot
        (a deferred read transaction: other processes' commits land before or after).
        ``line``: see ``__init__``."""
        return await self._admitted(lambda conn: _snapshot(conn, fn), line)

    async def transaction(self, fn: Callable[[sqlite3.Connection], T], *, line: Line = "bulk") -> T:
        """Run ``fn(conn)`` atomically (BEGIN IMMEDIATE / COMMIT, ROLLBACK on error).

        ``fn`` is synchronous and runs in the database thread: it must not block on
        anything but SQLite. Shielded from cancellation up to ``write_timeout``.
        ``line``: see ``__init__``.
        """
        return await self._write(lambda conn: _atomically(conn, fn), line)

    async def finish_checkpoint(self) -> None:
        """Copy back what the background checkpoint left over (the frames written while
        it ran), here between two operations, so that the next write starts the WAL over
        from its beginning. Without this, writes that never pause (a broadcast) never
        find the WAL wholly copied: it grew with the whole burst (331 MB for 100,000
        devices), and the first commit after the burst paid ~300 ms to truncate it.

        The price: this copy (only the left-over frames) and its syncs run in the store's
        thread, so an urgent operation arriving meanwhile waits for them; the background
        checkpointer asks for it only on a busy store (:data:`FINISH_FRAMES`)."""
        await self._admitted(_passive_checkpoint, "bulk")
        self.finished_checkpoints += 1

    async def fetchall(self, sql: str, params: Params = ()) -> list[sqlite3.Row]:
        return await self._admitted(lambda conn: conn.execute(sql, params).fetchall(), "bulk")

    async def fetchone(
        self, sql: str, params: Params = (), *, line: Line = "bulk"
    ) -> sqlite3.Row | None:
        row: sqlite3.Row | None = await self._admitted(
            lambda conn: conn.execute(sql, params).fetchone(), line
        )
        return row

    async def execute(self, sql: str, params: Params = ()) -> int:
        """Run one writing statement in its own transaction; returns the rowcount."""
        return await self.transaction(lambda conn: conn.execute(sql, params).rowcount)

    async def executemany(self, sql: str, rows: Sequence[Params]) -> None:
        """Run one statement over many rows in a single transaction."""
        await self.transaction(lambda conn: conn.executemany(sql, rows))

    async def iterate(
        self,
        sql: str,
        params: Mapping[str, Any],
        *,
        key: str,
        start: Any,
        batch: int = 1000,
    ) -> AsyncIterator[list[sqlite3.Row]]:
        """Stream a query in keyset-paginated batches of at most ``batch`` rows.

        ``sql`` must filter on ``<key> > :after``, end with ``ORDER BY <key> LIMIT :limit``
        and select the ``key`` column; ``start`` is a value below every key. Memory
        stays bounded by one batch however many rows match.
        """
        if batch < 1:
            raise ValueError("batch must be >= 1")
        after = start
        while True:
            rows = await self.fetchall(sql, {**params, "after": after, "limit": batch})
            if rows:
                yield rows
            if len(rows) < batch:
                return
            after = rows[-1][key]


def _migrate(conn: sqlite3.Connection, path: Path, migrations: Sequence[Migration]) -> int:
    """Apply pending migrations, each in its own transaction; returns the new version."""
    for expected, migration in enumerate(migrations, start=1):
        if migration.version != expected:
            raise ValueError(f"migration versions must be 1, 2, 3...; got {migration.version}")
    code_version = len(migrations)
    (db_version,) = conn.execute("PRAGMA user_version").fetchone()
    if db_version > code_version:
        raise SchemaTooNew(path, db_version, code_version)
    for migration in migrations[db_version:]:

        def step(conn: sqlite3.Connection, migration: Migration = migration) -> None:
            # Re-read inside the write lock: another process may have migrated meanwhile.
            (current,) = conn.execute("PRAGMA user_version").fetchone()
            if current >= migration.version:
                return
            for statement in migration.statements:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {migration.version:d}")

        _atomically(conn, step)
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    if version > code_version:
        raise SchemaTooNew(path, version, code_version)
    return int(version)


def _configure(conn: sqlite3.Connection, synchronous: str) -> None:
    conn.row_factory = sqlite3.Row
    (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
    if mode.lower() != "wal" and mode.lower() != "memory":
        raise StorageError(f"could not switch the database to WAL mode (got {mode!r})")
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA busy_timeout = 5000")
    # No automatic checkpoints: they ran inside whichever commit happened to fill the WAL
    # (an accept, say: 15-19 ms instead of ~1). _checkpointer runs them beside the writes
    # (and, on a busy store, has the store finish them between two operations).
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT:d}")


def _passive_checkpoint(conn: sqlite3.Connection) -> int:
    """Copy the WAL's frames back as far as no reader needs them; the WAL's frame count."""
    _busy, frames, _copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    return int(frames)


async def _checkpointer(
    path: Path, store: Store, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Copy the WAL into the database every :data:`CHECKPOINT_INTERVAL` seconds after
    writes, from a connection and a thread of its own (PASSIVE: never waits for, nor
    blocks, the store's readers and writers; SQLite does the work without Python's lock).
    When writes went on meanwhile and the WAL held :data:`FINISH_FRAMES` or more, the
    store copies the rest between two of its operations (:meth:`Store.finish_checkpoint`),
    so that the WAL can start over."""

    def connect() -> sqlite3.Connection:
        return sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)

    conn = await trio.to_thread.run_sync(connect)
    try:
        task_status.started()
        while True:
            # Only after writes (an idle store, or virtual time in tests, costs nothing).
            await store.wrote.wait()
            await trio.sleep(CHECKPOINT_INTERVAL)
            store.wrote = trio.Event()
            try:
                frames = await trio.to_thread.run_sync(_passive_checkpoint, conn)
                store.checkpoints += 1
                # Written meanwhile: those frames are left over, and the WAL cannot start
                # over until they are copied too.
                if store.wrote.is_set() and frames >= FINISH_FRAMES:
                    await store.finish_checkpoint()
            except sqlite3.Error as exc:  # the next round tries again; the WAL just grows
                log.warning("WAL checkpoint failed", path=str(path), error=str(exc))
    finally:
        conn.close()


@asynccontextmanager
async def _asyncio_loop() -> AsyncIterator[trio_asyncio.TrioEventLoop]:
    """The caller's trio-asyncio loop if there is one, otherwise a loop of our own."""
    loop = trio_asyncio.current_loop.get()
    if loop is not None:
        yield loop
        return
    try:
        async with trio_asyncio.open_loop() as own:
            yield own
    except BaseExceptionGroup as group:
        # open_loop's two nurseries wrap whatever crosses them; hand callers their own
        # error rather than a group of a group of one.
        error: BaseException = group
        while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
            error = error.exceptions[0]
        if error is group:
            raise
        raise error from None


@asynccontextmanager
async def open_store(
    path: Path,
    *,
    migrations: Sequence[Migration] = MIGRATIONS,
    write_timeout: float = DEFAULT_WRITE_TIMEOUT,
    synchronous: str = "NORMAL",
) -> AsyncIterator[Store]:
    """Open (creating if needed) and migrate the database at ``path``.

    ``synchronous``: ``NORMAL`` (WAL default: survives a process crash, a power
    loss may drop the last commits) or ``FULL`` (also survives power loss).
    """
    if synchronous not in ("NORMAL", "FULL"):
        raise ValueError("synchronous must be NORMAL or FULL")
    path = Path(path)
    async with _asyncio_loop() as loop:
        db = await trio_asyncio.aio_as_trio(aiosqlite.connect, loop=loop)(
            str(path), isolation_level=None
        )
        store = Store(db, loop, path, write_timeout=write_timeout)
        try:
            # Not bounded by write_timeout: a migration of a big database may take long,
            # and it runs to its end (commit or rollback) in the thread whatever we do.
            with trio.CancelScope(shield=True):
                await store._call(lambda conn: _configure(conn, synchronous))
                store.schema_version = await store._call(
                    lambda conn: _migrate(conn, path, migrations)
                )
            async with trio.open_nursery() as nursery:
                if str(path) != ":memory:":
                    await nursery.start(_checkpointer, path, store)
                try:
                    yield store
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            with trio.move_on_after(write_timeout, shield=True):
                await trio_asyncio.aio_as_trio(db.close, loop=loop)()
