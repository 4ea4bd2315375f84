"""The clients' transport seam: what moves frames between a client and the daemon.

A shell (:mod:`.sync`, :mod:`.aio`) hands frames to a transport and feeds what comes back to its
:class:`~lorad.client.core.ClientCore`; nothing else of a client touches a socket. The ZeroMQ
transports are :class:`ZmqTransport` here (blocking) and
:class:`~lorad.client.zmqtrio.TrioZmqTransport` (trio); tests plug in memory ones.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

import zmq
from zmq.utils.monitor import parse_monitor_message

from .core import CONNECTION_LOST, HEARTBEAT_MS, CurveKeys, Incoming


class SyncTransport(Protocol):
    """A blocking transport, used from one thread."""

    def send(self, frames: list[bytes], timeout: float) -> bool:
        """Hand one message to a live connection, waiting up to ``timeout`` seconds for one;
        False if there was none."""

    def send_nowait(self, frames: list[bytes]) -> bool:
        """Hand one message over only if that needs no waiting; False otherwise."""

    def receive(self, timeout: float) -> list[Incoming]:
        """What arrived, waiting up to ``timeout`` seconds for something; [] if nothing did.
        ``receive(0)`` (before each request) must not wait: it may report only a lost
        connection, which then concerns only the requests sent before."""

    def close(self) -> None: ...


class AsyncTransport(Protocol):
    """A trio transport: :meth:`run` (in the client's nursery) delivers what arrives."""

    async def run(self, deliver: Callable[[Incoming], None]) -> None:
        """Call ``deliver`` for each message and connection loss, until cancelled."""

    async def send(self, frames: list[bytes], timeout: float) -> bool:
        """Queue one message for a live connection, waiting up to ``timeout`` seconds for one;
        False if there was none."""

    def send_nowait(self, frames: list[bytes]) -> bool:
        """Queue one message if connected; False otherwise."""

    def close(self) -> None:
        """Release the connection (after :meth:`run` has ended)."""


def configure_dealer(sock: zmq.Socket, curve: CurveKeys | None = None) -> None:
    """Socket options every client uses (see protocol/README.md, 'Liveness')."""
    if curve is not None:
        sock.curve_serverkey = curve.server_public
        sock.curve_publickey = curve.public
        sock.curve_secretkey = curve.secret
    sock.setsockopt(zmq.LINGER, 0)
    # Queue only to a live connection: a send with no daemon fails instead of waiting forever.
    sock.setsockopt(zmq.IMMEDIATE, 1)
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * HEARTBEAT_MS)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)


MONITOR_EVENTS = zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
# Plain ints: pyzmq's enum flags cost microseconds per operation on the hot path.
_EVENTS, _POLLIN, _NOBLOCK = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.NOBLOCK)


def open_monitor(sock: zmq.Socket) -> zmq.Socket:
    """The monitor of ``sock`` for :data:`MONITOR_EVENTS`, retried when a signal interrupts
    it: pyzmq retries sends, receives, polls, options and connects on ``EINTR``, not
    ``zmq_socket_monitor`` (a client that handles a signal, SIGCHLD or SIGWINCH say, would
    fail to connect). The daemon has its own copy (the client imports nothing of it)."""
    while True:
        try:
            return sock.get_monitor_socket(MONITOR_EVENTS)
        except zmq.error.InterruptedSystemCall:
            continue


class ZmqTransport:
    """A DEALER socket connected to ``endpoint``, with a monitor for handshakes and
    disconnects: ``connected`` is what the monitor said last, and sends wait for it."""

    def __init__(self, endpoint: str, curve: CurveKeys | None = None) -> None:
        self.endpoint = endpoint
        self._sock = zmq.Context.instance().socket(zmq.DEALER)
        configure_dealer(self._sock, curve)
        self._monitor = open_monitor(self._sock)
        self._sock.connect(endpoint)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        self.connected = False
        self._lost = False  # a disconnect not reported yet

    def send(self, frames: list[bytes], timeout: float) -> bool:
        # Never hand a message to zmq while the monitor said the connection is down: the
        # socket may not have dropped that connection's pipe yet, and a message queued there
        # is lost with no second disconnect to report it (the request would wait its timeout).
        deadline = None
        while True:
            if self.connected:
                try:
                    self._sock.send_multipart(frames, _NOBLOCK)
                    return True
                except zmq.Again:
                    pass
            now = time.monotonic()
            deadline = now + timeout if deadline is None else deadline
            remaining = deadline - now
            if remaining <= 0:
                return False
            wait_ms = int(min(remaining, 0.05) * 1000) + 1
            if self.connected:  # a pipe not attached yet, or a full one
                self._sock.poll(wait_ms, zmq.POLLOUT)
            else:  # a handshake is what can change that
                self._monitor.poll(wait_ms, zmq.POLLIN)
            self._read_monitor()

    def send_nowait(self, frames: list[bytes]) -> bool:
        if not self.connected:
            return False
        try:
            self._sock.send_multipart(frames, _NOBLOCK)
            return True
        except zmq.ZMQError:
            return False

    def receive(self, timeout: float) -> list[Incoming]:
        out: list[Incoming] = []
        if timeout > 0 and not self._lost:
            ready = dict(self._poller.poll(int(timeout * 1000) + 1))
            # Messages first: whatever arrived before a disconnect still reaches its request.
            if self._sock in ready:
                out.append(self._sock.recv_multipart(_NOBLOCK))
                while self._sock.getsockopt(_EVENTS) & _POLLIN:
                    out.append(self._sock.recv_multipart(_NOBLOCK))
            if self._monitor in ready:
                self._read_monitor()
        else:  # no waiting, and cheap (one call per request): only a disconnect matters here
            self._read_monitor()
        if self._lost:
            self._lost = False
            out.append(CONNECTION_LOST)
        return out

    def _read_monitor(self) -> None:
        while self._monitor.getsockopt(_EVENTS) & _POLLIN:
            event = parse_monitor_message(self._monitor.recv_multipart())["event"]
            if event == zmq.EVENT_DISCONNECTED:
                self.connected = False
                self._lost = True
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.connected = True

    def close(self) -> None:
        self._sock.disable_monitor()
        self._monitor.close(linger=0)
        self._sock.close(linger=200)
