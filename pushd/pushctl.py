"""pushctl: talk to a running pushd over its control socket.

    pushctl [--socket PATH | --config FILE] [--json] [--timeout S] COMMAND [ARGS]

Each daemon op is one subcommand, defined by one :class:`Command` entry in ``COMMANDS``.
Output is readable text on a terminal and JSON otherwise (or always with ``--json``).

Exit status: 0 success, 1 the daemon answered with an error, 2 usage error,
3 the daemon could not be reached (the message names the socket path tried).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from pushd.client import Client, ConnectionFailed, RequestFailed, default_socket_path

EXIT_OK = 0
EXIT_ERROR_REPLY = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    pass


@dataclass(frozen=True)
class Command:
    """One subcommand: the op it calls, how to read its arguments and how to show its result.

    Adding an op is one entry in ``COMMANDS``, for example::

        Command("device", "show one device", render_key_values,
                add_arguments=lambda p: p.add_argument("device_id"),
                build_args=lambda ns: {"device_id": ns.device_id})

    ``build_args`` may raise :class:`UsageError` (exit status 2).
    """

    name: str
    help: str
    render: Callable[[Any], str]
    op: str | None = None  # defaults to name
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    build_args: Callable[[argparse.Namespace], dict[str, Any]] = lambda ns: {}
    show_elapsed: bool = False  # append the round-trip time to the readable output


# -- renderers: result -> readable text ------------------------------------------------------


def render_ping(result: Any) -> str:
    return "pong" if isinstance(result, Mapping) and result.get("pong") else _render_value(result)


def render_status(result: Any) -> str:
    """Top-level scalars as ``key: value`` lines, then a table of actors."""
    if not isinstance(result, Mapping):
        return _render_value(result)
    lines = [f"{key}: {_scalar(value)}" for key, value in result.items() if key != "actors"]
    actors = _actor_rows(result.get("actors"))
    if actors:
        header = ("ACTOR", "STATE", "RESTARTS", "LAST ERROR")
        rows = [header, *actors]
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        if lines:
            lines.append("")
        for row in rows:
            cells = [row[i].ljust(widths[i]) for i in range(3)]
            lines.append("  ".join([*cells, row[3]]).rstrip())
    return "\n".join(lines)


def render_key_values(result: Any) -> str:
    """Nested maps flattened to dotted ``key: value`` lines, aligned."""
    if not isinstance(result, Mapping):
        return _render_value(result)
    pairs = list(_flatten(result))
    if not pairs:
        return "(nothing)"
    width = max(len(key) for key, _ in pairs)
    return "\n".join(f"{key.ljust(width)}  {value}" for key, value in pairs)


def render_reload(result: Any) -> str:
    if isinstance(result, Mapping) and result:
        return "reloaded\n" + render_key_values(result)
    return "reloaded"


def _actor_rows(actors: Any) -> list[tuple[str, str, str, str]]:
    if isinstance(actors, Mapping):
        items = [(str(name), info) for name, info in actors.items()]
    elif isinstance(actors, list):
        items = [
            (str(info.get("name", "?")) if isinstance(info, Mapping) else "?", info)
            for info in actors
        ]
    else:
        return []
    rows = []
    for name, info in items:
        if not isinstance(info, Mapping):
            rows.append((name, _scalar(info), "", ""))
            continue
        rows.append((
            name,
            _scalar(info.get("state", "")),
            _scalar(info.get("restarts", "")),
            _scalar(info.get("last_error") or "-"),
        ))
    return rows


def _flatten(value: Mapping[Any, Any], prefix: str = "") -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for key, item in value.items():
        name = f"{prefix}{key}"
        if isinstance(item, Mapping) and item:
            pairs.extend(_flatten(item, name + "."))
        else:
            pairs.append((name, _scalar(item)))
    return pairs


def _scalar(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".")
    if isinstance(value, str | int):
        return str(value)
    return _to_json(value, indent=None)


def _render_value(value: Any) -> str:
    return value if isinstance(value, str) else _to_json(value, indent=2)


def _to_json(value: Any, *, indent: int | None = 2) -> str:
    return json.dumps(value, indent=indent, sort_keys=False, default=_json_default, ensure_ascii=False)


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


# -- the command table -----------------------------------------------------------------------

COMMANDS: tuple[Command, ...] = (
    Command("ping", "check that the daemon answers", render_ping, show_elapsed=True),
    Command("status", "show the daemon's state and its actors", render_status),
    Command("stats", "show the daemon's counters", render_key_values),
    Command("reload", "re-read the configuration", render_reload),
)


def build_parser() -> argparse.ArgumentParser:
    # Global options are accepted before or after the subcommand; SUPPRESS keeps the
    # subcommand's copy from overwriting a value given before it.
    common = argparse.ArgumentParser(add_help=False)
    where = common.add_mutually_exclusive_group()
    where.add_argument("--socket", type=Path, default=argparse.SUPPRESS, metavar="PATH",
                       help="control socket path (default: $PUSHD_SOCKET, "
                            "$RUNTIME_DIRECTORY/control.sock, ./var/run/control.sock "
                            "or /run/pushd/control.sock)")
    where.add_argument("--config", type=Path, default=argparse.SUPPRESS, metavar="FILE",
                       help="read the socket path from this pushd config file")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print JSON even on a terminal")
    common.add_argument("--timeout", type=float, default=argparse.SUPPRESS, metavar="SECONDS",
                        help="how long to wait for the daemon (default 10)")

    parser = argparse.ArgumentParser(
        prog="pushctl", parents=[common],
        description="Control a running pushd through its control socket.",
        epilog="exit status: 0 ok, 1 error reply, 2 usage error, 3 daemon unreachable",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        sub = subparsers.add_parser(command.name, parents=[common], help=command.help,
                                    description=command.help)
        if command.add_arguments is not None:
            command.add_arguments(sub)
        sub.set_defaults(_command=command)
    return parser


def resolve_socket(ns: argparse.Namespace) -> Path:
    socket_path: Path | None = getattr(ns, "socket", None)
    if socket_path is not None:
        return socket_path
    config_path: Path | None = getattr(ns, "config", None)
    if config_path is None:
        return default_socket_path()
    try:
        from pushd.config import load_config  # the daemon's config module, loaded lazily
    except ImportError as exc:
        raise UsageError(f"--config is not available ({exc}); use --socket PATH") from exc
    try:
        return load_config(config_path).socket_path
    except Exception as exc:  # ConfigError, OSError
        raise UsageError(f"cannot read the socket path from {config_path}: {exc}") from exc


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed usage or help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    command: Command = ns._command
    as_json = getattr(ns, "json", False) or not _stdout_is_terminal()
    try:
        socket_path = resolve_socket(ns)
        args = command.build_args(ns)
    except UsageError as exc:
        print(f"pushctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    started = time.monotonic()
    try:
        with Client(socket_path, timeout=getattr(ns, "timeout", 10.0)) as client:
            result = client.call(command.op or command.name, **args)
    except ConnectionFailed as exc:
        print(f"pushctl: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except RequestFailed as exc:
        if as_json:
            _print(sys.stdout, _to_json({"error": {
                "code": exc.code, "message": exc.message, "field": exc.field,
                "details": exc.details,
            }}))
        print(f"pushctl: {command.name} failed: {exc}", file=sys.stderr)
        return EXIT_ERROR_REPLY
    if as_json:
        _print(sys.stdout, _to_json(result))
    else:
        text = command.render(result)
        if command.show_elapsed:
            text += f" ({(time.monotonic() - started) * 1000:.1f} ms)"
        _print(sys.stdout, text)
    return EXIT_OK


def _stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


def _print(stream: TextIO, text: str) -> None:
    stream.write(text + "\n")
    stream.flush()


if __name__ == "__main__":
    sys.exit(main())
