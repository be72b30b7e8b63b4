"""SIGKILL in the middle of a fan-out and in the middle of sending: after a restart every
accepted notification is delivered or has a recorded reason, and duplicates are limited
to what was in flight. The simulator's request log (a JSON-lines file written as each
request is answered) is the ground truth."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from pushd.client import Client, ConnectionFailed, RequestFailed
from tests.pipeline_helpers import alert, device

pytestmark = pytest.mark.e2e

NODES, BATCH = 2, 50
CONFIG = f"""
[daemon]
state_dir = "state"
log_format = "json"
[control]
socket = "ctl.sock"
[simulator]
port = {{port}}
record = "requests.jsonl"
[nodes]
count = {NODES}
batch = {BATCH}
[queue]
sweep_interval = 0.5
"""


def start(root: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "pushd.cli", "run", "--config", str(root / "pushd.toml")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def client_when_ready(root: Path, proc: subprocess.Popen[bytes]) -> Client:
    end = time.monotonic() + 30
    while time.monotonic() < end:
        assert proc.poll() is None, "pushd exited"
        try:
            c = Client(root / "ctl.sock", timeout=30)
            c.ping()
            return c
        except (ConnectionFailed, RequestFailed):
            time.sleep(0.1)
    raise AssertionError("pushd not ready")


def delivered(root: Path) -> Counter[str]:
    path = root / "requests.jsonl"
    if not path.exists():
        return Counter()
    out: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
        if r["status"] == 200:
            out[r["token"]] += 1
    return out


def kill(proc: subprocess.Popen[bytes]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_sigkill_during_fan_out_and_sending_loses_nothing(short_tmp: Path) -> None:
    (short_tmp / "pushd.toml").write_text(CONFIG.format(port=free_port()))
    proc = start(short_tmp)
    try:
        c = client_when_ready(short_tmp, proc)
        tokens = {}
        for i in range(1500):
            reg = device(f"d{i:05d}", f"u{i}")
            c.call("register", **reg)
            tokens[reg["token"]] = reg["device_id"]
        accepted = c.call("push", notification=alert(), target={"all": True})
        assert accepted["targeted"] == 1500
        kill(proc)  # right after acceptance: the broad fan-out runs in the background
        first_run = delivered(short_tmp)

        proc = start(short_tmp)
        c = client_when_ready(short_tmp, proc)
        end = time.monotonic() + 60
        while sum(delivered(short_tmp).values()) < len(first_run) + 300 and time.monotonic() < end:
            time.sleep(0.02)
        kill(proc)  # in the middle of sending

        proc = start(short_tmp)
        c = client_when_ready(short_tmp, proc)
        end = time.monotonic() + 90
        while time.monotonic() < end:
            state = c.call("message", message_id=accepted["message_id"])
            if state["states"]["queued"] + state["states"]["leased"] == 0 and state["enqueued"] == 1500:
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"message did not settle: {state['states']}")
        assert state["states"]["sent"] == 1500, state
        got = delivered(short_tmp)
        assert set(got) == set(tokens), f"lost: {len(set(tokens) - set(got))}"
        duplicates = sum(n - 1 for n in got.values())
        # At most what was in flight at each kill: every node's leased batch.
        assert duplicates <= 2 * NODES * BATCH, duplicates
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
