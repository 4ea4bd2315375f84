"""Activated LoRAs (aLoRA): where in a prompt an adapter starts to apply.

An aLoRA (``adapter.alora.invocation_tokens`` in its GGUF) is trained to act only from its
invocation sequence on, so that the base model's KV cache for everything before it can be
reused: an agent can run several aLoRA "skills" over one long shared conversation without
recomputing it. lorad applies one from the last occurrence of its invocation tokens in the
prompt on, as llama-server does since llama.cpp PR #15327 (the invocation tokens included,
as PEFT's aLoRA does); the engine computes the tokens before under the rest of the stack
(:class:`lorad.daemon.batching.Step` ``pre_stack`` / ``split``) and tracks, per cached token,
the stack it was computed under, so prefixes are reused exactly when their stacks match.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lorad.protocol import ErrorCode, ProtocolError

if TYPE_CHECKING:
    from .actor import StackEntry


def check_aloras(stack: list[StackEntry]) -> None:
    """At most one activated LoRA in a stack: each would start at its own invocation, and
    llama.cpp applies one set of adapters to a token."""
    aloras = [e for e in stack if e.adapter.info.is_alora]
    if len(aloras) > 1:
        raise ProtocolError(
            ErrorCode.LORA_UNSUPPORTED,
            f"at most one activated LoRA (aLoRA) in a stack: this one has {len(aloras)} "
            f"({', '.join(e.ref for e in aloras)}); use one per request",
            path=str(aloras[1].adapter.path), reason="several_aloras")


def last_occurrence(tokens: list[int], pattern: list[int]) -> int | None:
    """Where the last occurrence of ``pattern`` in ``tokens`` starts, or None."""
    n = len(pattern)
    if n == 0:
        return None
    for start in range(len(tokens) - n, -1, -1):
        if tokens[start:start + n] == pattern:
            return start
    return None


def activation(stack: list[StackEntry], prompt: list[int]
               ) -> tuple[list[StackEntry], list[StackEntry] | None, int | None]:
    """How an activated LoRA in ``stack`` applies to ``prompt``: ``(stack from the split on,
    stack before it or None, split)``. The aLoRA applies from the last occurrence of its
    invocation tokens in the prompt on (and to everything generated); the tokens before are
    computed without it, so a cache of the base model (or of the rest of the stack) for them
    is reused. Without an invocation in the prompt, the aLoRA has no effect at all."""
    alora = next((e for e in stack if e.adapter.info.is_alora), None)
    if alora is None:
        return stack, None, None
    without = [e for e in stack if e is not alora]
    start = last_occurrence(prompt, alora.adapter.info.alora_invocation_tokens or [])
    if start is None:
        return without, None, None
    return stack, without, start
