"""The daemon's core without sockets: the operation table, and handlers driven through the
in-memory transport (no ZeroMQ, no model loaded)."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from lorad.daemon.config import DaemonConfig
from lorad.daemon.dispatch import Dispatcher
from lorad.daemon.engine import Engine
from lorad.daemon.memory import MemoryTransport
from lorad.daemon.metrics import Metrics
from lorad.daemon.operations import OPERATIONS
from lorad.daemon.requests import RequestHandle
from lorad.daemon.services import Services
from lorad.daemon.sessions import Sessions
from lorad.protocol import OPS, STREAMING_OPS
from lorad.protocol.ops import SPECS

PEER, OTHER = b"peer-1", b"peer-2"


def test_every_operation_has_one_record_with_a_coroutine_handler() -> None:
    assert set(OPERATIONS) == set(OPS)
    for name, op in OPERATIONS.items():
        assert op.name == name
        assert inspect.iscoroutinefunction(op.handler), name
        assert op.streams == (name in STREAMING_OPS)
        assert op.schema is OPS[name]


def test_the_table_refuses_an_operation_without_a_handler_and_a_handler_without_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from lorad.daemon import operations

    monkeypatch.setitem(operations.SPECS, "frobnicate", SPECS["ping"])
    with pytest.raises(RuntimeError, match="'frobnicate' has no coroutine handler"):
        operations._table()
    monkeypatch.delitem(operations.SPECS, "frobnicate")
    found = operations._handler_functions()

    async def orphan(s, h):
        return None

    monkeypatch.setattr(operations, "_handler_functions",
                        lambda: {**found, "orphan": ("x", orphan)})
    with pytest.raises(RuntimeError, match="without an operation: \\['orphan'\\]"):
        operations._table()


@dataclass
class Core:
    services: Services
    dispatcher: Dispatcher
    transport: MemoryTransport

    async def call(self, op: str, args: dict | None = None, rid: int = 1, peer: bytes = PEER):
        return await self.transport.call(self.dispatcher, peer, op, args, rid)


@pytest.fixture
async def core(tmp_path: Path) -> AsyncIterator[Core]:
    config = DaemonConfig(endpoint="inproc://unused", allowed_dirs=[str(tmp_path)],
                          adapter_dirs=[str(tmp_path / "adapters")],
                          peft_cache_dir=str(tmp_path / "peft"))
    metrics = Metrics()
    engine = Engine(config, metrics)
    services = Services(config, engine, Sessions(config.limits), metrics)
    transport = MemoryTransport()
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        yield Core(services, Dispatcher(services, transport.send, nursery), transport)
        nursery.cancel_scope.cancel()


async def test_ping_and_status_without_sockets(core: Core) -> None:
    reply = await core.call("ping")
    assert reply.kind == "result" and reply.result["pong"] is True
    status = (await core.call("status", rid=2)).result
    assert status["contexts_total"] == 0 and status["counters"]["requests"] == 2
    assert status["http"] is None  # no HTTP door


async def test_a_bad_request_is_answered_not_raised(core: Core) -> None:
    reply = await core.call("generate", {"context": "c", "prompt": "x", "max_tokens": -1})
    assert reply.kind == "error" and reply.error["code"] == "bad_request"
    reply = await core.call("no_such_op", rid=2)
    assert reply.error["code"] == "bad_request" and reply.error["details"]["field"] == "op"


async def test_a_request_id_in_flight_is_refused(core: Core) -> None:
    held = RequestHandle(PEER, 7, "generate", {}, core.transport.send, core.services.sessions.done)
    core.services.sessions.add(held)  # request 7 of PEER is in flight
    reply = await core.call("ping", rid=7)
    assert reply.error["code"] == "bad_request" and reply.error["details"]["field"] == "id"
    assert (await core.call("ping", rid=7, peer=OTHER)).kind == "result"  # ids are per peer
    held.send_result(None)
    assert (await core.transport.final(PEER, 7)).result is None  # the held request's end
    again = await core.call("ping", rid=7)
    assert again.kind == "result" and again.result["pong"]  # and the id is free once it ended


async def test_draining_refuses_new_work_but_answers_status(core: Core) -> None:
    core.services.draining = True
    assert (await core.call("create_context", {"model": "m"})).error["code"] == "shutting_down"
    assert (await core.call("status", rid=2)).kind == "result"


async def test_every_operation_on_missing_things_gets_a_typed_error(core: Core,
                                                                    tmp_path: Path) -> None:
    """Each handler runs (no model is loaded): each answers, none takes the core down."""
    missing = {"context": "ctx-missing", "model": "no-model", "path": "no-adapter",
               "prompt": "x", "messages": [{"role": "user", "content": "x"}],
               "text": "x", "tokens": [1], "request": 99, "n": 1,
               "loras": [["no-adapter", 1.0]], "input": ["x"], "name": "no-name"}
    for rid, (name, op) in enumerate(sorted(OPERATIONS.items()), start=1):
        args = {k: v for k, v in missing.items() if k in op.schema}
        if name in ("load_model", "name_lora"):
            args["path"] = str(tmp_path / "absent.gguf")
        if name in ("tokenize", "detokenize", "embed"):
            del args["context"]
        if name == "generate":
            del args["tokens"]
        reply = await core.call(name, args, rid=rid)
        assert reply.kind in ("result", "error"), (name, reply)
        if reply.kind == "error":
            assert reply.error["code"] in ("not_found", "lora_file_not_found",
                                           "model_load_failed", "forbidden_path"), (name, reply)
    assert (await core.call("ping", rid=1000)).kind == "result"


async def test_a_handler_that_fails_unexpectedly_is_an_internal_error(
        core: Core, monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken(s, h):
        raise RuntimeError("boom")

    from lorad.daemon import operations

    monkeypatch.setitem(operations.OPERATIONS, "status",
                        operations.Operation("status", broken, SPECS["status"]))
    reply = await core.call("status")
    assert reply.error["code"] == "internal" and "boom" in reply.error["message"]
    assert (await core.call("ping", rid=2)).kind == "result"


async def test_a_handler_cancelled_midway_ends_its_request(
        core: Core, monkeypatch: pytest.MonkeyPatch) -> None:
    """An HTTP client that goes away cancels its request's task: the request still ends
    (cancelled), so its session forgets it."""
    from lorad.daemon import operations

    started = trio.Event()

    async def slow(s, h):
        started.set()
        await trio.sleep_forever()

    monkeypatch.setitem(operations.OPERATIONS, "status",
                        operations.Operation("status", slow, SPECS["status"]))
    pipeline = core.dispatcher.pipeline
    replies: list = []
    handle = pipeline.admit(OTHER, 3, "status", {}, lambda _p, r: replies.append(r))
    assert core.services.sessions.find(OTHER, 3) is handle
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pipeline.run, handle)
            await started.wait()
            scope.cancel()
    assert handle.finished and replies[-1].error["code"] == "cancelled"
    assert core.services.sessions.find(OTHER, 3) is None
    assert OTHER not in core.services.sessions.peers


async def test_cancel_and_credit_are_scoped_to_the_peer(core: Core) -> None:
    reply = await core.call("cancel", {"request": 5}, rid=1, peer=OTHER)
    assert reply.result == {"request": 5, "cancelled": False, "reason": "not running"}
    reply = await core.call("credit", {"request": 5, "n": 3}, rid=2, peer=OTHER)
    assert reply.result == {"request": 5, "granted": False}


def test_the_daemon_imports_nothing_of_the_client() -> None:
    import subprocess
    import sys

    script = ("import sys, lorad.daemon.server, lorad.daemon.cli, lorad.daemon.operations; "
              "bad = [m for m in sys.modules if m.startswith('lorad.client')]; "
              "assert not bad, bad")
    subprocess.run([sys.executable, "-c", script], check=True)
    out = subprocess.run([sys.executable, "-m", "lorad.client.cli", "serve", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "--curve-authorized-keys" in out and "--endpoint" in out
