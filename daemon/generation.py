"""A generation as the engine core runs it: what a request asks of the scheduler, and what each
of its steps gives back (vLLM v1's request and its outputs, without sockets).

The actor builds a :class:`Generation` (its sequence, prompt, adapter stack, sampling and
drafting) and asks the scheduler for its steps one at a time
(:meth:`lorad.daemon.batching.SlabScheduler.next`). The scheduler builds each step (the prompt,
then the last token and a draft), decodes it in a batch with the other sequences' steps,
samples or verifies on the logits in place, feeds the drafter and checks the limits; each step
comes back as a :class:`StepOutput`. What the actor does with outputs (text, stop sequences,
credit, replies) is its own: it asks for the next step only once it has sent the last one's
tokens, so that nothing is decoded past a stop sequence or a client that stopped reading.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import trio

from . import llama
from .ngrams import Memory
from .sampling import Pick, Produced, Verify
from .speculative import Drafter

StackPairs = list[tuple[llama.Adapter, float]]
"""An adapter stack as llama.cpp applies it: each adapter with its scale."""

INLINE_INDEX = 6000
"""n-gram index entries (tokens times sizes, about 1 ms) built on the event loop; more go to a
thread."""


@dataclass(eq=False)
class Generation:
    """One request's generation on a sequence (see the module)."""

    seq: llama.Sequence
    prompt: list[int]
    stack: StackPairs
    """The adapter stack its tokens are computed under (from ``split`` on, for a prompt)."""
    sampler: llama.Sampler
    max_tokens: int
    plain_greedy: bool = False
    """Greedy with no grammar or penalty: the row's argmax, without a sampler call."""
    params: llama.SamplingParams | None = None
    """What speculative verification samples with (None: greedy)."""
    rng: np.random.Generator = field(default_factory=np.random.default_rng)
    n_logprobs: int = 0
    chunk: int = 1 << 30
    """The most prompt tokens one step decodes (the context's ``n_batch``)."""
    pre_stack: StackPairs | None = None
    """An activated LoRA's prompt: the stack of its tokens before ``split``."""
    split: int = 0
    drafter: Drafter | None = None
    memory: Memory | None = None
    """The context's earlier outputs, which n-gram drafts also draw on."""
    should_stop: Callable[[], bool] = lambda: False
    """Whether the request was cancelled (read between steps and between a prompt's chunks)."""
    client: object = None
    """Whose request it is (the context's creator; None: the context's own): what a client's
    new requests may add to other clients' streams is shared out by client."""
    # -- the engine's state
    started: bool = False
    reused: int = 0
    """Prompt tokens whose cached cells were reused."""
    generated: int = 0
    last: int | None = None
    """The last token produced: the next step decodes it."""

    def __post_init__(self) -> None:
        self.pick = Pick(self.sampler, self.plain_greedy, self.n_logprobs)

    def verify(self, draft: list[int], qs: list[np.ndarray] | None) -> Verify:
        """What checks ``draft`` (decoded after the last token) against the target's rows."""
        return Verify(self.seq, draft, qs, self.params, self.rng, self.n_logprobs)

    def room(self, budget: int) -> int:
        """The most draft tokens the next step may carry: it leaves room in ``max_tokens``,
        the context and the step's token ``budget`` for the token after them."""
        return min(self.max_tokens - self.generated, self.seq.n_ctx - len(self.seq.tokens),
                   budget) - 1

    def at_limit(self) -> bool:
        """Whether no further token fits ``max_tokens`` or the context."""
        return self.generated >= self.max_tokens or len(self.seq.tokens) >= self.seq.n_ctx


@dataclass(frozen=True)
class StepOutput:
    """What one step of a generation gave: its tokens, each with its log-probabilities (or
    None), and why the generation cannot go on (None: it can)."""

    tokens: Produced
    end: str | None = None
    """``length``: no further token fits ``max_tokens`` or the context; ``cancelled``: the
    request was cancelled (its tokens, if any, are not to be sent)."""


async def start_drafting(drafter: Drafter, prompt: list[int], memory: Memory | None) -> None:
    """Give ``drafter`` the prompt and, for n-gram drafts, the context's memory, both indexed
    (in a thread where that is more than about a millisecond of work)."""
    if drafter.source is not None:
        drafter.start(prompt)  # a draft model's: nothing to index
        return
    sizes = drafter.sizes

    def start() -> None:
        drafter.start(prompt)
        drafter.memory = memory.index(sizes) if memory is not None and len(memory) else None

    pending = memory.pending(sizes) if memory is not None else 0
    if len(prompt) * len(sizes) + pending > INLINE_INDEX:
        await trio.to_thread.run_sync(start)
    else:
        start()
