"""pushd.sdnotify against real AF_UNIX datagram sockets."""

from __future__ import annotations

import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from pushd.sdnotify import Notifier


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket standing in for systemd, and its NOTIFY_SOCKET."""
    path = tmp_path / "notify.sock"
    if len(os.fsencode(path)) >= 100:  # sun_path is 108 bytes
        path = Path(tempfile.mkdtemp(prefix="sdn")) / "n.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    yield sock, str(path)
    sock.close()


def received(sock: socket.socket) -> list[bytes]:
    """Every datagram waiting on sock, in arrival order."""
    out = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(4096))
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(5)
    return out


def test_disabled_without_notify_socket() -> None:
    n = Notifier.from_environ({})
    assert not n.enabled
    n.ready("x")
    n.watchdog()
    n.send(FOO="bar")
    assert n.watchdog_interval() is None


def test_exact_datagrams_in_order(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    n = Notifier.from_environ({"NOTIFY_SOCKET": path})
    assert n.enabled
    n.ready()
    n.ready("serving")
    n.status("3 nodes")
    n.watchdog()
    n.stopping()
    n.stopping("draining")
    n.send(ERRNO=5, STATUS="line1\nline2")
    n.close()
    assert received(sock) == [
        b"READY=1\n",
        b"READY=1\nSTATUS=serving\n",
        b"STATUS=3 nodes\n",
        b"WATCHDOG=1\n",
        b"STOPPING=1\n",
        b"STOPPING=1\nSTATUS=draining\n",
        b"ERRNO=5\nSTATUS=line1 line2\n",
    ]


def test_reloading_carries_monotonic_usec(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    n = Notifier.from_environ({"NOTIFY_SOCKET": path})
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    n.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    (datagram,) = received(sock)
    lines = datagram.decode().splitlines()
    assert lines[0] == "RELOADING=1"
    key, _, value = lines[1].partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after
    assert len(lines) == 2


def test_abstract_socket_name() -> None:
    name = f"pushd-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        n = Notifier.from_environ({"NOTIFY_SOCKET": "@" + name})
        assert n.enabled
        n.ready("up")
        assert sock.recv(4096) == b"READY=1\nSTATUS=up\n"
        n.close()


def test_send_failure_never_raises_and_warns_once(tmp_path: Path) -> None:
    n = Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "absent.sock")})
    assert n.enabled
    with structlog.testing.capture_logs() as logs:
        n.ready()
        n.watchdog()
        n.stopping()
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 1
    assert "sd_notify failed" in warnings[0]["event"]


def test_unsupported_address_disables() -> None:
    with structlog.testing.capture_logs() as logs:
        n = Notifier.from_environ({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not n.enabled
    assert logs and logs[0]["log_level"] == "warning"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "nope"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "abc"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    n = Notifier.from_environ({"NOTIFY_SOCKET": "/run/nowhere", **env})
    assert n.watchdog_interval() == expected


def test_watchdog_interval_none_when_disabled() -> None:
    assert Notifier.from_environ({"WATCHDOG_USEC": "30000000"}).watchdog_interval() is None
