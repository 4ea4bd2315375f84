"""Encoding and bounded decoding of lorad messages (sans-IO: bytes in, values out).

A message travels as two ZeroMQ frames: the tag ``b"lorad/1"`` and a msgpack map. The tag lets a
peer reject a foreign or newer client without decoding the body.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import msgpack

from .errors import ErrorCode, ProtocolError, echo
from .limits import DEFAULT_LIMITS, Limits

PROTOCOL_VERSION = 1
TAG = b"lorad/%d" % PROTOCOL_VERSION
TAG_PREFIX = b"lorad/"

RequestId = int | str
ReplyKind = Literal["result", "item", "end", "error", "hb"]
REPLY_KINDS: frozenset[str] = frozenset({"result", "item", "end", "error", "hb"})
MAX_ID_LEN = 64


@dataclass
class Request:
    """One client request: ``op`` with ``args``, answered under the client-chosen ``id``."""

    id: RequestId
    op: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class Reply:
    """One daemon reply. ``kind`` says which of the payload fields is set.

    - ``result``: the request's single answer (``result``);
    - ``item``: one element of a stream (``seq`` from 0, ``item``);
    - ``end``: the end of a stream (``seq``, ``result`` with ``finish_reason`` and ``metrics``);
    - ``error``: the request failed (``error`` = ``{code, message, details}``);
    - ``hb``: a liveness probe with no request id; clients ignore it.
    """

    kind: ReplyKind
    id: RequestId | None = None
    result: Any = None
    item: Any = None
    seq: int | None = None
    error: dict[str, Any] | None = None


def _no_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(ErrorCode.BAD_REQUEST, f"msgpack extension type {code} is not allowed")


def _unpack(body: bytes, limits: Limits) -> Any:
    if len(body) > limits.max_message_bytes:
        raise ProtocolError(
            ErrorCode.TOO_LARGE,
            f"message of {len(body)} bytes exceeds {limits.max_message_bytes}",
            limit=limits.max_message_bytes,
        )
    try:
        value = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=_no_ext,
            max_str_len=limits.max_str_len,
            max_bin_len=limits.max_bin_len,
            max_array_len=limits.max_array_len,
            max_map_len=limits.max_map_len,
            max_ext_len=0,
        )
    except ProtocolError:
        raise
    except msgpack.StackError:  # nested deeper than msgpack's own stack: over max_depth anyway
        raise ProtocolError(
            ErrorCode.TOO_LARGE, f"nesting deeper than {limits.max_depth}", limit=limits.max_depth
        ) from None
    except ValueError as exc:  # includes ExtraData, length limits, bad UTF-8
        # msgpack reports a str/bin/array/map over its limit as "N exceeds max_str_len(M)";
        # max_ext_len is 0 only to refuse extension types, which is bad_request.
        text = str(exc)
        too_large = "exceeds max_" in text and "max_ext_len" not in text
        code = ErrorCode.TOO_LARGE if too_large else ErrorCode.BAD_REQUEST
        raise ProtocolError(code, f"undecodable msgpack: {exc}") from None
    except Exception as exc:  # FormatError, OutOfData, TypeError (bad map keys)
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f"undecodable msgpack: {type(exc).__name__}: {exc}"
        ) from None
    # Each level of nesting starts with a map or array header byte (0x80-0x9f, 0xdc-0xdf): a
    # body with no more such bytes than max_depth cannot nest deeper, and needs no walk.
    if len(body.translate(None, _NOT_CONTAINER_BYTES)) > limits.max_depth:
        _check_depth(value, limits.max_depth)
    return value


_NOT_CONTAINER_BYTES = bytes(b for b in range(256)
                             if not (0x80 <= b <= 0x9F or 0xDC <= b <= 0xDF))


def _check_depth(value: Any, max_depth: int) -> None:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > max_depth:
            raise ProtocolError(
                ErrorCode.TOO_LARGE, f"nesting deeper than {max_depth}", limit=max_depth
            )
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))


def _check_tag(tag: bytes) -> None:
    if tag == TAG:
        return
    if not isinstance(tag, (bytes, bytearray, memoryview)):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "frames must be bytes")
    tag = bytes(tag)
    if tag.startswith(TAG_PREFIX):
        raise ProtocolError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"protocol {tag.decode('ascii', 'replace')} is not supported",
            supported=[PROTOCOL_VERSION],
        )
    raise ProtocolError(ErrorCode.BAD_REQUEST, "not a lorad message (missing tag frame)")


def _check_id(value: Any) -> RequestId:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "id must be an integer or a string", field="id")
    if isinstance(value, str) and not 0 < len(value) <= MAX_ID_LEN:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f"id must have 1..{MAX_ID_LEN} characters", field="id"
        )
    if isinstance(value, int) and not 0 <= value < 2**63:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "id must be in 0..2**63-1", field="id")
    return value


def encode_request(request: Request) -> list[bytes]:
    """Frames for one request."""
    body = {"v": PROTOCOL_VERSION, "id": request.id, "op": request.op, "args": request.args}
    return [TAG, msgpack.packb(body, use_bin_type=True)]


def decode_request(frames: list[bytes], limits: Limits = DEFAULT_LIMITS) -> Request:
    """Parse untrusted frames into a Request; raises only ProtocolError.

    The error's ``details`` carry ``id`` when the request id could be read, so that the answer
    can reach the right waiter.
    """
    if len(frames) != 2:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"expected 2 frames, got {len(frames)}")
    _check_tag(frames[0])
    body = _unpack(frames[1], limits)
    if not isinstance(body, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "message body must be a map")
    rid = _check_id(body.get("id"))
    try:
        version = body.get("v")
        # `type(...) is int`: neither true (== 1 in Python) nor 1.0 is the version 1.
        if type(version) is not int or version != PROTOCOL_VERSION:
            raise ProtocolError(
                ErrorCode.UNSUPPORTED_VERSION,
                f"protocol version {echo(version)!r} is not supported",
                supported=[PROTOCOL_VERSION],
            )
        op = body.get("op")
        if not isinstance(op, str):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "op must be a string", field="op")
        args = body.get("args", {})
        if not isinstance(args, dict):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "args must be a map", field="args")
        extra = set(body) - {"v", "id", "op", "args"}
        if extra:  # keys may mix str and bytes (msgpack bin), which do not sort together
            raise ProtocolError(
                ErrorCode.BAD_REQUEST,
                f"unknown message fields: {sorted(extra, key=str)}",
                field="message",
            )
    except ProtocolError as exc:
        exc.details.setdefault("id", rid)
        raise
    return Request(id=rid, op=op, args=args)


def encode_reply(reply: Reply) -> list[bytes]:
    """Frames for one reply."""
    body: dict[str, Any] = {"v": PROTOCOL_VERSION, "kind": reply.kind}
    if reply.id is not None:
        body["id"] = reply.id
    if reply.kind == "result":
        body["result"] = reply.result
    elif reply.kind == "item":
        body["seq"] = reply.seq
        body["item"] = reply.item
    elif reply.kind == "end":
        body["seq"] = reply.seq
        body["result"] = reply.result
    elif reply.kind == "error":
        body["error"] = reply.error
    return [TAG, msgpack.packb(body, use_bin_type=True)]


def error_reply(rid: RequestId | None, exc: ProtocolError) -> Reply:
    return Reply(kind="error", id=rid, error=exc.to_wire())


def decode_reply(frames: list[bytes], limits: Limits = DEFAULT_LIMITS) -> Reply:
    """Parse a daemon's frames into a Reply; raises only ProtocolError."""
    if len(frames) != 2:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"expected 2 frames, got {len(frames)}")
    _check_tag(frames[0])
    body = _unpack(frames[1], limits)
    kind = body.get("kind") if isinstance(body, dict) else None
    if not isinstance(kind, str) or kind not in REPLY_KINDS:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "reply must be a map with a known kind")
    rid = body.get("id")
    if kind != "hb" and rid is not None:
        rid = _check_id(rid)
    seq = body.get("seq")
    if kind in ("item", "end") and (isinstance(seq, bool) or not isinstance(seq, int) or seq < 0):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"{kind} reply without a valid seq")
    if kind == "item" and not isinstance(body.get("item"), dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "item reply without an item map")
    if kind == "end" and not isinstance(body.get("result"), dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "end reply without a result map")
    error = body.get("error")
    if kind == "error" and not (
        isinstance(error, dict)
        and isinstance(error.get("code"), str)
        and isinstance(error.get("message", ""), str)
        and isinstance(error.get("details") or {}, dict)
    ):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "error reply without a valid error map")
    return Reply(
        kind=kind,
        id=rid,
        result=body.get("result"),
        item=body.get("item"),
        seq=seq,
        error=error,
    )
