"""What the two structure-aware fuzzers (``test_fuzz.py`` for ZeroMQ, ``test_http_fuzz.py``
for the HTTP door) share: deep values, range edges, paths into a request, a finding."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


def nest_list(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


def nest_map(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = {"k": value}
    return value


def bounds(lo: float, hi: float | None, integer: bool = True) -> list[tuple[str, Any]]:
    """Both ends of a range and one step beyond each."""
    step = 1 if integer else 1e-9
    out = [(f"lo-1:{lo - step}", lo - step), (f"lo:{lo}", lo)]
    if hi is not None:
        out += [(f"hi:{hi}", hi), (f"hi+1:{hi + step}", hi + step)]
    return out


def leaf_paths(value: Any, prefix: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """Every (path, value) inside ``value``: dict keys and the first two list elements."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield (*prefix, k), v
            yield from leaf_paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value[:2]):
            yield (*prefix, i), v
            yield from leaf_paths(v, (*prefix, i))


def path_label(path: tuple) -> str:
    out = ""
    for step in path:
        out += f"[{step}]" if isinstance(step, int) else f".{step}"
    return out.lstrip(".")


@dataclass
class Finding:
    kind: str
    case: str
    request: str
    detail: str
