"""The clients' core: everything the sync and trio clients share, with no I/O.

:class:`ClientCore` allocates request ids, encodes requests, routes decoded replies to the
requests waiting for them, fails them all when the connection is lost, holds cancels that wait
for a chance to be sent, and builds the client-side errors. :class:`StreamState` is one stream:
``seq`` checks, the credit policy, its end or error, and whether a cancel is due. The shells
(:mod:`.sync`, :mod:`.aio`) only move frames between this core and a transport
(:mod:`.transport`), which makes this module testable without a daemon or a socket.
"""

from __future__ import annotations

import collections
import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lorad.protocol import ProtocolError, Reply, Request, RequestId, decode_reply, encode_request

from .errors import DaemonUnavailable, InternalError, LoradError, RequestTimeout, error_from_wire

DEFAULT_TIMEOUT = 30.0
LOAD_TIMEOUT = 600.0
CONNECT_TIMEOUT = 2.0
HEARTBEAT_MS = 1000
DEFAULT_CREDIT = 64
"""The daemon's default credit window (the ``credit`` argument of generate/chat)."""


@dataclass(frozen=True)
class CurveKeys:
    """CURVE keys of a client: the daemon's public key and the client's own key pair (Z85)."""

    server_public: bytes
    public: bytes
    secret: bytes

    @classmethod
    def from_files(cls, server_key: str | os.PathLike, client_cert: str | os.PathLike
                   ) -> CurveKeys:
        """From the daemon's public certificate (``NAME.key``) and the client's secret one
        (``NAME.key_secret``), as ``lorad keys generate`` writes them."""
        import zmq.auth

        server_public, _ = zmq.auth.load_certificate(os.fspath(server_key))
        public, secret = zmq.auth.load_certificate(os.fspath(client_cert))
        if secret is None:
            raise ValueError(f"{client_cert} holds no secret key (use the .key_secret file)")
        return cls(server_public, public, secret)

    @classmethod
    def from_env(cls) -> CurveKeys | None:
        """``$LORAD_SERVER_KEY`` and ``$LORAD_CLIENT_CERT`` (certificate files), if both set."""
        server, client = os.environ.get("LORAD_SERVER_KEY"), os.environ.get("LORAD_CLIENT_CERT")
        return cls.from_files(server, client) if server and client else None


# -- what a transport delivers ---------------------------------------------------------------------
class ConnectionLost:
    """A transport event: the connection to the daemon dropped (every pending request fails)."""

    def __repr__(self) -> str:
        return "CONNECTION_LOST"


CONNECTION_LOST = ConnectionLost()

Incoming = list[bytes] | ConnectionLost
"""What a transport receives: one message (its frames), or :data:`CONNECTION_LOST`."""


class RequestIds:
    """Client-chosen request ids: a per-client counter (unique within one connection)."""

    def __init__(self) -> None:
        self._counter = itertools.count(1)

    def next(self) -> int:
        return next(self._counter)


class ClientCore:
    """The sans-IO state of one client connection.

    Requests that wait for replies are *pending* (``start`` to ``forget``); a reply is queued for
    its request until the shell takes it with :meth:`next_reply`. Replies with no id (``hb``),
    with an id nobody waits for (answers to ``credit``, late replies to abandoned streams) and
    frames that do not decode are dropped, as the spec asks; ``dropped`` counts them.
    """

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self._ids = RequestIds()
        self._replies: dict[RequestId, collections.deque[Reply | ConnectionLost]] = {}
        self._cancels: collections.deque[RequestId] = collections.deque()
        self.dropped = 0

    # -- outgoing ---------------------------------------------------------------------------------
    def start(self, op: str, args: dict[str, Any]) -> tuple[RequestId, list[bytes]]:
        """A new pending request: its id and the frames to send."""
        rid = self._ids.next()
        self._replies[rid] = collections.deque()
        return rid, encode_request(Request(id=rid, op=op, args=args))

    def fire(self, op: str, args: dict[str, Any]) -> list[bytes]:
        """Frames of a request whose reply nobody waits for (it is dropped when it comes)."""
        return encode_request(Request(id=self._ids.next(), op=op, args=args))

    def credit(self, rid: RequestId, n: int) -> list[bytes]:
        """Frames granting ``n`` more items to the stream ``rid``."""
        return self.fire("credit", {"request": rid, "n": n})

    def cancel(self, rid: RequestId) -> list[bytes]:
        """Frames cancelling ``rid`` (fire and forget: the stream's own replies tell the end)."""
        return self.fire("cancel", {"request": rid})

    def cancel_later(self, rid: RequestId) -> None:
        """Remember a cancel to send at the next chance (e.g. asked from another thread)."""
        self._cancels.append(rid)

    def take_cancels(self) -> list[list[bytes]]:
        """Frames of the cancels remembered by :meth:`cancel_later`, oldest first."""
        out = []
        while self._cancels:
            out.append(self.cancel(self._cancels.popleft()))
        return out

    def forget(self, rid: RequestId) -> None:
        """Stop waiting for ``rid``: its later replies are dropped."""
        self._replies.pop(rid, None)

    def is_pending(self, rid: RequestId) -> bool:
        return rid in self._replies

    @property
    def pending(self) -> list[RequestId]:
        return list(self._replies)

    # -- incoming ---------------------------------------------------------------------------------
    def feed(self, event: Incoming) -> list[RequestId]:
        """Take in one transport event; returns the requests that have something new."""
        if isinstance(event, ConnectionLost):
            return self.connection_lost()
        rid = self.receive(event)
        return [] if rid is None else [rid]

    def receive(self, frames: list[bytes]) -> RequestId | None:
        """Route one message to its request; None when it was dropped."""
        try:
            reply = decode_reply(frames)
        except ProtocolError:
            self.dropped += 1  # cannot be routed: the waiter's timeout covers it
            return None
        queue = self._replies.get(reply.id) if reply.id is not None else None
        if queue is None:
            self.dropped += 1
            return None
        queue.append(reply)
        return reply.id

    def connection_lost(self) -> list[RequestId]:
        """Every pending request fails after the replies it already has."""
        for queue in self._replies.values():
            queue.append(CONNECTION_LOST)
        return list(self._replies)

    def next_reply(self, rid: RequestId) -> Reply | None:
        """The next reply of ``rid``, or None while there is none. Raises
        :class:`DaemonUnavailable` (and forgets ``rid``) when the connection was lost."""
        queue = self._replies.get(rid)
        if queue is None:
            raise InternalError(f"request {rid!r} is not pending", {"request": rid})
        if not queue:
            return None
        reply = queue.popleft()
        if isinstance(reply, ConnectionLost):
            self.forget(rid)
            raise self.lost_error()
        return reply

    # -- errors -----------------------------------------------------------------------------------
    def unavailable_error(self) -> DaemonUnavailable:
        """No connection to hand a request to within the connect timeout."""
        return DaemonUnavailable(
            f"no lorad daemon answers at {self.endpoint} "
            "(is `lorad serve` running? see $LORAD_ENDPOINT)",
            {"endpoint": self.endpoint},
        )

    def lost_error(self) -> DaemonUnavailable:
        return DaemonUnavailable(
            f"the daemon at {self.endpoint} went away during the request",
            {"endpoint": self.endpoint},
        )

    @staticmethod
    def timeout_error(rid: RequestId, timeout: float) -> RequestTimeout:
        return RequestTimeout(
            f"no answer within {timeout:.1f} s", {"request": rid, "timeout": timeout}
        )


def check_result(reply: Reply) -> Any:
    """The result of a one-shot reply, or raise its error."""
    if reply.kind == "error":
        raise error_from_wire(reply.error or {})
    return reply.result


# -- streams --------------------------------------------------------------------------------------
@dataclass
class Chunk:
    """One streamed piece of a generation.

    ``text`` is the new text (never a broken UTF-8 sequence), ``token_ids`` the tokens sampled for
    it, and ``logprobs`` (when asked) one entry per token: ``[(token_id, logprob), ...]`` best
    first; ``token_logprobs`` then has the chosen token's log-probability, one per token.
    """

    text: str
    token_ids: list[int]
    logprobs: list[list[tuple[int, float]]] | None = None
    token_logprobs: list[float] | None = None

    @classmethod
    def from_wire(cls, item: dict[str, Any]) -> Chunk:
        lp = item.get("logprobs")
        return cls(
            text=item.get("text", ""),
            token_ids=list(item.get("token_ids", [])),
            logprobs=[[(int(t), float(p)) for t, p in entry] for entry in lp] if lp else None,
            token_logprobs=([float(x) for x in item["token_logprobs"]]
                            if item.get("token_logprobs") else None),
        )


def _out_of_order(rid: RequestId, expected: int, got: Any, kind: str) -> InternalError:
    return InternalError(
        f"stream {rid!r}: {kind} with seq {got!r} where {expected} was due (items lost or "
        "reordered)", {"request": rid, "expected_seq": expected, "seq": got},
    )


@dataclass
class StreamState:
    """One stream, sans-IO: ``seq`` checks, credit accounting, its end, error and cancel.

    ``done`` is set at the end (``end``, ``error``, a broken ``seq``, or abandoned); ``ended``
    only when the daemon said the stream is over, so that :meth:`close` knows whether the
    daemon may still be running it and a cancel is due.
    """

    request_id: RequestId
    credit: int = DEFAULT_CREDIT
    finish_reason: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    tool_calls: list[dict[str, Any]] | None = None
    error: LoradError | None = None
    consumed_since_grant: int = 0
    next_seq: int = 0
    done: bool = False
    ended: bool = False
    cancel_sent: bool = False
    iterating: bool = False
    text_parts: list[str] = field(default_factory=list)

    @classmethod
    def for_args(cls, rid: RequestId, args: dict[str, Any]) -> StreamState:
        """The state of a stream started with ``args`` (its ``credit`` window)."""
        return cls(rid, args.get("credit", DEFAULT_CREDIT))

    def begin(self) -> None:
        """Start iterating (once only)."""
        if self.iterating:
            raise InternalError("a stream can be iterated only once")
        self.iterating = True

    def apply(self, reply: Reply) -> Chunk | None:
        """Fold one reply in; returns a chunk, or None at the end (then ``done`` is set)."""
        if self.done:
            return None
        if reply.kind == "item":
            if reply.seq is not None and reply.seq != self.next_seq:
                return self._fail(_out_of_order(self.request_id, self.next_seq, reply.seq,
                                                "item"))
            self.next_seq += 1
            self.consumed_since_grant += 1
            chunk = Chunk.from_wire(reply.item or {})
            self.text_parts.append(chunk.text)
            return chunk
        self.done = self.ended = True
        if reply.kind == "end":
            if reply.seq is not None and reply.seq != self.next_seq:
                return self._fail(_out_of_order(self.request_id, self.next_seq, reply.seq,
                                                "end"))
            result = reply.result or {}
            self.finish_reason = result.get("finish_reason")
            self.metrics = dict(result.get("metrics") or {})
            calls = result.get("tool_calls")
            self.tool_calls = list(calls) if isinstance(calls, list) else None
        elif reply.kind == "error":
            self.error = error_from_wire(reply.error or {})
            self.finish_reason = "error"
        else:
            self._fail(InternalError(f"stream {self.request_id!r}: unexpected {reply.kind!r} "
                                     "reply", {"request": self.request_id, "kind": reply.kind}))
        return None

    def _fail(self, error: LoradError) -> None:
        self.done = True
        self.error = error
        self.finish_reason = "error"
        return None

    def credit_to_grant(self) -> int:
        """How many items to grant now: the items consumed since the last grant, once they
        reach half the window (``max(1, credit // 2)``); never after the end or a cancel."""
        if (self.done or self.cancel_sent
                or self.consumed_since_grant < max(1, self.credit // 2)):
            return 0
        n, self.consumed_since_grant = self.consumed_since_grant, 0
        return n

    def request_cancel(self) -> bool:
        """The user asked to cancel: True if a cancel is to be sent now (the stream then
        goes on to its ``end``, whose ``finish_reason`` is ``cancelled``)."""
        if self.done or self.cancel_sent:
            return False
        self.cancel_sent = True
        return True

    def close(self) -> bool:
        """The shell stops reading: a stream not ended counts as cancelled. True if a cancel
        is to be sent (the daemon may still be running it and none was sent yet)."""
        if not self.done:
            self.done = True
            self.finish_reason = "cancelled"
        if self.ended or self.cancel_sent:
            return False
        self.cancel_sent = True
        return True

    @property
    def text(self) -> str:
        return "".join(self.text_parts)


class StreamView:
    """What both shells' streams show of their :class:`StreamState` (``_state``)."""

    _state: StreamState
    request_id: RequestId

    @property
    def finish_reason(self) -> str | None:
        return self._state.finish_reason

    @property
    def metrics(self) -> dict[str, Any]:
        return self._state.metrics

    @property
    def text(self) -> str:
        return self._state.text

    @property
    def tool_calls(self) -> list[dict[str, Any]] | None:
        """A chat with tools: the calls the model made (OpenAI's shape: ``{id, type,
        function: {name, arguments}}``, arguments as JSON text), after the end; None for a
        request without tools."""
        return self._state.tool_calls

    @property
    def done(self) -> bool:
        return self._state.done


class ContextView:
    """What both shells' context handles share: the context's info and its streams."""

    def __init__(self, info: dict[str, Any]) -> None:
        self.info = info
        self.id: str = info["id"]
        self.model: str = info["model"]
        self._streams: list[Any] = []

    def _track(self, stream: Any) -> Any:
        self._streams = [s for s in self._streams if not s.done]
        self._streams.append(stream)
        return stream

    def cancel(self) -> None:
        """Cancel every stream of this handle that is still running."""
        for stream in self._streams:
            stream.cancel()

    def _close_streams(self) -> None:
        for stream in self._streams:
            stream.close()
        self._streams.clear()


_PENDING = object()
PENDING = _PENDING
"""What :meth:`ProgressState.apply` returns while the load goes on."""


@dataclass
class ProgressState:
    """A ``load_model(progress=True)`` stream: progress items (not under credit), then the
    model info in the ``end`` (or an error)."""

    request_id: RequestId
    progress: Callable[[float], None]
    next_seq: int = 0

    def apply(self, reply: Reply) -> Any:
        """Report an item's progress and return :data:`PENDING`, or return the model info at
        the end (or raise the error)."""
        if reply.kind in ("item", "end") and reply.seq is not None \
                and reply.seq != self.next_seq:
            raise _out_of_order(self.request_id, self.next_seq, reply.seq, reply.kind)
        if reply.kind == "item":
            self.next_seq += 1
            self.progress(float((reply.item or {}).get("progress", 0.0)))
            return PENDING
        if reply.kind == "end":
            return (reply.result or {})["model"]
        return check_result(reply)

