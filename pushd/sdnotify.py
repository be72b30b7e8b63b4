"""The systemd notification protocol (sd_notify), spoken directly.

systemd passes ``NOTIFY_SOCKET`` to a ``Type=notify`` service: the path of an
``AF_UNIX``/``SOCK_DGRAM`` socket, or an abstract name written with a leading
``@``. A notification is one datagram of newline-separated ``KEY=value``
assignments (see sd_notify(3)). No libsystemd is needed for that.

A :class:`Notifier` made from an environment without ``NOTIFY_SOCKET`` is
disabled: every method is a no-op, so the daemon calls it unconditionally.
Sending never raises: systemd going away must not take the daemon with it.
The first failure is logged as a warning, later ones silently dropped.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

import structlog


class Notifier:
    """Sends sd_notify datagrams to one address; disabled when it has none."""

    def __init__(
        self,
        address: str | None,
        *,
        watchdog_usec: int | None = None,
    ) -> None:
        # `address` is the socket address as the kernel wants it: a path, or an
        # abstract name starting with NUL (use from_environ to parse "@name").
        self.address = address
        self.enabled = address is not None
        self._watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None
        self._warned = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        """Build from ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``."""
        raw = environ.get("NOTIFY_SOCKET", "")
        address: str | None
        if not raw:
            address = None
        elif raw.startswith("@"):
            address = "\0" + raw[1:]
        elif raw.startswith("/"):
            address = raw
        else:
            # vsock:... and relative paths are not supported by pushd.
            structlog.get_logger(__name__).warning(
                "sd_notify address not supported, notifications disabled", notify_socket=raw
            )
            address = None
        return cls(address, watchdog_usec=_watchdog_usec(environ))

    def send(self, **fields: str | int) -> None:
        """Send one datagram ``KEY=value\\n...`` in the order given."""
        address = self.address
        if address is None or not fields:
            return
        lines = []
        for key, value in fields.items():
            # A newline inside a value would start a new assignment.
            text = str(value).replace("\n", " ")
            lines.append(f"{key}={text}\n")
        datagram = "".join(lines).encode("utf-8")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                # Never block the trio loop: a full receive queue is a failure.
                self._sock.setblocking(False)
            self._sock.sendto(datagram, address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                # Looked up here, not at import: this path is rare, and a logger
                # cached before logging is configured would keep a stale setup.
                structlog.get_logger(__name__).warning(
                    "sd_notify failed; further failures are not logged",
                    error=repr(exc),
                    fields=sorted(fields),
                )

    def ready(self, status: str | None = None) -> None:
        """Tell systemd start-up is finished (``READY=1``)."""
        if status is None:
            self.send(READY=1)
        else:
            self.send(READY=1, STATUS=status)

    def reloading(self) -> None:
        """Tell systemd a reload started; call :meth:`ready` when it is done."""
        monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send(RELOADING=1, MONOTONIC_USEC=monotonic_usec)

    def stopping(self, status: str | None = None) -> None:
        """Tell systemd shutdown started (``STOPPING=1``)."""
        if status is None:
            self.send(STOPPING=1)
        else:
            self.send(STOPPING=1, STATUS=status)

    def status(self, text: str) -> None:
        """Set the free-form status line shown by ``systemctl status``."""
        self.send(STATUS=text)

    def watchdog(self) -> None:
        """Ping the watchdog (``WATCHDOG=1``)."""
        self.send(WATCHDOG=1)

    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings (half of ``WATCHDOG_USEC``), or None."""
        if not self.enabled or self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def close(self) -> None:
        """Close the socket (a later send opens a new one)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _watchdog_usec(environ: Mapping[str, str]) -> int | None:
    """WATCHDOG_USEC as a positive int, or None when absent, bad or not for us."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = environ.get("WATCHDOG_PID")
    if pid is not None:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return usec
