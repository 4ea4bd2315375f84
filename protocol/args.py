"""Validated arguments as typed, frozen objects: one dataclass per operation, made from its
schema in :data:`lorad.protocol.ops.OPS` (so the two cannot drift apart).

``parse_args(op, args)`` validates like :func:`~lorad.protocol.ops.validate_args` and returns
an instance: fields are read as attributes (``args.max_tokens``) and cannot be assigned. For the
code that reads arguments by name, an instance also answers ``args["name"]`` and
``args.get("name", default)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .limits import DEFAULT_LIMITS, Limits
from .ops import OPS, Arg, validate_args


class OpArgs:
    """Base of every operation's arguments class."""

    __slots__ = ()

    def __getitem__(self, name: str) -> Any:
        try:
            return getattr(self, name)
        except AttributeError:
            raise KeyError(name) from None

    def get(self, name: str, default: Any = None) -> Any:
        return getattr(self, name, default)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]


def _annotation(arg: Arg) -> str:
    names = {int: "int", float: "float", str: "str", bool: "bool", list: "list", dict: "dict"}
    text = " | ".join(dict.fromkeys(names.get(t, t.__name__) for t in arg.types))
    return f"{text} | None" if arg.nullable or (not arg.required and arg.default is None) else text


def _make(op: str) -> type[OpArgs]:
    name = "".join(part.capitalize() for part in op.split("_")) + "Args"
    fields = [(arg_name, _annotation(arg)) for arg_name, arg in OPS[op].items()]
    cls = dataclasses.make_dataclass(name, fields, bases=(OpArgs,), frozen=True, slots=True)
    cls.__module__ = __name__
    cls.__doc__ = f"The validated arguments of ``{op}``."
    return cls


ARGS: dict[str, type[OpArgs]] = {op: _make(op) for op in OPS}
"""The arguments class of every operation."""


def parse_args(op: str, args: dict[str, Any], limits: Limits = DEFAULT_LIMITS) -> OpArgs:
    """Validate ``args`` for ``op`` (``ProtocolError`` as :func:`validate_args` raises it) into
    a frozen instance of ``ARGS[op]``."""
    values = validate_args(op, args, limits)  # an unknown operation is refused here
    return ARGS[op](**values)
