"""Operations, their arguments and validation (sans-IO).

Each operation has a schema: argument name -> :class:`Arg`. :func:`validate_args` checks a
request's ``args`` against it, fills defaults, and raises ``bad_request`` naming the field for
anything unknown, missing or malformed. Unknown arguments are refused, never ignored.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import ErrorCode, ProtocolError, echo
from .limits import DEFAULT_LIMITS, Limits

Check = Callable[[Any, Limits], "str | None"]
_MISSING = object()


@dataclass(frozen=True)
class Arg:
    """One argument: accepted types, whether it is required, its default, an extra check."""

    types: tuple[type, ...]
    required: bool = False
    default: Any = None
    check: Check | None = None
    nullable: bool = False
    code: ErrorCode = ErrorCode.BAD_REQUEST
    """The error code for a value of the wrong type or one that fails ``check``."""
    parse: Callable[[Any, Limits], Any] | None = None
    """Turns a valid value into its normal form; may raise ProtocolError itself."""


def _range(lo: float | None, hi: float | None) -> Check:
    def check(v: Any, _limits: Limits) -> str | None:
        if isinstance(v, float) and not math.isfinite(v):
            return "must be finite"
        if lo is not None and v < lo:
            return f"must be >= {lo}"
        if hi is not None and v > hi:
            return f"must be <= {hi}"
        return None

    return check


def _max_tokens(v: int, limits: Limits) -> str | None:
    if not 1 <= v <= limits.max_tokens:
        return f"must be in 1..{limits.max_tokens}"
    return None


def _logprobs(v: int, limits: Limits) -> str | None:
    if not 0 <= v <= limits.max_logprobs:
        return f"must be in 0..{limits.max_logprobs}"
    return None


def _credit(v: int, limits: Limits) -> str | None:
    if not 1 <= v <= limits.max_credit:
        return f"must be in 1..{limits.max_credit}"
    return None


def _token_list(v: list, _limits: Limits) -> str | None:
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in v):
        return "must be a list of non-negative integers"
    return None


def _stop(v: list, limits: Limits) -> str | None:
    if len(v) > limits.max_stop_sequences:
        return f"at most {limits.max_stop_sequences} stop sequences"
    if not all(isinstance(s, str) and s for s in v):
        return "must be a list of non-empty strings"
    return None


def _messages(v: list, _limits: Limits) -> str | None:
    if not v:
        return "must not be empty"
    for i, m in enumerate(v):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            return f"message {i} must be a map with a string 'role'"
        calls = m.get("tool_calls")
        if calls is not None:
            if m["role"] != "assistant" or not isinstance(calls, list) or not all(
                    _is_call(c) for c in calls):
                return (f"message {i}: tool_calls must be on an assistant message, a list of "
                        "{id?, type: \"function\", function: {name, arguments}}")
            if m.get("content") is None:
                continue
        if not isinstance(m.get("content"), str):
            return f"message {i} must have a string 'content'"
    return None


def _is_call(c: Any) -> bool:
    fn = c.get("function") if isinstance(c, dict) else None
    return (isinstance(fn, dict) and isinstance(fn.get("name"), str)
            and isinstance(fn.get("arguments"), (str, dict)))


def _tool_list(v: list, _limits: Limits) -> str | None:
    if not all(isinstance(t, dict) for t in v):
        return "must be a list of maps {type: \"function\", function: {name, ...}}"
    return None


def _nonempty(v: str, _limits: Limits) -> str | None:
    return None if v else "must not be empty"


def _one_of(*choices: str) -> Check:
    def check(v: Any, _limits: Limits) -> str | None:
        return None if v in choices else f"must be one of {', '.join(choices)}"

    return check


def _finite(v: float, _limits: Limits) -> str | None:
    return None if math.isfinite(v) else "must be a finite number"


def invalid_scale(value: Any, field: str) -> ProtocolError:
    """``lora_invalid_scale`` with ``details: {field, scale}`` (the value as text)."""
    shown = echo(value, 100, as_repr=True)
    return ProtocolError(ErrorCode.LORA_INVALID_SCALE,
                         f"adapter scale must be a finite number, got {shown}",
                         field=field, scale=shown)


def check_scale(value: Any, field: str = "scale") -> float:
    """An adapter scale: any finite number (negative too); else ``lora_invalid_scale``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise invalid_scale(value, field)
    return float(value)


def parse_loras(value: list, limits: Limits) -> list[tuple[str, float]]:
    """A LoRA stack: items ``{"path": str, "scale": number = 1.0}``, ``[path, scale]`` or
    ``path``; returns ``[(path, scale), ...]`` in order."""
    if len(value) > limits.max_loras:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"at most {limits.max_loras} adapters in a stack",
                            field="loras", limit="max_loras", value=limits.max_loras)
    out: list[tuple[str, float]] = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            path, scale = item, 1.0
        elif isinstance(item, list) and len(item) == 2:
            path, scale = item
        elif isinstance(item, dict) and "path" in item and set(item) <= {"path", "scale"}:
            path, scale = item["path"], item.get("scale", 1.0)
        else:
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                f"loras[{i}] must be {{path, scale}}, [path, scale] or a path",
                                field="loras", index=i)
        if not isinstance(path, str) or not path:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"loras[{i}]: path must be a non-empty "
                                "string", field="loras", index=i)
        out.append((path, check_scale(scale, field="loras")))
    return out


_INT = (int,)
_NUM = (int, float)
_STR = (str,)
_BOOL = (bool,)
_ID = (int, str)

SPECULATIVE_MODES = ("prompt_lookup", "draft_model", "mtp")
_REQUIRED = object()
# mode -> parameter -> (type, default, low, high)
_SPEC_PARAMS: dict[str, dict[str, tuple[type, Any, Any, Any]]] = {
    "prompt_lookup": {"ngram_min": (int, 1, 1, 8), "ngram_max": (int, 3, 1, 8),
                      "max_draft": (int, 64, 1, 64), "adaptive": (bool, True, None, None)},
    "draft_model": {"model": (str, _REQUIRED, None, None), "max_draft": (int, 8, 1, 64),
                    "p_min": (float, 0.5, 0.0, 1.0), "adaptive": (bool, True, None, None)},
    "mtp": {"max_draft": (int, 1, 1, 8)},
}


def parse_speculative(value: Any, limits: Limits) -> dict[str, Any] | bool:
    """``False`` (off) or ``{"mode": ..., parameters}`` with defaults filled in.

    A request this daemon cannot run as asked is ``speculative_unsupported`` with a reason.
    """
    if value is False:
        return False

    def refuse(reason: str, message: str, **details: Any) -> ProtocolError:
        return ProtocolError(ErrorCode.SPECULATIVE_UNSUPPORTED, f"speculative: {message}",
                             field="speculative", reason=reason, **details)

    if not isinstance(value, dict) or not isinstance(value.get("mode"), str):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "speculative must be false or a map with a "
                            "string 'mode'", field="speculative")
    mode = value["mode"]
    if mode not in _SPEC_PARAMS:
        raise refuse("unknown_mode", f"unknown mode {echo(mode)!r}", mode=echo(mode),
                     known=list(SPECULATIVE_MODES))
    spec = _SPEC_PARAMS[mode]
    unknown = sorted(set(value) - set(spec) - {"mode"}, key=str)
    if unknown:
        raise refuse("unknown_parameter", f"unknown parameter {echo(unknown[0])!r} for {mode}",
                     mode=mode, parameter=echo(unknown[0]), accepted=sorted(spec))
    out: dict[str, Any] = {"mode": mode}
    for key, (kind, default, lo, hi) in spec.items():
        v = value.get(key, default)
        if v is _REQUIRED:
            raise refuse("missing_parameter", f"{mode} needs {key!r}", mode=mode, parameter=key)
        if kind is bool:
            ok = isinstance(v, bool)
        else:
            ok = not isinstance(v, bool) and isinstance(v, (int, float) if kind is float
                                                        else kind)
        if ok and lo is not None:
            ok = math.isfinite(v) and lo <= v <= hi
        if not ok or (kind is str and not v):
            what = (f"in {lo}..{hi}" if lo is not None else "true or false" if kind is bool
                    else "a non-empty string")
            raise refuse("out_of_range", f"{key} must be {what}, got {echo(v)}", mode=mode,
                         parameter=key)
        out[key] = float(v) if kind is float else v
    if mode == "prompt_lookup" and out["ngram_min"] > out["ngram_max"]:
        raise refuse("out_of_range", "ngram_min must not exceed ngram_max", mode=mode,
                     parameter="ngram_min")
    return out


def parse_embed_input(value: Any, limits: Limits) -> list[str]:
    """``embed``'s ``input``: one string or a list of them, each non-empty; at most
    ``limits.max_embed_inputs``."""
    items = [value] if isinstance(value, str) else value
    if not items:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "embed: 'input' is empty", field="input")
    if len(items) > limits.max_embed_inputs:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"embed: {len(items)} inputs, more than "
                            f"limits.max_embed_inputs ({limits.max_embed_inputs})",
                            field="input", limit="max_embed_inputs",
                            value=limits.max_embed_inputs)
    for i, item in enumerate(items):
        if not isinstance(item, str) or not item:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"embed: input {i} is not a non-empty "
                                "string", field="input", index=i)
    return list(items)


_SPECULATIVE = Arg((dict, bool), nullable=True, parse=parse_speculative)
_LORAS = Arg((list,), nullable=True, parse=parse_loras)
_SCALE = Arg(_NUM, default=1.0, check=_finite, code=ErrorCode.LORA_INVALID_SCALE)
"""A ``set_lora`` scale; its errors carry ``scale`` too (see :func:`validate_args`)."""

SAMPLING: dict[str, Arg] = {
    "max_tokens": Arg(_INT, default=256, check=_max_tokens),
    "temperature": Arg(_NUM, default=0.8, check=_range(0.0, 100.0)),
    "top_k": Arg(_INT, default=40, check=_range(0, None)),
    "top_p": Arg(_NUM, default=0.95, check=_range(0.0, 1.0)),
    "min_p": Arg(_NUM, default=0.05, check=_range(0.0, 1.0)),
    "repeat_penalty": Arg(_NUM, default=1.0, check=_range(0.0, 100.0)),
    "repeat_last_n": Arg(_INT, default=64, check=_range(0, 1 << 20)),
    "seed": Arg(_INT, nullable=True, check=_range(0, 2**32 - 1)),
    "stop": Arg((list,), default=[], check=_stop),
    "logprobs": Arg(_INT, default=0, check=_logprobs),
    "grammar": Arg(_STR, nullable=True, check=_nonempty),
    "credit": Arg(_INT, default=64, check=_credit),
    "loras": _LORAS,
    "speculative": _SPECULATIVE,
}

@dataclass(frozen=True)
class OpSpec:
    """What the protocol says about one operation (the spec's tables and the daemon follow it)."""

    args: dict[str, Arg]
    """Argument name -> :class:`Arg`."""
    example: dict[str, Any]
    """Its smallest valid arguments."""
    streams: bool = False
    """Answered by ``item`` replies and one ``end`` (or one ``error``)."""
    inline: bool = False
    """Answered in the daemon's transport task, in order of arrival: quick and never waiting
    on a model (a stream's first reply is sent from there too)."""
    while_draining: bool = False
    """Still served while the daemon shuts down."""


SPECS: dict[str, OpSpec] = {
    "ping": OpSpec({}, example={}, inline=True, while_draining=True),
    "status": OpSpec({}, example={}, inline=True, while_draining=True),
    "capabilities": OpSpec({}, example={}, inline=True, while_draining=True),
    "list_models": OpSpec({}, example={}, inline=True, while_draining=True),
    "list_contexts": OpSpec({}, example={}, inline=True, while_draining=True),
    "metrics": OpSpec({}, example={}, inline=True, while_draining=True),
    "load_model": OpSpec(
        {
            "path": Arg(_STR, required=True, check=_nonempty),
            "n_gpu_layers": Arg(_INT, nullable=True, check=_range(-1, 100000)),
            "use_mmap": Arg(_BOOL, default=True),
            "alias": Arg(_STR, nullable=True, check=_nonempty),
            "chat_template": Arg(_STR, nullable=True, check=_nonempty),
            "progress": Arg(_BOOL, default=False),
        },
        example={"path": "/models/m.gguf"},
    ),
    "unload_model": OpSpec(
        {
            "model": Arg(_STR, required=True),
            "force": Arg(_BOOL, default=False),
        },
        example={"model": "m"},
    ),
    "create_context": OpSpec(
        {
            "model": Arg(_STR, required=True, check=_nonempty),
            "n_ctx": Arg(_INT, default=0, check=_range(0, 1 << 20)),
            "n_batch": Arg(_INT, default=512, check=_range(1, 1 << 16)),
            "n_threads": Arg(_INT, nullable=True, check=_range(1, 1024)),
            "seed": Arg(_INT, default=0, check=_range(0, 2**32 - 1)),
            "max_queued": Arg(_INT, default=8, check=_range(0, 1024)),
            "persistent": Arg(_BOOL, default=False),
            "shared": Arg(_BOOL, default=False),
            "kv_type": Arg(_STR, default="f16", check=_one_of("f16", "f32", "q8_0")),
            "flash_attn": Arg(_BOOL, nullable=True),
            "loras": _LORAS,
            "speculative": _SPECULATIVE,
        },
        example={"model": "m"},
    ),
    "close_context": OpSpec(
        {"context": Arg(_STR, required=True)},
        example={"context": "ctx-1"},
        while_draining=True,
    ),
    "generate": OpSpec(
        {
            "context": Arg(_STR, required=True),
            "prompt": Arg(_STR, nullable=True),
            "tokens": Arg((list,), nullable=True, check=_token_list),
            "add_special": Arg(_BOOL, default=True),
            **SAMPLING,
        },
        example={"context": "ctx-1", "prompt": "Once upon a time"},
        streams=True, inline=True,
    ),
    "chat": OpSpec(
        {
            "context": Arg(_STR, required=True),
            "messages": Arg((list,), required=True, check=_messages),
            "add_generation_prompt": Arg(_BOOL, default=True),
            "template": Arg(_STR, nullable=True, check=_nonempty),
            "tools": Arg((list,), nullable=True, check=_tool_list),
            "tool_choice": Arg((str, dict), nullable=True),
            "parallel_tool_calls": Arg(_BOOL, nullable=True),
            **SAMPLING,
        },
        example={"context": "ctx-1", "messages": [{"role": "user", "content": "hi"}]},
        streams=True, inline=True,
    ),
    "tokenize": OpSpec(
        {
            "model": Arg(_STR, nullable=True),
            "context": Arg(_STR, nullable=True),
            "text": Arg(_STR, required=True),
            "add_special": Arg(_BOOL, default=True),
            "parse_special": Arg(_BOOL, default=False),
        },
        example={"model": "m", "text": "hello"},
    ),
    "embed": OpSpec(
        {
            "model": Arg(_STR, nullable=True),
            "context": Arg(_STR, nullable=True),
            "input": Arg((str, list), required=True, parse=parse_embed_input),
            "normalize": Arg(_BOOL, default=True),
        },
        example={"model": "m", "input": ["x"]},
    ),
    "detokenize": OpSpec(
        {
            "model": Arg(_STR, nullable=True),
            "context": Arg(_STR, nullable=True),
            "tokens": Arg((list,), required=True, check=_token_list),
        },
        example={"model": "m", "tokens": [1, 2, 3]},
    ),
    "cancel": OpSpec(
        {"request": Arg(_ID, required=True)},
        example={"request": 7},
        inline=True, while_draining=True,
    ),
    "set_lora": OpSpec(
        {
            "context": Arg(_STR, required=True),
            "path": Arg(_STR, required=True, check=_nonempty),
            "scale": _SCALE,
        },
        example={"context": "ctx-1", "path": "french"},
    ),
    "remove_lora": OpSpec(
        {
            "context": Arg(_STR, required=True),
            "path": Arg(_STR, required=True, check=_nonempty),
        },
        example={"context": "ctx-1", "path": "french"},
    ),
    "clear_loras": OpSpec(
        {"context": Arg(_STR, required=True)},
        example={"context": "ctx-1"},
    ),
    "set_loras": OpSpec(
        {
            "context": Arg(_STR, required=True),
            "loras": Arg((list,), required=True, parse=parse_loras),
        },
        example={"context": "ctx-1", "loras": []},
    ),
    "list_loras": OpSpec(
        {"context": Arg(_STR, required=True)},
        example={"context": "ctx-1"},
        inline=True, while_draining=True,
    ),
    "validate_lora": OpSpec(
        {
            "model": Arg(_STR, required=True, check=_nonempty),
            "path": Arg(_STR, required=True, check=_nonempty),
        },
        example={"model": "m", "path": "/adapters/a.gguf"},
    ),
    "name_lora": OpSpec(
        {
            "name": Arg(_STR, required=True, check=_nonempty),
            "path": Arg(_STR, required=True, check=_nonempty),
            "replace": Arg(_BOOL, default=False),
        },
        example={"name": "pirate", "path": "/adapters/pirate.gguf"},
    ),
    "unname_lora": OpSpec(
        {"name": Arg(_STR, required=True, check=_nonempty)},
        example={"name": "pirate"},
    ),
    "list_lora_names": OpSpec({}, example={}, inline=True, while_draining=True),
    "credit": OpSpec(
        {
            "request": Arg(_ID, required=True),
            "n": Arg(_INT, required=True, check=_credit),
        },
        example={"request": 7, "n": 32},
        inline=True, while_draining=True,
    ),
}
"""Every operation of the protocol, one record each (the daemon's table is checked against it)."""

OPS: dict[str, dict[str, Arg]] = {name: spec.args for name, spec in SPECS.items()}
"""Each operation's argument schema."""
STREAMING_OPS: frozenset[str] = frozenset(n for n, spec in SPECS.items() if spec.streams)
"""Operations answered by ``item`` replies and one ``end`` (or one ``error``)."""


def _type_name(types: tuple[type, ...]) -> str:
    names = {int: "integer", float: "number", str: "string", bool: "boolean", list: "array"}
    return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in types))


def validate_args(op: str, args: dict[str, Any], limits: Limits = DEFAULT_LIMITS) -> dict[str, Any]:
    """Check ``args`` for ``op``; return them with defaults filled in.

    Raises ProtocolError(bad_request) naming the field, or (too_large) for values over limits.
    """
    schema = OPS.get(op)
    if schema is None:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f"unknown operation {echo(op)!r}", field="op",
            known=sorted(OPS),
        )
    unknown = sorted(set(args) - set(schema), key=str)  # keys may mix str and bytes
    if unknown:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST,
            f"{op}: unknown argument {echo(unknown[0])!r}",
            field=echo(unknown[0]),
            accepted=sorted(schema),
        )
    out: dict[str, Any] = {}
    for name, spec in schema.items():
        value = args.get(name, _MISSING)
        if value is _MISSING or (value is None and not spec.required):
            if spec.required:
                raise ProtocolError(
                    ErrorCode.BAD_REQUEST, f"{op}: missing argument {name!r}", field=name
                )
            out[name] = list(spec.default) if isinstance(spec.default, list) else spec.default
            continue
        ok = isinstance(value, spec.types) and not (
            isinstance(value, bool) and bool not in spec.types
        )
        if spec.code is ErrorCode.LORA_INVALID_SCALE and not (
                ok and (spec.check is None or not spec.check(value, limits))):
            raise invalid_scale(value, name)
        if not ok:
            raise ProtocolError(
                spec.code,
                f"{op}: {name!r} must be {_type_name(spec.types)}, got {type(value).__name__}",
                field=name,
            )
        if spec.check is not None:
            problem = spec.check(value, limits)
            if problem:
                raise ProtocolError(spec.code, f"{op}: {name!r} {problem}", field=name)
        if spec.parse is not None:
            value = spec.parse(value, limits)
        out[name] = float(value) if float in spec.types and isinstance(value, int) else value
    if op == "generate" and (out["prompt"] is None) == (out["tokens"] is None):
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, "generate: give exactly one of 'prompt' and 'tokens'",
            field="prompt",
        )
    if op in ("tokenize", "detokenize", "embed") and (out["model"] is None) == (
            out["context"] is None):
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f"{op}: give exactly one of 'model' and 'context'", field="model"
        )
    return out
