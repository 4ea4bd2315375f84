"""What every context actor is, whatever its backend: a trio task that runs its context's
requests one at a time from a FIFO queue of ``max_queued`` places (``context_busy`` past it),
who may use the context, and how it is cancelled and closed.

A backend's actor (:class:`lorad.daemon.actor.ContextActor` for llama.cpp,
:class:`lorad.daemon.litert_actor.LitertActor` for LiteRT-LM) says how one request is
generated (``_generate``) and what closing frees (``_free``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from lorad.protocol import ErrorCode, ProtocolError
from lorad.protocol.args import OpArgs

from .errors import DaemonError, to_protocol
from .registry import LoadedModel
from .requests import RequestHandle
from .workers import CLIENT

if TYPE_CHECKING:
    from .actor import StackEntry
    from .adapters import LoadedAdapter


@dataclass
class Job:
    handle: RequestHandle
    args: OpArgs
    stack: list[StackEntry] | None = None
    """A per-request adapter stack (None: the context's own)."""
    held: list[LoadedAdapter] | None = None
    """References taken for ``stack``, released when the job ends."""


class Actor:
    """A context's queue, visibility and lifecycle; ``run`` is its task, ``submit`` queues
    work for it."""

    backend = "llama.cpp"

    def __init__(self, context_id: str, model: LoadedModel, *, n_ctx: int, max_queued: int,
                 persistent: bool, owner: bytes | None, params: dict[str, Any],
                 speculative: dict[str, Any] | bool | None = None) -> None:
        self.id = context_id
        self.model = model
        self.n_ctx = n_ctx
        self.creator: bytes | None = owner
        """The client that created it (None: the config file's); only it may use a private
        context."""
        self.shared = owner is None
        """Whether every client may use it (config contexts, and those created shared=True)."""
        self.persistent = persistent
        self.managed = False
        """Made by the HTTP door for its stateless requests: closed with its model when idle
        (``unload_model`` needs no ``force`` for it)."""
        self.owner = owner
        self.params = params
        self.speculative = speculative
        """The context's default for requests that do not choose (None/False: off)."""
        self.max_queued = max_queued
        self.stack: list[StackEntry] = []
        """The context's adapter stack, in order; requests without their own stack use it."""
        self.stack_lock = trio.Lock()
        """Serialises stack changes of this context (held by the server while it builds one)."""
        self.on_stack_change: Callable[[Actor], None] | None = None
        self.resolve_model: Callable[[str], Awaitable[LoadedModel]] | None = None
        """How a draft model named by id or path is found (set by the server)."""
        # Unbounded: submit counts the places itself (the running request's included, and
        # cancelled requests still queued take none: they end when they come up).
        self._send, self._recv = trio.open_memory_channel[Job](math.inf)
        self.queued: list[Job] = []
        self.current: Job | None = None
        self.closing = False
        self.stopped = trio.Event()
        self.closed = trio.Event()
        """Set once :meth:`close` has freed everything."""
        self.created_at = time.time()
        self.requests_done = 0

    # -- what a backend's actor says ------------------------------------------------------------
    async def _generate(self, job: Job) -> None:
        raise NotImplementedError

    async def _free(self) -> None:
        """Free what the context holds (its task has ended, or never started)."""

    async def _release(self, adapters: list[LoadedAdapter]) -> None:
        """Let go of a job's adapters."""

    # -- queue --------------------------------------------------------------------------------
    def submit(self, handle: RequestHandle, args: OpArgs,
               stack: list[StackEntry] | None = None,
               held: list[LoadedAdapter] | None = None) -> None:
        """Queue a generation; the job owns ``held`` (released when it ends) once queued."""
        if self.closing:
            raise ProtocolError(ErrorCode.NOT_FOUND, f"context {self.id!r} is closing",
                                context=self.id)
        job = Job(handle, args, stack, held)
        try:
            waiting = sum(1 for j in self.queued if not j.handle.cancelled)
            if (waiting + (self.current is not None) > self.max_queued  # cancelled: no place
                    or len(self.queued) >= 4 * (self.max_queued + 1)):  # ... up to a point
                raise trio.WouldBlock
            self._send.send_nowait(job)
        except trio.WouldBlock:
            raise ProtocolError(
                ErrorCode.CONTEXT_BUSY,
                f"context {self.id!r} is busy and its queue is full",
                context=self.id, queued=len(self.queued), max_queued=self.max_queued,
            ) from None
        self.queued.append(job)

    async def run(self) -> None:
        CLIENT.set(None)  # its prompts are the context's own work, capped by its queue
        try:
            async for job in self._recv:
                self.queued.remove(job)
                if job.handle.cancelled or self.closing:
                    self._end_cancelled(job.handle)
                    await self._release(job.held or [])
                    continue
                self.current = job
                try:
                    await self._generate(job)
                except (ProtocolError, DaemonError) as exc:
                    job.handle.send_error(to_protocol(exc))
                except Exception as exc:  # a fault in one request must not end the actor
                    job.handle.send_error(ProtocolError(
                        ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}", context=self.id
                    ))
                finally:
                    self.current = None
                    self.requests_done += 1
                    await self._release(job.held or [])
        finally:
            self.stopped.set()

    def _end_cancelled(self, handle: RequestHandle) -> None:
        handle.send_end({"finish_reason": "cancelled", "metrics": {"generated_tokens": 0}})

    # -- lifecycle ----------------------------------------------------------------------------
    async def close(self) -> None:
        """Cancel what is queued and running, stop the task, free the context."""
        self.closing = True
        self.cancel_all()
        self._send.close()
        await self.stopped.wait()
        with trio.CancelScope(shield=True):
            try:
                await self._free()
            finally:
                self.closed.set()

    async def dispose(self) -> None:
        """Free a context whose task never started (its creation failed)."""
        with trio.CancelScope(shield=True):
            await self._free()

    def cancel_all(self) -> None:
        for job in list(self.queued):
            job.handle.cancel()
        if self.current is not None:
            self.current.handle.cancel()

    @property
    def state(self) -> str:
        if self.closing:
            return "closing"
        return "busy" if self.current is not None else "idle"

    @property
    def idle(self) -> bool:
        """Nothing running and nothing queued."""
        return self.current is None and not self.queued

    def info(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "model": self.model.id,
            "backend": self.backend,
            "n_ctx": self.n_ctx,
            "state": self.state,
            "queued": len(self.queued),
            "max_queued": self.max_queued,
            "running": self.current.handle.rid if self.current else None,
            "persistent": self.persistent,
            "shared": self.shared,
            "requests_done": self.requests_done,
            "loras": [e.to_wire() for e in self.stack],
            "params": self.params,
        }
