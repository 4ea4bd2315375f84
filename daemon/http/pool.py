"""Engine-managed contexts for stateless HTTP requests: a few per model, reused by prefix.

An OpenAI request names no context, so the door keeps up to ``size`` contexts per model (made
on demand, private to the door, batched by the engine like any other) and picks one per
request: an idle one that last ran the same adapter stack with the longest common prompt prefix
(its KV cache is reused; the actor never reuses cells computed under another stack), else a new
one while there is room, else the idle one unused longest, else the least loaded (its queue
answers ``context_busy`` when full). A model's contexts go when it is unloaded.
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass

import trio

from lorad.protocol import ErrorCode, ProtocolError
from lorad.protocol.args import parse_args

from ..actor import ContextActor
from ..engine import Engine
from ..registry import LoadedModel

OWNER = b"\x00lorad-http"
"""The creator of the door's contexts: no ZeroMQ peer sees them (``shared`` is false)."""


@dataclass
class _Use:
    stack: tuple[tuple[str, float], ...]
    prompt: str
    at: float


KEY_CHARS = 1 << 16
"""Prompt characters kept per context for choosing by prefix (bounds memory and time)."""


def _common_prefix(a: str, b: str) -> int:
    """Length of the common prefix, by bisection on slice comparisons (done in C)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class ContextPool:
    """The door's contexts, per model (see the module)."""

    def __init__(self, engine: Engine, *, size: int, n_ctx: int, max_queued: int) -> None:
        self.engine = engine
        self.size = size
        self.n_ctx = n_ctx
        self.max_queued = max_queued
        self._contexts: dict[str, list[ContextActor]] = {}
        self._last: dict[str, _Use] = {}
        self._locks: dict[str, trio.Lock] = {}
        self._reserved: dict[str, int] = {}
        """Requests chosen a context but not queued on it yet (it is not idle meanwhile)."""

    def contexts(self, entry: LoadedModel) -> list[ContextActor]:
        live = [a for a in self._contexts.get(entry.id, [])
                if self.engine.contexts.get(a.id) is a and not a.closing
                and a.model is entry]
        for gone in set(a.id for a in self._contexts.get(entry.id, [])) - {a.id for a in live}:
            self._last.pop(gone, None)
        self._contexts[entry.id] = live
        return live

    def _idle(self, actor: ContextActor) -> bool:
        return actor.idle and not self._reserved.get(actor.id)

    def release(self, actor: ContextActor) -> None:
        """The request that chose ``actor`` is queued on it (or failed)."""
        n = self._reserved.get(actor.id, 0) - 1
        if n > 0:
            self._reserved[actor.id] = n
        else:
            self._reserved.pop(actor.id, None)

    async def choose(self, entry: LoadedModel, stack: tuple[tuple[str, float], ...],
                     prompt: str) -> ContextActor:
        """The context this request runs on (see the module); call :meth:`release` once the
        request is queued on it or has failed."""
        prompt = prompt[:KEY_CHARS]
        lock = self._locks.setdefault(entry.id, trio.Lock())
        async with lock:
            contexts = self.contexts(entry)
            idle = [a for a in contexts if self._idle(a)]
            same = [a for a in idle if a.id in self._last and self._last[a.id].stack == stack]
            if same:
                actor = max(same, key=lambda a: (_common_prefix(self._last[a.id].prompt, prompt),
                                                 -self._last[a.id].at))
            elif len(contexts) < self.size and len(self.engine.contexts) < (
                    self.engine.limits.max_contexts):
                actor = await self._create(entry)
                contexts.append(actor)
            elif idle:
                actor = min(idle, key=lambda a: self._last[a.id].at if a.id in self._last else 0)
            elif not contexts:
                raise ProtocolError(ErrorCode.CONTEXT_BUSY, "no context for this request: the "
                                    "daemon has limits.max_contexts contexts already",
                                    limit="max_contexts", value=self.engine.limits.max_contexts)
            else:
                actor = min(contexts, key=lambda a: len(a.queued) + (a.current is not None)
                            + self._reserved.get(a.id, 0))
            self._last[actor.id] = _Use(stack, prompt, time.monotonic())
            self._reserved[actor.id] = self._reserved.get(actor.id, 0) + 1
            return actor

    async def _create(self, entry: LoadedModel) -> ContextActor:
        args = parse_args("create_context", {
            "model": entry.id, "n_ctx": self.n_ctx, "max_queued": self.max_queued,
            "persistent": True, "n_threads": os.cpu_count() or 1}, self.engine.limits)
        actor = await self.engine.create_context(args, creator=OWNER,
                                                 context_id=f"http-{secrets.token_hex(4)}")
        actor.managed = True
        return actor
