"""The ZeroMQ transport: binds the ROUTER socket, moves bytes, notices peers that are gone.

It turns frames into decoded requests for a :class:`Receiver` and replies into frames, applies
the endpoint's security rules (private ipc sockets, loopback-only TCP without CURVE, CURVE with
ZAP) and detects lost peers (``EHOSTUNREACH`` on a send, probes after disconnect events). It
knows nothing about models, contexts or operations.
"""

from __future__ import annotations

import errno
import grp
import ipaddress
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any, Protocol
from urllib.parse import urlsplit

import trio
import zmq
from zmq.utils.monitor import parse_monitor_message

from lorad.protocol import (
    ErrorCode,
    Limits,
    ProtocolError,
    Reply,
    Request,
    decode_request,
    encode_reply,
    error_reply,
)

from .errors import BindError
from .logs import log
from .pump import ZmqPump, monitor_socket

PROBE_DELAYS = (0.0, 0.05, 0.25, 1.0)
"""Seconds between the liveness probes sent after a disconnect event."""


class Receiver(Protocol):
    """What the transport delivers to (the dispatcher)."""

    async def request(self, peer: bytes, request: Request) -> None: ...

    def bad_message(self, peer: bytes, error: ProtocolError) -> None: ...

    def peer_gone(self, peer: bytes, reason: str) -> None: ...

    def peers_with_work(self) -> list[bytes]: ...

    def urgent(self, peer: bytes, request: Request) -> bool: ...


class ZmqTransport:
    """Serves one endpoint (``ipc://`` or ``tcp://``) with a ROUTER socket."""

    def __init__(self, endpoint: str, limits: Limits, *, heartbeat_ms: int = 1000,
                 group: str | None = None, curve_secret_key: str | None = None,
                 curve_authorized_keys: str | None = None,
                 admit: Callable[[], Awaitable[None]] | None = None) -> None:
        self.endpoint = endpoint
        self.admit = admit
        """Awaited before each message is handled (the engine's ingress gate), if given, but
        for the receiver's :meth:`~Receiver.urgent` ones (a cancel of a running request is
        never held for a step)."""
        self.limits = limits
        self.heartbeat_ms = heartbeat_ms
        self.group = group
        self.curve_secret_key = curve_secret_key
        self.curve_authorized_keys = curve_authorized_keys
        self.sock: zmq.Socket | None = None
        self.pump: ZmqPump | None = None
        self._ipc_path: str | None = None
        self._auth: Any = None  # the ZAP authenticator thread when CURVE is on
        self._probing = False
        self._probe_pending = False

    # -- binding ------------------------------------------------------------------------------
    def bind(self) -> None:
        """Create and bind the socket; :class:`BindError` when the endpoint cannot be served."""
        scheme = self.endpoint.split("://", 1)[0]
        sock = zmq.Context.instance().socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, self.limits.max_message_bytes + 4096)
        sock.setsockopt(zmq.HEARTBEAT_IVL, self.heartbeat_ms)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * self.heartbeat_ms)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 10_000)
        sock.setsockopt(zmq.LINGER, 1000)
        try:
            curve = self._setup_curve(sock)
            if scheme == "ipc":
                self._bind_ipc(sock, self.endpoint[len("ipc://"):])
            elif scheme == "tcp":
                self._bind_tcp(sock, curve)
            else:
                raise BindError(f"unsupported endpoint {self.endpoint!r} (use ipc:// or tcp://)",
                                field="endpoint")
        except BaseException:
            sock.close(linger=0)
            if self._auth is not None:
                self._auth.stop()
            raise
        self.sock = sock

    def _bind_tcp(self, sock: zmq.Socket, curve: bool) -> None:
        host = urlsplit(self.endpoint).hostname or ""
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback and not curve:
            raise BindError(
                f"refusing to serve on non-loopback TCP {self.endpoint!r} without CURVE: give "
                "--curve-secret-key and --curve-authorized-keys (see `lorad keys generate`), "
                "or use ipc:// or 127.0.0.1", field="endpoint")
        if not curve:
            log.warning("tcp_loopback", endpoint=self.endpoint,
                        note="any local user can connect; prefer ipc://")
        sock.bind(self.endpoint)

    def _setup_curve(self, sock: zmq.Socket) -> bool:
        """CURVE encryption, with ZAP refusing every client key not in the authorized
        directory (pyzmq's authenticator thread). False when not configured."""
        secret_file, authorized = self.curve_secret_key, self.curve_authorized_keys
        if not secret_file and not authorized:
            return False
        if not (secret_file and authorized):
            raise BindError("CURVE needs both a secret key file and a directory of authorized "
                            "client keys", field="curve")
        import zmq.auth
        from zmq.auth.thread import ThreadAuthenticator

        if not zmq.has("curve"):
            raise BindError("this libzmq has no CURVE support", field="curve")
        public, secret = zmq.auth.load_certificate(secret_file)
        if secret is None:
            raise BindError(f"{secret_file} holds no secret key (give the .key_secret file)",
                            field="curve_secret_key")
        self._auth = ThreadAuthenticator(zmq.Context.instance())
        self._auth.start()
        self._auth.configure_curve(domain="lorad", location=str(authorized))
        sock.curve_server = True
        sock.curve_publickey = public
        sock.curve_secretkey = secret
        sock.zap_domain = b"lorad"
        log.info("curve", authorized_keys=str(authorized),
                 server_public_key=public.decode("ascii"))
        return True

    def _bind_ipc(self, sock: zmq.Socket, path: str) -> None:
        gid = grp.getgrnam(self.group).gr_gid if self.group else -1
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, mode=0o750 if self.group else 0o700, exist_ok=True)
        if os.path.exists(path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # a stale socket left by a daemon that died
            else:
                raise BindError(f"another lorad daemon is serving at ipc://{path}",
                                field="endpoint")
            finally:
                probe.close()
        mode = 0o660 if self.group else 0o600
        old = os.umask(0o777 & ~mode)  # libzmq never chmods: the umask decides the mode
        try:
            sock.bind(f"ipc://{path}")
        finally:
            os.umask(old)
        os.chmod(path, mode)
        if self.group:
            os.chown(path, -1, gid)
        self._ipc_path = path

    # -- moving bytes -------------------------------------------------------------------------
    async def run(self, receiver: Receiver, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Pump the socket (and its disconnect monitor) until cancelled; started once the
        monitor is open."""
        assert self.sock is not None, "bind() first"
        self._receiver = receiver
        monitor = monitor_socket(self.sock, zmq.EVENT_DISCONNECTED)
        self.pump = ZmqPump(self.sock, on_unroutable=self._on_unroutable)
        monitor_pump = ZmqPump(monitor)
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self.pump.run, self._on_frames)
                nursery.start_soon(monitor_pump.run, self._on_monitor)
        finally:
            self.sock.disable_monitor()
            monitor_pump.close()

    async def _on_frames(self, frames: list[bytes]) -> None:
        peer, body = frames[0], frames[1:]
        try:
            request = decode_request(body, self.limits)
        except ProtocolError as exc:
            if self.admit is not None:
                await self.admit()
            rid = exc.details.pop("id", None)
            self._receiver.bad_message(peer, exc)
            self.send(peer, error_reply(rid, exc))
            return
        if self.admit is not None and not self._receiver.urgent(peer, request):
            await self.admit()  # while it waits, the pump reads nothing: zmq's queues hold
        await self._receiver.request(peer, request)

    def send(self, peer: bytes, reply: Reply) -> None:
        """Queue a reply to ``peer`` (never blocks; a reply that cannot be encoded becomes an
        ``internal`` error, never a crash)."""
        try:
            frames = encode_reply(reply)
        except Exception as exc:
            log.exception("unencodable_reply", id=reply.id, kind=reply.kind)
            frames = encode_reply(error_reply(reply.id, ProtocolError(
                ErrorCode.INTERNAL, f"the daemon could not encode its reply: {exc}")))
        assert self.pump is not None
        self.pump.send([peer, *frames])

    async def flushed(self) -> None:
        """Wait until every queued reply has been handed to libzmq."""
        if self.pump is not None:
            await self.pump.flushed()

    def close(self) -> None:
        """Close the socket and remove the ipc path (after :meth:`run` has ended)."""
        if self.pump is not None:
            self.pump.close()
        elif self.sock is not None:
            self.sock.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        if self._ipc_path:
            try:
                os.unlink(self._ipc_path)
            except FileNotFoundError:
                pass

    # -- liveness -----------------------------------------------------------------------------
    def _on_unroutable(self, frames: list[bytes], err: int) -> None:
        reason = "gone" if err == errno.EHOSTUNREACH else "not reading (HWM)"
        self._receiver.peer_gone(frames[0], reason)

    async def _on_monitor(self, frames: list[bytes]) -> None:
        # A connection closed (or missed its heartbeats). libzmq does not say whose, so probe
        # every peer that has work or contexts: the gone ones fail with EHOSTUNREACH.
        if parse_monitor_message(frames)["event"] == zmq.EVENT_DISCONNECTED:
            self._probe_pending = True
            if not self._probing:
                self._probing = True
                self._nursery.start_soon(self._probe_peers)

    async def _probe_peers(self) -> None:
        # The monitor event can arrive before the ROUTER has dropped the peer's pipe (that
        # happens when the socket next processes its commands), and a probe sent in between is
        # silently discarded: so probe again shortly after, once per disconnect burst.
        try:
            while self._probe_pending:
                self._probe_pending = False
                for delay in PROBE_DELAYS:
                    await trio.sleep(delay)
                    for peer in self._receiver.peers_with_work():
                        self.send(peer, Reply(kind="hb"))
        finally:
            self._probing = False
