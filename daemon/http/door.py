"""The HTTP door's core: OpenAI calls into the daemon's request pipeline, without HTTP.

A call becomes a lorad ``chat``, ``generate`` or ``embed`` request with an explicit adapter
stack (the ``model`` field's adapter, then the ``lora`` list; empty for the base model) and
goes through the same :class:`~lorad.daemon.pipeline.Pipeline` as a ZeroMQ one: admission (the
connection is the peer: its session and quotas), the protocol's schema and limits, the
operation's handler, error mapping, metrics (``transport: http``) and logs. Its replies go to a
:class:`Run` instead of a socket. A stateless request runs on a context of the door's pool
(:mod:`.pool`), picked once it is admitted, so the engine batches HTTP streams with ZeroMQ ones.
The web framework (:mod:`.app`) only moves bytes.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import trio

from lorad.protocol import ErrorCode, ProtocolError, Reply

from ..config import HttpSettings
from ..errors import DaemonError, to_protocol
from ..logs import log
from ..pipeline import Pipeline, end_cancelled
from ..requests import RequestHandle
from ..schemas import grammar_for
from ..services import Services
from ..sessions import http_peer
from ..workers import CLIENT
from .catalog import Catalog
from .openai import ApiError, Call
from .pool import ContextPool
from .responses import ResponseStore

PICKED = "-"
"""The ``context`` a request is admitted with: the door picks one of its pool's after."""
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
        self.pipeline = Pipeline(services)
        self._ids = itertools.count(1)
        self.responses = ResponseStore()
        """Responses kept for ``previous_response_id`` (``POST /v1/responses``)."""

    async def start(self, call: Call, client: str | None = None) -> tuple[Run, Any]:
        """Queue ``call`` (from ``client``, the connection's ``host:port``) through the request
        pipeline; its run and the model's ``piece`` (token -> bytes)."""
        CLIENT.set(http_peer(client))  # this request's task: its file-work cap
        entry, names = await self.catalog.resolve(call.model)
        items = [(name, 1.0) for name in names] + call.loras
        args: dict[str, Any] = {**call.args, "loras": [list(i) for i in items],
                                "credit": CREDIT, "context": PICKED}
        if call.logprobs is not None:
            args["logprobs"] = max(1, call.logprobs)  # the chosen token's comes with them
        if call.response_format is not None:
            args["grammar"] = await grammar_for(call.response_format)
        if (call.op == "chat" and "template" not in args and self.settings.chat_template
                and entry.template is None):
            args["template"] = self.settings.chat_template
        run = Run()
        handle = run.handle = self._admit(call.op, args, run, client)
        try:  # a context of the door's pool: picked once the request is admitted
            actor = await self.pool.choose(entry, tuple(items), call.prompt_key)
        except (ProtocolError, DaemonError) as exc:
            error = to_protocol(exc)
            handle.send_error(error)
            raise Recorded(ApiError.from_protocol(error)) from None
        except BaseException:  # the client went away meanwhile
            end_cancelled(handle)
            raise
        try:
            handle.place(actor.id)
            await self.pipeline.run(handle)  # queued on the context; errors come as replies
        finally:
            self.pool.release(actor)
        return run, entry.piece

    async def embed(self, model: str, inputs: list[str], client: str | None = None) -> Run:
        """Admit an embedding request; :meth:`embedding` runs it."""
        entry, names = await self.catalog.resolve(model)
        if names:
            raise ApiError(400, "embeddings under an adapter are not served here: name the "
                           f"base model ({entry.id!r})", code="bad_request", param="model")
        run = Run()
        run.handle = self._admit("embed", {"model": entry.id, "input": inputs}, run, client)
        return run

    async def embedding(self, run: Run) -> dict[str, Any]:
        """The result of an admitted embedding request (cancelled with its run)."""
        assert run.handle is not None
        await self.pipeline.run(run.handle)
        reply = await run.next()
        if reply.kind == "error":
            raise Recorded(ApiError.from_protocol(wire_error(reply)))
        return reply.result

    async def call(self, op: str, args: dict[str, Any], client: str | None = None,
                   params: dict[str, str] | None = None) -> Any:
        """Run a one-shot lorad operation through the pipeline; its result, or its error as
        an :class:`ApiError` (``params``: the API's names of the operation's arguments)."""
        run = Run()
        try:
            run.handle = self._admit(op, args, run, client)
            await self.pipeline.run(run.handle)
            reply = await run.next()
            if reply.kind == "error":
                raise Recorded(ApiError.from_protocol(wire_error(reply)))
            return reply.result
        except Recorded as exc:
            if params and exc.error.param in params:
                exc.error.param = params[exc.error.param]
            raise

    def _admit(self, op: str, args: dict[str, Any], run: Run, client: str | None
               ) -> RequestHandle:
        try:
            return self.pipeline.admit(http_peer(client), next(self._ids), op, args,
                                       run.deliver, transport="http", client=client)
        except ProtocolError as exc:  # counted and logged by the pipeline
            raise Recorded(ApiError.from_protocol(exc)) from None

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


def wire_error(reply: Reply) -> ProtocolError:
    """The lorad error of an ``error`` reply."""
    e = reply.error or {}
    return ProtocolError(e.get("code", "internal"), e.get("message", "error"),
                         **(e.get("details") or {}))


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
