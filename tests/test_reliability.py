"""The daemon survives hostile input, bad files, dying clients and restarts; nothing leaks.

Hostile messages go to the raw socket (hypothesis); the other tests use real client
processes. Counts of what was tried are printed (pytest -s shows them).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest
import trio
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tinymodels
from conftest import DaemonProcess, fd_count, rss_kib, start_daemon
from lorad.client import AsyncClient, Client, DaemonUnavailable, ModelLoadFailed, NotFound
from lorad.protocol import TAG, decode_reply

HERE = Path(__file__).resolve().parent
PROMPT = "Hello world, the cat and the dog"

# -- hostile messages --------------------------------------------------------------------------
leaves = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(),
                   st.text(max_size=20), st.binary(max_size=20))
values = st.recursive(leaves, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)
FIELDS = ["v", "id", "op", "args"]
valid = {"v": 1, "id": 1, "op": "generate", "args": {"context": "c", "prompt": "x"}}


@st.composite
def hostile(draw) -> list[bytes]:
    kind = draw(st.sampled_from(["bytes", "frames", "field", "arg", "deep", "lengths", "cut"]))
    if kind == "bytes":
        return [TAG, draw(st.binary(max_size=64))]
    if kind == "frames":
        return draw(st.lists(st.binary(max_size=16), min_size=1, max_size=4))
    if kind == "field":  # a wrong type in one field of a valid request, or a field missing
        body = dict(valid)
        name = draw(st.sampled_from(FIELDS))
        if draw(st.booleans()):
            body[name] = draw(values)
        else:
            del body[name]
        return [TAG, msgpack.packb(body)]
    if kind == "arg":  # a wrong value in one argument of a real operation
        op = draw(st.sampled_from(["generate", "create_context", "set_lora", "set_loras",
                                   "load_model", "chat", "credit", "cancel", "validate_lora"]))
        args = {draw(st.sampled_from(["context", "model", "path", "loras", "messages",
                                      "max_tokens", "scale", "speculative", "n", "request"])):
                draw(values)}
        return [TAG, msgpack.packb({"v": 1, "id": 2, "op": op, "args": args})]
    if kind == "deep":
        depth = draw(st.integers(30, 3000))
        return [TAG, b"\x91" * depth + b"\xc0"]  # [[[...nil...]]]
    if kind == "lengths":  # declared lengths far beyond the data (str32, bin32, array32, map32)
        head = draw(st.sampled_from([b"\xdb", b"\xc6", b"\xdd", b"\xdf"]))
        return [TAG, head + struct.pack(">I", draw(st.integers(2**20, 2**32 - 1))) + b"x"]
    raw = msgpack.packb(valid)
    return [TAG, raw[: draw(st.integers(0, len(raw) - 1))]]


@pytest.fixture(scope="module")
def fuzz_socket(daemon: DaemonProcess):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(daemon.endpoint)
    stats = {"sent": 0, "error_replies": 0, "other_replies": 0}
    yield sock, stats
    sock.close()
    print(f"\nfuzz: {stats}")


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(frames=hostile())
def test_hostile_messages_get_errors_and_the_daemon_keeps_serving(fuzz_socket, frames) -> None:
    sock, stats = fuzz_socket
    sock.send_multipart(frames)
    # A ping behind it: replies arrive in order, so whatever comes first answers the fuzz.
    sock.send_multipart([TAG, msgpack.packb({"v": 1, "id": "probe", "op": "ping", "args": {}})])
    stats["sent"] += 1
    while True:
        assert sock.poll(10_000), "the daemon stopped answering"
        reply = decode_reply(sock.recv_multipart())
        if reply.id == "probe" and reply.kind == "result":
            break
        if reply.kind == "error":
            assert isinstance(reply.error["code"], str)
            stats["error_replies"] += 1
        else:
            stats["other_replies"] += 1


def test_fuzzed_daemon_still_serves_a_normal_client(fuzz_socket, client: Client,
                                                    tiny_model: Path) -> None:
    with client.create_context(tiny_model, n_ctx=128) as ctx:
        assert ctx.generate(PROMPT, max_tokens=3, temperature=0).collect() is not None


# -- bad model files ---------------------------------------------------------------------------
def make_bad(kind: str, d: Path, good: Path) -> Path:
    path = d / f"bad-{kind}.gguf"
    data = good.read_bytes()
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(data[: len(data) // 3])
    elif kind == "lying_tensor_count":  # n_tensors (u64 at offset 8) far above the truth
        path.write_bytes(data[:8] + struct.pack("<Q", 2**40) + data[16:])
    elif kind == "lying_kv_count":
        path.write_bytes(data[:16] + struct.pack("<Q", 2**40) + data[24:])
    elif kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    return path


@pytest.mark.parametrize("kind", ["empty", "truncated", "lying_tensor_count", "lying_kv_count",
                                  "directory", "fifo"])
def test_bad_model_files_are_typed_errors(client: Client, models_dir: Path, tiny_model: Path,
                                          kind: str) -> None:
    path = make_bad(kind, models_dir, tiny_model)
    expected = NotFound if kind in ("directory", "fifo") else ModelLoadFailed
    with pytest.raises(expected):
        client.load_model(path)
    assert client.ping()["pong"]


# -- restart -----------------------------------------------------------------------------------
CONNECT_TIMEOUT = 2.0
TIMEOUT = 10.0
"""The restart tests' clients: a request with no connection must fail within the first (plus
a margin for a loaded machine), far from the second."""


def test_clients_survive_a_daemon_restart(tmp_path: Path, models_dir: Path,
                                          tiny_model: Path) -> None:
    d = start_daemon(tmp_path, [models_dir])
    with Client(d.endpoint, timeout=TIMEOUT, connect_timeout=CONNECT_TIMEOUT) as client:
        assert client.ping()["pong"]
        d.proc.kill()
        d.proc.wait()
        for _ in range(2):  # the one that sees the connection go, then one sent knowing it
            started = time.monotonic()
            with pytest.raises(DaemonUnavailable):
                client.ping()
            assert time.monotonic() - started < CONNECT_TIMEOUT + 1.5
        again = start_daemon(tmp_path, [models_dir])  # same config, same endpoint
        try:
            assert client.ping()["pong"]  # the same client object, reconnected by ZeroMQ
            with client.create_context(tiny_model, n_ctx=128) as ctx:
                assert ctx.generate(PROMPT, max_tokens=2, temperature=0).collect() is not None
        finally:
            assert again.stop() == 0


async def test_trio_clients_survive_a_daemon_restart(tmp_path: Path, models_dir: Path,
                                                     tiny_model: Path) -> None:
    d = await trio.to_thread.run_sync(start_daemon, tmp_path, [models_dir])
    async with AsyncClient(d.endpoint, timeout=TIMEOUT,
                           connect_timeout=CONNECT_TIMEOUT) as client:
        assert (await client.ping())["pong"]
        d.proc.kill()
        await trio.to_thread.run_sync(d.proc.wait)
        for _ in range(2):
            started = trio.current_time()
            with pytest.raises(DaemonUnavailable):
                await client.ping()
            assert trio.current_time() - started < CONNECT_TIMEOUT + 1.5
        again = await trio.to_thread.run_sync(start_daemon, tmp_path, [models_dir])
        try:
            assert (await client.ping())["pong"]
            async with await client.create_context(tiny_model, n_ctx=128) as ctx:
                async with await ctx.generate(PROMPT, max_tokens=2, temperature=0) as stream:
                    assert [chunk async for chunk in stream]
        finally:
            assert await trio.to_thread.run_sync(again.stop) == 0


# -- many clients, cancels and swaps; leaks ----------------------------------------------------
@pytest.fixture
def adapters(models_dir: Path) -> list[Path]:
    base = tinymodels.tiny_llama_tensors(seed=0)
    return [tinymodels.write_lora(models_dir / f"mix-{i}.gguf", base, rank=2 + i, seed=10 + i,
                                  targets=("attn_q", "ffn_up")).path for i in range(3)]


def test_eight_clients_with_cancels_and_swaps(fresh_daemon: DaemonProcess, tiny_model: Path,
                                              adapters: list[Path]) -> None:
    pid = fresh_daemon.pid
    with fresh_daemon.client() as c:  # warm up: the model, one context, the adapters
        with c.create_context(tiny_model, n_ctx=256, loras=adapters) as ctx:
            ctx.generate(PROMPT, max_tokens=4).collect()
    rss_before = rss_kib(pid)
    procs = [subprocess.Popen([sys.executable, str(HERE / "mixed_client.py"),
                               fresh_daemon.endpoint, str(tiny_model), *map(str, adapters),
                               str(seed), "50"], stdout=subprocess.PIPE, text=True)
             for seed in range(8)]
    summaries = []
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out
        summaries.append(json.loads(out))
    total = sum(sum(s["ended"].values()) + sum(s["errors"].values()) for s in summaries)
    assert total == 8 * 50  # every request ended, with a final message or a typed error
    assert all(not s["errors"] for s in summaries), summaries
    with fresh_daemon.client() as c:
        status = c.status()
        assert status["contexts_total"] == 0  # each client closed its context
        assert status["adapters"] == []
        assert status["running_requests"] == 0
    log = fresh_daemon.log()
    assert "Traceback" not in log and '"level": "error"' not in log
    growth = rss_kib(pid) - rss_before
    print(f"\nmixed: {summaries}, daemon RSS growth {growth} KiB")
    assert growth < 32 * 1024  # the 8 contexts' buffers are given back (bound: 32 MiB)


def test_thousand_cycles_leak_nothing(fresh_daemon: DaemonProcess, tiny_model: Path,
                                      adapters: list[Path]) -> None:
    pid = fresh_daemon.pid
    with fresh_daemon.client() as c:
        model = c.load_model(tiny_model)

        def cycle(i: int) -> None:
            with c.create_context(model, n_ctx=64) as ctx:
                ctx.set_lora(adapters[i % 3], 0.5)
                ctx.set_lora(adapters[(i + 1) % 3], -0.5)
                ctx.remove_lora(adapters[i % 3])
                ctx.clear_loras()

        for i in range(100):  # warm up: allocator pools, caches, thread pool
            cycle(i)
        rss, fds = rss_kib(pid), fd_count(pid)
        for i in range(1000):
            cycle(i)
        growth = rss_kib(pid) - rss
        assert c.status()["adapters"] == []
    print(f"\n1000 cycles: RSS growth {growth} KiB, fds {fds} -> {fd_count(pid)}")
    assert growth < 16 * 1024, growth  # bound: 16 MiB (about 16 KiB per cycle would fail)
    assert fd_count(pid) <= fds + 2


def test_a_client_that_never_reads_pauses_its_stream(daemon: DaemonProcess, client: Client,
                                                     tiny_model: Path) -> None:
    """Backpressure: with credit 4 and nobody reading, the daemon generates 4 tokens and waits;
    it neither runs ahead nor buffers. A 40-token generation on another context is the clock."""
    stalled = client.create_context(tiny_model, n_ctx=512, shared=True)
    other = client.create_context(tiny_model, n_ctx=512)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(daemon.endpoint)
    try:
        body = {"v": 1, "id": 1, "op": "generate",
                "args": {"context": stalled.id, "prompt": PROMPT, "max_tokens": 2000,
                         "temperature": 0, "credit": 4}}
        sock.send_multipart([TAG, msgpack.packb(body)])
        prompt_tokens = len(stalled.tokenize(PROMPT))
        assert len(other.generate(PROMPT, max_tokens=40, temperature=0).collect()) > 0
        info = next(c for c in client.list_contexts() if c["id"] == stalled.id)
        assert info["state"] == "busy" and info["running"] == 1
        # The prompt, then at most the 4 granted tokens (the last sampled one is not decoded).
        assert info["cached_tokens"] <= prompt_tokens + 4
    finally:
        sock.close()
        other.close()
        stalled.close()
