"""Unit tests of the sans-IO wire protocol (``lorad.protocol``): codec, limits, validation."""

from __future__ import annotations

import math
import os
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lorad.protocol import (
    DEFAULT_LIMITS,
    OPS,
    PROTOCOL_VERSION,
    STREAMING_OPS,
    TAG,
    ErrorCode,
    Limits,
    ProtocolError,
    Reply,
    Request,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
    error_reply,
    validate_args,
)
from lorad.protocol.ops import SPECS

# -- helpers ---------------------------------------------------------------------------------


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def frames(body: Any) -> list[bytes]:
    return [TAG, pack(body)]


def body(**overrides: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": 1, "op": "ping", "args": {}}
    msg.update(overrides)
    return msg


def request_error(raw: list[bytes], limits: Limits = DEFAULT_LIMITS) -> ProtocolError:
    with pytest.raises(ProtocolError) as err:
        decode_request(raw, limits)
    return err.value


def args_error(op: str, args: dict[str, Any], limits: Limits = DEFAULT_LIMITS) -> ProtocolError:
    with pytest.raises(ProtocolError) as err:
        validate_args(op, args, limits)
    return err.value


# The smallest valid arguments of every operation (each record carries its example).
MINIMAL: dict[str, dict[str, Any]] = {op: spec.example for op, spec in SPECS.items()}


def test_minimal_args_cover_every_op() -> None:
    assert set(MINIMAL) == set(OPS)
    assert STREAMING_OPS == {"generate", "chat"}


# -- request and reply round trips -----------------------------------------------------------


@pytest.mark.parametrize("rid", [0, 1, 2**63 - 1, "a", "x" * 64, "é" * 64, "req-7"])
def test_request_round_trip(rid: int | str) -> None:
    req = Request(id=rid, op="generate", args={"context": "c", "prompt": "é日🎉", "stop": ["\n"]})
    raw = encode_request(req)
    assert raw[0] == TAG == b"lorad/1"
    assert msgpack.unpackb(raw[1]) == {"v": 1, "id": rid, "op": "generate", "args": req.args}
    assert decode_request(raw) == req


@pytest.mark.parametrize("op,args", sorted(MINIMAL.items()))
def test_request_round_trip_every_op(op: str, args: dict[str, Any]) -> None:
    decoded = decode_request(encode_request(Request(id=3, op=op, args=args)))
    assert decoded == Request(id=3, op=op, args=args)
    validate_args(decoded.op, decoded.args)


def test_request_args_may_be_omitted() -> None:
    raw = frames({"v": 1, "id": "r", "op": "ping"})
    assert decode_request(raw) == Request(id="r", op="ping", args={})


def test_bytes_values_survive_as_bytes() -> None:
    req = Request(id=1, op="x", args={"blob": b"\x00\xff"})
    assert decode_request(encode_request(req)).args == {"blob": b"\x00\xff"}


REPLIES = [
    Reply(kind="result", id=1, result={"pong": True, "version": "0.1.0", "protocol": 1}),
    Reply(kind="result", id="abc", result=[1, 2, 3]),
    Reply(kind="result", id=2, result="text"),
    Reply(kind="result", id=2, result=None),
    Reply(kind="item", id=5, seq=0, item={"text": "caf", "token_ids": [17]}),
    Reply(
        kind="item",
        id=5,
        seq=3,
        item={"text": "é", "token_ids": [3], "logprobs": [[[3, -0.1], [9, -2.5]]]},
    ),
    Reply(kind="end", id=5, seq=4, result={"finish_reason": "stop", "metrics": {"seed": 1}}),
    Reply(
        kind="error",
        id=9,
        error={"code": "context_busy", "message": "busy", "details": {"queued": 8}},
    ),
    Reply(kind="error", id=None, error={"code": "bad_request", "message": "x", "details": {}}),
    Reply(kind="hb"),
]


@pytest.mark.parametrize("reply", REPLIES, ids=lambda r: f"{r.kind}-{r.id}")
def test_reply_round_trip(reply: Reply) -> None:
    raw = encode_reply(reply)
    assert raw[0] == TAG
    wire = msgpack.unpackb(raw[1])
    assert wire["v"] == 1 and wire["kind"] == reply.kind
    assert ("id" in wire) == (reply.id is not None)
    expected_keys = {
        "result": {"result"},
        "item": {"seq", "item"},
        "end": {"seq", "result"},
        "error": {"error"},
        "hb": set(),
    }[reply.kind]
    assert set(wire) - {"v", "kind", "id"} == expected_keys
    assert decode_reply(raw) == reply


def test_error_reply_carries_code_message_details() -> None:
    exc = ProtocolError(ErrorCode.NOT_FOUND, "no context 'c'", context="c")
    reply = error_reply(4, exc)
    assert reply == Reply(
        kind="error",
        id=4,
        error={"code": "not_found", "message": "no context 'c'", "details": {"context": "c"}},
    )
    assert decode_reply(encode_reply(reply)) == reply
    assert ProtocolError("too_large", "m").code is ErrorCode.TOO_LARGE
    assert "not_found" in repr(exc)


@pytest.mark.parametrize(
    "wire",
    [
        [1, 2],
        {"v": 1},
        {"v": 1, "kind": "nope"},
        {"v": 1, "kind": ["result"]},
        {"v": 1, "kind": {"a": 1}},
        {"v": 1, "kind": "error", "id": 1},
        {"v": 1, "kind": "error", "id": 1, "error": {"message": "no code"}},
        {"v": 1, "kind": "error", "id": 1, "error": {"code": "x", "details": [1]}},
        {"v": 1, "kind": "error", "id": 1, "error": {"code": "x", "message": 5}},
        {"v": 1, "kind": "result", "id": True, "result": 1},
        {"v": 1, "kind": "result", "id": -1, "result": 1},
        {"v": 1, "kind": "item", "id": 1, "item": {"text": ""}},
        {"v": 1, "kind": "item", "id": 1, "seq": -1, "item": {"text": ""}},
        {"v": 1, "kind": "item", "id": 1, "seq": 0, "item": "text"},
        {"v": 1, "kind": "end", "id": 1, "seq": 0, "result": None},
        {"v": 1, "kind": "end", "id": 1, "seq": True, "result": {}},
    ],
)
def test_decode_reply_refuses_malformed(wire: Any) -> None:
    with pytest.raises(ProtocolError) as err:
        decode_reply(frames(wire))
    assert err.value.code is ErrorCode.BAD_REQUEST


def test_decode_reply_checks_frames_and_tag() -> None:
    good = encode_reply(Reply(kind="hb"))
    with pytest.raises(ProtocolError):
        decode_reply(good[1:])
    with pytest.raises(ProtocolError) as err:
        decode_reply([b"lorad/2", good[1]])
    assert err.value.code is ErrorCode.UNSUPPORTED_VERSION


# -- tag frame, version, body, ids -----------------------------------------------------------


@pytest.mark.parametrize("tag", [b"", b"lorad", b"LORAD/1", b"http/1.1", b"lorad1", b"\xff"])
def test_foreign_tag_is_bad_request(tag: bytes) -> None:
    assert request_error([tag, pack(body())]).code is ErrorCode.BAD_REQUEST


@pytest.mark.parametrize("tag", [b"lorad/2", b"lorad/0", b"lorad/10", b"lorad/\xff"])
def test_other_lorad_version_tag_is_unsupported(tag: bytes) -> None:
    err = request_error([tag, pack(body())])
    assert err.code is ErrorCode.UNSUPPORTED_VERSION
    assert err.details["supported"] == [PROTOCOL_VERSION]


@pytest.mark.parametrize("raw", [[], [TAG], [TAG, pack(body()), b""], [b"", TAG, pack(body())]])
def test_wrong_frame_count(raw: list[bytes]) -> None:
    assert request_error(raw).code is ErrorCode.BAD_REQUEST


def test_non_bytes_tag_frame() -> None:
    raw: list[Any] = ["lorad/1", pack(body())]
    assert request_error(raw).code is ErrorCode.BAD_REQUEST


@pytest.mark.parametrize("version", [2, 0, None, True, 1.0, "1", [1]])
def test_body_version_must_be_the_integer_1(version: Any) -> None:
    err = request_error(frames(body(v=version)))
    assert err.code is ErrorCode.UNSUPPORTED_VERSION
    assert err.details["id"] == 1  # the id was readable: the error can be routed


def test_missing_version() -> None:
    raw = frames({"id": 1, "op": "ping"})
    assert request_error(raw).code is ErrorCode.UNSUPPORTED_VERSION


@pytest.mark.parametrize("value", [[], [1, 2], 1, "ping", None, b"\x01", 1.5, True])
def test_body_must_be_a_map(value: Any) -> None:
    err = request_error(frames(value))
    assert err.code is ErrorCode.BAD_REQUEST
    assert "id" not in err.details


@pytest.mark.parametrize(
    "rid", [True, False, -1, 2**63, 2**64 - 1, "", "x" * 65, 1.0, 2.5, None, [1], {"a": 1}, b"id"]
)
def test_bad_request_ids(rid: Any) -> None:
    err = request_error(frames(body(id=rid)))
    assert err.code is ErrorCode.BAD_REQUEST
    assert err.details["field"] == "id"
    assert "id" not in err.details  # an unreadable id cannot be echoed


def test_missing_id() -> None:
    raw = frames({"v": 1, "op": "ping", "args": {}})
    assert request_error(raw).details["field"] == "id"


@pytest.mark.parametrize("op", [None, 1, ["ping"], b"ping", True])
def test_op_must_be_a_string(op: Any) -> None:
    err = request_error(frames(body(op=op, id="r1")))
    assert err.code is ErrorCode.BAD_REQUEST
    assert (err.details["field"], err.details["id"]) == ("op", "r1")


@pytest.mark.parametrize("args", [None, [], "x", 1, [["a", 1]]])
def test_args_must_be_a_map(args: Any) -> None:
    err = request_error(frames(body(args=args, id=2)))
    assert (err.code, err.details["field"], err.details["id"]) == (ErrorCode.BAD_REQUEST, "args", 2)


@pytest.mark.parametrize("extra", [{"x": 1}, {"ID": 1}, {"version": 1}, {b"v": 1}])
def test_unknown_message_fields(extra: dict[Any, Any]) -> None:
    err = request_error(frames({**body(id=11), **extra}))
    assert err.code is ErrorCode.BAD_REQUEST
    assert err.details["field"] == "message"
    assert err.details["id"] == 11


def test_unknown_fields_mixing_str_and_bytes_keys() -> None:
    # Regression: sorting str and bytes keys together raised TypeError.
    err = request_error(frames({**body(id=3), "zz": 1, b"aa": 2}))
    assert (err.code, err.details["field"]) == (ErrorCode.BAD_REQUEST, "message")


# -- bounded decoding ------------------------------------------------------------------------


def test_message_over_max_message_bytes() -> None:
    limits = Limits(max_message_bytes=200)
    raw = frames(body(args={"text": "x" * 150}))
    fits = len(raw[1])
    assert decode_request(raw, Limits(max_message_bytes=fits)).args == {"text": "x" * 150}
    err = request_error(raw, Limits(max_message_bytes=fits - 1))
    assert err.code is ErrorCode.TOO_LARGE
    assert err.details["limit"] == fits - 1
    assert request_error(frames(body(args={"t": "x" * 300})), limits).code is ErrorCode.TOO_LARGE


@pytest.mark.parametrize(
    "limits,value",
    [
        (Limits(max_str_len=8), "x" * 9),
        (Limits(max_bin_len=8), b"x" * 9),
        (Limits(max_array_len=8), list(range(9))),
        (Limits(max_map_len=8), {f"k{i}": i for i in range(9)}),
    ],
    ids=["str", "bin", "array", "map"],
)
def test_values_over_length_limits(limits: Limits, value: Any) -> None:
    raw = frames(body(args={"value": value}))
    err = request_error(raw, limits)
    assert err.code is ErrorCode.TOO_LARGE
    # exactly at the limit is fine
    at_limit = value[:8] if not isinstance(value, dict) else dict(list(value.items())[:8])
    assert decode_request(frames(body(args={"value": at_limit})), limits).op == "ping"


def test_default_string_limit() -> None:
    raw = frames(body(args={"prompt": "x" * (DEFAULT_LIMITS.max_str_len + 1)}))
    assert request_error(raw).code is ErrorCode.TOO_LARGE


def nested(depth: int) -> Any:
    """``depth`` nested containers (the body map counts as one)."""
    value: Any = 0
    for _ in range(depth - 2):
        value = [value]
    return body(args={"x": value})


def test_nesting_depth_limit() -> None:
    limit = DEFAULT_LIMITS.max_depth
    assert decode_request(frames(nested(limit))).op == "ping"
    err = request_error(frames(nested(limit + 1)))
    assert err.code is ErrorCode.TOO_LARGE
    assert err.details["limit"] == limit
    assert request_error(frames(nested(5)), Limits(max_depth=4)).code is ErrorCode.TOO_LARGE


def test_very_deep_nesting_is_too_large() -> None:
    # Deeper than msgpack's own stack: still too_large, not a crash.
    raw = [TAG, b"\x81\xa1a" + b"\x91" * 5000 + b"\x00"]
    assert request_error(raw).code is ErrorCode.TOO_LARGE
    assert request_error([TAG, b"\x91" * 100_000]).code is ErrorCode.TOO_LARGE


@pytest.mark.parametrize(
    "ext",
    [
        pack(msgpack.ExtType(5, b"abcd")),
        b"\xd6\xff\x00\x00\x00\x01",  # timestamp (ext type -1)
        b"\xc7\x00\x05",  # ext 8 with an empty payload
        b"\xd4\x01\x00",  # fixext 1
    ],
)
def test_ext_types_refused(ext: bytes) -> None:
    raw_body = b"\x84" + pack("v") + pack(1) + pack("id") + pack(1) + pack("op") + pack("ping")
    raw_body += pack("args") + b"\x81" + pack("x") + ext
    assert request_error([TAG, raw_body]).code is ErrorCode.BAD_REQUEST


def test_invalid_utf8_string() -> None:
    assert pack(body()).endswith(b"\x80")  # "args": {} comes last
    raw_body = pack(body())[:-1] + b"\x81\xa1x\xa2\xff\xfe"  # args = {"x": <bad str>}
    assert request_error([TAG, raw_body]).code is ErrorCode.BAD_REQUEST


def test_trailing_bytes() -> None:
    raw = frames(body())
    assert request_error([TAG, raw[1] + b"\x00"]).code is ErrorCode.BAD_REQUEST
    assert request_error([TAG, raw[1] + raw[1]]).code is ErrorCode.BAD_REQUEST


@pytest.mark.parametrize("key", [1, -1, None, True, 1.5])
def test_non_string_map_keys(key: Any) -> None:
    raw_body = b"\x85" + b"".join(pack(x) for kv in body().items() for x in kv)
    raw_body += pack(key) + pack(1)
    assert request_error([TAG, raw_body]).code is ErrorCode.BAD_REQUEST
    nested_key = pack(body())[:-1] + b"\x81" + pack(key) + pack(1)
    assert request_error([TAG, nested_key]).code is ErrorCode.BAD_REQUEST


@pytest.mark.parametrize("raw_body", [b"", b"\xc1", b"\x84", b"\xdb\xff\xff\xff\xff"])
def test_undecodable_bodies(raw_body: bytes) -> None:
    assert request_error([TAG, raw_body]).code in (ErrorCode.BAD_REQUEST, ErrorCode.TOO_LARGE)


def test_truncated_message() -> None:
    raw = frames(body(args={"prompt": "hello world", "stop": ["a", "b"]}))
    for n in range(len(raw[1])):
        assert request_error([TAG, raw[1][:n]]).code is ErrorCode.BAD_REQUEST


# -- validate_args ---------------------------------------------------------------------------


@pytest.mark.parametrize("op", sorted(OPS))
def test_defaults_filled(op: str) -> None:
    out = validate_args(op, dict(MINIMAL[op]))
    assert set(out) == set(OPS[op])
    for name, spec in OPS[op].items():
        if name in MINIMAL[op]:
            assert out[name] == MINIMAL[op][name]
        else:
            assert out[name] == spec.default


def test_specific_defaults() -> None:
    gen = validate_args("generate", {"context": "c", "prompt": "p"})
    assert gen["max_tokens"] == 256
    assert gen["temperature"] == 0.8
    assert gen["top_k"] == 40
    assert gen["top_p"] == 0.95
    assert gen["min_p"] == 0.05
    assert gen["repeat_penalty"] == 1.0
    assert gen["repeat_last_n"] == 64
    assert gen["seed"] is None
    assert gen["stop"] == []
    assert gen["logprobs"] == 0
    assert gen["grammar"] is None
    assert gen["credit"] == 64
    assert gen["add_special"] is True
    assert gen["tokens"] is None
    ctx = validate_args("create_context", {"model": "m"})
    assert ctx == {
        "model": "m",
        "n_ctx": 0,
        "n_batch": 512,
        "n_threads": None,
        "seed": 0,
        "max_queued": 8,
        "persistent": False,
        "shared": False,
        "kv_type": "f16",
        "flash_attn": None,
        "loras": None,
        "speculative": None,
    }
    assert validate_args("load_model", {"path": "/m.gguf"}) == {
        "path": "/m.gguf",
        "n_gpu_layers": None,  # the build decides (lorad.daemon.gpu)
        "use_mmap": True,
        "alias": None,
        "chat_template": None,
        "progress": False,
    }
    assert validate_args("unload_model", {"model": "m"}) == {"model": "m", "force": False}
    tok = validate_args("tokenize", {"context": "c", "text": "t"})
    assert tok == {
        "model": None,
        "context": "c",
        "text": "t",
        "add_special": True,
        "parse_special": False,
    }
    chat = validate_args("chat", MINIMAL["chat"])
    assert chat["add_generation_prompt"] is True


def test_default_list_is_a_fresh_copy() -> None:
    first = validate_args("generate", {"context": "c", "prompt": "p"})
    first["stop"].append("x")
    assert validate_args("generate", {"context": "c", "prompt": "p"})["stop"] == []


def test_none_means_default_for_optional_args() -> None:
    out = validate_args("generate", {"context": "c", "prompt": "p", "max_tokens": None})
    assert out["max_tokens"] == 256


def test_input_args_not_mutated() -> None:
    args = {"context": "c", "prompt": "p", "temperature": 1}
    validate_args("generate", args)
    assert args == {"context": "c", "prompt": "p", "temperature": 1}


@pytest.mark.parametrize("op", ["nope", "", "Ping", "generate ", "_op_ping"])
def test_unknown_op(op: str) -> None:
    err = args_error(op, {})
    assert err.code is ErrorCode.BAD_REQUEST
    assert err.details["field"] == "op"
    assert err.details["known"] == sorted(OPS)


@pytest.mark.parametrize("op", sorted(OPS))
def test_unknown_argument(op: str) -> None:
    err = args_error(op, {**MINIMAL[op], "bogus": 1})
    assert err.code is ErrorCode.BAD_REQUEST
    assert err.details["field"] == "bogus"
    assert err.details["accepted"] == sorted(OPS[op])


def test_unknown_argument_first_in_sorted_order() -> None:
    err = args_error("generate", {**MINIMAL["generate"], "zeta": 1, "alpha": 2})
    assert err.details["field"] == "alpha"


def test_unknown_arguments_mixing_str_and_bytes_keys() -> None:
    # Regression: a bytes key (msgpack bin) beside a str key raised TypeError.
    err = args_error("ping", {b"x": 1, "y": 2})
    assert err.code is ErrorCode.BAD_REQUEST
    assert err.details["field"] in ("y", "b'x'")  # always text: a client's key, echoed


REQUIRED = [(op, name) for op, schema in OPS.items() for name, a in schema.items() if a.required]


@pytest.mark.parametrize("op,name", REQUIRED)
def test_missing_required(op: str, name: str) -> None:
    args = {k: v for k, v in MINIMAL[op].items() if k != name}
    err = args_error(op, args)
    assert (err.code, err.details["field"]) == (ErrorCode.BAD_REQUEST, name)
    # an explicit nil does not stand in for a required argument
    err = args_error(op, {**args, name: None})
    assert (err.code, err.details["field"]) == (ErrorCode.BAD_REQUEST, name)


def _wrong_values(types: tuple[type, ...]) -> list[Any]:
    candidates: list[Any] = [True, 1, 1.5, "1", b"1", [1], {"a": 1}]
    out = []
    for v in candidates:
        ok = isinstance(v, types) and not (isinstance(v, bool) and bool not in types)
        if not ok:
            out.append(v)
    return out


WRONG_TYPES = [
    (op, name, value)
    for op, schema in OPS.items()
    for name, spec in schema.items()
    for value in _wrong_values(spec.types)
]


@pytest.mark.parametrize("op,name,value", WRONG_TYPES)
def test_wrong_types(op: str, name: str, value: Any) -> None:
    err = args_error(op, {**MINIMAL[op], name: value})
    assert err.code is OPS[op][name].code  # bad_request, or lora_invalid_scale for a scale
    assert err.details["field"] == name


@pytest.mark.parametrize(
    "name", ["max_tokens", "top_k", "repeat_last_n", "seed", "logprobs", "credit"]
)
def test_bool_is_not_an_integer(name: str) -> None:
    for value in (True, False):
        err = args_error("generate", {**MINIMAL["generate"], name: value})
        assert err.details["field"] == name


@pytest.mark.parametrize("name", ["temperature", "top_p", "min_p", "repeat_penalty"])
def test_bool_is_not_a_number(name: str) -> None:
    err = args_error("generate", {**MINIMAL["generate"], name: True})
    assert err.details["field"] == name


@pytest.mark.parametrize(
    "name,value,expected",
    [("temperature", 1, 1.0), ("temperature", 0, 0.0), ("top_p", 1, 1.0), ("min_p", 0, 0.0),
     ("repeat_penalty", 2, 2.0), ("temperature", 0.5, 0.5)],
)
def test_ints_accepted_for_float_fields(name: str, value: Any, expected: float) -> None:
    out = validate_args("generate", {**MINIMAL["generate"], name: value})
    assert out[name] == expected
    assert type(out[name]) is float


def test_int_fields_stay_int() -> None:
    out = validate_args("generate", {**MINIMAL["generate"], "max_tokens": 5, "top_k": 3})
    assert type(out["max_tokens"]) is int and type(out["top_k"]) is int
    with pytest.raises(ProtocolError) as err:
        validate_args("generate", {**MINIMAL["generate"], "max_tokens": 5.0})
    assert err.value.details["field"] == "max_tokens"


OUT_OF_RANGE = [
    ("generate", "max_tokens", 0),
    ("generate", "max_tokens", -1),
    ("generate", "max_tokens", DEFAULT_LIMITS.max_tokens + 1),
    ("generate", "temperature", -0.1),
    ("generate", "temperature", -1),
    ("generate", "temperature", 100.5),
    ("generate", "temperature", math.nan),
    ("generate", "temperature", math.inf),
    ("generate", "temperature", -math.inf),
    ("generate", "top_p", 1.01),
    ("generate", "top_p", -0.01),
    ("generate", "top_p", math.nan),
    ("generate", "min_p", 2),
    ("generate", "repeat_penalty", -1.0),
    ("generate", "repeat_penalty", math.inf),
    ("generate", "top_k", -1),
    ("generate", "repeat_last_n", -1),
    ("generate", "repeat_last_n", (1 << 20) + 1),
    ("generate", "seed", -1),
    ("generate", "seed", 2**32),
    ("generate", "logprobs", -1),
    ("generate", "logprobs", DEFAULT_LIMITS.max_logprobs + 1),
    ("generate", "credit", 0),
    ("generate", "credit", DEFAULT_LIMITS.max_credit + 1),
    ("generate", "stop", ["x"] * (DEFAULT_LIMITS.max_stop_sequences + 1)),
    ("generate", "stop", [""]),
    ("generate", "stop", ["ok", ""]),
    ("generate", "stop", ["ok", 1]),
    ("generate", "stop", [b"x"]),
    ("generate", "stop", [None]),
    ("generate", "grammar", ""),
    ("chat", "max_tokens", 0),
    ("chat", "temperature", math.nan),
    ("chat", "stop", [""]),
    ("chat", "template", ""),
    ("generate", "tokens", [1, -1]),
    ("generate", "tokens", [1, 2.0]),
    ("generate", "tokens", [True]),
    ("generate", "tokens", ["1"]),
    ("detokenize", "tokens", [-5]),
    ("detokenize", "tokens", [None]),
    ("load_model", "path", ""),
    ("load_model", "n_gpu_layers", -2),
    ("load_model", "n_gpu_layers", 100001),
    ("load_model", "alias", ""),
    ("create_context", "model", ""),
    ("create_context", "n_ctx", -1),
    ("create_context", "n_ctx", (1 << 20) + 1),
    ("create_context", "n_batch", 0),
    ("create_context", "n_batch", (1 << 16) + 1),
    ("create_context", "n_threads", 0),
    ("create_context", "n_threads", 1025),
    ("create_context", "seed", -1),
    ("create_context", "seed", 2**32),
    ("create_context", "max_queued", -1),
    ("create_context", "max_queued", 1025),
    ("credit", "n", 0),
    ("credit", "n", -3),
    ("credit", "n", DEFAULT_LIMITS.max_credit + 1),
    ("chat", "messages", []),
    ("chat", "messages", ["hi"]),
    ("chat", "messages", [{"content": "hi"}]),
    ("chat", "messages", [{"role": "user"}]),
    ("chat", "messages", [{"role": 1, "content": "hi"}]),
    ("chat", "messages", [{"role": "user", "content": None}]),
    ("chat", "messages", [{"role": "user", "content": "a"}, {"role": "user"}]),
]


@pytest.mark.parametrize("op,name,value", OUT_OF_RANGE)
def test_out_of_range(op: str, name: str, value: Any) -> None:
    err = args_error(op, {**MINIMAL[op], name: value})
    assert err.code is ErrorCode.BAD_REQUEST
    assert err.details["field"] == name


IN_RANGE = [
    ("generate", "max_tokens", 1),
    ("generate", "max_tokens", DEFAULT_LIMITS.max_tokens),
    ("generate", "temperature", 0),
    ("generate", "temperature", 100),
    ("generate", "top_p", 0.0),
    ("generate", "top_k", 0),
    ("generate", "seed", 0),
    ("generate", "seed", 2**32 - 1),
    ("generate", "logprobs", DEFAULT_LIMITS.max_logprobs),
    ("generate", "credit", 1),
    ("generate", "credit", DEFAULT_LIMITS.max_credit),
    ("generate", "stop", ["x"] * DEFAULT_LIMITS.max_stop_sequences),
    ("generate", "grammar", 'root ::= "a"'),
    ("load_model", "n_gpu_layers", -1),
    ("create_context", "max_queued", 0),
    ("create_context", "persistent", True),
    ("cancel", "request", "req-1"),
    ("cancel", "request", 0),
    ("credit", "n", DEFAULT_LIMITS.max_credit),
    ("detokenize", "tokens", []),
    ("chat", "template", "chatml"),
    ("chat", "template", "{{ messages[0].content }}"),
    ("chat", "messages", [{"role": "system", "content": "", "name": "x"}]),
]


@pytest.mark.parametrize("op,name,value", IN_RANGE)
def test_in_range(op: str, name: str, value: Any) -> None:
    assert validate_args(op, {**MINIMAL[op], name: value})[name] == value


def test_limits_are_configurable() -> None:
    limits = Limits(max_tokens=10, max_logprobs=2, max_stop_sequences=1, max_credit=4)
    base = MINIMAL["generate"]
    assert validate_args("generate", {**base, "max_tokens": 10}, limits)["max_tokens"] == 10
    for name, value in [("max_tokens", 11), ("logprobs", 3), ("stop", ["a", "b"]), ("credit", 5)]:
        assert args_error("generate", {**base, name: value}, limits).details["field"] == name
    assert args_error("credit", {"request": 1, "n": 5}, limits).details["field"] == "n"


@pytest.mark.parametrize(
    "args",
    [
        {"context": "c"},
        {"context": "c", "prompt": None, "tokens": None},
        {"context": "c", "prompt": "p", "tokens": [1]},
        {"context": "c", "prompt": "", "tokens": []},
    ],
)
def test_generate_needs_exactly_one_of_prompt_and_tokens(args: dict[str, Any]) -> None:
    err = args_error("generate", args)
    assert (err.code, err.details["field"]) == (ErrorCode.BAD_REQUEST, "prompt")


def test_generate_by_tokens() -> None:
    out = validate_args("generate", {"context": "c", "tokens": [1, 2], "prompt": None})
    assert out["tokens"] == [1, 2] and out["prompt"] is None
    # An empty prompt is valid here; the daemon refuses it when it finds no tokens.
    assert validate_args("generate", {"context": "c", "prompt": ""})["prompt"] == ""


@pytest.mark.parametrize("op", ["tokenize", "detokenize"])
@pytest.mark.parametrize("which", [{}, {"model": "m", "context": "c"}])
def test_tokenize_needs_exactly_one_of_model_and_context(op: str, which: dict[str, Any]) -> None:
    base = {k: v for k, v in MINIMAL[op].items() if k not in ("model", "context")}
    err = args_error(op, {**base, **which})
    assert (err.code, err.details["field"]) == (ErrorCode.BAD_REQUEST, "model")


@pytest.mark.parametrize("op", ["tokenize", "detokenize"])
def test_tokenize_by_context(op: str) -> None:
    base = {k: v for k, v in MINIMAL[op].items() if k != "model"}
    out = validate_args(op, {**base, "context": "ctx-1"})
    assert out["context"] == "ctx-1" and out["model"] is None


def test_cancel_and_credit_take_int_or_string_ids() -> None:
    assert validate_args("cancel", {"request": "abc"}) == {"request": "abc"}
    assert validate_args("credit", {"request": 3, "n": 1}) == {"request": 3, "n": 1}
    assert args_error("cancel", {"request": True}).details["field"] == "request"
    assert args_error("cancel", {"request": 1.0}).details["field"] == "request"


# -- fuzzing ---------------------------------------------------------------------------------

FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ_LIGHT = settings(FUZZ, max_examples=100)

ARG_NAMES = sorted({name for schema in OPS.values() for name in schema})

leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=10)
    | st.binary(max_size=10)
)
keys = st.text(max_size=6) | st.sampled_from(ARG_NAMES) | st.binary(max_size=3)
values = st.recursive(
    leaves,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(keys, children, max_size=4),
    max_leaves=12,
)
# Arguments shaped like real ones: known names with arbitrary values, valid-ish sampling values.
plausible = {
    "context": st.text(min_size=1, max_size=8),
    "model": st.text(min_size=1, max_size=8),
    "prompt": st.text(max_size=8),
    "text": st.text(max_size=8),
    "tokens": st.lists(st.integers(-3, 2**33), max_size=4),
    "stop": st.lists(st.text(max_size=3), max_size=20),
    "messages": st.lists(
        st.dictionaries(st.sampled_from(["role", "content", "x"]), st.text(max_size=3) | leaves),
        max_size=3,
    ),
    "max_tokens": st.integers(-2, 40000),
    "temperature": st.floats() | st.integers(-5, 200),
    "request": st.integers(-1, 10) | st.text(max_size=3),
    "n": st.integers(-1, 5000),
}
arg_values = st.one_of(values, *plausible.values())
args_maps = st.dictionaries(keys, values, max_size=6) | st.fixed_dictionaries(
    {}, optional={name: s for name, s in plausible.items()}
) | st.dictionaries(st.sampled_from(ARG_NAMES), arg_values, max_size=8)
ops = st.sampled_from(sorted(OPS)) | values
ids = st.integers(-2, 2**64 - 1) | st.text(max_size=70) | values
bodies = st.fixed_dictionaries(
    {"v": st.just(1) | values, "id": ids, "op": ops, "args": args_maps | values},
    optional={"extra": values, b"v": values},
)
reply_bodies = st.fixed_dictionaries(
    {"v": st.just(1) | values, "kind": st.sampled_from(["result", "item", "end", "error", "hb"])},
    optional={
        "id": ids,
        "seq": st.integers(-1, 3) | values,
        "item": values,
        "result": values,
        "error": st.fixed_dictionaries(
            {"code": st.sampled_from([c.value for c in ErrorCode]) | values},
            optional={"message": values, "details": values},
        )
        | values,
    },
)


def depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    return 0


def _decode_and_validate(raw: list[bytes]) -> None:
    try:
        request = decode_request(raw)
    except ProtocolError as exc:
        assert isinstance(exc.code, ErrorCode)
        exc.to_wire()
        return
    assert isinstance(request, Request)
    try:
        out = validate_args(request.op, request.args)
    except ProtocolError as exc:
        assert isinstance(exc.code, ErrorCode)
        assert "field" in exc.details
        pack(exc.to_wire())  # the error always encodes
        return
    assert set(out) == set(OPS[request.op])


@FUZZ
@given(st.binary(max_size=200))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    _decode_and_validate([TAG, data])
    try:
        decode_reply([TAG, data])
    except ProtocolError:
        pass


@FUZZ
@given(st.binary(max_size=10), st.binary(max_size=50))
def test_fuzz_arbitrary_frames(tag: bytes, data: bytes) -> None:
    _decode_and_validate([tag, data])


@FUZZ_LIGHT
@given(bodies, st.data())
def test_fuzz_truncated_messages(message: dict[str, Any], data: st.DataObject) -> None:
    raw = pack(message)
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(ProtocolError):
        decode_request([TAG, raw[:cut]])


@FUZZ_LIGHT
@given(bodies, st.data())
def test_fuzz_corrupted_messages(message: dict[str, Any], data: st.DataObject) -> None:
    raw = bytearray(pack(message))
    for _ in range(data.draw(st.integers(1, 3))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    _decode_and_validate([TAG, bytes(raw)])


@FUZZ
@given(bodies | values)
def test_fuzz_structured_bodies(message: Any) -> None:
    """Request-shaped maps with arbitrary (nested) values anywhere, and arbitrary values."""
    _decode_and_validate(frames(message))


@FUZZ
@given(reply_bodies | values.map(lambda v: {"kind": v}) | values)
def test_fuzz_replies(message: Any) -> None:
    """decode_reply either refuses or gives a reply whose fields have the promised shapes."""
    try:
        reply = decode_reply(frames(message))
    except ProtocolError:
        return
    assert reply.kind in ("result", "item", "end", "error", "hb")
    if reply.kind in ("item", "end"):
        assert type(reply.seq) is int and reply.seq >= 0
    if reply.kind == "item":
        assert isinstance(reply.item, dict)
    if reply.kind == "end":
        assert isinstance(reply.result, dict)
    if reply.kind == "error":
        assert isinstance(reply.error, dict) and isinstance(reply.error["code"], str)
        assert isinstance(reply.error.get("details") or {}, dict)


@FUZZ
@given(st.sampled_from(sorted(OPS)), st.dictionaries(st.sampled_from(ARG_NAMES), arg_values))
def test_fuzz_validate_args(op: str, args: dict[str, Any]) -> None:
    try:
        validate_args(op, args)
    except ProtocolError as exc:
        assert exc.code is ErrorCode.BAD_REQUEST
        assert "field" in exc.details


@FUZZ_LIGHT
@given(
    st.integers(0, 2**63 - 1) | st.text(min_size=1, max_size=64),
    st.text(max_size=10),
    st.dictionaries(
        st.text(max_size=10),
        st.recursive(
            st.none()
            | st.booleans()
            | st.integers(-(2**63), 2**64 - 1)
            | st.floats(allow_nan=False)
            | st.text(max_size=10)
            | st.binary(max_size=10),
            lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=5), c, max_size=4),
            max_leaves=20,
        ),
        max_size=5,
    ),
)
def test_fuzz_request_round_trip(rid: int | str, op: str, args: dict[str, Any]) -> None:
    assume(depth(args) + 1 <= DEFAULT_LIMITS.max_depth)
    request = Request(id=rid, op=op, args=args)
    assert decode_request(encode_request(request)) == request


# -- LoRA stacks and scales --------------------------------------------------------------------


def test_lora_stack_forms_are_normalised() -> None:
    args = validate_args("set_loras", {"context": "c", "loras": [
        "french", ["/a.gguf", -0.5], {"path": "/b.gguf"}, {"path": "/c.gguf", "scale": 2}]})
    assert args["loras"] == [("french", 1.0), ("/a.gguf", -0.5), ("/b.gguf", 1.0),
                             ("/c.gguf", 2.0)]
    assert validate_args("generate", {"context": "c", "prompt": "x"})["loras"] is None
    assert validate_args("generate", {"context": "c", "prompt": "x", "loras": []})["loras"] == []
    assert validate_args("set_lora", {"context": "c", "path": "p"})["scale"] == 1.0


@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf, "1", True, None, [1.0]])
def test_bad_scales_are_lora_invalid_scale(scale: Any) -> None:
    for op, args in [("set_lora", {"context": "c", "path": "p", "scale": scale}),
                     ("set_loras", {"context": "c", "loras": [["p", scale]]}),
                     ("create_context", {"model": "m", "loras": [{"path": "p", "scale": scale}]}),
                     ("generate", {"context": "c", "prompt": "x", "loras": [["p", scale]]})]:
        if scale is None and op == "set_lora":
            continue  # an omitted (nil) optional argument takes its default
        err = args_error(op, args)
        assert err.code is ErrorCode.LORA_INVALID_SCALE, (op, err)


@pytest.mark.parametrize("item", [["p"], ["p", 1.0, 2.0], {"scale": 1.0}, {"path": "p", "x": 1},
                                  {"path": "", "scale": 1.0}, 7, ["", 1.0], [1, 1.0]])
def test_malformed_stack_items_are_bad_request(item: Any) -> None:
    err = args_error("set_loras", {"context": "c", "loras": [item]})
    assert err.code is ErrorCode.BAD_REQUEST
    assert err.details["field"] == "loras"


def test_stack_length_is_limited() -> None:
    limits = Limits(max_loras=2)
    err = args_error("set_loras", {"context": "c", "loras": ["a", "b", "c"]}, limits)
    assert err.code is ErrorCode.TOO_LARGE
    assert validate_args("set_loras", {"context": "c", "loras": ["a", "b"]}, limits)


# -- typed, frozen argument objects ------------------------------------------------------------
@pytest.mark.parametrize("op", sorted(OPS))
def test_parse_args_is_a_frozen_object_with_the_schema_fields(op: str) -> None:
    import dataclasses

    from lorad.protocol.args import ARGS, parse_args

    args = parse_args(op, dict(MINIMAL[op]))
    assert type(args) is ARGS[op]
    assert [f.name for f in dataclasses.fields(args)] == list(OPS[op])
    assert args.to_dict() == validate_args(op, dict(MINIMAL[op]))
    for name in OPS[op]:
        assert args[name] == getattr(args, name) == args.get(name)
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(args, name, None)
    assert args.get("no-such-argument", 7) == 7
    with pytest.raises(KeyError):
        args["no-such-argument"]


def test_parse_args_refuses_like_validate_args() -> None:
    from lorad.protocol.args import parse_args

    with pytest.raises(ProtocolError) as err:
        parse_args("no_such_op", {})
    assert err.value.details["field"] == "op"
    with pytest.raises(ProtocolError):
        parse_args("generate", {"context": "c", "prompt": "x", "max_tokens": 0})


def test_the_daemon_and_its_clients_default_to_one_endpoint(monkeypatch: pytest.MonkeyPatch,
                                                            tmp_path) -> None:
    from lorad.client import default_endpoint
    from lorad.daemon.config import DaemonConfig as Config

    monkeypatch.delenv("LORAD_ENDPOINT", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert default_endpoint() == Config().endpoint == f"ipc://{tmp_path}/lorad/lorad.sock"
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "missing"))  # no runtime dir: /tmp
    assert default_endpoint() == Config().endpoint == f"ipc:///tmp/lorad-{os.getuid()}/lorad.sock"
    monkeypatch.setenv("LORAD_ENDPOINT", "tcp://127.0.0.1:5555")
    assert default_endpoint() == Config().endpoint == "tcp://127.0.0.1:5555"
