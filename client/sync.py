"""The blocking client. One ``Client`` per thread (like the zmq socket it owns).

A thin shell: the request, stream and cancel logic is in :mod:`.core`, each method's request in
:mod:`.calls`; this module only moves frames between them and a :class:`SyncTransport`.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

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
    ProgressState,
    StreamState,
    StreamView,
    check_result,
)
from .transport import SyncTransport, ZmqTransport


class Client:
    """A blocking connection to a lorad daemon.

    ``timeout`` bounds each call (seconds; ``load_model`` uses ``load_timeout``);
    ``connect_timeout`` bounds the wait for a connection before :class:`DaemonUnavailable`.
    ``transport`` replaces the ZeroMQ connection (tests use an in-memory one).
    """

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        load_timeout: float = LOAD_TIMEOUT,
        connect_timeout: float = CONNECT_TIMEOUT,
        curve: CurveKeys | None = None,
        transport: SyncTransport | None = None,
    ) -> None:
        self.endpoint = endpoint or default_endpoint()
        self.timeout = timeout
        self.load_timeout = load_timeout
        self.connect_timeout = connect_timeout
        self._core = ClientCore(self.endpoint)
        if transport is None:
            transport = ZmqTransport(self.endpoint,
                                     curve if curve is not None else CurveKeys.from_env())
        self._transport = transport
        self._owner = threading.get_ident()
        self._closed = False

    # -- moving frames ----------------------------------------------------------------------------
    def _send(self, frames: list[bytes]) -> None:
        self._flush_cancels()
        if not self._transport.send(frames, self.connect_timeout):
            raise self._core.unavailable_error()

    def _start(self, op: str, args: dict[str, Any]) -> RequestId:
        # What happened so far (a disconnect noticed while idle) concerns earlier requests only.
        for event in self._transport.receive(0):
            self._core.feed(event)
        rid, frames = self._core.start(op, args)
        try:
            self._send(frames)
        except BaseException:
            self._core.forget(rid)
            raise
        return rid

    def _next_reply(self, rid: RequestId, timeout: float) -> Reply:
        deadline = None
        while (reply := self._core.next_reply(rid)) is None:
            now = time.monotonic()
            deadline = now + timeout if deadline is None else deadline
            if now >= deadline:
                raise self._core.timeout_error(rid, timeout)
            for event in self._transport.receive(deadline - now):
                self._core.feed(event)
        return reply

    def _call(self, op: str, args: dict[str, Any] | None = None, timeout: float | None = None):
        rid = self._start(op, args or {})
        try:
            reply = self._next_reply(rid, self.timeout if timeout is None else timeout)
        finally:
            self._core.forget(rid)
        return check_result(reply)

    def _run(self, call: Call) -> Any:
        timeout = call.timeout_for(self.timeout, self.load_timeout)
        return call.pick(self._call(call.op, call.args, timeout))

    def _cancel_soon(self, rid: RequestId) -> None:
        """Cancel from anywhere (also a finalizer): now in the owner thread, else on next call."""
        if self._closed:
            return
        if threading.get_ident() == self._owner:
            self._transport.send_nowait(self._core.cancel(rid))
        else:
            self._core.cancel_later(rid)

    def _flush_cancels(self) -> None:
        # Not sent: no connection, and the daemon cancels a vanished client's work by itself.
        for frames in self._core.take_cancels():
            self._transport.send_nowait(frames)

    # -- public API ---------------------------------------------------------------------------
    def ping(self, timeout: float | None = None) -> dict[str, Any]:
        return self._run(calls.simple("ping", timeout))

    def status(self) -> dict[str, Any]:
        return self._run(calls.simple("status"))

    def capabilities(self) -> dict[str, Any]:
        return self._run(calls.simple("capabilities"))

    def metrics(self) -> dict[str, Any]:
        """Counters and latency summaries: ``total``, per ``models`` and per ``contexts``."""
        return self._run(calls.simple("metrics"))

    def load_model(self, path: str | os.PathLike, *,
                   progress: Callable[[float], None] | None = None,
                   **params: Any) -> dict[str, Any]:
        """Load (or reuse) a model; returns its info dict (``id``, ``path``, ...).

        ``progress(fraction)`` is called as llama.cpp loads it (0.0 to 1.0)."""
        if progress is None:
            return self._run(calls.load_model(path, params))
        call = calls.load_model(path, params, progress=True)
        rid = self._start(call.op, call.args)
        try:
            state, info = ProgressState(rid, progress), PENDING
            while info is PENDING:
                info = state.apply(self._next_reply(rid, self.load_timeout))
            return info
        finally:
            self._core.forget(rid)

    def unload_model(self, model: str | dict, *, force: bool = False) -> dict[str, Any]:
        return self._run(calls.unload_model(model, force))

    def list_models(self) -> list[dict[str, Any]]:
        return self._run(calls.simple("list_models"))

    def list_contexts(self) -> list[dict[str, Any]]:
        return self._run(calls.simple("list_contexts"))

    def create_context(self, model: str | os.PathLike | dict, **params: Any) -> Context:
        """Create a context on a model id, a load_model() result or a path (loaded or reused)."""
        return Context(self, self._run(calls.create_context(model, params)))

    def context(self, context_id: str) -> Context:
        """A handle on an existing (e.g. preloaded, persistent) context."""
        return Context(self, calls.find_context(self.list_contexts(), context_id))

    def tokenize(self, model: str, text: str, **params: Any) -> list[int]:
        return self._run(calls.tokenize(text, params, model=model))

    def detokenize(self, model: str, tokens: list[int]) -> str:
        return self._run(calls.detokenize(tokens, model=model))

    def embed(self, input: str | list[str], *, model: str | dict | None = None,
              context: str | None = None, normalize: bool = True) -> dict[str, Any]:
        """One vector per input (``embeddings``), from ``model`` or a context's model."""
        return self._run(calls.embed(input, normalize, model, context))

    def validate_lora(self, model: str | dict, path: str | os.PathLike) -> dict[str, Any]:
        """Check an adapter against a model without applying it: ``{"compatible": bool,
        "problems": [{code, message, details}], "adapter": {...}}``."""
        return self._run(calls.validate_lora(model, path))

    def name_lora(self, name: str, path: str | os.PathLike, *, replace: bool = False
                  ) -> dict[str, Any]:
        """Name the adapter at ``path`` for every client (and the HTTP door's ``model``
        field): ``{name, path, models}``, the loaded models it fits."""
        return self._run(calls.name_lora(name, path, replace))

    def unname_lora(self, name: str) -> dict[str, Any]:
        return self._run(calls.unname_lora(name))

    def lora_names(self) -> list[dict[str, Any]]:
        """The adapter names given with :meth:`name_lora`: ``[{name, path}]``."""
        return self._run(calls.simple("list_lora_names"))

    def cancel(self, request_id: RequestId) -> dict[str, Any]:
        """Cancel a request of this client (acknowledged even if it already ended)."""
        self._core.forget(request_id)
        return self._run(calls.cancel(request_id))

    def close(self) -> None:
        if self._closed:
            return
        self._flush_cancels()
        self._closed = True
        self._transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _stream(self, call: Call) -> Stream:
        return Stream(self, call.op, call.args, call.timeout_for(self.timeout, self.timeout))


class Context(ContextView):
    """A handle on one daemon context. Closing it frees the context on the daemon."""

    def __init__(self, client: Client, info: dict[str, Any]) -> None:
        super().__init__(info)
        self._client = client

    def generate(
        self, prompt: str | None = None, *, tokens: list[int] | None = None,
        timeout: float | None = None, **params: Any,
    ) -> Stream:
        """Stream a completion of ``prompt`` (or ``tokens``); iterate the result for chunks."""
        return self._track(self._client._stream(
            calls.generate(self.id, prompt, tokens, params, timeout)))

    def chat(
        self, messages: list[dict[str, str]], *, timeout: float | None = None, **params: Any
    ) -> Stream:
        """Stream a reply to ``messages`` formatted with the model's own chat template."""
        return self._track(self._client._stream(calls.chat(self.id, messages, params, timeout)))

    def tokenize(self, text: str, **params: Any) -> list[int]:
        return self._client._run(calls.tokenize(text, params, context=self.id))

    def detokenize(self, tokens: list[int]) -> str:
        return self._client._run(calls.detokenize(tokens, context=self.id))

    def embed(self, input: str | list[str], *, normalize: bool = True) -> dict[str, Any]:
        """One vector per input, from this context's model under its adapter stack."""
        return self._client._run(calls.embed(input, normalize, None, self.id))

    # LoRA adapters: each call returns the context's stack afterwards, in order.
    def set_lora(self, path: str | os.PathLike, scale: float = 1.0) -> list[dict[str, Any]]:
        """Add the adapter (a path, or a name in the daemon's adapter directories) to the end of
        the stack, or change its scale if it is already there. Takes effect for the next
        generation; a scale change reloads nothing."""
        return self._client._run(calls.set_lora(self.id, path, scale))

    def remove_lora(self, path: str | os.PathLike) -> list[dict[str, Any]]:
        """Take one adapter out of the stack (``NotFound`` if it is not there)."""
        return self._client._run(calls.remove_lora(self.id, path))

    def clear_loras(self) -> list[dict[str, Any]]:
        """Back to the base model."""
        return self._client._run(calls.clear_loras(self.id))

    def set_loras(self, loras: Iterable[LoraItem]) -> list[dict[str, Any]]:
        """Replace the whole stack atomically (on any error the stack is unchanged)."""
        return self._client._run(calls.set_loras(self.id, loras))

    def loras(self) -> list[dict[str, Any]]:
        """The stack in order: ref, path, scale, alpha, rank, targets, bytes, alora."""
        return self._client._run(calls.list_loras(self.id))

    def close(self) -> None:
        """Close the context on the daemon (its running streams end as cancelled)."""
        self._close_streams()
        self._client._run(calls.close_context(self.id))

    def __enter__(self) -> Context:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Stream(StreamView):
    """A running generation. Iterate it for :class:`Chunk`; then read ``finish_reason``,
    ``metrics`` and ``text``. Leaving the loop early cancels the request on the daemon."""

    def __init__(self, client: Client, op: str, args: dict[str, Any], timeout: float) -> None:
        self._client = client
        self.timeout = timeout
        self.request_id = client._start(op, args)
        self._state = StreamState.for_args(self.request_id, args)

    def __iter__(self) -> Iterator[Chunk]:
        state, client = self._state, self._client
        state.begin()
        try:
            while True:
                chunk = state.apply(client._next_reply(self.request_id, self.timeout))
                if chunk is None:
                    break
                grant = state.credit_to_grant()
                if grant:
                    client._send(client._core.credit(self.request_id, grant))
                yield chunk
        finally:
            self.close()
        if state.error is not None:
            raise state.error

    def collect(self) -> str:
        """Consume the whole stream; return its text."""
        for _ in self:
            pass
        return self.text

    def cancel(self) -> None:
        """Ask the daemon to stop this generation (it stops within one token).

        Iterating on afterwards yields what was already sent and then ends with
        ``finish_reason == "cancelled"`` and the request's metrics.
        """
        if self._state.request_cancel():
            self._client._cancel_soon(self.request_id)

    def close(self) -> None:
        """Cancel (if still running) and forget the stream's remaining replies."""
        if self._state.close():
            self._client._cancel_soon(self.request_id)
        self._client._core.forget(self.request_id)

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
