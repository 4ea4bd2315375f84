"""Bounds on GBNF grammars, checked before llama.cpp sees them.

llama.cpp's grammar code recurses once per nesting level of a group and once per rule on a
chain of leftmost rule references (parsing, the left-recursion check, advancing its stacks):
a grammar of 20,000 nested parentheses overflows the daemon's stack. Its per-token cost grows
with the alternatives it can be in at once. This module measures a grammar without parsing it
fully (string literals, character classes, token references and comments are skipped) and
refuses, with ``bad_request`` naming the limit, what is larger than the daemon's limits.
Everything the measurement lets through is still parsed by llama.cpp itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lorad.protocol import ErrorCode, Limits, ProtocolError

_REPEAT = re.compile(r"\{\s*(\d*)\s*(,?)\s*(\d*)\s*\}")
_LLAMA_MAX_REPETITION = 2000  # llama.cpp's MAX_REPETITION_THRESHOLD


@dataclass(frozen=True)
class GrammarShape:
    """What a grammar costs: its size, deepest group, rules (llama.cpp's count, estimated from
    above) and alternatives (``|``, all rules together)."""

    size: int
    depth: int
    rules: int
    alternatives: int


def measure(text: str) -> GrammarShape:
    """Measure a GBNF grammar (any text: malformed grammars are left to llama.cpp)."""
    depth = max_depth = 0
    rules = alternatives = 0
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == '"' or c == "[":
            close = '"' if c == '"' else "]"
            i += 1
            while i < n and text[i] != close:
                i += 2 if text[i] == "\\" else 1
        elif c == "<":
            end = text.find(">", i)
            i = n if end < 0 else end
        elif c == "#":
            end = text.find("\n", i)
            i = n if end < 0 else end
        elif c == "(":
            depth += 1
            max_depth = max(max_depth, depth)
            rules += 1  # each group is a rule of its own
        elif c == ")":
            depth = max(0, depth - 1)
        elif c == "|":
            alternatives += 1
        elif c in "*+?":
            rules += 1
        elif c == "{":
            m = _REPEAT.match(text, i)
            if m:
                low = int(m.group(1) or 0)
                high = int(m.group(3)) if m.group(3) else None
                if not m.group(2):
                    high = low
                if high is None or high > _LLAMA_MAX_REPETITION:
                    rules += 1
                else:
                    rules += max(1, high - low)
                i = m.end() - 1
        elif c == ":" and text.startswith("::=", i):
            rules += 1
            i += 2
        i += 1
    return GrammarShape(len(text.encode("utf-8", "surrogatepass")), max_depth, rules,
                        alternatives)


def check_grammar(text: str, limits: Limits) -> GrammarShape:
    """The grammar's shape, or ``bad_request`` naming the first limit it exceeds."""
    if len(text) > limits.max_grammar_bytes:  # no need to measure: characters <= bytes
        _refuse("max_grammar_bytes", limits.max_grammar_bytes, len(text.encode("utf-8",
                                                                              "surrogatepass")))
    shape = measure(text)
    for name, value in (("max_grammar_bytes", shape.size), ("max_grammar_depth", shape.depth),
                        ("max_grammar_rules", shape.rules),
                        ("max_grammar_alternatives", shape.alternatives)):
        if value > getattr(limits, name):
            _refuse(name, getattr(limits, name), value)
    return shape


def _refuse(name: str, limit: int, value: int) -> None:
    what = name.removeprefix("max_grammar_")
    raise ProtocolError(
        ErrorCode.BAD_REQUEST,
        f"grammar too large: {what} {value} is over limits.{name} ({limit})",
        field="grammar", limit=name, value=limit, found=value,
    )
