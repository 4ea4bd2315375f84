"""The OpenAI-compatible HTTP routes (Starlette): bytes in, :class:`.door.Door` calls, bytes out.

``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``
and ``POST /v1/embeddings``. API keys (``Authorization: Bearer``, compared in constant time)
guard everything but ``/health`` when configured; bodies are bounded by the protocol's message
limit; streams are Server-Sent Events ending in ``data: [DONE]``. A client that goes away
cancels its request (Starlette cancels a streaming response on ``http.disconnect``; a plain
one is watched for it).
"""

from __future__ import annotations

import hmac
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from lorad.protocol import ProtocolError, Reply

from ..logs import log
from . import openai
from .door import Door, Recorded, Run, protocol_error
from .openai import ApiError

_CANCELLED = ApiError(503, "the request was cancelled by the daemon (it is shutting down, or "
                      "the model was unloaded)", code="cancelled", retry_after=5)


def _error(exc: ApiError) -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


async def _body(request: Request, limit: int) -> Any:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":  # no "simple" cross-site POST (text/plain, forms)
        raise ApiError(415, "the body must be JSON: Content-Type: application/json",
                       code="bad_request")
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise ApiError(413, f"the request body is larger than limits.max_message_bytes "
                       f"({limit} bytes)", code="too_large")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise ApiError(413, f"the request body is larger than limits.max_message_bytes "
                           f"({limit} bytes)", code="too_large")
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise openai.bad(f"the body is not valid JSON ({str(exc)[:100]})") from None


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


class Routes:
    """The handlers, bound to one door."""

    def __init__(self, door: Door, api_keys: list[str]) -> None:
        self.door = door
        self.keys = [k.encode() for k in api_keys]
        self.limit = door.s.limits.max_message_bytes

    def authorized(self, request: Request) -> bool:
        if not self.keys:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode() if scheme.lower() == "bearer" else b""
        ok = False
        for key in self.keys:  # every key compared, each in constant time
            ok |= hmac.compare_digest(given, key)
        return ok

    def guarded(self, handler: Callable[[Request], Awaitable[Response]]
                ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            if not self.authorized(request):
                error = ApiError(401, "a valid API key is required: Authorization: Bearer KEY",
                                 code="invalid_api_key")
                self.door.refused(error, request.url.path, _client(request))
                return _error(error)
            try:
                return await handler(request)
            except ClientDisconnect:  # gone while sending its body: nobody to answer
                return Response(status_code=499)
            except Exception as exc:
                api = protocol_error(exc)
                if not isinstance(exc, Recorded):
                    if api.status >= 500 and not isinstance(exc, ApiError):
                        log.exception("http_internal_error", path=request.url.path)
                    self.door.refused(api, request.url.path, _client(request))
                return _error(api)
        return endpoint

    async def health(self, request: Request) -> Response:
        if self.door.s.draining:
            return JSONResponse({"status": "shutting_down"}, status_code=503,
                                headers={"Retry-After": "5"})
        return JSONResponse({"status": "ok"})

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": await self.door.catalog.listing()})

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, openai.parse_chat, "chatcmpl")

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, openai.parse_completion, "cmpl")

    async def embeddings(self, request: Request) -> Response:
        model, inputs, encoding = openai.parse_embeddings(await _body(request, self.limit))
        result = await self.door.embed(model, inputs, _client(request))
        return JSONResponse(openai.embeddings_response(model, result, encoding))

    async def _generate(self, request: Request, parse: Callable[..., openai.Call],
                        prefix: str) -> Response:
        call = parse(await _body(request, self.limit), self.door.s.limits)
        run, piece = await self.door.start(call, _client(request))
        try:
            out = openai.Output(call, call.model, f"{prefix}-{secrets.token_hex(12)}", piece)
            if call.stream:
                # The status waits for the first reply: an error before any token (a prompt
                # too long, a template or grammar refused) is an HTTP error, not an event.
                first = await _until_disconnect(request, run, run.next())
                if first.kind == "error":
                    raise Recorded(ApiError.from_protocol(_wire_error(first)))
                return _EventStream(run, self._events(run, out, first))
            end = await _until_disconnect(request, run, _collect(run, out))
            return JSONResponse(out.response(end))
        except BaseException:
            run.cancel()
            raise

    async def _events(self, run: Run, out: openai.Output, first: Reply
                      ) -> AsyncIterator[bytes]:
        try:
            opening = out.first_chunk()
            if opening is not None:
                yield _sse(opening)
            reply: Reply | None = first
            while True:
                if reply is None:
                    reply = await run.next()
                if reply.kind == "item":
                    try:
                        chunks = out.add(reply.item)
                    except ProtocolError as exc:  # the model was unloaded under the stream
                        yield _sse(ApiError.from_protocol(exc).body())
                        return
                    for chunk in chunks:
                        yield _sse(chunk)
                elif reply.kind == "end":
                    if reply.result.get("finish_reason") == "cancelled":
                        yield _sse(_CANCELLED.body())
                        return
                    for chunk in out.last_chunks(reply.result):
                        yield _sse(chunk)
                    yield b"data: [DONE]\n\n"
                    return
                else:  # an error after the stream began: OpenAI's convention, then the end
                    yield _sse(ApiError.from_protocol(_wire_error(reply)).body())
                    return
                reply = None
        finally:  # the client went away (or the response ended): stop the generation
            run.cancel()


def _wire_error(reply: Reply) -> ProtocolError:
    e = reply.error or {}
    return ProtocolError(e.get("code", "internal"), e.get("message", "error"),
                         **(e.get("details") or {}))


async def _collect(run: Run, out: openai.Output) -> dict[str, Any]:
    while True:
        reply = await run.next()
        if reply.kind == "item":
            out.add(reply.item)
        elif reply.kind == "end":
            if reply.result.get("finish_reason") == "cancelled":  # the client is gone, or
                raise _CANCELLED  # the daemon stops: either way not a completion
            return reply.result
        else:
            raise Recorded(ApiError.from_protocol(_wire_error(reply)))


class _EventStream(StreamingResponse):
    """An SSE response whose generation is cancelled however the response ends (a client
    gone before the first event never starts the generator, so its ``finally`` would not
    run)."""

    def __init__(self, run: Run, events: AsyncIterator[bytes]) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})
        self.run = run

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.run.cancel()


async def _until_disconnect(request: Request, run: Run, work: Awaitable[Any]) -> Any:
    """``work``'s result; the run is cancelled if the client disconnects first."""
    result: list[Any] = []

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                run.cancel()
                return

    failure: list[BaseException] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        try:
            result.append(await work)
        except Exception as exc:  # raised as itself, not wrapped in the group's ExceptionGroup
            failure.append(exc)
        finally:
            tg.cancel_scope.cancel()
    if failure:
        raise failure[0]
    return result[0]


async def _not_found(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 404)
    return _error(ApiError(status, f"{request.method} {request.url.path}: "
                           f"{'no such endpoint' if status == 404 else 'method not allowed'}",
                           code="not_found" if status == 404 else "bad_request"))


def _client(request: Request) -> str | None:
    """The client's address, ``host:port`` (for the log)."""
    return f"{request.client.host}:{request.client.port}" if request.client else None


def make_app(door: Door, *, api_keys: list[str], cors_origins: list[str],
             hosts: list[str] | None = None) -> Starlette:
    """The ASGI application; ``hosts``: the ``Host`` headers accepted (None: any)."""
    r = Routes(door, api_keys)
    routes = [
        Route("/health", r.health, methods=["GET"]),
        Route("/v1/models", r.guarded(r.models), methods=["GET"]),
        Route("/v1/chat/completions", r.guarded(r.chat), methods=["POST"]),
        Route("/v1/completions", r.guarded(r.completions), methods=["POST"]),
        Route("/v1/embeddings", r.guarded(r.embeddings), methods=["POST"]),
    ]
    middleware = []
    if hosts is not None:  # no keys: no DNS rebinding onto the loopback door
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=hosts))
    if cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=cors_origins,
                                     allow_methods=["GET", "POST"], allow_headers=["*"]))
    return Starlette(routes=routes, middleware=middleware,
                     exception_handlers={404: _not_found, 405: _not_found})
