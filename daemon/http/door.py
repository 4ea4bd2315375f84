"""The HTTP door's core: runs OpenAI calls on the daemon's engine, without HTTP.

A call becomes a lorad ``chat`` or ``generate`` request with an explicit adapter stack (the
``model`` field's adapter, then the ``lora`` list; empty for the base model), validated by the
protocol's own schema and limits, on a context of the door's pool (:mod:`.pool`), with a
:class:`~lorad.daemon.requests.RequestHandle` whose replies go to a :class:`Run` instead of a
socket. So the engine batches HTTP streams with ZeroMQ ones, and both share adapters, limits,
metrics (``transport: http``) and logs. The web framework (:mod:`.app`) only moves bytes.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import trio

from lorad.protocol import ErrorCode, ProtocolError, Reply
from lorad.protocol.args import parse_args

from ..config import HttpSettings
from ..errors import DaemonError, to_protocol
from ..logs import log
from ..requests import RequestHandle
from ..schemas import grammar_for
from ..services import Services
from ..workers import CLIENT
from .catalog import Catalog
from .openai import ApiError, Call
from .pool import ContextPool
from .responses import ResponseStore

PEER = b"\x00http"
CREDIT = 64
"""Items a stream may run ahead of the HTTP response (granted again as they are written)."""


class Run:
    """One running generation: its replies, in order, and its cancellation."""

    def __init__(self) -> None:
        self._send, self._recv = trio.open_memory_channel[Reply](math.inf)
        self.handle: RequestHandle | None = None

    def deliver(self, _peer: bytes, reply: Reply) -> None:
        self._send.send_nowait(reply)

    async def next(self) -> Reply:
        """The next reply (``item``, then ``end`` or ``error``); each item read lets the
        stream run one item further."""
        reply = await self._recv.receive()
        if reply.kind == "item" and self.handle is not None:
            self.handle.grant(1)
        return reply

    def cancel(self) -> None:
        """The client went away: the generation stops within a step."""
        if self.handle is not None and not self.handle.finished:
            self.handle.cancel()


class Door:
    """What the HTTP routes call (see the module)."""

    def __init__(self, services: Services, settings: HttpSettings) -> None:
        self.s = services
        self.settings = settings
        self.catalog = Catalog(services.engine)
        self.pool = ContextPool(services.engine, size=settings.contexts, n_ctx=settings.n_ctx,
                                max_queued=settings.max_queued)
        self._ids = itertools.count(1)
        self.responses = ResponseStore()
        """Responses kept for ``previous_response_id`` (``POST /v1/responses``)."""

    def check_open(self) -> None:
        if self.s.draining:
            raise ApiError(503, "the daemon is shutting down", code="shutting_down",
                           retry_after=5)

    async def start(self, call: Call, client: str | None = None) -> tuple[Run, Any]:
        """Queue ``call`` (from ``client``, an address for the log); its run and the model's
        ``piece`` (token -> bytes)."""
        self.check_open()
        CLIENT.set(f"http:{client}".encode())  # this request's task: its file-work cap
        entry, names = await self.catalog.resolve(call.model)
        items = [(name, 1.0) for name in names] + call.loras
        args: dict[str, Any] = {**call.args, "loras": [list(i) for i in items],
                                "credit": CREDIT}
        if call.logprobs is not None:
            args["logprobs"] = max(1, call.logprobs)  # the chosen token's comes with them
        if call.response_format is not None:
            args["grammar"] = await grammar_for(call.response_format)
        if (call.op == "chat" and "template" not in args and self.settings.chat_template
                and entry.template is None):
            args["template"] = self.settings.chat_template
        parse_args(call.op, {**args, "context": "-"}, self.s.limits)  # before any context
        actor = await self.pool.choose(entry, tuple(items), call.prompt_key)
        run = Run()
        try:
            oargs = parse_args(call.op, {**args, "context": actor.id}, self.s.limits)
            run.handle = handle = self._handle(call.op, oargs, run.deliver, client)
            with _recorded(handle):
                await self.s.engine.stacks.submit(actor, handle)
        finally:
            self.pool.release(actor)
        return run, entry.piece

    async def embed(self, model: str, inputs: list[str], client: str | None = None
                    ) -> dict[str, Any]:
        self.check_open()
        entry, names = await self.catalog.resolve(model)
        if names:
            raise ApiError(400, "embeddings under an adapter are not served here: name the "
                           f"base model ({entry.id!r})", code="bad_request", param="model")
        args = parse_args("embed", {"model": entry.id, "input": inputs}, self.s.limits)
        handle = self._handle("embed", args, lambda _peer, _reply: None, client)
        with _recorded(handle):
            result = await self.s.engine.embed(args, None, lambda: False)
        handle.send_result(None)
        return result

    def _handle(self, op: str, args: Any, send: Any, client: str | None) -> RequestHandle:
        """A request of the door, counted, logged and measured like a ZeroMQ one when it
        finishes (``Services.record``)."""
        handle = RequestHandle(PEER, next(self._ids), op, args, send, self.s.record)
        handle.transport = "http"
        handle.client = client
        self.s.counters["requests"] += 1
        return handle

    def refused(self, error: ApiError, path: str, client: str | None = None) -> None:
        """Count and log a request refused before it reached the engine (bad body, unknown
        model, no API key, draining ...)."""
        self.s.counters["requests"] += 1
        self.s.counters["errors"] += 1
        outcome = error.code or str(error.status)
        self.s.metrics.request(model=None, context=None, outcome=outcome, end_metrics=None,
                               elapsed_ms=0.0, transport="http")
        log.info("request", transport="http", path=path, status=error.status,
                 outcome=outcome, error=error.message, **({"client": client} if client else {}))


@contextmanager
def _recorded(handle: RequestHandle) -> Iterator[None]:
    """A lorad error inside ends ``handle`` with it (so it is counted and logged) and leaves
    as :class:`Recorded`."""
    try:
        yield
    except (ProtocolError, DaemonError) as exc:
        error = to_protocol(exc)
        handle.send_error(error)
        raise Recorded(ApiError.from_protocol(error)) from None


class Recorded(Exception):
    """An :class:`ApiError` whose request was counted and logged already."""

    def __init__(self, error: ApiError) -> None:
        super().__init__(error.message)
        self.error = error


def protocol_error(exc: Exception) -> ApiError:
    """Any failure of a call as an :class:`ApiError`."""
    if isinstance(exc, Recorded):
        return exc.error
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, (ProtocolError, DaemonError)):
        return ApiError.from_protocol(to_protocol(exc))
    return ApiError.from_protocol(ProtocolError(ErrorCode.INTERNAL,
                                                f"{type(exc).__name__}: {exc}"))
