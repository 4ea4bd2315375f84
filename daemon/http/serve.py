"""Running the HTTP door: Hypercorn's HTTP/1.1 connections in the daemon's nursery, each
contained (whatever fails in one connection ends that connection, never the daemon).

Security rule, checked before anything binds: a non-loopback address needs API keys
(``--api-key-file`` / ``api_keys``); without them only loopback (127.0.0.0/8, ::1,
``localhost``) is served, and any other address is refused at start with a clear message.
"""

from __future__ import annotations

import ipaddress
import logging
from functools import partial

import trio
from hypercorn.config import Config
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import AppWrapper, ConnectionState
from hypercorn.utils import repr_socket_addr, wrap_app

from ..errors import ConfigError
from ..logs import log
from .app import make_app
from .door import Door


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) as ``(host, port)``; ``ConfigError`` otherwise."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"http address {address!r}: give HOST:PORT, e.g. 127.0.0.1:8000",
                          field="http_address")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(address: str, api_keys: list[str]) -> None:
    """Refuse a non-loopback address without API keys (see the module)."""
    host, _ = split_address(address)
    if not is_loopback(host) and not api_keys:
        raise ConfigError(
            f"http address {address!r} is not loopback: anyone who can reach it could use "
            "every model and adapter. Give API keys (--api-key-file FILE, one key per line, "
            "or api_keys in the config file), or bind 127.0.0.1", field="http_address")


async def serve_http(door: Door, address: str, *, api_keys: list[str], cors_origins: list[str],
                     metrics: bool = False,
                     task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the door on ``address`` until cancelled; ``task_status`` gets the bound URL."""
    check_exposure(address, api_keys)
    host, port = split_address(address)
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("lorad.http")
    config.include_server_header = False
    config.h11_max_incomplete_size = 64 * 1024  # request line and headers
    config.graceful_timeout = 1.0
    config.read_timeout = 60  # a client that stops sending its request is dropped
    hosts = None if api_keys else _loopback_hosts(host)
    app = make_app(door, api_keys=api_keys, cors_origins=cors_origins, hosts=hosts,
                   metrics=metrics)
    try:  # bound here, so that a taken port is one clear error, not a task group's
        sockets = config.create_sockets()
        for sock in sockets.insecure_sockets:
            sock.listen(config.backlog)
    except OSError as exc:
        raise ConfigError(f"cannot serve HTTP on {address!r}: {exc}",
                          field="http_address") from None
    listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(sock))
                 for sock in sockets.insecure_sockets]
    first = sockets.insecure_sockets[0]
    handler = partial(_connection, wrap_app(app, config.wsgi_max_body_size, None), config,
                      WorkerContext(None))
    async with trio.open_nursery() as connections:
        task_status.started(f"http://{repr_socket_addr(first.family, first.getsockname())}")
        await trio.serve_listeners(handler, listeners, handler_nursery=connections)


async def _connection(app: AppWrapper, config: Config, context: WorkerContext,
                      stream: trio.SocketStream) -> None:
    """One client connection, served by Hypercorn (what its ``worker_serve`` does, less the
    lifespan events this app has no use for). Whatever escapes a connection ends that
    connection only: a body shorter than its ``Content-Length`` and then a half-close made
    Hypercorn answer h11's error while the app was answering, and its ``BusyResourceError``
    went up through ``worker_serve`` and stopped the daemon (the HTTP fuzz, issue 24)."""
    try:
        await TCPServer(app, config, context, ConnectionState({}), stream)
    except Exception as exc:
        log.warning("http_connection_failed", error=_describe(exc)[:300])


def _describe(exc: BaseException) -> str:
    """``Type: message``, for each exception inside a group."""
    inner = getattr(exc, "exceptions", None)
    if inner:
        return "; ".join(_describe(e) for e in inner)
    return f"{type(exc).__name__}: {exc}"


def _loopback_hosts(host: str) -> list[str]:
    """The ``Host`` values a keyless (loopback) door answers."""
    return sorted({"localhost", "127.0.0.1", "::1", "[::1]", host})
