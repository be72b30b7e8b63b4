"""End to end: `pushd run` as a subprocess, driven with `pushctl`, reloaded with SIGHUP,
stopped with SIGTERM (exit 0); sd_notify datagrams from the real process."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

CONFIG = """
[daemon]
state_dir = "state"
log_format = "json"
shutdown_timeout = 5.0
[control]
socket = "ctl.sock"
[nodes]
count = {nodes}
"""


def pushctl(sock: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pushd.pushctl", "--socket", str(sock), *args],
        capture_output=True, text=True, timeout=30,
    )


def wait_ready(sock: Path, proc: subprocess.Popen[str], deadline: float = 30.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        assert proc.poll() is None, proc.communicate()
        if pushctl(sock, "ping").returncode == 0:
            return
        time.sleep(0.1)
    raise AssertionError("pushd did not become ready")


def test_run_control_reload_and_stop(short_tmp: Path) -> None:
    cfg = short_tmp / "pushd.toml"
    cfg.write_text(CONFIG.format(nodes=2))
    sock = short_tmp / "ctl.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(short_tmp / "notify"))
    notify.settimeout(30)
    env = {**os.environ, "NOTIFY_SOCKET": str(short_tmp / "notify")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pushd.cli", "run", "--config", str(cfg)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    try:
        wait_ready(sock, proc)
        assert notify.recv(4096).decode().startswith("READY=1")

        status = pushctl(sock, "--json", "status")
        assert status.returncode == 0, status.stderr
        actors = {a["name"]: a for a in json.loads(status.stdout)["actors"]}
        assert set(actors) == {"apns-simulator", "queue", "analyzer", "central", "node-0", "node-1"}
        assert all(a["state"] == "running" for a in actors.values())

        cfg.write_text(CONFIG.format(nodes=3))
        proc.send_signal(signal.SIGHUP)
        end = time.monotonic() + 20
        while time.monotonic() < end:
            names = [a["name"] for a in json.loads(pushctl(sock, "--json", "status").stdout)["actors"]]
            if "node-2" in names:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("SIGHUP reload did not add node-2")

        cfg.write_text(CONFIG.format(nodes=3) + "[nodes]\nbatch = 1\n")  # duplicate table: invalid
        bad = pushctl(sock, "reload")
        assert bad.returncode == 1
        assert str(cfg) in bad.stderr + bad.stdout
        # The same through SIGHUP (systemctl reload): the journal names the setting and file.
        cfg.write_text(CONFIG.format(nodes=3) + "[supervisor]\nbackof_max = 3.0\n")
        notify.setblocking(False)  # drop the notifications of the reloads above
        with contextlib.suppress(BlockingIOError):
            while notify.recv(4096):
                pass
        notify.settimeout(30)
        proc.send_signal(signal.SIGHUP)
        while not notify.recv(4096).decode().startswith("READY=1"):  # the rejected reload is done
            pass

        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        events = [line["event"] for line in lines]
        assert "pushd ready" in events and "pushd stopped" in events
        (rejected,) = [line for line in lines if line["event"] == "reload rejected; old config kept"]
        assert rejected["file"] == str(cfg)
        assert any(p.startswith("supervisor.backof_max: ") for p in rejected["problems"]), rejected
        assert not sock.exists()
        assert pushctl(sock, "ping").returncode == 3
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()


def test_signals_during_drain_never_kill_the_process(short_tmp: Path) -> None:
    cfg = short_tmp / "pushd.toml"
    cfg.write_text(CONFIG.format(nodes=2))
    sock = short_tmp / "ctl.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pushd.cli", "run", "--config", str(cfg)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        wait_ready(sock, proc)
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGHUP)  # a `systemctl reload` racing the stop: ignored
        proc.send_signal(signal.SIGTERM)  # second stop signal: cancel at once, still exit 0
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert "pushd stopped" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
