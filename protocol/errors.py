"""The closed set of error codes of the wire protocol, and the exception that carries one."""

from __future__ import annotations

import reprlib
from enum import Enum
from typing import Any


class ErrorCode(str, Enum):
    """Every error a daemon may answer with. Clients map each to its own exception class."""

    BAD_REQUEST = "bad_request"
    """The message or an argument is malformed; ``details["field"]`` names the argument."""
    UNSUPPORTED_VERSION = "unsupported_version"
    """The client speaks a protocol version this daemon does not."""
    NOT_FOUND = "not_found"
    """No such model, context, request or adapter (``details`` says which)."""
    MODEL_LOAD_FAILED = "model_load_failed"
    """llama.cpp could not load the model file (``details["log"]`` has its log lines)."""
    CONTEXT_BUSY = "context_busy"
    """The context's request queue is full (``details["queued"]``, ``details["max_queued"]``)."""
    CANCELLED = "cancelled"
    """The request was cancelled before it produced a result."""
    CONTEXT_OVERFLOW = "context_overflow"
    """The prompt (plus generation) does not fit in the context's ``n_ctx``."""
    FORBIDDEN_PATH = "forbidden_path"
    """A path lies outside the daemon's allowed directories (after resolving symlinks)."""
    TOO_LARGE = "too_large"
    """A message, string, array or value is above a configured limit."""
    IN_USE = "in_use"
    """The object is still used (a model with contexts on it; pass ``force``)."""
    SHUTTING_DOWN = "shutting_down"
    """The daemon is draining and takes no new requests."""
    INTERNAL = "internal"
    """A bug or an unexpected llama.cpp failure; the daemon and other contexts keep running."""

    BACKEND_UNSUPPORTED = "backend_unsupported"
    """The model's backend cannot do this (``details``: ``backend``, ``field`` or ``op``, and
    ``reason``); refused before any work."""

    # LoRA adapters
    LORA_FILE_NOT_FOUND = "lora_file_not_found"
    """No such adapter file, or it is unreadable (``details`` says where lorad looked)."""
    LORA_INVALID = "lora_invalid"
    """Not a GGUF LoRA adapter, or a malformed one (``details`` names the tensor)."""
    LORA_INCOMPATIBLE = "lora_incompatible"
    """The adapter does not fit the model: architecture, missing tensor or shape."""
    LORA_LOAD_FAILED = "lora_load_failed"
    """llama.cpp refused the adapter anyway (``details["log"]`` has its log lines)."""
    LORA_INVALID_SCALE = "lora_invalid_scale"
    """An adapter scale that is NaN, infinite or not a number."""
    LORA_UNSUPPORTED = "lora_unsupported"
    """An adapter kind lorad cannot apply faithfully (``details["reason"]``)."""

    # Speculative decoding
    SPECULATIVE_UNSUPPORTED = "speculative_unsupported"
    """A speculative-decoding request that cannot run as asked (``details["reason"]``)."""


class ProtocolError(Exception):
    """An error with a protocol code, raised by validation and sent back as an error reply."""

    def __init__(self, code: ErrorCode | str, message: str, **details: Any) -> None:
        message = echo(message, MAX_MESSAGE_CHARS)
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message
        self.details = {k: _bounded(v) for k, v in details.items()}

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code.value, "message": self.message, "details": self.details}

    def __repr__(self) -> str:
        return f"ProtocolError({self.code.value!r}, {self.message!r}, **{self.details!r})"


MAX_MESSAGE_CHARS = 2048
"""An error message is cut to this length (it may quote a client's value)."""
MAX_DETAIL_CHARS = 1024
"""Each string in an error's details is cut to this length."""
MAX_DETAIL_ITEMS = 256
"""Each list in an error's details keeps at most this many items."""

_short_repr = reprlib.Repr()
_short_repr.maxstring = _short_repr.maxother = 80


def echo(value: Any, limit: int = 64, *, as_repr: bool = False) -> str:
    """A client's value as text for an error message or detail, cut to ``limit`` characters
    (a value echoed whole could make the reply larger than the client can decode, and
    rendering it whole could take long: non-strings, and strings with ``as_repr``, go through
    :mod:`reprlib`)."""
    text = value if isinstance(value, str) and not as_repr else _short_repr.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _bounded(value: Any, depth: int = 0) -> Any:
    """``value`` with long strings cut and long lists shortened (details stay decodable)."""
    if isinstance(value, str):
        return echo(value, MAX_DETAIL_CHARS)
    if isinstance(value, bytes):
        return value[:MAX_DETAIL_CHARS]
    if depth >= 4:
        return value if isinstance(value, (int, float, bool)) or value is None else echo(value)
    if isinstance(value, (list, tuple)):
        return [_bounded(v, depth + 1) for v in value[:MAX_DETAIL_ITEMS]]
    if isinstance(value, dict):
        return {k: _bounded(v, depth + 1) for k, v in list(value.items())[:MAX_DETAIL_ITEMS]}
    return value
