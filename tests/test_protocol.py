"""Framing, request validation and replies of the control-socket protocol."""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import pytest
import trio
import trio.testing

from pushd.protocol import (
    PROTOCOL_VERSION,
    ErrorCode,
    OpError,
    ProtocolError,
    Reply,
    Request,
    decode_payload,
    encode_frame,
    error_reply,
    get_arg,
    ok_reply,
    read_frame,
    reject_unknown_args,
    request_id_of,
)


def raw_frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


async def read_all(stream: trio.abc.ReceiveStream, max_size: int = 1024) -> list[Any]:
    buffer = bytearray()
    frames = []
    while (frame := await read_frame(stream, max_size=max_size, buffer=buffer)) is not None:
        frames.append(frame)
    return frames


def test_error_codes_are_the_stable_wire_strings() -> None:
    assert {code.name: code.value for code in ErrorCode} == {
        "BAD_FRAME": "bad_frame",
        "FRAME_TOO_LARGE": "frame_too_large",
        "BAD_REQUEST": "bad_request",
        "UNSUPPORTED_VERSION": "unsupported_version",
        "UNKNOWN_OP": "unknown_op",
        "INVALID_ARGUMENT": "invalid_argument",
        "NOT_FOUND": "not_found",
        "NOT_ALLOWED": "not_allowed",
        "CONFLICT": "conflict",
        "UNAVAILABLE": "unavailable",
        "INTERNAL": "internal",
    }


def test_encode_frame_is_length_prefixed_msgpack() -> None:
    obj = {"v": 1, "id": 7, "op": "ping", "args": {"blob": b"\x00\xff", "text": "héllo"}}
    frame = encode_frame(obj)
    (length,) = struct.unpack(">I", frame[:4])
    assert length == len(frame) - 4
    assert decode_payload(frame[4:]) == obj


async def test_frame_split_into_single_bytes_is_reassembled() -> None:
    send, receive = trio.testing.memory_stream_one_way_pair()
    frame = encode_frame({"op": "ping", "n": list(range(20))})
    got: list[Any] = []

    async def reader() -> None:
        got.extend(await read_all(receive))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        for i in range(len(frame)):
            await send.send_all(frame[i : i + 1])
            # The reader has consumed this byte before the next one is sent.
            await trio.testing.wait_all_tasks_blocked()
            assert got == []
        await send.aclose()
    assert got == [{"op": "ping", "n": list(range(20))}]


async def test_several_frames_in_one_chunk_then_clean_eof() -> None:
    send, receive = trio.testing.memory_stream_one_way_pair()
    await send.send_all(encode_frame({"n": 1}) + encode_frame("two") + encode_frame([3]))
    await send.aclose()
    assert await read_all(receive) == [{"n": 1}, "two", [3]]


async def test_frame_and_a_half_in_one_chunk() -> None:
    send, receive = trio.testing.memory_stream_one_way_pair()
    second = encode_frame({"n": 2})
    await send.send_all(encode_frame({"n": 1}) + second[:3])
    buffer = bytearray()
    assert await read_frame(receive, max_size=1024, buffer=buffer) == {"n": 1}
    assert buffer == second[:3]
    await send.send_all(second[3:])
    assert await read_frame(receive, max_size=1024, buffer=buffer) == {"n": 2}
    assert buffer == b""


@pytest.mark.parametrize("cut", [1, 3, 4, 10])
async def test_truncated_frame_is_a_protocol_error(cut: int) -> None:
    send, receive = trio.testing.memory_stream_one_way_pair()
    frame = encode_frame({"op": "ping", "pad": "x" * 20})
    await send.send_all(frame[:cut])
    await send.aclose()
    with pytest.raises(ProtocolError) as info:
        await read_frame(receive, max_size=1024, buffer=bytearray())
    assert info.value.code is ErrorCode.BAD_FRAME
    assert "closed in the middle of a frame" in info.value.message


async def test_oversized_frame_is_refused_from_its_header_alone() -> None:
    send, receive = trio.testing.memory_stream_one_way_pair()
    # Only the header is sent: the reader must not wait for a megabyte that may never come.
    await send.send_all(struct.pack(">I", 1025))
    with pytest.raises(ProtocolError) as info:
        await read_frame(receive, max_size=1024, buffer=bytearray())
    assert info.value.code is ErrorCode.FRAME_TOO_LARGE
    assert "1025" in info.value.message and "1024" in info.value.message


async def test_frame_exactly_at_the_limit_is_accepted() -> None:
    send, receive = trio.testing.memory_stream_one_way_pair()
    payload = msgpack.packb("x" * 1000)
    await send.send_all(raw_frame(payload))
    assert await read_frame(receive, max_size=len(payload), buffer=bytearray()) == "x" * 1000


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\xc1", id="never-used-byte"),
        pytest.param(b"\x82\xa1a", id="incomplete-map"),
        pytest.param(msgpack.packb({1: "int key"}), id="int-map-key"),
        pytest.param(msgpack.packb(msgpack.ExtType(5, b"x")), id="ext-type"),
        pytest.param(b"\xa2\xff\xfe", id="invalid-utf8"),
        pytest.param(msgpack.packb(1) + b"\x01", id="trailing-bytes"),
        pytest.param(b"\xdd\xff\xff\xff\xff", id="huge-array-claim"),
    ],
)
async def test_malformed_payload_is_a_bad_frame(payload: bytes) -> None:
    send, receive = trio.testing.memory_stream_one_way_pair()
    await send.send_all(raw_frame(payload))
    with pytest.raises(ProtocolError) as info:
        await read_frame(receive, max_size=1024, buffer=bytearray())
    assert info.value.code is ErrorCode.BAD_FRAME


async def test_non_map_frame_reads_fine_but_is_a_bad_request() -> None:
    send, receive = trio.testing.memory_stream_one_way_pair()
    await send.send_all(encode_frame([1, "ping"]))
    obj = await read_frame(receive, max_size=1024, buffer=bytearray())
    assert obj == [1, "ping"]
    with pytest.raises(OpError) as info:
        Request.parse(obj)
    assert info.value.code is ErrorCode.BAD_REQUEST
    assert "map" in info.value.message


def test_request_parse_accepts_a_valid_request() -> None:
    request = Request.parse({"v": 1, "id": "a1", "op": "status", "args": {"x": 1}, "future": 0})
    assert request == Request(v=1, id="a1", op="status", args={"x": 1})
    assert Request.parse({"v": 1, "id": 3, "op": "ping"}).args == {}


@pytest.mark.parametrize(
    ("obj", "code", "field"),
    [
        ({"id": 1, "op": "ping", "args": {}}, ErrorCode.BAD_REQUEST, "v"),
        ({"v": "1", "id": 1, "op": "ping", "args": {}}, ErrorCode.BAD_REQUEST, "v"),
        ({"v": True, "id": 1, "op": "ping", "args": {}}, ErrorCode.BAD_REQUEST, "v"),
        ({"v": 2, "id": 1, "op": "ping", "args": {}}, ErrorCode.UNSUPPORTED_VERSION, "v"),
        ({"v": 1, "op": "ping", "args": {}}, ErrorCode.BAD_REQUEST, "id"),
        ({"v": 1, "id": 1.5, "op": "ping", "args": {}}, ErrorCode.BAD_REQUEST, "id"),
        ({"v": 1, "id": None, "op": "ping", "args": {}}, ErrorCode.BAD_REQUEST, "id"),
        ({"v": 1, "id": False, "op": "ping", "args": {}}, ErrorCode.BAD_REQUEST, "id"),
        ({"v": 1, "id": 1, "args": {}}, ErrorCode.BAD_REQUEST, "op"),
        ({"v": 1, "id": 1, "op": 5, "args": {}}, ErrorCode.BAD_REQUEST, "op"),
        ({"v": 1, "id": 1, "op": "", "args": {}}, ErrorCode.BAD_REQUEST, "op"),
        ({"v": 1, "id": 1, "op": "ping", "args": [1]}, ErrorCode.BAD_REQUEST, "args"),
        ({"v": 1, "id": 1, "op": "ping", "args": {b"k": 1}}, ErrorCode.BAD_REQUEST, "args"),
    ],
)
def test_request_parse_names_the_offending_key(obj: dict[str, Any], code: ErrorCode, field: str) -> None:
    with pytest.raises(OpError) as info:
        Request.parse(obj)
    assert info.value.code is code
    assert info.value.field == field


def test_unsupported_version_lists_the_supported_one() -> None:
    with pytest.raises(OpError) as info:
        Request.parse({"v": 9, "id": 1, "op": "ping"})
    assert info.value.details == {"supported": [PROTOCOL_VERSION]}


def test_request_id_of_is_best_effort() -> None:
    assert request_id_of({"id": 4}) == 4
    assert request_id_of({"id": "x"}) == "x"
    assert request_id_of({"id": [1]}) is None
    assert request_id_of({"id": True}) is None
    assert request_id_of("junk") is None


def test_ok_and_error_replies_round_trip_through_reply_parse() -> None:
    ok = ok_reply(5, {"pong": True})
    assert ok == {"v": PROTOCOL_VERSION, "id": 5, "result": {"pong": True}}
    assert Reply.parse(decode_payload(encode_frame(ok)[4:])) == Reply(id=5, result={"pong": True})

    err = OpError(ErrorCode.INVALID_ARGUMENT, "bad token", field="token", details={"len": 3})
    wire = error_reply("r1", err)
    assert wire["error"] == {
        "code": "invalid_argument",
        "message": "bad token",
        "field": "token",
        "details": {"len": 3},
    }
    parsed = Reply.parse(decode_payload(encode_frame(wire)[4:]))
    assert parsed.id == "r1"
    assert parsed.error is not None
    assert (parsed.error.code, parsed.error.message, parsed.error.field, parsed.error.details) == (
        "invalid_argument", "bad token", "token", {"len": 3},
    )


def test_error_reply_omits_empty_field_and_details() -> None:
    wire = error_reply(None, OpError(ErrorCode.INTERNAL, "boom"))
    assert wire == {"v": PROTOCOL_VERSION, "id": None, "error": {"code": "internal", "message": "boom"}}


@pytest.mark.parametrize(
    "obj",
    [[1], {"id": 1}, {"id": [1], "result": 1}, {"id": 1, "error": "oops"}, {"id": 1, "error": {"code": 1}}],
)
def test_reply_parse_rejects_non_replies(obj: Any) -> None:
    with pytest.raises(ProtocolError):
        Reply.parse(obj)


def test_get_arg_checks_presence_and_type() -> None:
    args = {"name": "x", "count": 3, "flag": True}
    assert get_arg(args, "name", str) == "x"
    assert get_arg(args, "count", int) == 3
    assert get_arg(args, "missing", int, 7) == 7
    assert get_arg(args, "flag", bool) is True
    with pytest.raises(OpError) as info:
        get_arg(args, "missing", int)
    assert (info.value.code, info.value.field) == (ErrorCode.INVALID_ARGUMENT, "missing")
    with pytest.raises(OpError) as info:
        get_arg(args, "name", int)
    assert info.value.field == "name" and "int" in info.value.message
    with pytest.raises(OpError):  # a bool is not an int here, whatever Python thinks
        get_arg(args, "flag", int)


def test_reject_unknown_args_names_the_first_stranger() -> None:
    reject_unknown_args({"a": 1}, ("a", "b"))
    with pytest.raises(OpError) as info:
        reject_unknown_args({"a": 1, "zz": 2}, ("a",))
    assert (info.value.code, info.value.field) == (ErrorCode.INVALID_ARGUMENT, "zz")
