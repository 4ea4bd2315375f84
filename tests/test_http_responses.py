"""OpenAI's Responses API (``POST /v1/responses``) through the ``openai`` SDK: the same text
as chat completions, streamed events, ``previous_response_id``, function tools, ``text.format``
and the refusals."""

from __future__ import annotations

import json
from collections.abc import Iterator

import openai
import pytest
from test_http import http_url, openai_api, stop_cleanly
from test_tools import ASK, HERMES, WEATHER

import tinymodels
from conftest import DaemonProcess, start_daemon

FLAT_WEATHER = {"type": "function", **WEATHER["function"]}


@pytest.fixture(scope="module")
def door(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    root = tmp_path_factory.mktemp("responses")
    model = tinymodels.write_tiny_llama(root / "hermes.gguf", seed=0, chat_template=HERMES)
    (root / "lorad.toml").write_text("[http]\nn_ctx = 2048\n")
    d = start_daemon(root, [root], "--config", str(root / "lorad.toml"), "--model", str(model),
                     "--alias", "tiny", "--http", "127.0.0.1:0")
    yield d
    stop_cleanly(d)


@pytest.fixture(scope="module")
def api(door: DaemonProcess) -> openai.OpenAI:
    return openai_api(door)


def test_a_response_is_the_chat_completion_of_its_input(api: openai.OpenAI) -> None:
    chat = api.chat.completions.create(
        model="tiny", max_tokens=12, temperature=0,
        messages=[{"role": "system", "content": "be brief"}, *ASK])
    response = api.responses.create(model="tiny", instructions="be brief",
                                    input=ASK[0]["content"], max_output_tokens=12,
                                    temperature=0)
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.output_text == chat.choices[0].message.content
    assert response.output[0].type == "message" and response.output[0].role == "assistant"
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.usage.output_tokens == chat.usage.completion_tokens
    assert response.status == ("incomplete" if chat.choices[0].finish_reason == "length"
                               else "completed")
    assert response.instructions == "be brief" and response.max_output_tokens == 12


def test_streamed_events_spell_the_same_text(api: openai.OpenAI) -> None:
    whole = api.responses.create(model="tiny", input=ASK, max_output_tokens=12,
                                 temperature=0)
    kinds, deltas, final = [], [], None
    for event in api.responses.create(model="tiny", input=ASK, max_output_tokens=12,
                                      temperature=0, stream=True):
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
        if event.type in ("response.completed", "response.incomplete"):
            final = event.response  # (at max_output_tokens: incomplete, as OpenAI's)
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert "response.output_item.added" in kinds and "response.output_text.done" in kinds
    assert "".join(deltas) == whole.output_text == final.output_text


def test_previous_response_id_continues_the_conversation(api: openai.OpenAI) -> None:
    first = api.responses.create(model="tiny", input="hello there", max_output_tokens=6,
                                 temperature=0)
    second = api.responses.create(model="tiny", input="and the cat", max_output_tokens=6,
                                  temperature=0, previous_response_id=first.id)
    spelled = api.chat.completions.create(model="tiny", max_tokens=6, temperature=0, messages=[
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "and the cat"}])
    assert second.output_text == spelled.choices[0].message.content
    assert second.previous_response_id == first.id
    unkept = api.responses.create(model="tiny", input="x", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError) as e:
        api.responses.create(model="tiny", input="y", previous_response_id=unkept.id)
    assert e.value.body["param"] == "previous_response_id" and "keeps" in e.value.body[
        "message"]


def test_function_tools_call_and_take_their_output(api: openai.OpenAI) -> None:
    response = api.responses.create(model="tiny", input=ASK[0]["content"],
                                    tools=[FLAT_WEATHER], tool_choice="required",
                                    max_output_tokens=120, temperature=0)
    calls = [o for o in response.output if o.type == "function_call"]
    assert calls and all(c.name == "get_weather" for c in calls)
    assert set(json.loads(calls[0].arguments)) == {"city", "unit"}
    follow = api.responses.create(
        model="tiny", previous_response_id=response.id, tools=[FLAT_WEATHER],
        tool_choice="none", max_output_tokens=8, temperature=0,
        input=[{"type": "function_call_output", "call_id": c.call_id,
                "output": '{"temperature": 12}'} for c in calls])
    assert follow.output_text and follow.output[0].type == "message"
    events = list(api.responses.create(model="tiny", input=ASK[0]["content"],
                                       tools=[FLAT_WEATHER], tool_choice="required",
                                       max_output_tokens=120, temperature=0, stream=True))
    kinds = [event.type for event in events]
    streamed = events[-1].response
    assert "response.function_call_arguments.done" in kinds
    assert [o.arguments for o in streamed.output if o.type == "function_call"] == [
        c.arguments for c in calls]


def test_text_format_json_schema_constrains_the_output(api: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}
    response = api.responses.create(model="tiny", input="a number", max_output_tokens=40,
                                    temperature=0, text={"format": {
                                        "type": "json_schema", "name": "n", "schema": schema}})
    assert set(json.loads(response.output_text)) == {"n"}


@pytest.mark.parametrize(("extra", "param"), [
    ({"tools": [{"type": "web_search"}]}, "tools"),
    ({"reasoning": {"effort": "low"}}, "reasoning"),
    ({"input": [{"type": "input_image", "image_url": "x"}]}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, "input"),
    ({"background": True}, "background"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"extra_body": {"bogus": 1}}, "bogus"),
])
def test_what_is_refused_is_named(api: openai.OpenAI, extra: dict, param: str) -> None:
    body = {"model": "tiny", "input": "hi", **extra}
    with pytest.raises(openai.BadRequestError) as e:
        api.responses.create(**body)
    assert e.value.body["param"] == param, e.value.body


def test_echoed_fields_must_be_json_again(door: DaemonProcess) -> None:
    """Found by the HTTP fuzz: 1e400 in an echoed field made the response unwritable (500)."""
    import httpx

    for field in ('"metadata": {"x": 1e400}', '"tools": [{"type": "function", "name": "f", '
                  '"parameters": {"type": "object", "required": [NaN]}}]'):
        r = httpx.post(http_url(door) + "/v1/responses", headers={
            "Content-Type": "application/json"},
            content=('{"model": "tiny", "input": "hi", ' + field + "}").encode())
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] in ("metadata", "tools")


def test_the_store_is_bounded() -> None:
    from lorad.daemon.http.openai import ApiError
    from lorad.daemon.http.responses import ResponseStore

    store = ResponseStore(max_entries=3, max_chars=200)
    for i in range(5):
        store.put(f"r{i}", [{"role": "user", "content": "x" * 10}])
    assert len(store) == 3
    with pytest.raises(ApiError):
        store.get("r0")
    store.put("big", [{"role": "user", "content": "x" * 500}])  # larger than the bound: not kept
    assert len(store) == 3
    for i in range(3):
        store.put(f"s{i}", [{"role": "user", "content": "y" * 60}])
    assert len(store) <= 2  # by characters


def test_the_codec_turns_items_into_chat_messages() -> None:
    """The codec is sans-IO: a request parses into a chat call without a daemon."""
    from lorad.daemon.http.responses import ResponseStore, parse_response_request
    from lorad.protocol import DEFAULT_LIMITS

    req = parse_response_request({"model": "m", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "a"}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "42"}],
        "instructions": "sys", "max_output_tokens": 5}, DEFAULT_LIMITS, ResponseStore())
    assert req.call.op == "chat" and req.call.args["max_tokens"] == 5
    assert [m["role"] for m in req.call.args["messages"]] == ["system", "user", "assistant",
                                                               "tool"]
    assert req.conversation[0] == {"role": "user", "content": "a"}  # no instructions kept
