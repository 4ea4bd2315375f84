"""Sessions: the connected peers, their in-flight requests, their contexts and their quotas.

Pure bookkeeping over events (a request arrives, ends, is cancelled; a peer goes away): no
sockets and no llama.cpp, so it is tested in memory. A request id is scoped to its peer; a peer
is forgotten once it has neither requests nor contexts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from lorad.protocol import STREAMING_OPS, ErrorCode, Limits, ProtocolError, RequestId

from .requests import RequestHandle

HTTP_PEER = b"\x00http "
"""The prefix of an HTTP connection's peer id (then its ``host:port``)."""


def http_peer(client: str | None) -> bytes:
    """The peer id of an HTTP connection (``client``: its ``host:port``)."""
    return HTTP_PEER + (client or "-").encode()


def is_http_peer(peer: bytes | None) -> bool:
    return peer is not None and peer.startswith(HTTP_PEER)


@dataclass
class Peer:
    """A connected client (a transport-level id): its in-flight requests and owned contexts."""

    id: bytes
    requests: dict[Any, RequestHandle] = field(default_factory=dict)
    contexts: set[str] = field(default_factory=set)
    """Contexts that close when this peer goes away (the non-persistent ones it created)."""
    first_seen: float = field(default_factory=time.time)

    @property
    def idle(self) -> bool:
        return not self.requests and not self.contexts


class Sessions:
    """Every peer the daemon knows, and the rules that apply per peer."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.peers: dict[bytes, Peer] = {}
        self.lost = 0

    def __len__(self) -> int:
        return len(self.peers)

    def peer(self, peer_id: bytes) -> Peer:
        """The peer, created on first sight."""
        peer = self.peers.get(peer_id)
        if peer is None:
            peer = self.peers[peer_id] = Peer(peer_id)
        return peer

    # -- requests -----------------------------------------------------------------------------
    def check_new(self, peer_id: bytes, rid: RequestId) -> None:
        """``bad_request`` when ``rid`` is already in flight for this peer."""
        peer = self.peers.get(peer_id)
        if peer is not None and rid in peer.requests:
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                f"request id {rid!r} is already in flight", field="id")

    def add(self, handle: RequestHandle) -> None:
        self.peer(handle.peer).requests[handle.rid] = handle

    def done(self, handle: RequestHandle) -> None:
        """Forget a finished request (and its peer, if that was all it had)."""
        peer = self.peers.get(handle.peer)
        if peer is not None and peer.requests.get(handle.rid) is handle:
            del peer.requests[handle.rid]
            if peer.idle:
                del self.peers[handle.peer]

    def find(self, peer_id: bytes, rid: RequestId) -> RequestHandle | None:
        peer = self.peers.get(peer_id)
        return peer.requests.get(rid) if peer is not None else None

    def cancel(self, peer_id: bytes, rid: RequestId, by: RequestHandle) -> dict[str, Any]:
        """The ``cancel`` operation: cancel one of this peer's own requests."""
        target = self.find(peer_id, rid)
        if target is None or target is by:
            return {"request": rid, "cancelled": False, "reason": "not running"}
        target.cancel()
        return {"request": rid, "cancelled": True}

    def credit(self, peer_id: bytes, rid: RequestId, n: int) -> dict[str, Any]:
        """The ``credit`` operation: let one of this peer's streams send ``n`` more items."""
        target = self.find(peer_id, rid)
        if target is not None and target.op in STREAMING_OPS:
            target.grant(n)
        return {"request": rid, "granted": target is not None}

    def running(self) -> int:
        return sum(len(p.requests) for p in self.peers.values())

    def with_work(self) -> list[bytes]:
        """Peers worth probing for liveness: those with requests or contexts."""
        return [p.id for p in self.peers.values() if not p.idle]

    # -- peers going away ---------------------------------------------------------------------
    def gone(self, peer_id: bytes) -> Peer | None:
        """Forget a peer that went away and cancel its requests; the caller closes the
        contexts it owned (``peer.contexts``). None for a peer already forgotten."""
        peer = self.peers.pop(peer_id, None)
        if peer is None:
            return None
        self.lost += 1
        for handle in list(peer.requests.values()):
            handle.cancel()
        return peer

    # -- contexts -----------------------------------------------------------------------------
    def own(self, peer_id: bytes, context_id: str) -> None:
        """``peer_id`` owns ``context_id``: it closes when the peer goes away."""
        self.peer(peer_id).contexts.add(context_id)

    def disown(self, peer_id: bytes, context_id: str) -> None:
        peer = self.peers.get(peer_id)
        if peer is not None:
            peer.contexts.discard(context_id)
            if peer.idle:
                del self.peers[peer_id]

    # -- quotas -------------------------------------------------------------------------------
    def check_streams(self, peer_id: bytes) -> None:
        """``too_large`` when the peer has more streams than ``max_streams_per_client`` (the
        request being checked is counted already)."""
        peer = self.peers.get(peer_id)
        streams = sum(1 for r in peer.requests.values() if r.op in STREAMING_OPS) if peer else 0
        if streams > self.limits.max_streams_per_client:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"this client already has {streams - 1} "
                                "streams (limits.max_streams_per_client)",
                                limit="max_streams_per_client",
                                value=self.limits.max_streams_per_client)

    def check_new_context(self, total: int, created_by_peer: int, n_ctx: int) -> None:
        """``too_large`` when one more context of ``n_ctx`` would exceed a limit."""
        limits = self.limits
        if total >= limits.max_contexts:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"the daemon already has {total} contexts "
                                "(limits.max_contexts)", limit="max_contexts",
                                value=limits.max_contexts)
        if created_by_peer >= limits.max_contexts_per_client:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"this client already has "
                                f"{created_by_peer} contexts (limits.max_contexts_per_client)",
                                limit="max_contexts_per_client",
                                value=limits.max_contexts_per_client)
        if n_ctx > limits.max_n_ctx:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"n_ctx {n_ctx} is above "
                                f"limits.max_n_ctx ({limits.max_n_ctx})", field="n_ctx",
                                limit="max_n_ctx", value=limits.max_n_ctx)
