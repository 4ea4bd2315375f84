"""Worker threads by kind of work, so that one kind never waits behind another.

trio runs every ``to_thread.run_sync`` call under one default limiter (40 threads) unless told
otherwise: a flood of slow adapter parses could take every place and hold a decode step back.
Here each kind has its own limiter:

* **decode**: a slab's decode steps (one thread each; a slab decodes one step at a time);
* **files**: slow file work (reading, parsing and converting adapter and PEFT files), a few
  threads (``limits.file_workers``), and at most ``limits.max_file_ops_per_client`` calls of
  one client under way at once: past that its request gets ``too_large`` at once;
* **text**: tokenization and detokenization (``limits.text_workers`` threads; a client's
  ``tokenize``/``detokenize`` calls are capped by ``limits.max_text_ops_per_client``, a
  prompt's tokenization in its context's actor is not);
* everything else (model loads, context creation) keeps trio's default limiter.

The client a file call is made for is the task's :data:`CLIENT` (set by the dispatcher for the
request it runs), so the adapter code below the handlers needs no peer argument.
"""

from __future__ import annotations

import contextvars
import os
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar

import trio

from lorad.protocol import ErrorCode, Limits, ProtocolError

T = TypeVar("T")

CLIENT: contextvars.ContextVar[bytes | None] = contextvars.ContextVar("lorad_client",
                                                                       default=None)
"""The client (transport peer id) whose request the current task runs; None: the daemon's own
work (the config file's contexts), which no per-client cap applies to."""


class Pool:
    """Threads for one kind of work, with a per-client cap on calls under way."""

    def __init__(self, kind: str, threads: int, per_client: int, limit: str) -> None:
        self.kind = kind
        self.limiter = trio.CapacityLimiter(max(1, threads))
        self.per_client = per_client
        self.limit = limit
        """The name of the per-client limit (what a refusal names)."""
        self.running: Counter[bytes] = Counter()
        self.refused = 0

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in one of the pool's threads, counted against the current client's
        cap (``too_large`` past it)."""
        client = CLIENT.get()
        if client is not None and self.running[client] >= self.per_client:
            self.refused += 1
            raise ProtocolError(
                ErrorCode.TOO_LARGE, f"this client already has {self.running[client]} slow "
                f"{self.kind} operations under way (limits.{self.limit}); retry when one ends",
                limit=self.limit, value=self.per_client)
        if client is not None:
            self.running[client] += 1
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)
        finally:
            if client is not None:
                self.running[client] -= 1
                if not self.running[client]:
                    del self.running[client]

    def info(self) -> dict[str, Any]:
        return {"threads": self.limiter.total_tokens, "busy": self.limiter.borrowed_tokens,
                "waiting": self.limiter.statistics().tasks_waiting,
                "per_client": self.per_client, "refused": self.refused}


class FileWorkers(Pool):
    """The pool for slow file work: reading, parsing and converting adapter and PEFT files."""

    def __init__(self, limits: Limits) -> None:
        super().__init__("file", limits.file_workers, limits.max_file_ops_per_client,
                         "max_file_ops_per_client")


class TextWorkers(Pool):
    """The pool for tokenizing and detokenizing: a client's ``tokenize``/``detokenize`` (capped
    per client) and every prompt's tokenization (the context's own work: not capped)."""

    def __init__(self, limits: Limits) -> None:
        super().__init__("text", limits.text_workers, limits.max_text_ops_per_client,
                         "max_text_ops_per_client")


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


DECODE = trio.CapacityLimiter(1024)
"""Decode steps: one thread per slab stepping, never shared with other work (slabs are bounded
by ``limits.max_contexts``, so this limit is never what holds a step back)."""
