"""The blocking client. One ``Client`` per thread (like the zmq socket it owns)."""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

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
from .errors import DaemonUnavailable, InternalError, RequestTimeout


class Client:
    """A blocking connection to a lorad daemon.

    ``timeout`` bounds each call (seconds; ``load_model`` uses ``load_timeout``);
    ``connect_timeout`` bounds the wait for a connection before :class:`DaemonUnavailable`.
    """

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
        self._zctx = zmq.Context.instance()
        self._sock = self._zctx.socket(zmq.DEALER)
        configure_dealer(self._sock, curve if curve is not None else CurveKeys.from_env())
        self._monitor = self._sock.get_monitor_socket(MONITOR_EVENTS)
        self._sock.connect(self.endpoint)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        self._ids = RequestIds()
        self._inbox: dict[RequestId, collections.deque[Reply]] = {}
        self._connected = False
        self._lost = False  # a disconnect happened while requests were waiting
        self._owner = threading.get_ident()
        self._pending_cancels: list[RequestId] = []
        self._closed = False

    # -- plumbing -----------------------------------------------------------------------------
    def _send(self, request: Request) -> None:
        self._flush_cancels()
        frames = encode_request(request)
        deadline = time.monotonic() + self.connect_timeout
        while True:
            try:
                self._sock.send_multipart(frames, zmq.NOBLOCK)
                return
            except zmq.Again:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DaemonUnavailable(
                        f"no lorad daemon answers at {self.endpoint} "
                        "(is `lorad serve` running? see $LORAD_ENDPOINT)",
                        {"endpoint": self.endpoint},
                    ) from None
                self._sock.poll(int(min(remaining, 0.05) * 1000) + 1, zmq.POLLOUT)
                self._drain_monitor()

    def _drain_monitor(self) -> None:
        while self._monitor.poll(0):
            event = parse_monitor_message(self._monitor.recv_multipart())["event"]
            if event == zmq.EVENT_DISCONNECTED:
                self._connected = False
                if self._inbox:
                    self._lost = True
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._connected = True

    def _register(self, op: str, args: dict[str, Any]) -> RequestId:
        rid = self._ids.next()
        self._inbox[rid] = collections.deque()
        self._lost = False
        try:
            self._send(Request(id=rid, op=op, args=args))
        except BaseException:
            del self._inbox[rid]
            raise
        return rid

    def _next_reply(self, rid: RequestId, timeout: float) -> Reply:
        deadline = time.monotonic() + timeout
        box = self._inbox[rid]
        while not box:
            if self._lost:
                self._inbox.pop(rid, None)
                raise DaemonUnavailable(
                    f"the daemon at {self.endpoint} went away during the request",
                    {"endpoint": self.endpoint},
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RequestTimeout(
                    f"no answer within {timeout:.1f} s", {"request": rid, "timeout": timeout}
                )
            events = dict(self._poller.poll(int(remaining * 1000) + 1))
            if self._monitor in events:
                self._drain_monitor()
            if self._sock in events:
                self._read_available()
        return box.popleft()

    def _read_available(self) -> None:
        while self._sock.poll(0):
            frames = self._sock.recv_multipart()
            try:
                reply = decode_reply(frames)
            except ProtocolError:
                continue  # a corrupt frame cannot be routed; the waiter's timeout covers it
            box = self._inbox.get(reply.id) if reply.id is not None else None
            if box is not None:
                box.append(reply)

    def _call(self, op: str, args: dict[str, Any] | None = None, timeout: float | None = None):
        rid = self._register(op, args or {})
        try:
            reply = self._next_reply(rid, self.timeout if timeout is None else timeout)
        finally:
            self._inbox.pop(rid, None)
        return check_result(reply)

    def _cancel_soon(self, rid: RequestId) -> None:
        """Cancel from anywhere (also a finalizer): now in the owner thread, else on next call."""
        if self._closed:
            return
        if threading.get_ident() == self._owner:
            self._send_cancel(rid)
        else:
            self._pending_cancels.append(rid)

    def _send_cancel(self, rid: RequestId) -> None:
        try:
            self._sock.send_multipart(
                encode_request(Request(id=self._ids.next(), op="cancel", args={"request": rid})),
                zmq.NOBLOCK,
            )
        except zmq.ZMQError:
            pass  # no connection: the daemon cancels a vanished client's work by itself

    def _flush_cancels(self) -> None:
        while self._pending_cancels:
            self._send_cancel(self._pending_cancels.pop())

    # -- public API ---------------------------------------------------------------------------
    def ping(self, timeout: float | None = None) -> dict[str, Any]:
        return self._call("ping", timeout=timeout)

    def status(self) -> dict[str, Any]:
        return self._call("status")

    def capabilities(self) -> dict[str, Any]:
        return self._call("capabilities")

    def metrics(self) -> dict[str, Any]:
        """Counters and latency summaries: ``total``, per ``models`` and per ``contexts``."""
        return self._call("metrics")

    def load_model(self, path: str | os.PathLike, *,
                   progress: Callable[[float], None] | None = None,
                   **params: Any) -> dict[str, Any]:
        """Load (or reuse) a model; returns its info dict (``id``, ``path``, ...).

        ``progress(fraction)`` is called as llama.cpp loads it (0.0 to 1.0)."""
        args = {"path": os.fspath(path), **drop_none(**params)}
        if progress is None:
            return self._call("load_model", args, timeout=self.load_timeout)
        rid = self._register("load_model", {**args, "progress": True})
        try:
            info = PENDING
            while info is PENDING:
                info = load_progress_reply(self._next_reply(rid, self.load_timeout), progress)
            return info
        finally:
            self._inbox.pop(rid, None)

    def unload_model(self, model: str | dict, *, force: bool = False) -> dict[str, Any]:
        model_id = model["id"] if isinstance(model, dict) else model
        return self._call("unload_model", {"model": model_id, "force": force})

    def list_models(self) -> list[dict[str, Any]]:
        return self._call("list_models")

    def list_contexts(self) -> list[dict[str, Any]]:
        return self._call("list_contexts")

    def create_context(self, model: str | os.PathLike | dict, **params: Any) -> Context:
        """Create a context on a model id, a load_model() result or a path (loaded or reused)."""
        info = self._call(
            "create_context", context_args(model, params), timeout=self.load_timeout
        )
        return Context(self, info)

    def context(self, context_id: str) -> Context:
        """A handle on an existing (e.g. preloaded, persistent) context."""
        for info in self.list_contexts():
            if info["id"] == context_id:
                return Context(self, info)
        from .errors import NotFound

        raise NotFound(f"no context {context_id!r}", {"context": context_id})

    def tokenize(self, model: str, text: str, **params: Any) -> list[int]:
        return self._call("tokenize", {"model": model, "text": text, **drop_none(**params)})

    def detokenize(self, model: str, tokens: list[int]) -> str:
        return self._call("detokenize", {"model": model, "tokens": list(tokens)})

    def validate_lora(self, model: str | dict, path: str | os.PathLike) -> dict[str, Any]:
        """Check an adapter against a model without applying it: ``{"compatible": bool,
        "problems": [{code, message, details}], "adapter": {...}}``."""
        model_id = model["id"] if isinstance(model, dict) else os.fspath(model)
        return self._call("validate_lora", {"model": model_id, "path": lora_ref(path)},
                          timeout=self.load_timeout)

    def cancel(self, request_id: RequestId) -> dict[str, Any]:
        """Cancel a request of this client (acknowledged even if it already ended)."""
        self._inbox.pop(request_id, None)
        return self._call("cancel", {"request": request_id})

    def close(self) -> None:
        if self._closed:
            return
        self._flush_cancels()
        self._closed = True
        self._sock.disable_monitor()
        self._monitor.close(linger=0)
        self._sock.close(linger=200)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _stream(self, op: str, args: dict[str, Any], timeout: float | None) -> Stream:
        return Stream(self, op, args, self.timeout if timeout is None else timeout)


class Context:
    """A handle on one daemon context. Closing it frees the context on the daemon."""

    def __init__(self, client: Client, info: dict[str, Any]) -> None:
        self._client = client
        self.info = info
        self.id: str = info["id"]
        self.model: str = info["model"]
        self._streams: list[Stream] = []

    def generate(
        self, prompt: str | None = None, *, tokens: list[int] | None = None,
        timeout: float | None = None, **params: Any,
    ) -> Stream:
        """Stream a completion of ``prompt`` (or ``tokens``); iterate the result for chunks."""
        args = {"context": self.id, **drop_none(prompt=prompt, tokens=tokens, **params)}
        return self._track(self._client._stream("generate", args, timeout))

    def chat(
        self, messages: list[dict[str, str]], *, timeout: float | None = None, **params: Any
    ) -> Stream:
        """Stream a reply to ``messages`` formatted with the model's own chat template."""
        args = {"context": self.id, "messages": messages, **drop_none(**params)}
        return self._track(self._client._stream("chat", args, timeout))

    def tokenize(self, text: str, **params: Any) -> list[int]:
        return self._client._call(
            "tokenize", {"context": self.id, "text": text, **drop_none(**params)}
        )

    def detokenize(self, tokens: list[int]) -> str:
        return self._client._call("detokenize", {"context": self.id, "tokens": list(tokens)})

    # LoRA adapters: each call returns the context's stack afterwards, in order.
    def set_lora(self, path: str | os.PathLike, scale: float = 1.0) -> list[dict[str, Any]]:
        """Add the adapter (a path, or a name in the daemon's adapter directories) to the end of
        the stack, or change its scale if it is already there. Takes effect for the next
        generation; a scale change reloads nothing."""
        args = {"context": self.id, "path": lora_ref(path), "scale": scale}
        return self._client._call("set_lora", args, timeout=self._client.load_timeout)["loras"]

    def remove_lora(self, path: str | os.PathLike) -> list[dict[str, Any]]:
        """Take one adapter out of the stack (``NotFound`` if it is not there)."""
        return self._client._call("remove_lora", {"context": self.id, "path": lora_ref(path)}
                                  )["loras"]

    def clear_loras(self) -> list[dict[str, Any]]:
        """Back to the base model."""
        return self._client._call("clear_loras", {"context": self.id})["loras"]

    def set_loras(self, loras: Iterable[LoraItem]) -> list[dict[str, Any]]:
        """Replace the whole stack atomically (on any error the stack is unchanged)."""
        args = {"context": self.id, "loras": lora_stack(loras)}
        return self._client._call("set_loras", args, timeout=self._client.load_timeout)["loras"]

    def loras(self) -> list[dict[str, Any]]:
        """The stack in order: ref, path, scale, alpha, rank, targets, bytes, alora."""
        return self._client._call("list_loras", {"context": self.id})

    def cancel(self) -> None:
        """Cancel every stream of this handle that is still running."""
        for stream in self._streams:
            stream.cancel()

    def close(self) -> None:
        """Close the context on the daemon (its running streams end as cancelled)."""
        for stream in self._streams:
            stream.close()
        self._streams.clear()
        self._client._call("close_context", {"context": self.id})

    def _track(self, stream: Stream) -> Stream:
        self._streams = [s for s in self._streams if not s.done]
        self._streams.append(stream)
        return stream

    def __enter__(self) -> Context:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Stream:
    """A running generation. Iterate it for :class:`Chunk`; then read ``finish_reason``,
    ``metrics`` and ``text``. Leaving the loop early cancels the request on the daemon."""

    def __init__(self, client: Client, op: str, args: dict[str, Any], timeout: float) -> None:
        self._client = client
        self.timeout = timeout
        credit = args.get("credit", 64)
        self.request_id = client._register(op, args)
        self._state = StreamState(self.request_id, credit)
        self._iterating = False
        self._cancel_sent = False

    @property
    def finish_reason(self) -> str | None:
        return self._state.finish_reason

    @property
    def metrics(self) -> dict[str, Any]:
        return self._state.metrics

    @property
    def text(self) -> str:
        return self._state.text

    @property
    def done(self) -> bool:
        return self._state.done

    def __iter__(self) -> Iterator[Chunk]:
        if self._iterating:
            raise InternalError("a stream can be iterated only once")
        self._iterating = True
        finished = False
        try:
            while not self._state.done:
                reply = self._client._next_reply(self.request_id, self.timeout)
                chunk = self._state.apply(reply)
                if chunk is None:
                    break
                grant = self._state.credit_to_grant()
                if grant and not self._cancel_sent:
                    self._client._send(
                        Request(
                            id=self._client._ids.next(),
                            op="credit",
                            args={"request": self.request_id, "n": grant},
                        )
                    )
                yield chunk
            finished = True
        finally:
            if not finished:
                self._abandon()
            self._client._inbox.pop(self.request_id, None)
        if self._state.error is not None:
            raise self._state.error

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
        if not self._state.done and not self._cancel_sent:
            self._cancel_sent = True
            self._client._cancel_soon(self.request_id)

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
                self._client._cancel_soon(self.request_id)

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
