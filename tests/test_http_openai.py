"""The OpenAI translation without sockets (``lorad.daemon.http.openai``, ``.schema``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lorad.daemon.http.openai import (
    STATUS,
    ApiError,
    Output,
    parse_chat,
    parse_completion,
    parse_embeddings,
)
from lorad.daemon.schemas import check_schema
from lorad.protocol import DEFAULT_LIMITS, ErrorCode, ProtocolError

L = DEFAULT_LIMITS
MSGS = [{"role": "user", "content": "hi"}]


def test_every_error_code_has_a_status_and_the_spec_says_so() -> None:
    assert set(STATUS) == set(ErrorCode)
    spec = (Path(__file__).resolve().parent.parent / "protocol" / "README.md").read_text()
    table = spec[spec.index("<!-- spec: http_status -->"):]
    rows = dict(re.findall(r"^\| `(\w+)` \| (\d{3}) \|", table, re.M))
    assert {ErrorCode(k): int(v) for k, v in rows.items()} == STATUS
    e = ApiError.from_protocol(ProtocolError(ErrorCode.CONTEXT_BUSY, "busy", context="x"))
    assert (e.status, e.retry_after, e.body()["error"]["code"]) == (429, 1, "context_busy")
    e = ApiError.from_protocol(ProtocolError(ErrorCode.LORA_INCOMPATIBLE, "no", field="loras"))
    assert e.status == 422 and e.body() == {"error": {
        "message": "no", "type": "invalid_request_error", "param": "loras",
        "code": "lora_incompatible"}}


def test_chat_parameters_map_to_lorad_or_are_refused_by_name() -> None:
    call = parse_chat({"model": "m", "messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text",
                                                                     "text": "b"}]}],
        "max_completion_tokens": 5, "temperature": 0, "top_p": 0.5, "stop": "x", "seed": 3,
        "n": 1, "user": "me", "frequency_penalty": 0, "stream": True,
        "stream_options": {"include_usage": True}, "logprobs": True, "top_logprobs": 2,
        "lora": [{"name": "pirate", "scale": 0.5}, {"path": "/a/b.gguf"}]}, L)
    assert call.op == "chat" and call.stream and call.include_usage and call.logprobs == 2
    assert call.args == {"messages": [{"role": "system", "content": "be brief"},
                                      {"role": "user", "content": "a\nb"}],
                         "max_tokens": 5, "temperature": 0, "top_p": 0.5, "stop": ["x"],
                         "seed": 3}
    assert call.loras == [("pirate", 0.5), ("/a/b.gguf", 1.0)]
    assert parse_chat({"model": "m", "messages": MSGS}, L).args["max_tokens"] == L.max_tokens
    assert parse_chat({"model": "m", "messages": MSGS, "chat_template": "gemma"},
                      L).args["template"] == "gemma"
    refused = {
        "n": 2, "functions": [{"name": "f"}], "function_call": "auto", "logit_bias": {"1": 2},
        "presence_penalty": 0.5, "echo": True, "prediction": {"type": "content"},
        "whatever": 1, "top_logprobs": 2,
    }
    for key, value in refused.items():
        with pytest.raises(ApiError) as e:
            parse_chat({"model": "m", "messages": MSGS, key: value}, L)
        assert e.value.status == 400 and e.value.param == key, key
    for body in ({"model": "m", "messages": [{"role": "tool", "content": "x"}]},
                 {"model": "m", "messages": [{"role": "user", "content": [
                     {"type": "image_url", "image_url": {"url": "x"}}]}]},
                 {"model": "m", "messages": [{"role": "assistant", "content": "calling",
                                              "tool_calls": [{"id": "1"}]}]},
                 {"model": "m", "messages": MSGS, "max_tokens": 3, "max_completion_tokens": 4},
                 {"model": "m", "messages": MSGS, "stream_options": {"include_usage": True}},
                 {"model": "m", "messages": MSGS, "lora": [{"id": 0, "scale": 1}]},
                 {"model": "m", "messages": MSGS, "grammar": "root ::= \"a\"",
                  "response_format": {"type": "json_object"}},
                 {"messages": MSGS}, [], "x"):
        with pytest.raises(ApiError) as e:
            parse_chat(body, L)
        assert e.value.status == 400, body


def test_completion_and_embedding_bodies() -> None:
    call = parse_completion({"model": "m", "prompt": ["p"], "logprobs": 3, "max_tokens": 7}, L)
    assert (call.op, call.args, call.logprobs) == ("generate", {"prompt": "p", "max_tokens": 7},
                                                   3)
    for bad in ({"model": "m", "prompt": ["a", "b"]}, {"model": "m", "prompt": [1, 2]},
                {"model": "m", "prompt": "p", "logprobs": 6},
                {"model": "m", "prompt": "p", "suffix": "x"}):
        with pytest.raises(ApiError):
            parse_completion(bad, L)
    assert parse_embeddings({"model": "m", "input": "a"}) == ("m", ["a"], "float")
    assert parse_embeddings({"model": "m", "input": ["a"], "encoding_format": "base64"}) == (
        "m", ["a"], "base64")
    with pytest.raises(ApiError):
        parse_embeddings({"model": "m", "input": [[1, 2]]})
    with pytest.raises(ApiError):
        parse_embeddings({"model": "m", "input": "a", "dimensions": 8})


def test_output_builds_responses_and_chunks() -> None:
    call = parse_chat({"model": "pirate", "messages": MSGS, "stream": True,
                       "stream_options": {"include_usage": True}}, L)
    out = Output(call, "pirate", "chatcmpl-1")
    assert out.first_chunk()["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert out.add({"text": "", "token_ids": [5]}) == []  # nothing new to say
    [chunk] = out.add({"text": "Arr", "token_ids": [6]})
    assert chunk["choices"][0]["delta"] == {"content": "Arr"}
    end = {"finish_reason": "length", "metrics": {"prompt_tokens": 4, "generated_tokens": 2,
                                                  "cached_prompt_tokens": 1}}
    last, usage = out.last_chunks(end)
    assert last["choices"][0]["finish_reason"] == "length" and usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6,
                              "prompt_tokens_details": {"cached_tokens": 1}}
    whole = out.response(end)
    assert whole["choices"][0]["message"]["content"] == "Arr"
    assert whole["object"] == "chat.completion" and whole["model"] == "pirate"


def test_completion_logprobs_offsets_count_from_the_text_start() -> None:
    pieces = {5: b"He", 6: b"llo"}
    for stream in (False, True):
        call = parse_completion({"model": "m", "prompt": "p", "logprobs": 1,
                                 "stream": stream}, L)
        out = Output(call, "m", "cmpl-1", pieces.get)
        chunks = [out.add({"text": pieces[t].decode(), "token_ids": [t],
                           "logprobs": [[[t, -0.5]]], "token_logprobs": [-0.5]})
                  for t in (5, 6)]
        if stream:
            assert [c[0]["choices"][0]["logprobs"]["text_offset"] for c in chunks] == [[0], [2]]
        lp = out.response({"finish_reason": "stop"})["choices"][0]["logprobs"]
        assert lp["text_offset"] == [0, 2] and lp["tokens"] == ["He", "llo"]
        assert lp["top_logprobs"] == [{"He": -0.5}, {"llo": -0.5}]


def test_hostile_schemas_are_bounded_before_conversion() -> None:
    check_schema({"type": "object", "properties": {"a": {"type": "string", "maxLength": 10}}})
    check_schema({"type": "string", "pattern": "x{1,3}y{2}[a-z]{0,20}"})
    for schema in ({"type": "array", "maxItems": 10**6},
                   {"type": "string", "pattern": "a{5000}"},
                   {"type": "string", "pattern": "a{,20000}"},  # forms the converter reads too
                   {"type": "string", "pattern": "a{2_0000}"},
                   {"type": "string", "pattern": "a{ 5000 }"},
                   {"type": "string", "pattern": "(a{100}){100}"},  # nested: they multiply
                   {"$ref": "https://example.com/s.json"}):
        with pytest.raises(ProtocolError) as e:
            check_schema(schema)
        assert e.value.details["field"] == "response_format"
    deep: dict = {}
    node = deep
    for _ in range(100):
        node["items"] = {}
        node = node["items"]
    with pytest.raises(ProtocolError, match="nests deeper"):
        check_schema(deep)


def test_a_draining_daemon_answers_503_with_retry_after() -> None:
    """The pipeline refuses a request while the daemon drains (``shutting_down``, the same
    for both doors: tests/test_lifecycle.py); the HTTP codec makes it a 503 to retry."""
    from lorad.daemon.http.app import _error

    error = ApiError.from_protocol(ProtocolError(ErrorCode.SHUTTING_DOWN,
                                                 "the daemon is shutting down"))
    response = _error(error)
    assert response.status_code == 503 and response.headers["retry-after"] == "5"
    assert b'"code":"shutting_down"' in response.body
