"""pushctl: talk to a running pushd over its control socket.

    pushctl [--socket PATH | --config FILE] [--json] [--timeout S] COMMAND [ARGS]

Each daemon op is one subcommand, defined by one :class:`Command` entry in ``COMMANDS``.
Output is readable text on a terminal and JSON otherwise (or always with ``--json``).

Exit status: 0 success, 1 the daemon answered with an error, 2 usage error,
3 the daemon could not be reached (the message names the socket path tried),
4 ``push --wait`` gave up after ``--wait-timeout`` with items still pending.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import msgpack

from pushd.client import (
    Client,
    ConnectionFailed,
    RequestFailed,
    WaitTimeout,
    default_socket_path,
)

EXIT_OK = 0
EXIT_ERROR_REPLY = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_WAIT_TIMEOUT = 4  # push --wait: still pending when --wait-timeout expired
RELOAD_TIMEOUT = 60.0  # seconds pushctl reload waits by default (a reload may start nodes)
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
    # Instead of one ``client.call(op, **args)``: a function doing several calls (batches,
    # following a push). It returns the result to print or raises CommandFailed.
    run: Callable[[Client, argparse.Namespace, dict[str, Any], Session], Any] | None = None


@dataclass(frozen=True)
class Session:
    """What a ``Command.run`` function needs to know about the invocation."""

    as_json: bool
    progress: Callable[[str, bool], None]  # (line, final) -> shown on stderr as suits it
    stderr_is_terminal: bool


class CommandFailed(Exception):
    """A ``Command.run`` function ending with a non-zero exit status; ``result`` (if not
    None) is still printed, ``message`` goes to stderr."""

    def __init__(self, exit_code: int, message: str, result: Any = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.message = message
        self.result = result


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


# -- the push pipeline: argument parsing -----------------------------------------------------

REGISTER_MANY_BATCH = 1000  # the daemon's limit per register_many request
REGISTER_MANY_BYTES = 768 << 10  # stay well under the daemon's default 1 MiB request frame
FINAL_COUNTED = ("sent", "failed", "skipped", "dead", "expired")
PROGRESS_LINE_INTERVAL = 5.0  # seconds between plain progress lines when stderr is no terminal


def parse_value(text: str) -> Any:
    """JSON-ish: ``3`` -> 3, ``true`` -> True, ``[1,"a"]`` -> a list, ``"3"`` -> "3";
    anything that is not JSON stays the string it is (``gold`` -> "gold")."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_pairs(items: list[str] | None, flag: str) -> dict[str, Any]:
    """Repeated ``KEY=VALUE`` options as a map, values through :func:`parse_value`."""
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{flag} expects KEY=VALUE, got {item!r}")
        out[key.strip()] = parse_value(value)
    return out


def parse_json_option(text: str, flag: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise UsageError(f"{flag} is not valid JSON: {exc}") from None


def parse_time(text: str, flag: str) -> float:
    """Unix seconds, or an ISO 8601 time (a time without zone is UTC)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"{flag} expects unix seconds or an ISO 8601 time, got {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _read_text(source: str, what: str) -> str:
    try:
        if source == "-":
            return sys.stdin.read()
        return Path(source).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {what} {source}: {exc}") from None


REGISTER_TEXT_FIELDS = (
    "token", "environment", "topic", "model", "os_version", "app_version", "locale",
    "time_zone", "user_id",
)


def _add_register_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("device_id", metavar="DEVICE", help="the app's id for this device")
    p.add_argument("--token", help="the APNs device token (hex)")
    p.add_argument("--environment", metavar="ENV", help="production (default) or sandbox")
    p.add_argument("--topic", help="the app's bundle id")
    p.add_argument("--model", help="e.g. iPhone15,2")
    p.add_argument("--os-version", dest="os_version", metavar="VERSION")
    p.add_argument("--app-version", dest="app_version", metavar="VERSION")
    p.add_argument("--locale", help="e.g. en_US")
    p.add_argument("--time-zone", dest="time_zone", metavar="ZONE", help="IANA, e.g. Europe/Berlin")
    p.add_argument("--user", dest="user_id", metavar="USER", help="the user the device belongs to")
    p.add_argument("--contact", dest="contact_ids", action="append", metavar="ID",
                   help="a contact id of the user (repeatable)")
    p.add_argument("--attr", action="append", metavar="KEY=VALUE",
                   help="a user attribute, value JSON or text (repeatable)")
    p.add_argument("--no-alert", action="store_true", help="the user disallowed alerts")
    p.add_argument("--no-background", action="store_true", help="no background pushes")
    p.add_argument("--allow-category", action="append", metavar="CATEGORY",
                   help="only these categories are allowed (repeatable)")
    p.add_argument("--refuse-category", action="append", metavar="CATEGORY",
                   help="a refused category (repeatable)")
    p.add_argument("--consent-event", action="append", metavar="KIND",
                   help="the user consents to analysis of this event kind (repeatable)")


def register_args(ns: argparse.Namespace) -> dict[str, Any]:
    """The ``register`` arguments from pushctl flags; the daemon validates the values."""
    args: dict[str, Any] = {"device_id": ns.device_id}
    for name in REGISTER_TEXT_FIELDS:
        value = getattr(ns, name)
        if value is not None:
            args[name] = value
    if ns.contact_ids:
        args["contact_ids"] = list(ns.contact_ids)
    if ns.attr:
        args["attributes"] = parse_pairs(ns.attr, "--attr")
    permissions: dict[str, Any] = {}
    if ns.no_alert:
        permissions["alert"] = False
    if ns.no_background:
        permissions["background"] = False
    if ns.allow_category:
        permissions["categories_allowed"] = list(ns.allow_category)
    if ns.refuse_category:
        permissions["categories_refused"] = list(ns.refuse_category)
    both = set(ns.allow_category or ()) & set(ns.refuse_category or ())
    if both:
        raise UsageError(f"category {sorted(both)[0]!r} is both allowed and refused")
    if permissions:
        args["permissions"] = permissions
    if ns.consent_event:
        args["consent"] = {"events": True, "event_kinds": list(ns.consent_event)}
    return args


def _add_register_many_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE",
                   help="registrations as JSON lines or one JSON array ('-': stdin)")
    p.add_argument("--batch", type=int, default=REGISTER_MANY_BATCH, metavar="N",
                   help=f"devices per request (1..{REGISTER_MANY_BATCH}, default {REGISTER_MANY_BATCH})")


def register_many_args(ns: argparse.Namespace) -> dict[str, Any]:
    if not 1 <= ns.batch <= REGISTER_MANY_BATCH:
        raise UsageError(f"--batch must be within 1..{REGISTER_MANY_BATCH}")
    text = _read_text(ns.file, "registrations file")
    return {"devices": parse_registrations(text, ns.file)}


def parse_registrations(text: str, source: str = "-") -> list[dict[str, Any]]:
    """A JSON array of registration maps, or one map per line (blank lines ignored)."""
    devices: list[Any]
    if text.lstrip().startswith("["):
        try:
            devices = json.loads(text)
        except ValueError as exc:
            raise UsageError(f"{source}: not a valid JSON array: {exc}") from None
        where = [f"{source}: entry {i + 1}" for i in range(len(devices))]
    else:
        devices, where = [], []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                devices.append(json.loads(line))
            except ValueError as exc:
                raise UsageError(f"{source}:{number}: not valid JSON: {exc}") from None
            where.append(f"{source}:{number}")
    for item, place in zip(devices, where, strict=True):
        if not isinstance(item, dict):
            raise UsageError(f"{place}: a registration must be a JSON object")
    if not devices:
        raise UsageError(f"{source}: no registrations")
    return devices


def batches(devices: list[dict[str, Any]], size: int, max_bytes: int = REGISTER_MANY_BYTES) -> list[tuple[int, list[dict[str, Any]]]]:
    """(offset, batch) pairs: at most ``size`` devices and about ``max_bytes`` encoded each."""
    out: list[tuple[int, list[dict[str, Any]]]] = []
    current: list[dict[str, Any]] = []
    start, used = 0, 0
    for i, device in enumerate(devices):
        cost = len(msgpack.packb(device, use_bin_type=True, default=str))
        if current and (len(current) >= size or used + cost > max_bytes):
            out.append((start, current))
            start, current, used = i, [], 0
        current.append(device)
        used += cost
    if current:
        out.append((start, current))
    return out


_ENTRY_FIELD = re.compile(r"^devices\[(\d+)\]")


def _renumber(field: str, offset: int) -> str:
    """``devices[3].locale`` of a batch starting at entry ``offset`` -> the file's index."""
    return _ENTRY_FIELD.sub(lambda m: f"devices[{int(m.group(1)) + offset}]", field)


def run_register_many(client: Client, ns: argparse.Namespace, args: dict[str, Any], session: Session) -> Any:
    """Send the file in batches; an error names the entry by its position in the file."""
    registered, changes, requests = 0, Counter[str](), 0
    for offset, batch in batches(args["devices"], ns.batch):
        try:
            result = client.register_many(batch)
        except RequestFailed as exc:
            field = exc.field
            message = exc.message
            if field is not None:
                renumbered = _renumber(field, offset)
                message = message.replace(field, renumbered)
                field = renumbered
            details = {**exc.details, "registered_before": registered}
            if registered:
                message += f" ({registered} devices of earlier batches were registered)"
            raise RequestFailed(exc.code, message, field, details) from None
        requests += 1
        registered += int(result.get("registered", 0))
        changes.update(result.get("changes", {}))
        if len(args["devices"]) > ns.batch:
            session.progress(f"registered {registered} of {len(args['devices'])}", False)
    session.progress("", True)
    return {"registered": registered, "changes": dict(changes), "requests": requests}


def _add_push_arguments(p: argparse.ArgumentParser) -> None:
    what = p.add_argument_group("the notification")
    what.add_argument("--title", help="alert title")
    what.add_argument("--body", help="alert body")
    what.add_argument("--alert", metavar="TEXT", help="a plain text alert (instead of --title/--body)")
    what.add_argument("--badge", type=int, metavar="N")
    what.add_argument("--sound", metavar="NAME")
    what.add_argument("--category", help="the notification category (aps.category)")
    what.add_argument("--topic", help="the app's bundle id (required unless in --payload)")
    what.add_argument("--push-type", dest="push_type", metavar="TYPE",
                      help="alert (default), background, voip, ...")
    what.add_argument("--custom", action="append", metavar="KEY=VALUE",
                      help="a custom payload key beside aps, value JSON or text (repeatable)")
    what.add_argument("--payload", metavar="FILE",
                      help="the whole notification as JSON ('-': stdin); the flags above override it")
    who = p.add_argument_group("the target (exactly one kind)")
    who.add_argument("--device", dest="devices", action="append", metavar="ID", help="repeatable")
    who.add_argument("--user", dest="users", action="append", metavar="ID", help="repeatable")
    who.add_argument("--class", dest="classes", action="append", metavar="ID", help="repeatable")
    who.add_argument("--filter", metavar="RULE", help="a classification rule as JSON")
    who.add_argument("--all", action="store_true", help="every device of the topic")
    how = p.add_argument_group("delivery")
    how.add_argument("--priority", type=int, default=10, metavar="0..10",
                     help="queue priority (default 10)")
    when = how.add_mutually_exclusive_group()
    when.add_argument("--ttl", type=float, metavar="SECONDS", help="give up after this long")
    when.add_argument("--expiration", type=int, metavar="UNIX", help="give up at this time")
    how.add_argument("--follow-up", dest="follow_up", metavar="JSON",
                     help="re-push policy as a JSON object")
    how.add_argument("--wait", action="store_true",
                     help="follow the push until every item is final, with progress on stderr")
    how.add_argument("--wait-timeout", dest="wait_timeout", type=float, metavar="SECONDS",
                     help=f"with --wait: give up after this long (exit {EXIT_WAIT_TIMEOUT})")
    how.add_argument("--poll", type=float, metavar="SECONDS",
                     help="with --wait: how often to ask (default 0.2)")


def push_target(ns: argparse.Namespace) -> dict[str, Any]:
    given = {
        "--device": {"devices": ns.devices} if ns.devices else None,
        "--user": {"users": ns.users} if ns.users else None,
        "--class": {"classes": ns.classes} if ns.classes else None,
        "--filter": {"filter": parse_value(ns.filter)} if ns.filter is not None else None,
        "--all": {"all": True} if ns.all else None,
    }
    chosen = [flag for flag, target in given.items() if target is not None]
    if not chosen:
        raise UsageError("push needs a target: --device, --user, --class, --filter or --all")
    if len(chosen) > 1:
        raise UsageError(f"give one kind of target, not {' and '.join(chosen)}")
    target = given[chosen[0]]
    assert target is not None
    return target


def push_notification(ns: argparse.Namespace) -> dict[str, Any]:
    notification: dict[str, Any] = {}
    if ns.payload is not None:
        loaded = parse_json_option(_read_text(ns.payload, "payload"), f"--payload {ns.payload}")
        if not isinstance(loaded, dict):
            raise UsageError("--payload must hold a JSON object (the notification)")
        notification = loaded
    aps = dict(notification.get("aps") or {})
    if ns.alert is not None and (ns.title is not None or ns.body is not None):
        raise UsageError("give --alert or --title/--body, not both")
    if ns.alert is not None:
        aps["alert"] = ns.alert
    elif ns.title is not None or ns.body is not None:
        old = aps.get("alert")
        alert: dict[str, Any] = dict(old) if isinstance(old, dict) else {}
        if ns.title is not None:
            alert["title"] = ns.title
        if ns.body is not None:
            alert["body"] = ns.body
        aps["alert"] = alert
    for key, value in (("badge", ns.badge), ("sound", ns.sound), ("category", ns.category)):
        if value is not None:
            aps[key] = value
    if aps or "aps" in notification:
        notification["aps"] = aps
    if ns.topic is not None:
        notification["topic"] = ns.topic
    if not notification.get("topic"):
        raise UsageError("push needs --topic (the app's bundle id)")
    if ns.push_type is not None:
        notification["push_type"] = ns.push_type
    if ns.custom:
        notification["custom"] = {**(notification.get("custom") or {}), **parse_pairs(ns.custom, "--custom")}
    return notification


def push_args(ns: argparse.Namespace) -> dict[str, Any]:
    if ns.wait_timeout is not None and ns.wait_timeout <= 0:
        raise UsageError("--wait-timeout must be positive")
    if ns.poll is not None and ns.poll <= 0:
        raise UsageError("--poll must be positive")
    if (ns.wait_timeout is not None or ns.poll is not None) and not ns.wait:
        raise UsageError("--wait-timeout and --poll go with --wait")
    args: dict[str, Any] = {
        "notification": push_notification(ns),
        "target": push_target(ns),
        "priority": ns.priority,
    }
    if ns.ttl is not None:
        args["ttl"] = ns.ttl
    if ns.expiration is not None:
        args["expiration"] = ns.expiration
    if ns.follow_up is not None:
        follow_up = parse_json_option(ns.follow_up, "--follow-up")
        if not isinstance(follow_up, dict):
            raise UsageError("--follow-up must be a JSON object")
        args["follow_up"] = follow_up
    return args


def run_push(client: Client, ns: argparse.Namespace, args: dict[str, Any], session: Session) -> Any:
    accepted = client.push(**args)
    if not ns.wait:
        return accepted
    message_id = accepted["message_id"]
    try:
        final = client.wait(
            message_id,
            timeout=ns.wait_timeout,
            poll=ns.poll or 0.2,
            on_progress=lambda state: session.progress(progress_line(state), False),
        )
    except WaitTimeout as exc:
        session.progress(progress_line(exc.state), True)
        raise CommandFailed(EXIT_WAIT_TIMEOUT, str(exc), exc.state) from None
    except (ConnectionFailed, KeyboardInterrupt):
        session.progress("", True)
        print(f"pushctl: message {message_id} was accepted; follow it with "
              f"'pushctl message {message_id}'", file=sys.stderr)
        raise
    session.progress(progress_line(final), True)
    if final.get("fanout") == "failed":
        raise CommandFailed(
            EXIT_ERROR_REPLY,
            f"message {message_id}: fan-out failed, not every targeted device was queued",
            final,
        )
    return final


def _add_report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("user_id", metavar="USER")
    p.add_argument("name", metavar="NAME", help="the event's name, e.g. opened")
    p.add_argument("--device", dest="device_id", metavar="ID", help="the device it happened on")
    p.add_argument("--attr", action="append", metavar="KEY=VALUE",
                   help="an event attribute, value JSON or text (repeatable)")
    p.add_argument("--at", metavar="TIME", help="when (unix seconds or ISO 8601; default now)")


def report_args(ns: argparse.Namespace) -> dict[str, Any]:
    args: dict[str, Any] = {"user_id": ns.user_id, "name": ns.name}
    if ns.device_id is not None:
        args["device_id"] = ns.device_id
    if ns.attr:
        args["attributes"] = parse_pairs(ns.attr, "--attr")
    if ns.at is not None:
        args["at"] = parse_time(ns.at, "--at")
    return args


def _add_device_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("device_id", metavar="DEVICE")


def _device_args(ns: argparse.Namespace) -> dict[str, Any]:
    return {"device_id": ns.device_id}


def _add_message_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("message_id", metavar="MESSAGE")
    p.add_argument("--page", type=int, default=0, help="page of per-device outcomes (from 0)")
    p.add_argument("--page-size", dest="page_size", type=int, default=100, metavar="N",
                   help="devices per page (1..10000, default 100)")


def message_args(ns: argparse.Namespace) -> dict[str, Any]:
    if ns.page < 0:
        raise UsageError("--page must be >= 0")
    if not 1 <= ns.page_size <= 10_000:
        raise UsageError("--page-size must be within 1..10000")
    return {"message_id": ns.message_id, "page": ns.page, "page_size": ns.page_size}


# -- the push pipeline: output ---------------------------------------------------------------


def progress_counts(state: Mapping[str, Any]) -> tuple[int, int]:
    """(items final, total): the total is the audience estimate while fan-out runs."""
    states = state.get("states") or {}
    final = sum(int(states.get(s, 0)) for s in FINAL_COUNTED)
    items = sum(int(v) for v in states.values())
    total = items
    if state.get("fanout") == "running":
        total = max(items, int(state.get("audience") or 0))
    return final, total


def progress_line(state: Mapping[str, Any], width: int = 24) -> str:
    states = state.get("states") or {}
    final, total = progress_counts(state)
    share = final / total if total else 1.0
    filled = int(share * width)
    parts = [f"[{'#' * filled}{'.' * (width - filled)}] {share * 100:3.0f}%  {final}/{total}"]
    parts += [f"{s} {int(states.get(s, 0))}" for s in ("sent", "failed", "skipped", "dead")]
    if states.get("expired"):
        parts.append(f"expired {states['expired']}")
    if state.get("fanout") == "running":
        parts.append("fan-out running")
    return "  ".join(parts)


def render_push(result: Any) -> str:
    if isinstance(result, Mapping) and "states" in result:
        return render_message_summary(result)
    if isinstance(result, Mapping) and "message_id" in result:
        return f"message {result['message_id']} accepted, {result.get('targeted', '?')} device(s) targeted"
    return _render_value(result)


def render_message_summary(state: Mapping[str, Any]) -> str:
    """The counts of a message state, without the per-device rows."""
    states = state.get("states") or {}
    final, total = progress_counts(state)
    counted = ", ".join(f"{s} {int(states.get(s, 0))}" for s in FINAL_COUNTED)
    pending = ", ".join(f"{s} {int(states.get(s, 0))}" for s in ("queued", "leased"))
    pairs = [
        ("message", _scalar(state.get("message_id"))),
        ("state", f"{_scalar(state.get('state'))} (fan-out {_scalar(state.get('fanout'))})"),
        ("priority", _scalar(state.get("priority"))),
        ("push type", _scalar(state.get("push_type"))),
        ("created", _when(state.get("created_at"))),
        ("finished", _when(state.get("finished_at"))),
        ("final", f"{final} of {total}: {counted}"),
        ("pending", pending),
        ("outcomes", _counts(state.get("outcomes"))),
        ("reasons", _counts(state.get("reasons"))),
    ]
    width = max(len(key) for key, _ in pairs)
    return "\n".join(f"{key.ljust(width)}  {value}" for key, value in pairs)


def render_message(result: Any) -> str:
    if not isinstance(result, Mapping) or "states" not in result:
        return _render_value(result)
    text = render_message_summary(result)
    devices = result.get("devices") or []
    page, pages = result.get("page", 0), result.get("pages", 0)
    text += f"\n\ndevices, page {page} of {pages} page(s) numbered from 0 ({len(devices)} shown)"
    if devices:
        header = ("DEVICE", "STATE", "OUTCOME", "REASON", "ATTEMPTS", "APNS ID")
        rows = [
            tuple(_scalar(d.get(k)) for k in ("device_id", "state", "outcome", "reason", "attempts", "apns_id"))
            for d in devices if isinstance(d, Mapping)
        ]
        text += "\n" + _table(header, rows)
    return text


def render_classes(result: Any) -> str:
    classes = result.get("classes") if isinstance(result, Mapping) else result
    if not isinstance(classes, list):
        return _render_value(result)
    if not classes:
        return "(no classes)"
    rows = [
        (_scalar(c.get("id")), _scalar(c.get("description") or "-"), _scalar(c.get("rule")))
        for c in classes if isinstance(c, Mapping)
    ]
    return _table(("CLASS", "DESCRIPTION", "RULE"), rows)


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
    everything = [header, *rows]
    widths = [max(len(row[i]) for row in everything) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in everything
    )


def _counts(value: Any) -> str:
    if not isinstance(value, Mapping) or not value:
        return "-"
    return ", ".join(f"{key} {count}" for key, count in sorted(value.items(), key=lambda kv: (-kv[1], kv[0])))


def _when(value: Any) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return _scalar(value)
    return datetime.fromtimestamp(value, UTC).isoformat(timespec="seconds")


# -- the command table -----------------------------------------------------------------------

COMMANDS: tuple[Command, ...] = (
    Command("ping", "check that the daemon answers", render_ping, show_elapsed=True),
    Command("status", "show the daemon's state and its actors", render_status),
    Command("stats", "show the daemon's counters", render_key_values),
    Command("reload", "re-read the configuration", render_reload),
    Command("register", "register or update a device", render_key_values,
            add_arguments=_add_register_arguments, build_args=register_args),
    Command("register-many", "register devices from a file, in batches of up to 1000",
            render_key_values, op="register_many",
            add_arguments=_add_register_many_arguments, build_args=register_many_args,
            run=run_register_many),
    Command("unregister", "forget a device", render_key_values,
            add_arguments=_add_device_argument, build_args=_device_args),
    Command("device", "show a device (token redacted)", render_key_values,
            add_arguments=_add_device_argument, build_args=_device_args),
    Command("push", "send a notification; --wait follows it to the end", render_push,
            add_arguments=_add_push_arguments, build_args=push_args, run=run_push),
    Command("message", "show a message's progress and per-device outcomes", render_message,
            add_arguments=_add_message_arguments, build_args=message_args),
    Command("classes", "list the configured device classes", render_classes),
    Command("report", "report an app event for push analysis", render_key_values,
            add_arguments=_add_report_arguments, build_args=report_args),
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
    common.add_argument("--timeout", type=_positive_seconds, default=argparse.SUPPRESS, metavar="SECONDS",
                        help="how long to wait for the daemon (default 10; reload 60)")

    parser = argparse.ArgumentParser(
        prog="pushctl", parents=[common],
        description="Control a running pushd through its control socket.",
        epilog="exit status: 0 ok, 1 error reply, 2 usage error, 3 daemon unreachable, "
        "4 push --wait still pending at --wait-timeout",
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


def _positive_seconds(text: str) -> float:
    """``--timeout``: a number of seconds above 0 (anything else is a usage error)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {text}")
    return value


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
    session = Session(as_json=as_json, progress=_progress_writer(sys.stderr),
                      stderr_is_terminal=_stderr_is_terminal())
    try:
        # A reload may start nodes (up to NODE_START_TIMEOUT, then rolled back): wait longer.
        default_timeout = RELOAD_TIMEOUT if command.name == "reload" else 10.0
        with Client(socket_path, timeout=getattr(ns, "timeout", default_timeout)) as client:
            if command.run is not None:
                result = command.run(client, ns, args, session)
            else:
                result = client.call(command.op or command.name, **args)
    except CommandFailed as exc:
        if exc.result is not None:
            _print(sys.stdout, _to_json(exc.result) if as_json else command.render(exc.result))
        print(f"pushctl: {command.name}: {exc.message}", file=sys.stderr)
        return exc.exit_code
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


def _stderr_is_terminal() -> bool:
    return sys.stderr.isatty()


def _progress_writer(stream: TextIO) -> Callable[[str, bool], None]:
    """Progress on ``stream``: on a terminal one line rewritten in place; otherwise a plain
    line when something changed, at most every PROGRESS_LINE_INTERVAL seconds, and the
    last one when done. ``(line, final)``; an empty final line just ends the display."""
    terminal = _stderr_is_terminal()
    last_line = ""
    last_at: float | None = None
    shown = False

    def show(line: str, final: bool) -> None:
        nonlocal last_line, last_at, shown
        if terminal:
            if line:
                stream.write("\r" + line + "\x1b[K")
                shown = True
            if final and shown:
                stream.write("\n")
                shown = False
            stream.flush()
            return
        now = time.monotonic()
        due = last_at is None or now - last_at >= PROGRESS_LINE_INTERVAL
        if line and line != last_line and (due or final):
            stream.write(line + "\n")
            stream.flush()
            last_line, last_at = line, now

    return show


def _print(stream: TextIO, text: str) -> None:
    stream.write(text + "\n")
    stream.flush()


if __name__ == "__main__":
    sys.exit(main())
