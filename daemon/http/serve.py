"""Running the HTTP door: Hypercorn's trio worker in the daemon's nursery.

Security rule, checked before anything binds: a non-loopback address needs API keys
(``--api-key-file`` / ``api_keys``); without them only loopback (127.0.0.0/8, ::1,
``localhost``) is served, and any other address is refused at start with a clear message.
"""

from __future__ import annotations

import ipaddress
import logging

import trio
from hypercorn.config import Config
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app

from ..errors import ConfigError
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
    app = make_app(door, api_keys=api_keys, cors_origins=cors_origins, hosts=hosts)
    try:  # bound here, so that a taken port is one clear error, not a task group's
        sockets = config.create_sockets()
        for sock in sockets.insecure_sockets:
            sock.listen(config.backlog)
    except OSError as exc:
        raise ConfigError(f"cannot serve HTTP on {address!r}: {exc}",
                          field="http_address") from None
    await worker_serve(wrap_app(app, config.wsgi_max_body_size, None), config,
                       sockets=sockets, task_status=_Relay(task_status))


def _loopback_hosts(host: str) -> list[str]:
    """The ``Host`` values a keyless (loopback) door answers."""
    return sorted({"localhost", "127.0.0.1", "::1", "[::1]", host})


class _Relay:
    """Passes Hypercorn's list of bound URLs on as the first one."""

    def __init__(self, status: trio.TaskStatus[str]) -> None:
        self.status = status

    def started(self, binds: list[str] | None = None) -> None:
        self.status.started((binds or [""])[0])
