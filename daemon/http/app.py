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
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import trio
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lorad.protocol import ProtocolError, Reply
from lorad.protocol.errors import echo

from ..logs import log
from . import openai, responses
from .door import Door, Recorded, Run, protocol_error, wire_error
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
        text = data.decode("utf-8-sig")  # JSON is UTF-8 (RFC 8259; a BOM is ignored)
    except UnicodeDecodeError as exc:
        raise openai.bad(f"the body is not UTF-8 ({str(exc)[:100]})") from None
    long_numbers = False

    def parse_int(digits: str) -> int:
        nonlocal long_numbers
        number = int(digits)
        long_numbers = long_numbers or number not in _INT_RANGE
        return number

    try:
        value = json.loads(text, parse_int=parse_int)
    except (ValueError, RecursionError) as exc:
        raise openai.bad(f"the body is not valid JSON ({str(exc)[:100]})") from None
    _check_values(text, value, long_numbers)
    return value


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_INT_RANGE = range(-(2**63), 2**64)
"""The integers a lorad message can carry (msgpack's)."""


def _check_values(text: str, value: Any, long_numbers: bool) -> None:
    """Refuse what JSON can say but a lorad message cannot: a lone surrogate (a \\uD800-\\uDFFF
    escape without its pair: pairs decode to one character) in a string or key, or an integer
    past 64 bits (``long_numbers``: the parser met one). The text is searched for the escape
    first, so a body with neither is not walked. (Searching it for 20 digits in a row took
    3.3 ms of the event loop for a 300 KB prompt, the GIL held: the parser's integers are
    checked as they are made instead.)"""
    surrogates = _SURROGATE_ESCAPE.search(text) is not None
    stack: list[tuple[Any, str | None]] = [(value, None)]
    while stack and (surrogates or long_numbers):
        item, top = stack.pop()
        if isinstance(item, str):
            if surrogates and _SURROGATE.search(item):
                raise openai.bad("a string has a lone surrogate (a \\uD800-\\uDFFF escape "
                                 "without its pair): strings must be Unicode text", top)
        elif isinstance(item, int):
            if long_numbers and item not in _INT_RANGE:
                raise openai.bad("an integer does not fit 64 bits", top)
        elif isinstance(item, dict):
            for key, v in item.items():
                if surrogates and _SURROGATE.search(key):
                    raise openai.bad("a key has a lone surrogate (a \\uD800-\\uDFFF escape "
                                     "without its pair): keys must be Unicode text", top)
                stack.append((v, top if item is not value else key))
        elif isinstance(item, list):
            stack.extend((v, top) for v in item)


def _fields(body: Any, *, required: tuple[str, ...], optional: dict[str, type]
            ) -> dict[str, Any]:
    """A small JSON object's fields: ``required`` non-empty strings, ``optional`` of their
    type; any other key is refused."""
    if not isinstance(body, dict):
        raise openai.bad("the request body must be a JSON object")
    for key in body:
        if key not in required and key not in optional:
            raise openai.bad(f"unknown parameter {echo(key)!r}", echo(key),
                             code="unknown_parameter")
    for key in required:
        if not isinstance(body.get(key), str) or not body[key]:
            raise openai.bad(f"{key!r} is required: a non-empty string", key)
    for key, kind in optional.items():
        value = body.get(key)
        if value is not None and (not isinstance(value, kind) or (
                kind is int and isinstance(value, bool))):
            raise openai.bad(f"{key!r} must be a {kind.__name__}", key)
    return body


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


_ADAPTER_PARAMS = {"name": "lora_name", "path": "lora_path"}
"""vLLM's names of ``name_lora``'s arguments."""


def _named_sse(event: dict[str, Any]) -> bytes:
    """A Responses API event: its type as the SSE event name."""
    return (b"event: " + event["type"].encode() + b"\n" + _sse(event))


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
                elif api.status >= 500:  # its request line has the code only: say why
                    log.warning("http_server_error", path=request.url.path, status=api.status,
                                code=api.code, error=api.message, client=_client(request))
                return _error(api)
        return endpoint

    async def health(self, request: Request) -> Response:
        if self.door.s.draining:
            return JSONResponse({"status": "shutting_down"}, status_code=503,
                                headers={"Retry-After": "5"})
        return JSONResponse({"status": "ok"})

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": await self.door.catalog.listing()})

    async def model(self, request: Request) -> Response:
        return JSONResponse(await self.door.catalog.entry(request.path_params["model"]))

    async def load_adapter(self, request: Request) -> Response:
        """vLLM's ``POST /v1/load_lora_adapter``: ``{lora_name, lora_path, load_inplace?}``,
        lorad's ``name_lora``."""
        body = _fields(await _body(request, self.limit), required=("lora_name", "lora_path"),
                       optional={"load_inplace": bool})
        if any(m.id == body["lora_name"] for m in self.door.s.engine.models):
            raise openai.bad(f"{body['lora_name']!r} is the id of a loaded model: name the "
                             "adapter otherwise", "lora_name")
        await self.door.call("name_lora", {"name": body["lora_name"], "path": body["lora_path"],
                                           "replace": bool(body.get("load_inplace"))},
                             _client(request), _ADAPTER_PARAMS)
        return PlainTextResponse(f"Success: LoRA adapter '{body['lora_name']}' added "
                                 "successfully.")

    async def unload_adapter(self, request: Request) -> Response:
        """vLLM's ``POST /v1/unload_lora_adapter``: ``{lora_name}``, lorad's ``unname_lora``."""
        body = _fields(await _body(request, self.limit), required=("lora_name",),
                       optional={"lora_int_id": int})
        if body.get("lora_int_id") is not None:
            raise openai.bad("lora_int_id: lorad names adapters, it does not number them: "
                             "give lora_name only", "lora_int_id",
                             code="unsupported_parameter")
        await self.door.call("unname_lora", {"name": body["lora_name"]}, _client(request),
                             _ADAPTER_PARAMS)
        return PlainTextResponse(f"Success: LoRA adapter '{body['lora_name']}' removed "
                                 "successfully.")

    async def lora_adapters(self, request: Request) -> Response:
        """llama-server's ``GET /lora-adapters``."""
        return JSONResponse(await self.door.catalog.adapters())

    async def set_lora_adapters(self, request: Request) -> Response:
        """llama-server's ``POST /lora-adapters`` sets scales for every later request: lorad
        has no such global state (a stack is per request or per context)."""
        raise openai.bad("lorad has no global adapter scales: give a stack per request "
                         "(\"lora\": [{\"name\", \"scale\"}]) or name the adapter as "
                         "\"model\"", code="unsupported_parameter")

    async def metrics(self, request: Request) -> Response:
        """Prometheus' text format (``[http] metrics = true``)."""
        from .. import prometheus

        return Response(prometheus.render(self.door.s.metrics.snapshot),
                        media_type=prometheus.CONTENT_TYPE)

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, openai.parse_chat, "chatcmpl")

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, openai.parse_completion, "cmpl")

    async def responses(self, request: Request) -> Response:
        """OpenAI's Responses API (:mod:`.responses`)."""
        req = responses.parse_response_request(await _body(request, self.limit),
                                               self.door.s.limits, self.door.responses)
        run, _piece = await self.door.start(req.call, _client(request))
        try:
            out = responses.ResponseOutput(req, req.call.model)
            if req.call.stream:
                first = await _until_disconnect(request, run, run.next())
                if first.kind == "error":
                    raise Recorded(ApiError.from_protocol(wire_error(first)))
                return _EventStream(run, self._response_events(run, out, first))
            end = await _until_disconnect(request, run, _collect(run, out))
            self._keep(out, end)
            return JSONResponse(out.body(out.status(end), end))
        except BaseException:
            run.cancel()
            raise

    def _keep(self, out: responses.ResponseOutput, end: dict[str, Any]) -> None:
        if out.request.store:
            self.door.responses.put(out.id, out.conversation(end))

    async def _response_events(self, run: Run, out: responses.ResponseOutput, first: Reply
                               ) -> AsyncIterator[bytes]:
        try:
            for event in out.start():
                yield _named_sse(event)
            reply: Reply | None = first
            while True:
                if reply is None:
                    reply = await run.next()
                if reply.kind == "item":
                    for event in out.add(reply.item):
                        yield _named_sse(event)
                elif reply.kind == "end" and reply.result.get("finish_reason") != "cancelled":
                    self._keep(out, reply.result)
                    for event in out.finish(reply.result):
                        yield _named_sse(event)
                    return
                else:  # an error (or the daemon cancelled it) after the stream began
                    error = (_CANCELLED if reply.kind == "end"
                             else ApiError.from_protocol(wire_error(reply)))
                    yield _named_sse({"type": "error", "sequence_number": out.sequence,
                                      "code": error.code, "message": error.message,
                                      "param": error.param})
                    return
                reply = None
        finally:
            run.cancel()

    async def embeddings(self, request: Request) -> Response:
        model, inputs, encoding = openai.parse_embeddings(await _body(request, self.limit))
        run = await self.door.embed(model, inputs, _client(request))
        try:  # a client that goes away cancels its embedding between inputs
            result = await _until_disconnect(request, run, self.door.embedding(run))
        except BaseException:
            run.cancel()
            raise
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
                    raise Recorded(ApiError.from_protocol(wire_error(first)))
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
                    yield _sse(ApiError.from_protocol(wire_error(reply)).body())
                    return
                reply = None
        finally:  # the client went away (or the response ended): stop the generation
            run.cancel()


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
            raise Recorded(ApiError.from_protocol(wire_error(reply)))


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


async def _internal(request: Request, exc: Exception) -> Response:
    """Anything no handler answered (a bug): logged with its traceback, answered in OpenAI's
    shape."""
    log.error("http_internal_error", path=request.url.path, exc_info=exc)
    return _error(ApiError(500, f"internal error ({type(exc).__name__})", code="internal"))


_BROKEN = (trio.BusyResourceError, trio.BrokenResourceError, trio.ClosedResourceError)


class _BrokenConnections:
    """A connection that breaks under its answer ends that request with a warning, not an
    error: Hypercorn sends the EOF of a connection the client half-closed while the app is
    writing to it (``BusyResourceError``), which is the client's doing, not a bug here."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        except _BROKEN as exc:
            log.warning("http_connection_failed", path=scope.get("path"),
                        error=f"{type(exc).__name__}: {exc}"[:300])


class _Ingress:
    """A request waits at the door while the event loop has had its share of the step that
    decodes (the ZeroMQ door's rule too: :mod:`lorad.daemon.ingress`)."""

    def __init__(self, app: ASGIApp, admit: Callable[[], Awaitable[None]]) -> None:
        self.app = app
        self.admit = admit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.admit()
        await self.app(scope, receive, send)


class _UnreadBodies:
    """An answer sent before its request's body was read (a 404, a 415, a 413 on
    ``Content-Length``, a refused ``Host``...) says ``Connection: close``: Hypercorn closes such
    a connection after the answer, and a client that reused it meanwhile lost its next request
    (the HTTP fuzz: 1 in ~300)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope.get("headers") or []) if scope["type"] == "http" else {}
        if headers.get(b"content-length", b"0") == b"0" and b"transfer-encoding" not in headers:
            await self.app(scope, receive, send)
            return
        read = False

        async def receiving() -> Message:
            nonlocal read
            message = await receive()
            read = read or message["type"] != "http.request" or not message.get("more_body")
            return message

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start" and not read:
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receiving, sending)


class _TrustedHosts:
    """Only requests whose ``Host`` names one of ``hosts`` (no DNS rebinding onto a keyless
    loopback door); any other is a 400 in OpenAI's shape."""

    def __init__(self, app: ASGIApp, hosts: list[str]) -> None:
        self.app = app
        self.hosts = {h.lower() for h in hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = Headers(scope=scope).get("host", "").lower()
            name = host[: host.find("]") + 1] if host.startswith("[") else host.partition(":")[0]
            if name not in self.hosts:
                error = ApiError(400, "the Host header names no address of this door",
                                 code="bad_request")
                await _error(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _client(request: Request) -> str | None:
    """The client's address, ``host:port`` (for the log)."""
    return f"{request.client.host}:{request.client.port}" if request.client else None


def make_app(door: Door, *, api_keys: list[str], cors_origins: list[str],
             hosts: list[str] | None = None, metrics: bool = False) -> Starlette:
    """The ASGI application; ``hosts``: the ``Host`` headers accepted (None: any);
    ``metrics``: also serve Prometheus' ``/metrics``."""
    r = Routes(door, api_keys)
    routes = [
        Route("/health", r.health, methods=["GET"]),
        Route("/v1/models", r.guarded(r.models), methods=["GET"]),
        Route("/v1/models/{model:path}", r.guarded(r.model), methods=["GET"]),
        Route("/v1/load_lora_adapter", r.guarded(r.load_adapter), methods=["POST"]),
        Route("/v1/unload_lora_adapter", r.guarded(r.unload_adapter), methods=["POST"]),
        Route("/lora-adapters", r.guarded(r.lora_adapters), methods=["GET"]),
        Route("/lora-adapters", r.guarded(r.set_lora_adapters), methods=["POST"]),
        Route("/v1/chat/completions", r.guarded(r.chat), methods=["POST"]),
        Route("/v1/completions", r.guarded(r.completions), methods=["POST"]),
        Route("/v1/embeddings", r.guarded(r.embeddings), methods=["POST"]),
        Route("/v1/responses", r.guarded(r.responses), methods=["POST"]),
    ]
    if metrics:
        routes.append(Route("/metrics", r.guarded(r.metrics), methods=["GET"]))
    middleware = [Middleware(_Ingress, admit=door.s.engine.ingress.admit),
                  Middleware(_BrokenConnections), Middleware(_UnreadBodies)]
    if hosts is not None:  # no keys: no DNS rebinding onto the loopback door
        middleware.append(Middleware(_TrustedHosts, hosts=hosts))
    if cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=cors_origins,
                                     allow_methods=["GET", "POST"], allow_headers=["*"]))
    app = Starlette(routes=routes, middleware=middleware,
                    exception_handlers={404: _not_found, 405: _not_found, Exception: _internal})
    app.router.redirect_slashes = False  # "/v1/models/" is a 404, not a bare 307
    return app
