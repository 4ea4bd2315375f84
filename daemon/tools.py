"""Tool calling, sans-IO: tools into the prompt, a grammar for forced calls, calls out of the
output.

A chat request may carry OpenAI-style ``tools`` (``{"type": "function", "function": {name,
description, parameters}}``), a ``tool_choice`` (``auto``, ``none``, ``required`` or one
function) and ``parallel_tool_calls``. How tools reach the model and how its calls read depends
on its chat template, recognised by the markers in its source (:func:`detect`):

- ``hermes`` (Hermes, Qwen 2.5/3: ``<tool_call>``), ``llama3`` (Llama 3.1+:
  ``<|python_tag|>``, JSON ``{"name", "parameters"}``) and ``mistral`` (``[TOOL_CALLS]``): the
  template renders the tools itself (the ``tools`` variable, as Hugging Face templates
  expect) and the history's ``tool_calls`` and ``tool`` messages; calls are parsed from its
  syntax.
- ``generic``, any other template (llama-server's convention): the tools are described in a
  system message, the answer is one JSON object, ``{"tool_calls": [{"name", "arguments"}]}``
  or ``{"response": "..."}``, held to that shape by a grammar; the history's calls and results
  are written as such JSON in assistant and user turns.

With ``required`` or a named function, every format's output is held by a grammar built from
the tools' JSON schemas, so even a small base model returns a well-formed call.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from lorad.protocol import ErrorCode, ProtocolError
from lorad.protocol.errors import echo

from .schemas import check_schema, schema_grammar

MAX_TOOLS = 128
NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
FORMATS = ("hermes", "llama3", "mistral", "generic")
BAD_JSON = (ValueError, RecursionError)
"""What a parse of text that is not (within Python's nesting limit) JSON raises."""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]

    def to_template(self) -> dict[str, Any]:
        """The tool as Hugging Face chat templates expect it (OpenAI's shape)."""
        return {"type": "function", "function": {"name": self.name,
                                                 "description": self.description,
                                                 "parameters": self.parameters}}


@dataclass(frozen=True)
class ToolUse:
    """A request's tools and how it may use them."""

    tools: tuple[Tool, ...]
    choice: str = "auto"
    """``auto``, ``none``, ``required``, or ``function`` (then ``name`` says which)."""
    name: str | None = None
    parallel: bool = True

    @property
    def active(self) -> bool:
        return bool(self.tools) and self.choice != "none"

    @property
    def forced(self) -> list[Tool]:
        """The tools a call must be one of (none: a call is not forced)."""
        if self.choice == "required":
            return list(self.tools)
        if self.choice == "function":
            return [t for t in self.tools if t.name == self.name]
        return []


def _bad(message: str, **details: Any) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_REQUEST, message, **{"field": "tools", **details})


PARALLEL = {"hermes": True, "mistral": True, "llama3": False, "generic": False}
"""``parallel_tool_calls`` when a request does not say, by format: whether the format's
templates write several calls in a turn (llama-server's rule: a small model held to a list of
calls otherwise repeats its call until ``max_tokens``)."""


def parse_tools(value: Any, choice: Any = None, parallel: Any = None,
                fmt: str = "generic") -> ToolUse:
    """``tools``, ``tool_choice`` and ``parallel_tool_calls`` checked (``bad_request`` naming
    the tool at fault); each tool's schema is bounded like ``response_format``'s. Without
    ``parallel``, the format's default (:data:`PARALLEL`)."""
    if value is None:
        value = []
    if not isinstance(value, list):
        raise _bad("tools must be a list of {\"type\": \"function\", \"function\": {...}}")
    if len(value) > MAX_TOOLS:
        raise _bad(f"at most {MAX_TOOLS} tools")
    tools: list[Tool] = []
    for i, item in enumerate(value):
        fn = item.get("function") if isinstance(item, dict) else None
        if not isinstance(item, dict) or item.get("type") != "function" or not isinstance(
                fn, dict):
            raise _bad(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\", "
                       "\"description\", \"parameters\"}}}", index=i)
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise _bad(f"tools[{i}]: the function name must be 1-64 letters, digits, '_', '.' "
                       f"or '-' (got {echo(name, as_repr=True)})", index=i)
        unknown = set(fn) - {"name", "description", "parameters", "strict"}
        if unknown:
            raise _bad(f"tool {name!r}: unknown key {echo(sorted(unknown)[0])!r}", tool=name)
        description = fn.get("description", "")
        if not isinstance(description, str):
            raise _bad(f"tool {name!r}: description must be a string", tool=name)
        parameters = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise _bad(f"tool {name!r}: parameters must be a JSON schema (an object)",
                       tool=name)
        kind = parameters.get("type", "object")
        if kind != "object":
            raise _bad(f"tool {name!r}: parameters must describe an object (type \"object\"), "
                       f"not {echo(kind, as_repr=True)}", tool=name)
        try:
            check_schema(parameters, "tools")
        except ProtocolError as exc:
            raise _bad(f"tool {name!r}: {exc.message}", tool=name) from None
        if any(t.name == name for t in tools):
            raise _bad(f"two tools are named {name!r}", tool=name)
        tools.append(Tool(name, description, parameters))
    return ToolUse(tuple(tools), *_choice(choice, tools),
                   parallel=PARALLEL[fmt] if parallel is None else _parallel(parallel))


def _choice(value: Any, tools: list[Tool]) -> tuple[str, str | None]:
    if value is None:
        return "auto", None
    if value in ("auto", "none", "required"):
        if value == "required" and not tools:
            raise _bad("tool_choice \"required\" needs tools", field="tool_choice")
        return value, None
    fn = value.get("function") if isinstance(value, dict) else None
    if not isinstance(value, dict) or value.get("type") != "function" or not isinstance(
            fn, dict) or not isinstance(fn.get("name"), str):
        raise _bad("tool_choice must be \"auto\", \"none\", \"required\" or {\"type\": "
                   "\"function\", \"function\": {\"name\": ...}}", field="tool_choice")
    if not any(t.name == fn["name"] for t in tools):
        raise _bad(f"tool_choice names {echo(fn['name'])!r}, which is not among the tools",
                   field="tool_choice", tool=echo(fn["name"]))
    return "function", fn["name"]


def _parallel(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _bad("parallel_tool_calls must be true or false", field="parallel_tool_calls")
    return value


# -- formats ----------------------------------------------------------------------------------
def detect(template: str | None) -> str:
    """The tool-call format of a chat template's source (``generic`` for a built-in template
    name, no template, or one with no tool syntax it is known by)."""
    if not template or "{" not in template:
        return "generic"
    if "<tool_call>" in template:
        return "hermes"
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<|python_tag|>" in template or ("ipython" in template
                                        and "<|start_header_id|>" in template):
        return "llama3"
    return "generic"


GENERIC_PROMPT = (
    "You can call these tools:\n{tools}\n\n"
    "Answer with one JSON object and nothing else: either\n"
    '{{"tool_calls": [{{"name": "<tool name>", "arguments": {{<the arguments>}}}}]}}\n'
    "to call {which}, or\n"
    '{{"response": "<your answer to the user>"}}\n'
    "to answer directly.{forced}"
)


def _arguments(value: Any) -> Any:
    """A call's arguments for a template: the object when the string is JSON of one."""
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except BAD_JSON:
            return value
        return parsed if isinstance(parsed, dict) else value
    return value


def prepare(messages: list[dict[str, Any]], use: ToolUse, fmt: str
            ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages and the ``tools`` variable to render for ``fmt``."""
    if fmt != "generic":
        out = []
        for m in messages:
            calls = m.get("tool_calls")
            if calls:
                m = {**m, "tool_calls": [
                    {**c, "function": {**c["function"],
                                       "arguments": _arguments(c["function"]["arguments"])}}
                    for c in calls]}
            out.append(m)
        return out, [t.to_template() for t in use.tools] if use.active else None
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = [{"name": c["function"]["name"],
                      "arguments": _arguments(c["function"]["arguments"])}
                     for c in m["tool_calls"]]
            text = json.dumps({"tool_calls": calls}, ensure_ascii=False)
            out.append({"role": "assistant", "content": text})
        elif m["role"] == "tool":
            result = {"tool_response": {"content": m.get("content", "")}}
            if m.get("name"):
                result["tool_response"]["name"] = m["name"]
            if m.get("tool_call_id"):
                result["tool_response"]["tool_call_id"] = m["tool_call_id"]
            out.append({"role": "user", "content": json.dumps(result, ensure_ascii=False)})
        else:
            out.append(m)
    if use.active:
        forced = use.forced
        which = "one or more of them" if use.parallel else "one of them"
        note = ""
        if use.choice == "required":
            note = " You must call a tool."
        elif use.choice == "function":
            note = f" You must call {forced[0].name}."
        listing = json.dumps([t.to_template()["function"] for t in use.tools],
                             ensure_ascii=False, indent=2)
        prompt = GENERIC_PROMPT.format(tools=listing, which=which, forced=note)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out, None


# -- grammars ---------------------------------------------------------------------------------
def _call_schema(tool: Tool, arguments_key: str = "arguments") -> dict[str, Any]:
    return {"type": "object", "properties": {"name": {"const": tool.name},
                                             arguments_key: tool.parameters},
            "required": ["name", arguments_key], "additionalProperties": False}


def _any_call(tools: list[Tool], arguments_key: str = "arguments") -> dict[str, Any]:
    calls = [_call_schema(t, arguments_key) for t in tools]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def grammar(use: ToolUse, fmt: str) -> str | None:
    """The GBNF grammar that holds the output to the format's calls (blocking: a worker
    thread), or None when the output is free (``auto`` on a template with tool syntax)."""
    forced = use.forced
    if fmt == "generic" and use.active:
        tools = forced or list(use.tools)
        calls: dict[str, Any] = {"type": "array", "items": _any_call(tools), "minItems": 1}
        if not use.parallel:
            calls["maxItems"] = 1
        options = [{"type": "object", "properties": {"tool_calls": calls},
                    "required": ["tool_calls"], "additionalProperties": False}]
        if not forced:
            options.append({"type": "object", "properties": {"response": {"type": "string"}},
                            "required": ["response"], "additionalProperties": False})
        schema = options[0] if len(options) == 1 else {"anyOf": options}
        return schema_grammar(schema, "tools")
    if not forced:
        return None
    if fmt == "hermes":
        one = '"<tool_call>\\n" doc "\\n</tool_call>"'
        root = f"{one} (\"\\n\" {one})*" if use.parallel else one
        return schema_grammar(_any_call(forced), "tools", root=root)
    if fmt == "llama3":  # one call per turn in Llama 3.1's format
        return schema_grammar(_any_call(forced, "parameters"), "tools", root="doc")
    # mistral: [TOOL_CALLS] followed by a JSON array of calls
    calls = {"type": "array", "items": _any_call(forced), "minItems": 1}
    if not use.parallel:
        calls["maxItems"] = 1
    return schema_grammar(calls, "tools", root='"[TOOL_CALLS]" doc')


# -- parsing ----------------------------------------------------------------------------------
_DECODER = json.JSONDecoder(strict=False)
"""Control characters inside strings are taken (a grammar's ``[^"\\]`` lets them through)."""


def _loads(text: str) -> Any:
    value, end = _DECODER.raw_decode(text)
    if text[end:].strip():
        raise ValueError("extra data")
    return value

@dataclass
class Parsed:
    content: str
    """The text that is not a call."""
    calls: list[dict[str, Any]] = field(default_factory=list)
    """OpenAI's ``tool_calls``: ``{"id", "type": "function", "function": {"name",
    "arguments": JSON text}}``."""


def _call(name: Any, arguments: Any, tools: tuple[Tool, ...]) -> dict[str, Any] | None:
    if not isinstance(name, str) or not any(t.name == name for t in tools):
        return None
    if isinstance(arguments, str):
        text = arguments
    else:
        text = json.dumps(arguments if arguments is not None else {}, ensure_ascii=False)
    return {"id": "call_" + secrets.token_hex(12), "type": "function",
            "function": {"name": name, "arguments": text}}


def _complete_items(text: str, at: int) -> list[Any]:
    """The whole items of the JSON array that opens at ``text[at]``, up to where the text
    ends: a call list cut by ``max_tokens`` keeps the calls that were written out."""
    items: list[Any] = []
    i = at + 1
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text) or text[i] == "]":
            return items
        try:
            value, i = _DECODER.raw_decode(text, i)
        except BAD_JSON:
            return items
        items.append(value)


MAX_ATTEMPTS = 64
"""Places an object is tried at in one output (a call opens at a ``{``): an output of nested
brackets would otherwise cost a parse per bracket, each as deep as the nesting."""


def _json_objects(text: str) -> list[tuple[int, int, Any]]:
    """The top-level JSON objects in ``text`` (tried at the first :data:`MAX_ATTEMPTS` places
    one may open): ``(start, end, value)``."""
    out, i = [], 0
    for _ in range(MAX_ATTEMPTS):
        start = text.find("{", i)
        if start < 0:
            break
        try:
            value, end = _DECODER.raw_decode(text, start)
        except BAD_JSON:
            i = start + 1
            continue
        out.append((start, end, value))
        i = end
    return out


def parse(text: str, use: ToolUse, fmt: str) -> Parsed:
    """The calls in a model's output (none when tools are not active) and the rest as
    content. A call to a tool the request did not give, or that is not well-formed, stays in
    the content: nothing the model wrote is dropped."""
    if not use.active:
        return Parsed(text)
    tools = use.tools
    if fmt == "generic":
        stripped = text.strip()
        try:
            value = _loads(stripped)
        except BAD_JSON:  # cut short: the calls written out, if it was a list of calls
            head = re.match(r'\{\s*"tool_calls"\s*:\s*\[', stripped)
            value = {"tool_calls": _complete_items(stripped, head.end() - 1)} if head else None
            if value is None or not value["tool_calls"]:
                return Parsed(text)
        if isinstance(value, dict) and isinstance(value.get("response"), str):
            return Parsed(value["response"])
        items = value.get("tool_calls") if isinstance(value, dict) else None
        if isinstance(value, dict) and isinstance(value.get("tool_call"), dict):
            items = [value["tool_call"]]
        if not isinstance(items, list):
            return Parsed(text)
        calls = [_call(c.get("name"), c.get("arguments"), tools)
                 for c in items if isinstance(c, dict)]
        if not calls or any(c is None for c in calls):
            return Parsed(text)
        return Parsed("", _limit(calls, use))
    if fmt == "hermes":
        calls, kept, last = [], [], 0
        for m in re.finditer(r"<tool_call>(.*?)(?:</tool_call>|$)", text, re.S):
            try:
                value = _loads(m.group(1).strip())
            except BAD_JSON:
                continue
            call = _call(value.get("name"), value.get("arguments"), tools) if isinstance(
                value, dict) else None
            if call is None:
                continue
            calls.append(call)
            kept.append(text[last:m.start()])
            last = m.end()
        kept.append(text[last:])
        return Parsed("".join(kept).strip() if calls else text, _limit(calls, use))
    if fmt == "mistral":
        at = text.find("[TOOL_CALLS]")
        if at < 0:
            return Parsed(text)
        rest = text[at + len("[TOOL_CALLS]"):].lstrip()
        try:
            value, _ = _DECODER.raw_decode(rest)
        except BAD_JSON:  # cut short: the calls written out
            value = _complete_items(rest, 0) if rest.startswith("[") else []
            if not value:
                return Parsed(text)
        items = value if isinstance(value, list) else [value]
        calls = [_call(c.get("name"), c.get("arguments"), tools)
                 for c in items if isinstance(c, dict)]
        if not calls or any(c is None for c in calls):
            return Parsed(text)
        return Parsed(text[:at].strip(), _limit(calls, use))
    # llama3: a JSON object {"name", "parameters"}, maybe after <|python_tag|>
    body = text.replace("<|python_tag|>", "")
    calls, kept, last = [], [], 0
    for start, end, value in _json_objects(body):
        if not isinstance(value, dict):
            continue
        call = _call(value.get("name"), value.get("parameters", value.get("arguments")),
                     tools)
        if call is None:
            continue
        calls.append(call)
        kept.append(body[last:start])
        last = end
    kept.append(body[last:])
    return Parsed(("".join(kept).strip() if calls else text), _limit(calls, use))


def _limit(calls: list[dict[str, Any]], use: ToolUse) -> list[dict[str, Any]]:
    """One call at most when parallel calls are off (OpenAI's ``parallel_tool_calls``)."""
    return calls if use.parallel else calls[:1]


# -- streaming --------------------------------------------------------------------------------
_MARKERS = {"hermes": "<tool_call>", "mistral": "[TOOL_CALLS]", "llama3": "<|python_tag|>"}


class StreamSplitter:
    """Which streamed text is content and which may be a call (held until the end): once the
    output could begin a call, nothing more is streamed as content. ``generic`` output (one
    JSON object) is all held; Llama 3's calls open the output, so an output that starts with
    ``{`` or ``<|python_tag|>`` is held."""

    def __init__(self, use: ToolUse, fmt: str) -> None:
        self.use = use
        self.fmt = fmt
        self.text = ""
        self.sent = 0
        self.holding = use.active and fmt == "generic"

    def feed(self, delta: str) -> str:
        """The content that can be streamed now."""
        self.text += delta
        if not self.use.active:
            return self._release(len(self.text))
        if self.holding:
            return ""
        if self.fmt == "llama3":
            head = self.text.lstrip()
            if not self.sent and (head[:1] == "{" or "<|python_tag|>".startswith(head[:14])):
                if head[:1] == "{" or head.startswith("<|python_tag|>"):
                    self.holding = True
                return ""  # (nothing yet, or a tag that may be arriving)
            return self._release(len(self.text))
        marker = _MARKERS[self.fmt]
        at = self.text.find(marker, self.sent)
        if at >= 0:
            self.holding = True
            return self._release(at)
        return self._release(len(self.text) - _partial_suffix(self.text, marker))

    def _release(self, upto: int) -> str:
        out = self.text[self.sent:upto]
        self.sent = max(self.sent, upto)
        return out

    def finish(self) -> Parsed:
        """The calls of the whole output, and the content not streamed yet."""
        held = self.text[self.sent:]
        if not self.use.active:
            return Parsed(held)
        parsed = parse(held, self.use, self.fmt)
        return parsed if parsed.calls or self.fmt == "generic" else Parsed(held)


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of ``text`` that begins ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
