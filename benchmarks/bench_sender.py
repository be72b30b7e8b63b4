"""pushd's Sender against aioapns 4.0, side by side, against one simulator process.

    .venv/bin/python benchmarks/bench_sender.py [-n 20000] [--in-flight 100] [--rounds 3]

The simulator (``python -m apns.simulator``, token auth on, recording off) runs in its own
process, pinned to one core with ``taskset`` when there are two or more; this process pins
itself to another.  Each round sends N notifications at ``--in-flight`` concurrently, first
through ``apns.sender.Sender`` (``--workers`` tasks each calling ``send_many`` with
in-flight/workers items, so about ``--in-flight`` requests stay open), then through aioapns
(``--in-flight`` coroutines each awaiting ``send_notification`` in turn).  Prints both rates
per round, the medians and their ratio, and one JSON line (also appended to ``--json``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, NamedTuple

import trio

from apns.auth import TokenAuth, make_ssl_context
from apns.payload import Aps, Notification
from apns.sender import SenderConfig, open_sender
from apns.simulator import generate_signing_key

KEY_ID, TEAM_ID, TOPIC = "BENCHKEY01", "BENCHTEAM1", "com.example.bench"
TOKEN = "a1" * 32
MESSAGE: dict[str, Any] = {"aps": {"alert": {"title": "Hello", "body": "A benchmark push"}}}


class Rate(NamedTuple):
    per_second: float  # notifications per second, wall clock
    cpu_us: float  # client CPU microseconds per notification


def start_simulator(
    workdir: Path, public_pem: Path, core: int | None
) -> tuple[subprocess.Popen[str], int, Path]:
    cmd = [
        sys.executable,
        "-m",
        "apns.simulator",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--tls-dir",
        str(workdir / "tls"),
        "--key",
        f"{KEY_ID}:{TEAM_ID}:{public_pem}",
        "--streams",
        "1000",
    ]
    if core is not None and shutil.which("taskset"):
        cmd = ["taskset", "-c", str(core), *cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("listening on"):
        proc.kill()
        raise SystemExit(f"simulator did not start: {line!r}")
    port = int(line.rsplit(":", 1)[1])
    return proc, port, workdir / "tls" / "ca.pem"


async def run_sender(
    port: int,
    ca_file: Path,
    private_pem: bytes,
    n: int,
    in_flight: int,
    workers: int,
    connections: int,
) -> Rate:
    config = SenderConfig(
        host="127.0.0.1",
        port=port,
        ssl_context=make_ssl_context(ca_file=ca_file),
        auth=TokenAuth(key_pem=private_pem, key_id=KEY_ID, team_id=TEAM_ID),
        connections=connections,
    )
    chunk = max(1, in_flight // workers)
    items = [
        (
            TOKEN,
            Notification(
                aps=Aps.from_dict(MESSAGE["aps"]), topic=TOPIC, apns_id=str(uuid.uuid4())
            ).encode(),
        )
        for _ in range(n)
    ]
    async with open_sender(config) as sender:
        await sender.send_many(items[:chunk])  # connect, pass the token gate
        failures = 0

        async def worker(start: int) -> None:
            nonlocal failures
            for i in range(start, n, chunk * workers):
                outcomes = await sender.send_many(items[i : i + chunk])
                failures += sum(o.status != 200 for o in outcomes)

        began, cpu = time.perf_counter(), time.process_time()
        async with trio.open_nursery() as nursery:
            for w in range(workers):
                nursery.start_soon(worker, w * chunk)
        elapsed, cpu = time.perf_counter() - began, time.process_time() - cpu
    if failures:
        raise SystemExit(f"sender: {failures} notifications not delivered")
    return Rate(n / elapsed, cpu / n * 1e6)


async def run_aioapns(port: int, ca_file: Path, private_pem: bytes, n: int, in_flight: int) -> Rate:
    from aioapns import APNs, NotificationRequest, PushType
    from aioapns.connection import APNsProductionClientProtocol

    # While a token connection is still limited to one stream, aioapns logs a warning per
    # request it has to park; printing those would slow it down for no fault of its HTTP/2.
    logging.getLogger("aioapns").setLevel(logging.ERROR)

    class LocalProtocol(APNsProductionClientProtocol):
        APNS_SERVER = "127.0.0.1"
        APNS_PORT = port

    context = ssl.create_default_context(cafile=str(ca_file))
    client = APNs(
        key=private_pem.decode(),
        key_id=KEY_ID,
        team_id=TEAM_ID,
        topic=TOPIC,
        ssl_context=context,
        max_connection_attempts=1,
    )
    client.pool.protocol_class = LocalProtocol

    def request() -> NotificationRequest:
        return NotificationRequest(
            device_token=TOKEN,
            message=MESSAGE,
            notification_id=str(uuid.uuid4()),
            push_type=PushType.ALERT,
        )

    requests = [request() for _ in range(n)]
    await client.send_notification(request())  # connect, pass the token gate
    failures = 0

    async def worker(start: int) -> None:
        nonlocal failures
        for i in range(start, n, in_flight):
            result = await client.send_notification(requests[i])
            failures += not result.is_successful

    began, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker(w) for w in range(in_flight)))
    elapsed, cpu = time.perf_counter() - began, time.process_time() - cpu
    client.pool.close()
    if failures:
        raise SystemExit(f"aioapns: {failures} notifications not delivered")
    return Rate(n / elapsed, cpu / n * 1e6)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", type=int, default=20_000, help="notifications per client per round")
    parser.add_argument("--in-flight", type=int, default=100)
    parser.add_argument("--workers", type=int, default=4, help="sender tasks calling send_many")
    parser.add_argument("--connections", type=int, default=1, help="sender connections")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="append the JSON line to this file")
    args = parser.parse_args()

    cores = sorted(os.sched_getaffinity(0))
    sim_core = cores[1] if len(cores) > 1 else None
    if sim_core is not None:
        os.sched_setaffinity(0, {cores[0]})

    with tempfile.TemporaryDirectory(prefix="bench-sender-") as tmp:
        workdir = Path(tmp)
        sim_key, private_pem = generate_signing_key(KEY_ID, TEAM_ID)
        public_pem = workdir / "key.pub.pem"
        public_pem.write_bytes(sim_key.public_key_pem)
        proc, port, ca_file = start_simulator(workdir, public_pem, sim_core)
        try:
            sender: list[Rate] = []
            aioapns: list[Rate] = []
            for r in range(args.rounds):
                sender.append(
                    trio.run(
                        run_sender,
                        port,
                        ca_file,
                        private_pem,
                        args.n,
                        args.in_flight,
                        args.workers,
                        args.connections,
                    )
                )
                aioapns.append(
                    asyncio.run(run_aioapns(port, ca_file, private_pem, args.n, args.in_flight))
                )
                print(
                    f"round {r + 1}: sender {sender[-1].per_second:,.0f}/s "
                    f"({sender[-1].cpu_us:.0f} us CPU each)  "
                    f"aioapns {aioapns[-1].per_second:,.0f}/s ({aioapns[-1].cpu_us:.0f} us CPU each)",
                    flush=True,
                )
        finally:
            proc.terminate()
            proc.wait(timeout=10)

    sender_rate = statistics.median(r.per_second for r in sender)
    aioapns_rate = statistics.median(r.per_second for r in aioapns)
    ratio = sender_rate / aioapns_rate
    print(f"sender  {sender_rate:,.0f} notifications/s (median of {args.rounds})")
    print(f"aioapns {aioapns_rate:,.0f} notifications/s (median of {args.rounds})")
    print(f"ratio   {ratio:.2f}x")
    record = {
        "bench": "sender",
        "n": args.n,
        "in_flight": args.in_flight,
        "workers": args.workers,
        "connections": args.connections,
        "rounds": args.rounds,
        "simulator_core": sim_core,
        "load_average": os.getloadavg()[0],
        "sender_rate": round(sender_rate, 1),
        "aioapns_rate": round(aioapns_rate, 1),
        "ratio": round(ratio, 3),
        "sender_cpu_us": round(statistics.median(r.cpu_us for r in sender), 1),
        "aioapns_cpu_us": round(statistics.median(r.cpu_us for r in aioapns), 1),
        "sender_rates": [round(r.per_second, 1) for r in sender],
        "aioapns_rates": [round(r.per_second, 1) for r in aioapns],
    }
    line = json.dumps(record)
    print(line)
    if args.json is not None:
        with args.json.open("a", encoding="utf-8") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
