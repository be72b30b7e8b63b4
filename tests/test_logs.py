"""pushd.logs: formats, contextvars, runtime level, stdlib routing, redaction."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
import structlog

from pushd.logs import configure_logging, redact, set_level

TOKEN = "a1b2c3d4" * 8  # 64 hex digits, like an APNs device token
PEM = "-----BEGIN PRIVATE KEY-----\nMIGTAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBHkwdwIBAQQg\n-----END PRIVATE KEY-----"


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    root.handlers[:] = handlers
    root.setLevel(level)


def lines(buf: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def test_json_lines_carry_contextvars_level_and_utc_time() -> None:
    buf = io.StringIO()
    configure_logging("info", "json", buf)
    structlog.contextvars.bind_contextvars(node="node-1")
    structlog.get_logger().info("delivered", message_id=42)
    (event,) = lines(buf)
    assert event["event"] == "delivered"
    assert event["node"] == "node-1"
    assert event["message_id"] == 42
    assert event["level"] == "info"
    assert event["timestamp"].endswith("Z")
    datetime.fromisoformat(event["timestamp"])


def test_auto_is_json_when_not_a_tty() -> None:
    buf = io.StringIO()
    configure_logging(stream=buf)
    structlog.get_logger().warning("w")
    assert lines(buf)[0]["event"] == "w"


def test_auto_is_coloured_console_on_a_tty() -> None:
    buf = FakeTTY()
    configure_logging(stream=buf)
    structlog.contextvars.bind_contextvars(node="n7")
    structlog.get_logger().info("hello there")
    out = buf.getvalue()
    assert "\x1b[" in out  # ANSI colours
    plain = re.sub(r"\x1b\[[0-9;]*m", "", out)
    assert "hello there" in plain
    assert "node=n7" in plain
    assert "info" in plain
    with pytest.raises(json.JSONDecodeError):
        json.loads(out)


def test_console_without_tty_has_no_colours() -> None:
    buf = io.StringIO()
    configure_logging("info", "console", buf)
    structlog.get_logger().info("plain", a=1)
    out = buf.getvalue()
    assert "\x1b[" not in out
    assert "plain" in out and "a=1" in out


def test_set_level_changes_filtering_of_existing_loggers() -> None:
    buf = io.StringIO()
    configure_logging("info", "json", buf)
    log = structlog.get_logger()
    log.debug("d1")
    log.info("i1")
    set_level("debug")
    log.debug("d2")
    set_level("ERROR")
    log.warning("w1")
    log.error("e1")
    log.warn("w2")
    log.msg("m1")
    log.log(logging.INFO, "l1")
    log.exception("x1")
    log.critical("c1")
    log.fatal("f1")
    log.log(logging.ERROR, "l2")
    set_level("warning")
    log.warn("w3")
    assert [e["event"] for e in lines(buf)] == ["i1", "d2", "e1", "x1", "c1", "f1", "l2", "w3"]
    assert [e["level"] for e in lines(buf)][-4:] == ["critical", "critical", "error", "warning"]


def test_set_level_rejects_unknown_and_keeps_level() -> None:
    buf = io.StringIO()
    configure_logging("warning", "json", buf)
    with pytest.raises(ValueError, match="verbose"):
        set_level("verbose")
    log = structlog.get_logger()
    log.info("no")
    log.warning("yes")
    assert [e["event"] for e in lines(buf)] == ["yes"]


def test_configure_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        configure_logging("loud", "json", io.StringIO())
    with pytest.raises(ValueError):
        configure_logging("info", "xml", io.StringIO())


def test_stdlib_logging_routed_at_warning_and_above() -> None:
    buf = io.StringIO()
    configure_logging("debug", "json", buf)
    structlog.contextvars.bind_contextvars(node="n2")
    lib = logging.getLogger("some.library")
    lib.info("chatty")
    noisy = logging.getLogger("noisy.library")
    noisy.setLevel(logging.DEBUG)  # libraries do this; still WARNING+ only
    noisy.info("chatty too")
    lib.warning("careful %s", "now")
    (event,) = lines(buf)
    assert event["event"] == "careful now"
    assert event["level"] == "warning"
    assert event["logger"] == "some.library"
    assert event["node"] == "n2"
    set_level("error")
    lib.warning("dropped")
    lib.error("kept")
    assert [e["event"] for e in lines(buf)] == ["careful now", "kept"]
    noisy.setLevel(logging.NOTSET)


def test_reconfigure_does_not_duplicate_stdlib_output() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging("info", "json", first)
    configure_logging("info", "json", second)
    logging.getLogger("lib").error("once")
    assert first.getvalue() == ""
    assert [e["event"] for e in lines(second)] == ["once"]


def test_redact_helper() -> None:
    assert redact(TOKEN) == "a1b2c3d4…(64)"
    assert redact(TOKEN, keep=4) == "a1b2…(64)"
    assert redact("hunter2") == "hun…(7)"  # never more than half
    assert redact("") == "…(0)"


def test_sensitive_keys_hex_runs_and_pem_are_redacted() -> None:
    buf = io.StringIO()
    configure_logging("info", "json", buf)
    structlog.get_logger().info(
        f"sending to {TOKEN} now",
        token=TOKEN,
        device_token=TOKEN,
        authorization="bearer eyJhbGciOiJFUzI1NiJ9.payload.sig",
        key=PEM,
        secret="s3cr3t",
        password="hunter2",
        p8=b"\x01\x02\x03",
        note=f"key follows {PEM} end",
        nested={"headers": {"Authorization": "bearer abc"}, "ids": [TOKEN]},
        count=3,
    )
    (event,) = lines(buf)
    raw = buf.getvalue()
    assert TOKEN not in raw
    assert "MIGTAgEAMBMG" not in raw
    for secret in ("eyJhbGciOiJFUzI1NiJ9", "s3cr3t", "hunter2", "010203", "bearer abc"):
        assert secret not in raw
    assert event["event"] == "sending to a1b2c3d4…(64) now"
    assert event["token"] == event["device_token"] == "a1b2c3d4…(64)"
    assert event["password"] == "…(7)"
    assert event["key"] == f"…({len(PEM)})"
    assert event["note"].startswith("key follows -----BEGIN PRIVATE KEY-----…(")
    assert event["note"].endswith(" end")
    assert event["nested"]["ids"] == ["a1b2c3d4…(64)"]
    assert event["count"] == 3


def test_short_hex_and_uuids_are_left_alone() -> None:
    buf = io.StringIO()
    configure_logging("info", "json", buf)
    apns_id = "0f8e3c4a-2b1d-4c5e-9f00-123456789abc"
    structlog.get_logger().info("ok", apns_id=apns_id, short="deadbeef")
    (event,) = lines(buf)
    assert event["apns_id"] == apns_id
    assert event["short"] == "deadbeef"


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_token_in_exception_is_redacted(fmt: str) -> None:
    buf = io.StringIO()
    configure_logging("info", fmt, buf)
    try:
        raise KeyError(TOKEN)
    except KeyError:
        structlog.get_logger().exception("lookup failed")
    out = buf.getvalue()
    assert "lookup failed" in out
    assert "KeyError" in out
    assert TOKEN not in out
    assert "a1b2c3d4…(64)" in out or "a1b2c3d4\\u2026(64)" in out


def test_stdlib_records_are_redacted() -> None:
    buf = io.StringIO()
    configure_logging("info", "json", buf)
    logging.getLogger("h2").warning("stream for %s reset", TOKEN)
    assert TOKEN not in buf.getvalue()
    assert lines(buf)[0]["event"] == "stream for a1b2c3d4…(64) reset"


def test_jwts_and_suffixed_keys_are_redacted() -> None:
    jwt = "eyJhbGciOiJFUzI1NiIsImtpZCI6IkFCQzEyM0RFRkcifQ.eyJpc3MiOiJERUYxMjNHSElKIn0.c2lnbmF0dXJl"
    buf = io.StringIO()
    configure_logging("info", "json", buf)
    structlog.get_logger().info(
        f"refreshed provider token {jwt}",
        push_token="0123abcd",
        client_secret="topsecret",
        cert_password="pw123456",
        key_id="ABC123DEFG",
    )
    (event,) = lines(buf)
    assert jwt not in buf.getvalue()
    assert event["event"] == f"refreshed provider token eyJhbGci…({len(jwt)})"
    assert event["push_token"] == "0123…(8)"
    assert event["client_secret"] == "…(9)"
    assert event["cert_password"] == "…(8)"
    assert event["key_id"] == "ABC123DEFG"  # an identifier, not a secret
