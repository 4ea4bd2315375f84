"""Worker threads by kind of work, so that one kind never waits behind another.

trio runs every ``to_thread.run_sync`` call under one default limiter (40 threads) unless told
otherwise: a flood of slow adapter parses could take every place and hold a decode step back.
Here each kind has a limiter of its own:

* **decode**: the decode steps of a model's slabs, on one thread of the model's own
  (:class:`~lorad.daemon.batching.Cores`): llama.cpp runs a step on an OpenMP team that
  belongs to the calling thread, and steps from trio's changing threads (a team each, all
  spinning) were up to 35 % slower on a daemon that had served a while than on one just
  started;
* **files**: slow file work (reading, parsing and converting adapter and PEFT files), a few
  threads (``limits.file_workers``), and at most ``limits.max_file_ops_per_client`` calls of
  one client under way at once: past that its request gets ``too_large`` at once; while a
  step decodes, each call starts within the event loop's share of it and its time is counted
  there (:mod:`lorad.daemon.ingress`: its Python competes with the decode all the same);
* **text**: tokenization and detokenization (``limits.text_workers`` threads; a client's
  ``tokenize``/``detokenize`` calls are capped by ``limits.max_text_ops_per_client``, a
  prompt's tokenization in its context's actor is not);
* **build**: making models and llama contexts (loads, slabs, draft and embedding contexts:
  allocating and clearing gigabytes of KV cache takes a second), :data:`BUILD`.

Build and text have threads of their own at a lower priority (nice +:data:`NICE`): where the
cores are short, a decode step goes first and a model or context being made, or a prompt being
tokenized, takes what is left (with llama.cpp's threads pinned, :mod:`lorad.daemon.affinity`,
that is little: a 2.25 GiB context took 35 s to make beside a stream at +10, 7.5 s at +5 with
the stream's p99 at 1.36x quiet, 5 s at +0 with it at 1.50x). Both run in C without the GIL
(a tokenization holds it only to encode the text and to list at most its ``limit`` tokens);
a 300 KB prompt over the HTTP door took 0.8 s of C at the daemon's priority, and another
client's stream then waited up to 1.3 s between two tokens (``bench/noisy.py``). Files run
on trio's threads at the daemon's priority: their parsing is Python code that holds the GIL
(see :class:`Pool`); on threads of their own, under a flood of validations, a stream stalled
for over a second (before the doors' ingress gate, :mod:`lorad.daemon.ingress`: the event
loop's work preempted llama.cpp's threads; not tried again since). Text threads of their own
were taken back once, when the ZeroMQ fuzz's leak check failed with them: that was glibc's
heap keeping what threads freed once its mmap threshold had risen (:mod:`lorad.daemon.heap`).

The client a file call is made for is the task's :data:`CLIENT` (set by the dispatcher for the
request it runs), so the adapter code below the handlers needs no peer argument.
"""

from __future__ import annotations

import contextvars
import math
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import trio

from lorad.protocol import ErrorCode, Limits, ProtocolError

T = TypeVar("T")

NICE = 5
"""How much lower than the daemon's the priority of slow work's threads is."""

CLIENT: contextvars.ContextVar[bytes | None] = contextvars.ContextVar("lorad_client",
                                                                       default=None)
"""The client (transport peer id) whose request the current task runs; None: the daemon's own
work (the config file's contexts), which no per-client cap applies to."""


def _lower_priority() -> None:
    """Run this thread at nice +``NICE`` (Linux: a thread's own priority, by its id)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(),
                       min(19, os.getpriority(os.PRIO_PROCESS, 0) + NICE))
    except (AttributeError, OSError):  # not Linux, or not allowed: the default priority
        pass


_HELD = trio.CapacityLimiter(math.inf)
"""For a call that already holds its pool's limiter (trio's threads need one to be named)."""


class Pool:
    """Threads for one kind of work (trio's, under a limiter of the pool's own), with a
    per-client cap on calls under way (None: no cap); with ``nice``, threads of its own at a
    lower priority (only for work that runs in C without the GIL: a low-priority thread that
    holds the GIL while the cores are short is descheduled with it, and every other thread of
    the daemon waits)."""

    def __init__(self, kind: str, threads: int, per_client: int | None = None,
                 limit: str = "", *, nice: bool = False, own: bool = False,
                 gate: Any = None) -> None:
        """``own``: threads of its own at the daemon's priority (``nice`` implies them).
        ``gate`` (an :class:`~lorad.daemon.ingress.Ingress`): each call waits for it before
        it starts, and its time is charged to it."""
        self.gate = gate
        self.kind = kind
        self.threads = max(1, threads)
        self._executor = (ThreadPoolExecutor(self.threads, thread_name_prefix=f"lorad-{kind}",
                                             initializer=_lower_priority if nice else None)
                          if nice or own else None)
        self._limiter = trio.CapacityLimiter(self.threads)
        self.per_client = per_client
        self.limit = limit
        """The name of the per-client limit (what a refusal names)."""
        self.running: Counter[bytes] = Counter()
        self.busy = 0
        self.queued = 0
        self.refused = 0
        self._counts = threading.Lock()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in one of the pool's threads, counted against the current client's
        cap (``too_large`` past it). Like ``trio.to_thread.run_sync``, it is not cancelled
        once submitted: the caller waits for the thread."""
        client = CLIENT.get() if self.per_client is not None else None
        if client is not None and self.running[client] >= self.per_client:
            self.refused += 1
            raise ProtocolError(
                ErrorCode.TOO_LARGE, f"this client already has {self.running[client]} slow "
                f"{self.kind} operations under way (limits.{self.limit}); retry when one ends",
                limit=self.limit, value=self.per_client)
        if client is not None:
            self.running[client] += 1
        try:
            if self._executor is None:  # trio's threads, under a limiter of the pool's own
                async with self._limiter:
                    if self.gate is not None:
                        await self.gate.admit()
                    return await trio.to_thread.run_sync(self._counted(fn, args, queued=False),
                                                         limiter=_HELD)
            return await self._on_own_threads(fn, args)
        finally:
            if client is not None:
                self.running[client] -= 1
                if not self.running[client]:
                    del self.running[client]

    async def _on_own_threads(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()

        def finished(_future: Future) -> None:
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:  # the daemon stopped meanwhile
                pass

        with self._counts:
            self.queued += 1
        assert self._executor is not None
        future = self._executor.submit(self._counted(fn, args))
        future.add_done_callback(finished)
        with trio.CancelScope(shield=True):
            await done.wait()
        return future.result()

    def _counted(self, fn: Callable[..., T], args: tuple[Any, ...],
                 queued: bool = True) -> Callable[[], T]:
        def work() -> T:
            with self._counts:
                self.busy += 1
                self.queued -= queued
            started = time.perf_counter()
            try:
                return fn(*args)
            finally:
                if self.gate is not None:
                    self.gate.charge(time.perf_counter() - started)
                with self._counts:
                    self.busy -= 1

        return work

    def close(self) -> None:
        """Let the pool's own threads end once their work is done (trio's need nothing)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False)

    def info(self) -> dict[str, Any]:
        waiting = (self.queued if self._executor is not None
                   else self._limiter.statistics().tasks_waiting)
        return {"threads": self.threads, "busy": self.busy, "waiting": waiting,
                "per_client": self.per_client, "refused": self.refused}


class FileWorkers(Pool):
    """The pool for slow file work: reading, parsing and converting adapter and PEFT files."""

    def __init__(self, limits: Limits, gate: Any = None) -> None:
        super().__init__("file", limits.file_workers, limits.max_file_ops_per_client,
                         "max_file_ops_per_client", gate=gate)


class TextWorkers(Pool):
    """The pool for tokenizing and detokenizing: a client's ``tokenize``/``detokenize`` (capped
    per client) and every prompt's tokenization (the context's own work: not capped), on
    threads of its own at nice +:data:`NICE` (see the module)."""

    def __init__(self, limits: Limits) -> None:
        super().__init__("text", limits.text_workers, limits.max_text_ops_per_client,
                         "max_text_ops_per_client", nice=True)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


BUILD = Pool("build", 2, nice=True)
"""Models and llama contexts are made here (see the module)."""

DECODE = trio.CapacityLimiter(1024)
"""Moving sequences into a widened slab (trio's threads; decode steps have a model's thread,
see :class:`~lorad.daemon.batching.Cores`)."""
