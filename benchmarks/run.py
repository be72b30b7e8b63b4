"""pushd end to end: the bundled APNs simulator and pushd as separate processes, driven only
through the control socket (``pushd.client.Client``), with aioapns as the baseline.

    .venv/bin/python benchmarks/run.py --quick              # smoke run, a few thousand devices
    .venv/bin/python benchmarks/run.py                      # full sizes (100k / 1M devices)
    .venv/bin/python benchmarks/run.py --only throughput,latency --devices 50000

Processes: the simulator (``python -m apns.simulator``) is pinned to one core and pushd
(``python -m pushd.cli run --config FILE``) to another when ``taskset`` is there and the
machine has two cores; this driver pins itself to the simulator's core so that pushd's core
runs pushd alone; the aioapns baseline runs as its own process on pushd's core.  pushd
keeps everything durable (SQLite WAL, ``synchronous=NORMAL``: survives a process crash).

Scenarios (``--only``, comma-separated; default all):

  throughput  N devices, one push to all: notifications/s from accept to the last APNs
              answer (simulator record), against aioapns sending N to the same simulator
              at the same concurrency (nodes x batch in flight).
  latency     single-device pushes: their maximum rate (closed loop), then offered at a
              steady pace at half of it and at half the broadcast maximum (and a sweep
              and a low rate): submit -> APNs answer, p50/p95/p99, as the client sees
              it, and from pushd's own enqueue timestamp (the ``message`` op's
              ``created_at``) -> APNs answer.
  hol         single-device priority-10 pushes while an N-device priority-5 broadcast drains.
  recovery    SIGKILL while an N-device broadcast is queued (the simulator frozen with
              SIGSTOP during its fan-out, so all N are queued); restart; time to sending
              again, notifications lost and duplicated.
  memory      a second store: M devices (``--big-devices``), a push to 10% of them
              (100k queued at full size, the simulator answering slowly so they stay
              queued); peak RSS; then SIGTERM, restart, start-up time with that store.
  fanout      on that store, a push to everyone: devices resolved, classified, enqueued/s.
  ceiling     the simulator's own ceiling under h2load (if installed).

Every figure goes into a table and ``benchmarks/results/<timestamp>.json`` together with its
conditions (sizes, cores, load average before and after, the exact command).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import trio  # noqa: E402

from pushd.client import Client  # noqa: E402
from pushd.protocol import encode_frame, read_frame  # noqa: E402

KEY_ID, TEAM_ID, TOPIC = "BENCHKEY01", "BENCHTEAM1", "com.example.bench"
SCENARIOS = ("ceiling", "throughput", "latency", "hol", "recovery", "memory", "fanout")
NOTIFICATION: dict[str, Any] = {
    "aps": {"alert": {"title": "Hello", "body": "A benchmark push"}},
    "topic": TOPIC,
}

# --------------------------------------------------------------------------- helpers


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def token_for(i: int, salt: str = "") -> str:
    return hashlib.sha256(f"{salt}dev{i}".encode()).hexdigest()


def device(i: int, *, app_version: str = "2.1.0") -> dict[str, Any]:
    return {
        "device_id": f"d{i:07d}",
        "token": token_for(i),
        "environment": "production",
        "topic": TOPIC,
        "model": "iPhone15,2",
        "os_version": "17.1",
        "app_version": app_version,
        "locale": "en_US",
        "time_zone": "Europe/Berlin",
        "user_id": f"u{i}",
    }


def child(core: int | None) -> list[str]:
    """The command prefix of every process the driver starts: pinned to ``core`` (taskset),
    and sent SIGTERM when the driver dies (setpriv --pdeathsig), so that a driver killed or
    crashed mid-run leaves no pushd or simulator behind to disturb the next run. Each is
    used when installed (util-linux). Children are started from the main thread (the
    signal follows the thread that started them)."""
    prefix = ["setpriv", "--pdeathsig", "TERM"] if shutil.which("setpriv") else []
    if core is not None and shutil.which("taskset"):
        prefix += ["taskset", "-c", str(core)]
    return prefix


def vm_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM (peak RSS) of a process, in kB."""
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def poll_step(n: int) -> float:
    """How often to poll ``message`` for fan-out progress: each poll counts the message's
    items in pushd (a GROUP BY over them), so poll big messages less often."""
    return 0.25 if n <= 20_000 else 1.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """user+system CPU seconds of a process (and its threads)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


# --------------------------------------------------------------------------- simulator


class Simulator:
    """``python -m apns.simulator`` in its own process, recording every answer to a file."""

    def __init__(
        self,
        work: Path,
        name: str,
        core: int | None,
        *,
        delay: float = 0.0,
        record: bool = True,
        initial_streams: int | None = None,
        port: int | None = None,
    ) -> None:
        self.work = work
        self.name = name
        self.core = core
        self.delay = delay
        self.record_path = work / f"{name}.records.jsonl" if record else None
        # A fixed port, so that a restarted simulator is where pushd expects it.
        self.port = port or free_port()
        cmd = [
            *child(core), sys.executable, "-m", "apns.simulator",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--tls-dir", str(work / "tls"),
            "--key", f"{KEY_ID}:{TEAM_ID}:{work / 'key.pub.pem'}",
            "--streams", "1000",
        ]  # fmt: skip
        if initial_streams is not None:
            cmd += ["--initial-streams", str(initial_streams)]
        if self.record_path is not None:
            cmd += ["--record", str(self.record_path)]
        if delay:
            cmd += ["--delay", str(delay)]
        self.cmd = cmd
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=open(work / f"{name}.stderr", "a"),  # noqa: SIM115 - the child keeps it
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("listening on"):
            self.proc.kill()
            raise SystemExit(f"simulator did not start: {line!r}; see {work / f'{name}.stderr'}")
        self.ca_file = work / "tls" / "ca.pem"
        self._offset = 0

    def read_new(self) -> Iterator[dict[str, Any]]:
        """Records appended since the last call (whole lines only)."""
        if self.record_path is None or not self.record_path.exists():
            return
        with self.record_path.open("rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self._offset += end
        for line in data[:end].splitlines():
            if line:
                yield json.loads(line)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def restart(self) -> None:
        """Start again on the same port, appending to the same record file."""
        offset = self._offset
        self.__init__(
            self.work,
            self.name,
            self.core,
            delay=self.delay,  # type: ignore[misc]
            record=self.record_path is not None,
            port=self.port,
        )
        self._offset = offset

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Answers:
    """Simulator answers grouped by collapse id (= pushd's message id)."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.by_message: dict[str, list[tuple[float, str, int]]] = defaultdict(list)
        self.total = 0

    def poll(self) -> int:
        n = 0
        for r in self.sim.read_new():
            mid = r["headers"].get("apns-collapse-id")
            self.by_message[mid].append((r["time"], r["token"], r["status"]))
            n += 1
        self.total += n
        return n

    def first(self, message_id: str) -> float | None:
        """When the simulator first answered the message (None: not yet)."""
        got = self.by_message.get(message_id)
        return min(t for t, _, _ in got) if got else None

    def wait_for(self, message_id: str, count: int, deadline: float, step: float = 0.1) -> bool:
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            self.poll()
            if len(self.by_message.get(message_id, ())) >= count:
                return True
            time.sleep(step)
        self.poll()
        return len(self.by_message.get(message_id, ())) >= count


# --------------------------------------------------------------------------- pushd


CONFIG = """
[daemon]
state_dir = "{state}"
log_level = "warning"
log_format = "json"
shutdown_timeout = 10.0

[control]
socket = "{socket}"

[apns]
environment = "custom"
host = "127.0.0.1"
port = {port}
ca_file = "{ca}"
auth = "token"
key_file = "{key}"
key_id = "{kid}"
team_id = "{team}"
connections = {connections}
# The recovery scenario freezes the simulator while a broadcast fans out (~10 s at
# 100,000 devices): no request or ping may time out meanwhile (default 10 s each).
request_timeout = 30.0
ping_timeout = 30.0

[storage]
batch_size = {store_batch}

[nodes]
count = {nodes}
batch = {batch}
lanes = {lanes}
lease_seconds = {lease}

[[classes]]
id = "needs-update"
rule = {{ field = "device.app_version", semver_lt = "2.0.0" }}

[[classes]]
id = "everyone"
rule = "always"
"""


class Pushd:
    def __init__(
        self, work: Path, name: str, sim: Simulator, core: int | None, args: argparse.Namespace
    ) -> None:
        self.dir = work / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.socket = self.dir / "ctl.sock"
        self.config = self.dir / "pushd.toml"
        self.config.write_text(
            CONFIG.format(
                state=self.dir / "state", socket=self.socket, port=sim.port, ca=sim.ca_file,
                key=work / "AuthKey.p8", kid=KEY_ID, team=TEAM_ID, nodes=args.nodes, batch=args.batch, lease=args.lease_seconds,
                connections=args.connections, lanes=args.lanes, store_batch=args.store_batch,
            )
        )  # fmt: skip
        self.core = core
        self.cmd = [
            *child(core),
            sys.executable,
            "-m",
            "pushd.cli",
            "run",
            "--config",
            str(self.config),
        ]
        if os.environ.get("PUSHD_ENTRY"):  # experiments: a wrapper script instead of -m pushd.cli
            i = self.cmd.index("-m")
            self.cmd[i : i + 2] = [os.environ["PUSHD_ENTRY"]]
        self.proc: subprocess.Popen[bytes] | None = None
        self.registered = 0
        self.started_at = 0.0
        self.startup_seconds = 0.0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 120.0) -> float:
        """Start and wait until the control socket answers ``ping``; seconds taken."""
        log_file = open(self.dir / "pushd.log", "ab")  # noqa: SIM115 - the child keeps it
        self.started_at = time.time()
        began = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT)
        end = began + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise SystemExit(
                    f"pushd exited with {self.proc.returncode}; see {self.dir / 'pushd.log'}"
                )
            if self.socket.exists():
                try:
                    with Client(self.socket, timeout=2) as c:
                        c.ping()
                    self.startup_seconds = time.monotonic() - began
                    return self.startup_seconds
                except Exception:
                    pass
            time.sleep(0.01)
        raise SystemExit(f"pushd did not answer within {timeout}s; see {self.dir / 'pushd.log'}")

    def call(self, op: str, timeout: float = 60.0, **args: Any) -> Any:
        with Client(self.socket, timeout=timeout) as c:
            return c.call(op, **args)

    def register(
        self, start: int, stop: int, *, every_tenth_old: bool = False, threads: int = 2
    ) -> float:
        """Register devices ``start..stop-1`` in chunks of 1000; devices/s."""
        chunks = list(range(start, stop, 1000))
        began = time.monotonic()
        errors: list[BaseException] = []

        def work(mine: list[int]) -> None:
            try:
                with Client(self.socket, timeout=120) as c:
                    for s in mine:
                        devices = [
                            device(
                                i,
                                app_version="1.5.0" if every_tenth_old and i % 10 == 0 else "2.1.0",
                            )
                            for i in range(s, min(s + 1000, stop))
                        ]
                        c.call("register_many", devices=devices)
            except BaseException as exc:
                errors.append(exc)

        pool = [threading.Thread(target=work, args=(chunks[t::threads],)) for t in range(threads)]
        for t in pool:
            t.start()
        last = time.monotonic()
        while any(t.is_alive() for t in pool):
            time.sleep(0.5)
            if time.monotonic() - last > 15:
                last = time.monotonic()
                log(f"  registering ... {time.monotonic() - began:.0f}s")
        for t in pool:
            t.join()
        if errors:
            raise errors[0]
        self.registered = max(self.registered, stop)
        return (stop - start) / (time.monotonic() - began)

    def wait_fanout(
        self, message_id: str, deadline: float, step: float = 0.25
    ) -> tuple[float, dict[str, Any]]:
        """Poll ``message`` until fan-out is done; (wall time seen done, state)."""
        end = time.monotonic() + deadline
        with Client(self.socket, timeout=60) as c:
            while time.monotonic() < end:
                state = c.call("message", message_id=message_id, page_size=1)
                if state["fanout"] != "running":
                    return time.time(), state
                time.sleep(step)
        raise SystemExit(f"fan-out of {message_id} not done within {deadline}s")

    def wait_idle(self, deadline: float, step: float = 0.2) -> float:
        """Poll ``stats`` until no item is queued or leased; seconds waited."""
        began = time.monotonic()
        with Client(self.socket, timeout=60) as c:
            while time.monotonic() < began + deadline:
                items = c.call("stats")["queue"]["items"]
                if not items.get("queued") and not items.get("leased"):
                    return time.monotonic() - began
                time.sleep(step)
        raise RuntimeError(f"pushd's queue did not drain within {deadline}s: {items}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


class Profiler:
    """py-spy record (raw collapsed stacks) of a pid for a while; top functions afterwards."""

    def __init__(self, pid: int, out: Path, seconds: float, core: int | None) -> None:
        self.out = out
        exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        self.cmd = [
            *child(core), exe, "record", "--pid", str(pid), "--format", "raw", "--rate", "200",
            "--nonblocking", "--duration", str(max(1, int(seconds))), "--output", str(out),
        ]  # fmt: skip
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def finish(self, top: int = 15) -> dict[str, Any]:
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(timeout=10)
        return summarise_profile(self.out, top)


def summarise_profile(path: Path, top: int = 15) -> dict[str, Any]:
    if not path.exists():
        return {"error": "no profile written (py-spy needs ptrace permission)"}
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    idle = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        leaf = frames[-1]
        if re.search(
            r"\b(epoll|select|poll|_run_once|wait|get_events|acquire)\b", leaf.split(" (")[0]
        ) and (
            "selectors" in leaf or "threading" in leaf or "_io_epoll" in leaf or "queue" in leaf
        ):
            idle += n
        self_time[_short(leaf)] += n
        for f in {_short(f) for f in frames}:
            inclusive[f] += n
    return {
        "file": str(path),
        "samples": total,
        "idle_samples": idle,
        "self": [(f, round(100 * n / max(total, 1), 1)) for f, n in self_time.most_common(top)],
        "inclusive": [
            (f, round(100 * n / max(total, 1), 1)) for f, n in inclusive.most_common(top * 3)
        ],
    }


def _short(frame: str) -> str:
    # "func (path/to/file.py:123)" -> "func (file.py:123)"; thread names stay
    m = re.match(r"(.*) \((.*?)([^/]+\.py):(\d+)\)$", frame)
    if not m:
        return frame
    return f"{m.group(1)} ({m.group(3)}:{m.group(4)})"


# --------------------------------------------------------------------------- aioapns baseline


async def _aioapns(
    port: int, ca_file: str, key_pem: str, n: int, in_flight: int, salt: str
) -> dict[str, Any]:
    from aioapns import APNs, NotificationRequest, PushType
    from aioapns.connection import APNsProductionClientProtocol

    class LocalProtocol(APNsProductionClientProtocol):
        APNS_SERVER = "127.0.0.1"
        APNS_PORT = port

    client = APNs(
        key=key_pem, key_id=KEY_ID, team_id=TEAM_ID, topic=TOPIC,
        ssl_context=ssl.create_default_context(cafile=ca_file), max_connection_attempts=1,
    )  # fmt: skip
    client.pool.protocol_class = LocalProtocol
    message = {"aps": NOTIFICATION["aps"]}
    requests = [
        NotificationRequest(
            device_token=token_for(i, salt), message=message, notification_id=str(uuid.uuid4()),
            collapse_key=f"aioapns-{salt}", priority=10, time_to_live=86400, push_type=PushType.ALERT,
        )
        for i in range(n)
    ]  # fmt: skip
    warm = NotificationRequest(
        device_token=token_for(-1, salt), message=message, collapse_key=f"aioapns-{salt}"
    )
    await client.send_notification(warm)  # connect, pass the first-token gate
    failures = 0

    async def worker(start: int) -> None:
        nonlocal failures
        for i in range(start, n, in_flight):
            result = await client.send_notification(requests[i])
            failures += not result.is_successful

    began, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker(w) for w in range(min(in_flight, n))))
    elapsed, cpu = time.perf_counter() - began, time.process_time() - cpu
    client.pool.close()
    return {
        "n": n,
        "seconds": elapsed,
        "rate": n / elapsed,
        "cpu_us": cpu / n * 1e6,
        "failures": failures,
    }


def run_aioapns(
    work: Path, sim: Simulator, n: int, in_flight: int, core: int | None
) -> dict[str, Any]:
    """The baseline in its own process on pushd's core."""
    spec = {"port": sim.port, "ca": str(sim.ca_file), "key": str(work / "AuthKey.p8"), "n": n,
            "in_flight": in_flight, "salt": uuid.uuid4().hex[:8]}  # fmt: skip
    cmd = [
        *child(core),
        sys.executable,
        str(Path(__file__).resolve()),
        "--aioapns-worker",
        json.dumps(spec),
    ]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    if out.returncode != 0:
        raise SystemExit(f"aioapns worker failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def aioapns_worker(spec_json: str) -> None:
    spec = json.loads(spec_json)
    key_pem = Path(spec["key"]).read_text()
    result = asyncio.run(
        _aioapns(spec["port"], spec["ca"], key_pem, spec["n"], spec["in_flight"], spec["salt"])
    )
    print(json.dumps(result))


# --------------------------------------------------------------------------- paced single-device pushes


class PushConnection:
    """One control-socket connection of the trio driver: a push is a request frame and
    its reply frame (``pushd.protocol``), so the driver is one thread for any rate."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()
        self.next_id = 0

    async def push(self, device: int, priority: int) -> str:
        self.next_id += 1
        await self.stream.send_all(encode_frame({"v": 1, "id": self.next_id, "op": "push", "args": {
            "notification": NOTIFICATION, "target": {"devices": [f"d{device:07d}"]}, "priority": priority}}))  # fmt: skip
        reply = await read_frame(self.stream, max_size=1 << 20, buffer=self.buffer)
        if not isinstance(reply, dict) or "result" not in reply:
            raise RuntimeError(f"push refused: {reply!r}")
        return str(reply["result"]["message_id"])


def paced_pushes(
    daemon: Pushd, rate: float, count: int, device_range: int, priority: int = 10,
    connections: int = 48, stop: threading.Event | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """Offer ``count`` single-device pushes at ``rate``/s, open loop: push k is sent at its
    slot ``k / rate`` on whichever connection is free (a late reply does not delay the
    next push; only running out of free connections would, which ``send_lag`` shows)."""

    # Every connection sends its first push within ~8 s of opening (pushd closes one that
    # has sent nothing for 10 s): at a low rate, fewer connections.
    connections = max(1, min(connections, int(rate * 8)))

    async def main() -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = []
        pool_send, pool_recv = trio.open_memory_channel[PushConnection](connections)
        opened = [PushConnection(await trio.open_unix_socket(str(daemon.socket))) for _ in range(connections)]
        for conn in opened:
            pool_send.send_nowait(conn)
        wall0 = time.time() + 0.2
        t0 = trio.current_time() + 0.2

        async def one(k: int, conn: PushConnection) -> None:
            dev = (k * 7919) % device_range
            sent = time.time()
            message_id = await conn.push(dev, priority)
            results.append({"message_id": message_id, "submit": sent, "accepted": time.time(),
                            "due": wall0 + k / rate, "device": dev})  # fmt: skip
            pool_send.send_nowait(conn)

        async with trio.open_nursery() as nursery:
            for k in range(count):
                if stop is not None and stop.is_set():
                    break
                await trio.sleep_until(t0 + k / rate)
                nursery.start_soon(one, k, await pool_recv.receive())
        for conn in opened:
            await conn.stream.aclose()
        return results

    return trio.run(main)


def saturate(daemon: Pushd, seconds: float, device_range: int, connections: int = 48) -> dict[str, Any]:
    """Closed loop: ``connections`` clients each pushing back to back for ``seconds``;
    the single-device pushes pushd accepts per second at saturation."""

    async def main() -> dict[str, Any]:
        pushes: list[dict[str, Any]] = []
        end = trio.current_time() + seconds

        async def client(j: int) -> None:
            conn = PushConnection(await trio.open_unix_socket(str(daemon.socket)))
            k = j
            while trio.current_time() < end:
                sent = time.time()
                message_id = await conn.push((k * 7919) % device_range, 10)
                pushes.append({"message_id": message_id, "submit": sent, "accepted": time.time(), "due": sent})
                k += connections
            await conn.stream.aclose()

        began = time.time()
        async with trio.open_nursery() as nursery:
            for j in range(connections):
                nursery.start_soon(client, j)
        return {"pushes": pushes, "seconds": time.time() - began}

    return trio.run(main)


def single_latencies(
    answers: Answers, pushes: list[dict[str, Any]], deadline: float
) -> dict[str, Any]:
    end = time.monotonic() + deadline
    missing = pushes
    while time.monotonic() < end:
        answers.poll()
        missing = [p for p in pushes if p["message_id"] not in answers.by_message]
        if not missing:
            break
        time.sleep(0.2)
    lat = []
    after_accept = []
    accept = []
    lag = []
    for p in pushes:
        first = answers.first(p["message_id"])
        if first is not None:
            lat.append((first - p["submit"]) * 1000)
            after_accept.append((first - p["accepted"]) * 1000)
        accept.append((p["accepted"] - p["submit"]) * 1000)
        lag.append((p["submit"] - p["due"]) * 1000)
    return {
        "count": len(pushes),
        "answered": len(lat),
        "missing": len(missing),
        "p50_ms": round(pct(lat, 50), 2),
        "p95_ms": round(pct(lat, 95), 2),
        "p99_ms": round(pct(lat, 99), 2),
        "max_ms": round(max(lat), 2) if lat else None,
        "accept_p50_ms": round(pct(accept, 50), 2),
        "accept_p95_ms": round(pct(accept, 95), 2),
        "accepted_to_answer_p50_ms": round(pct(after_accept, 50), 2),
        "accepted_to_answer_p99_ms": round(pct(after_accept, 99), 2),
        "accept_p99_ms": round(pct(accept, 99), 2),
        "send_lag_p99_ms": round(pct(lag, 99), 2),
    }


def enqueue_latencies(daemon: Pushd, answers: Answers, pushes: list[dict[str, Any]]) -> dict[str, Any]:
    """From pushd's own timestamp of each push (``created_at`` in the ``message`` op: taken
    as central takes the push, just before the transaction that puts its item in the
    queue) to the APNs answer: the issue's "enqueue -> APNs answer". What the client's
    submit -> answer adds on top is the wait to be accepted (the control socket, central's
    inbox, the accepting transaction and the reply)."""
    lat = []
    with Client(daemon.socket, timeout=60) as c:
        for p in pushes:
            first = answers.first(p["message_id"])
            if first is not None:
                created = c.call("message", message_id=p["message_id"], page_size=1)["created_at"]
                lat.append((first - created) * 1000)
    return {
        "enqueue_to_answer_p50_ms": round(pct(lat, 50), 2),
        "enqueue_to_answer_p95_ms": round(pct(lat, 95), 2),
        "enqueue_to_answer_p99_ms": round(pct(lat, 99), 2),
        "enqueue_to_answer_max_ms": round(max(lat), 2) if lat else None,
    }


# --------------------------------------------------------------------------- the bench


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        cores = sorted(os.sched_getaffinity(0))
        self.pushd_core: int | None = cores[0] if len(cores) > 1 else None
        self.sim_core: int | None = cores[1] if len(cores) > 1 else None
        if self.sim_core is not None:
            os.sched_setaffinity(0, {self.sim_core})  # the driver shares the simulator's core
        from apns.auth import generate_signing_key

        _, public = generate_signing_key(work / "AuthKey.p8", key_id=KEY_ID, team_id=TEAM_ID)
        (work / "key.pub.pem").write_bytes(public)
        self.results: dict[str, Any] = {}
        self.main_sim: Simulator | None = None
        self.main: Pushd | None = None
        self.max_rate: float | None = args.rate * 2 if args.rate else None
        # Per node: nodes.batch over its lanes, plus its express lane's one lane-sized
        # round (priority 10) -- aioapns gets the same concurrency.
        self.in_flight = args.nodes * (args.batch + args.batch // args.lanes)

    # -- shared store A: N devices, a normal simulator --------------------------------

    def main_daemon(self) -> tuple[Pushd, Simulator, Answers]:
        if self.main is None:
            self.main_sim = Simulator(self.work, "sim-main", self.sim_core)
            self.answers = Answers(self.main_sim)
            self.main = Pushd(self.work, "pushd-main", self.main_sim, self.pushd_core, self.args)
            t = self.main.start()
            log(
                f"pushd (main) up in {t:.2f}s, pid {self.main.pid}; registering {self.args.devices:,} devices"
            )
            rate = self.main.register(0, self.args.devices)
            self.results.setdefault("registration", {})["main"] = {
                "devices": self.args.devices, "devices_per_s": round(rate), "load": load()}  # fmt: skip
            log(f"  registered at {rate:,.0f} devices/s")
        assert self.main_sim is not None
        return self.main, self.main_sim, self.answers

    def broadcast(self, daemon: Pushd, priority: int = 10) -> tuple[str, float, float]:
        sent = time.time()
        reply = daemon.call(
            "push", notification=NOTIFICATION, target={"all": True}, priority=priority
        )
        return reply["message_id"], sent, time.time()

    # -- 1 + 5 ---------------------------------------------------------------------------

    def throughput(self) -> None:
        a = self.args
        daemon, sim, answers = self.main_daemon()
        n = a.devices
        half = max(1000, n // 2)
        log(f"throughput: aioapns baseline, {half:,} notifications, {self.in_flight} in flight")
        load_before = load()
        bases = [run_aioapns(self.work, sim, half, self.in_flight, self.pushd_core)]
        answers.poll()
        log(f"  aioapns {bases[0]['rate']:,.0f}/s ({bases[0]['cpu_us']:.0f} us CPU each)")
        log(f"throughput: pushd, one push to all {n:,} devices")
        cpu0, sim_cpu0 = cpu_seconds(daemon.pid), cpu_seconds(sim.proc.pid)
        profiler = None
        if a.profile:
            est = n / (self.max_rate or 1.5 * bases[0]["rate"])
            profiler = Profiler(
                daemon.pid, self.work / "profile-throughput.txt", est * 0.8 + 1, self.sim_core
            )
        mid, submit, accepted = self.broadcast(daemon)
        fan_done, state = daemon.wait_fanout(mid, deadline=max(120, n / 200), step=poll_step(n))
        if not answers.wait_for(mid, n, deadline=max(120, n / 100)):
            log(f"  only {len(answers.by_message[mid])} of {n} answered")
        cpu1, sim_cpu1 = cpu_seconds(daemon.pid), cpu_seconds(sim.proc.pid)
        if profiler is not None:
            profile = profiler.finish()
        # the baseline again after pushd, so that a change in the machine's load shows
        log(f"throughput: aioapns baseline again, {half:,} notifications")
        bases.append(run_aioapns(self.work, sim, half, self.in_flight, self.pushd_core))
        answers.poll()
        log(f"  aioapns {bases[1]['rate']:,.0f}/s ({bases[1]['cpu_us']:.0f} us CPU each)")
        base = {
            "rate": sum(b["n"] for b in bases) / sum(b["seconds"] for b in bases),
            "cpu_us": sum(b["cpu_us"] * b["n"] for b in bases) / sum(b["n"] for b in bases),
            "failures": sum(b["failures"] for b in bases),
        }
        got = answers.by_message[mid]
        times = sorted(t for t, _, _ in got)
        ok = sum(1 for _, _, s in got if s == 200)
        last = times[-1]
        elapsed = last - accepted
        rate = len(got) / elapsed
        self.max_rate = rate
        r: dict[str, Any] = {
            "devices": n,
            "in_flight": self.in_flight,
            "answered": len(got),
            "ok_200": ok,
            "unique_tokens": len({tok for _, tok, _ in got}),
            "accept_ms": round((accepted - submit) * 1000, 1),
            "seconds_accept_to_last_answer": round(elapsed, 3),
            "pushd_rate": round(rate, 1),
            "pushd_send_phase_rate": round(len(got) / max(last - times[0], 1e-9), 1),
            "first_answer_after_accept_ms": round((times[0] - accepted) * 1000, 1),
            "pushd_cpu_us_per_notification": round((cpu1 - cpu0) / len(got) * 1e6, 1),
            "pushd_cpu_utilisation": round((cpu1 - cpu0) / elapsed, 2),
            "simulator_cpu_utilisation": round((sim_cpu1 - sim_cpu0) / elapsed, 2),
            "aioapns_rate": round(base["rate"], 1),
            "aioapns_rates_before_after": [round(b["rate"], 1) for b in bases],
            "aioapns_n_each": half,
            "aioapns_cpu_us_per_notification": round(base["cpu_us"], 1),
            "aioapns_failures": base["failures"],
            "ratio": round(rate / base["rate"], 3),
            "target": ">= 1.0x aioapns (aim 1.5x)",
            "met": rate >= base["rate"],
            "load_before": load_before,
            "load_after": load(),
        }
        fan_seconds = fan_done - accepted
        self.results["fanout_during_send"] = {
            "devices": n,
            "enqueued": state["enqueued"],
            "seconds_upper_bound": round(fan_seconds, 3),
            "poll_interval_s": poll_step(n),
            "devices_per_s": round(n / fan_seconds),
            "note": "fan-out while the nodes send (both on pushd's core); done seen by polling `message`",
            "load_after": load(),
        }
        if profiler is not None:
            r["profile"] = profile
        self.results["throughput"] = r
        log(
            f"  pushd {rate:,.0f}/s vs aioapns {base['rate']:,.0f}/s = {r['ratio']:.2f}x; fan-out {fan_seconds:.2f}s"
        )

    # -- 2 -----------------------------------------------------------------------------

    def latency(self) -> None:
        a = self.args
        daemon, _sim, answers = self.main_daemon()
        # The maximum for this load: single-device pushes, closed loop, 48 clients.
        log(f"latency: single-device pushes at saturation ({a.latency_seconds:.0f}s, 48 clients back to back)")
        answers.poll()
        load_before = load()
        cpu0 = cpu_seconds(daemon.pid)
        sat = saturate(daemon, a.latency_seconds, daemon.registered)
        cpu = cpu_seconds(daemon.pid) - cpu0
        pushes = sat["pushes"]
        answered = single_latencies(answers, pushes, deadline=60)
        single_max = len(pushes) / sat["seconds"]
        self.results["single_max"] = {
            "accepted_per_s": round(single_max, 1), "pushes": len(pushes), "seconds": round(sat["seconds"], 1),
            "cpu_us_per_push": round(cpu / max(1, len(pushes)) * 1e6), "clients": 48,
            "submit_to_answer_p50_ms": answered["p50_ms"], "submit_to_answer_p99_ms": answered["p99_ms"],
            "load_before": load_before, "load_after": load()}  # fmt: skip
        log(f"  {single_max:,.0f} single-device pushes/s accepted; {cpu / max(1, len(pushes)) * 1e6:,.0f} us CPU each")
        # The same with one client: every push handled alone (nothing to batch it with). Its
        # CPU per push against the 48 clients' is what decides the load at half the maximum
        # (BENCHMARKS.md, session 6).
        daemon.wait_idle(deadline=300)
        cpu0 = cpu_seconds(daemon.pid)
        one = saturate(daemon, a.latency_seconds / 2, daemon.registered, connections=1)
        daemon.wait_idle(deadline=300)
        cpu = cpu_seconds(daemon.pid) - cpu0
        alone = len(one["pushes"])
        self.results["single_alone"] = {
            "accepted_per_s": round(alone / one["seconds"], 1), "pushes": alone, "seconds": round(one["seconds"], 1),
            "cpu_us_per_push": round(cpu / max(1, alone) * 1e6), "clients": 1}  # fmt: skip
        log(f"  one client: {alone / one['seconds']:,.0f} pushes/s; {cpu / max(1, alone) * 1e6:,.0f} us CPU each")
        # Offered open loop, at a steady pace: half of that maximum; half of the broadcast's
        # maximum (the throughput figure), when measured or given; a low rate.
        # Where p99 <= 25 ms still holds: 10 %, 20 %, ... of the single maximum, until it
        # does not (short runs; the figures that matter are the full-length runs below).
        sweep = []
        for fraction in (0.1, 0.2, 0.3, 0.4):
            daemon.wait_idle(deadline=300)
            rate = single_max * fraction
            pushes = paced_pushes(daemon, rate, max(100, int(rate * a.latency_seconds / 2)), daemon.registered)
            r = single_latencies(answers, pushes, deadline=60)
            sweep.append({"offered_rate": round(rate, 1), "fraction_of_single_max": fraction,
                          "p50_ms": r["p50_ms"], "p95_ms": r["p95_ms"], "p99_ms": r["p99_ms"]})  # fmt: skip
            log(f"  sweep {rate:,.0f}/s: p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms")
            if r["p99_ms"] > 25:
                break
        self.results["latency_sweep"] = sweep
        runs = [("latency_half_single", single_max / 2, single_max)]
        if self.max_rate is not None:
            runs.append(("latency", self.max_rate / 2, self.max_rate))
        if a.latency_low_rate:
            runs.append(("latency_low", a.latency_low_rate, None))
        for key, rate, of_max in runs:
            count = max(100, int(rate * a.latency_seconds))
            # A run above the maximum leaves a backlog; the next run starts on an empty queue.
            waited = daemon.wait_idle(deadline=300)
            log(f"{key}: {count:,} single-device pushes offered at {rate:,.0f}/s (queue empty after {waited:.1f}s)")
            answers.poll()
            load_before = load()
            profiler = None
            if a.profile and key == "latency_half_single":
                profiler = Profiler(
                    daemon.pid, self.work / "profile-latency.txt", a.latency_seconds, self.sim_core
                )
            began = time.time()
            cpu0 = cpu_seconds(daemon.pid)
            pushes = paced_pushes(daemon, rate, count, daemon.registered)
            sent_for = time.time() - began
            cpu_share = (cpu_seconds(daemon.pid) - cpu0) / sent_for
            r = single_latencies(answers, pushes, deadline=60)
            r.update(enqueue_latencies(daemon, answers, pushes))
            r.update({"offered_rate": round(rate, 1), "of_max_rate": None if of_max is None else round(of_max, 1),
                      "achieved_accept_rate": round(len(pushes) / sent_for, 1), "pushd_cpu_share": round(cpu_share, 2),
                      "seconds": a.latency_seconds, "waited_for_empty_queue_s": round(waited, 1),
                      "target": "p99 <= 25 ms", "met": r["p99_ms"] <= 25,
                      "enqueue_met": r["enqueue_to_answer_p99_ms"] <= 25,
                      "load_before": load_before, "load_after": load()})  # fmt: skip
            if profiler is not None:
                r["profile"] = profiler.finish()
            self.results[key] = r
            log(
                f"  submit -> answer p50 {r['p50_ms']} ms, p95 {r['p95_ms']} ms, p99 {r['p99_ms']} ms; "
                f"accepted {r['achieved_accept_rate']}/s; pushd CPU {cpu_share:.2f}"
            )
            log(
                f"  enqueue -> answer p50 {r['enqueue_to_answer_p50_ms']} ms, "
                f"p95 {r['enqueue_to_answer_p95_ms']} ms, p99 {r['enqueue_to_answer_p99_ms']} ms"
            )

    # -- 3 -----------------------------------------------------------------------------

    def hol(self) -> None:
        a = self.args
        daemon, _sim, answers = self.main_daemon()
        n = daemon.registered
        answers.poll()
        load_before = load()
        mid, _submit, accepted = self.broadcast(daemon, priority=a.broadcast_priority)
        log(
            f"head of line: broadcast to {n:,} (priority {a.broadcast_priority}); single pushes at {a.hol_rate}/s"
        )
        stop = threading.Event()
        expected = n / (self.max_rate or 1000)
        count = int(a.hol_rate * (expected * 3 + 30))
        holder: dict[str, Any] = {}

        def pusher() -> None:
            holder["pushes"] = paced_pushes(daemon, a.hol_rate, count, n, priority=10, connections=8, stop=stop)

        t = threading.Thread(target=pusher)
        t.start()
        done = answers.wait_for(mid, n, deadline=max(120, n / 100), step=0.2)
        drained = max(tt for tt, _, _ in answers.by_message[mid])
        stop.set()
        t.join()
        pushes = [p for p in holder.get("pushes", []) if p["submit"] < drained]
        r = single_latencies(answers, pushes, deadline=60)
        got = answers.by_message[mid]
        r.update({"broadcast_devices": n, "broadcast_priority": a.broadcast_priority, "broadcast_drained": done,
                  "broadcast_seconds": round(drained - accepted, 2),
                  "broadcast_rate": round(len(got) / (drained - accepted), 1), "single_rate": a.hol_rate,
                  "target": "p99 <= 100 ms", "met": r["p99_ms"] <= 100, "load_before": load_before,
                  "load_after": load()})  # fmt: skip
        self.results["hol"] = r
        log(
            f"  {r['count']} singles during a {r['broadcast_seconds']}s drain: p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms"
        )

    # -- 6 -----------------------------------------------------------------------------

    def recovery(self) -> None:
        a = self.args
        daemon, sim, answers = self.main_daemon()
        n = daemon.registered
        answers.poll()
        load_before = load()
        # The simulator is frozen (SIGSTOP) while the broadcast fans out, so that the whole
        # audience is queued at the kill (fan-out may be no faster than sending), with up to
        # the in-flight limit written to pushd's connections and not yet answered.
        frozen = a.recovery_freeze
        if frozen:
            sim.proc.send_signal(signal.SIGSTOP)
        froze = time.monotonic()
        try:
            mid, _submit, _accepted = self.broadcast(daemon)
            daemon.wait_fanout(mid, deadline=max(120, n / 200), step=poll_step(n))
            if frozen:
                time.sleep(1.0)  # the lanes lease and write their first batches
            answers.poll()
            answered_at_kill_seen = len(answers.by_message[mid])
            daemon.stop(signal.SIGKILL)
            killed = time.time()
        finally:
            if frozen:
                sim.proc.send_signal(signal.SIGCONT)
        frozen_for = time.monotonic() - froze if frozen else 0.0
        if frozen_for >= 30.0:
            log(f"  the simulator was frozen {frozen_for:.1f}s, past pushd's request timeout (30 s)")
        # The simulator answers what the killed connections had written (and may die on
        # the first closed one: apns/simulator.py ends on a BrokenPipe): wait until no
        # new answer arrives for a second before looking.
        quiet_until, give_up = time.monotonic() + 1.0, time.monotonic() + 15.0
        while time.monotonic() < min(quiet_until, give_up):
            if answers.poll():
                quiet_until = time.monotonic() + 1.0
            time.sleep(0.1)
        before = len(answers.by_message[mid])
        sim_crashed = not sim.alive()
        if sim_crashed:  # apns/simulator.py: a BrokenPipe on one connection ends the whole server
            log("  the simulator died with pushd's connections; restarting it on the same port")
            sim.restart()
        log(
            f"recovery: SIGKILL with {n - answered_at_kill_seen:,} of {n:,} not yet answered "
            f"({before - answered_at_kill_seen:,} answered afterwards on the old connections); restarting"
        )
        startup = daemon.start()
        restarted = daemon.started_at
        deadline = a.lease_seconds + 15 + max(60, n / 100)
        end = time.monotonic() + deadline
        first_after = None
        while time.monotonic() < end:
            answers.poll()
            got = answers.by_message[mid]
            if first_after is None:
                after = [tt for tt, _, _ in got if tt > restarted]
                if after:
                    first_after = min(after)
            if len({tok for _, tok, s in got if s == 200}) >= n:
                break
            if not sim.alive():  # died late on one of the killed connections
                log("  the simulator died after the kill; restarting it on the same port")
                sim.restart()
                sim_crashed = True
            time.sleep(0.2)
        time.sleep(1.0)
        answers.poll()
        got = answers.by_message[mid]
        ok_tokens = Counter(tok for _, tok, s in got if s == 200)
        lost = n - len(ok_tokens)
        duplicated = sum(c - 1 for c in ok_tokens.values())
        last = max(tt for tt, _, _ in got)
        r = {
            "devices": n,
            "answered_before_kill": before,
            "answered_seen_at_kill": answered_at_kill_seen,
            "queued_at_kill": n - answered_at_kill_seen,
            "answered_after_kill_old_connections": before - answered_at_kill_seen,
            "restart_to_ping_s": round(startup, 3),
            "restart_to_sending_s": round(first_after - restarted, 3) if first_after else None,
            "kill_to_restart_s": round(restarted - killed, 3),
            "complete_after_restart_s": round(last - restarted, 2),
            "lost": lost,
            "duplicated": duplicated,
            "in_flight_limit": self.in_flight,
            "simulator_frozen_during_fanout": frozen,
            "frozen_s": round(frozen_for, 2),  # below pushd's request timeout (30 s here)
            "simulator_crashed_on_kill": sim_crashed,
            "target": "0 lost, duplicates <= in flight",
            "met": lost == 0 and duplicated <= self.in_flight,
            "load_before": load_before,
            "load_after": load(),
        }
        self.results["recovery"] = r
        log(
            f"  sending again {r['restart_to_sending_s']}s after restart; lost {lost}, duplicated {duplicated}"
        )

    # -- 4 + fan-out to everyone -----------------------------------------------------

    def big_daemon(self) -> tuple[Pushd, Simulator]:
        if getattr(self, "big", None) is None:
            a = self.args
            # Answers after a delay: ~in_flight/delay per second, so the queue stays full.
            self.big_sim = Simulator(
                self.work, "sim-big", self.sim_core, delay=a.slow_delay, record=False
            )
            self.big = Pushd(self.work, "pushd-big", self.big_sim, self.pushd_core, a)
            t = self.big.start()
            log(
                f"pushd (big) up in {t:.2f}s; registering {a.big_devices:,} devices (10% app 1.5.0)"
            )
            rate = self.big.register(0, a.big_devices, every_tenth_old=True)
            self.results.setdefault("registration", {})["big"] = {
                "devices": a.big_devices, "devices_per_s": round(rate), "load": load()}  # fmt: skip
            log(f"  registered at {rate:,.0f} devices/s; RSS {vm_status(self.big.pid)}")
        return self.big, self.big_sim

    def memory(self) -> None:
        a = self.args
        daemon, _ = self.big_daemon()
        m = a.big_devices
        load_before = load()
        after_registration = vm_status(daemon.pid)
        reply = daemon.call(
            "push", notification=NOTIFICATION, target={"classes": ["needs-update"]}, priority=5
        )
        accepted = time.time()
        fan_done, state = daemon.wait_fanout(
            reply["message_id"], deadline=max(300, m / 500), step=poll_step(m)
        )
        queued = state["states"]["queued"] + state["states"]["leased"]
        log(
            f"memory: {queued:,} queued after a {fan_done - accepted:.2f}s fan-out over {m:,} devices"
        )
        time.sleep(a.settle)
        running = vm_status(daemon.pid)
        db = sum(p.stat().st_size for p in (daemon.dir / "state").glob("pushd.sqlite3*"))
        t_stop = time.monotonic()
        code = daemon.stop(signal.SIGTERM)
        stop_s = time.monotonic() - t_stop
        startup = daemon.start()
        time.sleep(a.settle)
        restarted = vm_status(daemon.pid)
        state2 = daemon.call("message", message_id=reply["message_id"], page_size=1)
        peak = max(running.get("VmHWM", 0), restarted.get("VmHWM", 0))
        r = {
            "devices": m,
            "queued": queued,
            "queued_after_restart": state2["states"]["queued"] + state2["states"]["leased"],
            "fanout_seconds_class_target": round(fan_done - accepted, 2),
            "fanout_devices_per_s_class_target": round(m / (fan_done - accepted)),
            "rss_after_registration_mb": round(after_registration.get("VmRSS", 0) / 1024, 1),
            "peak_rss_mb_first_run": round(running.get("VmHWM", 0) / 1024, 1),
            "rss_mb_first_run": round(running.get("VmRSS", 0) / 1024, 1),
            "peak_rss_mb_after_restart": round(restarted.get("VmHWM", 0) / 1024, 1),
            "peak_rss_mb": round(peak / 1024, 1),
            "database_mb": round(db / 1e6, 1),
            "sigterm_exit": code,
            "sigterm_seconds": round(stop_s, 2),
            "startup_s": round(startup, 3),
            "simulator_delay_s": a.slow_delay,
            "target": "peak RSS <= 200 MB, start-up <= 2 s",
            "met": peak / 1024 <= 200 and startup <= 2,
            "load_before": load_before,
            "load_after": load(),
        }
        self.results["memory"] = r
        log(f"  peak RSS {r['peak_rss_mb']} MB, start-up {startup:.2f}s, db {r['database_mb']} MB")

    def fanout(self) -> None:
        a = self.args
        daemon, _ = self.big_daemon()
        m = daemon.registered
        load_before = load()
        profiler = None
        if a.profile:
            profiler = Profiler(
                daemon.pid, self.work / "profile-fanout.txt", m / 20000, self.sim_core
            )
        cpu0 = cpu_seconds(daemon.pid)
        mid, _submit, accepted = self.broadcast(daemon, priority=5)
        fan_done, state = daemon.wait_fanout(mid, deadline=max(600, m / 200), step=poll_step(m))
        cpu1 = cpu_seconds(daemon.pid)
        seconds = fan_done - accepted
        r = {
            "devices": m,
            "enqueued": state["enqueued"],
            "seconds_upper_bound": round(seconds, 2),
            "poll_interval_s": poll_step(m),
            "devices_per_s": round(m / seconds),
            "pushd_cpu_utilisation": round((cpu1 - cpu0) / seconds, 2),
            "rss_mb": round(vm_status(daemon.pid).get("VmHWM", 0) / 1024, 1),
            "note": "simulator answering slowly (--delay), so the nodes barely compete",
            "load_before": load_before,
            "load_after": load(),
        }
        if profiler is not None:
            r["profile"] = profiler.finish()
        self.results["fanout"] = r
        log(
            f"  fan-out to {m:,}: {seconds:.2f}s = {r['devices_per_s']:,}/s, {state['enqueued']:,} enqueued"
        )

    # -- 7 -----------------------------------------------------------------------------

    def ceiling(self) -> None:
        a = self.args
        if not shutil.which("h2load"):
            self.results["ceiling"] = {
                "skipped": "h2load not installed (apt-get install -y nghttp2-client)"
            }
            return
        from apns.simulator import sign_provider_token

        out: dict[str, Any] = {}
        for record in (False, True):
            sim = Simulator(self.work, f"sim-h2load-{int(record)}", self.sim_core, record=record)
            try:
                jwt = sign_provider_token((self.work / "AuthKey.p8").read_bytes(), KEY_ID, TEAM_ID)
                body = self.work / "payload.json"
                body.write_text(json.dumps({"aps": NOTIFICATION["aps"]}))
                cmd = [
                    *child(self.pushd_core), "h2load", "-n", str(a.h2load_n), "-c", "1",
                    "-m", str(min(self.in_flight, 1000)), "-t", "1", "-d", str(body),
                    "-H", f"authorization: bearer {jwt}", "-H", f"apns-topic: {TOPIC}",
                    "-H", "apns-push-type: alert",
                    f"https://127.0.0.1:{sim.port}/3/device/{token_for(0)}",
                ]  # fmt: skip
                load_before = load()
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
                m = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", res.stdout)
                status = re.search(
                    r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", res.stdout
                )
                out["record" if record else "no_record"] = {
                    "req_per_s": float(m.group(3)) if m else None,
                    "status_2xx": int(status.group(1)) if status else None,
                    "status_4xx": int(status.group(3)) if status else None,
                    "command": " ".join([*cmd[:-1], "<url>"]).replace(jwt, "<jwt>"),
                    "load_before": load_before,
                    "load_after": load(),
                }
                if not m:
                    out["record" if record else "no_record"]["output"] = (res.stdout + res.stderr)[
                        -1500:
                    ]
            finally:
                sim.stop()
        self.results["ceiling"] = out
        log(f"  h2load: {out}")

    def close(self) -> None:
        for d in (self.main, getattr(self, "big", None)):
            if d is not None:
                d.stop(signal.SIGTERM)
        for s in (self.main_sim, getattr(self, "big_sim", None)):
            if s is not None:
                s.stop()


# --------------------------------------------------------------------------- output


def table(results: dict[str, Any]) -> str:
    rows: list[tuple[str, str, str, str]] = []

    def add(name: str, value: str, target: str = "", met: Any = None) -> None:
        rows.append((name, value, target, "" if met is None else ("yes" if met else "NO")))

    if "ceiling" in results:
        c = results["ceiling"]
        for k, v in c.items():
            if isinstance(v, dict):
                add(
                    f"simulator ceiling, h2load ({k.replace('_', ' ')})",
                    f"{v.get('req_per_s') or 0:,.0f} req/s",
                )
    if "throughput" in results:
        t = results["throughput"]
        add(f"throughput, push to {t['devices']:,}", f"{t['pushd_rate']:,.0f}/s", "", None)
        add(
            f"aioapns, {t['devices']:,} at {t['in_flight']} in flight",
            f"{t['aioapns_rate']:,.0f}/s",
        )
        add("pushd / aioapns", f"{t['ratio']:.2f}x", ">= 1.0x (aim 1.5x)", t["met"])
        add("pushd CPU per notification", f"{t['pushd_cpu_us_per_notification']:,.0f} us "
            f"(aioapns {t['aioapns_cpu_us_per_notification']:,.0f})")  # fmt: skip
    if "fanout_during_send" in results:
        f = results["fanout_during_send"]
        add(f"fan-out while sending, {f['devices']:,}", f"{f['devices_per_s']:,}/s")
    if "single_max" in results and "error" not in results["single_max"]:
        m = results["single_max"]
        add("single-device pushes at saturation", f"{m['accepted_per_s']:,.0f}/s ({m['cpu_us_per_push']:,} us CPU each)")
    if "single_alone" in results:
        m = results["single_alone"]
        add("  one client (each push alone)", f"{m['accepted_per_s']:,.0f}/s ({m['cpu_us_per_push']:,} us CPU each)")
    if "latency_sweep" in results:
        met = [r for r in results["latency_sweep"] if r["p99_ms"] <= 25]
        add("highest rate swept with p99 <= 25 ms", f"{met[-1]['offered_rate']:,.0f}/s" if met else "none")
    for key, label in (("latency_half_single", "½ single max"), ("latency", "½ broadcast max"), ("latency_low", "low rate")):
        if key in results and "error" not in results[key]:
            la = results[key]
            single = results.get("single_max", {}).get("accepted_per_s")
            if single and la["offered_rate"] > single:
                label += ", above the single-push max"
            add(f"latency at {la['offered_rate']:,.0f}/s ({label}) p50/p95/p99",
                f"{la['p50_ms']}/{la['p95_ms']}/{la['p99_ms']} ms", "p99 <= 25 ms", la["met"])  # fmt: skip
            if "enqueue_to_answer_p99_ms" in la:
                add("  from pushd's enqueue (not the client's submit)",
                    f"{la['enqueue_to_answer_p50_ms']}/{la['enqueue_to_answer_p95_ms']}/{la['enqueue_to_answer_p99_ms']} ms",
                    "p99 <= 25 ms", la["enqueue_met"])  # fmt: skip
    if "hol" in results:
        h = results["hol"]
        add(
            f"head of line ({h['count']} singles) p50/p99",
            f"{h['p50_ms']}/{h['p99_ms']} ms",
            "p99 <= 100 ms",
            h["met"],
        )
    if "memory" in results:
        m = results["memory"]
        add(f"peak RSS, {m['devices']:,} devices + {m['queued']:,} queued", f"{m['peak_rss_mb']} MB", "<= 200 MB",
            m["peak_rss_mb"] <= 200)  # fmt: skip
        add("start-up with that store", f"{m['startup_s']:.2f} s", "<= 2 s", m["startup_s"] <= 2)
    if "fanout" in results:
        f = results["fanout"]
        add(f"fan-out to everyone, {f['devices']:,}", f"{f['devices_per_s']:,}/s")
    if "recovery" in results:
        r = results["recovery"]
        add(
            f"recovery, {r['queued_at_kill']:,} queued at SIGKILL",
            f"sending {r['restart_to_sending_s']} s after restart",
        )
        add(
            "  lost / duplicated",
            f"{r['lost']} / {r['duplicated']}",
            f"0 / <= {r['in_flight_limit']}",
            r["met"],
        )
    for name, reg in results.get("registration", {}).items():
        add(f"register_many ({name} store)", f"{reg['devices_per_s']:,} devices/s")
    w = [max(len(r[i]) for r in [*rows, ("figure", "value", "target", "met")]) for i in range(4)]
    lines = [" | ".join(h.ljust(w[i]) for i, h in enumerate(("figure", "value", "target", "met")))]
    lines.append("-+-".join("-" * x for x in w))
    lines += [" | ".join(c.ljust(w[i]) for i, c in enumerate(r)) for r in rows]
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--aioapns-worker":
        aioapns_worker(sys.argv[2])
        return
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--only",
        default=",".join(SCENARIOS),
        help=f"comma-separated subset of {','.join(SCENARIOS)}",
    )
    p.add_argument(
        "--quick", action="store_true", help="smoke sizes: 2,000 / 10,000 devices, short phases"
    )
    p.add_argument(
        "--devices", type=int, default=100_000, help="devices for throughput/latency/hol/recovery"
    )
    p.add_argument(
        "--big-devices", type=int, default=1_000_000, help="devices for memory/fanout (10%% queued)"
    )
    p.add_argument("--nodes", type=int, default=2, help="pushd nodes.count")
    p.add_argument(
        "--batch", type=int, default=200, help="pushd nodes.batch (in flight = nodes x batch)"
    )
    p.add_argument("--connections", type=int, default=2, help="pushd apns.connections per node")
    p.add_argument("--lanes", type=int, default=4, help="pushd nodes.lanes")
    p.add_argument("--store-batch", type=int, default=500, help="pushd storage.batch_size")
    p.add_argument(
        "--rate", type=float, help="latency: also offer this rate, as half of the broadcast maximum (when throughput is not run)"
    )
    p.add_argument("--latency-seconds", type=float, default=20.0)
    p.add_argument(
        "--latency-low-rate", type=float, default=20.0, help="latency: also at this rate (0: skip)"
    )
    p.add_argument(
        "--hol-rate", type=float, default=20.0, help="single pushes/s during the broadcast"
    )
    p.add_argument("--broadcast-priority", type=int, default=5)
    p.add_argument(
        "--slow-delay", type=float, default=5.0, help="memory/fanout: simulator answer delay (s)"
    )
    p.add_argument(
        "--settle", type=float, default=5.0, help="memory: seconds of running before reading RSS"
    )
    p.add_argument(
        "--lease-seconds",
        type=float,
        default=60.0,
        help="pushd nodes.lease_seconds (its default 60; --quick: 10, so recovery ends sooner)",
    )
    p.add_argument(
        "--recovery-freeze",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="recovery: SIGSTOP the simulator during the fan-out, so all N are queued at the kill",
    )
    p.add_argument("--h2load-n", type=int, default=50_000)
    p.add_argument(
        "--profile", action="store_true", help="py-spy the daemon during throughput/latency/fanout"
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args()
    if args.quick:
        args.devices = min(args.devices, 2_000)
        args.big_devices = min(args.big_devices, 10_000)
        args.latency_seconds = min(args.latency_seconds, 2.0)
        args.h2load_n = min(args.h2load_n, 5_000)
        args.settle = min(args.settle, 1.0)
        args.lease_seconds = min(args.lease_seconds, 10.0)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(only) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenario(s) {sorted(unknown)}; choose from {SCENARIOS}")

    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    work = Path(tempfile.mkdtemp(prefix="pushd-bench-"))
    began = time.time()
    bench = Bench(args, work)
    meta = {
        "timestamp": stamp,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "git": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip(),
        "host": socket.gethostname(),
        "cpus": os.cpu_count(),
        "cpu_model": next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        ),
        "python": platform.python_version(),
        "pushd_core": bench.pushd_core,
        "simulator_core": bench.sim_core,
        "driver_core": bench.sim_core,
        "taskset": bool(shutil.which("taskset")),
        "nodes": args.nodes,
        "batch": args.batch,
        "lease_seconds": args.lease_seconds,
        "connections_per_node": args.connections,
        "in_flight": bench.in_flight,
        "durability": "SQLite WAL, synchronous=NORMAL (survives a process crash)",
        "load_start": load(),
        "workdir": str(work),
    }
    try:
        order = [s for s in SCENARIOS if s in only]
        for name in order:
            try:
                getattr(bench, name)()
            except Exception as exc:
                log(f"{name} failed: {type(exc).__name__}: {exc}")
                bench.results[name] = {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        bench.close()
    meta["load_end"] = load()
    meta["seconds"] = round(time.time() - began, 1)
    out = {"meta": meta, "results": bench.results}
    results_dir = ROOT / "benchmarks" / "results"
    results_dir.mkdir(exist_ok=True)
    path = results_dir / f"{stamp}.json"
    path.write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(table(bench.results))
    print(f"\nload {meta['load_start']} -> {meta['load_end']}; {meta['seconds']}s; JSON: {path}")
    for name in ("throughput", "latency", "fanout"):
        prof = (
            bench.results.get(name, {}).get("profile")
            if isinstance(bench.results.get(name), dict)
            else None
        )
        if prof and "self" in prof:
            print(f"\npy-spy, {name}: {prof['samples']} samples; top self time:")
            for f, share in prof["self"][:10]:
                print(f"  {share:5.1f}%  {f}")
    if args.keep:
        print(f"work directory kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
