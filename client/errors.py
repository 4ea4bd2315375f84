"""Exceptions raised by the clients: one class per protocol error code, under LoradError."""

from __future__ import annotations

from typing import Any

from lorad.protocol import ErrorCode


class LoradError(Exception):
    """Base of every lorad client error. ``code`` is the protocol error code."""

    code: str = "internal"

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = details or {}

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


class DaemonUnavailable(LoradError):
    """No daemon answers at the endpoint, or it went away during a request."""

    code = "unavailable"


class RequestTimeout(LoradError):
    """The daemon is connected but did not answer within the call's timeout."""

    code = "timeout"


class BadRequest(LoradError):
    code = ErrorCode.BAD_REQUEST.value


class UnsupportedVersion(LoradError):
    code = ErrorCode.UNSUPPORTED_VERSION.value


class NotFound(LoradError):
    code = ErrorCode.NOT_FOUND.value


class ModelLoadFailed(LoradError):
    code = ErrorCode.MODEL_LOAD_FAILED.value


class ContextBusy(LoradError):
    code = ErrorCode.CONTEXT_BUSY.value


class Cancelled(LoradError):
    code = ErrorCode.CANCELLED.value


class ContextOverflow(LoradError):
    code = ErrorCode.CONTEXT_OVERFLOW.value


class ForbiddenPath(LoradError):
    code = ErrorCode.FORBIDDEN_PATH.value


class TooLarge(LoradError):
    code = ErrorCode.TOO_LARGE.value


class InUse(LoradError):
    code = ErrorCode.IN_USE.value


class ShuttingDown(LoradError):
    code = ErrorCode.SHUTTING_DOWN.value


class InternalError(LoradError):
    code = ErrorCode.INTERNAL.value


class LoraFileNotFound(LoradError):
    code = ErrorCode.LORA_FILE_NOT_FOUND.value


class LoraInvalid(LoradError):
    code = ErrorCode.LORA_INVALID.value


class LoraIncompatible(LoradError):
    code = ErrorCode.LORA_INCOMPATIBLE.value


class LoraLoadFailed(LoradError):
    code = ErrorCode.LORA_LOAD_FAILED.value


class LoraInvalidScale(LoradError):
    code = ErrorCode.LORA_INVALID_SCALE.value


class LoraUnsupported(LoradError):
    code = ErrorCode.LORA_UNSUPPORTED.value


class SpeculativeUnsupported(LoradError):
    code = ErrorCode.SPECULATIVE_UNSUPPORTED.value


class BackendUnsupported(LoradError):
    """The model's backend (``details["backend"]``) cannot do what was asked; ``reason`` says
    why."""

    code = ErrorCode.BACKEND_UNSUPPORTED.value


ERRORS_BY_CODE: dict[str, type[LoradError]] = {
    cls.code: cls
    for cls in LoradError.__subclasses__()
    if cls.code in {c.value for c in ErrorCode}
}


def error_from_wire(error: dict[str, Any]) -> LoradError:
    """The exception for an ``error`` reply's ``{code, message, details}``."""
    code = str(error.get("code", "internal"))
    cls = ERRORS_BY_CODE.get(code, InternalError)
    exc = cls(str(error.get("message", code)), dict(error.get("details") or {}))
    if cls is InternalError and code != InternalError.code:
        exc.code = code  # an unknown code from a newer daemon keeps its name
    return exc
