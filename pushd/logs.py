"""Logging: structlog configuration, a runtime level, and redaction.

``configure_logging()`` is called once at start-up. Output is JSON lines when
the stream is not a terminal (journald, files, pipes) and readable console
lines on a terminal. ``set_level()`` changes the level later (config reload)
without touching anything else: every logger, cached or not, consults one
small shared :class:`_LevelGate`.

Library code that logs through the standard ``logging`` module is routed to
the same stream and format, at WARNING and above.

Device tokens and keys must never reach the log in full, even by mistake: a
redaction processor shortens values of sensitive keys (``token``, ``key``,
``*_secret``, ...), and wherever they appear in a string value: long hex runs
(device tokens, digests: ≥ 32 hex digits), PEM blocks and JWTs.
"""

from __future__ import annotations

import io
import logging
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger

__all__ = ["configure_logging", "redact", "redact_event", "set_level"]

_LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

# The level methods of a FilteringBoundLogger (``exception`` goes through
# ``error``).
_METHOD_LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "msg": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
    "fatal": logging.CRITICAL,
}

SENSITIVE_KEYS = frozenset(
    {"token", "device_token", "authorization", "key", "secret", "password", "p8"}
)
SENSITIVE_SUFFIXES = ("_token", "_secret", "_password")
# Keys whose value may be identified by a short prefix (a device token); the
# others (secrets) show none of their content.
_PREFIX_KEYS = frozenset({"token", "device_token"})

_HEX_RUN = re.compile(r"[0-9a-fA-F]{32,}")
_PEM_BLOCK = re.compile(
    r"-----BEGIN ([A-Z0-9 ]+)-----.*?(?:-----END \1-----|\Z)",
    re.DOTALL,
)
# A JWT (e.g. the APNs provider token): a bearer credential for up to an hour.
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]+")
_MAX_DEPTH = 4


class _LevelGate:
    """The minimum level, read by every bound logger and by stdlib logging."""

    def __init__(self) -> None:
        self.level = logging.INFO
        self.stdlib_handler: logging.Handler | None = None


_gate = _LevelGate()


def _make_gated_logger_class() -> type[FilteringBoundLogger]:
    """structlog's FilteringBoundLogger, with the level test made at call time.

    ``make_filtering_bound_logger(level)`` bakes the level into the class, so
    cached loggers never see a change. This subclass of the DEBUG variant
    compares against ``_gate.level`` first: a dropped call costs one integer
    comparison, before any event dict is built. Everything else (binding,
    interpolation, ``exception``) is structlog's own.
    """
    base = structlog.make_filtering_bound_logger(logging.DEBUG)

    def gate(name: str, level: int) -> Callable[..., Any]:
        inner = getattr(base, name)

        def meth(self: Any, event: str, *args: Any, **kw: Any) -> Any:
            if level < _gate.level:
                return None
            return inner(self, event, *args, **kw)

        async def ameth(self: Any, event: str, *args: Any, **kw: Any) -> Any:
            if level < _gate.level:
                return None
            return await inner(self, event, *args, **kw)

        return ameth if name.startswith("a") else meth

    def log(self: Any, level: int, event: str, *args: Any, **kw: Any) -> Any:
        if level < _gate.level:
            return None
        return base.log(self, level, event, *args, **kw)

    methods: dict[str, Any] = {"log": log}
    for name, level in _METHOD_LEVELS.items():
        methods[name] = gate(name, level)
        methods["a" + name] = gate("a" + name, level)
    # `exception` calls self.error, which is gated; alog is asyncio-only.
    return type("PushdBoundLogger", (base,), methods)


_GatedLogger = _make_gated_logger_class()


def _parse_level(level: str) -> int:
    try:
        return _LEVELS[level.lower()]
    except (KeyError, AttributeError):
        raise ValueError(
            f"unknown log level {level!r}; expected one of debug, info, warning, error, critical"
        ) from None


def set_level(level: str) -> None:
    """Change the minimum level at runtime; ValueError for an unknown name."""
    number = _parse_level(level)
    _gate.level = number
    stdlib_level = max(number, logging.WARNING)
    logging.getLogger().setLevel(stdlib_level)
    if _gate.stdlib_handler is not None:
        # Also on the handler: a library may lower its own logger's level.
        _gate.stdlib_handler.setLevel(stdlib_level)


def redact(value: str, keep: int = 8) -> str:
    """Shorten a secret-ish string to a prefix and its length: ``a1b2c3d4…(64)``.

    At most half of the value is ever shown, so a short value is not revealed
    whole.
    """
    shown = value[: min(keep, len(value) // 2)]
    return f"{shown}…({len(value)})"


def _redact_pem(match: re.Match[str]) -> str:
    return f"-----BEGIN {match.group(1)}-----…({len(match.group(0))})"


def _redact_match(match: re.Match[str]) -> str:
    return redact(match.group(0))


def _scrub_str(value: str) -> str:
    if len(value) < 32:  # too short for any pattern below: the common case
        return value
    if "-----BEGIN " in value:
        value = _PEM_BLOCK.sub(_redact_pem, value)
    if "eyJ" in value:
        value = _JWT.sub(_redact_match, value)
    return _HEX_RUN.sub(_redact_match, value)


def _scrub(value: Any, depth: int) -> Any:
    if isinstance(value, str):
        return _scrub_str(value)
    if depth >= _MAX_DEPTH:
        return value
    if isinstance(value, Mapping):
        return {k: _scrub_item(k, v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v, depth + 1) for v in value]
    return value


def _scrub_item(key: object, value: Any, depth: int) -> Any:
    name = key.lower() if isinstance(key, str) else ""
    if name in SENSITIVE_KEYS or name.endswith(SENSITIVE_SUFFIXES):
        if value is None:
            return None
        if isinstance(value, bytes | bytearray):
            text = bytes(value).hex()
        elif isinstance(value, str):
            text = value
        else:
            text = str(value)
        keep = 8 if name in _PREFIX_KEYS or name.endswith("_token") else 0
        return redact(text, keep=keep)
    return _scrub(value, depth)


def redact_event(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """structlog processor: redact sensitive keys, hex tokens and PEM blocks."""
    for key, value in event_dict.items():
        event_dict[key] = _scrub_item(key, value, 0)
    return event_dict


def _redacting_traceback(sio: TextIO, exc_info: Any) -> None:
    """Console exception formatter: a plain traceback with tokens redacted."""
    buffer = io.StringIO()
    structlog.dev.plain_traceback(buffer, exc_info)
    sio.write(_scrub_str(buffer.getvalue()))


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO = sys.stdout) -> None:
    """Configure structlog (and stdlib logging) to write to *stream*.

    fmt: ``"auto"`` (JSON when *stream* is not a TTY, console otherwise),
    ``"json"`` or ``"console"``. May be called again; it replaces the previous
    configuration.
    """
    if fmt == "auto":
        fmt = "console" if _isatty(stream) else "json"
    if fmt not in ("json", "console"):
        raise ValueError(f"unknown log format {fmt!r}; expected auto, json or console")
    _parse_level(level)  # fail before changing anything

    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    renderer: Processor
    if fmt == "json":
        # Exceptions are rendered to text before redaction so that a token in
        # an exception message is redacted too.
        tail: list[Processor] = [structlog.processors.format_exc_info, redact_event]
        renderer = structlog.processors.JSONRenderer()
    else:
        tail = [redact_event]
        renderer = structlog.dev.ConsoleRenderer(
            colors=_isatty(stream), exception_formatter=_redacting_traceback
        )

    structlog.configure(
        processors=[*shared, *tail, renderer],
        wrapper_class=_GatedLogger,
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        context_class=dict,
        cache_logger_on_first_use=True,
    )

    # stdlib logging → the same stream and format, WARNING and above.
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *tail,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    if _gate.stdlib_handler is not None:
        root.removeHandler(_gate.stdlib_handler)
    root.addHandler(handler)
    _gate.stdlib_handler = handler
    set_level(level)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
