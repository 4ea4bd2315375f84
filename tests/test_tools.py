"""Tool calling: the formats (sans-IO, :mod:`lorad.daemon.tools`), then through a real daemon
on tiny models whose chat templates have tool syntax (Hermes/Qwen's) or none (the generic JSON
convention), over ZeroMQ and the HTTP door (the ``openai`` SDK), and an agent loop."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from test_http import openai_api, stop_cleanly

import tinymodels
from conftest import DaemonProcess, start_daemon
from lorad.client import BadRequest, Client
from lorad.daemon import tools
from lorad.protocol import ProtocolError

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a timezone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string",
                                                             "maxLength": 8}},
                   "required": ["zone"]}}}
ASK = [{"role": "user", "content": "hello, the weather in the city"}]

HERMES = """{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>{% for tool in tools %}
{{ tool | tojson }}{% endfor %}
</tools>

For each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'user' or (message.role == 'system' and not loop.first) or \
(message.role == 'assistant' and not message.tool_calls) %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% elif message.role == 'assistant' %}<|im_start|>assistant
{% if message.content %}{{ message.content }}{% endif %}
{%- for tool_call in message.tool_calls %}
<tool_call>
{"name": "{{ tool_call.function.name }}", "arguments": {{ tool_call.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""
"""Qwen 2.5's tool layout (Hermes' ``<tool_call>``), shortened."""

LLAMA3 = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}\
{%- set messages = messages[1:] %}{%- else %}{%- set system_message = "" %}{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}{{- "Environment: ipython\n" }}{%- endif %}
{{- system_message }}{{- "<|eot_id|>" }}
{%- if tools is not none %}
{{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
{{- "Given the following functions, please respond with a JSON for a function call with its \
proper arguments that best answers the given prompt.\n\n" }}
{{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name \
and its value}. Do not use variables.\n\n' }}
{%- for t in tools %}{{- t | tojson(indent=4) }}{{- "\n\n" }}{%- endfor %}
{{- "<|eot_id|>" }}
{%- endif %}
{%- for message in messages %}
{%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim \
+ '<|eot_id|>' }}
{%- elif 'tool_calls' in message %}
{%- set tool_call = message.tool_calls[0].function %}
{{- '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "' + tool_call.name + '", \
"parameters": ' }}{{- tool_call.arguments | tojson }}{{- "}<|eot_id|>" }}
{%- else %}
{{- "<|start_header_id|>ipython<|end_header_id|>\n\n" + message.content + "<|eot_id|>" }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}\
{%- endif %}"""
"""Llama 3.1's JSON tool calls (its template, shortened)."""

MISTRAL = """{%- for message in messages %}
{%- if message.role == 'user' %}{%- if loop.last and tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}\
[/AVAILABLE_TOOLS]{%- endif %}[INST]{{ message.content }}[/INST]
{%- elif message.role == 'assistant' and message.tool_calls %}[TOOL_CALLS][\
{%- for tc in message.tool_calls %}{"name": "{{ tc.function.name }}", "arguments": \
{{ tc.function.arguments | tojson }}, "id": "{{ tc.id }}"}{%- if not loop.last %}, {% endif %}\
{%- endfor %}]{{ eos_token }}
{%- elif message.role == 'assistant' %}{{ message.content }}{{ eos_token }}
{%- elif message.role == 'tool' %}[TOOL_RESULTS]{"content": {{ message.content | tojson }}, \
"call_id": "{{ message.tool_call_id }}"}[/TOOL_RESULTS]
{%- endif %}
{%- endfor %}"""
"""Mistral's ``[TOOL_CALLS]`` (v3's layout, shortened)."""


# -- sans-IO -------------------------------------------------------------------------------------
def test_formats_are_told_by_the_templates_syntax() -> None:
    assert tools.detect(HERMES) == "hermes"
    assert tools.detect(LLAMA3) == "llama3"
    assert tools.detect(MISTRAL) == "mistral"
    assert tools.detect("{% if x %}[TOOL_CALLS]{% endif %}") == "mistral"
    assert tools.detect("{{ '<|python_tag|>' }}") == "llama3"
    assert tools.detect(tinymodels.DEFAULT_CHAT_TEMPLATE) == "generic"
    assert tools.detect("chatml") == tools.detect(None) == "generic"


@pytest.mark.parametrize(("fmt", "text", "content"), [
    ("hermes", 'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", '
               '"unit": "celsius"}}\n</tool_call>', "Sure."),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo", '
                '"unit": "celsius"}}]', ""),
    ("llama3", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo", '
               '"unit": "celsius"}}', ""),
    ("generic", '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo", '
                '"unit": "celsius"}}]}', ""),
])
def test_calls_are_parsed_in_each_format(fmt: str, text: str, content: str) -> None:
    use = tools.parse_tools([WEATHER, TIME])
    parsed = tools.parse(text, use, fmt)
    assert parsed.content == content
    (call,) = parsed.calls
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Oslo", "unit": "celsius"}


def test_what_is_not_a_call_of_a_given_tool_stays_content() -> None:
    use = tools.parse_tools([WEATHER])
    for fmt, text in (("hermes", '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n'
                                 "</tool_call>"),
                      ("hermes", "<tool_call>\nnot json\n</tool_call>"),
                      ("generic", "plain words"),
                      ("mistral", "[TOOL_CALLS] nothing")):
        assert tools.parse(text, use, fmt) == tools.Parsed(text)
    answer = tools.parse('{"response": "It is sunny."}', use, "generic")
    assert answer == tools.Parsed("It is sunny.")
    none = tools.parse_tools([WEATHER], "none")
    assert tools.parse('<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>',
                       none, "hermes").calls == []


def test_a_list_of_calls_cut_short_keeps_the_calls_written_out() -> None:
    """A small model held to a list of calls may repeat them until max_tokens."""
    use = tools.parse_tools([WEATHER], parallel=True)
    call = '{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}'
    for fmt, text in (("mistral", f"[TOOL_CALLS][{call}, {call}, {{\"name\": \"get_w"),
                      ("generic", f'{{"tool_calls": [{call},{call}, {{"na')):
        parsed = tools.parse(text, use, fmt)
        assert len(parsed.calls) == 2 and parsed.content == "", fmt
    assert tools.parse('{"tool_calls": [{"na', use, "generic").calls == []


def test_outputs_of_nested_brackets_are_text_not_a_crash() -> None:
    """A model's output is parsed in the event loop: bracket nests past Python's recursion
    limit stay text, and Llama's JSON is tried at a bounded number of places."""
    use = tools.parse_tools([WEATHER], parallel=True)
    for fmt, text in (("llama3", '{"a": ' * 50_000), ("generic", "[" * 50_000),
                      ("mistral", "[TOOL_CALLS][" + "[" * 50_000),
                      ("hermes", "<tool_call>" + "{" * 50_000)):
        assert tools.parse(text, use, fmt).calls == [], fmt
    many = '{"x": 1} ' * 1000 + '{"name": "get_weather", "parameters": {}}'
    assert tools.parse(many, use, "llama3").calls == []  # past the places tried
    assert len(tools._json_objects('{"x": 1} ' * 1000)) == tools.MAX_ATTEMPTS


def test_parallel_calls_default_to_what_the_formats_templates_write() -> None:
    assert [tools.parse_tools([WEATHER], fmt=f).parallel for f in tools.FORMATS] == [
        True, False, True, False]  # hermes, llama3, mistral, generic
    assert tools.parse_tools([WEATHER], parallel=True, fmt="generic").parallel


def test_parallel_calls_off_keeps_the_first() -> None:
    two = ('<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>\n'
           '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "unit": '
           '"celsius"}}\n</tool_call>')
    assert len(tools.parse(two, tools.parse_tools([WEATHER, TIME], fmt="hermes"),
                           "hermes").calls) == 2  # hermes templates write several calls
    single = tools.parse_tools([WEATHER, TIME], parallel=False)
    assert [c["function"]["name"] for c in tools.parse(two, single, "hermes").calls] == [
        "get_time"]


def test_a_stream_holds_back_what_may_be_a_call() -> None:
    use = tools.parse_tools([WEATHER])
    splitter = tools.StreamSplitter(use, "hermes")
    pieces = ["Let me ", "check.<tool", '_call>\n{"name": "get_weather", "arguments": ',
              '{"city": "Oslo", "unit": "celsius"}}\n</tool_call>']
    assert [splitter.feed(p) for p in pieces] == ["Let me ", "check.", "", ""]
    end = splitter.finish()
    assert end.content == "" and end.calls[0]["function"]["name"] == "get_weather"
    almost = tools.StreamSplitter(use, "hermes")  # a '<' that is no marker is released
    assert almost.feed("a <") == "a " and almost.feed("b") == "<b"
    assert almost.feed(" <tool_c") == " " and almost.finish() == tools.Parsed("<tool_c")
    generic = tools.StreamSplitter(use, "generic")  # one JSON answer: nothing until the end
    assert generic.feed('{"response": "Hi') == "" and generic.feed(' there"}') == ""
    assert generic.finish() == tools.Parsed("Hi there")


@pytest.mark.parametrize(("value", "choice", "found"), [
    ("nope", None, "must be a list"),
    ([{"type": "function", "function": {"name": "bad name"}}], None, "function name"),
    ([{"type": "function", "function": {"name": "f", "parameters": "x"}}], None,
     "tool 'f': parameters must be a JSON schema"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}],
     None, "must describe an object"),
    ([{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "array", "maxItems": 10**6}}}}}], None,
     "tool 'f': tools: maxItems"),
    ([WEATHER, WEATHER], None, "two tools are named 'get_weather'"),
    ([WEATHER], {"type": "function", "function": {"name": "other"}}, "not among the tools"),
    ([], "required", "needs tools"),
    ([WEATHER], "sometimes", "tool_choice must be"),
])
def test_malformed_tools_are_refused_naming_the_tool(value: object, choice: object,
                                                     found: str) -> None:
    with pytest.raises(ProtocolError, match=found) as e:
        tools.parse_tools(value, choice)
    assert e.value.details["field"] in ("tools", "tool_choice")


def test_forced_calls_and_generic_answers_have_grammars() -> None:
    forced = tools.parse_tools([WEATHER, TIME], "required")
    assert tools.grammar(tools.parse_tools([WEATHER]), "hermes") is None  # auto: free
    for fmt in tools.FORMATS:
        grammar = tools.grammar(forced, fmt)
        assert grammar and "root ::=" in grammar and '\\"get_weather\\"' in grammar
    assert "response" in tools.grammar(tools.parse_tools([WEATHER]), "generic")


# -- through a daemon ----------------------------------------------------------------------------
class Models:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.hermes = tinymodels.write_tiny_llama(root / "hermes.gguf", seed=0,
                                                  chat_template=HERMES)
        self.plain = tinymodels.write_tiny_llama(root / "plain.gguf", seed=1)
        self.llama3 = tinymodels.write_tiny_llama(root / "llama3.gguf", seed=2,
                                                  chat_template=LLAMA3)
        self.mistral = tinymodels.write_tiny_llama(root / "mistral.gguf", seed=3,
                                                   chat_template=MISTRAL)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    return Models(tmp_path_factory.mktemp("tools"))


@pytest.fixture(scope="module")
def door(tmp_path_factory: pytest.TempPathFactory, models: Models) -> Iterator[DaemonProcess]:
    workdir = tmp_path_factory.mktemp("tools-daemon")
    (workdir / "lorad.toml").write_text("[http]\nn_ctx = 2048\n")
    d = start_daemon(workdir, [models.root], "--config", str(workdir / "lorad.toml"),
                     "--model", str(models.hermes), "--alias", "hermes", "--n-ctx", "1024",
                     "--http", "127.0.0.1:0")
    with d.client() as c:
        for name in ("plain", "llama3", "mistral"):
            c.load_model(getattr(models, name), alias=name)
    yield d
    stop_cleanly(d)


@pytest.fixture(scope="module")
def api(door: DaemonProcess) -> openai.OpenAI:
    return openai_api(door)


@pytest.fixture
def zmq(door: DaemonProcess) -> Iterator[Client]:
    with door.client() as c:
        yield c


def _well_formed(call: dict, names: set[str]) -> dict:
    """A call's arguments, after checking it is one of ``names`` and fits WEATHER or TIME."""
    assert call["type"] == "function" and call["function"]["name"] in names, call
    arguments = json.loads(call["function"]["arguments"])
    if call["function"]["name"] == "get_weather":
        assert set(arguments) == {"city", "unit"} and arguments["unit"] in ("celsius",
                                                                            "fahrenheit")
        assert isinstance(arguments["city"], str)  # (maxLength counts what llama.cpp's grammar
    else:                                          # takes for characters: random bytes vary)
        assert set(arguments) == {"zone"} and isinstance(arguments["zone"], str)
    return arguments


@pytest.mark.parametrize("model", ["hermes", "llama3", "mistral", "plain"])
def test_a_forced_call_is_well_formed_through_zeromq(zmq: Client, model: str) -> None:
    with zmq.create_context(model, n_ctx=2048) as ctx:
        stream = ctx.chat(ASK, tools=[WEATHER, TIME], tool_choice="required",
                          max_tokens=120, temperature=0, seed=1)
        text = stream.collect()
        assert stream.finish_reason == "tool_calls", (text, stream.tool_calls)
        assert stream.tool_calls and text == ""
        for call in stream.tool_calls:
            _well_formed(call, {"get_weather", "get_time"})
        named = ctx.chat(ASK, tools=[WEATHER, TIME], max_tokens=120, temperature=0,
                         tool_choice={"type": "function", "function": {"name": "get_time"}})
        named.collect()
        assert named.finish_reason == "tool_calls"
        assert {c["function"]["name"] for c in named.tool_calls} == {"get_time"}
        plain = ctx.chat(ASK, max_tokens=4, temperature=0)
        plain.collect()
        assert plain.tool_calls is None  # no tools: no calls key


def test_auto_on_a_template_without_tool_syntax_answers_in_json(zmq: Client) -> None:
    """The generic convention: the output is held to a call or a response by a grammar, so
    either way it parses; a response's text is the content."""
    with zmq.create_context("plain", n_ctx=1024) as ctx:
        for seed in range(4):
            stream = ctx.chat(ASK, tools=[WEATHER], max_tokens=150, temperature=1.0,
                              seed=seed)
            text = stream.collect()
            if stream.finish_reason == "tool_calls":
                assert text == "" and stream.tool_calls
                _well_formed(stream.tool_calls[0], {"get_weather"})
            else:
                assert stream.tool_calls == [] and stream.finish_reason in ("stop", "length")


def test_the_tools_reach_the_template_and_the_history_renders(zmq: Client) -> None:
    checking = ("{% if not tools or tools[0].function.name != 'get_weather' %}"
                "{{ raise_exception('tools missing') }}{% endif %}"
                "{% for m in messages %}{% if m.role == 'tool' and m.tool_call_id != 'c1' %}"
                "{{ raise_exception('tool message lost') }}{% endif %}"
                "{% if m.tool_calls and m.tool_calls[0].function.arguments.city != 'Oslo' %}"
                "{{ raise_exception('arguments not an object') }}{% endif %}"
                "<tool_call>{{ m.role }}: {{ m.content }}\n{% endfor %}")
    history = [*ASK,
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "c1", "type": "function", "function": {
                       "name": "get_weather",
                       "arguments": '{"city": "Oslo", "unit": "celsius"}'}}]},
               {"role": "tool", "tool_call_id": "c1", "content": "12 degrees"}]
    with zmq.create_context("plain", n_ctx=1024) as ctx:
        stream = ctx.chat(history, tools=[WEATHER], template=checking, max_tokens=4,
                          temperature=0)
        stream.collect()
        assert stream.finish_reason in ("stop", "length", "tool_calls")
        # on a template without tool syntax the history is written in the generic convention
        generic = ctx.chat(history, tools=[WEATHER], max_tokens=4, temperature=0)
        generic.collect()
        assert generic.metrics["prompt_tokens"] > 60
        with pytest.raises(BadRequest) as e:
            ctx.chat(ASK, tools=[{"type": "function", "function": {
                "name": "f", "parameters": {"type": "integer"}}}], max_tokens=2).collect()
        assert e.value.details == {"field": "tools", "tool": "f"}
        with pytest.raises(BadRequest) as e:
            ctx.chat(ASK, tools=[WEATHER], tool_choice="required", grammar='root ::= "x"',
                     max_tokens=2).collect()
        assert e.value.details["field"] == "grammar"


@pytest.mark.parametrize("model", ["hermes", "llama3", "mistral", "plain"])
def test_tool_calls_through_the_openai_sdk_plain_and_streamed(api: openai.OpenAI,
                                                               model: str) -> None:
    request = {"model": model, "messages": ASK, "tools": [WEATHER, TIME], "max_tokens": 120,
               "temperature": 0, "tool_choice": "required"}
    whole = api.chat.completions.create(**request)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = [c.model_dump() for c in choice.message.tool_calls]
    for call in calls:
        _well_formed(call, {"get_weather", "get_time"})
    streamed: dict[int, dict] = {}
    finish = None
    for chunk in api.chat.completions.create(**request, stream=True):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        for d in delta.tool_calls or []:
            entry = streamed.setdefault(d.index, {"name": "", "arguments": ""})
            entry["name"] += d.function.name or ""
            entry["arguments"] += d.function.arguments or ""
        assert not delta.content
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert [(s["name"], json.loads(s["arguments"])) for _, s in sorted(streamed.items())] == [
        (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


@pytest.mark.parametrize("model", ["hermes", "llama3", "mistral", "plain"])
def test_an_agent_calls_a_tool_and_answers(api: openai.OpenAI, model: str) -> None:
    """The loop any agent framework runs: ask with tools, run the call, send its result back,
    and get an answer."""
    def get_weather(city: str, unit: str) -> str:
        return json.dumps({"city": city, "temperature": 12, "unit": unit})

    messages: list = [{"role": "system", "content": "You are a weather assistant."}, *ASK]
    first = api.chat.completions.create(model=model, messages=messages, tools=[WEATHER],
                                        tool_choice="required", max_tokens=120,
                                        temperature=0)
    message = first.choices[0].message
    assert message.tool_calls
    messages.append(message.model_dump(exclude_none=True))
    for call in message.tool_calls:
        result = get_weather(**json.loads(call.function.arguments))
        messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    answer = api.chat.completions.create(model=model, messages=messages, tools=[WEATHER],
                                         tool_choice="none", max_tokens=16, temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls


def test_http_refusals_name_the_tool(api: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(model="plain", messages=ASK, max_tokens=2, tools=[
            {"type": "function", "function": {"name": "bad", "parameters": {"type": "array"}}}])
    assert e.value.body["param"] == "tools" and "'bad'" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(model="plain", messages=ASK, max_tokens=2,
                                    functions=[{"name": "f"}])
    assert e.value.body["param"] == "functions"
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(model="plain", max_tokens=2, messages=[
            *ASK, {"role": "tool", "content": "x"}])
    assert "tool_call_id" in e.value.body["message"]
