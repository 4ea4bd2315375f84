"""The OpenAI API, sans-IO: request bodies to lorad calls, stream items to responses and chunks,
lorad errors to OpenAI errors and HTTP statuses.

Nothing here touches a socket, a model or the event loop: :mod:`.door` runs what
:func:`parse_chat` and :func:`parse_completion` describe, and :class:`Output` turns the items
and the end of a lorad stream into OpenAI's shapes. Every parameter of OpenAI's API is either
honoured, accepted at the value that means "off" (``n: 1``, ``frequency_penalty: 0``, ...), or
refused with a 400 that names it: none is silently ignored but ``user`` (informational).
"""

from __future__ import annotations

import base64
import json
import math
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from lorad.protocol import ErrorCode, Limits, ProtocolError
from lorad.protocol.errors import echo

STATUS: dict[ErrorCode, int] = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.UNSUPPORTED_VERSION: 400,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.MODEL_LOAD_FAILED: 500,
    ErrorCode.CONTEXT_BUSY: 429,
    ErrorCode.CANCELLED: 499,
    ErrorCode.CONTEXT_OVERFLOW: 400,
    ErrorCode.FORBIDDEN_PATH: 403,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.IN_USE: 409,
    ErrorCode.SHUTTING_DOWN: 503,
    ErrorCode.INTERNAL: 500,
    ErrorCode.LORA_FILE_NOT_FOUND: 404,
    ErrorCode.LORA_INVALID: 422,
    ErrorCode.LORA_INCOMPATIBLE: 422,
    ErrorCode.LORA_LOAD_FAILED: 422,
    ErrorCode.LORA_INVALID_SCALE: 400,
    ErrorCode.LORA_UNSUPPORTED: 422,
    ErrorCode.BACKEND_UNSUPPORTED: 422,
    ErrorCode.SPECULATIVE_UNSUPPORTED: 400,
}
"""The HTTP status of each lorad error code (the spec's table; ``cancelled`` is 499, which a
client only sees if it is still there)."""

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 409: "invalid_request_error", 413: "invalid_request_error",
          422: "invalid_request_error", 429: "rate_limit_error", 499: "cancelled",
          503: "service_unavailable"}


class ApiError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, *, code: str | None = None,
                 param: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.retry_after = retry_after

    @classmethod
    def from_protocol(cls, exc: ProtocolError) -> ApiError:
        """lorad's error: its code in ``code``, its field in ``param``, the mapped status."""
        status = STATUS.get(exc.code, 500)
        field_ = exc.details.get("field")
        if field_ == "template":  # the protocol's argument is this API's chat_template
            return cls(status, exc.message.replace("pass template=", "pass chat_template "
                                                   "(or [http] chat_template)"),
                       code=exc.code.value, param="chat_template")
        retry = {429: 1, 503: 5}.get(status)
        return cls(status, exc.message, code=exc.code.value,
                   param=field_ if isinstance(field_, str) else None, retry_after=retry)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message,
                          "type": _TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str = "bad_request") -> ApiError:
    return ApiError(400, message, code=code, param=param)


# -- requests -----------------------------------------------------------------------------------
@dataclass
class Call:
    """One generation request, in lorad's terms."""

    kind: str
    """``chat`` or ``completion``."""
    model: str
    """The ``model`` field: a model id, an adapter name, or ``model-id:adapter``."""
    op: str
    """The lorad operation: ``chat`` or ``generate``."""
    args: dict[str, Any]
    """The operation's arguments but ``context`` and ``loras``."""
    loras: list[tuple[str, float]] = field(default_factory=list)
    """The ``lora`` list (llama-server's convention): names or paths with scales."""
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None
    """Candidates to report per token (None: no log-probabilities)."""
    response_format: dict[str, Any] | None = None
    """``json_object`` or ``json_schema`` (the door turns it into a grammar)."""

    @property
    def prompt_key(self) -> str:
        """What prompt-prefix reuse compares between requests on one context."""
        if self.op == "chat":
            return json.dumps(self.args["messages"], ensure_ascii=False)
        return self.args["prompt"]


# Parameters accepted at the value that means "off", refused otherwise (never ignored).
_OFF_VALUES: dict[str, tuple[Any, ...]] = {
    "n": (1,), "best_of": (1,), "frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0),
    "logit_bias": ({},), "store": (False,), "echo": (False,), "suffix": ("",),
    "functions": ([],), "function_call": ("none",),
    "modalities": (["text"],), "metadata": ({},),
    "service_tier": ("auto", "default"),
}
_WHY_NOT = {
    "n": "lorad returns one choice per request: send n requests (they are batched together)",
    "best_of": "lorad returns one choice per request",
    "functions": "functions (deprecated by OpenAI) are not supported: give tools",
    "function_call": "function_call (deprecated by OpenAI) is not supported: give "
                     "tool_choice",
    "frequency_penalty": "use repeat_penalty (multiplicative, llama.cpp's) instead",
    "presence_penalty": "use repeat_penalty (multiplicative, llama.cpp's) instead",
    "logit_bias": "logit_bias is not supported yet",
    "store": "lorad stores no completions",
    "metadata": "metadata is for stored completions, which lorad does not keep",
    "echo": "echo is not supported: the prompt is yours already",
    "suffix": "suffix (fill-in-the-middle) is not supported",
    "modalities": "only text is supported",
    "service_tier": "lorad has one service tier",
}
_COMMON = {"model", "max_tokens", "temperature", "top_p", "stop", "seed", "stream",
           "stream_options", "user", "top_k", "min_p", "repeat_penalty", "repeat_last_n",
           "grammar", "lora", "speculative", "response_format", *_OFF_VALUES}
_CHAT = _COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "chat_template",
                   "reasoning_effort", "prediction", "audio", "web_search_options", "tools",
                   "tool_choice", "parallel_tool_calls"}
_COMPLETION = _COMMON | {"prompt", "logprobs"}
_UNSUPPORTED = {"reasoning_effort": "reasoning_effort is not supported",
                "prediction": "predicted outputs are not supported yet: use speculative "
                              "{\"mode\": \"prompt_lookup\"}, which drafts from the prompt",
                "audio": "only text is supported",
                "web_search_options": "web search is not supported"}
_CHAT_ROLES = {"system": "system", "developer": "system", "user": "user",
               "assistant": "assistant", "tool": "tool"}


def _number(body: dict[str, Any], key: str) -> float | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise bad(f"{key!r} must be a finite number", key)
    return v


def _integer(body: dict[str, Any], key: str) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(f"{key!r} must be an integer", key)
    return v


def _common(body: Any, allowed: set[str], limits: Limits) -> tuple[dict[str, Any], Call]:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    for key in body:
        if key not in allowed:
            raise bad(f"unknown parameter {echo(key)!r}", echo(key), code="unknown_parameter")
    for key, why in _UNSUPPORTED.items():
        if body.get(key) is not None and key in allowed:
            raise bad(why, key, code="unsupported_parameter")
    for key, off in _OFF_VALUES.items():
        if key in body and body[key] is not None and body[key] not in off:
            why = _WHY_NOT.get(key, "not supported")
            raise bad(f"{key} = {echo(body[key], as_repr=True)}: {why}", key,
                      code="unsupported_parameter")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("'model' is required: a model id, an adapter name or model-id:adapter "
                  "(GET /v1/models lists them)", "model")
    args: dict[str, Any] = {}
    for key in ("temperature", "top_p", "min_p", "repeat_penalty"):
        v = _number(body, key)
        if v is not None:
            args[key] = v
    for key in ("seed", "top_k", "repeat_last_n"):
        v = _integer(body, key)
        if v is not None:
            args[key] = v
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise bad("'stop' must be a string or a list of strings", "stop")
        args["stop"] = [s for s in stops if s]
    grammar = body.get("grammar")
    if grammar is not None:
        args["grammar"] = grammar
    if body.get("speculative") is not None:
        args["speculative"] = body["speculative"]
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise bad("'stream' must be true or false", "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise bad("stream_options is only allowed with stream: true", "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise bad("stream_options must be {\"include_usage\": bool}", "stream_options")
        include_usage = bool(options.get("include_usage", False))
    call = Call(kind="", model=model, op="", args=args, loras=_loras(body.get("lora")),
                stream=bool(stream), include_usage=include_usage,
                response_format=_response_format(body.get("response_format")))
    if call.response_format is not None and grammar is not None:
        raise bad("give either grammar or response_format, not both", "response_format")
    return body, call


def _loras(value: Any) -> list[tuple[str, float]]:
    """llama-server's ``lora``: ``[{"name" | "path": str, "scale": number = 1}, ...]``."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise bad("'lora' must be a list of {\"name\" | \"path\", \"scale\"}", "lora")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise bad(f"lora[{i}] must be an object {{\"name\" | \"path\", \"scale\"}}", "lora")
        if "id" in item:
            raise bad(f"lora[{i}]: adapters are named here, not numbered: give \"name\" (looked "
                      "up in the adapter directories) or \"path\"", "lora")
        unknown = set(item) - {"name", "path", "scale"}
        if unknown or ("name" in item) == ("path" in item):
            raise bad(f"lora[{i}] must have exactly one of \"name\" and \"path\", and "
                      "optionally \"scale\"", "lora")
        ref = item.get("name", item.get("path"))
        if not isinstance(ref, str) or not ref:
            raise bad(f"lora[{i}]: the name or path must be a non-empty string", "lora")
        if "name" in item and ("/" in ref or ref in (".", "..")):
            raise bad(f"lora[{i}]: a name has no '/': give \"path\" for a file", "lora")
        scale = item.get("scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(
                scale):
            raise ApiError(400, f"lora[{i}]: scale must be a finite number",
                           code=ErrorCode.LORA_INVALID_SCALE.value, param="lora")
        out.append((ref, float(scale)))
    return out


def _response_format(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise bad("response_format must be {\"type\": \"text\" | \"json_object\" | "
                  "\"json_schema\", ...}", "response_format")
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise bad("response_format json_schema needs {\"json_schema\": {\"name\", "
                      "\"schema\": {...}}}", "response_format")
        return {"type": "json_schema", "schema": spec.get("schema", {})}
    raise bad(f"response_format type {echo(kind)!r} is not supported (text, json_object, "
              "json_schema)", "response_format")


def _max_tokens(body: dict[str, Any], keys: tuple[str, ...], limits: Limits) -> int:
    given = {k: _integer(body, k) for k in keys if body.get(k) is not None}
    if len(set(given.values())) > 1:
        raise bad(f"{' and '.join(given)} differ: give one", keys[0])
    value = next(iter(given.values()), None)
    if value is None:
        return limits.max_tokens  # OpenAI's default: until the model stops or n_ctx is full
    if value < 1:
        raise bad(f"{next(iter(given))} must be at least 1", next(iter(given)))
    return value


def _tool_calls(message: dict[str, Any], i: int) -> list[dict[str, Any]]:
    """An assistant message's ``tool_calls``, checked: ``[{id, type, function: {name,
    arguments}}]``."""
    calls = message["tool_calls"]
    if message["role"] != "assistant" or not isinstance(calls, list):
        raise bad(f"messages[{i}]: tool_calls is a list, on an assistant message", "messages")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if (not isinstance(fn, dict) or call.get("type", "function") != "function"
                or not isinstance(fn.get("name"), str)
                or not isinstance(fn.get("arguments"), str)
                or not isinstance(call.get("id", ""), str)):
            raise bad(f"messages[{i}].tool_calls[{j}] must be {{\"id\", \"type\": "
                      "\"function\", \"function\": {\"name\", \"arguments\": JSON text}}",
                      "messages")
        out.append({"id": call.get("id", f"call_{i}_{j}"), "type": "function",
                    "function": {"name": fn["name"], "arguments": fn["arguments"]}})
    return out


def _content(message: dict[str, Any], i: int) -> str:
    if message.get("function_call"):
        raise bad(f"messages[{i}]: function_call (deprecated by OpenAI) is not supported: "
                  "use tool_calls", "messages", code="unsupported_parameter")
    if message.get("refusal"):
        raise bad(f"messages[{i}]: a refusal in the history is not supported: put it in "
                  "content", "messages", code="unsupported_parameter")
    content = message.get("content")
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(
                    part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad(f"messages[{i}]: content part of type {echo(kind)!r} is not "
                          "supported (text only)", "messages", code="unsupported_parameter")
            parts.append(part["text"])
        return "\n".join(parts)
    raise bad(f"messages[{i}].content must be a string or a list of text parts", "messages")


def parse_chat(body: Any, limits: Limits) -> Call:
    """``POST /v1/chat/completions``'s body as a lorad ``chat`` call."""
    body, call = _common(body, _CHAT, limits)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(f"messages[{i}] must be an object with a string 'role'", "messages")
        role = m["role"]
        if role not in _CHAT_ROLES:
            raise bad(f"messages[{i}]: role {echo(role)!r} is not supported (system, "
                      "developer, user, assistant, tool)", "messages",
                      code="unsupported_parameter")
        unknown = set(m) - {"role", "content", "name", "tool_calls", "function_call",
                            "refusal", "tool_call_id"}
        if unknown:
            raise bad(f"messages[{i}]: unknown key {echo(sorted(unknown)[0])!r}", "messages")
        entry: dict[str, Any] = {"role": _CHAT_ROLES[role], "content": _content(m, i)}
        if isinstance(m.get("name"), str):
            entry["name"] = m["name"]
        if m.get("tool_calls"):
            entry["tool_calls"] = _tool_calls(m, i)
        if role == "tool":
            if not isinstance(m.get("tool_call_id"), str):
                raise bad(f"messages[{i}]: a tool message needs its tool_call_id", "messages")
            entry["tool_call_id"] = m["tool_call_id"]
        out.append(entry)
    call.kind, call.op = "chat", "chat"
    call.args["messages"] = out
    for key in ("tools", "tool_choice", "parallel_tool_calls"):  # checked by the daemon
        if body.get(key) is not None:
            call.args[key] = body[key]
    template = body.get("chat_template")  # vLLM's extension: a built-in name or Jinja
    if template is not None:
        if not isinstance(template, str) or not template:
            raise bad("chat_template must be a non-empty string (a llama.cpp built-in "
                      "template name or Jinja source)", "chat_template")
        call.args["template"] = template
    call.args["max_tokens"] = _max_tokens(body, ("max_completion_tokens", "max_tokens"), limits)
    logprobs, top = body.get("logprobs"), body.get("top_logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise bad("'logprobs' must be true or false", "logprobs")
    if top is not None:
        if not logprobs:
            raise bad("top_logprobs needs logprobs: true", "top_logprobs")
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20:
            raise bad("top_logprobs must be an integer in 0..20", "top_logprobs")
    if logprobs:
        call.logprobs = top or 0
    return call


def parse_completion(body: Any, limits: Limits) -> Call:
    """``POST /v1/completions``'s body as a lorad ``generate`` call (one prompt)."""
    body, call = _common(body, _COMPLETION, limits)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad("'prompt' must be a string (one prompt per request: send several requests, "
                  "they are batched together)", "prompt")
    call.kind, call.op = "completion", "generate"
    call.args["prompt"] = prompt
    call.args["max_tokens"] = _max_tokens(body, ("max_tokens",), limits)
    logprobs = body.get("logprobs")
    if logprobs is not None:
        if isinstance(logprobs, bool) or not isinstance(logprobs, int) or not 0 <= logprobs <= 5:
            raise bad("logprobs must be an integer in 0..5", "logprobs")
        call.logprobs = logprobs
    return call


def parse_embeddings(body: Any) -> tuple[str, list[str], str]:
    """``POST /v1/embeddings``: the model, the inputs (strings; token arrays are refused) and
    the encoding (``float``: numbers; ``base64``: little-endian float32 bytes)."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    for key in body:
        if key not in ("model", "input", "encoding_format", "user", "dimensions"):
            raise bad(f"unknown parameter {echo(key)!r}", echo(key), code="unknown_parameter")
    if body.get("encoding_format") not in (None, "float", "base64"):
        raise bad("encoding_format must be \"float\" or \"base64\"", "encoding_format",
                  code="unsupported_parameter")
    if body.get("dimensions") is not None:
        raise bad("dimensions is not supported: the model's own size is returned",
                  "dimensions", code="unsupported_parameter")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("'model' is required", "model")
    value = body.get("input")
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
        raise bad("'input' must be a string or a list of strings (token arrays are not "
                  "supported)", "input")
    return model, items, body.get("encoding_format") or "float"


# -- responses ----------------------------------------------------------------------------------
FINISH = {"stop": "stop", "length": "length", "tool_calls": "tool_calls"}


@dataclass
class Output:
    """Builds one request's OpenAI response (or its chunks) from lorad's items and end."""

    call: Call
    model: str
    """The ``model`` the response names (the request's)."""
    id: str
    piece: Any = None
    """``token -> bytes`` of the model, for log-probabilities."""
    created: int = field(default_factory=lambda: int(time.time()))
    text: list[str] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    offset: int = 0

    @property
    def _object(self) -> str:
        return "chat.completion" if self.call.kind == "chat" else "text_completion"

    def _token(self, token: int) -> tuple[str, list[int]]:
        data = self.piece(token) if self.piece is not None else b""
        return data.decode("utf-8", "replace"), list(data)

    def _entries(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        """OpenAI chat log-probability entries for an item's tokens."""
        out = []
        tops = item.get("logprobs") or []
        chosen = item.get("token_logprobs") or []
        for token, top, lp in zip(item.get("token_ids", []), tops, chosen, strict=False):
            text, data = self._token(token)
            entry = {"token": text, "logprob": _finite(lp), "bytes": data, "top_logprobs": []}
            for t, p in top[: self.call.logprobs or 0]:
                t_text, t_data = self._token(int(t))
                entry["top_logprobs"].append({"token": t_text, "logprob": _finite(p),
                                              "bytes": t_data})
            out.append(entry)
        return out

    def add(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        """Take one lorad item; the chunks to stream for it (none when nothing is new)."""
        text = item.get("text", "")
        self.text.append(text)
        entries = self._entries(item) if self.call.logprobs is not None else []
        self.logprobs.extend(entries)
        if not text and not entries:
            return []
        if self.call.kind == "chat":
            choice = {"index": 0, "delta": {"content": text},
                      "logprobs": {"content": entries} if entries else None,
                      "finish_reason": None}
        else:
            logprobs = None
            if entries:
                logprobs = _completion_logprobs(entries, self.offset)
                self.offset += sum(len(e["token"]) for e in entries)
            choice = {"index": 0, "text": text, "finish_reason": None, "logprobs": logprobs}
        return [self._chunk([choice])]

    def first_chunk(self) -> dict[str, Any] | None:
        """Chat streams open with the assistant's role."""
        if self.call.kind != "chat":
            return None
        return self._chunk([{"index": 0, "delta": {"role": "assistant", "content": ""},
                             "logprobs": None, "finish_reason": None}])

    def last_chunks(self, end: dict[str, Any]) -> list[dict[str, Any]]:
        """The chunk with the finish reason, then usage when asked."""
        finish = FINISH.get(end.get("finish_reason"), "stop")
        delta: dict[str, Any] = {} if self.call.kind == "chat" else {"text": ""}
        choice = ({"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                  if self.call.kind == "chat"
                  else {"index": 0, "text": "", "logprobs": None, "finish_reason": finish})
        out = [self._chunk([{"index": 0, "delta": {"tool_calls": [
                   {"index": i, **c} for i, c in enumerate(end["tool_calls"])]},
               "logprobs": None, "finish_reason": None}])] if end.get("tool_calls") else []
        out.append(self._chunk([choice]))
        if self.call.include_usage:
            out.append({**self._chunk([]), "usage": usage(end)})
        return out

    def response(self, end: dict[str, Any]) -> dict[str, Any]:
        """The whole (non-streamed) response."""
        finish = FINISH.get(end.get("finish_reason"), "stop")
        text = "".join(self.text)
        if self.call.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
            if end.get("tool_calls"):
                message["tool_calls"] = end["tool_calls"]
                message["content"] = text or None
            choice: dict[str, Any] = {
                "index": 0, "message": message,
                "logprobs": ({"content": self.logprobs} if self.call.logprobs is not None
                             else None),
                "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish,
                      "logprobs": (_completion_logprobs(self.logprobs, 0)
                                   if self.call.logprobs is not None else None)}
        return {"id": self.id, "object": self._object, "created": self.created,
                "model": self.model, "choices": [choice], "usage": usage(end),
                "system_fingerprint": None, "lorad": end.get("metrics", {})}

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.call.kind == "chat" else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices, "system_fingerprint": None}


UNLIKELY = -9999.0
"""OpenAI's log-probability for "very unlikely": what a -inf (or NaN) is sent as, since JSON
has no infinities (a -inf made the response unrenderable: a 500, found by the HTTP fuzz)."""


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else UNLIKELY


def _completion_logprobs(entries: list[dict[str, Any]], offset: int) -> dict[str, Any]:
    """Legacy completions' log-probabilities; ``offset``: the text offset of the first."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e["token"])
    return {"tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]}
                             for e in entries],
            "text_offset": offsets}


def usage(end: dict[str, Any]) -> dict[str, Any]:
    m = end.get("metrics") or {}
    prompt, completion = int(m.get("prompt_tokens") or 0), int(m.get("generated_tokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": int(m.get("cached_prompt_tokens") or 0)}}


def embeddings_response(model: str, result: dict[str, Any], encoding: str = "float"
                        ) -> dict[str, Any]:
    vectors = result.get("embeddings", [])
    tokens = int(result.get("prompt_tokens") or 0)

    def encode(v: list[float]) -> Any:
        if encoding != "base64":
            return v
        return base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode("ascii")

    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": encode(v)}
                     for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
