"""pushctl and the client library driving the push pipeline: a real daemon on the embedded
simulator (whose request log is the ground truth), and fake handler tables for the client
side of ops and situations the daemon does not produce on demand."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog.testing
import trio

from pushd import pushctl
from pushd.client import Client, RequestFailed, WaitTimeout, settled
from pushd.control import ControlServer, Handler, Peer
from pushd.protocol import ErrorCode, OpError
from tests.pipeline_helpers import TOPIC, call, device, reached, running, token

DEVICE_FLAGS = [
    "--environment", "production", "--topic", TOPIC, "--model", "iPhone15,2",
    "--os-version", "17.1", "--app-version", "2.1.0", "--locale", "en_US",
    "--time-zone", "Europe/Berlin",
]


@pytest.fixture(autouse=True)
def quiet_daemon_logs() -> Iterator[None]:
    """The daemon logs to stdout by default; keep stdout for pushctl's output."""
    with structlog.testing.capture_logs():
        yield


async def pushctl_main(*argv: str) -> int:
    return await trio.to_thread.run_sync(pushctl.main, list(argv))


def sock(root: Path) -> str:
    return str(root / "ctl.sock")


def last_json(capsys: pytest.CaptureFixture[str]) -> Any:
    return json.loads(capsys.readouterr().out)


async def register_cli(root: Path, device_id: str, user_id: str, *extra: str) -> str:
    tok = token()
    code = await pushctl_main(
        "--socket", sock(root), "register", device_id, "--token", tok, "--user", user_id,
        *DEVICE_FLAGS, *extra,
    )
    assert code == 0
    return tok


# -- against the daemon ----------------------------------------------------------------------


async def test_register_then_push_wait_delivers_and_prints_the_final_state(
    short_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running(short_tmp) as daemon:
        t1 = await register_cli(short_tmp, "d1", "u1", "--attr", "tier=gold", "--attr", "age=41",
                                "--contact", "c-1", "--consent-event", "opened")
        assert last_json(capsys)["change"] == "registered"
        assert await pushctl_main("--socket", sock(short_tmp), "device", "d1") == 0
        view = last_json(capsys)
        assert view["attributes"] == {"tier": "gold", "age": 41}
        assert view["contact_ids"] == ["c-1"]
        assert view["consent"] == {"events": True, "event_kinds": ["opened"]}
        assert t1 not in json.dumps(view)  # the token is redacted
        # user-level data (attributes, contacts, consent) follows the user's latest registration
        t2 = await register_cli(short_tmp, "d2", "u1", "--refuse-category", "promo", "--no-background")
        t3 = await register_cli(short_tmp, "d3", "u2")
        capsys.readouterr()
        assert await pushctl_main("--socket", sock(short_tmp), "device", "d2") == 0
        perms = last_json(capsys)["permissions"]
        assert perms["background"] is False and perms["categories_refused"] == ["promo"]

        code = await pushctl_main(
            "--socket", sock(short_tmp), "push", "--topic", TOPIC, "--title", "Hi", "--body", "there",
            "--badge", "3", "--custom", "deep_link=/inbox", "--user", "u1", "--wait",
        )
        assert code == 0
        final = last_json(capsys)
        assert settled(final) and final["fanout"] == "done"
        assert final["states"]["sent"] == 2 and final["states"]["queued"] == 0
        assert reached(daemon, final["message_id"]) == {t1: 1, t2: 1}
        payload = json.loads(next(
            r.body for r in daemon.pipeline.sim_actor.simulator.requests
            if r.headers.get("apns-collapse-id") == final["message_id"]
        ))
        assert payload["aps"] == {"alert": {"title": "Hi", "body": "there"}, "badge": 3}
        assert payload["deep_link"] == "/inbox"

        # a broad target fans out in the background: --wait also waits for the fan-out;
        # the refused category is skipped, with its reason
        code = await pushctl_main(
            "--socket", sock(short_tmp), "push", "--topic", TOPIC, "--alert", "Sale!",
            "--category", "promo", "--all", "--priority", "5", "--wait",
        )
        assert code == 0
        final = last_json(capsys)
        assert final["states"]["sent"] == 2 and final["states"]["skipped"] == 1
        assert final["reasons"] == {"category_refused": 1}
        assert set(reached(daemon, final["message_id"])) == {t1, t3}

        assert await pushctl_main("--socket", sock(short_tmp), "unregister", "d3") == 0
        assert last_json(capsys) == {"device_id": "d3", "removed": True}
        assert await pushctl_main("--socket", sock(short_tmp), "device", "d3") == 1


async def test_wait_shows_a_progress_bar_on_a_terminal_and_a_summary(
    short_tmp: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pushctl, "_stdout_is_terminal", lambda: True)
    monkeypatch.setattr(pushctl, "_stderr_is_terminal", lambda: True)
    async with running(short_tmp):
        await call(short_tmp, "register_many", devices=[device(f"p{i}", f"u{i}") for i in range(4)])
        code = await pushctl_main(
            "--socket", sock(short_tmp), "push", "--topic", TOPIC, "--alert", "x", "--class", "everyone",
            "--wait", "--poll", "0.05",
        )
    captured = capsys.readouterr()
    assert code == 0
    assert captured.err.startswith("\r[")
    assert captured.err.endswith("\n") and captured.err.count("\n") == 1  # one line, redrawn
    last_frame = captured.err.rstrip("\n").split("\r")[-1]
    assert "100%  4/4  sent 4  failed 0  skipped 0  dead 0" in last_frame
    summary = dict(line.split(None, 1) for line in captured.out.splitlines() if " " in line)
    assert summary["final"] == "4 of 4: sent 4, failed 0, skipped 0, dead 0, expired 0"
    assert summary["pending"] == "queued 0, leased 0"


async def test_error_replies_exit_1_naming_the_field(
    short_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running(short_tmp):
        code = await pushctl_main("--socket", sock(short_tmp), "push", "--topic", TOPIC,
                                  "--alert", "x", "--class", "nope", "--wait")
        assert code == 1
        captured = capsys.readouterr()
        assert json.loads(captured.out)["error"]["field"] == "target.classes"
        assert "push failed: invalid_argument (target.classes)" in captured.err

        code = await pushctl_main("--socket", sock(short_tmp), "register", "bad", "--token", token(),
                                  "--user", "u1", *DEVICE_FLAGS[:-1], "Mars/Base")
        assert code == 1
        assert json.loads(capsys.readouterr().out)["error"]["field"] == "time_zone"

        code = await pushctl_main("--socket", sock(short_tmp), "message", "no-such-message")
        assert code == 1
        assert json.loads(capsys.readouterr().out)["error"] == {
            "code": "not_found", "message": "no message 'no-such-message'",
            "field": "message_id", "details": {},
        }


async def test_message_pages_through_per_device_outcomes(
    short_tmp: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running(short_tmp):
        ids = [f"m{i}" for i in range(5)]
        await call(short_tmp, "register_many", devices=[device(d, "u1") for d in ids])
        with Client(short_tmp / "ctl.sock") as client:
            accepted = await trio.to_thread.run_sync(
                lambda: client.push({"aps": {"alert": "x"}, "topic": TOPIC}, {"users": ["u1"]})
            )
            assert accepted["targeted"] == 5
            await trio.to_thread.run_sync(lambda: client.wait(accepted["message_id"], timeout=20))
        mid = accepted["message_id"]
        seen: list[str] = []
        for page in range(3):
            assert await pushctl_main("--socket", sock(short_tmp), "message", mid,
                                      "--page", str(page), "--page-size", "2") == 0
            state = last_json(capsys)
            assert (state["page"], state["page_size"], state["pages"]) == (page, 2, 3)
            seen += [d["device_id"] for d in state["devices"]]
            assert all(d["state"] == "sent" for d in state["devices"])
        assert seen == ids
        for page in (-1, 2**62):  # refused with the argument named (2**62 was an internal error)
            with pytest.raises(RequestFailed) as info:
                await call(short_tmp, "message", message_id=mid, page=page)
            assert (info.value.code, info.value.field) == ("invalid_argument", "page")

        monkeypatch.setattr(pushctl, "_stdout_is_terminal", lambda: True)
        assert await pushctl_main("--socket", sock(short_tmp), "message", mid, "--page-size", "2") == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].split() == ["message", mid]
        assert "devices, page 0 of 3 page(s) numbered from 0 (2 shown)" in lines
        header = lines.index("devices, page 0 of 3 page(s) numbered from 0 (2 shown)") + 1
        assert lines[header].split()[:4] == ["DEVICE", "STATE", "OUTCOME", "REASON"]
        assert [line.split()[:2] for line in lines[header + 1:]] == [["m0", "sent"], ["m1", "sent"]]


async def test_classes(short_tmp: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    async with running(short_tmp):
        assert await pushctl_main("--socket", sock(short_tmp), "classes") == 0
        result = last_json(capsys)
        assert [c["id"] for c in result["classes"]] == ["needs-update", "vip", "everyone"]
        with Client(short_tmp / "ctl.sock") as client:
            assert await trio.to_thread.run_sync(client.classes) == result["classes"]
        monkeypatch.setattr(pushctl, "_stdout_is_terminal", lambda: True)
        assert await pushctl_main("--socket", sock(short_tmp), "classes") == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].split() == ["CLASS", "DESCRIPTION", "RULE"]
        assert [line.split()[0] for line in lines[1:]] == ["needs-update", "vip", "everyone"]


async def test_register_many_from_a_file_in_batches(short_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = short_tmp / "devices.jsonl"
    lines.write_text("\n".join(json.dumps(device(f"f{i}", "u1")) for i in range(5)) + "\n\n")
    array = short_tmp / "devices.json"
    array.write_text(json.dumps([device(f"g{i}", "u2") for i in range(3)], indent=2))
    broken = short_tmp / "broken.jsonl"
    broken.write_text("\n".join(json.dumps(device(f"h{i}", "u3", **({"locale": "??"} if i == 3 else {})))
                                for i in range(5)))
    async with running(short_tmp):
        assert await pushctl_main("--socket", sock(short_tmp), "register-many", str(lines), "--batch", "2") == 0
        assert last_json(capsys) == {"registered": 5, "changes": {"registered": 5}, "requests": 3}
        assert await pushctl_main("--socket", sock(short_tmp), "register-many", str(array)) == 0
        assert last_json(capsys) == {"registered": 3, "changes": {"registered": 3}, "requests": 1}
        assert (await call(short_tmp, "device", device_id="f4"))["user_id"] == "u1"
        assert (await call(short_tmp, "device", device_id="g2"))["user_id"] == "u2"

        # entry 3 (0-based) is in the second batch; the error names it by its place in the file
        assert await pushctl_main("--socket", sock(short_tmp), "register-many", str(broken), "--batch", "2") == 1
        captured = capsys.readouterr()
        error = json.loads(captured.out)["error"]
        assert error["field"] == "devices[3].locale"
        assert error["details"]["registered_before"] == 2
        assert "2 devices of earlier batches were registered" in captured.err
        assert (await call(short_tmp, "device", device_id="h1"))["user_id"] == "u3"
        with pytest.raises(RequestFailed):
            await call(short_tmp, "device", device_id="h2")  # its batch was refused whole


def test_batches_split_by_count_and_size() -> None:
    devices = [{"device_id": f"d{i}", "pad": "x" * 100} for i in range(10)]
    assert [(o, len(b)) for o, b in pushctl.batches(devices, 4)] == [(0, 4), (4, 4), (8, 2)]
    assert [(o, len(b)) for o, b in pushctl.batches(devices, 1000, max_bytes=350)] == [
        (0, 2), (2, 2), (4, 2), (6, 2), (8, 2)
    ]
    assert pushctl._renumber("devices[3].locale", 8) == "devices[11].locale"


# -- usage errors: refused before any connection (the socket does not exist) -----------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["push", "--topic", TOPIC, "--alert", "x"], "push needs a target"),
        (["push", "--topic", TOPIC, "--alert", "x", "--user", "u", "--device", "d"],
         "give one kind of target, not --device and --user"),
        (["push", "--topic", TOPIC, "--alert", "x", "--all", "--filter", "always"],
         "give one kind of target, not --filter and --all"),
        (["push", "--alert", "x", "--all"], "push needs --topic"),
        (["push", "--topic", TOPIC, "--alert", "x", "--title", "t", "--all"], "give --alert or --title/--body"),
        (["push", "--topic", TOPIC, "--alert", "x", "--all", "--custom", "novalue"], "--custom expects KEY=VALUE"),
        (["push", "--topic", TOPIC, "--alert", "x", "--all", "--follow-up", "[1]"], "--follow-up must be a JSON object"),
        (["push", "--topic", TOPIC, "--alert", "x", "--all", "--follow-up", "{bad"], "--follow-up is not valid JSON"),
        (["push", "--topic", TOPIC, "--alert", "x", "--all", "--wait-timeout", "5"], "go with --wait"),
        (["push", "--topic", TOPIC, "--alert", "x", "--all", "--ttl", "5", "--expiration", "9"], "not allowed with"),
        (["push", "--topic", TOPIC, "--all", "--payload", "/nonexistent/n.json"], "cannot read payload"),
        (["register", "d1", "--attr", "=3"], "--attr expects KEY=VALUE"),
        (["register", "d1", "--allow-category", "a", "--refuse-category", "a"], "both allowed and refused"),
        (["register"], "the following arguments are required: DEVICE"),
        (["register-many", "/nonexistent/devices.jsonl"], "cannot read registrations file"),
        (["register-many", "-", "--batch", "1001"], "--batch must be within 1..1000"),
        (["message", "m", "--page-size", "0"], "--page-size must be within 1..10000"),
        (["report", "u1", "opened", "--at", "yesterday"], "--at expects unix seconds or an ISO 8601 time"),
        (["unregister"], "the following arguments are required: DEVICE"),
    ],
)
async def test_usage_errors_exit_2(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await pushctl_main("--socket", str(tmp_path / "none.sock"), *argv) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert "cannot reach pushd" not in captured.err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no registrations"),
        ('{"device_id": "a"}\nnot json\n', "f:2: not valid JSON"),
        ('{"device_id": "a"}\n[1]\n', "f:2: a registration must be a JSON object"),
        ('[{"device_id": "a"}, 5]', "f: entry 2: a registration must be a JSON object"),
        ("[{", "f: not a valid JSON array"),
    ],
)
def test_bad_registration_files(text: str, message: str) -> None:
    with pytest.raises(pushctl.UsageError, match=message):
        pushctl.parse_registrations(text, "f")


def test_attribute_values_are_json_ish() -> None:
    assert pushctl.parse_pairs(
        ["tier=gold", "age=41", "beta=true", "tags=[\"a\",1]", "code=\"007\"", "eq=a=b", "none=null"], "--attr"
    ) == {"tier": "gold", "age": 41, "beta": True, "tags": ["a", 1], "code": "007", "eq": "a=b", "none": None}


def test_payload_file_with_flags_on_top(tmp_path: Path) -> None:
    payload = tmp_path / "n.json"
    payload.write_text(json.dumps({"aps": {"alert": {"title": "old", "subtitle": "s"}, "sound": "a.caf"},
                                   "topic": TOPIC, "custom": {"k": 1}}))
    ns = pushctl.build_parser().parse_args(
        ["push", "--payload", str(payload), "--title", "new", "--custom", "j=2", "--push-type", "alert",
         "--filter", '{"field": "device.locale", "eq": "en_US"}', "--follow-up", '{"after": 60}', "--ttl", "30"]
    )
    assert pushctl.push_args(ns) == {
        "notification": {
            "aps": {"alert": {"title": "new", "subtitle": "s"}, "sound": "a.caf"},
            "topic": TOPIC, "custom": {"k": 1, "j": 2}, "push_type": "alert",
        },
        "target": {"filter": {"field": "device.locale", "eq": "en_US"}},
        "priority": 10,
        "ttl": 30.0,
        "follow_up": {"after": 60},
    }


# -- the client side against fake handler tables ----------------------------------------------


class Fake:
    """A handler table recording every request; ``message`` answers from ``states``."""

    def __init__(self, states: list[dict[str, Any]]) -> None:
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.states = states

    def table(self) -> dict[str, Handler]:
        async def report(args: dict[str, Any], peer: Peer) -> Any:
            self.requests.append(("report", args))
            if args.get("name") == "":
                raise OpError(ErrorCode.INVALID_ARGUMENT, "name: must not be empty", field="name")
            return {"accepted": True}

        async def push(args: dict[str, Any], peer: Peer) -> Any:
            self.requests.append(("push", args))
            return {"message_id": "m-1", "targeted": 3}

        async def message(args: dict[str, Any], peer: Peer) -> Any:
            self.requests.append(("message", args))
            return self.states[min(len(self.requests) - 2, len(self.states) - 1)]

        return {"report": report, "push": push, "message": message}


def state(queued: int, sent: int, fanout: str, audience: int = 3) -> dict[str, Any]:
    states = dict.fromkeys(("queued", "leased", "sent", "failed", "expired", "skipped", "dead"), 0)
    states.update(queued=queued, sent=sent)
    return {"message_id": "m-1", "state": "active", "audience": audience, "enqueued": queued + sent,
            "states": states, "outcomes": {}, "reasons": {}, "fanout": fanout, "devices": []}


@pytest.fixture
async def fake(nursery: trio.Nursery, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[tuple[Fake, Path]]:
    states = getattr(request, "param", [state(0, 3, "done")])
    f = Fake(states)
    path = tmp_path / "fake.sock"
    await nursery.start(ControlServer(path, f.table()).run)
    yield f, path


async def test_report_client_method_and_subcommand(
    fake: tuple[Fake, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    f, path = fake

    def use_client() -> None:
        with Client(path) as client:
            assert client.report("u1", "opened", device_id="d1", attributes={"n": 2}, at=1700000000.5) == {
                "accepted": True
            }
            client.report("u2", "purchase")
            with pytest.raises(RequestFailed) as info:
                client.report("u3", "")
            assert info.value.field == "name"

    await trio.to_thread.run_sync(use_client)
    assert await pushctl_main("--socket", str(path), "report", "u4", "opened", "--device", "d4",
                              "--attr", "screen=inbox", "--attr", "ms=120", "--at", "2024-01-02T03:04:05") == 0
    assert last_json(capsys) == {"accepted": True}
    assert f.requests == [
        ("report", {"user_id": "u1", "name": "opened", "device_id": "d1", "attributes": {"n": 2}, "at": 1700000000.5}),
        ("report", {"user_id": "u2", "name": "purchase"}),
        ("report", {"user_id": "u3", "name": ""}),
        ("report", {"user_id": "u4", "name": "opened", "device_id": "d4",
                    "attributes": {"screen": "inbox", "ms": 120}, "at": 1704164645.0}),
    ]


@pytest.mark.parametrize(
    "fake", [[state(3, 0, "running", audience=10), state(1, 2, "running", audience=10), state(0, 3, "done")]],
    indirect=True,
)
async def test_wait_follows_fanout_and_reports_progress(fake: tuple[Fake, Path]) -> None:
    f, path = fake
    seen: list[tuple[int, str]] = []

    def use_client() -> dict[str, Any]:
        with Client(path) as client:
            client.push({"aps": {"alert": "x"}, "topic": TOPIC}, {"all": True}, priority=3, ttl=60)
            return client.wait("m-1", timeout=10, poll=0.01,
                               on_progress=lambda s: seen.append((s["states"]["sent"], s["fanout"])))

    final = await trio.to_thread.run_sync(use_client)
    assert final["fanout"] == "done" and final["states"]["sent"] == 3
    assert seen == [(0, "running"), (2, "running"), (3, "done")]
    assert f.requests[0] == ("push", {"notification": {"aps": {"alert": "x"}, "topic": TOPIC},
                                      "target": {"all": True}, "priority": 3, "ttl": 60})
    assert f.requests[1] == ("message", {"message_id": "m-1", "page": 0, "page_size": 100})
    # done pending but fan-out still running is not settled; the audience is the total meanwhile
    assert not settled(state(0, 3, "running"))
    assert pushctl.progress_counts(state(1, 2, "running", audience=10)) == (2, 10)
    assert pushctl.progress_counts(state(0, 3, "done", audience=10)) == (3, 3)


@pytest.mark.parametrize("fake", [[state(2, 1, "done")]], indirect=True)
async def test_wait_timeout(fake: tuple[Fake, Path], capsys: pytest.CaptureFixture[str]) -> None:
    _, path = fake

    def use_client() -> None:
        with Client(path) as client, pytest.raises(WaitTimeout) as info:
            client.wait("m-1", timeout=0.2, poll=0.05)
        assert isinstance(info.value, TimeoutError)
        assert info.value.state["states"]["queued"] == 2
        assert "not settled after 0.2 s (2 item(s) pending" in str(info.value)

    await trio.to_thread.run_sync(use_client)
    code = await pushctl_main("--socket", str(path), "push", "--topic", TOPIC, "--alert", "x", "--all",
                              "--wait", "--wait-timeout", "0.2", "--poll", "0.05")
    assert code == pushctl.EXIT_WAIT_TIMEOUT == 4
    captured = capsys.readouterr()
    assert json.loads(captured.out)["states"]["queued"] == 2  # the last state seen
    assert "not settled after 0.2 s" in captured.err
    # not a terminal: a plain progress line, no carriage returns
    assert "\r" not in captured.err
    assert "1/3  sent 1  failed 0  skipped 0  dead 0" in captured.err


@pytest.mark.parametrize("fake", [[state(0, 1, "failed")]], indirect=True)
async def test_wait_on_a_failed_fanout_exits_1(fake: tuple[Fake, Path], capsys: pytest.CaptureFixture[str]) -> None:
    _, path = fake
    code = await pushctl_main("--socket", str(path), "push", "--topic", TOPIC, "--alert", "x", "--all", "--wait")
    assert code == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["fanout"] == "failed"
    assert "fan-out failed" in captured.err
