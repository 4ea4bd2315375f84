"""What a decoding step does with its logits, as values the scheduler runs in the decode thread.

A generation's step carries one of these (``Step.logits``, made by the scheduler from the
:class:`~lorad.daemon.generation.Generation`): :class:`Pick` samples the next token from a row,
:class:`Verify` checks a speculative draft against its rows and rolls the rejected tokens back
out of the sequence's cells (on the decode thread, the one that owns the slab's memory). Each
returns the step's output, ``[(token, scored), ...]``; the scheduler does the drafter's
bookkeeping with it, and the actor turns it into items, in its own task.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import llama
from .output import Scored
from .speculative import verify

Produced = list[tuple[int, Scored]]
"""A step's output: the tokens it produced, each with its log-probabilities (or None)."""


def scored(logits: np.ndarray, token: int, n_logprobs: int) -> tuple[int, Scored]:
    """``token`` with its log-probabilities and the top ``n_logprobs`` (none when 0)."""
    if not n_logprobs:
        return token, None
    *top, (_, chosen) = llama.top_logprobs(logits, n_logprobs, token)
    return token, (top, chosen)


@dataclass(frozen=True)
class Pick:
    """Sample the next token from the step's row."""

    sampler: llama.Sampler
    plain_greedy: bool
    """Greedy with no grammar or penalty: the row's argmax, without a sampler call."""
    n_logprobs: int = 0

    def __call__(self, slab: llama.Slab, i: int) -> Produced:
        logits = slab.logits(i)  # in place: no copy of the row
        token = int(logits.argmax()) if self.plain_greedy else self.sampler.sample(slab, i)
        return [scored(logits, token, self.n_logprobs)]


@dataclass(frozen=True)
class Verify:
    """Verify ``draft`` (decoded after the previous token) against the target's rows: the
    accepted draft tokens and one more; the rejected ones leave the sequence's cells."""

    seq: llama.Sequence
    draft: list[int]
    qs: list[np.ndarray] | None
    """The draft's distributions (None: deterministic drafts, n-gram lookup)."""
    params: llama.SamplingParams | None
    """None: greedy."""
    rng: np.random.Generator
    n_logprobs: int = 0

    def __call__(self, slab: llama.Slab, i: int) -> Produced:
        rows = [slab.logits(i + k) for k in range(len(self.draft) + 1)]
        tokens = verify(rows, self.draft, self.qs, self.params, self.rng)
        accepted = len(tokens) - 1
        self.seq.rollback(len(self.seq.tokens) - len(self.draft) + accepted)
        return [scored(rows[k], t, self.n_logprobs) for k, t in enumerate(tokens)]
