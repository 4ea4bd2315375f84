"""Bounds on what one peer may send; the same numbers guard both sides of the wire."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """Size limits applied while decoding untrusted bytes and validating arguments."""

    max_message_bytes: int = 16 * 1024 * 1024
    max_str_len: int = 4 * 1024 * 1024
    max_bin_len: int = 4 * 1024 * 1024
    max_array_len: int = 1024 * 1024
    max_map_len: int = 1024
    max_depth: int = 32
    max_tokens: int = 32768
    """Ceiling for a request's ``max_tokens``."""
    max_logprobs: int = 20
    max_stop_sequences: int = 16
    max_credit: int = 4096
    """Largest number of stream items a client may grant at once."""
    max_loras: int = 16
    """Most adapters in one stack."""


DEFAULT_LIMITS = Limits()
