"""The trio client, mirroring :mod:`lorad.client.sync`. Use it as ``async with AsyncClient()``."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import trio
import zmq
from zmq.utils.monitor import parse_monitor_message

from lorad.protocol import Reply, Request, RequestId, decode_reply, encode_request
from lorad.protocol.errors import ProtocolError

from .core import (
    CONNECT_TIMEOUT,
    DEFAULT_TIMEOUT,
    LOAD_TIMEOUT,
    MONITOR_EVENTS,
    PENDING,
    Chunk,
    CurveKeys,
    LoraItem,
    RequestIds,
    StreamState,
    check_result,
    configure_dealer,
    context_args,
    default_endpoint,
    drop_none,
    load_progress_reply,
    lora_ref,
    lora_stack,
)
from .errors import DaemonUnavailable, InternalError, NotFound, RequestTimeout
from .zmqtrio import ZmqPump

_LOST = Reply(kind="error", error={"code": "unavailable", "message": "daemon went away"})


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
    ) -> None:
        self.endpoint = endpoint or default_endpoint()
        self.timeout = timeout
        self.load_timeout = load_timeout
        self.connect_timeout = connect_timeout
        self.curve = curve if curve is not None else CurveKeys.from_env()
        self._ids = RequestIds()
        self._inbox: dict[RequestId, trio.MemorySendChannel[Reply]] = {}
        self._nursery: trio.Nursery | None = None
        self._connected = trio.Event()
        self._sock: zmq.Socket | None = None

    async def __aenter__(self) -> AsyncClient:
        zctx = zmq.Context.instance()
        self._sock = zctx.socket(zmq.DEALER)
        configure_dealer(self._sock, self.curve)
        monitor = self._sock.get_monitor_socket(MONITOR_EVENTS)
        self._sock.connect(self.endpoint)
        self._pump = ZmqPump(self._sock)
        self._monitor_pump = ZmqPump(monitor)
        self._nursery_cm = trio.open_nursery()
        self._nursery = await self._nursery_cm.__aenter__()
        self._nursery.start_soon(self._pump.run, self._deliver)
        self._nursery.start_soon(self._monitor_pump.run, self._on_monitor)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()
        await self._nursery_cm.__aexit__(None, None, None)
        self._sock.disable_monitor()
        self._monitor_pump.close()
        self._pump.close()

    async def _deliver(self, frames: list[bytes]) -> None:
        try:
            reply = decode_reply(frames)
        except ProtocolError:
            return
        chan = self._inbox.get(reply.id) if reply.id is not None else None
        if chan is not None:
            try:
                chan.send_nowait(reply)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # bounded by the stream's credit; a closed waiter means it was abandoned

    async def _on_monitor(self, frames: list[bytes]) -> None:
        event = parse_monitor_message(frames)["event"]
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self._connected.set()
        elif event == zmq.EVENT_DISCONNECTED:
            self._connected = trio.Event()
            for chan in list(self._inbox.values()):
                try:
                    chan.send_nowait(_LOST)
                except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                    pass

    async def _send(self, request: Request) -> None:
        if not self._connected.is_set():
            with trio.move_on_after(self.connect_timeout):
                await self._connected.wait()
            if not self._connected.is_set():
                raise DaemonUnavailable(
                    f"no lorad daemon answers at {self.endpoint} "
                    "(is `lorad serve` running? see $LORAD_ENDPOINT)",
                    {"endpoint": self.endpoint},
                )
        self._pump.send(encode_request(request))

    async def _register(self, op: str, args: dict[str, Any], buffer: int = 1):
        rid = self._ids.next()
        send, recv = trio.open_memory_channel[Reply](buffer + 2)
        self._inbox[rid] = send
        try:
            await self._send(Request(id=rid, op=op, args=args))
        except BaseException:
            del self._inbox[rid]
            raise
        return rid, recv

    async def _next_reply(self, rid: RequestId, recv, timeout: float) -> Reply:
        with trio.move_on_after(timeout):
            reply = await recv.receive()
            if reply is _LOST:
                self._inbox.pop(rid, None)
                raise DaemonUnavailable(
                    f"the daemon at {self.endpoint} went away during the request",
                    {"endpoint": self.endpoint},
                )
            return reply
        raise RequestTimeout(
            f"no answer within {timeout:.1f} s", {"request": rid, "timeout": timeout}
        )

    async def _call(
        self, op: str, args: dict[str, Any] | None = None, timeout: float | None = None
    ) -> Any:
        rid, recv = await self._register(op, args or {})
        try:
            reply = await self._next_reply(rid, recv, self.timeout if timeout is None else timeout)
        finally:
            self._inbox.pop(rid, None)
        return check_result(reply)

    def _cancel_nowait(self, rid: RequestId) -> None:
        if self._connected.is_set():
            req = Request(id=self._ids.next(), op="cancel", args={"request": rid})
            self._pump.send(encode_request(req))

    # -- public API (mirrors Client) ------------------------------------------------------------
    async def ping(self, timeout: float | None = None) -> dict[str, Any]:
        return await self._call("ping", timeout=timeout)

    async def status(self) -> dict[str, Any]:
        return await self._call("status")

    async def metrics(self) -> dict[str, Any]:
        """Counters and latency summaries: ``total``, per ``models`` and per ``contexts``."""
        return await self._call("metrics")

    async def capabilities(self) -> dict[str, Any]:
        return await self._call("capabilities")

    async def load_model(self, path: str | os.PathLike, *,
                         progress: Callable[[float], None] | None = None,
                         **params: Any) -> dict[str, Any]:
        """Load (or reuse) a model (see Client.load_model)."""
        args = {"path": os.fspath(path), **drop_none(**params)}
        if progress is None:
            return await self._call("load_model", args, timeout=self.load_timeout)
        rid, recv = await self._register("load_model", {**args, "progress": True}, buffer=128)
        try:
            info = PENDING
            while info is PENDING:
                reply = await self._next_reply(rid, recv, self.load_timeout)
                info = load_progress_reply(reply, progress)
            return info
        finally:
            self._inbox.pop(rid, None)

    async def unload_model(self, model: str | dict, *, force: bool = False) -> dict[str, Any]:
        model_id = model["id"] if isinstance(model, dict) else model
        return await self._call("unload_model", {"model": model_id, "force": force})

    async def list_models(self) -> list[dict[str, Any]]:
        return await self._call("list_models")

    async def list_contexts(self) -> list[dict[str, Any]]:
        return await self._call("list_contexts")

    async def create_context(self, model: str | os.PathLike | dict, **params: Any) -> AsyncContext:
        info = await self._call(
            "create_context", context_args(model, params), timeout=self.load_timeout
        )
        return AsyncContext(self, info)

    async def context(self, context_id: str) -> AsyncContext:
        for info in await self.list_contexts():
            if info["id"] == context_id:
                return AsyncContext(self, info)
        raise NotFound(f"no context {context_id!r}", {"context": context_id})

    async def tokenize(self, model: str, text: str, **params: Any) -> list[int]:
        return await self._call("tokenize", {"model": model, "text": text, **drop_none(**params)})

    async def detokenize(self, model: str, tokens: list[int]) -> str:
        return await self._call("detokenize", {"model": model, "tokens": list(tokens)})

    async def validate_lora(self, model: str | dict, path: str | os.PathLike) -> dict[str, Any]:
        """Check an adapter against a model without applying it (see Client.validate_lora)."""
        model_id = model["id"] if isinstance(model, dict) else os.fspath(model)
        return await self._call("validate_lora", {"model": model_id, "path": lora_ref(path)},
                                timeout=self.load_timeout)

    async def cancel(self, request_id: RequestId) -> dict[str, Any]:
        self._inbox.pop(request_id, None)
        return await self._call("cancel", {"request": request_id})


class AsyncContext:
    """A handle on one daemon context (trio). ``async with`` closes it."""

    def __init__(self, client: AsyncClient, info: dict[str, Any]) -> None:
        self._client = client
        self.info = info
        self.id: str = info["id"]
        self.model: str = info["model"]
        self._streams: list[AsyncStream] = []

    async def generate(
        self, prompt: str | None = None, *, tokens: list[int] | None = None,
        timeout: float | None = None, **params: Any,
    ) -> AsyncStream:
        args = {"context": self.id, **drop_none(prompt=prompt, tokens=tokens, **params)}
        return await self._start("generate", args, timeout)

    async def chat(
        self, messages: list[dict[str, str]], *, timeout: float | None = None, **params: Any
    ) -> AsyncStream:
        args = {"context": self.id, "messages": messages, **drop_none(**params)}
        return await self._start("chat", args, timeout)

    async def _start(self, op: str, args: dict[str, Any], timeout: float | None) -> AsyncStream:
        credit = args.get("credit", 64)
        rid, recv = await self._client._register(op, args, buffer=credit)
        stream = AsyncStream(self._client, rid, recv, credit,
                             self._client.timeout if timeout is None else timeout)
        self._streams = [s for s in self._streams if not s.done]
        self._streams.append(stream)
        return stream

    async def tokenize(self, text: str, **params: Any) -> list[int]:
        return await self._client._call(
            "tokenize", {"context": self.id, "text": text, **drop_none(**params)}
        )

    async def detokenize(self, tokens: list[int]) -> str:
        return await self._client._call(
            "detokenize", {"context": self.id, "tokens": list(tokens)}
        )

    # LoRA adapters: each call returns the context's stack afterwards, in order.
    async def set_lora(self, path: str | os.PathLike, scale: float = 1.0) -> list[dict[str, Any]]:
        """Add the adapter to the end of the stack, or change its scale (see Context)."""
        args = {"context": self.id, "path": lora_ref(path), "scale": scale}
        result = await self._client._call("set_lora", args, timeout=self._client.load_timeout)
        return result["loras"]

    async def remove_lora(self, path: str | os.PathLike) -> list[dict[str, Any]]:
        """Take one adapter out of the stack (``NotFound`` if it is not there)."""
        result = await self._client._call("remove_lora",
                                          {"context": self.id, "path": lora_ref(path)})
        return result["loras"]

    async def clear_loras(self) -> list[dict[str, Any]]:
        """Back to the base model."""
        return (await self._client._call("clear_loras", {"context": self.id}))["loras"]

    async def set_loras(self, loras: Iterable[LoraItem]) -> list[dict[str, Any]]:
        """Replace the whole stack atomically (on any error the stack is unchanged)."""
        args = {"context": self.id, "loras": lora_stack(loras)}
        result = await self._client._call("set_loras", args, timeout=self._client.load_timeout)
        return result["loras"]

    async def loras(self) -> list[dict[str, Any]]:
        """The stack in order: ref, path, scale, alpha, rank, targets, bytes, alora."""
        return await self._client._call("list_loras", {"context": self.id})

    def cancel(self) -> None:
        """Cancel every stream of this handle that is still running."""
        for stream in self._streams:
            stream.cancel()

    async def close(self) -> None:
        """Close the context on the daemon (its running streams end as cancelled)."""
        for stream in self._streams:
            stream.close()
        self._streams.clear()
        await self._client._call("close_context", {"context": self.id})

    async def __aenter__(self) -> AsyncContext:
        return self

    async def __aexit__(self, *exc: object) -> None:
        with trio.CancelScope(shield=True):
            await self.close()


class AsyncStream:
    """A running generation (trio). ``async for chunk in stream``; leaving early cancels it.

    Prefer ``async with await ctx.generate(...) as stream:`` so that an early exit cancels at
    once rather than when the iterator is finalized.
    """

    def __init__(self, client: AsyncClient, rid: RequestId, recv, credit: int,
                 timeout: float) -> None:
        self._client = client
        self.request_id = rid
        self._recv = recv
        self._state = StreamState(rid, credit)
        self.timeout = timeout
        self._iterating = False
        self._cancel_sent = False

    finish_reason = property(lambda self: self._state.finish_reason)
    metrics = property(lambda self: self._state.metrics)
    text = property(lambda self: self._state.text)
    done = property(lambda self: self._state.done)

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        if self._iterating:
            raise InternalError("a stream can be iterated only once")
        self._iterating = True
        finished = False
        try:
            while not self._state.done:
                reply = await self._client._next_reply(self.request_id, self._recv, self.timeout)
                chunk = self._state.apply(reply)
                if chunk is None:
                    break
                grant = self._state.credit_to_grant()
                if grant and not self._cancel_sent:
                    await self._client._send(Request(
                        id=self._client._ids.next(), op="credit",
                        args={"request": self.request_id, "n": grant},
                    ))
                yield chunk
            finished = True
        finally:
            if not finished:
                self._abandon()
            self._client._inbox.pop(self.request_id, None)
        if self._state.error is not None:
            raise self._state.error

    async def collect(self) -> str:
        async for _ in self:
            pass
        return self.text

    def cancel(self) -> None:
        """Ask the daemon to stop; iterating on yields the rest and the cancelled end."""
        if not self._state.done and not self._cancel_sent:
            self._cancel_sent = True
            self._client._cancel_nowait(self.request_id)

    def close(self) -> None:
        """Cancel (if still running) and forget the stream's remaining replies."""
        self._abandon()
        self._client._inbox.pop(self.request_id, None)

    def _abandon(self) -> None:
        if not self._state.done:
            self._state.done = True
            self._state.finish_reason = "cancelled"
            if not self._cancel_sent:
                self._cancel_sent = True
                self._client._cancel_nowait(self.request_id)

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


__all__ = ["AsyncClient", "AsyncContext", "AsyncStream"]
