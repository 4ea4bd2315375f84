"""The trio client, mirroring :mod:`lorad.client.sync`. Use it as ``async with AsyncClient()``.

A thin shell like the sync one: the logic is in :mod:`.core` and :mod:`.calls`; this module
moves frames between them and an :class:`AsyncTransport` whose ``run`` task lives in the
client's nursery.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AsyncExitStack
from typing import Any

import trio

from lorad.protocol import Reply, RequestId
from lorad.protocol.endpoint import default_endpoint

from . import calls
from .calls import Call, LoraItem
from .core import (
    CONNECT_TIMEOUT,
    DEFAULT_TIMEOUT,
    LOAD_TIMEOUT,
    PENDING,
    Chunk,
    ClientCore,
    ContextView,
    CurveKeys,
    Incoming,
    ProgressState,
    StreamState,
    StreamView,
    check_result,
)
from .transport import AsyncTransport

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup


class AsyncClient:
    """A trio connection to a lorad daemon; methods mirror :class:`lorad.client.Client`."""

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        load_timeout: float = LOAD_TIMEOUT,
        connect_timeout: float = CONNECT_TIMEOUT,
        curve: CurveKeys | None = None,
        transport: AsyncTransport | None = None,
    ) -> None:
        self.endpoint = endpoint or default_endpoint()
        self.timeout = timeout
        self.load_timeout = load_timeout
        self.connect_timeout = connect_timeout
        self.curve = curve if curve is not None else CurveKeys.from_env()
        self._core = ClientCore(self.endpoint)
        self._transport = transport
        self._waiters: dict[RequestId, trio.Event] = {}
        self._exit: AsyncExitStack | None = None

    async def __aenter__(self) -> AsyncClient:
        if self._transport is None:
            from .zmqtrio import TrioZmqTransport

            self._transport = TrioZmqTransport(self.endpoint, self.curve)
        async with AsyncExitStack() as stack:
            stack.callback(self._transport.close)  # runs last: after the nursery is done
            nursery = await stack.enter_async_context(trio.open_nursery())
            stack.callback(nursery.cancel_scope.cancel)  # runs first: stops the transport
            nursery.start_soon(self._transport.run, self._deliver)
            self._exit = stack.pop_all()
        return self

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        stack, self._exit = self._exit, None
        assert stack is not None
        try:
            return bool(await stack.__aexit__(exc_type, exc, tb))
        except BaseExceptionGroup as group:
            # The nursery wraps the body's exception in a group (strict exception groups):
            # when the group holds nothing else, the body's exception goes on unchanged.
            if exc is not None:
                matched, rest = group.split(lambda e: e is exc)
                if matched is not None and rest is None:
                    return False
            raise

    # -- moving frames ----------------------------------------------------------------------------
    def _deliver(self, event: Incoming) -> None:
        for rid in self._core.feed(event):
            waiter = self._waiters.get(rid)
            if waiter is not None:
                waiter.set()

    async def _send(self, frames: list[bytes]) -> None:
        assert self._transport is not None, "use `async with AsyncClient(...)`"
        if not await self._transport.send(frames, self.connect_timeout):
            raise self._core.unavailable_error()

    async def _start(self, op: str, args: dict[str, Any]) -> RequestId:
        rid, frames = self._core.start(op, args)
        try:
            await self._send(frames)
        except BaseException:
            self._core.forget(rid)
            raise
        return rid

    async def _next_reply(self, rid: RequestId, timeout: float) -> Reply:
        reply = self._core.next_reply(rid)
        if reply is not None:
            await trio.lowlevel.checkpoint()
            return reply
        try:
            with trio.move_on_after(timeout):
                while reply is None:
                    waiter = self._waiters[rid] = trio.Event()
                    await waiter.wait()
                    reply = self._core.next_reply(rid)
                return reply
        finally:
            self._waiters.pop(rid, None)
        raise self._core.timeout_error(rid, timeout)

    async def _call(
        self, op: str, args: dict[str, Any] | None = None, timeout: float | None = None
    ) -> Any:
        rid = await self._start(op, args or {})
        try:
            reply = await self._next_reply(rid, self.timeout if timeout is None else timeout)
        finally:
            self._core.forget(rid)
        return check_result(reply)

    async def _run(self, call: Call) -> Any:
        timeout = call.timeout_for(self.timeout, self.load_timeout)
        return call.pick(await self._call(call.op, call.args, timeout))

    def _cancel_nowait(self, rid: RequestId) -> None:
        if self._transport is not None:  # not connected: the daemon cancels by itself
            self._transport.send_nowait(self._core.cancel(rid))

    # -- public API (mirrors Client) ------------------------------------------------------------
    async def ping(self, timeout: float | None = None) -> dict[str, Any]:
        return await self._run(calls.simple("ping", timeout))

    async def status(self) -> dict[str, Any]:
        return await self._run(calls.simple("status"))

    async def metrics(self) -> dict[str, Any]:
        """Counters and latency summaries: ``total``, per ``models`` and per ``contexts``."""
        return await self._run(calls.simple("metrics"))

    async def capabilities(self) -> dict[str, Any]:
        return await self._run(calls.simple("capabilities"))

    async def load_model(self, path: str | os.PathLike, *,
                         progress: Callable[[float], None] | None = None,
                         **params: Any) -> dict[str, Any]:
        """Load (or reuse) a model (see Client.load_model)."""
        if progress is None:
            return await self._run(calls.load_model(path, params))
        call = calls.load_model(path, params, progress=True)
        rid = await self._start(call.op, call.args)
        try:
            state, info = ProgressState(rid, progress), PENDING
            while info is PENDING:
                info = state.apply(await self._next_reply(rid, self.load_timeout))
            return info
        finally:
            self._core.forget(rid)

    async def unload_model(self, model: str | dict, *, force: bool = False) -> dict[str, Any]:
        return await self._run(calls.unload_model(model, force))

    async def list_models(self) -> list[dict[str, Any]]:
        return await self._run(calls.simple("list_models"))

    async def list_contexts(self) -> list[dict[str, Any]]:
        return await self._run(calls.simple("list_contexts"))

    async def create_context(self, model: str | os.PathLike | dict, **params: Any) -> AsyncContext:
        return AsyncContext(self, await self._run(calls.create_context(model, params)))

    async def context(self, context_id: str) -> AsyncContext:
        return AsyncContext(self, calls.find_context(await self.list_contexts(), context_id))

    async def tokenize(self, model: str, text: str, **params: Any) -> list[int]:
        return await self._run(calls.tokenize(text, params, model=model))

    async def detokenize(self, model: str, tokens: list[int]) -> str:
        return await self._run(calls.detokenize(tokens, model=model))

    async def embed(self, input: str | list[str], *, model: str | dict | None = None,
              context: str | None = None, normalize: bool = True) -> dict[str, Any]:
        """One vector per input (``embeddings``), from ``model`` or a context's model."""
        return await self._run(calls.embed(input, normalize, model, context))

    async def validate_lora(self, model: str | dict, path: str | os.PathLike) -> dict[str, Any]:
        """Check an adapter against a model without applying it (see Client.validate_lora)."""
        return await self._run(calls.validate_lora(model, path))

    async def name_lora(self, name: str, path: str | os.PathLike, *, replace: bool = False
                        ) -> dict[str, Any]:
        """See Client.name_lora."""
        return await self._run(calls.name_lora(name, path, replace))

    async def unname_lora(self, name: str) -> dict[str, Any]:
        return await self._run(calls.unname_lora(name))

    async def lora_names(self) -> list[dict[str, Any]]:
        return await self._run(calls.simple("list_lora_names"))

    async def cancel(self, request_id: RequestId) -> dict[str, Any]:
        self._core.forget(request_id)
        return await self._run(calls.cancel(request_id))

    async def _stream(self, call: Call) -> AsyncStream:
        rid = await self._start(call.op, call.args)
        return AsyncStream(self, rid, StreamState.for_args(rid, call.args),
                           call.timeout_for(self.timeout, self.timeout))


class AsyncContext(ContextView):
    """A handle on one daemon context (trio). ``async with`` closes it."""

    def __init__(self, client: AsyncClient, info: dict[str, Any]) -> None:
        super().__init__(info)
        self._client = client

    async def generate(
        self, prompt: str | None = None, *, tokens: list[int] | None = None,
        timeout: float | None = None, **params: Any,
    ) -> AsyncStream:
        return self._track(await self._client._stream(
            calls.generate(self.id, prompt, tokens, params, timeout)))

    async def chat(
        self, messages: list[dict[str, str]], *, timeout: float | None = None, **params: Any
    ) -> AsyncStream:
        return self._track(await self._client._stream(
            calls.chat(self.id, messages, params, timeout)))

    async def tokenize(self, text: str, **params: Any) -> list[int]:
        return await self._client._run(calls.tokenize(text, params, context=self.id))

    async def detokenize(self, tokens: list[int]) -> str:
        return await self._client._run(calls.detokenize(tokens, context=self.id))

    async def embed(self, input: str | list[str], *, normalize: bool = True) -> dict[str, Any]:
        """One vector per input, from this context's model under its adapter stack."""
        return await self._client._run(calls.embed(input, normalize, None, self.id))

    # LoRA adapters: each call returns the context's stack afterwards, in order.
    async def set_lora(self, path: str | os.PathLike, scale: float = 1.0) -> list[dict[str, Any]]:
        """Add the adapter to the end of the stack, or change its scale (see Context)."""
        return await self._client._run(calls.set_lora(self.id, path, scale))

    async def remove_lora(self, path: str | os.PathLike) -> list[dict[str, Any]]:
        """Take one adapter out of the stack (``NotFound`` if it is not there)."""
        return await self._client._run(calls.remove_lora(self.id, path))

    async def clear_loras(self) -> list[dict[str, Any]]:
        """Back to the base model."""
        return await self._client._run(calls.clear_loras(self.id))

    async def set_loras(self, loras: Iterable[LoraItem]) -> list[dict[str, Any]]:
        """Replace the whole stack atomically (on any error the stack is unchanged)."""
        return await self._client._run(calls.set_loras(self.id, loras))

    async def loras(self) -> list[dict[str, Any]]:
        """The stack in order: ref, path, scale, alpha, rank, targets, bytes, alora."""
        return await self._client._run(calls.list_loras(self.id))

    async def close(self) -> None:
        """Close the context on the daemon (its running streams end as cancelled)."""
        self._close_streams()
        await self._client._run(calls.close_context(self.id))

    async def __aenter__(self) -> AsyncContext:
        return self

    async def __aexit__(self, *exc: object) -> None:
        with trio.CancelScope(shield=True):
            await self.close()


class AsyncStream(StreamView):
    """A running generation (trio). ``async for chunk in stream``; leaving early cancels it.

    Prefer ``async with await ctx.generate(...) as stream:`` so that an early exit cancels at
    once rather than when the iterator is finalized.
    """

    def __init__(self, client: AsyncClient, rid: RequestId, state: StreamState,
                 timeout: float) -> None:
        self._client = client
        self.request_id = rid
        self._state = state
        self.timeout = timeout

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        state, client = self._state, self._client
        state.begin()
        try:
            while True:
                chunk = state.apply(await client._next_reply(self.request_id, self.timeout))
                if chunk is None:
                    break
                grant = state.credit_to_grant()
                if grant:
                    await client._send(client._core.credit(self.request_id, grant))
                yield chunk
        finally:
            self.close()
        if state.error is not None:
            raise state.error

    async def collect(self) -> str:
        async for _ in self:
            pass
        return self.text

    def cancel(self) -> None:
        """Ask the daemon to stop; iterating on yields the rest and the cancelled end."""
        if self._state.request_cancel():
            self._client._cancel_nowait(self.request_id)

    def close(self) -> None:
        """Cancel (if still running) and forget the stream's remaining replies."""
        if self._state.close():
            self._client._cancel_nowait(self.request_id)
        self._client._core.forget(self.request_id)

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


__all__ = ["AsyncClient", "AsyncContext", "AsyncStream"]
