"""One in-flight request as the daemon sees it: cancellation, credit and its replies."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import trio

from lorad.protocol import ProtocolError, Reply, RequestId, error_reply
from lorad.protocol.args import OpArgs

from . import logs
from .logs import log


class RequestHandle:
    """Routes one request's replies to its peer; streams wait for credit before each item.

    A stream may send at most ``credit`` items before the client grants more (``credit`` op),
    so a client that stops reading makes its stream pause instead of the daemon buffering.
    """

    transport = "zmq"
    """The door the request came through (``http`` for the OpenAI-compatible API)."""
    client: str | None = None
    """An HTTP request's client address (``host:port``), for its log line."""

    def __init__(self, peer: bytes, rid: RequestId, op: str, args: OpArgs | dict[str, Any],
                 send: Callable[[bytes, Reply], None],
                 on_done: Callable[[RequestHandle], None]) -> None:
        self.peer = peer
        self.rid = rid
        self.op = op
        self.args = args
        self.context: str | None = args.get("context")
        self._send = send
        self._on_done = on_done
        self.credit = int(args.get("credit", 0) or 0)
        self._credit_changed = trio.Event()
        self._cancelled = trio.Event()
        self.cancelled = False
        self.finished = False
        self.seq = 0
        self.received_at = time.perf_counter()
        self.outcome: str | None = None
        self.end_metrics: dict[str, Any] | None = None
        """The metrics of a stream's end (None for one-shot requests and errors)."""
        self.elapsed_ms = 0.0

    def place(self, context_id: str) -> None:
        """Run on ``context_id``: the HTTP door picks a context of its pool for a request once
        it is admitted."""
        self.args = dataclasses.replace(self.args, context=context_id)  # type: ignore[type-var]
        self.context = context_id

    def cancel(self) -> None:
        self.cancelled = True
        self._cancelled.set()
        self._credit_changed.set()

    async def wait_cancelled(self) -> None:
        """Return once the request is cancelled."""
        await self._cancelled.wait()

    def grant(self, n: int) -> None:
        self.credit += n
        self._credit_changed.set()

    def send_progress(self, item: dict[str, Any]) -> None:
        """A progress item of a long one-shot operation (not counted against credit)."""
        if not self.finished:
            self._send(self.peer, Reply(kind="item", id=self.rid, seq=self.seq, item=item))
            self.seq += 1

    async def send_item(self, item: dict[str, Any]) -> bool:
        """Send one stream item once credit allows; False if the request was cancelled."""
        while self.credit <= 0 and not self.cancelled:
            self._credit_changed = trio.Event()
            await self._credit_changed.wait()
        if self.cancelled:
            return False
        self.credit -= 1
        self._send(self.peer, Reply(kind="item", id=self.rid, seq=self.seq, item=item))
        self.seq += 1
        return True

    def send_end(self, result: dict[str, Any]) -> None:
        if not self.finished:
            self.end_metrics = result.get("metrics") or {}
        self._finish(Reply(kind="end", id=self.rid, seq=self.seq, result=result),
                     result.get("finish_reason", "stop"))

    def send_result(self, result: Any) -> None:
        self._finish(Reply(kind="result", id=self.rid, result=result), "ok")

    def send_error(self, exc: ProtocolError) -> None:
        self._finish(error_reply(self.rid, exc), exc.code.value)

    def _finish(self, reply: Reply, outcome: str) -> None:
        if self.finished:
            return
        self.finished = True
        self.outcome = outcome
        self.elapsed_ms = (time.perf_counter() - self.received_at) * 1000
        self._send(self.peer, reply)
        self._on_done(self)
        if outcome == "ok" and not logs.DEBUG:
            return  # a successful one-shot request is a debug line (it costs ~60 µs at info)
        (log.debug if outcome == "ok" else log.info)(
            "request",
            id=self.rid,
            op=self.op,
            peer=self.peer.hex(),
            transport=self.transport,
            **({"client": self.client} if self.client else {}),
            context=self.context,
            duration_ms=round((time.perf_counter() - self.received_at) * 1000, 3),
            outcome=outcome,
            **_stream_summary(reply),
        )


_SUMMARY_KEYS = ("generated_tokens", "generation_tokens_per_s", "speculative", "speculative_mode",
                 "drafted_tokens", "accepted_tokens", "acceptance_rate", "memory_drafted_tokens")


def _stream_summary(reply: Reply) -> dict[str, Any]:
    """The end metrics worth a log line (tokens, speed, speculative decoding, adapters)."""
    if reply.kind != "end" or not isinstance(reply.result, dict):
        return {}
    metrics = reply.result.get("metrics") or {}
    out = {k: metrics[k] for k in _SUMMARY_KEYS if k in metrics}
    if metrics.get("loras"):
        out["loras"] = [e["ref"] for e in metrics["loras"]]
    return out
