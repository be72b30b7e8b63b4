"""The control server on a real Unix socket, with raw frames and with the sync Client."""

from __future__ import annotations

import os
import socket
import stat
import struct
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import structlog.testing
import trio

from pushd.client import Client, ConnectionFailed, RequestFailed, default_socket_path
from pushd.control import (
    ControlServer,
    Handler,
    Peer,
    SocketInUse,
    peer_allowed,
    peer_credentials,
    ping,
)
from pushd.protocol import ErrorCode, OpError, encode_frame, read_frame


async def boom(args: dict[str, Any], peer: Peer) -> Any:
    raise ZeroDivisionError("division by zero in a handler")


async def refuse(args: dict[str, Any], peer: Peer) -> Any:
    raise OpError(ErrorCode.NOT_FOUND, "no such device", field="device", details={"id": 3})


async def whoami(args: dict[str, Any], peer: Peer) -> Any:
    return {"pid": peer.pid, "uid": peer.uid, "gid": peer.gid, "args": args}


async def unencodable(args: dict[str, Any], peer: Peer) -> Any:
    return {"when": object()}


async def unencodable_error(args: dict[str, Any], peer: Peer) -> Any:
    raise OpError(ErrorCode.CONFLICT, "busy", details={"lock": object()})


async def hang(args: dict[str, Any], peer: Peer) -> Any:
    await trio.sleep_forever()


HANDLERS: dict[str, Handler] = {
    "ping": ping, "boom": boom, "refuse": refuse, "whoami": whoami,
    "unencodable": unencodable, "unencodable_error": unencodable_error, "hang": hang,
}


class Conn:
    """A raw protocol connection for tests."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()
        self.next_id = 1

    @classmethod
    async def open(cls, path: Path) -> Conn:
        return cls(await trio.open_unix_socket(os.fspath(path)))

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def receive(self) -> Any:
        with trio.fail_after(5):
            return await read_frame(self.stream, max_size=1 << 20, buffer=self.buffer)

    async def request(self, op: str, **args: Any) -> Any:
        request_id = self.next_id
        self.next_id += 1
        await self.send(encode_frame({"v": 1, "id": request_id, "op": op, "args": args}))
        reply = await self.receive()
        assert reply["id"] == request_id
        return reply

    async def aclose(self) -> None:
        await self.stream.aclose()


class Running:
    """A server started in its own cancel scope, so that a test can stop it."""

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.stopped = trio.Event()

    async def stop(self) -> None:
        self.scope.cancel()
        with trio.fail_after(5):
            await self.stopped.wait()


async def start(nursery: trio.Nursery, server: ControlServer) -> Running:
    running = Running()

    async def run(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with running.scope:
                await server.run(task_status=task_status)
        finally:
            running.stopped.set()

    await nursery.start(run)
    return running


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "c.sock"


@pytest.fixture
async def server(nursery: trio.Nursery, sock_path: Path) -> AsyncIterator[ControlServer]:
    srv = ControlServer(sock_path, HANDLERS)
    await nursery.start(srv.run)
    yield srv


async def wait_until(predicate: Callable[[], bool]) -> None:
    for _ in range(500):  # a bounded poll: 5 s at most
        if predicate():
            return
        await trio.sleep(0.01)
    raise AssertionError("condition not reached within 5 s")


# -- round trips ---------------------------------------------------------------------------


async def test_ping_with_the_sync_client(server: ControlServer, sock_path: Path) -> None:
    def talk() -> Any:
        with Client(sock_path) as client:
            return client.ping(), client.ping()

    first, second = await trio.to_thread.run_sync(talk)
    assert first == {"pong": True, "protocol": 1, "pid": os.getpid()}
    assert second == first


async def test_ping_with_raw_frames_and_peer_credentials(server: ControlServer, sock_path: Path) -> None:
    conn = await Conn.open(sock_path)
    reply = await conn.request("ping")
    assert reply == {"v": 1, "id": 1, "result": {"pong": True, "protocol": 1, "pid": os.getpid()}}
    who = await conn.request("whoami", x=[1, 2])
    assert who["result"] == {"pid": os.getpid(), "uid": os.getuid(), "gid": os.getgid(), "args": {"x": [1, 2]}}


async def test_pipelined_requests_are_answered_in_order(server: ControlServer, sock_path: Path) -> None:
    conn = await Conn.open(sock_path)
    ids = ["a", 2, "c", 4]
    await conn.send(b"".join(
        encode_frame({"v": 1, "id": i, "op": "whoami", "args": {"i": i}}) for i in ids
    ))
    replies = [await conn.receive() for _ in ids]
    assert [r["id"] for r in replies] == ids
    assert [r["result"]["args"]["i"] for r in replies] == ids


async def test_handler_op_error_reaches_the_client(server: ControlServer, sock_path: Path) -> None:
    def talk() -> RequestFailed:
        with Client(sock_path) as client, pytest.raises(RequestFailed) as info:
            client.call("refuse")
        return info.value

    err = await trio.to_thread.run_sync(talk)
    assert (err.code, err.message, err.field, err.details) == (
        "not_found", "no such device", "device", {"id": 3},
    )


# -- bad requests: answered, connection kept ---------------------------------------------


async def test_unknown_op_lists_the_ops_and_the_connection_carries_on(
    server: ControlServer, sock_path: Path
) -> None:
    conn = await Conn.open(sock_path)
    reply = await conn.request("frobnicate")
    assert reply["error"]["code"] == "unknown_op"
    assert reply["error"]["field"] == "op"
    assert reply["error"]["details"] == {"ops": sorted(HANDLERS)}
    assert (await conn.request("ping"))["result"]["pong"] is True


@pytest.mark.parametrize(
    ("request_obj", "code", "reply_id"),
    [
        ({"v": 2, "id": 9, "op": "ping"}, "unsupported_version", 9),
        ({"id": 9, "op": "ping"}, "bad_request", 9),
        ({"v": 1, "id": 9.5, "op": "ping"}, "bad_request", None),
        ({"v": 1, "id": 9, "op": "ping", "args": "x"}, "bad_request", 9),
        (["not", "a", "map"], "bad_request", None),
    ],
)
async def test_bad_request_is_answered_and_the_connection_carries_on(
    server: ControlServer, sock_path: Path, request_obj: Any, code: str, reply_id: Any
) -> None:
    conn = await Conn.open(sock_path)
    await conn.send(encode_frame(request_obj))
    reply = await conn.receive()
    assert reply["error"]["code"] == code
    assert reply["id"] == reply_id
    assert (await conn.request("ping"))["result"]["pong"] is True


async def test_handler_crash_is_internal_logged_and_served_on(
    server: ControlServer, sock_path: Path
) -> None:
    conn = await Conn.open(sock_path)
    with structlog.testing.capture_logs() as logs:
        reply = await conn.request("boom")
    assert reply["error"]["code"] == "internal"
    assert "ZeroDivisionError" in reply["error"]["message"]
    failures = [e for e in logs if e["event"] == "control op failed"]
    assert len(failures) == 1
    assert failures[0]["op"] == "boom" and failures[0]["log_level"] == "error"
    assert isinstance(failures[0]["exc_info"], ZeroDivisionError)  # logged with its traceback
    for op in ("unencodable", "unencodable_error"):
        assert (await conn.request(op))["error"]["code"] == "internal"
    assert (await conn.request("ping"))["result"]["pong"] is True


async def test_handlers_can_be_replaced_at_runtime(server: ControlServer, sock_path: Path) -> None:
    conn = await Conn.open(sock_path)
    assert "result" in await conn.request("whoami")

    async def pong2(args: dict[str, Any], peer: Peer) -> Any:
        return "pong 2"

    server.handlers = {"ping": pong2}
    assert (await conn.request("ping"))["result"] == "pong 2"
    assert (await conn.request("whoami"))["error"]["code"] == "unknown_op"


# -- broken frames: answered if possible, that connection closed, everyone else served ----


@pytest.mark.parametrize(
    ("garbage", "code"),
    [
        pytest.param(struct.pack(">I", 3) + b"\xc1\xc1\xc1", "bad_frame", id="malformed"),
        pytest.param(struct.pack(">I", (1 << 20) + 1), "frame_too_large", id="oversized"),
        pytest.param(struct.pack(">I", 0), "bad_frame", id="empty"),
    ],
)
async def test_broken_frame_closes_only_its_connection(
    server: ControlServer, sock_path: Path, garbage: bytes, code: str
) -> None:
    bystander = await Conn.open(sock_path)
    assert "result" in await bystander.request("ping")
    culprit = await Conn.open(sock_path)
    await culprit.send(garbage)
    reply = await culprit.receive()
    assert reply["error"]["code"] == code
    assert reply["id"] is None
    assert await culprit.receive() is None  # closed: the stream cannot be resynchronised
    assert "result" in await bystander.request("ping")
    assert "result" in await (await Conn.open(sock_path)).request("ping")


async def test_truncated_frame_closes_only_its_connection(server: ControlServer, sock_path: Path) -> None:
    bystander = await Conn.open(sock_path)
    culprit = await Conn.open(sock_path)
    frame = encode_frame({"v": 1, "id": 1, "op": "ping", "args": {}})
    await culprit.send(frame[:-2])
    await culprit.stream.send_eof()
    reply = await culprit.receive()
    assert reply["error"]["code"] == "bad_frame"
    assert "middle of a frame" in reply["error"]["message"]
    assert await culprit.receive() is None
    assert "result" in await bystander.request("ping")
    await wait_until(lambda: server.active_connections == 1)


async def test_client_vanishing_mid_request_does_not_disturb_the_server(
    server: ControlServer, sock_path: Path
) -> None:
    culprit = await Conn.open(sock_path)
    await culprit.send(encode_frame({"v": 1, "id": 1, "op": "ping"})[:5])
    await culprit.aclose()
    await wait_until(lambda: server.active_connections == 0)
    assert "result" in await (await Conn.open(sock_path)).request("ping")


async def test_oversized_request_from_the_client_is_reported(server: ControlServer, sock_path: Path) -> None:
    def talk() -> tuple[RequestFailed, Any]:
        with Client(sock_path) as client:
            with pytest.raises(RequestFailed) as info:
                client.call("whoami", blob=b"x" * (4 << 20))
            return info.value, client.call("whoami", blob=b"x" * 1000)

    err, ok = await trio.to_thread.run_sync(talk)
    assert err.code == "frame_too_large"
    assert ok["args"]["blob"] == b"x" * 1000


# -- limits --------------------------------------------------------------------------------


async def test_extra_connections_are_refused_politely(nursery: trio.Nursery, sock_path: Path) -> None:
    server = ControlServer(sock_path, HANDLERS, max_connections=2)
    await nursery.start(server.run)
    first, second = await Conn.open(sock_path), await Conn.open(sock_path)
    for conn in (first, second):  # both busy with a request
        await conn.send(encode_frame({"v": 1, "id": 1, "op": "hang", "args": {}}))
    await wait_until(lambda: server.requests_served == 2)
    third = await Conn.open(sock_path)
    reply = await third.receive()
    assert reply["error"]["code"] == "unavailable"
    assert "too many" in reply["error"]["message"]
    assert await third.receive() is None
    assert server.stats() == {"connections_active": 2, "connections_total": 3, "requests": 2}


async def test_a_connection_that_sends_nothing_is_closed_after_the_first_request_timeout(
    nursery: trio.Nursery, sock_path: Path, autojump_clock: Any
) -> None:
    # Silent connections cannot hold the connection limit until the idle timeout: a new
    # connection has FIRST_REQUEST_TIMEOUT to send a request; one that has, idle_timeout.
    from pushd.control import FIRST_REQUEST_TIMEOUT

    server = ControlServer(sock_path, HANDLERS, idle_timeout=300.0)
    await nursery.start(server.run)
    silent, used = await Conn.open(sock_path), await Conn.open(sock_path)
    assert "result" in await used.request("ping")
    start = trio.current_time()
    with trio.fail_after(60):
        assert await read_frame(silent.stream, max_size=1024, buffer=bytearray()) is None
    assert FIRST_REQUEST_TIMEOUT <= trio.current_time() - start < FIRST_REQUEST_TIMEOUT + 1
    assert server.active_connections == 1
    assert "result" in await used.request("ping")


async def test_idle_connection_is_closed(nursery: trio.Nursery, sock_path: Path, autojump_clock: Any) -> None:
    server = ControlServer(sock_path, HANDLERS, idle_timeout=30.0)
    await nursery.start(server.run)
    conn = await Conn.open(sock_path)
    assert "result" in await conn.request("ping")
    start_time = trio.current_time()
    with trio.fail_after(60):
        assert await read_frame(conn.stream, max_size=1024, buffer=bytearray()) is None
    assert 30.0 <= trio.current_time() - start_time < 31.0


# -- peers ---------------------------------------------------------------------------------


def test_peer_allowed_by_uid_primary_gid_or_supplementary_group() -> None:
    peer = Peer(pid=10, uid=1000, gid=2000, groups=(3000, 3001))
    assert peer_allowed(peer, {1000}, ())
    assert peer_allowed(peer, (), {2000})
    assert peer_allowed(peer, (), {3001})
    assert not peer_allowed(peer, {0, 1001}, {0, 2001, 1000})


def test_peer_credentials_of_a_socket_pair() -> None:
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        peer = peer_credentials(a)
    assert (peer.pid, peer.uid, peer.gid) == (os.getpid(), os.getuid(), os.getgid())
    assert sorted(peer.groups) == sorted(os.getgroups())


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a client process extra groups needs root")
async def test_peer_allowed_by_a_supplementary_group(nursery: trio.Nursery, sock_path: Path) -> None:
    server = ControlServer(sock_path, HANDLERS, allowed_gids={54321}, allow_own_uid=False)
    await nursery.start(server.run)
    code = "import sys; from pushd.client import Client; print(Client(sys.argv[1]).ping()['pong'])"
    with trio.fail_after(30):
        done = await trio.run_process(
            [sys.executable, "-c", code, os.fspath(sock_path)], extra_groups=[54321],
            capture_stdout=True, capture_stderr=True, check=False,
        )
    assert (done.returncode, done.stdout.strip()) == (0, b"True"), done.stderr


async def test_disallowed_peer_is_refused(nursery: trio.Nursery, sock_path: Path) -> None:
    server = ControlServer(
        sock_path, HANDLERS, allowed_uids={os.getuid() + 4242}, allowed_gids={os.getgid() + 4242},
        allow_own_uid=False,
    )
    await nursery.start(server.run)
    conn = await Conn.open(sock_path)
    reply = await conn.receive()  # refused before it has said anything
    assert reply["error"]["code"] == "not_allowed"
    assert f"uid {os.getuid()}" in reply["error"]["message"]
    assert await conn.receive() is None

    def talk() -> RequestFailed:
        with Client(sock_path) as client, pytest.raises(RequestFailed) as info:
            client.ping()
        return info.value

    assert (await trio.to_thread.run_sync(talk)).code == "not_allowed"
    await wait_until(lambda: server.active_connections == 0)


def test_the_socket_group_is_allowed_when_the_mode_lets_it_in(sock_path: Path) -> None:
    # The way backends get in under systemd: their user in the daemon's group, the socket
    # 0660 in that group. The credential check must not refuse what the file lets in.
    assert os.getgid() in ControlServer(sock_path, HANDLERS, mode=0o660).allowed_gids
    assert os.getgid() not in ControlServer(sock_path, HANDLERS, mode=0o600).allowed_gids
    assert ControlServer(sock_path, HANDLERS, allow_own_uid=False).allowed_gids == frozenset()


async def test_peer_allowed_by_group(nursery: trio.Nursery, sock_path: Path) -> None:
    server = ControlServer(sock_path, HANDLERS, allowed_gids={os.getgid()}, allow_own_uid=False)
    await nursery.start(server.run)
    assert "result" in await (await Conn.open(sock_path)).request("ping")


def test_daemon_uid_is_allowed_by_default(sock_path: Path) -> None:
    assert os.getuid() in ControlServer(sock_path, HANDLERS).allowed_uids
    assert os.getuid() not in ControlServer(sock_path, HANDLERS, allow_own_uid=False).allowed_uids


# -- the socket file -------------------------------------------------------------------------


async def test_socket_file_mode_and_group(nursery: trio.Nursery, tmp_path: Path) -> None:
    path = tmp_path / "run" / "c.sock"  # the directory is created
    gid = 54321 if os.geteuid() == 0 else os.getgid()
    server = ControlServer(path, HANDLERS, mode=0o600, group=str(gid))
    await nursery.start(server.run)
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_gid == gid


def test_unknown_group_fails_at_construction(sock_path: Path) -> None:
    with pytest.raises(LookupError, match="no-such-group-pushd"):
        ControlServer(sock_path, HANDLERS, group="no-such-group-pushd")


async def test_stale_socket_file_is_replaced(nursery: trio.Nursery, sock_path: Path) -> None:
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(os.fspath(sock_path))
    dead.close()  # like a daemon killed with SIGKILL: the file stays, nobody listens
    server = ControlServer(sock_path, HANDLERS)
    with structlog.testing.capture_logs() as logs:
        await nursery.start(server.run)  # bind() would fail with EADDRINUSE had it stayed
    assert [e["event"] for e in logs][:1] == ["replacing stale control socket"]
    assert "result" in await (await Conn.open(sock_path)).request("ping")


async def test_live_daemon_on_the_same_path_is_refused(server: ControlServer, sock_path: Path) -> None:
    second = ControlServer(sock_path, HANDLERS)
    with pytest.raises(SocketInUse) as info:
        await second.run()
    assert str(sock_path) in str(info.value)
    assert "another pushd" in str(info.value)
    assert "result" in await (await Conn.open(sock_path)).request("ping")  # first one unharmed


async def test_path_that_is_not_a_socket_is_left_alone(sock_path: Path) -> None:
    path = trio.Path(sock_path)
    await path.write_text("precious")
    with pytest.raises(FileExistsError, match="not a socket"):
        await ControlServer(sock_path, HANDLERS).run()
    assert await path.read_text() == "precious"


async def test_socket_file_removed_on_exit_only_if_still_ours(nursery: trio.Nursery, sock_path: Path) -> None:
    path = trio.Path(sock_path)
    running = await start(nursery, ControlServer(sock_path, HANDLERS))
    assert await path.exists()
    await running.stop()
    assert not await path.exists()

    running = await start(nursery, ControlServer(sock_path, HANDLERS))
    await path.unlink()
    await path.write_text("someone else's")  # e.g. a newer daemon's socket took the path
    await running.stop()
    assert await path.read_text() == "someone else's"


# -- the client ----------------------------------------------------------------------------


async def test_client_reconnects_once_after_a_daemon_restart(nursery: trio.Nursery, sock_path: Path) -> None:
    running = await start(nursery, ControlServer(sock_path, HANDLERS))
    client = Client(sock_path)
    try:
        before = await trio.to_thread.run_sync(client.call, "whoami")
        await running.stop()
        await start(nursery, ControlServer(sock_path, HANDLERS))
        after = await trio.to_thread.run_sync(client.call, "whoami")
        assert after == before
    finally:
        client.close()


async def test_client_resends_when_the_old_connection_was_dead_before_sending(
    nursery: trio.Nursery, sock_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Make the pre-send liveness check miss the restart, so the send itself hits the dead peer.
    monkeypatch.setattr("pushd.client._peer_closed_or_talking", lambda sock: False)
    running = await start(nursery, ControlServer(sock_path, HANDLERS))
    client = Client(sock_path)
    try:
        await trio.to_thread.run_sync(client.ping)
        await running.stop()
        await start(nursery, ControlServer(sock_path, HANDLERS))
        assert (await trio.to_thread.run_sync(client.ping))["pong"] is True
    finally:
        client.close()


async def test_client_never_resends_a_request_the_daemon_may_have_seen(
    nursery: trio.Nursery, sock_path: Path
) -> None:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # a daemon dying mid-request
    await sock.bind(os.fspath(sock_path))
    sock.listen()
    listener = trio.SocketListener(sock)
    received: list[Any] = []

    async def die_after_reading(
        *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        while True:
            stream = await listener.accept()
            received.append(await read_frame(stream, max_size=1024, buffer=bytearray()))
            await stream.aclose()

    await nursery.start(die_after_reading)
    with pytest.raises(ConnectionFailed, match="closed by pushd before it replied"):
        await trio.to_thread.run_sync(Client(sock_path).ping)
    assert [r["op"] for r in received] == ["ping"]


async def test_client_cannot_connect_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nobody.sock"
    with pytest.raises(ConnectionFailed) as info:
        await trio.to_thread.run_sync(Client(path, timeout=1).ping)
    assert info.value.path == path
    assert str(path) in str(info.value)


async def test_client_times_out_and_recovers(server: ControlServer, sock_path: Path) -> None:
    def talk() -> tuple[ConnectionFailed, Any]:
        with Client(sock_path, timeout=0.2) as client:
            with pytest.raises(ConnectionFailed) as info:
                client.call("hang")
            return info.value, client.ping()

    err, pong = await trio.to_thread.run_sync(talk)
    assert "no reply within 0.2 s" in str(err)
    assert pong["pong"] is True


def test_default_socket_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PUSHD_SOCKET", raising=False)
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    assert default_socket_path() == Path("/run/pushd/control.sock")
    (tmp_path / "config.toml").write_text("")
    assert default_socket_path() == Path("var/run/control.sock")
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/pushd-a:/run/other")
    assert default_socket_path() == Path("/run/pushd-a/control.sock")
    monkeypatch.setenv("PUSHD_SOCKET", "/tmp/x.sock")
    assert default_socket_path() == Path("/tmp/x.sock")


async def test_large_frames_are_handled_a_few_at_a_time_small_ones_at_once(
    nursery: trio.Nursery, sock_path: Path
) -> None:
    # Decoded msgpack is many times its size in memory: large requests (a register_many)
    # are decoded and handled LARGE_FRAMES_AT_ONCE at a time; small ones are not held up.
    from pushd.control import LARGE_FRAME, LARGE_FRAMES_AT_ONCE

    inside = {"now": 0, "most": 0}
    release = trio.Event()

    async def held(args: dict[str, Any], peer: Peer) -> Any:
        inside["now"] += 1
        inside["most"] = max(inside["most"], inside["now"])
        await release.wait()
        inside["now"] -= 1
        return len(args.get("blob", ""))

    server = ControlServer(sock_path, {**HANDLERS, "held": held})
    await nursery.start(server.run)
    conns = [await Conn.open(sock_path) for _ in range(6)]
    blob = "x" * (LARGE_FRAME + 1)
    for c in conns[:4]:
        await c.send(encode_frame({"v": 1, "id": 1, "op": "held", "args": {"blob": blob}}))
    for c in conns[4:]:
        await c.send(encode_frame({"v": 1, "id": 1, "op": "held", "args": {}}))
    await wait_until(lambda: inside["now"] == LARGE_FRAMES_AT_ONCE + 2)
    await trio.sleep(0.1)
    assert inside["now"] == LARGE_FRAMES_AT_ONCE + 2  # two large, both small
    release.set()
    replies = [await c.receive() for c in conns]
    assert [r["result"] for r in replies] == [len(blob)] * 4 + [0, 0]
    assert inside["most"] == LARGE_FRAMES_AT_ONCE + 2


async def large_slots_taken(nursery: trio.Nursery, sock_path: Path) -> tuple[ControlServer, trio.Event, str]:
    """A server whose "held" op waits for the returned event, with every large-request slot
    taken by a held request; and a blob that makes a request large."""
    from pushd.control import LARGE_FRAME, LARGE_FRAMES_AT_ONCE

    release = trio.Event()

    async def held(args: dict[str, Any], peer: Peer) -> Any:
        await release.wait()
        return "done"

    server = ControlServer(sock_path, {**HANDLERS, "held": held})
    await nursery.start(server.run)
    blob = "x" * (LARGE_FRAME + 1)
    for _ in range(LARGE_FRAMES_AT_ONCE):
        conn = await Conn.open(sock_path)
        await conn.send(encode_frame({"v": 1, "id": 1, "op": "held", "args": {"blob": blob}}))
    await wait_until(lambda: server.requests_served == LARGE_FRAMES_AT_ONCE)
    return server, release, blob


async def test_a_large_request_waiting_too_long_for_a_slot_is_refused_undone(
    nursery: trio.Nursery, sock_path: Path, autojump_clock: Any
) -> None:
    from pushd.control import LARGE_FRAME_WAIT, LARGE_FRAMES_AT_ONCE

    server, release, blob = await large_slots_taken(nursery, sock_path)
    late = await Conn.open(sock_path)
    start = trio.current_time()
    await late.send(encode_frame({"v": 1, "id": 7, "op": "held", "args": {"blob": blob}}))
    with trio.fail_after(LARGE_FRAME_WAIT + 5):
        reply = await read_frame(late.stream, max_size=1 << 20, buffer=late.buffer)
    assert reply["error"]["code"] == "unavailable" and "nothing was done" in reply["error"]["message"]
    assert trio.current_time() - start == pytest.approx(LARGE_FRAME_WAIT, abs=0.5)
    assert server.requests_served == LARGE_FRAMES_AT_ONCE  # never handled
    assert "result" in await late.request("ping")  # the connection goes on
    release.set()


async def test_a_refused_large_request_reaches_a_client_with_the_default_timeout(
    nursery: trio.Nursery, sock_path: Path
) -> None:
    # The large-request wait is well inside a Client's default timeout: the client hears
    # "unavailable, nothing was done", not a timeout that leaves it unsure.
    from pushd.client import Client, RequestFailed

    _, release, blob = await large_slots_taken(nursery, sock_path)

    def call() -> str:
        with Client(sock_path) as client:  # the default timeout
            try:
                client.call("held", blob=blob)
            except RequestFailed as exc:
                return exc.code
        return "answered"

    assert await trio.to_thread.run_sync(call) == "unavailable"
    release.set()
