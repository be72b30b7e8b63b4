"""pushctl against a control server running in the test: exit codes, JSON and readable output."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog.testing
import trio

from pushd import pushctl
from pushd.control import ControlServer, Handler, Peer, ping
from pushd.protocol import ErrorCode, OpError

STATUS = {
    "version": "0.1.0",
    "uptime": 12.5,
    "actors": [
        {"name": "central", "state": "running", "restarts": 0, "last_error": None},
        {"name": "node-1", "state": "backoff", "restarts": 3, "last_error": "ConnectError: refused"},
    ],
}
STATS = {"queue": {"pending": 4, "leased": 1}, "sent": 120, "failed": 2}


async def status(args: dict[str, Any], peer: Peer) -> Any:
    return STATUS


async def stats(args: dict[str, Any], peer: Peer) -> Any:
    return STATS


async def reload(args: dict[str, Any], peer: Peer) -> Any:
    raise OpError(ErrorCode.INVALID_ARGUMENT, "apns.team_id must be 10 characters", field="apns.team_id")


async def echo(args: dict[str, Any], peer: Peer) -> Any:
    return args


HANDLERS: dict[str, Handler] = {
    "ping": ping, "status": status, "stats": stats, "reload": reload, "echo": echo,
}


@pytest.fixture(autouse=True)
def quiet_daemon_logs() -> Iterator[None]:
    """The server logs to stdout by default; keep stdout for pushctl's output."""
    with structlog.testing.capture_logs():
        yield


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "c.sock"


@pytest.fixture
async def server(nursery: trio.Nursery, sock_path: Path) -> AsyncIterator[ControlServer]:
    srv = ControlServer(sock_path, HANDLERS)
    await nursery.start(srv.run)
    yield srv


async def pushctl_main(*argv: str) -> int:
    return await trio.to_thread.run_sync(pushctl.main, list(argv))


async def test_ping_exit_0_and_json(server: ControlServer, sock_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert await pushctl_main("--socket", str(sock_path), "ping") == 0
    out = capsys.readouterr().out
    assert json.loads(out) == {"pong": True, "protocol": 1, "pid": os.getpid()}  # not a TTY: JSON


async def test_options_after_the_subcommand(server: ControlServer, sock_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert await pushctl_main("stats", "--json", "--socket", str(sock_path), "--timeout", "5") == 0
    assert json.loads(capsys.readouterr().out) == STATS


async def test_status_json(server: ControlServer, sock_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert await pushctl_main("--json", "--socket", str(sock_path), "status") == 0
    assert json.loads(capsys.readouterr().out) == STATUS


async def test_readable_output_on_a_terminal(
    server: ControlServer, sock_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pushctl, "_stdout_is_terminal", lambda: True)
    assert await pushctl_main("--socket", str(sock_path), "status") == 0
    assert capsys.readouterr().out.splitlines() == [
        "version: 0.1.0",
        "uptime: 12.5",
        "",
        "ACTOR    STATE    RESTARTS  LAST ERROR",
        "central  running  0         -",
        "node-1   backoff  3         ConnectError: refused",
    ]
    assert await pushctl_main("--socket", str(sock_path), "stats") == 0
    assert capsys.readouterr().out.splitlines() == [
        "queue.pending  4",
        "queue.leased   1",
        "sent           120",
        "failed         2",
    ]
    assert await pushctl_main("--socket", str(sock_path), "ping") == 0
    assert capsys.readouterr().out.startswith("pong (")
    # --json wins over the terminal
    assert await pushctl_main("--json", "--socket", str(sock_path), "stats") == 0
    assert json.loads(capsys.readouterr().out) == STATS


def test_render_status_accepts_actors_as_a_map() -> None:
    text = pushctl.render_status({"actors": {"queue": {"state": "running", "restarts": 1}}})
    assert text.splitlines() == [
        "ACTOR  STATE    RESTARTS  LAST ERROR",
        "queue  running  1         -",
    ]


async def test_error_reply_exits_1(server: ControlServer, sock_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert await pushctl_main("--socket", str(sock_path), "reload") == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"error": {
        "code": "invalid_argument",
        "message": "apns.team_id must be 10 characters",
        "field": "apns.team_id",
        "details": {},
    }}
    assert "reload failed: invalid_argument (apns.team_id): apns.team_id must be 10 characters" in captured.err


async def test_unreachable_daemon_exits_3_naming_the_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "nobody-home.sock"
    assert await pushctl_main("--socket", str(path), "ping") == 3
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"cannot reach pushd at {path}" in captured.err


async def test_unreachable_default_path_is_named_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PUSHD_SOCKET", str(tmp_path / "env.sock"))
    assert await pushctl_main("status") == 3
    assert str(tmp_path / "env.sock") in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["ping", "extra"],
        ["--socket", "a.sock", "--config", "b.toml", "ping"],
        ["--timeout", "soon", "ping"],
        ["--timeout", "0", "ping"],
    ],
)
async def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert await pushctl_main(*argv) == 2
    assert "usage: pushctl" in capsys.readouterr().err


async def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert await pushctl_main("--help") == 0
    out = capsys.readouterr().out
    for command in ("ping", "status", "stats", "reload"):
        assert command in out


async def test_socket_from_config_file(nursery: trio.Nursery, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = trio.Path(tmp_path / "pushd.toml")
    await config.write_text('[control]\nsocket = "run/ctl.sock"\n')
    srv = ControlServer(tmp_path / "run" / "ctl.sock", HANDLERS)
    await nursery.start(srv.run)
    assert await pushctl_main("--config", str(config), "--json", "ping") == 0
    assert json.loads(capsys.readouterr().out)["pong"] is True


async def test_broken_config_file_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = trio.Path(tmp_path / "pushd.toml")
    await config.write_text("[control\n")
    assert await pushctl_main("--config", str(config), "ping") == 2
    assert f"cannot read the socket path from {config}" in capsys.readouterr().err


def test_every_command_has_a_unique_name() -> None:
    names = [command.name for command in pushctl.COMMANDS]
    assert len(names) == len(set(names))
    assert {"ping", "status", "stats", "reload"} <= set(names)


def _echo_args(ns: Any) -> dict[str, Any]:
    if ns.count < 0:
        raise pushctl.UsageError("--count must not be negative")
    return {"word": ns.word, "count": ns.count}


def _add_echo_arguments(parser: Any) -> None:
    parser.add_argument("word")
    parser.add_argument("--count", type=int, default=1)


async def test_a_new_op_is_one_table_entry(
    server: ControlServer, sock_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    echo_command = pushctl.Command(
        "echo", "repeat", pushctl.render_key_values,
        add_arguments=_add_echo_arguments, build_args=_echo_args,
    )
    monkeypatch.setattr(pushctl, "COMMANDS", (*pushctl.COMMANDS, echo_command))
    assert await pushctl_main("--socket", str(sock_path), "echo", "hi", "--count", "3") == 0
    assert json.loads(capsys.readouterr().out) == {"word": "hi", "count": 3}
    assert await pushctl_main("--socket", str(sock_path), "echo", "hi", "--count", "-1") == 2
    assert "--count must not be negative" in capsys.readouterr().err


async def test_reload_waits_longer_than_other_commands_by_default(
    server: ControlServer, sock_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A reload may start nodes and roll back if one does not start (up to 30 s): pushctl
    # waits RELOAD_TIMEOUT for its answer unless --timeout says otherwise.
    timeouts: list[float] = []
    real = pushctl.Client

    def recording(path: Any, *, timeout: float) -> Any:
        timeouts.append(timeout)
        return real(path, timeout=timeout)

    monkeypatch.setattr(pushctl, "Client", recording)
    await pushctl_main("--socket", str(sock_path), "reload")
    await pushctl_main("--socket", str(sock_path), "ping")
    await pushctl_main("--socket", str(sock_path), "--timeout", "3", "reload")
    assert timeouts == [pushctl.RELOAD_TIMEOUT, 10.0, 3.0]
    from pushd.pipeline import NODE_START_TIMEOUT

    assert pushctl.RELOAD_TIMEOUT > NODE_START_TIMEOUT
