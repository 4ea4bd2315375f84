"""What the two structure-aware fuzzers (``test_fuzz.py`` for ZeroMQ, ``test_http_fuzz.py``
for the HTTP door) share: deep values, range edges, paths into a request, copies of requests,
the run's selection of cases, a finding."""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar


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


def walk(body: Any, path: Sequence[Any]) -> Any:
    """The value at ``path`` inside ``body``."""
    for step in path:
        body = body[step]
    return body


def at(body: Any, path: tuple) -> tuple[Any, Any]:
    """The container holding ``path``'s last step, and that step."""
    return walk(body, path[:-1]), path[-1]


def copy_tree(v: Any, opaque: set[int]) -> Any:
    """A copy of the dicts and lists of ``v``; the values whose ids are in ``opaque`` (the
    tables' large values, never mutated) are shared, not copied."""
    if id(v) in opaque:
        return v
    if isinstance(v, dict):
        return {k: copy_tree(x, opaque) for k, x in v.items()}
    if isinstance(v, list):
        return [copy_tree(x, opaque) for x in v]
    return v


class _Case(Protocol):
    label: str
    costly: bool


C = TypeVar("C", bound=_Case)


def select_cases(cases: list[C], seed: int, fast: bool, *, always: Callable[[C], bool],
                 fast_cases: int, fast_costly: int) -> list[C]:
    """The run's cases in a seeded order. The fast slice keeps every case ``always`` names
    and a seeded sample of the rest, ``fast_cases`` in all, at most ``fast_costly`` of them
    costly. ``LORAD_FUZZ_ONLY`` keeps only the cases whose label holds it."""
    rng = random.Random(seed)
    order = list(cases)
    rng.shuffle(order)
    if fast:
        first = [c for c in order if always(c)]
        rest = [c for c in order if not always(c)]
        cheap = [c for c in rest if not c.costly]
        costly = [c for c in rest if c.costly][:fast_costly]
        order = first + costly + cheap[: fast_cases - len(first) - len(costly)]
        rng.shuffle(order)
    only = os.environ.get("LORAD_FUZZ_ONLY")
    if only:
        order = [c for c in order if only in c.label]
    return order


@dataclass
class Finding:
    kind: str
    case: str
    request: str
    detail: str
