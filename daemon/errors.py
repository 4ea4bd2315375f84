"""The daemon's own failures, each mapped to a wire error code where a handler answers.

Inside the daemon, a bad configuration, a socket that cannot be bound and a llama.cpp call that
fails are distinct exception types; only at the edge (the dispatcher, the actor's request loop,
the command line) do they become a :class:`~lorad.protocol.ProtocolError` or a message.
"""

from __future__ import annotations

from typing import Any

from lorad.protocol import ErrorCode, ProtocolError


class DaemonError(Exception):
    """A failure inside the daemon; ``code`` is the wire error it is answered with."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, code: ErrorCode | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details = details

    def to_protocol(self) -> ProtocolError:
        return ProtocolError(self.code, self.message, **self.details)


class ConfigError(DaemonError):
    """The configuration (file or flags) is invalid."""

    code = ErrorCode.BAD_REQUEST


class BindError(DaemonError):
    """The endpoint cannot be served (refused TCP, taken ipc path, CURVE setup)."""

    code = ErrorCode.BAD_REQUEST


class LlamaError(DaemonError):
    """A llama.cpp call failed (the engine's errors: ``daemon/llama.py`` raises these types
    only, and each one's wire code is said here, at the edge)."""


class LoadCancelled(LlamaError):
    """A model load was cancelled (its progress callback said stop)."""

    code = ErrorCode.CANCELLED


class ModelLoadFailed(LlamaError):
    code = ErrorCode.MODEL_LOAD_FAILED


class AdapterLoadFailed(LlamaError):
    """An adapter did not load, or could not be set on a context."""

    code = ErrorCode.LORA_LOAD_FAILED


class ContextFailed(LlamaError):
    """A context could not be created."""


class BadKvType(ContextFailed):
    code = ErrorCode.BAD_REQUEST


class ContextFull(LlamaError):
    """A decode found no room in the KV cache."""

    code = ErrorCode.CONTEXT_OVERFLOW


class CacheLost(LlamaError):
    """A sequence's cached tokens did not arrive where the scheduler moved it in its slab: its
    generation cannot go on."""


class EngineStopped(DaemonError):
    """The engine stopped (the daemon is stopping) before a step was decoded."""

    code = ErrorCode.SHUTTING_DOWN


class SequenceClosing(DaemonError):
    """A step was asked of a slab whose scheduler has stopped (its context is closing)."""

    code = ErrorCode.NOT_FOUND


class UnknownTemplate(LlamaError):
    """A chat template name that is none of llama.cpp's built-in ones."""

    code = ErrorCode.BAD_REQUEST


class BadGrammar(LlamaError):
    """A grammar llama.cpp refuses, one too costly, or one that allows no token."""

    code = ErrorCode.BAD_REQUEST


class NotEmbeddingModel(LlamaError):
    """A reranking model asked for embeddings."""

    code = ErrorCode.BAD_REQUEST


class NoRollback(LlamaError):
    """A model whose memory cannot drop rejected draft tokens."""

    code = ErrorCode.SPECULATIVE_UNSUPPORTED

class LitertError(DaemonError):
    """A LiteRT-LM runtime call failed (``daemon/litert.py`` raises these types only)."""


class LitertUnavailable(LitertError):
    """The LiteRT-LM runtime is not installed."""

    code = ErrorCode.BACKEND_UNSUPPORTED


class LitertLoadFailed(LitertError):
    """The runtime could not open the bundle or make its engine."""

    code = ErrorCode.MODEL_LOAD_FAILED


def to_protocol(exc: BaseException) -> ProtocolError:
    """The wire error for any exception raised while answering a request."""
    if isinstance(exc, ProtocolError):
        return exc
    if isinstance(exc, DaemonError):
        return exc.to_protocol()
    return ProtocolError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
