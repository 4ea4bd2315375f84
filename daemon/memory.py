"""An in-memory transport: requests go straight to a receiver, replies are collected per peer.

For tests (a handler driven without sockets) and for embedding the daemon's core in a process
that brings its own I/O. It has the ZeroMQ transport's two halves: it delivers requests to a
:class:`~lorad.daemon.transport.Receiver` and offers ``send(peer, reply)``.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import trio

from lorad.protocol import Reply, Request, RequestId

from .transport import Receiver


class MemoryTransport:
    def __init__(self) -> None:
        self.replies: dict[bytes, list[Reply]] = defaultdict(list)
        self._changed = trio.Event()

    def send(self, peer: bytes, reply: Reply) -> None:
        self.replies[peer].append(reply)
        self._changed.set()
        self._changed = trio.Event()

    async def request(self, receiver: Receiver, peer: bytes, op: str,
                      args: dict[str, Any] | None = None, rid: RequestId = 1) -> None:
        """Deliver one request, as the ZeroMQ transport does once it has decoded it."""
        await receiver.request(peer, Request(rid, op, args or {}))

    async def final(self, peer: bytes, rid: RequestId) -> Reply:
        """Wait for the reply that ends request ``rid`` (a result, an error or a stream end)
        and take it, with the stream items before it, off the peer's replies."""
        while True:
            replies = self.replies[peer]
            for i, reply in enumerate(replies):
                if reply.id == rid and reply.kind in ("result", "error", "end"):
                    replies[:] = [r for r in replies[:i] if r.id != rid] + replies[i + 1:]
                    return reply
            await self._changed.wait()

    async def call(self, receiver: Receiver, peer: bytes, op: str,
                   args: dict[str, Any] | None = None, rid: RequestId = 1) -> Reply:
        await self.request(receiver, peer, op, args, rid)
        return await self.final(peer, rid)
