"""Storage and queue throughput on a real SQLite file (WAL).

    .venv/bin/python benchmarks/bench_storage.py [--rows 1000000] [--batch 1000] [--dir /tmp]

Prints rows/s for: a bare executemany baseline (the design's 143k rows/s figure),
batched enqueue through QueueStore, leasing, acking; the latency of one lease with the
whole backlog queued; and the query plan of the lease statement.
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

import trio

from actors.queuestore import ItemResult, ItemRow, MessageRow, QueueStore
from actors.storage import open_store

T0 = 1_700_000_000.0


def report(label: str, rows: int, seconds: float) -> None:
    print(f"{label:<44} {rows:>10,} rows {seconds:8.2f} s {rows / seconds:>12,.0f} rows/s")


async def bench(path: Path, rows: int, batch: int) -> None:
    async with open_store(path) as store:
        # Baseline: executemany of `batch` plain rows per transaction, through the bridge.
        await store.execute("CREATE TABLE bench (k INTEGER PRIMARY KEY, v BLOB NOT NULL)")
        data = [(i, b"x" * 40) for i in range(rows)]
        start = time.perf_counter()
        for lo in range(0, rows, batch):
            await store.executemany("INSERT INTO bench VALUES (?, ?)", data[lo : lo + batch])
        report(f"baseline executemany ({batch}/txn)", rows, time.perf_counter() - start)
        await store.execute("DROP TABLE bench")

        queue = QueueStore(store)
        await queue.create_message(
            MessageRow("broadcast", {"aps": {"alert": "hi"}}, 5, "alert", T0, audience=rows)
        )
        items = [ItemRow(f"device-{i:09d}", i % 4, b"c" * 48) for i in range(rows)]
        start = time.perf_counter()
        for lo in range(0, rows, batch):
            await queue.enqueue("broadcast", items[lo : lo + batch], now=T0)
        report(f"enqueue ({batch}/txn, 4 shards, 5 indexes)", rows, time.perf_counter() - start)
        del items, data

        # One lease with the whole backlog queued, and a targeted push arriving later.
        await queue.create_message(
            MessageRow("single", {"aps": {"alert": "you"}}, 10, "alert", T0 + 60, audience=1)
        )
        await queue.enqueue("single", [ItemRow("device-vip", 0, b"c" * 48)], now=T0 + 60)
        latencies = []
        first = None
        for n in range(20):
            start = time.perf_counter()
            leased = await queue.lease(
                shard=0, owner="bench", limit=1, now=T0 + 61 + n, lease_seconds=60
            )
            latencies.append(time.perf_counter() - start)
            first = first or leased[0].message_id
        print(
            f"lease(limit=1) with {rows:,} queued: median {statistics.median(latencies) * 1e3:.2f} ms,"
            f" first item from {first!r}"
        )

        leased_total = 0
        acked_total = 0
        lease_time = ack_time = 0.0
        for shard in range(4):
            while True:
                start = time.perf_counter()
                leased = await queue.lease(
                    shard=shard, owner="bench", limit=batch, now=T0 + 100, lease_seconds=60
                )
                lease_time += time.perf_counter() - start
                if not leased:
                    break
                leased_total += len(leased)
                start = time.perf_counter()
                acked_total += await queue.ack(
                    [ItemResult(i.item_id, "sent", "success", None, None) for i in leased],
                    now=T0 + 101,
                )
                ack_time += time.perf_counter() - start
        report(f"lease ({batch}/call)", leased_total, lease_time)
        report(f"ack ({batch}/txn)", acked_total, ack_time)

        start = time.perf_counter()
        counts = await queue.counts()
        print(
            f"counts() over {rows:,} items: {(time.perf_counter() - start) * 1e3:.0f} ms {counts}"
        )
        start = time.perf_counter()
        await queue.message_state("broadcast", page=10, page_size=100)
        print(f"message_state(broadcast): {(time.perf_counter() - start) * 1e3:.0f} ms")


async def bench_deferred(path: Path, rows: int, batch: int) -> None:
    """An APNs outage: the whole backlog retried for later; a new push must still go."""
    async with open_store(path) as store:
        queue = QueueStore(store)
        await queue.create_message(MessageRow("backlog", {}, 10, "alert", T0, audience=rows))
        items = [ItemRow(f"device-{i:09d}", 0, b"c" * 48) for i in range(rows)]
        for lo in range(0, rows, batch):
            await queue.enqueue("backlog", items[lo : lo + batch], now=T0)
        start = time.perf_counter()
        while leased := await queue.lease(
            shard=0, owner="bench", limit=batch, now=T0 + 1, lease_seconds=60
        ):
            await queue.retry(
                [i.item_id for i in leased], not_before=T0 + 3600, reason="Outage", now=T0 + 1
            )
        report(f"lease + retry ({batch}/call)", rows, time.perf_counter() - start)
        await queue.create_message(MessageRow("fresh", {}, 5, "alert", T0 + 2, audience=1))
        await queue.enqueue("fresh", [ItemRow("device-new", 0, b"c" * 48)], now=T0 + 2)
        latencies = []
        for n in range(20):
            start = time.perf_counter()
            leased = await queue.lease(
                shard=0, owner="bench", limit=100, now=T0 + 3 + n, lease_seconds=60
            )
            latencies.append(time.perf_counter() - start)
            assert n > 0 or [i.device_id for i in leased] == ["device-new"]
        print(
            f"lease(limit=100) behind {rows:,} deferred items: "
            f"median {statistics.median(latencies) * 1e3:.2f} ms"
        )


def describe(path: Path) -> None:
    conn = sqlite3.connect(path)
    plan = conn.execute(
        """EXPLAIN QUERY PLAN SELECT item_id FROM items
           WHERE shard = 0 AND state = 'queued' AND deferred = 0 ORDER BY rank LIMIT 10"""
    ).fetchall()
    conn.close()
    print("lease plan (planner, unhinted):", "; ".join(row[-1] for row in plan))
    print(f"database size: {path.stat().st_size / 1e6:.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "bench.sqlite"
        trio.run(bench, path, args.rows, args.batch)
        describe(path)
        trio.run(bench_deferred, Path(tmp) / "deferred.sqlite", max(args.rows // 5, 1), args.batch)


if __name__ == "__main__":
    main()
