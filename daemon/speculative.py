"""Speculative decoding: n-gram drafting from the prompt and the output (``prompt_lookup``).

The target model verifies a draft in one batch; with greedy decoding a draft token is kept while
it equals the target's own argmax, and the first disagreement is replaced by the target's token,
so the output is the target's own, token for token, whatever the draft depth. The depth adapts:
it halves after a step that accepted nothing and grows again while drafts are accepted; at
depth 0 a one-token draft is retried every ``PROBE_EVERY`` steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lorad.protocol import ErrorCode, ProtocolError

PROBE_EVERY = 8


def lookup_draft(history: list[int], ngram_min: int, ngram_max: int, n: int) -> list[int]:
    """Up to ``n`` tokens that followed the most recent earlier occurrence of the longest
    suffix n-gram of ``history`` (sizes ``ngram_max`` down to ``ngram_min``)."""
    if n <= 0:
        return []
    size = len(history)
    for g in range(min(ngram_max, size - 1), ngram_min - 1, -1):
        tail = history[size - g:]
        for start in range(size - g - 1, -1, -1):
            if history[start:start + g] == tail:
                follow = history[start + g:start + g + n]
                if follow:
                    return follow
    return []


@dataclass
class Drafter:
    """Per-request drafting state: parameters, adaptive depth and counters."""

    mode: str
    ngram_min: int
    ngram_max: int
    max_draft: int
    depth: int = 0
    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    history: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.depth = self.max_draft

    def draft(self, limit: int) -> list[int]:
        """The next draft, at most ``limit`` tokens (room left in max_tokens and n_ctx)."""
        self.steps += 1
        depth = self.depth or (1 if self.steps % PROBE_EVERY == 0 else 0)
        return lookup_draft(self.history, self.ngram_min, self.ngram_max, min(depth, limit))

    def record(self, drafted: int, accepted: int) -> None:
        self.drafted += drafted
        self.accepted += accepted
        if drafted == 0:
            return
        if accepted == 0:
            self.depth //= 2
        elif accepted == drafted:
            self.depth = min(self.max_draft, max(1, self.depth) * 2)
        else:
            self.depth = max(1, accepted)

    def metrics(self) -> dict[str, Any]:
        return {
            "speculative": True,
            "speculative_mode": self.mode,
            "drafted_tokens": self.drafted,
            "accepted_tokens": self.accepted,
            "acceptance_rate": round(self.accepted / self.drafted, 4) if self.drafted else None,
        }


OFF_METRICS = {"speculative": False, "speculative_mode": None, "drafted_tokens": 0,
               "accepted_tokens": 0, "acceptance_rate": None}


def drafter_for(spec: dict[str, Any] | bool | None, args: dict[str, Any],
                can_roll_back: bool) -> Drafter | None:
    """The request's drafter, or None when speculative decoding is off; raises
    ``speculative_unsupported`` for a combination it cannot run exactly."""
    if not spec:
        return None

    def refuse(reason: str, message: str) -> ProtocolError:
        return ProtocolError(ErrorCode.SPECULATIVE_UNSUPPORTED, f"speculative: {message}",
                             field="speculative", reason=reason, mode=spec["mode"])

    if args["temperature"] != 0:
        raise refuse("sampling_not_implemented",
                     "only greedy decoding (temperature 0) is verified exactly in this version; "
                     "pass speculative=False or temperature=0")
    if args["grammar"] is not None or args["repeat_penalty"] != 1.0:
        raise refuse("sampler_not_supported",
                     "grammar and repeat_penalty are not supported with speculative decoding")
    if not can_roll_back:
        raise refuse("no_rollback", "this model's memory (recurrent) cannot roll back rejected "
                     "draft tokens")
    return Drafter(spec["mode"], spec["ngram_min"], spec["ngram_max"], spec["max_draft"])
