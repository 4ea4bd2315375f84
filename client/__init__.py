"""lorad's client library: needs only pyzmq and msgpack (the trio client also needs trio).

>>> from lorad.client import Client
>>> with Client() as client:
...     ctx = client.create_context("/path/to/model.gguf", n_ctx=2048)
...     for chunk in ctx.generate("Once upon a time", max_tokens=32):
...         print(chunk.text, end="")
"""

from __future__ import annotations

from typing import Any

from lorad.protocol.endpoint import default_endpoint

from .core import Chunk, CurveKeys
from .errors import (
    BackendUnsupported,
    BadRequest,
    Cancelled,
    ContextBusy,
    ContextOverflow,
    DaemonUnavailable,
    ForbiddenPath,
    InternalError,
    InUse,
    LoradError,
    LoraFileNotFound,
    LoraIncompatible,
    LoraInvalid,
    LoraInvalidScale,
    LoraLoadFailed,
    LoraUnsupported,
    ModelLoadFailed,
    NotFound,
    RequestTimeout,
    ShuttingDown,
    SpeculativeUnsupported,
    TooLarge,
    UnsupportedVersion,
    error_from_wire,
)
from .sync import Client, Context, Stream


def __getattr__(name: str) -> Any:
    # The trio client is imported on first use so that the base install needs no trio.
    if name in ("AsyncClient", "AsyncContext", "AsyncStream"):
        from . import aio

        return getattr(aio, name)
    raise AttributeError(name)


__all__ = [
    "AsyncClient",
    "AsyncContext",
    "AsyncStream",
    "BackendUnsupported",
    "BadRequest",
    "Cancelled",
    "Chunk",
    "Client",
    "Context",
    "ContextBusy",
    "ContextOverflow",
    "CurveKeys",
    "DaemonUnavailable",
    "ForbiddenPath",
    "InUse",
    "InternalError",
    "LoraFileNotFound",
    "LoraIncompatible",
    "LoraInvalid",
    "LoraInvalidScale",
    "LoraLoadFailed",
    "LoraUnsupported",
    "LoradError",
    "ModelLoadFailed",
    "NotFound",
    "RequestTimeout",
    "ShuttingDown",
    "SpeculativeUnsupported",
    "Stream",
    "TooLarge",
    "UnsupportedVersion",
    "default_endpoint",
    "error_from_wire",
]
