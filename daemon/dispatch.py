"""The ZeroMQ door: from a decoded request into the request pipeline, and peers' lifecycle.

The dispatcher is what a transport delivers to (:class:`~lorad.daemon.transport.Receiver`): it
hands each request to the :class:`~lorad.daemon.pipeline.Pipeline` (admission, arguments, the
handler, error mapping: shared with the HTTP door), answers an inline path at once or runs the
handler inline or in a task of its own, and forgets peers that went away. Any transport with a
``send(peer, reply)`` can drive it: the ZeroMQ one, or one in memory.
"""

from __future__ import annotations

import trio

from lorad.protocol import ProtocolError, Request, error_reply

from .actor import ContextActor
from .logs import log
from .pipeline import Pipeline, Send
from .services import Services
from .sessions import is_http_peer


class Dispatcher:
    """The ZeroMQ door: decoded requests into the :class:`~.pipeline.Pipeline`, its replies to
    ``send`` (a queue to the peer); peers that went away are forgotten."""

    def __init__(self, services: Services, send: Send, nursery: trio.Nursery) -> None:
        self.s = services
        self.send = send
        self.nursery = nursery
        self.pipeline = Pipeline(services)
        services.engine.on_closed = self._context_closed

    # -- Receiver -----------------------------------------------------------------------------
    async def request(self, peer: bytes, request: Request) -> None:
        try:
            handle = self.pipeline.admit(peer, request.id, request.op, request.args, self.send)
        except ProtocolError as exc:
            self.send(peer, error_reply(request.id, exc))
            return
        if self.pipeline.now(handle):
            return
        if self.pipeline.runs_inline(handle):
            await self.pipeline.run(handle)
        else:
            self.nursery.start_soon(self.pipeline.run, handle)

    def bad_message(self, peer: bytes, error: ProtocolError) -> None:
        self.s.counters["errors"] += 1
        log.info("bad_message", peer=peer.hex(), code=error.code.value, error=error.message)

    def peer_gone(self, peer: bytes, reason: str) -> None:
        if is_http_peer(peer):  # not this door's (HTTP requests end with their connection)
            return
        gone = self.s.sessions.gone(peer)
        if gone is None:
            return
        engine = self.s.engine
        closing = [c for c in gone.contexts if c in engine.contexts
                   and not engine.contexts[c].persistent]
        log.info("peer_lost", peer=peer.hex(), reason=reason, cancelled=len(gone.requests),
                 closing_contexts=closing)
        for ctx_id in closing:
            engine.close_soon(engine.contexts[ctx_id])

    def peers_with_work(self) -> list[bytes]:
        """This door's peers with requests or contexts (for liveness probes)."""
        return [p for p in self.s.sessions.with_work() if not is_http_peer(p)]

    def urgent(self, peer: bytes, request: Request) -> bool:
        """A cancel of one of the peer's running requests: it stops work, so the ingress gate
        never holds it for a step (any other message, a flood of cancels for ids not in
        flight included, waits its turn)."""
        if request.op != "cancel" or not isinstance(request.args, dict):
            return False
        rid = request.args.get("request")
        return (isinstance(rid, (int, str)) and not isinstance(rid, bool)
                and self.s.sessions.find(peer, rid) is not None)

    def _context_closed(self, actor: ContextActor) -> None:
        if actor.owner is not None:
            self.s.sessions.disown(actor.owner, actor.id)
