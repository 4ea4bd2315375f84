"""Admission through a real daemon: a memory budget for weights and KV caches, a bound on
``n_threads``, and a model unload that never races a context being created on it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
import zmq

from conftest import DaemonProcess, start_daemon
from lorad.client import Client, TooLarge
from lorad.protocol.codec import decode_reply

TAG = b"lorad/1"
KIB = 1024
EXACT = {"kv_type": "f16", "flash_attn": False}
CELL = 2 * (2 * 32) * 2
"""A tiny model's KV cell: 2 layers x (32 key + 32 value elements) x 2 bytes (f16)."""
HEADROOM = 560 * KIB
"""The budget beyond the tiny model's file: one 2048-cell context (512 KiB), not two, nor
another tiny model (599 KiB)."""


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory, models_dir: Path,
          tiny_model: Path) -> Iterator[DaemonProcess]:
    workdir = tmp_path_factory.mktemp("admission")
    config = workdir / "lorad.toml"
    budget = tiny_model.stat().st_size + HEADROOM
    config.write_text(f"[limits]\nmemory_budget_bytes = {budget}\n")
    d = start_daemon(workdir, [models_dir], "--config", str(config))
    yield d
    assert d.stop() == 0, d.log()


def memory(client: Client) -> dict:
    return client.status()["memory"]


def test_the_default_budget_is_derived_from_the_machine(client: Client) -> None:
    caps = client.capabilities()["memory"]
    assert caps["budget"] == int(caps["machine"] * 0.8)
    assert caps["source"].startswith("derived")
    assert 0 < caps["machine"] <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def test_a_context_past_the_budget_is_refused_with_the_figures(small: DaemonProcess,
                                                               tiny_model: Path) -> None:
    with small.client() as client:
        client.load_model(tiny_model)
        before = memory(client)
        with pytest.raises(TooLarge) as err:
            client.create_context(tiny_model, n_ctx=131072, **EXACT)
        details = err.value.details
        assert details["limit"] == "memory_budget_bytes"
        assert details["needed"] == 131072 * CELL
        assert details["budget"] == before["budget"]
        assert details["in_use"] == before["in_use"]
        assert memory(client)["in_use"] == before["in_use"]  # nothing was allocated
        assert client.status()["batching"] == []


def test_a_context_costs_its_own_kv_and_growth_past_the_budget_is_refused(
        small: DaemonProcess, tiny_model: Path) -> None:
    with small.client() as client:
        client.load_model(tiny_model)
        base = memory(client)["in_use"]
        with client.create_context(tiny_model, n_ctx=2048, **EXACT) as ctx:
            assert memory(client)["in_use"] == base + 2048 * CELL  # one sequence, not four
            [slab] = client.status()["batching"]
            assert slab["sequences"] == 1
            with pytest.raises(TooLarge) as err:  # a second one would widen the slab to 2
                client.create_context(tiny_model, n_ctx=2048, **EXACT)
            assert err.value.details["needed"] == 2 * 2048 * CELL
            assert ctx.generate("Hello world", max_tokens=4).collect()  # still serving
        # the emptied slab is kept for the next context of its kind, its KV in the budget ...
        [slab] = client.status()["batching"]
        assert slab["idle"] and slab["used"] == 0
        held = memory(client)
        assert held["in_use"] == base + 2048 * CELL
        assert [h.get("idle", False) for h in held["held"]] == [False, True]
        with client.create_context(tiny_model, n_ctx=2048, **EXACT):  # ... and taken again
            [again] = client.status()["batching"]
            assert not again["idle"] and again["steps"] == slab["steps"]
        # a context that fits only without it frees it first
        with client.create_context(tiny_model, n_ctx=1024, **EXACT):
            assert [s["n_ctx_seq"] for s in client.status()["batching"]] == [1024]
            after = memory(client)
            assert after["in_use"] == base + 1024 * CELL
            assert after["reclaimed"] == held["reclaimed"] + 1


def test_a_model_past_the_budget_is_refused(small: DaemonProcess, tiny_model: Path,
                                            tiny_model_b: Path) -> None:
    with small.client() as client:
        client.load_model(tiny_model)
        with pytest.raises(TooLarge) as err:
            client.load_model(tiny_model_b)
        assert err.value.details["needed"] == tiny_model_b.stat().st_size
        assert all(m["path"] != str(tiny_model_b) for m in client.list_models())


def test_n_threads_is_bounded_by_the_cpus(client: Client, tiny_model: Path) -> None:
    cpus = len(os.sched_getaffinity(0))
    assert client.capabilities()["max_n_threads"] == cpus
    with pytest.raises(TooLarge) as err:
        client.create_context(tiny_model, n_ctx=256, n_threads=1024)
    assert err.value.details["limit"] == "max_n_threads"
    with client.create_context(tiny_model, n_ctx=256, n_threads=cpus) as ctx:
        assert ctx.generate("Hello", max_tokens=2).collect() is not None


def _send(sock: zmq.Socket, rid: str, op: str, args: dict) -> None:
    sock.send_multipart([TAG, msgpack.packb({"v": 1, "id": rid, "op": op, "args": args})])


def _finals(sock: zmq.Socket, ids: set[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    while ids - out.keys():
        assert sock.poll(30_000), "no reply"
        reply = decode_reply(sock.recv_multipart())
        if reply.kind in ("result", "error"):
            out[reply.id] = reply
    return out


@pytest.mark.parametrize("force", [False, True])
def test_an_unload_never_races_a_context_being_created(fresh_daemon: DaemonProcess,
                                                       tiny_model: Path, force: bool) -> None:
    """create_context then, at once (pipelined on one connection), unload_model: never two
    successes with the context gone. Without force the unload refuses (``in_use``); with it,
    the create fails or the context is among those the unload closed."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(fresh_daemon.endpoint)
    try:
        outcomes: dict[tuple[str, str], int] = {}
        for i in range(10):
            _send(sock, f"load{i}", "load_model", {"path": str(tiny_model)})
            model = _finals(sock, {f"load{i}"})[f"load{i}"].result["id"]
            _send(sock, f"c{i}", "create_context", {"model": model, "n_ctx": 256})
            _send(sock, f"u{i}", "unload_model", {"model": model, "force": force})
            got = _finals(sock, {f"c{i}", f"u{i}"})
            create, unload = got[f"c{i}"], got[f"u{i}"]
            outcomes[(create.kind, unload.kind)] = outcomes.get((create.kind, unload.kind), 0) + 1
            if create.kind == "error":  # the unload came first: the model was gone
                assert create.error["code"] == "not_found", create
                assert unload.kind == "result", unload
            elif not force:  # the context exists and works; the unload refused
                assert unload.kind == "error" and unload.error["code"] == "in_use", unload
                ctx_id = create.result["id"]
                _send(sock, f"g{i}", "generate", {"context": ctx_id, "prompt": "Hello",
                                                   "max_tokens": 2})
                _send(sock, f"k{i}", "close_context", {"context": ctx_id})
                _send(sock, f"x{i}", "unload_model", {"model": model})
                assert all(r.kind == "result" for r in _finals(sock, {f"k{i}", f"x{i}"}).values())
            else:  # forced: the context it was creating is among those it closed
                assert unload.kind == "result", unload
                assert create.result["id"] in unload.result["closed_contexts"], (create, unload)
        _send(sock, "status", "status", {})
        status = _finals(sock, {"status"})["status"].result
        assert status["contexts"] == [] and status["memory"]["in_use"] == 0
    finally:
        sock.close()


def test_an_unload_waits_for_a_context_being_closed(fresh_daemon: DaemonProcess,
                                                    tiny_model: Path) -> None:
    """close_context then, pipelined, unload_model: the unload refuses (the close had not
    begun) or waits for the close to free the context's sequence before it frees the weights
    (it freed them under the closing context, and the daemon died, in either order of trio's
    scheduling, half the time)."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(fresh_daemon.endpoint)
    try:
        for i in range(20):
            _send(sock, f"l{i}", "load_model", {"path": str(tiny_model)})
            model = _finals(sock, {f"l{i}"})[f"l{i}"].result["id"]
            _send(sock, f"c{i}", "create_context", {"model": model, "n_ctx": 256})
            ctx_id = _finals(sock, {f"c{i}"})[f"c{i}"].result["id"]
            _send(sock, f"g{i}", "generate", {"context": ctx_id, "prompt": "Hello",
                                               "max_tokens": 2})
            _send(sock, f"k{i}", "close_context", {"context": ctx_id})
            _send(sock, f"u{i}", "unload_model", {"model": model})
            got = _finals(sock, {f"k{i}", f"u{i}"})
            assert got[f"k{i}"].kind == "result", got
            unload = got[f"u{i}"]
            if unload.kind == "error":
                assert unload.error["code"] == "in_use", unload
                _send(sock, f"x{i}", "unload_model", {"model": model})
                assert _finals(sock, {f"x{i}"})[f"x{i}"].kind == "result"
        _send(sock, "p", "ping", {})
        assert _finals(sock, {"p"})["p"].result["pong"]
    finally:
        sock.close()
