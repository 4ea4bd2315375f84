"""OpenAI's Responses API (``POST /v1/responses``), sans-IO: a codec over lorad's ``chat``.

A request becomes a chat call (:func:`parse_response_request`): ``input`` (text, or items:
messages, ``function_call`` and ``function_call_output``) after ``instructions`` as the
system message and after the conversation of ``previous_response_id``; ``max_output_tokens``,
sampling, function ``tools`` and ``tool_choice`` (flat, as this API has them), ``text.format``
(a grammar, like chat's ``response_format``). :class:`ResponseOutput` turns the stream's items
and end into the response object, or into the API's events (``response.created``,
``response.output_text.delta``, ..., ``response.completed``). Responses are kept in memory
(:class:`ResponseStore`, the last ``MAX_STORED``) unless ``store`` is false, so that
``previous_response_id`` continues a conversation; an id no longer kept is a 404 that says so.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from lorad.protocol import Limits
from lorad.protocol.errors import echo

from .openai import ApiError, Call, bad, parse_chat, usage

MAX_STORED = 256
"""Responses kept for ``previous_response_id``."""
MAX_STORED_CHARS = 16 << 20
"""Characters of all kept conversations together (the oldest go first)."""

_ACCEPTED = {"model", "input", "instructions", "max_output_tokens", "temperature", "top_p",
             "stream", "tools", "tool_choice", "parallel_tool_calls", "previous_response_id",
             "store", "metadata", "text", "user", "truncation", "include", "reasoning",
             "background", "service_tier", "top_logprobs", "prompt", "conversation",
             "stream_options", "max_tool_calls", "prompt_cache_key", "safety_identifier",
             # lorad's extensions, as in chat completions
             "top_k", "min_p", "repeat_penalty", "repeat_last_n", "seed", "stop", "grammar",
             "lora", "speculative", "chat_template"}
_OFF = {"truncation": ("disabled",), "include": ([],), "background": (False,),
        "service_tier": ("auto", "default"), "top_logprobs": (0,)}
_UNSUPPORTED = {
    "reasoning": "reasoning is not supported: lorad's models do not reason separately",
    "prompt": "stored prompts are not supported: give input and instructions",
    "conversation": "conversations are not supported: use previous_response_id",
    "stream_options": "stream_options are not supported here: the events carry usage",
    "max_tool_calls": "max_tool_calls is not supported: use parallel_tool_calls",
}
_PARAMS = {"messages": "input", "max_tokens": "max_output_tokens", "response_format": "text"}
"""Chat completions' parameter names, as this API calls them (for errors)."""


class ResponseStore:
    """Kept responses: id -> the whole conversation up to and including the response."""

    def __init__(self, max_entries: int = MAX_STORED, max_chars: int = MAX_STORED_CHARS) -> None:
        self.max_entries = max_entries
        self.max_chars = max_chars
        self._items: OrderedDict[str, tuple[list[dict[str, Any]], int]] = OrderedDict()
        self._chars = 0

    def get(self, response_id: str) -> list[dict[str, Any]]:
        if response_id not in self._items:
            raise ApiError(404, f"previous_response_id {echo(response_id)!r} is not kept: lorad "
                           f"keeps the last {self.max_entries} responses in memory (and none "
                           "made with store: false, nor across restarts)",
                           code="not_found", param="previous_response_id")
        self._items.move_to_end(response_id)
        return self._items[response_id][0]

    def put(self, response_id: str, conversation: list[dict[str, Any]]) -> None:
        size = len(json.dumps(conversation, ensure_ascii=False))
        if size > self.max_chars:
            return
        self._items[response_id] = (conversation, size)
        self._chars += size
        while len(self._items) > self.max_entries or self._chars > self.max_chars:
            _, (_, dropped) = self._items.popitem(last=False)
            self._chars -= dropped

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class ResponseRequest:
    """A Responses request as a chat call, and what its response echoes."""

    call: Call
    conversation: list[dict[str, Any]]
    """The messages sent (without the instructions): what a stored response continues."""
    echo: dict[str, Any]
    store: bool = True


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"),
                                                                            str):
                parts.append(part["text"])
            else:
                raise bad(f"{where}: content part of type {echo(kind)!r} is not supported "
                          "(input_text, output_text)", "input", code="unsupported_parameter")
        return "\n".join(parts)
    raise bad(f"{where}: content must be text or a list of input_text parts", "input")


def _messages(value: Any) -> list[dict[str, Any]]:
    """``input`` as chat messages."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise bad("input must be text or a non-empty list of items (messages, function_call, "
                  "function_call_output)", "input")
    out: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad(f"{where} must be an object", "input")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise bad(f"{where}: role {echo(role)!r} is not supported (user, system, "
                          "developer, assistant)", "input")
            out.append({"role": role, "content": _text(item.get("content"), where)})
        elif kind == "function_call":
            name, arguments = item.get("name"), item.get("arguments")
            call_id = item.get("call_id")
            if not all(isinstance(v, str) for v in (name, arguments, call_id)):
                raise bad(f"{where}: a function_call has a string call_id, name and "
                          "arguments", "input")
            call = {"id": call_id, "type": "function",
                    "function": {"name": name, "arguments": arguments}}
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls"):
                out[-1]["tool_calls"].append(call)  # calls of one turn: one message
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            if not isinstance(item.get("call_id"), str) or not isinstance(output, str):
                raise bad(f"{where}: a function_call_output has a string call_id and output",
                          "input")
            out.append({"role": "tool", "tool_call_id": item["call_id"], "content": output})
        else:
            raise bad(f"{where}: items of type {echo(kind)!r} are not supported (message, "
                      "function_call, function_call_output)", "input",
                      code="unsupported_parameter")
    return out


def _tools(value: Any) -> list[dict[str, Any]] | None:
    """This API's flat function tools as chat's ``{"type": "function", "function": {...}}``."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise bad("tools must be a list of {\"type\": \"function\", \"name\", \"parameters\"}",
                  "tools")
    out = []
    for i, tool in enumerate(value):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise bad(f"tools[{i}]: tools of type {echo(kind)!r} are not supported (only "
                      "function tools: lorad runs no tools itself)", "tools",
                      code="unsupported_parameter")
        function = {k: tool[k] for k in ("name", "description", "parameters", "strict")
                    if k in tool}
        extra = set(tool) - {"type", *function}
        if extra:
            raise bad(f"tools[{i}]: unknown key {echo(sorted(extra)[0])!r}", "tools")
        out.append({"type": "function", "function": function})
    return out


def _echoable(value: Any, param: str) -> Any:
    """``value``, checked to hold no number JSON cannot write back (NaN, infinities, 1e400):
    the response echoes it."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise bad(f"{param} holds a number that is not finite", param)
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return value


def _tool_choice(value: Any) -> Any:
    if isinstance(value, dict) and value.get("type") == "function" and "name" in value:
        return {"type": "function", "function": {"name": value["name"]}}
    return value


def _format(value: Any) -> dict[str, Any] | None:
    """``text.format`` as chat's ``response_format``."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - {"format", "verbosity"}:
        raise bad("text must be {\"format\": {...}}", "text")
    fmt = value.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise bad("text.format must be an object", "text")
    if fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {
            "name": fmt.get("name", "schema"), "schema": fmt.get("schema", {})}}
    return fmt


def parse_response_request(body: Any, limits: Limits, store: ResponseStore
                           ) -> ResponseRequest:
    """``POST /v1/responses``'s body as a chat call (see the module)."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    for key in body:
        if key not in _ACCEPTED:
            raise bad(f"unknown parameter {echo(key)!r}", echo(key), code="unknown_parameter")
    for key, why in _UNSUPPORTED.items():
        if body.get(key) is not None:
            raise bad(why, key, code="unsupported_parameter")
    for key, off in _OFF.items():
        if body.get(key) is not None and body[key] not in off:
            raise bad(f"{key} = {echo(body[key], as_repr=True)} is not supported", key,
                      code="unsupported_parameter")
    for key, kind in (("store", bool), ("metadata", dict), ("instructions", str),
                      ("previous_response_id", str)):
        if body.get(key) is not None and not isinstance(body[key], kind):
            raise bad(f"{key!r} must be a {kind.__name__}", key)
    for key in ("tools", "tool_choice", "metadata", "text"):  # echoed in the response
        _echoable(body.get(key), key)
    conversation = []
    if body.get("previous_response_id") is not None:
        conversation = [dict(m) for m in store.get(body["previous_response_id"])]
    conversation += _messages(body.get("input"))
    messages = list(conversation)
    if body.get("instructions"):  # not carried to the next response, as OpenAI's
        messages.insert(0, {"role": "system", "content": body["instructions"]})
    chat = {k: body[k] for k in ("model", "temperature", "top_p", "stream", "parallel_tool_calls",
                                 "user", "top_k", "min_p", "repeat_penalty", "repeat_last_n",
                                 "seed", "stop", "grammar", "lora", "speculative",
                                 "chat_template") if body.get(k) is not None}
    chat["messages"] = messages
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    tools = _tools(body.get("tools"))
    if tools:
        chat["tools"] = tools
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = _tool_choice(body["tool_choice"])
    response_format = _format(body.get("text"))
    if response_format is not None:
        chat["response_format"] = response_format
    try:
        call = parse_chat(chat, limits)
    except ApiError as exc:
        if exc.param in _PARAMS:
            exc.param = _PARAMS[exc.param]
        raise
    call.kind = "response"
    echoed = {
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "temperature": body.get("temperature"), "top_p": body.get("top_p"),
        "tools": body.get("tools") or [], "tool_choice": body.get("tool_choice") or "auto",
        "parallel_tool_calls": bool(body.get("parallel_tool_calls", False)),
        "previous_response_id": body.get("previous_response_id"),
        "metadata": body.get("metadata") or {},
        "text": {"format": (body.get("text") or {}).get("format") or {"type": "text"}},
        "truncation": "disabled", "store": body.get("store", True),
    }
    return ResponseRequest(call, conversation, echoed, store=body.get("store", True))


@dataclass
class ResponseOutput:
    """The response object and its events, from lorad's items and end (see the module)."""

    request: ResponseRequest
    model: str
    id: str = field(default_factory=lambda: "resp_" + secrets.token_hex(16))
    created_at: int = field(default_factory=lambda: int(time.time()))
    text: list[str] = field(default_factory=list)
    sequence: int = 0
    message_id: str = field(default_factory=lambda: "msg_" + secrets.token_hex(16))
    _open: bool = False

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event

    def _message(self, status: str) -> dict[str, Any]:
        parts = [{"type": "output_text", "text": "".join(self.text), "annotations": [],
                  "logprobs": []}] if status == "completed" else []
        return {"type": "message", "id": self.message_id, "status": status,
                "role": "assistant", "content": parts}

    def body(self, status: str, end: dict[str, Any] | None = None) -> dict[str, Any]:
        """The response object (``end``: the stream's end, once there is one)."""
        output: list[dict[str, Any]] = []
        if end is not None:
            if "".join(self.text) or not end.get("tool_calls"):
                output.append(self._message("completed"))
            output += [_function_call(c) for c in end.get("tool_calls") or []]
        u = usage(end) if end is not None else None
        incomplete = end is not None and end.get("finish_reason") == "length"
        return {
            "id": self.id, "object": "response", "created_at": self.created_at,
            "status": status, "model": self.model, "output": output,
            "output_text": "".join(self.text) if end is not None else "",
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "usage": {"input_tokens": u["prompt_tokens"],
                      "input_tokens_details": {"cached_tokens":
                                               u["prompt_tokens_details"]["cached_tokens"]},
                      "output_tokens": u["completion_tokens"],
                      "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": u["total_tokens"]} if u else None,
            **self.request.echo,
            **({"lorad": end.get("metrics", {})} if end is not None else {}),
        }

    def status(self, end: dict[str, Any]) -> str:
        return "incomplete" if end.get("finish_reason") == "length" else "completed"

    def start(self) -> list[dict[str, Any]]:
        """The opening events."""
        opening = self.body("in_progress")
        return [self._event("response.created", response=opening),
                self._event("response.in_progress", response=opening)]

    def add(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        """Events for one lorad item."""
        delta = item.get("text", "")
        if not delta:
            return []
        events = []
        if not self._open:
            self._open = True
            events += [
                self._event("response.output_item.added", output_index=0,
                            item=self._message("in_progress")),
                self._event("response.content_part.added", item_id=self.message_id,
                            output_index=0, content_index=0,
                            part={"type": "output_text", "text": "", "annotations": [],
                                  "logprobs": []}),
            ]
        self.text.append(delta)
        events.append(self._event("response.output_text.delta", item_id=self.message_id,
                                  output_index=0, content_index=0, delta=delta, logprobs=[]))
        return events

    def finish(self, end: dict[str, Any]) -> list[dict[str, Any]]:
        """The closing events: the message's, each call's, then ``response.completed`` (or
        ``response.incomplete`` at ``max_output_tokens``)."""
        events: list[dict[str, Any]] = []
        index = 0
        if self._open:
            text = "".join(self.text)
            events += [
                self._event("response.output_text.done", item_id=self.message_id,
                            output_index=0, content_index=0, text=text, logprobs=[]),
                self._event("response.content_part.done", item_id=self.message_id,
                            output_index=0, content_index=0,
                            part={"type": "output_text", "text": text, "annotations": [],
                                  "logprobs": []}),
                self._event("response.output_item.done", output_index=0,
                            item=self._message("completed")),
            ]
            index = 1
        for call in end.get("tool_calls") or []:
            item = _function_call(call)
            events += [
                self._event("response.output_item.added", output_index=index,
                            item={**item, "arguments": "", "status": "in_progress"}),
                self._event("response.function_call_arguments.delta", item_id=item["id"],
                            output_index=index, delta=item["arguments"]),
                self._event("response.function_call_arguments.done", item_id=item["id"],
                            output_index=index, arguments=item["arguments"],
                            name=item["name"]),
                self._event("response.output_item.done", output_index=index, item=item),
            ]
            index += 1
        status = self.status(end)
        kind = "response.completed" if status == "completed" else "response.incomplete"
        events.append(self._event(kind, response=self.body(status, end)))
        return events

    def conversation(self, end: dict[str, Any]) -> list[dict[str, Any]]:
        """What a later ``previous_response_id`` continues: the input and this output."""
        out = list(self.request.conversation)
        text = "".join(self.text)
        if end.get("tool_calls"):
            out.append({"role": "assistant", "content": text or None,
                        "tool_calls": end["tool_calls"]})
        else:
            out.append({"role": "assistant", "content": text})
        return out


def _function_call(call: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function_call", "id": "fc_" + call["id"].removeprefix("call_"),
            "call_id": call["id"], "name": call["function"]["name"],
            "arguments": call["function"]["arguments"], "status": "completed"}
