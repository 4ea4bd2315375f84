"""The clients' core and both shells, without a daemon or a socket.

A scripted daemon answers through in-memory transports (the seam of ``lorad.client.transport``):
reply routing, stream order checks, credit, cancel, connection loss and error mapping are tested
here for the sync and the trio client alike. Then the ZeroMQ transports' connection state, with
a bare ROUTER socket and a stand-in for the socket monitor. The last tests cover ``lorad
serve``'s flags, now applied by ``lorad.daemon.config.apply_overrides``.
"""

from __future__ import annotations

import collections
import math
import shutil
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import zmq

from lorad.client import (
    AsyncClient,
    BadRequest,
    Client,
    DaemonUnavailable,
    InternalError,
    LoradError,
    RequestTimeout,
)
from lorad.client.core import CONNECTION_LOST, ClientCore, Incoming, StreamState
from lorad.client.errors import ERRORS_BY_CODE
from lorad.protocol import ErrorCode, Reply, RequestId, decode_request, encode_reply

ENDPOINT = "inproc://scripted"


def reply(kind: str, rid: RequestId | None, **payload: Any) -> list[bytes]:
    return encode_reply(Reply(kind=kind, id=rid, **payload))


class ScriptedDaemon:
    """Answers decoded requests as the spec says, with faults on demand. Streams of
    ``generate`` have ``items`` items and honour credit like the real daemon."""

    def __init__(self, items: int = 10) -> None:
        self.items = items
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.errors: dict[str, dict[str, Any]] = {}  # op -> the error it is answered with
        self.silent: set[str] = set()  # ops never answered
        self.gap_at: int | None = None  # the item sent with seq+1 instead of seq
        self.stall_after: int | None = None  # items sent before a stream goes quiet
        self.fail_after: int | None = None  # items sent before a stream ends with an error
        self.before_next: list[list[bytes]] = []  # frames sent ahead of the next answer
        self.streams: dict[RequestId, dict[str, int]] = {}
        self.grants: list[tuple[RequestId, int]] = []
        self.cancels: list[RequestId] = []

    def handle(self, frames: list[bytes]) -> list[list[bytes]]:
        request = decode_request(frames)
        self.requests.append((request.op, request.args))
        out, self.before_next = self.before_next, []
        if request.op in self.silent:
            return out
        if request.op in self.errors:
            return [*out, reply("error", request.id, error=self.errors[request.op])]
        return out + getattr(self, f"op_{request.op}")(request.id, request.args)

    def op_ping(self, rid: RequestId, args: dict) -> list[list[bytes]]:
        return [reply("result", rid, result={"pong": True})]

    def op_create_context(self, rid: RequestId, args: dict) -> list[list[bytes]]:
        return [reply("result", rid, result={"id": "ctx-1", "model": args["model"]})]

    def op_close_context(self, rid: RequestId, args: dict) -> list[list[bytes]]:
        return [reply("result", rid, result={"closed": True})]

    def op_set_lora(self, rid: RequestId, args: dict) -> list[list[bytes]]:
        stack = [{"ref": args["path"], "scale": args["scale"]}]
        return [reply("result", rid, result={"context": args["context"], "loras": stack})]

    def op_load_model(self, rid: RequestId, args: dict) -> list[list[bytes]]:
        info = {"id": "m", "path": args["path"]}
        if not args.get("progress"):
            return [reply("result", rid, result=info)]
        return [reply("item", rid, seq=0, item={"progress": 0.5}),
                reply("item", rid, seq=1, item={"progress": 1.0}),
                reply("end", rid, seq=2, result={"model": info})]

    def op_generate(self, rid: RequestId, args: dict) -> list[list[bytes]]:
        self.streams[rid] = {"credit": args.get("credit", 64), "seq": 0}
        return self._emit(rid)

    def op_credit(self, rid: RequestId, args: dict) -> list[list[bytes]]:
        target, n = args["request"], args["n"]
        self.grants.append((target, n))
        stream = self.streams.get(target)
        out = [reply("result", rid, result={"request": target, "granted": stream is not None})]
        if stream is not None:
            stream["credit"] += n
            out += self._emit(target)
        return out

    def op_cancel(self, rid: RequestId, args: dict) -> list[list[bytes]]:
        target = args["request"]
        self.cancels.append(target)
        stream = self.streams.pop(target, None)
        out = [reply("result", rid, result={"cancelled": stream is not None})]
        if stream is not None:
            out.append(reply("end", target, seq=stream["seq"], result={
                "finish_reason": "cancelled", "metrics": {"generated_tokens": stream["seq"]}}))
        return out

    def _emit(self, rid: RequestId) -> list[list[bytes]]:
        stream, out = self.streams[rid], []
        while stream["credit"] > 0 and stream["seq"] < self.items:
            seq = stream["seq"]
            if seq in (self.stall_after, self.fail_after):
                break
            wire_seq = seq + 1 if seq == self.gap_at else seq
            out.append(reply("item", rid, seq=wire_seq, item={"text": f"t{seq} ",
                                                               "token_ids": [seq]}))
            stream["seq"] += 1
            stream["credit"] -= 1
        if stream["seq"] == self.fail_after:
            del self.streams[rid]
            out.append(reply("error", rid, error={"code": "internal", "message": "decode failed",
                                                  "details": {"rc": -1}}))
        elif stream["seq"] == self.items:
            del self.streams[rid]
            out.append(reply("end", rid, seq=stream["seq"], result={
                "finish_reason": "length", "metrics": {"generated_tokens": self.items}}))
        return out


class MemoryTransport:
    """A sync transport to a :class:`ScriptedDaemon` (answers are ready as soon as sent)."""

    def __init__(self, daemon: ScriptedDaemon) -> None:
        self.daemon = daemon
        self.connected = True
        self.closed = False
        self.inbox: collections.deque[Incoming] = collections.deque()

    def send(self, frames: list[bytes], timeout: float) -> bool:
        return self.send_nowait(frames)

    def send_nowait(self, frames: list[bytes]) -> bool:
        if not self.connected:
            return False
        self.inbox.extend(self.daemon.handle(frames))
        return True

    def receive(self, timeout: float) -> list[Incoming]:
        if not self.inbox:
            time.sleep(timeout)  # nothing else can arrive
        out = list(self.inbox)
        self.inbox.clear()
        return out

    def lose_connection(self) -> None:
        self.connected = False
        self.inbox.append(CONNECTION_LOST)

    def close(self) -> None:
        self.closed = True


class AsyncMemoryTransport:
    """The trio twin of :class:`MemoryTransport`: ``run`` delivers from a memory channel."""

    def __init__(self, daemon: ScriptedDaemon) -> None:
        self.daemon = daemon
        self.connected = True
        self.closed = False
        self._in, self._out = trio.open_memory_channel[Incoming](math.inf)

    async def run(self, deliver) -> None:
        async for event in self._out:
            deliver(event)

    async def send(self, frames: list[bytes], timeout: float) -> bool:
        await trio.lowlevel.checkpoint()
        return self.send_nowait(frames)

    def send_nowait(self, frames: list[bytes]) -> bool:
        if not self.connected:
            return False
        for answer in self.daemon.handle(frames):
            self._in.send_nowait(answer)
        return True

    def lose_connection(self) -> None:
        self.connected = False
        self._in.send_nowait(CONNECTION_LOST)

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def daemon() -> ScriptedDaemon:
    return ScriptedDaemon()


@pytest.fixture
def transport(daemon: ScriptedDaemon) -> MemoryTransport:
    return MemoryTransport(daemon)


@pytest.fixture
def client(transport: MemoryTransport):
    with Client(ENDPOINT, transport=transport) as c:
        yield c
    assert transport.closed


def ops(daemon: ScriptedDaemon) -> list[str]:
    return [op for op, _ in daemon.requests]


# -- the core alone --------------------------------------------------------------------------------
def test_core_routes_replies_by_id_and_drops_what_it_cannot_route() -> None:
    core = ClientCore(ENDPOINT)
    a, _ = core.start("ping", {})
    b, _ = core.start("status", {})
    assert (a, b) == (1, 2) and core.pending == [1, 2]
    assert core.fire("credit", {"request": a, "n": 1}) and core.start("ping", {})[0] == 4
    core.forget(4)
    for frames in (reply("result", b, result="B"), reply("hb", None),
                   reply("result", 99, result="stray"), [b"lorad/1", b"\xc1"], [b"junk"],
                   reply("result", a, result="A")):
        core.feed(frames)
    assert core.dropped == 4
    assert core.next_reply(a).result == "A" and core.next_reply(a) is None
    assert core.next_reply(b).result == "B"
    core.forget(a)
    assert core.feed(reply("result", a, result="late")) == [] and core.dropped == 5
    with pytest.raises(InternalError):
        core.next_reply(a)


def test_core_connection_lost_fails_each_pending_request_after_its_replies() -> None:
    core = ClientCore(ENDPOINT)
    a, _ = core.start("generate", {})
    b, _ = core.start("ping", {})
    core.feed(reply("item", a, seq=0, item={"text": "x"}))
    assert core.feed(CONNECTION_LOST) == [a, b]
    assert core.next_reply(a).kind == "item"
    for rid in (a, b):
        with pytest.raises(DaemonUnavailable, match="went away") as err:
            core.next_reply(rid)
        assert err.value.details == {"endpoint": ENDPOINT}
        assert not core.is_pending(rid)
    c, _ = core.start("ping", {})  # a later request is not affected
    assert core.next_reply(c) is None


def test_core_keeps_cancels_for_later_in_order() -> None:
    core = ClientCore(ENDPOINT)
    core.cancel_later(7)
    core.cancel_later(8)
    sent = [decode_request(f) for f in core.take_cancels()]
    assert [(r.op, r.args) for r in sent] == [("cancel", {"request": 7}),
                                              ("cancel", {"request": 8})]
    assert core.take_cancels() == []


def item(rid: RequestId, seq: int, text: str = "t") -> Reply:
    return Reply(kind="item", id=rid, seq=seq, item={"text": text, "token_ids": [seq]})


def test_stream_state_grants_half_the_window_at_a_time() -> None:
    state = StreamState(1, credit=4)
    grants = []
    for seq in range(7):
        assert state.apply(item(1, seq)).token_ids == [seq]
        grants.append(state.credit_to_grant())
    assert grants == [0, 2, 0, 2, 0, 2, 0]
    assert StreamState(1, credit=1).apply(item(1, 0)) is not None
    one = StreamState(1, credit=1)
    one.apply(item(1, 0))
    assert one.credit_to_grant() == 1  # max(1, credit // 2)
    assert state.request_cancel() and not state.request_cancel()
    state.apply(item(1, 7))
    assert state.credit_to_grant() == 0  # nothing more once cancelled
    assert state.apply(Reply(kind="end", id=1, seq=8, result={"finish_reason": "cancelled",
                                                              "metrics": {"n": 8}})) is None
    assert (state.done, state.finish_reason, state.metrics) == (True, "cancelled", {"n": 8})
    assert state.text == "t" * 8 and not state.close()  # ended: no cancel due


@pytest.mark.parametrize("bad", [item(1, 3), item(1, 1),
                                 Reply(kind="end", id=1, seq=5, result={})],
                         ids=["gap", "repeat", "end"])
def test_stream_state_refuses_a_seq_out_of_order(bad: Reply) -> None:
    state = StreamState(1)
    state.apply(item(1, 0))
    state.apply(item(1, 1))
    assert state.apply(bad) is None and state.done and state.finish_reason == "error"
    assert isinstance(state.error, InternalError)
    assert state.error.details == {"request": 1, "expected_seq": 2, "seq": bad.seq}
    assert state.apply(item(1, 2)) is None  # nothing after the end
    assert state.close() is (bad.kind == "item")  # the daemon may still run it: cancel


def test_stream_state_close_and_cancel_bookkeeping() -> None:
    state = StreamState(1)
    assert state.close() and state.finish_reason == "cancelled" and state.done
    assert not state.close() and not state.request_cancel()
    errored = StreamState(2)
    errored.apply(Reply(kind="error", id=2, error={"code": "context_busy", "message": "busy"}))
    assert errored.error.code == "context_busy" and not errored.close()
    state = StreamState(3)
    state.begin()
    with pytest.raises(InternalError, match="only once"):
        state.begin()


# -- the sync client ------------------------------------------------------------------------------
def test_a_reply_for_an_unknown_id_is_ignored(client: Client, daemon: ScriptedDaemon) -> None:
    daemon.before_next = [reply("result", 999, result="stray"), reply("hb", None),
                          [b"lorad/1", b"not msgpack \xc1"]]
    assert client.ping() == {"pong": True}
    assert client._core.dropped == 3 and client._core.pending == []


@pytest.mark.parametrize("code", [c.value for c in ErrorCode])
def test_error_replies_map_to_their_exception(client: Client, daemon: ScriptedDaemon,
                                              code: str) -> None:
    daemon.errors["ping"] = {"code": code, "message": "m", "details": {"field": "x"}}
    with pytest.raises(ERRORS_BY_CODE[code]) as err:
        client.ping()
    assert (err.value.code, err.value.message, err.value.details) == (code, "m", {"field": "x"})
    daemon.errors["ping"] = {"code": "from_the_future", "message": "m"}
    with pytest.raises(InternalError) as err:
        client.ping()
    assert err.value.code == "from_the_future"


def test_timeout_no_connection_and_lost_connection(client: Client, transport: MemoryTransport,
                                                   daemon: ScriptedDaemon) -> None:
    daemon.silent.add("ping")
    with pytest.raises(RequestTimeout) as err:
        client.ping(timeout=0.05)
    assert err.value.details == {"request": 1, "timeout": 0.05}
    daemon.silent.clear()
    daemon.stall_after = 3
    stream = client.create_context("m").generate("hi")
    texts = []
    with pytest.raises(DaemonUnavailable, match="went away"):
        for chunk in stream:
            texts.append(chunk.text)
            if len(texts) == 1:
                transport.lose_connection()
    assert texts == ["t0 ", "t1 ", "t2 "]  # what came before the loss still arrives
    with pytest.raises(DaemonUnavailable, match="no lorad daemon answers") as err:
        client.ping()
    assert err.value.details == {"endpoint": ENDPOINT}
    assert client._core.pending == []
    # A loss noticed while nothing waits does not fail the next request (daemon restarted).
    transport.lose_connection()
    transport.connected = True
    assert client.ping() == {"pong": True}


def test_stream_grants_credit_as_it_consumes(client: Client, daemon: ScriptedDaemon) -> None:
    ctx = client.create_context("m")
    stream = ctx.generate("hi", credit=4, max_tokens=None)
    assert stream.collect() == "".join(f"t{i} " for i in range(10))
    assert (stream.finish_reason, stream.metrics) == ("length", {"generated_tokens": 10})
    assert daemon.grants == [(stream.request_id, 2)] * 5
    assert daemon.requests[1] == ("generate", {"context": "ctx-1", "prompt": "hi", "credit": 4})
    assert daemon.cancels == [] and client._core.pending == []
    with pytest.raises(InternalError, match="only once"):
        list(stream)


def test_leaving_a_stream_early_cancels_it(client: Client, daemon: ScriptedDaemon) -> None:
    ctx = client.create_context("m")
    with ctx.generate("hi", credit=4) as stream:
        for chunk in stream:
            if chunk.text == "t1 ":
                break
    assert daemon.cancels == [stream.request_id]
    assert stream.finish_reason == "cancelled" and stream.text == "t0 t1 "
    assert client.ping() == {"pong": True}  # the stream's late end is dropped
    assert client._core.dropped >= 1 and client._core.pending == []
    ctx.close()
    assert ops(daemon)[-1] == "close_context" and daemon.cancels == [stream.request_id]


def test_cancel_ends_the_stream_as_cancelled_with_its_metrics(client: Client,
                                                              daemon: ScriptedDaemon) -> None:
    stream = client.create_context("m").generate("hi", credit=2)
    texts = []
    for chunk in stream:
        texts.append(chunk.text)
        if len(texts) == 1:
            stream.cancel()
            stream.cancel()  # once only
    # What was sent before the cancel still arrives; no credit is granted after it.
    assert texts == ["t0 ", "t1 ", "t2 "]
    assert daemon.grants == [(stream.request_id, 1)]
    assert daemon.cancels == [stream.request_id]
    assert stream.finish_reason == "cancelled" and stream.metrics == {"generated_tokens": 3}


def test_a_seq_gap_fails_the_stream_and_cancels_it(client: Client,
                                                   daemon: ScriptedDaemon) -> None:
    daemon.gap_at = 3
    stream = client.create_context("m").generate("hi")
    texts = []
    with pytest.raises(InternalError) as err:
        for chunk in stream:
            texts.append(chunk.text)
    assert texts == ["t0 ", "t1 ", "t2 "]
    assert err.value.details == {"request": stream.request_id, "expected_seq": 3, "seq": 4}
    assert stream.finish_reason == "error" and daemon.cancels == [stream.request_id]


def test_an_error_ending_a_stream_is_raised_after_its_items(client: Client,
                                                            daemon: ScriptedDaemon) -> None:
    daemon.fail_after = 2
    stream = client.create_context("m").generate("hi")
    texts = []
    with pytest.raises(InternalError, match="decode failed") as err:
        for chunk in stream:
            texts.append(chunk.text)
    assert texts == ["t0 ", "t1 "] and err.value.details == {"rc": -1}
    assert stream.finish_reason == "error" and daemon.cancels == []


def test_a_cancel_from_another_thread_goes_with_the_next_request(
        client: Client, daemon: ScriptedDaemon) -> None:
    daemon.stall_after = 0
    stream = client.create_context("m").generate("hi")
    worker = threading.Thread(target=stream.cancel)
    worker.start()
    worker.join()
    assert daemon.cancels == []
    client.ping()
    assert daemon.cancels == [stream.request_id]
    assert ops(daemon)[-2:] == ["cancel", "ping"]


def test_load_progress_and_adapter_calls(client: Client, daemon: ScriptedDaemon,
                                         tmp_path: Path) -> None:
    seen: list[float] = []
    info = client.load_model(tmp_path / "m.gguf", progress=seen.append, n_gpu_layers=None)
    assert info == {"id": "m", "path": str(tmp_path / "m.gguf")} and seen == [0.5, 1.0]
    assert daemon.requests[-1][1] == {"path": str(tmp_path / "m.gguf"), "progress": True}
    ctx = client.create_context(info, n_ctx=128, loras=["name", ("a/b.gguf", 0.5)])
    assert daemon.requests[-1][1] == {"model": "m", "n_ctx": 128, "loras": [
        {"path": "name", "scale": 1.0}, {"path": str(Path("a/b.gguf").resolve()), "scale": 0.5}]}
    assert ctx.set_lora("style", 0.25) == [{"ref": "style", "scale": 0.25}]


# -- the trio client -----------------------------------------------------------------------------
@pytest.fixture
async def aclient(daemon: ScriptedDaemon):
    transport = AsyncMemoryTransport(daemon)
    async with AsyncClient(ENDPOINT, transport=transport) as c:
        yield c
    assert transport.closed


async def test_async_stream_grants_credit_like_the_sync_client(aclient: AsyncClient,
                                                               daemon: ScriptedDaemon) -> None:
    ctx = await aclient.create_context("m")
    stream = await ctx.generate("hi", credit=4)
    assert await stream.collect() == "".join(f"t{i} " for i in range(10))
    assert stream.finish_reason == "length"
    assert daemon.grants == [(stream.request_id, 2)] * 5
    # The same calls put the same requests on the wire as the sync client's.
    sync_daemon = ScriptedDaemon()
    with Client(ENDPOINT, transport=MemoryTransport(sync_daemon)) as c:
        c.create_context("m").generate("hi", credit=4).collect()
    assert daemon.requests == sync_daemon.requests


async def test_async_early_exit_cancel_and_seq_gap(aclient: AsyncClient,
                                                   daemon: ScriptedDaemon) -> None:
    ctx = await aclient.create_context("m")
    async with await ctx.generate("hi", credit=4) as stream:
        async for _chunk in stream:
            break
    assert daemon.cancels == [stream.request_id] and stream.finish_reason == "cancelled"
    stream = await ctx.generate("hi", credit=2)
    texts = []
    async for chunk in stream:
        texts.append(chunk.text)
        ctx.cancel()
    assert texts == ["t0 ", "t1 ", "t2 "] and stream.finish_reason == "cancelled"
    daemon.gap_at = 1
    stream = await ctx.generate("hi")
    with pytest.raises(InternalError, match="seq 2 where 1 was due"):
        await stream.collect()
    assert daemon.cancels[-1] == stream.request_id
    assert await aclient.ping() == {"pong": True} and aclient._core.pending == []


async def test_async_errors_timeout_and_lost_connection(daemon: ScriptedDaemon) -> None:
    transport = AsyncMemoryTransport(daemon)
    # only the call meant to time out has a short timeout: the others' replies may come late
    # on a loaded machine (a 0.05 s default once failed the full suite)
    async with AsyncClient(ENDPOINT, transport=transport) as c:
        daemon.errors["ping"] = {"code": "bad_request", "message": "no", "details": {"a": 1}}
        with pytest.raises(BadRequest) as err:
            await c.ping()
        assert err.value.details == {"a": 1}
        daemon.errors.clear()
        daemon.silent.add("ping")
        with pytest.raises(RequestTimeout):
            await c.ping(timeout=0.05)
        daemon.silent.clear()
        daemon.stall_after = 1
        stream = await (await c.create_context("m")).generate("hi")
        transport.lose_connection()
        texts = []
        with pytest.raises(DaemonUnavailable, match="went away"):
            async for chunk in stream:
                texts.append(chunk.text)
        assert texts == ["t0 "]
        with pytest.raises(DaemonUnavailable, match="no lorad daemon answers"):
            await c.ping()


class Boom(Exception):
    pass


async def test_async_client_body_exception_propagates_unchanged(daemon: ScriptedDaemon) -> None:
    boom = Boom("from the body")
    with pytest.raises(Boom) as err:
        async with AsyncClient(ENDPOINT, transport=AsyncMemoryTransport(daemon)) as c:
            await c.ping()
            raise boom
    assert err.value is boom
    # A client error raised by a call in the body comes out as itself, too.
    daemon.errors["ping"] = {"code": "not_found", "message": "gone"}
    with pytest.raises(LoradError) as err:
        async with AsyncClient(ENDPOINT, transport=AsyncMemoryTransport(daemon)) as c:
            await c.ping()
    assert type(err.value) is ERRORS_BY_CODE["not_found"]
    # And with the real ZeroMQ transport, no daemon behind it.
    with pytest.raises(Boom) as err:
        async with AsyncClient("ipc:///nonexistent/lorad.sock", connect_timeout=0.1):
            raise boom
    assert err.value is boom


async def test_async_client_body_cancellation_is_not_swallowed(daemon: ScriptedDaemon) -> None:
    with trio.move_on_after(0.05) as scope:
        async with AsyncClient(ENDPOINT, transport=AsyncMemoryTransport(daemon)):
            await trio.sleep_forever()
    assert scope.cancelled_caught


# -- the ZeroMQ transports: connection state from the socket monitor --------------------------
class FakeMonitor:
    """Stands in for a DEALER's socket monitor (``get_monitor_socket``), so that a test says
    when the client learns of a handshake or a disconnect, whatever the socket itself does."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        ctx = zmq.Context.instance()
        address = f"inproc://fake-monitor-{id(self)}"
        self.reader = ctx.socket(zmq.PAIR)
        self.reader.bind(address)
        self.writer = ctx.socket(zmq.PAIR)
        self.writer.connect(address)
        monkeypatch.setattr(zmq.Socket, "get_monitor_socket",
                            lambda sock, events=None, addr=None: self.reader)

    def emit(self, event: int) -> None:
        self.writer.send_multipart([struct.pack("=hi", event, 0), b"ipc://fake"])

    def close(self) -> None:
        self.writer.close(linger=0)
        self.reader.close(linger=0)


@pytest.fixture
def monitor(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeMonitor]:
    m = FakeMonitor(monkeypatch)
    yield m
    m.close()


@pytest.fixture
def router() -> Iterator[tuple[str, zmq.Socket]]:
    """A daemon's socket that answers nothing by itself, on a short ipc path."""
    folder = tempfile.mkdtemp(prefix="lorad-t-")
    endpoint = f"ipc://{folder}/d.sock"
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    yield endpoint, sock
    sock.close(linger=0)
    shutil.rmtree(folder, ignore_errors=True)


async def until(condition: Callable[[], bool]) -> None:
    """Wait (5 s at most) until ``condition()`` holds."""
    with trio.fail_after(5):
        while not condition():
            await trio.sleep(0.001)


def answer_ping(sock: zmq.Socket) -> RequestId:
    """Answer the next request (a ping) on a ROUTER socket; its id."""
    peer, *frames = sock.recv_multipart()
    request = decode_request(frames)
    assert request.op == "ping"
    sock.send_multipart([peer, *reply("result", request.id, result={"pong": True})])
    return request.id


def test_a_request_while_the_monitor_says_down_fails_within_connect_timeout(
        monitor: FakeMonitor, router: tuple[str, zmq.Socket]) -> None:
    """The monitor's disconnect can come before the socket drops the connection's pipe: a
    request sent then was queued on that pipe and lost, and waited its whole timeout
    (``RequestTimeout``) instead of failing within ``connect_timeout``."""
    endpoint, sock = router
    with Client(endpoint, timeout=3, connect_timeout=0.3) as client:
        monitor.emit(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        pinger = threading.Thread(target=answer_ping, args=(sock,))
        pinger.start()
        assert client.ping() == {"pong": True}
        pinger.join()
        monitor.emit(zmq.EVENT_DISCONNECTED)  # the socket's pipe is still there
        started = time.monotonic()
        with pytest.raises(DaemonUnavailable, match="no lorad daemon answers"):
            client.ping()
        assert time.monotonic() - started < 1.5
        assert sock.poll(100) == 0  # nothing was handed to the old connection
        monitor.emit(zmq.EVENT_HANDSHAKE_SUCCEEDED)  # connected again: requests go through
        pinger = threading.Thread(target=answer_ping, args=(sock,))
        pinger.start()
        assert client.ping() == {"pong": True}
        pinger.join()


async def test_async_request_while_the_monitor_says_down_fails_within_connect_timeout(
        monitor: FakeMonitor, router: tuple[str, zmq.Socket]) -> None:
    endpoint, sock = router
    async with AsyncClient(endpoint, timeout=3, connect_timeout=0.3) as client:
        monitor.emit(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, answer_ping, sock)
            assert await client.ping() == {"pong": True}
        monitor.emit(zmq.EVENT_DISCONNECTED)
        await until(lambda: not client._transport._connected.is_set())  # the pump took it in
        started = trio.current_time()
        with pytest.raises(DaemonUnavailable, match="no lorad daemon answers"):
            await client.ping()
        assert trio.current_time() - started < 1.5
        assert sock.poll(100) == 0


async def test_async_a_request_queued_for_a_lost_connection_is_not_sent_on_the_next(
        monitor: FakeMonitor) -> None:
    """What waited for a connection that was lost failed with it; it must not run on the
    daemon the client connects to next (nobody waits for its answer)."""
    folder = tempfile.mkdtemp(prefix="lorad-t-")
    endpoint = f"ipc://{folder}/d.sock"
    try:
        async with AsyncClient(endpoint, timeout=3, connect_timeout=0.3) as client:
            monitor.emit(zmq.EVENT_HANDSHAKE_SUCCEEDED)  # said, but no pipe: nobody listens
            async with trio.open_nursery() as nursery:
                async def lost_ping() -> None:
                    with pytest.raises(DaemonUnavailable, match="went away"):
                        await client.ping()

                nursery.start_soon(lost_ping)
                await until(lambda: bool(client._transport._pump._out))  # the ping waits there
                monitor.emit(zmq.EVENT_DISCONNECTED)
            sock = zmq.Context.instance().socket(zmq.ROUTER)
            sock.setsockopt(zmq.LINGER, 0)
            try:
                sock.bind(endpoint)
                monitor.emit(zmq.EVENT_HANDSHAKE_SUCCEEDED)
                async with trio.open_nursery() as nursery:
                    async def answer() -> None:
                        answered.append(await trio.to_thread.run_sync(answer_ping, sock))

                    answered: list[RequestId] = []
                    nursery.start_soon(answer)
                    assert await client.ping() == {"pong": True}
                assert answered == [2]  # the first ping (id 1) never reached the daemon
            finally:
                sock.close(linger=0)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# -- lorad serve's flags (the daemon's config overrides) -------------------------------------------
def test_serve_flags_override_the_config_file(tmp_path: Path) -> None:
    from lorad.daemon.config import ContextSpec, DaemonConfig, apply_overrides

    config = DaemonConfig(endpoint="ipc:///from/file", allowed_dirs=["/a"], adapter_dirs=["/b"],
                          contexts=[ContextSpec(model="x", id="default",
                                                params={"loras": [{"path": "keep"}]})])
    model = tmp_path / "m.gguf"
    apply_overrides(config, endpoint=None, allow_dir=["/c"], adapter_dir=["/d"],
                    heartbeat_ms=250, model=str(model), alias="mm", n_ctx=64, threads=None,
                    speculative={"mode": "prompt_lookup"}, environ={"LORAD_ENDPOINT": "ipc:///e"})
    assert config.endpoint == "ipc:///e" and config.heartbeat_ms == 250
    assert config.allowed_dirs == ["/a", "/c", str(tmp_path)]
    assert config.adapter_dirs == ["/d", "/b"]
    assert [(m.path, m.alias) for m in config.models] == [(str(model), "mm")]
    [default] = config.contexts
    assert (default.model, default.id) == (str(model), "default")
    assert default.params == {"n_ctx": 64, "loras": [{"path": "keep"}],
                              "speculative": {"mode": "prompt_lookup"}}
    apply_overrides(config, endpoint="tcp://127.0.0.1:5555", loras=[("x/a.gguf", 0.5),
                                                                    ("name", 1.0)],
                    environ={"LORAD_ENDPOINT": "ipc:///e"})
    assert config.endpoint == "tcp://127.0.0.1:5555"
    assert default.params["loras"] == [{"path": str(Path("x/a.gguf").resolve()), "scale": 0.5},
                                       {"path": "name", "scale": 1.0}]


def test_serve_flags_for_a_missing_default_context_are_refused(tmp_path: Path) -> None:
    from lorad.client.cli import main
    from lorad.daemon.config import DaemonConfig, apply_overrides
    from lorad.daemon.errors import ConfigError

    with pytest.raises(ConfigError, match="--lora applies to the context 'default'"):
        apply_overrides(DaemonConfig(), loras=[("a.gguf", 1.0)], environ={})
    with pytest.raises(ConfigError, match="--speculative applies"):
        apply_overrides(DaemonConfig(), speculative=False, environ={})
    with pytest.raises(ConfigError, match="--n-ctx applies"):  # was silently ignored
        apply_overrides(DaemonConfig(), n_ctx=2048, environ={})
    with pytest.raises(ConfigError, match="--threads applies"):
        apply_overrides(DaemonConfig(), threads=2, environ={})
    # a config file's default context takes them
    from lorad.daemon.config import ContextSpec
    config = DaemonConfig(contexts=[ContextSpec(model="m", id="default", params={})])
    apply_overrides(config, n_ctx=2048, threads=2, environ={})
    assert config.contexts[0].params == {"n_ctx": 2048, "n_threads": 2}
    assert main(["serve", "--endpoint", f"ipc://{tmp_path}/s.sock", "--lora", "a.gguf"]) == 2
