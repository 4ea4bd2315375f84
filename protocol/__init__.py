"""lorad's wire protocol, sans-IO: message types, encoding, validation, limits and error codes.

Nothing here opens a socket; both the daemon and the clients build on it. The wire format is
specified in ``protocol/README.md``.
"""

from .codec import (
    PROTOCOL_VERSION,
    TAG,
    Reply,
    Request,
    RequestId,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
    error_reply,
)
from .errors import ErrorCode, ProtocolError
from .limits import DEFAULT_LIMITS, Limits
from .ops import OPS, STREAMING_OPS, validate_args
from .refs import looks_like_path

FINISH_REASONS = ("stop", "length", "tool_calls", "cancelled", "error")

__all__ = [
    "DEFAULT_LIMITS",
    "FINISH_REASONS",
    "OPS",
    "PROTOCOL_VERSION",
    "STREAMING_OPS",
    "TAG",
    "ErrorCode",
    "Limits",
    "ProtocolError",
    "Reply",
    "Request",
    "RequestId",
    "decode_reply",
    "decode_request",
    "encode_reply",
    "encode_request",
    "error_reply",
    "looks_like_path",
    "validate_args",
]
