"""ZeroMQ inside trio: one pump task owns each socket (see shared design notes).

libzmq's FD is edge-triggered and any call on the socket may consume the wake-up, so the pump
drains while ``EVENTS`` shows work and only then waits on the FD. Senders never touch the
socket: they queue frames and wake the pump. :class:`TrioZmqTransport` is the trio client's
transport built on two pumps (the DEALER socket and its monitor).
"""

from __future__ import annotations

import collections
import errno
from collections.abc import Awaitable, Callable

import trio
import zmq
from zmq.utils.monitor import parse_monitor_message

from .core import CONNECTION_LOST, CurveKeys, Incoming
from .transport import configure_dealer, open_monitor


class ZmqPump:
    """Moves messages between one of the client's sockets (its DEALER, its monitor) and trio
    tasks. The daemon's ROUTER has a pump of its own (``lorad.daemon.pump``: peers that are
    gone, direct sends), since neither package imports the other.

    ``deliver`` is awaited for each incoming multipart message (frames as bytes); while it
    blocks, the pump stops reading (backpressure reaches the peer through zmq's HWM).
    """

    def __init__(self, sock: zmq.Socket) -> None:
        self.sock = sock
        self._out: collections.deque[list[bytes]] = collections.deque()
        self._wait_scope: trio.CancelScope | None = None

    def send(self, frames: list[bytes]) -> None:
        """Queue one multipart message; never blocks. Bounded by the callers' flow control."""
        self._out.append(frames)
        if self._wait_scope is not None:
            self._wait_scope.cancel()

    async def run(self, deliver: Callable[[list[bytes]], Awaitable[None]] | None) -> None:
        sock = self.sock
        fd = sock.getsockopt(zmq.FD)
        try:
            while True:
                events = sock.getsockopt(zmq.EVENTS)
                busy = False
                if events & zmq.POLLIN and deliver is not None:
                    await deliver(sock.recv_multipart(zmq.NOBLOCK))
                    busy = True
                elif events & zmq.POLLIN:
                    sock.recv_multipart(zmq.NOBLOCK)
                    busy = True
                if self._out and events & zmq.POLLOUT:
                    self._send_one()
                    busy = True
                if busy:
                    await trio.lowlevel.checkpoint()
                    continue
                with trio.CancelScope() as scope:
                    self._wait_scope = scope
                    # libzmq makes the FD readable when EVENTS changes (in or out).
                    await trio.lowlevel.wait_readable(fd)
                self._wait_scope = None
        finally:
            self._wait_scope = None

    def drop_queued(self) -> None:
        """Forget the messages not sent yet (their connection is gone)."""
        self._out.clear()

    def _send_one(self) -> None:
        try:
            self.sock.send_multipart(self._out.popleft(), zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # no connection to the daemon: the message is dropped
            if exc.errno not in (errno.EHOSTUNREACH, errno.EAGAIN):
                raise

    def close(self) -> None:
        """Tell trio the FD goes away, then close the socket (call after run() has ended)."""
        try:
            trio.lowlevel.notify_closing(self.sock.getsockopt(zmq.FD))
        except (zmq.ZMQError, OSError):
            pass
        self.sock.close(linger=0)


class TrioZmqTransport:
    """The trio client's ZeroMQ transport: a DEALER socket connected to ``endpoint``.

    :meth:`run` pumps the socket and its monitor; a disconnect is delivered as
    :data:`~lorad.client.core.CONNECTION_LOST` (what was queued for that connection is
    dropped), and sends wait for the next handshake, up to their timeout."""

    def __init__(self, endpoint: str, curve: CurveKeys | None = None) -> None:
        self.endpoint = endpoint
        sock = zmq.Context.instance().socket(zmq.DEALER)
        configure_dealer(sock, curve)
        monitor = open_monitor(sock)
        sock.connect(endpoint)
        self._pump = ZmqPump(sock)
        self._monitor_pump = ZmqPump(monitor)
        self._connected = trio.Event()

    async def run(self, deliver: Callable[[Incoming], None]) -> None:
        async def on_message(frames: list[bytes]) -> None:
            deliver(frames)

        async def on_monitor(frames: list[bytes]) -> None:
            event = parse_monitor_message(frames)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._connected.set()
            elif event == zmq.EVENT_DISCONNECTED:
                self._connected = trio.Event()
                # What waits for that connection's pipe belongs to requests that fail now:
                # sent on the next connection, it would run with nobody waiting for it.
                self._pump.drop_queued()
                deliver(CONNECTION_LOST)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._pump.run, on_message)
            nursery.start_soon(self._monitor_pump.run, on_monitor)

    async def send(self, frames: list[bytes], timeout: float) -> bool:
        if not self._connected.is_set():
            with trio.move_on_after(timeout):
                await self._connected.wait()
            if not self._connected.is_set():
                return False
        self._pump.send(frames)
        return True

    def send_nowait(self, frames: list[bytes]) -> bool:
        if not self._connected.is_set():
            return False
        self._pump.send(frames)
        return True

    def close(self) -> None:
        self._pump.sock.disable_monitor()
        self._monitor_pump.close()
        self._pump.close()
