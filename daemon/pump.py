"""ZeroMQ inside trio for the daemon: one pump task owns each socket (see the design notes).

libzmq's FD is edge-triggered and any call on the socket may consume the wake-up, so the pump
drains while ``EVENTS`` shows work and only then waits on the FD. A reply with nothing queued
before it is handed to libzmq at once (from the trio thread, which owns the socket); a waiting
pump then looks at ``EVENTS`` again. Otherwise replies are queued and the pump sends them.
"""

from __future__ import annotations

import collections
import errno
from collections.abc import Awaitable, Callable

import trio
import zmq

# Plain ints: arithmetic on pyzmq's IntFlag members costs ~30x more, on every wake-up.
_EVENTS = int(zmq.EVENTS)
_POLLIN, _POLLOUT, _NOBLOCK = int(zmq.POLLIN), int(zmq.POLLOUT), int(zmq.NOBLOCK)


def monitor_socket(sock: zmq.Socket, events: int) -> zmq.Socket:
    """``sock.get_monitor_socket(events)``, retried when a signal interrupts it.

    pyzmq retries sends, receives, polls, options, binds and connects on ``EINTR``, not
    ``zmq_socket_monitor``, which binds an inproc socket; a SIGTERM arriving then ended the
    daemon with exit 1. The failed call bound nothing, so trying again is safe."""
    while True:
        try:
            return sock.get_monitor_socket(events)
        except zmq.error.InterruptedSystemCall:
            continue


class ZmqPump:
    """Moves messages between one zmq socket and trio tasks.

    ``deliver`` is awaited for each incoming multipart message (frames as bytes); while it
    blocks, the pump stops reading (backpressure reaches the peer through zmq's HWM).
    ``on_unroutable(frames, errno)`` is called when a ROUTER send fails for one peer
    (``EHOSTUNREACH``: the peer is gone; ``EAGAIN``: it is at its high-water mark).
    """

    def __init__(
        self,
        sock: zmq.Socket,
        on_unroutable: Callable[[list[bytes], int], None] | None = None,
    ) -> None:
        self.sock = sock
        self._out: collections.deque[list[bytes]] = collections.deque()
        self._wait_scope: trio.CancelScope | None = None
        self._on_unroutable = on_unroutable
        self.sent = 0
        self.received = 0
        self._empty = trio.Event()
        self._empty.set()

    def send(self, frames: list[bytes]) -> None:
        """Send one multipart message now if nothing is queued before it, else queue it; never
        blocks. Bounded by the callers' flow control."""
        if not self._out and self._hand_over(frames):
            # The send may have consumed the FD's wake-up: a waiting pump must look again.
            if self._wait_scope is not None and self.sock.getsockopt(_EVENTS) & _POLLIN:
                self._wait_scope.cancel()
            return
        self._out.append(frames)
        if self._empty.is_set():
            self._empty = trio.Event()
        if self._wait_scope is not None:
            self._wait_scope.cancel()

    @property
    def queued(self) -> int:
        return len(self._out)

    async def flushed(self) -> None:
        """Wait until every queued message has been handed to libzmq."""
        await self._empty.wait()

    async def run(self, deliver: Callable[[list[bytes]], Awaitable[None]] | None) -> None:
        sock = self.sock
        fd = sock.getsockopt(zmq.FD)
        try:
            while True:
                events = sock.getsockopt(_EVENTS)
                busy = False
                if events & _POLLIN and deliver is not None:
                    frames = sock.recv_multipart(_NOBLOCK)
                    self.received += 1
                    await deliver(frames)
                    busy = True
                elif events & _POLLIN:
                    sock.recv_multipart(_NOBLOCK)
                    busy = True
                if self._out and events & _POLLOUT:
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

    def _send_one(self) -> None:
        frames = self._out.popleft()
        if not self._out:
            self._empty.set()
        if not self._hand_over(frames):  # full after all: keep its place at the head
            self._out.appendleft(frames)
            if self._empty.is_set():
                self._empty = trio.Event()

    def _hand_over(self, frames: list[bytes]) -> bool:
        """Give ``frames`` to libzmq; a peer that is gone or full is reported, not raised.
        False only when the socket as a whole cannot take it now."""
        try:
            self.sock.send_multipart(frames, _NOBLOCK)
            self.sent += 1
        except zmq.ZMQError as exc:
            if exc.errno in (errno.EHOSTUNREACH, errno.EAGAIN) and self._on_unroutable:
                self._on_unroutable(frames, exc.errno)
            elif exc.errno == errno.EAGAIN:
                return False
            elif exc.errno != errno.EHOSTUNREACH:
                raise
        return True

    def close(self) -> None:
        """Tell trio the FD goes away, then close the socket (call after run() has ended)."""
        try:
            trio.lowlevel.notify_closing(self.sock.getsockopt(zmq.FD))
        except (zmq.ZMQError, OSError):
            pass
        self.sock.close(linger=0)
