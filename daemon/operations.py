"""The table of operations: one record per operation says everything the daemon does with it.

What the protocol says of an operation (its argument schema, whether it streams, whether it is
answered inline, in the transport's task, and whether it is served while the daemon drains) is
its :class:`lorad.protocol.ops.OpSpec`. Its handler is the coroutine of the same name in one of
the :mod:`.handlers` modules; a function named ``<op>_now`` there is an inline path tried first.
The table is checked complete when this module is imported: every operation has exactly one
handler, and no handler is left without an operation.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from lorad.protocol.ops import SPECS, Arg, OpSpec

from . import handlers
from .requests import RequestHandle
from .services import Services

Handler = Callable[[Services, RequestHandle], Awaitable[Any]]


@dataclass(frozen=True)
class Operation:
    name: str
    handler: Handler
    spec: OpSpec
    now: Callable[[Services, RequestHandle], Any] | None = None
    """An inline path tried first: its result answers the request at once; None sends the
    request on to ``handler``."""

    @property
    def schema(self) -> dict[str, Arg]:
        return self.spec.args

    @property
    def streams(self) -> bool:
        return self.spec.streams

    @property
    def inline(self) -> bool:
        return self.spec.inline

    @property
    def while_draining(self) -> bool:
        return self.spec.while_draining

    def runs_inline(self, args: dict[str, Any]) -> bool:
        # A per-request adapter stack may have to load files: that runs in a task of its own.
        return self.inline and not (self.streams and args.get("loras"))


def _handler_functions() -> dict[str, tuple[str, Callable[..., Any]]]:
    found: dict[str, tuple[str, Callable[..., Any]]] = {}
    for info in pkgutil.iter_modules(handlers.__path__):
        module = importlib.import_module(f"{handlers.__name__}.{info.name}")
        for name, fn in vars(module).items():
            if name.startswith("_") or not inspect.isfunction(fn):
                continue
            if fn.__module__ != module.__name__:
                continue  # imported helpers are not handlers
            if name in found:
                raise RuntimeError(f"two handlers named {name!r}: {found[name][0]} and "
                                   f"{module.__name__}")
            found[name] = (module.__name__, fn)
    return found


def _table() -> dict[str, Operation]:
    functions = _handler_functions()
    table: dict[str, Operation] = {}
    for name, spec in SPECS.items():
        if name not in functions or not inspect.iscoroutinefunction(functions[name][1]):
            raise RuntimeError(f"operation {name!r} has no coroutine handler in "
                               f"{handlers.__name__}")
        now = functions.get(f"{name}_now")
        table[name] = Operation(name, functions[name][1], spec, now[1] if now else None)
    used = set(table) | {f"{name}_now" for name in table}
    extra = sorted(set(functions) - used)
    if extra:
        raise RuntimeError(f"handler functions without an operation: {extra}")
    return table


OPERATIONS: dict[str, Operation] = _table()
