"""One generation's output, sans-IO (vLLM's output processor): sampled tokens in, stream items
out; it detokenizes, applies stop sequences, holds back what may be a tool call and says why
the generation ended.

The actor feeds it each sampled token (:meth:`Output.token`) and sends the items it returns;
the engine decides the rest of a generation's end (``max_tokens``, a full context, a cancel).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .text import TextAssembler
from .tools import StreamSplitter

Scored = tuple[list[list[float]], float] | None
"""A token's log-probabilities: the top candidates ``[[token, logprob], ...]`` and its own."""


class Output:
    """See the module. ``piece``: a token's bytes; ``is_eog``: whether it ends generation;
    ``splitter``: a chat with tools (its calls are held back and parsed at the end)."""

    def __init__(self, piece: Callable[[int], bytes], is_eog: Callable[[int], bool],
                 stop: list[str], splitter: StreamSplitter | None = None, *,
                 received_at: float | None = None, started: float | None = None,
                 token_ids: bool = True) -> None:
        now = time.perf_counter()
        self.received_at = now if received_at is None else received_at
        """When the request arrived (its metrics count from there)."""
        self.started = now if started is None else started
        """When its work began (after its time in the queue)."""
        self.prompted: float | None = None
        """When the prompt was evaluated (:meth:`prompt_done`)."""
        self.first: float | None = None
        """When the first token was sampled."""
        self.piece = piece
        self.is_eog = is_eog
        self.text = TextAssembler(stop)
        self.splitter = splitter
        self.generated = 0
        """Tokens sampled, the one that ended the generation included."""
        self.tokens: list[int] = []
        """The tokens of the output (not the end-of-generation token)."""
        self.finish: str | None = None
        """``stop`` once an end-of-generation token or a stop sequence ended it; ``tool_calls``
        after :meth:`close` when the output held calls."""
        self.calls: list[dict[str, Any]] = []
        self.token_ids = token_ids
        """Whether items carry their token ids (False: a backend that streams text, whose
        ``token`` arguments are indexes of its pieces)."""

    def token(self, token: int, scored: Scored = None) -> dict[str, Any] | None:
        """Take one sampled token; its stream item, or None for an end-of-generation token
        (which ends the generation: ``finish`` is ``stop``). After an item, ``finish`` says
        whether a stop sequence ended the generation with it."""
        self.generated += 1
        if self.first is None:
            self.first = time.perf_counter()
        if self.is_eog(token):
            self.finish = "stop"
            return None
        self.tokens.append(token)
        delta = self.text.feed(self.piece(token))
        if self.splitter is not None:  # a tool call's text is held for the end
            delta = self.splitter.feed(delta)
        item: dict[str, Any] = {"text": delta, "token_ids": [token] if self.token_ids else []}
        if scored is not None:
            item["logprobs"] = [scored[0]]
            item["token_logprobs"] = [scored[1]]
        if self.text.stopped:
            self.finish = "stop"
        return item

    def prompt_done(self) -> None:
        """The prompt is evaluated: generation time counts from now."""
        self.prompted = time.perf_counter()

    def stats(self, prompt_tokens: int, cached: int) -> dict[str, Any]:
        """The end metrics of counts and times (``cached``: prompt tokens reused)."""
        ended = time.perf_counter()
        prompted = self.prompted or ended
        prompt_s, gen_s = prompted - self.started, ended - prompted
        return {
            "prompt_tokens": prompt_tokens,
            "cached_prompt_tokens": cached,
            "generated_tokens": self.generated,
            "queue_ms": round((self.started - self.received_at) * 1000, 3),
            "time_to_first_token_ms": round(((self.first or ended) - self.received_at) * 1000,
                                            3),
            "prompt_tokens_per_s": (round((prompt_tokens - cached) / prompt_s, 2)
                                    if prompt_s > 0 else None),
            "generation_tokens_per_s": (round(self.generated / gen_s, 2) if gen_s > 0
                                        else None),
            "total_ms": round((ended - self.received_at) * 1000, 3),
        }

    def close(self) -> dict[str, Any] | None:
        """The generation ended (not cancelled): the last item, with the text held back
        (None: nothing held); with tools, the calls are parsed (``calls``, and ``finish`` is
        ``tool_calls`` when there are any)."""
        tail = self.text.finish()
        if self.splitter is not None:
            shown = self.splitter.feed(tail)
            parsed = self.splitter.finish()
            tail, self.calls = shown + parsed.content, parsed.calls
            if self.calls:
                self.finish = "tool_calls"
        return {"text": tail, "token_ids": []} if tail else None
