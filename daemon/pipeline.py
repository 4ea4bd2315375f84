"""One request pipeline for both doors: admission, quotas, arguments, handlers, errors, metrics.

A door translates its wire into a lorad operation and hands it here; nothing else of a
request's life is the door's. :meth:`Pipeline.admit` counts the request, checks it against its
peer's session (a request id in flight), the daemon's draining and the operation's schema and
limits, and registers a :class:`~lorad.daemon.requests.RequestHandle` whose replies go to the
door's ``send``; :meth:`Pipeline.run` runs the operation's handler (the per-client file-work
cap counting against the peer) and maps every failure to a lorad error reply; the handle's end
is recorded (counters, metrics, the log line) the same for every door. The ZeroMQ dispatcher
(:mod:`.dispatch`) and the HTTP door (:mod:`.http.door`) are the two doors; a peer is a ZeroMQ
connection, or an HTTP connection (:func:`~.sessions.http_peer`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lorad.protocol import ErrorCode, ProtocolError, Reply, RequestId
from lorad.protocol.args import parse_args

from .errors import DaemonError, to_protocol
from .logs import log
from .operations import OPERATIONS
from .requests import RequestHandle
from .services import Services
from .workers import CLIENT

Send = Callable[[bytes, Reply], None]
def end_cancelled(h: RequestHandle) -> None:
    """End ``h`` as cancelled unless something ended it already (its session forgets it)."""
    if not h.finished:
        h.send_error(ProtocolError(ErrorCode.CANCELLED, "cancelled"))


class Pipeline:
    """Admits and runs the requests of every door (see the module)."""

    def __init__(self, services: Services) -> None:
        self.s = services

    def admit(self, peer: bytes, rid: RequestId, op: str, args: Any, send: Send, *,
              transport: str = "zmq", client: str | None = None) -> RequestHandle:
        """The request's handle, registered in its peer's session; a refused request raises
        ``ProtocolError`` (counted and logged here: the door only answers it)."""
        s = self.s
        s.counters["requests"] += 1
        try:
            s.sessions.check_new(peer, rid)
            operation = OPERATIONS.get(op)
            if operation is not None and s.draining and not operation.while_draining:
                raise ProtocolError(ErrorCode.SHUTTING_DOWN, "the daemon is shutting down")
            parsed = parse_args(op, args, s.limits)
        except ProtocolError as exc:
            s.counters["errors"] += 1
            s.metrics.request(model=None, context=None, outcome=exc.code.value,
                              end_metrics=None, elapsed_ms=0.0, transport=transport)
            log.info("request", id=rid, op=op, peer=peer.hex(), outcome=exc.code.value,
                     error=exc.message, transport=transport,
                     **({"client": client} if client else {}))
            raise
        handle = RequestHandle(peer, rid, op, parsed, send, self._done)
        handle.transport = transport
        handle.client = client
        s.sessions.add(handle)
        return handle

    def now(self, handle: RequestHandle) -> bool:
        """Answer ``handle`` on its operation's inline path, if it has one that answers it;
        False: run it (:meth:`run`)."""
        operation = OPERATIONS[handle.op]
        if operation.now is None:
            return False
        try:
            result = operation.now(self.s, handle)
        except Exception:  # the inline path is an optimisation: the handler decides
            log.exception("inline_path_failed", op=handle.op, id=handle.rid)
            return False
        if result is None:
            return False
        handle.send_result(result)
        return True

    def runs_inline(self, handle: RequestHandle) -> bool:
        """Whether the door should run ``handle`` in its own task (answers in order)."""
        return OPERATIONS[handle.op].runs_inline(handle.args)

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
        except BaseException:  # cancelled (the daemon stops, an HTTP client went away)
            end_cancelled(h)
            raise
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
