"""How much memory the analyzer needs for N pending follow-ups (default a million).

Builds a store with N pending follow-ups (rows only), starts the analyzer actor on it,
lets it run its timer loop, fires one due batch, and prints the process RSS before the
rows exist, after they are written, and while the analyzer runs — the analyzer's own
cost is the difference between the last two (the rows live in SQLite, not in memory).

    .venv/bin/python benchmarks/bench_analyzer.py [--followups 1000000]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import trio

from actors.analyzer import AnalyzerActor
from actors.base import ActorContext, Heartbeat
from actors.idcode import CodeKeys
from actors.live import Live, LiveRef
from actors.queuestore import MessageRow, QueueStore
from actors.registry import Registry
from actors.rules import Classifier
from actors.storage import open_store


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def main(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        async with open_store(Path(tmp) / "db.sqlite3") as store:
            queue = QueueStore(store)
            before = rss_mb()
            now = time.time()
            follow = {"handled": {"event": "order.paid", "match": {}}, "deadline": 3600.0,
                      "max_repushes": 1, "spacing": 3600.0, "strategy": "resend"}
            await queue.create_message(MessageRow(
                message_id="root", notification={"aps": {"alert": "x"}, "topic": "com.example.app"},
                priority=5, push_type="alert", created_at=now, audience=n, target={"all": True},
                expiration=now + 86400, meta={"follow_up": follow},
            ))
            t0 = time.perf_counter()
            batch = 50_000
            for start in range(0, n, batch):
                rows = [("root", f"d{i:08d}", f"u{i}", "pending", now, now, now + 3600 + i % 600, now)
                        for i in range(start, min(n, start + batch))]
                await store.executemany(
                    """INSERT INTO followups (root_id, device_id, user_id, state, delivered_at,
                       last_delivered_at, due_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)""", rows)
            write_s = time.perf_counter() - t0
            after_rows = rss_mb()
            live = LiveRef(Live(classifier=Classifier.from_config([]), codes=CodeKeys({"k": b"k" * 32}, "k")))
            send, recv = trio.open_memory_channel(100)
            ctx = ActorContext("analyzer", Heartbeat(0.5))
            actor = AnalyzerActor(ctx, inbox=recv, queue=queue, registry=Registry(store), live=live)
            async with trio.open_nursery() as nursery:
                await nursery.start(actor.run)
                t1 = time.perf_counter()
                due = await actor.next_due()
                next_due_ms = (time.perf_counter() - t1) * 1000
                await trio.sleep(3)
                t2 = time.perf_counter()
                fired = await actor.fire_due(now + 3600 + 1)  # one batch of due rows
                fire_ms = (time.perf_counter() - t2) * 1000
                running = rss_mb()
                ctx.stopping.set()
                del send
            size_mb = (await trio.Path(tmp, "db.sqlite3").stat()).st_size / 2**20
    print(f"pending follow-ups        {n:>12,}")
    print(f"rows written in           {write_s:>12.1f} s")
    print(f"database file             {size_mb:>12.1f} MB")
    print(f"RSS before rows           {before:>12.1f} MB")
    print(f"RSS after rows written    {after_rows:>12.1f} MB")
    print(f"RSS with analyzer running {running:>12.1f} MB  (analyzer's share: {running - after_rows:+.1f} MB)")
    print(f"earliest deadline query   {next_due_ms:>12.2f} ms  (due {due is not None})")
    print(f"one firing batch          {fire_ms:>12.1f} ms  ({fired} follow-ups examined)")
    print(f"load average              {os.getloadavg()[0]:>12.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--followups", type=int, default=1_000_000)
    trio.run(main, parser.parse_args().followups)
