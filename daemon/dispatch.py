"""Dispatch: from a decoded request to its handler, and every outcome to exactly one reply.

The dispatcher is what a transport delivers to (:class:`~lorad.daemon.transport.Receiver`): it
checks a request against the sessions and the operation's schema, runs its handler inline or in
a task of its own, maps every failure to a wire error, and forgets peers that went away. Any
transport with a ``send(peer, reply)`` can drive it: the ZeroMQ one, or one in memory.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from lorad.protocol import ErrorCode, ProtocolError, Reply, Request, error_reply
from lorad.protocol.args import parse_args

from .actor import ContextActor
from .errors import DaemonError, to_protocol
from .logs import log
from .operations import OPERATIONS
from .requests import RequestHandle
from .services import Services
from .workers import CLIENT

Send = Callable[[bytes, Reply], None]


class Dispatcher:
    """Runs requests for one daemon; ``send`` queues a reply to a peer."""

    def __init__(self, services: Services, send: Send, nursery: trio.Nursery) -> None:
        self.s = services
        self.send = send
        self.nursery = nursery
        services.engine.on_closed = self._context_closed

    # -- Receiver -----------------------------------------------------------------------------
    async def request(self, peer: bytes, request: Request) -> None:
        s = self.s
        s.counters["requests"] += 1
        try:
            s.sessions.check_new(peer, request.id)
            op = OPERATIONS.get(request.op)
            if op is not None and s.draining and not op.while_draining:
                raise ProtocolError(ErrorCode.SHUTTING_DOWN, "the daemon is shutting down")
            args = parse_args(request.op, request.args, s.limits)
        except ProtocolError as exc:
            s.counters["errors"] += 1
            log.info("request", id=request.id, op=request.op, peer=peer.hex(),
                     outcome=exc.code.value, error=exc.message)
            self.send(peer, error_reply(request.id, exc))
            return
        operation = OPERATIONS[request.op]  # parse_args knows only the table's operations
        handle = RequestHandle(peer, request.id, request.op, args, self.send, self._done)
        s.sessions.add(handle)
        if operation.now is not None:
            try:
                result = operation.now(s, handle)
            except Exception:  # the inline path is an optimisation: the handler decides
                log.exception("inline_path_failed", op=request.op, id=request.id)
                result = None
            if result is not None:
                handle.send_result(result)
                return
        if operation.runs_inline(args):
            await self.run(handle)
        else:
            self.nursery.start_soon(self.run, handle)

    def bad_message(self, peer: bytes, error: ProtocolError) -> None:
        self.s.counters["errors"] += 1
        log.info("bad_message", peer=peer.hex(), code=error.code.value, error=error.message)

    def peer_gone(self, peer: bytes, reason: str) -> None:
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
        return self.s.sessions.with_work()

    def urgent(self, peer: bytes, request: Request) -> bool:
        """A cancel of one of the peer's running requests: it stops work, so the ingress gate
        never holds it for a step (any other message, a flood of cancels for ids not in
        flight included, waits its turn)."""
        if request.op != "cancel" or not isinstance(request.args, dict):
            return False
        rid = request.args.get("request")
        return (isinstance(rid, (int, str)) and not isinstance(rid, bool)
                and self.s.sessions.find(peer, rid) is not None)

    # -- running ------------------------------------------------------------------------------
    async def run(self, h: RequestHandle) -> None:
        """Run the handler of ``h``; exactly one reply (or a stream's end) comes of it."""
        operation = OPERATIONS[h.op]
        client = CLIENT.set(h.peer)  # the slow-file-work cap counts against this peer
        try:
            result = await operation.handler(self.s, h)
        except (ProtocolError, DaemonError) as exc:
            h.send_error(to_protocol(exc))
        except Exception as exc:
            log.exception("internal_error", op=h.op, id=h.rid)
            h.send_error(to_protocol(exc))
        else:
            if not operation.streams:
                if h.cancelled and h.op in ("tokenize", "detokenize"):
                    h.send_error(ProtocolError(ErrorCode.CANCELLED, "cancelled"))
                else:
                    h.send_result(result)
        finally:
            CLIENT.reset(client)

    def _done(self, handle: RequestHandle) -> None:
        self.s.sessions.done(handle)
        self.s.record(handle)

    def _context_closed(self, actor: ContextActor) -> None:
        if actor.owner is not None:
            self.s.sessions.disown(actor.owner, actor.id)
