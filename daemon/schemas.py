"""JSON schemas as GBNF grammars: ``response_format`` and the arguments of tool calls.

The conversion is llama-cpp-python's (``llama_cpp.llama_grammar``: pure Python, the same
rules as llama.cpp's ``json-schema-to-grammar``), run in a worker thread. A schema is untrusted
input: before conversion it is bounded (nodes, nesting, repetition counts, which the converter
would otherwise expand into huge rules), remote ``$ref`` is refused, and every failure of the
converter is ``bad_request`` naming the field the schema came in. The grammar it gives is then
checked against the daemon's grammar limits like any other.
"""

from __future__ import annotations

import re
from typing import Any

import trio

from lorad.protocol import ErrorCode, ProtocolError

MAX_NODES = 10_000
MAX_DEPTH = 64
MAX_COUNT = 1_000
"""Largest ``minItems``/``maxItems``/``minLength``/``maxLength``/... and ``{n,m}`` count in a
pattern (llama.cpp expands repetitions into rules); for a pattern, the product of all its
counts (nested repetitions multiply)."""
MAX_GRAMMAR_CHARS = 1 << 20
"""A converted grammar longer than this is refused (the daemon's grammar limits apply after)."""
_COUNTS = {"minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties",
           "minContains", "maxContains"}
_BRACES = re.compile(r"\{([^{}]*)\}")


def _refuse(message: str, field: str = "response_format") -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_REQUEST, f"{field}: {message}", field=field)


def check_schema(schema: Any, field: str = "response_format") -> None:
    """Bounds on a JSON schema before it is converted (see the module); ``bad_request``
    naming ``field`` past them."""
    stack = [(schema, 0)]
    nodes = 0
    while stack:
        node, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise _refuse(f"the schema has more than {MAX_NODES} nodes", field)
        if depth > MAX_DEPTH:
            raise _refuse(f"the schema nests deeper than {MAX_DEPTH}", field)
        if isinstance(node, dict):
            for key, value in node.items():
                if key in _COUNTS and isinstance(value, int) and value > MAX_COUNT:
                    raise _refuse(f"{key} {value} is above {MAX_COUNT}", field)
                if key == "$ref" and isinstance(value, str) and not value.startswith("#"):
                    raise _refuse("only local $ref (\"#/...\") is supported", field)
                if key == "pattern" and isinstance(value, str):
                    _check_pattern(value, field)
                stack.append((value, depth + 1))
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)


def _check_pattern(pattern: str, field: str) -> None:
    """Every ``{...}`` the converter could read as a repetition (it parses the counts with
    ``int()``: ``{,n}``, spaces and ``_`` included), bounded, and their product too."""
    product = 1
    for body in _BRACES.findall(pattern):
        parts = [p.strip().replace("_", "") for p in body.split(",")]
        if len(parts) > 2 or not all(p.isdigit() or p == "" for p in parts):
            continue  # not a repetition (the converter treats it as text, or refuses it)
        if any(not p.isascii() for p in parts):
            raise _refuse("repetition counts in pattern must be ASCII digits", field)
        counts = [int(p) for p in parts if p]
        biggest = max(counts, default=0)
        if biggest > MAX_COUNT:
            raise _refuse(f"a repetition count in pattern is above {MAX_COUNT}", field)
        product *= max(biggest, 1)
        if product > MAX_COUNT:
            raise _refuse(f"the repetitions in pattern multiply past {MAX_COUNT}", field)


def schema_grammar(schema: dict[str, Any], field: str, *, root: str | None = None) -> str:
    """The GBNF grammar of ``schema``'s documents (blocking: run it in a worker thread).
    With ``root``, a GBNF expression in which the rule ``doc`` stands for a document, the
    grammar's root is that expression (text around a JSON value). Properties named ``name``
    come before ``arguments`` and ``parameters`` (tool calls read better so)."""
    from llama_cpp.llama_grammar import SchemaConverter

    check_schema(schema, field)
    try:
        converter = SchemaConverter(prop_order={"name": 0, "arguments": 1, "parameters": 1},
                                    allow_fetch=False, dotall=False, raw_pattern=False)
        resolved = converter.resolve_refs(schema, "input")
        converter.visit(resolved, "" if root is None else "doc")
        if root is not None:
            converter._add_rule("root", root)
        grammar = converter.format_grammar()
    except Exception as exc:  # the converter's own errors (asserts, KeyError, recursion ...)
        raise _refuse(f"this JSON schema cannot be turned into a grammar "
                      f"({type(exc).__name__}: {str(exc)[:200]})", field) from None
    if len(grammar) > MAX_GRAMMAR_CHARS:
        raise _refuse(f"the schema's grammar has {len(grammar)} characters, more than "
                      f"{MAX_GRAMMAR_CHARS}", field)
    return grammar


async def grammar_for(response_format: dict[str, Any]) -> str:
    """The GBNF grammar of a ``json_object`` or ``json_schema`` response format."""
    from llama_cpp.llama_grammar import JSON_GBNF

    if response_format["type"] == "json_object":
        return JSON_GBNF
    schema = response_format["schema"] or {}
    check_schema(schema)  # at once: a hostile schema never reaches a thread
    return await trio.to_thread.run_sync(schema_grammar, schema, "response_format")
