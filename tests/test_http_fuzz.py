"""Structure-aware fuzzing of the OpenAI HTTP door of a real daemon, one field at a time.

The HTTP counterpart of ``tests/test_fuzz.py``. For each endpoint the door serves
(``daemon/http/app.py``: ``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions``,
``/v1/completions``, ``/v1/embeddings``; plain and streamed) there is at least one *valid*
baseline request that runs for real (a tiny generated model, adapters by name and by path, a
chat template, a JSON schema, speculative drafts, log-probabilities). Each case takes one
baseline and changes exactly one thing:

- one JSON field at any depth (``messages[0].content``, ``lora[1].scale``,
  ``response_format.json_schema.schema.type`` ...), set to an edge value (wrong types, 0, -1,
  ±2⁶³, 2⁶⁴, a 400-digit and a 5,000-digit integer, ``NaN`` / ``Infinity`` / ``1e400`` as JSON
  tokens, empty / NUL / 1 MiB / 4 MiB strings, lone-surrogate escapes, raw invalid UTF-8, lists
  and maps 200 deep, 100,000 ``[``, duplicate keys, huge ``n`` / ``max_tokens`` / ``logprobs``
  / ``top_logprobs``, hostile paths, grammars, templates and schemas), removed, or joined by an
  unknown key;
- or the request around the body: an empty, truncated, non-JSON, invalid-UTF-8, UTF-16,
  16 MiB + 1 or 100,000-deep body, another ``Content-Type``, method, path, ``Host`` or
  ``Authorization``; and, over a raw socket, what an HTTP parser sees (a body shorter than its
  ``Content-Length`` then a half-close, bad chunk sizes, no ``Host``, pipelining...).

Cases go one at a time over real loopback sockets (httpx; raw sockets for the transport
cases); streams are read to their end. Checked for every answer: its status is one the door
documents (:data:`STATUSES`; a 500 is always a finding, reported with the cause the daemon
logged), every non-2xx answer is OpenAI's error shape ``{"error": {"message", "type", "param",
"code"}}`` with a known code and a bounded size (429 and 503 with ``Retry-After``), bodies are
strict JSON (no ``NaN``), successful answers have the endpoint's shape, and a stream is
``data:`` events that end with ``data: [DONE]`` (or one error event). ``"level": "error"`` log
lines are findings. At the end the daemon is alive, its door has no request queued or running,
its open files are back to the post-warm-up count, and a greedy chat completion gives the text
it gave at the start. A problem does not stop the run: it is recorded (the request, what
happened), a crashed daemon is restarted, and everything is reported at the end (and fails
the test). Transport cases that the HTTP parser refuses (Hypercorn answers a bare 400, below
the door) are only checked for a 4xx or a closed connection, and the daemon's survival.

The enumeration is deterministic: a seed (printed; ``LORAD_FUZZ_SEED`` overrides it) only
orders the cases and picks the fast slice. ``test_http_fuzz_fast_slice`` (in ``make test``)
runs a fixed subset; ``test_http_fuzz_full_run`` (``make fuzz``, marker ``fuzz``) runs every
case (more than 10,000). ``LORAD_FUZZ_ONLY=<substring>`` keeps only the cases whose label
contains it. ``pytest -s`` shows the findings and the summary line.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

import tinymodels
from conftest import DaemonProcess, fd_count, rss_kib, start_daemon
from fuzzkit import (
    Finding,
    at,
    bounds,
    leaf_paths,
    nest_list,
    nest_map,
    path_label,
    select_cases,
    walk,
)
from fuzzkit import copy_tree as _copy_tree
from lorad.protocol import DEFAULT_LIMITS, ErrorCode

DEFAULT_SEED = 9
CASE_TIMEOUT_S = 60.0
"""A case without its whole answer after this long is a hang."""
FAST_CASES = 600
"""Cases of the fast slice: every baseline and transport case, and a seeded sample."""
FAST_COSTLY = 8
STATUSES = frozenset({200, 400, 401, 403, 404, 405, 409, 413, 415, 422, 429, 503})
"""What the door answers (README, protocol/README.md §16). 500 (``internal``,
``model_load_failed``) is documented too, but any 500 here is a finding; 401 needs API keys,
which this daemon has none of; 499 has nobody to read it."""
CODES = frozenset(c.value for c in ErrorCode) | {
    "model_not_found", "unknown_parameter", "unsupported_parameter", "invalid_api_key",
    "ambiguous_model"}
"""``error.code`` values: lorad's codes and the door's own (§16)."""
LOGGED_500 = frozenset({"model_load_failed"})
"""500s the spec documents (llama.cpp could not load a file the request named, say as its draft
model): not findings when the daemon logged each such request with its cause."""
MAX_ERROR_BYTES = 16 * 1024
"""An error answer longer than this echoes too much of the request."""
FD_TOLERANCE = 4
PARSER_STATUSES = frozenset({400, 413, 431, 501})
"""What Hypercorn's HTTP parser (h11) answers, with an empty body, to bytes that are not an
HTTP request it accepts (raw cases only): these never reach the door."""
LIMITS = DEFAULT_LIMITS
CHAT = [{"role": "user", "content": "hello there, the cat"}]
GREEDY = {"model": "tiny", "messages": CHAT, "max_tokens": 12, "temperature": 0}


# -- values ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Raw:
    """JSON text written as it is: ``NaN``, ``1e400``, a lone surrogate escape, invalid UTF-8,
    100,000 ``[``, duplicate keys... (``json.dumps`` cannot write them)."""

    text: bytes


OPAQUE: set[int] = set()
"""ids of the table's containers, sent as they are and never walked (some are deep or long)."""

COSTLY = frozenset({"str:1MiB", "str:utf8-1MiB", "str:max", "str:over-max", "list:131073",
                    "body:16MiB+1", "body:16MiB-json", "chunked:16MiB+1"})
"""Values that cost a megabyte or more per request: only on top-level fields."""


@dataclass
class Files:
    dir: Path
    model: Path
    adapters: Path
    pirate: Path
    other: Path
    wrong: Path
    garbage: Path
    fifo: Path
    n_vocab: int


def generic_values(files: Files) -> list[tuple[str, Any]]:
    """Edge values tried in every field (a label for the reports, the value)."""
    big = LIMITS.max_str_len
    return [
        ("null", None), ("true", True), ("false", False),
        ("int:0", 0), ("int:-1", -1), ("int:1", 1), ("int:2^31", 2**31), ("int:-2^31", -(2**31)),
        ("int:2^32", 2**32), ("int:2^53+1", 2**53 + 1), ("int:2^63-1", 2**63 - 1),
        ("int:2^63", 2**63), ("int:-2^63", -(2**63)), ("int:2^64", 2**64),
        ("int:-2^64-1", -(2**64) - 1), ("int:400-digits", Raw(b"1" + b"0" * 400)),
        ("int:5000-digits", Raw(b"7" * 5000)),
        ("json:NaN", Raw(b"NaN")), ("json:Infinity", Raw(b"Infinity")),
        ("json:-Infinity", Raw(b"-Infinity")), ("json:1e400", Raw(b"1e400")),
        ("json:-1e400", Raw(b"-1e400")), ("json:1E2", Raw(b"1E2")),
        ("float:-0.0", -0.0), ("float:0.5", 0.5), ("float:-0.5", -0.5), ("float:1.0", 1.0),
        ("float:1e308", 1e308), ("float:-1e308", -1e308), ("float:5e-324", 5e-324),
        ("float:2^63", 2.0**63),
        ("str:empty", ""), ("str:space", " "), ("str:nul", "\x00"), ("str:a-nul-b", "a\x00b"),
        ("str:64", "x" * 64), ("str:unicode", "é日本🙂\u202e\ufeff"), ("str:jinja", "{{ 7*7 }}{%"),
        ("str:format", "%s%n{0}"), ("str:traversal", "../../../../../../etc/passwd"),
        ("str:root", "/"), ("str:etc-passwd", "/etc/passwd"), ("str:dev-zero", "/dev/zero"),
        ("str:proc-mem", "/proc/self/mem"), ("str:tilde", "~"),
        ("str:tilde-user", "~nosuchuser/x"), ("str:name", "nonexistent"),
        ("str:gguf-name", "nonexistent.gguf"), ("str:dir", str(files.dir)),
        ("str:missing-file", str(files.dir / "missing.gguf")),
        ("str:adapter-file", str(files.other)), ("str:model-file", str(files.model)),
        ("str:fifo", str(files.fifo)), ("str:16KiB", "y" * 16384),
        ("str:1MiB", "x" * (1 << 20)), ("str:utf8-1MiB", "日" * (1 << 18)),
        ("str:max", "x" * big), ("str:over-max", "x" * (big + 1)),
        ("esc:lone-high", Raw(b'"\\ud800"')), ("esc:lone-low", Raw(b'"a\\udfffb"')),
        ("esc:pair", Raw(b'"\\ud83d\\ude00"')), ("esc:nul", Raw(b'"\\u0000"')),
        ("utf8:ff", Raw(b'"\xff\xfe"')), ("utf8:surrogate", Raw(b'"\xed\xa0\x80"')),
        ("utf8:truncated", Raw(b'"ab\xe6\x97"')), ("utf8:overlong", Raw(b'"\xc0\xaf"')),
        ("list:empty", []), ("list:null", [None]), ("list:0", [0]), ("list:str", ["a"]),
        ("list:mixed", [1, "a", None, 1.5, {}, []]), ("list:depth-30", nest_list(30)),
        ("list:depth-200", nest_list(200)), ("list:depth-900", nest_list(900)),
        ("list:100k-open", Raw(b"[" * 100_000)),
        ("list:100k-deep", Raw(b"[" * 100_000 + b"]" * 100_000)),
        ("list:65536-zeros", [0] * 65536), ("list:131073", [0] * (LIMITS.max_array_len + 1)),
        ("map:empty", {}), ("map:empty-key", {"": None}), ("map:depth-30", nest_map(30)),
        ("map:depth-200", nest_map(200)), ("map:100k-deep",
                                           Raw(b'{"a":' * 100_000 + b"0" + b"}" * 100_000)),
        ("map:2000-keys", {f"k{i}": i for i in range(2000)}),
        ("map:dup-keys", Raw(b'{"a": 1, "a": 2}')), ("map:type", {"type": "text"}),
    ]


def field_values(files: Files) -> dict[str, list[tuple[str, Any]]]:
    """Values for particular fields (by the last key of the path), on top of the generic ones:
    range ends, the door's limits, OpenAI's own values, and inputs known to be hostile."""
    pirate, other, model = str(files.pirate), str(files.other), str(files.model)
    nv = files.n_vocab
    huge = [("huge:2^31", 2**31), ("huge:10^9", 10**9), ("huge:2^63", 2**63)]
    schema_bombs = [
        ("schema:min-items", {"type": "array", "minItems": 10**9}),
        ("schema:pattern", {"type": "string", "pattern": "a{1000}{1000}"}),
        ("schema:ref-remote", {"$ref": "https://example.com/s.json"}),
        ("schema:ref-loop", {"$ref": "#"}), ("schema:ref-missing", {"$ref": "#/defs/x"}),
        ("schema:deep", nest_map(100) | {"type": "object"}),
        ("schema:type-nope", {"type": "nope"}), ("schema:enum-empty", {"enum": []}),
        ("schema:any-of-empty", {"anyOf": []}), ("schema:items-int", {"items": 3}),
        ("schema:props-list", {"type": "object", "properties": []}),
        ("schema:required-int", {"type": "object", "required": [1]}),
        ("schema:10k-props", {"type": "object",
                              "properties": {f"p{i}": {"type": "string"} for i in range(10000)}}),
    ]
    grammar_nest = "root ::= " + "(" * 20000 + '"a"' + ")" * 20000
    grammar_alt = "root ::= " + " | ".join(f'"{i}"' for i in range(50000))
    return {
        "max_tokens": [*bounds(1, LIMITS.max_tokens), *huge],
        "max_completion_tokens": [*bounds(1, LIMITS.max_tokens), *huge],
        "n": [("n:2", 2), ("n:0", 0), ("n:128", 128), *huge, ("n:float-1", 1.0)],
        "best_of": [("best_of:2", 2), *huge],
        "logprobs": [*bounds(0, 5), *bounds(0, 20), ("logprobs:n_vocab", nv), *huge],
        "top_logprobs": [*bounds(0, 20), ("top:n_vocab", nv), *huge],
        "temperature": [*bounds(0.0, 100.0, integer=False), ("tiny", 1e-30), ("two", 2.0)],
        "top_p": bounds(0.0, 1.0, integer=False),
        "min_p": bounds(0.0, 1.0, integer=False),
        "repeat_penalty": [*bounds(0.0, 100.0, integer=False), ("penalty:1.5", 1.5)],
        "repeat_last_n": bounds(0, 1 << 20),
        "seed": [*bounds(0, 2**32 - 1), *huge],
        "top_k": [*bounds(0, None), ("n_vocab", nv), ("n_vocab+1", nv + 1), *huge],
        "frequency_penalty": [("fp:0.5", 0.5), ("fp:-2", -2), ("fp:0", 0)],
        "presence_penalty": [("pp:2", 2.0), ("pp:0.0", 0.0)],
        "logit_bias": [("bias:one", {"300": 100}), ("bias:bad-key", {"x": 1}),
                       ("bias:10000", {str(i): 1 for i in range(10000)})],
        "stop": [("stop:16", ["zz"] * 16), ("stop:17", ["zz"] * 17),
                 ("stop:10000", [f"s{i}" for i in range(10000)]),
                 ("stop:long", ["x" * 100_000]), ("stop:one-char", ["e"]),
                 ("stop:space", [" "]), ("stop:replacement", ["\ufffd"]),
                 ("stop:nul", ["\x00"]), ("stop:empty-item", ["a", ""]), ("stop:str-e", "e")],
        "stream": [("stream:str", "true"), ("stream:int", 1)],
        "stream_options": [("so:usage-str", {"include_usage": "yes"}),
                           ("so:unknown", {"x": 1}), ("so:both", {"include_usage": True,
                                                                   "continuous_usage_stats": 1})],
        "messages": [("msgs:no-content", [{"role": "user"}]),
                     ("msgs:int-role", [{"role": 1, "content": "x"}]),
                     ("msgs:tool-role", [{"role": "tool", "content": "x",
                                          "tool_call_id": "1"}]),
                     ("msgs:tool-calls", [{"role": "assistant", "content": None,
                                           "tool_calls": [{"id": "1", "type": "function"}]}]),
                     ("msgs:refusal", [{"role": "assistant", "content": "", "refusal": "no"}]),
                     ("msgs:extra-key", [{"role": "user", "content": "x", "tool": [1, {}]}]),
                     ("msgs:name-int", [{"role": "user", "content": "x", "name": 3}]),
                     ("msgs:10000", [{"role": "user", "content": "hi"}] * 10000),
                     ("msgs:long", [{"role": "user", "content": "the cat " * 2000}]),
                     ("msgs:assistant-only", [{"role": "assistant", "content": "x"}]),
                     ("msgs:str", ["user: hi"])],
        "role": [("role:tool", "tool"), ("role:function", "function"),
                 ("role:developer", "developer"), ("role:upper", "USER"),
                 ("role:assistant", "assistant")],
        "content": [("content:image", [{"type": "image_url",
                                        "image_url": {"url": "data:image/png;base64,AA=="}}]),
                    ("content:audio", [{"type": "input_audio", "input_audio": {}}]),
                    ("content:part-no-text", [{"type": "text"}]),
                    ("content:part-int", [{"type": "text", "text": 1}]),
                    ("content:part-str", ["hi"]), ("content:parts-1000",
                                                   [{"type": "text", "text": "a"}] * 1000)],
        "text": [("text:long", "the cat " * 5000)],
        "lora": [("lora:17", [{"name": "pirate"}] * 17), ("lora:100", [{"path": other}] * 100),
                 ("lora:id", [{"id": 0, "scale": 0.5}]), ("lora:both", [{"name": "pirate",
                                                                          "path": other}]),
                 ("lora:neither", [{"scale": 1}]), ("lora:extra", [{"name": "pirate",
                                                                    "x": 1}]),
                 ("lora:str", ["pirate"]), ("lora:dict", {"name": "pirate"}),
                 ("lora:model", [{"path": model}]), ("lora:wrong-arch",
                                                     [{"path": str(files.wrong)}]),
                 ("lora:garbage", [{"path": str(files.garbage)}]),
                 ("lora:fifo", [{"path": str(files.fifo)}]),
                 ("lora:dir", [{"path": str(files.dir)}]),
                 ("lora:twice", [{"path": pirate}, {"name": "pirate"}])],
        "name": [("name:pirate", "pirate"), ("name:nope", "nope"), ("name:slash", "a/b"),
                 ("name:dotdot", ".."), ("name:dot", "."), ("name:model", "tiny"),
                 ("name:gguf", "pirate.gguf"), ("name:tilde", "~pirate")],
        "path": [("path:pirate", pirate), ("path:relative", "adapters/pirate.gguf"),
                 ("path:model", model), ("path:wrong-arch", str(files.wrong)),
                 ("path:garbage", str(files.garbage)), ("path:fifo", str(files.fifo)),
                 ("path:dir", str(files.adapters)), ("path:tilde-user", "~nosuchuser/a.gguf"),
                 ("path:home", "~/a.gguf"), ("path:long", "/" + "a" * 5000 + ".gguf"),
                 ("path:deep", "/a" * 3000)],
        "scale": [("scale:1e308", 1e308), ("scale:-1e308", -1e308), ("scale:1e-320", 1e-320),
                  ("scale:str", "1.0"), ("scale:-2", -2.0), ("scale:1e38", 1e38)],
        "model": [("model:tiny-pirate", "tiny:pirate"), ("model:pirate", "pirate"),
                  ("model:colon", "tiny:"), ("model:colon-first", ":pirate"),
                  ("model:tiny-nope", "tiny:nope"), ("model:tiny-dotdot", "tiny:../x"),
                  ("model:tiny-path", "tiny:/etc/passwd"), ("model:tiny-tilde",
                                                            "tiny:~nosuchuser/x"),
                  ("model:tiny-other", "tiny:" + other), ("model:gpt", "gpt-4o"),
                  ("model:long-adapter", "tiny:" + "a" * 100_000),
                  ("model:long", "m" * 100_000), ("model:wrong-arch", "tiny:" + str(files.wrong)),
                  ("model:tiny-fifo", "tiny:" + str(files.fifo)),
                  ("model:tiny-garbage", "tiny:" + str(files.garbage))],
        "response_format": [("rf:text", {"type": "text"}), ("rf:json", {"type": "json_object"}),
                            ("rf:schema-missing", {"type": "json_schema"}),
                            ("rf:schema-empty", {"type": "json_schema", "json_schema": {}}),
                            ("rf:xml", {"type": "xml"}), ("rf:type-int", {"type": 1}),
                            *schema_bombs],
        "json_schema": [("js:name-only", {"name": "t"}), ("js:schema-list", {"schema": []}),
                        ("js:strict", {"name": "t", "strict": True, "schema": {}}),
                        *((label, {"name": "t", "schema": s}) for label, s in schema_bombs)],
        "schema": schema_bombs,
        "type": [("type:json_object", "json_object"), ("type:json_schema", "json_schema"),
                 ("type:text", "text"), ("type:array", "array"), ("type:function", "function")],
        "required": [("required:missing", ["nope"]), ("required:dup", ["ok", "ok"])],
        "chat_template": [("tmpl:range-nested", "{% for i in range(100000) %}{% for j in "
                           "range(100000) %}{% endfor %}{% endfor %}"),
                          ("tmpl:big-output", "{{ 'x' * 10000000 }}"),
                          ("tmpl:escape-mro", "{{ ''.__class__.__mro__[1].__subclasses__() }}"),
                          ("tmpl:escape-globals", "{{ raise_exception.__globals__ }}"),
                          ("tmpl:raise", "{{ raise_exception('no') }}"),
                          ("tmpl:undefined", "{{ nope.attr }}"), ("tmpl:gemma", "gemma"),
                          ("tmpl:unknown", "nonexistent-template"),
                          ("tmpl:recursion",
                           "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}"),
                          ("tmpl:empty-output", "{% if false %}x{% endif %}")],
        "grammar": [("grammar:nest-20000", grammar_nest), ("grammar:alt-50000", grammar_alt),
                    ("grammar:left-rec", 'root ::= root "a"'), ("grammar:undefined",
                                                                "root ::= x"),
                    ("grammar:no-root", 'a ::= "a"'), ("grammar:any", "root ::= [^\\x00]*"),
                    ("grammar:unterminated", 'root ::= "a'), ("grammar:empty", 'root ::= ""')],
        "speculative": [("spec:mtp", {"mode": "mtp"}), ("spec:draft-no-model",
                                                        {"mode": "draft_model"}),
                        ("spec:draft-self", {"mode": "draft_model", "model": "tiny"}),
                        ("spec:draft-adapter", {"mode": "draft_model", "model": pirate}),
                        ("spec:inverted", {"mode": "prompt_lookup", "ngram_min": 3,
                                           "ngram_max": 1}),
                        ("spec:unknown-param", {"mode": "prompt_lookup", "x": 1}),
                        ("spec:unknown-mode", {"mode": "nope"})],
        "mode": [("mode:draft_model", "draft_model"), ("mode:off", "off")],
        "ngram_min": bounds(1, 8), "ngram_max": bounds(1, 8), "max_draft": bounds(1, 64),
        "input": [("input:tokens", [1, 300, 301]), ("input:token-lists", [[1, 300], [301]]),
                  ("input:64", ["the cat"] * 64), ("input:65", ["the cat"] * 65),
                  ("input:1000", ["the cat"] * 1000), ("input:long", "the " * 5000),
                  ("input:empty-item", ["a", ""]), ("input:nul", ["\x00"])],
        "encoding_format": [("enc:float", "float"), ("enc:base64", "base64"),
                            ("enc:upper", "BASE64"), ("enc:binary", "binary")],
        "dimensions": [("dim:8", 8), ("dim:0", 0)],
        "prompt": [("prompt:two", ["a", "b"]), ("prompt:tokens", [1, 300, 301]),
                   ("prompt:token-lists", [[1, 300]]), ("prompt:fill-ctx", "the cat " * 55),
                   ("prompt:over-ctx", "the cat " * 400), ("prompt:special", "<s></s><unk>")],
        "include_usage": [("usage:int", 1)],
        "echo": [("echo:true", True)], "suffix": [("suffix:x", "x")],
        "tools": [("tools:one", [{"type": "function", "function": {"name": "f"}}])],
        "tool_choice": [("tool_choice:auto", "auto")],
    }


EXTRA_KEYS: list[tuple[str, Any]] = [
    ("key:unknown", "zz_unknown"), ("key:nul", "a\x00b"), ("key:lone-surrogate",
                                                             Raw(b'"\\udc80"')),
    ("key:bad-utf8", Raw(b'"\xff"')), ("key:tools", "tools"), ("key:n", "n"),
    ("key:top_logprobs", "top_logprobs"), ("key:functions", "functions")]
"""Keys added to each JSON object: a value of 1 under them."""


# -- requests ----------------------------------------------------------------------------------
def encode(body: Any) -> bytes:
    """``body`` as JSON bytes, with each :class:`Raw` written as its text."""
    raws: list[bytes] = []

    def swap(v: Any) -> Any:
        if isinstance(v, Raw):
            raws.append(v.text)
            return f"\x00RAW{len(raws) - 1}\x00"
        if id(v) in OPAQUE:
            return v
        if isinstance(v, dict):
            return {swap(k): swap(x) for k, x in v.items()}
        if isinstance(v, list):
            return [swap(x) for x in v]
        return v

    data = json.dumps(swap(body), ensure_ascii=False).encode()
    for i, raw in enumerate(raws):
        data = data.replace(b'"\\u0000RAW%d\\u0000"' % i, raw, 1)
    return data


def copy_tree(v: Any) -> Any:
    return _copy_tree(v, OPAQUE)


def short(v: Any, limit: int = 200) -> str:
    """A readable, bounded rendering of a request for the reports."""
    if isinstance(v, bytes):
        text = repr(v[:limit])
        return text if len(v) <= limit else f"{text}...({len(v)} bytes)"
    try:
        text = encode(v).decode("utf-8", "replace")
    except (ValueError, RecursionError):
        text = repr(v)
    text = re.sub(r"(.)\1{39,}", lambda m: f"{m.group(1)}*{len(m.group(0))}", text)
    return text if len(text) <= limit else text[: limit - 20] + f"...({len(text)} chars)"


@dataclass
class Baseline:
    """A valid request: ``stream`` says whether its answer is Server-Sent Events."""

    name: str
    method: str
    path: str
    body: dict[str, Any] | None = None
    stream: bool = False


TOOL = {"type": "function", "function": {
    "name": "f", "description": "a tool",
    "parameters": {"type": "object", "properties": {"x": {"type": "integer"}},
                   "required": ["x"]}}}
TOOL_CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}


def baselines(files: Files) -> list[Baseline]:
    other = str(files.other)
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hello there, the cat"}]
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    return [
        Baseline("health", "GET", "/health"),
        Baseline("models", "GET", "/v1/models"),
        Baseline("chat", "POST", "/v1/chat/completions", {
            "model": "tiny", "messages": messages, "max_tokens": 4, "temperature": 0,
            "top_p": 0.95, "top_k": 40, "min_p": 0.05, "repeat_penalty": 1.0,
            "repeat_last_n": 64, "seed": 1, "stop": ["zzz", "qq"], "n": 1, "user": "fuzz",
            "frequency_penalty": 0, "stream": False}),
        Baseline("chat_stream", "POST", "/v1/chat/completions", {
            "model": "tiny", "messages": [{"role": "user", "content": "Hi"}],
            "max_completion_tokens": 4, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "logprobs": True, "top_logprobs": 2},
            stream=True),
        Baseline("chat_extras", "POST", "/v1/chat/completions", {
            "model": "tiny", "messages": [{"role": "developer", "content": [
                {"type": "text", "text": "Be brief."}]}, {"role": "user", "content": "Hi"}],
            "max_tokens": 3, "temperature": 0, "chat_template": "chatml",
            "lora": [{"name": "pirate", "scale": 0.5}, {"path": other, "scale": -0.25}],
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": "t", "schema": schema}}}),
        Baseline("completion", "POST", "/v1/completions", {
            "model": "tiny", "prompt": "Hello world, the cat", "max_tokens": 4,
            "temperature": 0, "logprobs": 2, "seed": 3, "stop": "zzz", "echo": False,
            "suffix": "", "best_of": 1, "speculative": {
                "mode": "prompt_lookup", "ngram_min": 1, "ngram_max": 2, "max_draft": 4}}),
        Baseline("completion_stream", "POST", "/v1/completions", {
            "model": "tiny:pirate", "prompt": ["Once upon"], "max_tokens": 4, "stream": True,
            "grammar": 'root ::= "a" | "b" "c"', "temperature": 0.7, "seed": 5,
            "response_format": None}, stream=True),
        Baseline("chat_tools", "POST", "/v1/chat/completions", {
            "model": "tiny", "messages": [*messages, {"role": "assistant", "content": None,
                                                      "tool_calls": [TOOL_CALL]},
                                          {"role": "tool", "tool_call_id": "c1",
                                           "content": "12"}],
            "tools": [TOOL], "tool_choice": "required", "parallel_tool_calls": False,
            "max_tokens": 40, "temperature": 0}),
        Baseline("responses", "POST", "/v1/responses", {
            "model": "tiny", "input": [{"role": "user", "content": [
                {"type": "input_text", "text": "Hello there"}]},
                {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "ok"}],
            "instructions": "Be brief.", "max_output_tokens": 4, "temperature": 0,
            "tools": [{"type": "function", **TOOL["function"]}], "tool_choice": "auto",
            "text": {"format": {"type": "text"}}, "store": False, "metadata": {"k": "v"}}),
        Baseline("responses_stream", "POST", "/v1/responses", {
            "model": "tiny", "input": "Hi", "max_output_tokens": 4, "stream": True,
            "temperature": 0, "store": False}, stream=True),
        Baseline("embeddings", "POST", "/v1/embeddings", {
            "model": "tiny", "input": ["the cat", "the dog"], "encoding_format": "float",
            "user": "fuzz"}),
        Baseline("embeddings_b64", "POST", "/v1/embeddings", {
            "model": "tiny", "input": "Hello", "encoding_format": "base64",
            "dimensions": None}),
    ]


@dataclass
class Case:
    label: str
    baseline: Baseline
    method: str
    path: str
    body: Any = None
    """A JSON tree (sent through :func:`encode`), bytes (sent as they are) or None."""
    headers: dict[str, str] = field(default_factory=dict)
    chunks: int = 0
    """Send the body with chunked transfer encoding, in this many pieces."""
    raw: bytes | None = None
    """A transport case: these bytes over a raw socket (``half_close``: then shut down the
    sending side)."""
    half_close: bool = False
    costly: bool = False

    @property
    def stream(self) -> bool:
        return self.baseline.stream


JSON = {"content-type": "application/json"}


def request_cases(bl: Baseline) -> list[Case]:
    """Changes to the request around a baseline's body: body bytes, Content-Type, method,
    path, headers."""
    out: list[Case] = []

    def add(label: str, costly: bool = False, **kw: Any) -> None:
        kw.setdefault("method", bl.method)
        kw.setdefault("path", bl.path)
        kw.setdefault("body", None if bl.body is None else copy_tree(bl.body))
        kw.setdefault("headers", dict(JSON) if bl.body is not None else {})
        out.append(Case(f"{bl.name}:{label}", bl, costly=costly, **kw))

    methods = ["GET", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS", "POST"]
    for m in methods:
        if m != bl.method:
            add(f"method={m}", method=m)
    for suffix in ("/", "/x", "?x=1&x=2", "?stream=true", "%00", "%ff", "/..", "#frag"):
        add(f"path+{suffix}", path=bl.path + suffix)
    for label, p in [("upper", bl.path.upper()), ("double-slash", bl.path.replace("/", "//")),
                     ("dot-dot", "/v1/../" + bl.path.lstrip("/")), ("long", bl.path + "/a" * 2000),
                     ("encoded", bl.path.replace("/", "%2F"))]:
        add(f"path={label}", path=p)
    for label, host in [("evil", "evil.example"), ("empty", ""), ("port", "localhost:1"),
                        ("ipv6", "[::1]:8080"), ("ipv6-bare", "::1"), ("bracket", "[::1"),
                        ("suffix", "127.0.0.1.evil"), ("long", "a" * 4000)]:
        add(f"host={label}", headers={**(JSON if bl.body is not None else {}), "host": host})
    for label, auth in [("bearer", "Bearer sk-x"), ("empty-bearer", "Bearer"),
                        ("basic", "Basic eDp5"), ("long", "Bearer " + "k" * 8000)]:
        add(f"auth={label}", headers={**(JSON if bl.body is not None else {}),
                                      "authorization": auth})
    if bl.body is None:
        add("body=json", body={"x": 1}, headers=dict(JSON))
        return out
    valid = encode(bl.body)
    types = [("missing", None), ("text-plain", "text/plain"), ("empty", ""),
             ("form", "application/x-www-form-urlencoded"),
             ("multipart", "multipart/form-data; boundary=x"),
             ("charset", "application/json; charset=utf-8"),
             ("charset-latin1", "application/json;charset=latin-1"),
             ("upper", "APPLICATION/JSON"), ("jsonl", "application/jsonl"),
             ("json-seq", "application/json-seq"), ("wildcard", "*/*"),
             ("params", "application/json; x=\"a;b\""), ("comma", "application/json, text/plain")]
    for label, kind in types:
        add(f"content-type={label}", body=valid,
            headers={} if kind is None else {"content-type": kind})
    bodies = [("empty", b""), ("space", b" "), ("null", b"null"), ("list", b"[]"),
              ("str", b'"x"'), ("int", b"1"), ("brace", b"{"), ("truncated", valid[:len(valid)
                                                                                   // 2]),
              ("trailing", valid + b"x"), ("two-objects", valid + valid),
              ("bom", b"\xef\xbb\xbf" + valid), ("utf16", valid.decode().encode("utf-16")),
              ("utf32", valid.decode().encode("utf-32")), ("latin1-ff", valid[:-1] + b',"\xff":1}'),
              ("bad-utf8", valid.replace(b'"model"', b'"mod\xc0\xafel"')),
              ("nul-bytes", b"\x00" * 64), ("open-100k", b"[" * 100_000),
              ("deep-100k", b"[" * 100_000 + b"]" * 100_000),
              ("map-100k", b'{"a":' * 100_000 + b"1" + b"}" * 100_000),
              ("whitespace-1MiB", b" " * (1 << 20) + valid),
              ("comment", b"/* c */" + valid), ("single-quotes", valid.replace(b'"', b"'")),
              ("16MiB+1", b"x" * (LIMITS.max_message_bytes + 1)),
              ("16MiB-json", valid[:-1] + b', "user": "' + b"u" * (
                  LIMITS.max_message_bytes - len(valid) - 20) + b'"}')]
    for label, data in bodies:
        add(f"body={label}", costly=f"body:{label}" in COSTLY, body=data)
    add("chunked", body=valid, chunks=3)
    add("chunked:16MiB+1", costly=True, body=b"x" * (LIMITS.max_message_bytes + 1), chunks=64)
    return out


def transport_cases(bl: Baseline, port: int) -> list[Case]:
    """What the HTTP parser sees, over a raw socket (see :func:`raw_exchange`)."""
    host = f"127.0.0.1:{port}".encode()
    valid = encode(bl.body) if bl.body is not None else b""
    start = f"{bl.method} {bl.path} HTTP/1.1\r\n".encode()
    head = start + b"Host: " + host + b"\r\n"
    if bl.body is not None:
        head += b"Content-Type: application/json\r\n"

    def cl(n: int | str) -> bytes:
        return head + b"Content-Length: " + str(n).encode() + b"\r\n\r\n"

    chunked = head + b"Transfer-Encoding: chunked\r\n\r\n"
    chunked_valid = chunked + (b"%x\r\n%s\r\n" % (len(valid), valid) if valid else b"") + (
        b"0\r\n\r\n")
    cases = [
        ("valid", cl(len(valid)) + valid, False),
        ("cl-longer+half-close", cl(len(valid) + 100) + valid, True),
        ("half-body+half-close", cl(len(valid)) + valid[: len(valid) // 2], True),
        ("headers-only+half-close", cl(len(valid)), True),
        ("cl-nan", cl("abc") + valid, False),
        ("cl-negative", cl(-1) + valid, False),
        ("cl-huge", cl(2**64) + valid, True),
        ("cl+te", head + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
         False),
        ("te-chunked", chunked_valid, False),
        ("te-bad-size", chunked + b"zz\r\n" + valid + b"\r\n0\r\n\r\n", False),
        ("te-huge-size", chunked + b"ffffffffffffffff\r\n" + valid, True),
        ("te-unknown", head + b"Transfer-Encoding: gzip\r\n\r\n" + valid, True),
        ("no-host", start + b"Content-Length: 0\r\n\r\n", False),
        ("two-hosts", head + b"Host: evil.example\r\nContent-Length: 0\r\n\r\n", False),
        ("http10", f"{bl.method} {bl.path} HTTP/1.0\r\nContent-Length: 0\r\n\r\n".encode(),
         False),
        ("http2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", True),
        ("garbage-line", b"GARBAGE\r\n\r\n", False),
        ("bare-lf", start.replace(b"\r\n", b"\n") + b"Host: " + host + b"\n\n", False),
        ("header-nul", head + b"X-A: a\x00b\r\nContent-Length: 0\r\n\r\n", False),
        ("host-nul", start + b"Host: 127.0.0.1\x00.evil\r\nContent-Length: 0\r\n\r\n", False),
        ("header-spaces", head + b"X-A:   a   \r\nContent-Length: 0\r\n\r\n", False),
        ("header-utf8", head + b"X-A: \xff\xfe\r\nContent-Length: 0\r\n\r\n", False),
        ("header-70KiB", head + b"X-A: " + b"a" * 70_000 + b"\r\n\r\n", False),
        ("pipelined", (cl(len(valid)) + valid) * 2, False),
    ]
    return [Case(f"{bl.name}:raw={label}", bl, bl.method, bl.path, raw=data, half_close=half)
            for label, data, half in cases]


def _special(value: Any) -> bool:
    """Whether a table value holds a :class:`Raw` (only shallow ones do)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, Raw):
            return True
        if isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list) and len(v) < 1000:
            stack.extend(v)
    return False


def enumerate_cases(files: Files, port: int) -> list[Case]:
    generic = generic_values(files)
    extras = field_values(files)
    for _, value in [*generic, *(v for values in extras.values() for v in values)]:
        if isinstance(value, (list, dict)) and not _special(value):
            OPAQUE.add(id(value))
    cases: list[Case] = []
    for bl in baselines(files):
        base_headers = dict(JSON) if bl.body is not None else {}
        cases.append(Case(f"{bl.name}:baseline", bl, bl.method, bl.path,
                          copy_tree(bl.body), dict(base_headers)))
        cases.extend(request_cases(bl))
        cases.extend(transport_cases(bl, port))
        if bl.body is None:
            continue

        def add(label: str, path: tuple, mutate: Callable[[Any, Any], None], costly: bool,
                bl: Baseline = bl, headers: dict[str, str] = base_headers) -> None:
            body = copy_tree(bl.body)
            mutate(*at(body, path))
            cases.append(Case(f"{bl.name}:{path_label(path)}={label}", bl, bl.method, bl.path,
                              body, dict(headers), costly=costly))

        for path, _current in leaf_paths(bl.body):
            top = len(path) == 1
            for label, value in [*generic, *extras.get(str(path[-1]), [])]:
                if label in COSTLY and not top:
                    continue

                def put(holder: Any, step: Any, value: Any = value) -> None:
                    holder[step] = value

                add(label, path, put, label in COSTLY)
            add("deleted", path, lambda holder, step: holder.pop(step), False)
        containers = [()] + [p for p, v in leaf_paths(bl.body) if isinstance(v, dict)]
        for path in containers:
            for label, key in EXTRA_KEYS:
                body = copy_tree(bl.body)
                walk(body, path)[key] = 1
                cases.append(Case(f"{bl.name}:{path_label(path) or 'body'}+{label}", bl,
                                  bl.method, bl.path, body, dict(base_headers)))
    return cases


def select(cases: list[Case], seed: int, fast: bool) -> list[Case]:
    """The run's cases in a seeded order; the fast slice keeps every baseline and transport
    case and a seeded sample of the rest (costly ones less often)."""
    return select_cases(cases, seed, fast, fast_cases=FAST_CASES, fast_costly=FAST_COSTLY,
                        always=lambda c: c.label.endswith(":baseline") or c.raw is not None)


# -- checks ------------------------------------------------------------------------------------
def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def strict_json(data: bytes | str) -> Any:
    """``data`` as JSON, refusing ``NaN`` and ``Infinity`` (which other parsers refuse)."""
    return json.loads(data, parse_constant=_no_constant)


def _code(data: bytes | None) -> Any:
    """An error answer's ``error.code`` (None if it has none)."""
    try:
        return json.loads(data or b"")["error"]["code"]
    except (ValueError, TypeError, KeyError):
        return None


def error_problems(status: int, headers: httpx.Headers | dict[str, str], data: bytes
                   ) -> list[str]:
    """What is wrong with a non-2xx answer (see the module)."""
    out = []
    if len(data) > MAX_ERROR_BYTES:
        out.append(f"error body of {len(data)} bytes")
    if not headers.get("content-type", "").startswith("application/json"):
        out.append(f"error content-type {headers.get('content-type')!r}")
    try:
        body = strict_json(data)
    except ValueError as exc:
        return [*out, f"error body is not JSON ({exc}): {data[:200]!r}"]
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(body, dict) or set(body) != {"error"} or not isinstance(error, dict) or (
            set(error) != {"message", "type", "param", "code"}):
        return [*out, f"not OpenAI's error shape: {short(body)}"]
    if not isinstance(error["message"], str) or not isinstance(error["type"], str):
        out.append(f"message/type not strings: {short(error)}")
    if error["param"] is not None and not isinstance(error["param"], str):
        out.append(f"param {error['param']!r}")
    if error["code"] not in CODES:
        out.append(f"undocumented code {error['code']!r}")
    if status in (429, 503) and not headers.get("retry-after"):
        out.append(f"{status} without Retry-After")
    return out


def success_problems(path: str, data: bytes) -> list[str]:
    """What is wrong with a plain 200 answer to ``path`` (as sent)."""
    try:
        body = strict_json(data)
    except ValueError as exc:
        return [f"200 body is not strict JSON ({exc}): {data[:200]!r}"]
    if not isinstance(body, dict):
        return [f"200 body {short(body)}"]
    if path == "/health":
        return [] if body.get("status") == "ok" else [f"health {short(body)}"]
    if path == "/v1/models":
        ok = body.get("object") == "list" and all(
            isinstance(m, dict) and isinstance(m.get("id"), str) for m in body.get("data", []))
        return [] if ok and body["data"] else [f"models {short(body)}"]
    if path == "/v1/responses":
        ok = (body.get("object") == "response" and isinstance(body.get("output"), list)
              and body.get("status") in ("completed", "incomplete")
              and isinstance(body.get("output_text"), str))
        return [] if ok else [f"response {short(body)}"]
    if path == "/v1/embeddings":
        data_ = body.get("data")
        ok = isinstance(data_, list) and data_ and all(
            isinstance(d.get("embedding"), (str, list)) for d in data_)
        return [] if ok else [f"embeddings {short(body)}"]
    choices = body.get("choices")
    want = "chat.completion" if "chat" in path else "text_completion"
    if body.get("object") != want or not isinstance(choices, list) or len(choices) != 1:
        return [f"completion {short(body)}"]
    choice = choices[0]
    text = choice.get("message", {}).get("content") if want == "chat.completion" else (
        choice.get("text"))
    calls = choice.get("message", {}).get("tool_calls") if want == "chat.completion" else None
    if calls:  # a tool call: its finish reason, content nil or text
        if choice.get("finish_reason") != "tool_calls" or not (text is None or isinstance(
                text, str)):
            return [f"choice {short(choice)}"]
    elif not isinstance(text, str) or choice.get("finish_reason") not in ("stop", "length"):
        return [f"choice {short(choice)}"]
    usage = body.get("usage") or {}
    if usage.get("total_tokens") != usage.get("prompt_tokens", 0) + usage.get(
            "completion_tokens", 0):
        return [f"usage {short(usage)}"]
    return []


def stream_problems(case: Case, lines: list[str]) -> list[str]:
    """What is wrong with a Server-Sent Events answer (its non-empty lines)."""
    if case.baseline.path == "/v1/responses":
        return response_events_problems(lines)
    events = []
    for line in lines:
        if not line.startswith("data: "):
            return [f"not an SSE data line: {line[:200]!r}"]
        events.append(line[6:])
    if not events:
        return ["an empty stream"]
    if events[-1] != "[DONE]":
        try:
            last = strict_json(events[-1])
        except ValueError as exc:
            return [f"stream ends without [DONE] on a non-JSON event ({exc})"]
        if not isinstance(last, dict) or "error" not in last:
            return [f"stream ends without [DONE] or an error event: {events[-1][:200]}"]
        problems = error_problems(200, {"content-type": "application/json"},
                                  events[-1].encode())
        body, done = events[:-1], False
    else:
        problems, body, done = [], events[:-1], True
    finishes = []
    for e in body:
        try:
            chunk = strict_json(e)
        except ValueError as exc:
            return [*problems, f"an event is not strict JSON ({exc}): {e[:200]}"]
        if not isinstance(chunk, dict) or "error" in chunk or not isinstance(
                chunk.get("choices"), list):
            return [*problems, f"an event before the end is not a chunk: {e[:200]}"]
        finishes += [c.get("finish_reason") for c in chunk["choices"] if c.get("finish_reason")]
    if done and len(finishes) != 1:
        problems.append(f"finish reasons {finishes}")
    return problems


def response_events_problems(lines: list[str]) -> list[str]:
    """What is wrong with a Responses API stream: named events, ``response.created`` first,
    then ``response.completed`` / ``response.incomplete`` last, or an ``error`` event."""
    if len(lines) % 2 or not lines:
        return [f"not event/data line pairs: {lines[:4]}"]
    kinds = []
    for name, data in zip(lines[::2], lines[1::2], strict=True):
        if not name.startswith("event: ") or not data.startswith("data: "):
            return [f"not an event and its data: {name[:100]!r} {data[:100]!r}"]
        try:
            event = strict_json(data[6:])
        except ValueError as exc:
            return [f"an event is not strict JSON ({exc}): {data[:200]}"]
        if not isinstance(event, dict) or event.get("type") != name[7:]:
            return [f"event {name[7:]!r} carries {short(event)}"]
        kinds.append(name[7:])
    if kinds[0] != "response.created":
        return [f"first event {kinds[0]}"]
    if kinds[-1] not in ("response.completed", "response.incomplete", "error"):
        return [f"last event {kinds[-1]}"]
    return []


# -- the run -----------------------------------------------------------------------------------
class DaemonGone(Exception):
    pass


def http_url(d: DaemonProcess) -> str:
    """The door's URL, from the daemon's ``serving`` log line (logged before READY=1)."""
    for line in d.log().splitlines():
        if '"serving"' in line:
            return json.loads(line)["http"]
    raise AssertionError(d.log())


def raw_exchange(port: int, data: bytes, half_close: bool, timeout: float
                 ) -> tuple[list[tuple[int, dict[str, str], bytes]], bytes]:
    """Send ``data`` over a new connection; the answers read back (until the server closes,
    or has answered every request in it) and what it sent."""
    got = b""
    deadline = time.monotonic() + timeout
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
            if half_close:
                s.shutdown(socket.SHUT_WR)
        except OSError:  # the server answered and closed before it read everything
            pass
        want = data.count(b" HTTP/1.") or 1
        while time.monotonic() < deadline:
            complete = _responses(got)
            if complete is not None and len(complete) >= want:
                break
            s.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not chunk:
                break
            got += chunk
    return _responses(got) or [], got


def _responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]] | None:
    """The complete HTTP responses at the start of ``data`` (None if one is incomplete)."""
    out = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            return None
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in
                   (line.partition(":") for line in lines[1:])}
        if headers.get("transfer-encoding") == "chunked":
            end = rest.find(b"\r\n0\r\n\r\n")
            if end < 0:
                return None
            body, data = rest[: end + 7], rest[end + 7:]
        else:
            n = int(headers.get("content-length", "0"))
            if len(rest) < n:
                return None
            body, data = rest[:n], rest[n:]
        out.append((status, headers, body))
    return out


class Fuzzer:
    def __init__(self, files: Files, workdir: Path, seed: int, fast: bool) -> None:
        self.files = files
        self.workdir = workdir
        self.seed = seed
        self.fast = fast
        self.findings: list[Finding] = []
        self.statuses: Counter[str] = Counter()
        self.codes: Counter[str] = Counter()
        self.params: Counter[tuple[str, str]] = Counter()
        self.slowest: list[tuple[float, str]] = []
        self.daemon: DaemonProcess | None = None
        self.logs: list[str] = []
        self.sent = 0
        self.restarts = 0
        self.streams = 0
        self.events = 0
        self.last = ""
        self.logged_500 = 0

    # -- the daemon ---------------------------------------------------------------------------
    def start(self) -> None:
        n = len(self.logs) + 1
        workdir = self.workdir / f"daemon-{n}"
        workdir.mkdir()
        config = workdir / "lorad.toml"
        # Tool prompts (the generic convention lists the tools) need more than the tiny
        # model's default context.
        config.write_text("[http]\ncontexts = 2\nn_ctx = 2048\n")
        self.daemon = start_daemon(
            workdir, [self.files.dir], "--config", str(config), "--model",
            str(self.files.model), "--alias", "tiny", "--n-ctx", "128", "--adapter-dir",
            str(self.files.adapters), "--http", "127.0.0.1:0")
        self.url = http_url(self.daemon)
        self.port = int(self.url.rsplit(":", 1)[1])
        # Connections idle for 2 s are not reused: Hypercorn closes them at 5 s, and a request
        # sent as it does would be a dropped answer that is nobody's fault.
        self.http = httpx.Client(base_url=self.url, timeout=CASE_TIMEOUT_S,
                                 limits=httpx.Limits(keepalive_expiry=2.0))

    def restart(self, why: str) -> None:
        print(f"fuzz: restarting the daemon ({why})", flush=True)
        self.restarts += 1
        self.stop_daemon()
        self.start()

    def stop_daemon(self) -> int | None:
        if self.daemon is None:
            return None
        self.http.close()
        code = self.daemon.stop(timeout=30)
        self.logs.append(self.daemon.log())
        self.daemon = None
        return code

    def alive(self) -> bool:
        try:
            return self.http.get("/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def greedy(self) -> str:
        r = self.http.post("/v1/chat/completions", json=GREEDY)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    # -- one case -----------------------------------------------------------------------------
    def finding(self, kind: str, detail: str, case: Case) -> None:
        request = short(case.raw if case.raw is not None else case.body, 300)
        self.findings.append(Finding(kind, case.label, f"{case.method} {case.path} {request}",
                                     detail))

    def run_case(self, case: Case) -> None:
        assert self.daemon is not None
        self.sent += 1
        start = time.monotonic()
        try:
            if case.raw is not None:
                self.run_raw(case)
            else:
                self.run_http(case)
        except httpx.TimeoutException as exc:
            self.finding("hang", f"no whole answer in {CASE_TIMEOUT_S} s ({exc!r})", case)
            if not self.alive():
                self.restart(f"wedged at {case.label}")
        except (httpx.HTTPError, OSError) as exc:
            if self.daemon.proc.poll() is not None:
                self.finding("crash", f"daemon exit code {self.daemon.proc.poll()}: {exc!r}",
                             case)
                self.restart(f"crash at {case.label}")
            elif case.half_close or case.costly:  # nobody left to read an answer, or one
                self.statuses["closed"] += 1  # sent before a huge body was all written
            else:
                self.finding("dropped", f"no answer: {exc!r} (the case before: {self.last})",
                             case)
                if not self.alive():
                    self.restart(f"unresponsive after {case.label}")
        self.slowest.append((time.monotonic() - start, case.label))
        self.last = case.label

    def run_http(self, case: Case) -> None:
        if isinstance(case.body, bytes) or case.body is None:
            content = case.body
        else:
            content = encode(case.body)
        if case.chunks and content is not None:
            size = max(1, -(-len(content) // case.chunks))
            data = content
            content = iter([data[i:i + size] for i in range(0, len(data), size)])  # type: ignore[assignment]
        request = self.http.build_request(case.method, case.path, content=content,
                                          headers=case.headers)
        deadline = time.monotonic() + CASE_TIMEOUT_S
        response = self.http.send(request, stream=True)
        try:
            status = response.status_code
            self.statuses[str(status)] += 1
            event_stream = response.headers.get("content-type", "").startswith(
                "text/event-stream")
            if event_stream:
                lines = []
                for line in response.iter_lines():
                    if line:
                        lines.append(line)
                    if time.monotonic() > deadline:
                        raise httpx.ReadTimeout("the stream runs past the case timeout")
                self.streams += 1
                self.events += len(lines)
            else:
                data = response.read()
        finally:
            response.close()
        self.check(case, response.request.url.path, status, response.headers,
                   lines if event_stream else None, None if event_stream else data)

    def check(self, case: Case, path: str, status: int, headers: httpx.Headers,
              lines: list[str] | None, data: bytes | None) -> None:
        problems: list[str] = []
        if status == 500 and _code(data) in LOGGED_500:
            self.logged_500 += 1  # checked against the log at the end
        elif status not in STATUSES:
            kind = "server_error" if status >= 500 else "undocumented_status"
            self.finding(kind, f"status {status}: {(data or b'')[:300]!r}", case)
        if case.method == "HEAD":  # no body, whatever the status
            return
        if lines is not None:
            if status != 200:
                problems.append(f"an event stream with status {status}")
            problems += stream_problems(case, lines)
        elif status >= 300:
            problems += error_problems(status, headers, data or b"")
            if not problems:
                error = json.loads(data or b"")["error"]
                self.codes[f"{status}:{error['code']}"] += 1
                self._param(case, error)
        elif case.stream and case.method == "POST" and case.path == case.baseline.path and (
                isinstance(case.body, dict) and case.body.get("stream") is True):
            problems.append(f"a plain {status} answer to a stream request")
        else:
            problems += success_problems(path, data or b"")
        for p in problems:
            self.finding("malformed", p, case)

    def _param(self, case: Case, error: dict[str, Any]) -> None:
        """Count 400s that name another parameter than the one changed (not a failure)."""
        field_ = case.label.partition(":")[2].split("=")[0].split("+")[0]
        top = re.split(r"[.\[]", field_)[0]
        if error["param"] is not None and "=" in case.label and top and (
                error["param"] != top and case.baseline.body and top in case.baseline.body):
            self.params[(f"{case.baseline.name}:{top}", str(error["param"]))] += 1

    def run_raw(self, case: Case) -> None:
        assert case.raw is not None
        answers, got = raw_exchange(self.port, case.raw, case.half_close, CASE_TIMEOUT_S)
        statuses = [status for status, _, _ in answers]
        if not answers:
            self.statuses["raw:closed"] += 1
        for status, headers, body in answers:
            if not body and status in PARSER_STATUSES:  # the HTTP parser's, below the door
                self.statuses[f"raw:{status}-parser"] += 1
                continue
            self.statuses[f"raw:{status}"] += 1
            if status not in STATUSES:
                self.finding("server_error" if status >= 500 else "undocumented_status",
                             f"status {status}: {got[:300]!r}", case)
            elif status >= 300:
                for p in error_problems(status, headers, body):
                    self.finding("malformed", p, case)
        if self.daemon is not None and self.daemon.proc.poll() is not None:
            raise OSError("the daemon is gone")
        if case.label.endswith(("raw=valid", "raw=te-chunked", "raw=pipelined")) and (
                not statuses or set(statuses) != {200}):
            self.finding("malformed", f"a valid request answered {statuses}: {got[:300]!r}",
                         case)

    # -- the whole run ------------------------------------------------------------------------
    def run(self, make_cases: Callable[[int], list[Case]], warm: list[str]) -> dict[str, Any]:
        started = time.monotonic()
        self.start()
        cases = make_cases(self.port)
        by_label = {c.label: c for c in cases}
        reference = self.greedy()
        assert reference, "the tiny model generated nothing"
        self.warm_s: dict[str, float] = {}
        for label in warm:  # adapters, grammars, templates, schema conversion, lazy imports
            t0 = time.monotonic()
            self.statuses.clear()
            found = len(self.findings)
            self.run_case(by_label[label])
            if label.endswith(":baseline"):  # each baseline is a valid request
                assert dict(self.statuses) == {"200": 1}, (label, self.statuses)
                assert len(self.findings) == found, self.findings[found:]
            self.warm_s[label] = time.monotonic() - t0
        assert self.daemon is not None
        pid = self.daemon.pid
        restarts = self.restarts
        rss0, fd0, fds0 = rss_kib(pid), fd_count(pid), fd_kinds(pid)
        self.sent = 0
        self.statuses.clear()
        self.codes.clear()
        self.cases = select(cases, self.seed, self.fast)
        print(f"fuzz: seed {self.seed} (LORAD_FUZZ_SEED), {len(self.cases)} of {len(cases)} "
              f"HTTP cases ({'fast slice' if self.fast else 'full run'})", flush=True)
        run_started = time.monotonic()
        for i, case in enumerate(self.cases, 1):
            self.run_case(case)
            if i % 1000 == 0:
                print(f"fuzz: {i}/{len(self.cases)} cases, {time.monotonic() - run_started:.0f}"
                      f" s, {len(self.findings)} findings", flush=True)
        run_s = time.monotonic() - run_started
        again = self.greedy()
        idle = self.door_idle()
        assert self.daemon is not None
        deadline = time.monotonic() + 10  # connections the cases left are closed meanwhile
        while fd_count(self.daemon.pid) > fd0 + FD_TOLERANCE and time.monotonic() < deadline:
            self.http.get("/health")
        rss1, fd1 = rss_kib(self.daemon.pid), fd_count(self.daemon.pid)
        fds1 = fd_kinds(self.daemon.pid)
        alive = self.alive()
        code = self.stop_daemon()
        return {"reference": reference, "again": again, "rss": (rss0, rss1), "fd": (fd0, fd1),
                "fds": (fds0, fds1),
                "same_daemon": self.restarts == restarts, "alive": alive, "exit": code,
                "idle": idle, "run_s": run_s, "total_s": time.monotonic() - started}

    def door_idle(self) -> dict[str, Any]:
        """The door's ``status().http`` once nothing is queued or running (a stream's end is
        written before its request is finished: allow that moment)."""
        assert self.daemon is not None
        deadline = time.monotonic() + 5
        with self.daemon.client() as c:
            while True:
                http = c.status()["http"]
                if (http["queued_requests"] == 0 and http["running_requests"] == 0) or (
                        time.monotonic() > deadline):
                    return http


def fd_kinds(pid: int) -> set[str]:
    """A process's open file descriptors, as ``fd -> target``."""
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.add(f"{fd}->{os.readlink(f'/proc/{pid}/fd/{fd}')}")
        except OSError:
            pass
    return out


def group_key(f: Finding) -> tuple[str, str]:
    """Findings that are one bug: same kind, same value (or same message shape)."""
    value = f.case.rpartition("=")[2] if "=" in f.case else f.case.rpartition("+")[2]
    detail = re.sub(r"\d+", "N", f.detail)[:80]
    return f.kind, f"{value}: {detail}" if f.kind != "logged_error" else detail


def run_fuzz(files: Files, workdir: Path, fast: bool) -> None:
    seed = int(os.environ.get("LORAD_FUZZ_SEED", DEFAULT_SEED))
    fz = Fuzzer(files, workdir, seed, fast)
    warm = [f"{bl.name}:baseline" for bl in baselines(files)]
    warm += ["completion:prompt=str:max", "chat:body=deep-100k",
             "chat_extras:response_format=schema:10k-props"]
    try:
        out = fz.run(lambda port: enumerate_cases(files, port), warm)
    finally:
        if fz.daemon is not None and fz.daemon.proc.poll() is None:
            fz.daemon.proc.kill()
            fz.daemon.proc.wait()
    for log in fz.logs:
        internal = [line for line in log.splitlines() if "http_internal_error" in line]
        for line in log.splitlines():
            if '"level": "error"' in line or '"level": "critical"' in line:
                fz.findings.append(Finding("logged_error", "(daemon log)", "", line[:600]))
        if internal and not any(f.kind == "server_error" for f in fz.findings):
            fz.findings.append(Finding("logged_error", "(daemon log)", "", internal[0][:600]))
    contained = sum(log.count('"http_connection_failed"') for log in fz.logs)
    logged = sum(1 for log in fz.logs for line in log.splitlines()
                 if '"event": "http_server_error"' in line and '"error": "' in line
                 and any(f'"code": "{code}"' in line for code in LOGGED_500))
    if logged < fz.logged_500:
        fz.findings.append(Finding("unlogged_500", "(daemon log)", "",
                                   f"{fz.logged_500} answers 500, {logged} logged with a cause"))
    rss0, rss1 = out["rss"]
    fd0, fd1 = out["fd"]
    if out["same_daemon"] and fd1 - fd0 > FD_TOLERANCE:
        fz.findings.append(Finding("leak", "(whole run)", "", f"open fds {fd0} -> {fd1}: "
                                   f"{sorted(out['fds'][1] - out['fds'][0])}"))
    if out["again"] != out["reference"]:
        fz.findings.append(Finding("output_changed", "(end of run)", "",
                                   f"{out['reference']!r} -> {out['again']!r}"))
    idle = out["idle"]
    if idle["queued_requests"] or idle["running_requests"]:
        fz.findings.append(Finding("leak", "(end of run)", "", f"door status {idle}"))

    kinds = Counter(f.kind for f in fz.findings)
    groups: dict[tuple[str, str], list[Finding]] = {}
    for f in fz.findings:
        groups.setdefault(group_key(f), []).append(f)
    print(f"\nfuzz findings: {len(fz.findings)} in {len(groups)} groups (kind, value)")
    for (kind, what), found in groups.items():
        f = found[0]
        print(f"  [{kind}] x{len(found)} {what}\n      e.g. {f.case}: {f.detail[:300]}"
              f"\n      request: {f.request}")
    if fz.params:
        print("fuzz: 4xx naming another parameter than the one changed (changed, param: n): "
              + ", ".join(f"{k[0]}->{k[1]}: {n}" for k, n in fz.params.most_common(12)))
    slowest = sorted(fz.slowest, reverse=True)[:5]
    print("fuzz: slowest cases: " + ", ".join(f"{label} {s:.2f}s" for s, label in slowest))
    codes = ", ".join(f"{k}={v}" for k, v in sorted(fz.codes.items()))
    statuses = ", ".join(f"{k}={v}" for k, v in sorted(fz.statuses.items()))
    print("fuzz: warm-up " + ", ".join(f"{k} {v:.2f}s" for k, v in fz.warm_s.items()))
    print(f"fuzz summary: seed={seed} requests={fz.sent} in {out['run_s']:.1f} s (total "
          f"{out['total_s']:.1f} s); statuses: {statuses}; error codes: {codes}; "
          f"streams={fz.streams} ({fz.events} events); RSS {rss0 / 1024:.1f} -> "
          f"{rss1 / 1024:.1f} MiB; fds {fd0} -> {fd1}; broken connections contained="
          f"{contained}; restarts={fz.restarts}; "
          f"findings={dict(kinds)}", flush=True)
    assert out["alive"] and out["exit"] == 0, "the daemon did not survive the run"
    assert not fz.findings, f"{len(fz.findings)} findings: {dict(kinds)} (run with -s)"


@pytest.fixture(scope="module")
def fuzz_files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    root = tmp_path_factory.mktemp("http-fuzz")
    adapters = root / "adapters"
    adapters.mkdir()
    base = tinymodels.tiny_llama_tensors(seed=0)
    model = tinymodels.write_tiny_llama(root / "tiny.gguf", seed=0)
    pirate = tinymodels.write_lora(adapters / "pirate.gguf", base, rank=4, alpha=8, seed=3,
                                   std=0.3).path
    other = tinymodels.write_lora(root / "other.gguf", base, rank=2, alpha=4, seed=2,
                                  std=0.3, targets=("ffn_up", "attn_output")).path
    wrong = tinymodels.write_lora_wrong_arch(root / "gpt2.gguf", base)
    garbage = tinymodels.write_garbage(root / "garbage.gguf", seed=3)
    fifo = root / "fifo.gguf"
    os.mkfifo(fifo)
    return Files(root, model, adapters, pirate, other, wrong, garbage, fifo,
                 len(tinymodels.default_vocab()))


def test_http_fuzz_fast_slice(fuzz_files: Files, tmp_path: Path) -> None:
    run_fuzz(fuzz_files, tmp_path, fast=True)


@pytest.mark.fuzz
def test_http_fuzz_full_run(fuzz_files: Files, tmp_path: Path) -> None:
    run_fuzz(fuzz_files, tmp_path, fast=False)


def test_the_fuzz_cases_are_many_and_deterministic(fuzz_files: Files) -> None:
    """The enumeration: more than 10,000 cases, every endpoint, the same order for a seed."""
    cases = enumerate_cases(fuzz_files, 8000)
    assert len(cases) > 10_000
    assert {(c.method, c.path) for c in cases if c.label.endswith(":baseline")} == {
        ("GET", "/health"), ("GET", "/v1/models"), ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"), ("POST", "/v1/embeddings"), ("POST", "/v1/responses")}
    again = enumerate_cases(fuzz_files, 8000)
    assert [c.label for c in select(cases, 3, True)] == [c.label for c in select(again, 3, True)]
    assert math.isinf(json.loads(encode({"x": Raw(b"1e400")}))["x"])


def test_broken_and_unread_requests_end_their_connection_only(fuzz_files: Files,
                                                              tmp_path: Path) -> None:
    """Found by the fuzz. (1) Headers announcing a longer body than sent, then a half-close,
    made Hypercorn send h11's error while the app answered; its ``BusyResourceError`` went up
    through ``worker_serve`` and stopped the whole daemon (2 runs in 3; a race, so tried 40
    times: a connection may break, the daemon must not). (2) An answer sent before the body
    was read (a 404 here) left a connection Hypercorn then closed, and a client reusing it lost
    its next request (1 in ~300): such answers say ``Connection: close``."""
    d = start_daemon(tmp_path, [fuzz_files.dir], "--model", str(fuzz_files.model),
                     "--alias", "tiny", "--http", "127.0.0.1:0")
    try:
        url = http_url(d)
        port = int(url.rsplit(":", 1)[1])
        for path in ("/health", "/v1/models") * 20:
            raw = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                   "Content-Length: 18446744073709551616\r\n\r\n{}").encode()
            raw_exchange(port, raw, half_close=True, timeout=10)
            assert d.proc.poll() is None, d.log()[-3000:]
        with httpx.Client(base_url=url, timeout=60) as http:
            assert http.get("/health").status_code == 200
            r = http.post("/v1/nothing", json=GREEDY)
            assert r.status_code == 404 and r.headers["connection"] == "close"
            assert error_problems(r.status_code, r.headers, r.content) == []
            r = http.post("/v1/chat/completions/", json=GREEDY)  # no bare 307 redirect
            assert r.status_code == 404, r.status_code
            r = http.post("/v1/chat/completions", json=GREEDY)
            assert r.status_code == 200 and "connection" not in r.headers, r.text
    finally:
        assert d.stop() == 0, d.log()[-3000:]
    assert '"level": "error"' not in d.log(), d.log()[-3000:]
