"""The control-socket protocol: framing, requests, replies and error codes.

A frame is a 4-byte big-endian payload length followed by one msgpack value.

Request (a map)::

    {"v": 1, "id": <int | str>, "op": <str>, "args": {<str>: ...}}

``args`` may be omitted (it means ``{}``); unknown top-level keys are ignored.

Reply (a map), exactly one of ``result`` / ``error``::

    {"v": 1, "id": <the request's id, or nil if it could not be read>, "result": ...}
    {"v": 1, "id": ..., "error": {"code": <ErrorCode>, "message": <str>,
                                  "field": <str, optional>, "details": <map, optional>}}

Error codes are stable snake_case strings (:class:`ErrorCode`); messages are for humans.

Everything here is plain Python except :func:`read_frame`, the async reader for trio streams.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import msgpack

if TYPE_CHECKING:
    import trio

PROTOCOL_VERSION = 1
DEFAULT_MAX_FRAME = 1 << 20

_HEADER = struct.Struct(">I")
HEADER_SIZE = _HEADER.size


class ErrorCode(StrEnum):
    BAD_FRAME = "bad_frame"
    FRAME_TOO_LARGE = "frame_too_large"
    BAD_REQUEST = "bad_request"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_OP = "unknown_op"
    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    NOT_ALLOWED = "not_allowed"
    CONFLICT = "conflict"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


class ProtocolError(Exception):
    """A frame could not be read (truncated, oversized, not msgpack): the stream is unusable."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class OpError(Exception):
    """Raised by op handlers to send an error reply; ``field`` names the offending argument."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        field: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.details: dict[str, Any] = dict(details) if details else {}

    def __str__(self) -> str:
        where = f" ({self.field})" if self.field else ""
        return f"{self.code}{where}: {self.message}"

    def to_wire(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": str(self.code), "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        if self.details:
            error["details"] = self.details
        return error


def _is_request_id(value: object) -> bool:
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


@dataclass(frozen=True)
class Request:
    v: int
    id: int | str
    op: str
    args: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def parse(cls, obj: Any) -> Request:
        """Validate a decoded frame; raises :class:`OpError` naming the offending key."""
        if not isinstance(obj, dict):
            raise OpError(ErrorCode.BAD_REQUEST, f"a request must be a map, not {_kind(obj)}")
        if "v" not in obj:
            raise OpError(ErrorCode.BAD_REQUEST, "missing key 'v' (protocol version)", field="v")
        version = obj["v"]
        if not isinstance(version, int) or isinstance(version, bool):
            raise OpError(ErrorCode.BAD_REQUEST, "'v' must be an integer", field="v")
        if version != PROTOCOL_VERSION:
            raise OpError(
                ErrorCode.UNSUPPORTED_VERSION,
                f"protocol version {version} is not supported (this daemon speaks {PROTOCOL_VERSION})",
                field="v",
                details={"supported": [PROTOCOL_VERSION]},
            )
        if "id" not in obj:
            raise OpError(ErrorCode.BAD_REQUEST, "missing key 'id'", field="id")
        request_id = obj["id"]
        if not _is_request_id(request_id):
            raise OpError(ErrorCode.BAD_REQUEST, "'id' must be an integer or a string", field="id")
        if "op" not in obj:
            raise OpError(ErrorCode.BAD_REQUEST, "missing key 'op'", field="op")
        op = obj["op"]
        if not isinstance(op, str) or not op:
            raise OpError(ErrorCode.BAD_REQUEST, "'op' must be a non-empty string", field="op")
        args = obj.get("args", {})
        if not isinstance(args, dict):
            raise OpError(ErrorCode.BAD_REQUEST, "'args' must be a map", field="args")
        for key in args:
            if not isinstance(key, str):
                raise OpError(ErrorCode.BAD_REQUEST, "'args' keys must be strings", field="args")
        return cls(v=version, id=request_id, op=op, args=args)


def request_id_of(obj: Any) -> int | str | None:
    """The id of a (possibly invalid) request, if it has a usable one: for error replies."""
    if isinstance(obj, dict):
        request_id = obj.get("id")
        if _is_request_id(request_id):
            return request_id
    return None


def ok_reply(id: int | str | None, result: Any) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "id": id, "result": result}


def error_reply(id: int | str | None, err: OpError) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "id": id, "error": err.to_wire()}


@dataclass(frozen=True)
class ReplyError:
    code: str  # an ErrorCode value, or a code this client does not know yet
    message: str
    field: str | None = None
    details: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class Reply:
    id: int | str | None
    result: Any = None
    error: ReplyError | None = None

    @classmethod
    def parse(cls, obj: Any) -> Reply:
        """Validate a decoded reply frame (client side); ProtocolError if it is not one."""
        if not isinstance(obj, dict):
            raise ProtocolError(ErrorCode.BAD_FRAME, f"a reply must be a map, not {_kind(obj)}")
        request_id = obj.get("id")
        if request_id is not None and not _is_request_id(request_id):
            raise ProtocolError(ErrorCode.BAD_FRAME, "reply 'id' must be an integer or a string")
        if "error" in obj:
            error = obj["error"]
            if (
                not isinstance(error, dict)
                or not isinstance(error.get("code"), str)
                or not isinstance(error.get("message"), str)
            ):
                raise ProtocolError(ErrorCode.BAD_FRAME, "reply 'error' must carry code and message")
            err_field = error.get("field")
            details = error.get("details") or {}
            return cls(
                id=request_id,
                error=ReplyError(
                    code=error["code"],
                    message=error["message"],
                    field=err_field if isinstance(err_field, str) else None,
                    details=details if isinstance(details, dict) else {"details": details},
                ),
            )
        if "result" not in obj:
            raise ProtocolError(ErrorCode.BAD_FRAME, "a reply must carry 'result' or 'error'")
        return cls(id=request_id, result=obj["result"])


def encode_frame(obj: Any) -> bytes:
    """One frame: length header + msgpack payload. TypeError if ``obj`` is not encodable."""
    payload: bytes = msgpack.packb(obj, use_bin_type=True, datetime=False)
    return _HEADER.pack(len(payload)) + payload


def decode_payload(data: bytes) -> Any:
    """Strictly decode one msgpack value that must fill ``data`` exactly.

    Map keys must be str or bytes, strings must be valid UTF-8, extension types other than
    msgpack's own timestamp are refused, and container/string sizes are bounded by the
    payload size (msgpack's default for ``unpackb``). ProtocolError(BAD_FRAME)
    otherwise.
    """
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=_refuse_ext,
        )
    except Exception as exc:  # msgpack raises a variety of ValueError/TypeError subclasses
        detail = str(exc) or type(exc).__name__
        raise ProtocolError(ErrorCode.BAD_FRAME, f"payload is not a valid msgpack value: {detail}") from exc


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is not allowed")


def take_frame(buffer: bytearray, *, max_size: int) -> bytes | None:
    """Remove one complete frame's payload from the front of ``buffer``, or None if incomplete.

    Raises ProtocolError(FRAME_TOO_LARGE) as soon as the header announces more than
    ``max_size`` bytes.
    """
    if len(buffer) < HEADER_SIZE:
        return None
    (length,) = _HEADER.unpack_from(buffer)
    if length > max_size:
        raise ProtocolError(
            ErrorCode.FRAME_TOO_LARGE,
            f"frame of {length} bytes exceeds the limit of {max_size} bytes",
        )
    end = HEADER_SIZE + length
    if len(buffer) < end:
        return None
    payload = bytes(buffer[HEADER_SIZE:end])
    del buffer[:end]
    return payload


async def read_frame(
    stream: trio.abc.ReceiveStream, *, max_size: int, buffer: bytearray
) -> Any | None:
    """Read and decode the next frame from ``stream``.

    ``buffer`` holds bytes received beyond the previous frame; pass the same bytearray on every
    call for one stream. Returns None on a clean EOF between frames; raises ProtocolError on a
    truncated, oversized or malformed frame.
    """
    payload = await read_payload(stream, max_size=max_size, buffer=buffer)
    return None if payload is None else decode_payload(payload)


async def read_payload(
    stream: trio.abc.ReceiveStream, *, max_size: int, buffer: bytearray
) -> bytes | None:
    """:func:`read_frame` without the decoding: the next frame's payload bytes."""
    while True:
        payload = take_frame(buffer, max_size=max_size)
        if payload is not None:
            return payload
        chunk = await stream.receive_some()
        if not chunk:
            if not buffer:
                return None
            raise ProtocolError(
                ErrorCode.BAD_FRAME,
                f"connection closed in the middle of a frame ({len(buffer)} bytes pending)",
            )
        buffer += chunk


_MISSING: Any = object()


def get_arg(args: Mapping[str, Any], name: str, kind: type | tuple[type, ...], default: Any = _MISSING) -> Any:
    """Fetch one handler argument, raising OpError(INVALID_ARGUMENT, field=name) if it is
    missing (and no default is given) or of the wrong type."""
    if name not in args:
        if default is _MISSING:
            raise OpError(ErrorCode.INVALID_ARGUMENT, f"missing argument {name!r}", field=name)
        return default
    value = args[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    bool_mismatch = isinstance(value, bool) and bool not in kinds
    if bool_mismatch or not isinstance(value, kinds):
        expected = " or ".join(k.__name__ for k in kinds)
        raise OpError(
            ErrorCode.INVALID_ARGUMENT,
            f"argument {name!r} must be {expected}, not {_kind(value)}",
            field=name,
        )
    return value


def reject_unknown_args(args: Mapping[str, Any], allowed: tuple[str, ...] | frozenset[str] = ()) -> None:
    """OpError(INVALID_ARGUMENT) naming the first argument not in ``allowed``."""
    for name in args:
        if name not in allowed:
            raise OpError(ErrorCode.INVALID_ARGUMENT, f"unexpected argument {name!r}", field=name)


def _kind(value: object) -> str:
    return "nil" if value is None else type(value).__name__
