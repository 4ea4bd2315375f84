"""Shared means isolated: one client's flood of slow file work never holds another client's
stream, and is bounded per client (``limits.max_file_ops_per_client``), through a real daemon.

The flood that used to freeze the daemon: 40 ``validate_lora`` at once of an adapter whose
GGUF header holds 200,000 strings (3.2 s of parsing each); they took every worker thread
decoding needed too, and another client's 8-token ``generate`` got no reply for 120 s.
"""

from __future__ import annotations

import struct
from pathlib import Path

import msgpack
import pytest
import zmq

from conftest import DaemonProcess
from lorad.client import Client
from lorad.protocol import DEFAULT_LIMITS
from lorad.protocol.codec import decode_reply

TAG = b"lorad/1"
FLOOD = 40


def _string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def write_many_strings_adapter(path: Path, n: int = 200_000) -> Path:
    """A GGUF whose header holds an array of ``n`` one-byte strings before its adapter keys."""
    kvs = [_string("general.junk") + struct.pack("<IIQ", 9, 8, n) + _string("x") * n,
           _string("general.type") + struct.pack("<I", 8) + _string("adapter"),
           _string("adapter.type") + struct.pack("<I", 8) + _string("lora")]
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs)) + b"".join(kvs))
    return path


def answers(sock: zmq.Socket) -> list[str]:
    """The outcome of each of the flood's requests (ids ``0 .. FLOOD - 1``): an error code,
    the first problem's code of a validation report, or ``ok``. (The daemon also sends its
    own messages, liveness probes, when another connection drops.)"""
    got: dict[int, str] = {}
    while len(got) < FLOOD:
        assert sock.poll(30_000), f"{len(got)} of {FLOOD} requests answered"
        reply = decode_reply(sock.recv_multipart())
        if reply.kind == "error":
            got[reply.id] = reply.error["code"]
        elif reply.kind == "result" and isinstance(reply.id, int):
            problems = reply.result.get("problems") if isinstance(reply.result, dict) else None
            got[reply.id] = problems[0]["code"] if problems else "ok"
    return list(got.values())


@pytest.fixture(scope="module")
def hostile_adapter(models_dir: Path) -> Path:
    return write_many_strings_adapter(models_dir / "many-strings.gguf")


def test_a_flood_of_slow_validations_leaves_another_clients_stream_alone(
        daemon: DaemonProcess, client: Client, tiny_model: Path, hostile_adapter: Path) -> None:
    model = client.load_model(tiny_model)["id"]
    flooder = zmq.Context.instance().socket(zmq.DEALER)
    flooder.setsockopt(zmq.LINGER, 0)
    flooder.connect(daemon.endpoint)
    try:
        for i in range(FLOOD):  # all at once, pipelined on one connection
            flooder.send_multipart([TAG, msgpack.packb({
                "v": 1, "id": i, "op": "validate_lora",
                "args": {"model": model, "path": str(hostile_adapter)}})])
        with daemon.client(timeout=20) as other, \
                other.create_context(tiny_model, n_ctx=256) as ctx:
            stream = ctx.generate("Hello world, the cat", max_tokens=8, temperature=0)
            stream.collect()
            assert stream.metrics["generated_tokens"] == 8
            assert other.ping()["pong"]
        codes = answers(flooder)
        assert set(codes) <= {"lora_invalid", "too_large"}, codes
        refused = [c for c in codes if c == "too_large"]
        assert len(codes) - len(refused) >= 1  # the first ones were looked at
        status = client.status()["file_workers"]
        assert status["per_client"] == DEFAULT_LIMITS.max_file_ops_per_client
        assert status["busy"] == 0 and status["refused"] >= len(refused)
    finally:
        flooder.close()


def test_a_flood_of_huge_tokenizations_is_bounded_and_leaves_another_stream_alone(
        daemon: DaemonProcess, client: Client, tiny_model: Path) -> None:
    model = client.load_model(tiny_model)["id"]
    # 400 KB: within what the vocabulary's longest piece allows for limits.max_array_len
    # tokens, so each is tokenized (~0.2 s of C on the tiny model) before it is found too long;
    # a longer text is refused untokenized in a millisecond, and whether a fifth request came
    # in while four were under way was then a race (lost once under load)
    text = "the cat and the dog " * 20_000
    flooder = zmq.Context.instance().socket(zmq.DEALER)
    flooder.setsockopt(zmq.LINGER, 0)
    flooder.connect(daemon.endpoint)
    try:
        for i in range(FLOOD):
            flooder.send_multipart([TAG, msgpack.packb({
                "v": 1, "id": i, "op": "tokenize", "args": {"model": model, "text": text}})])
        with daemon.client(timeout=20) as other, \
                other.create_context(tiny_model, n_ctx=256) as ctx:
            stream = ctx.generate("Hello world, the cat", max_tokens=8, temperature=0)
            stream.collect()
            assert stream.metrics["generated_tokens"] == 8
        codes = answers(flooder)
        assert set(codes) <= {"too_large", "ok"}, codes  # (too many tokens, or the cap)
        status = client.status()["text_workers"]
        assert status["per_client"] == DEFAULT_LIMITS.max_text_ops_per_client
        assert status["busy"] == 0 and status["refused"] >= 1
    finally:
        flooder.close()


async def test_slow_work_runs_at_a_lower_priority_than_decoding() -> None:
    """Build threads (models and llama contexts being made, in C) and text threads (a prompt's
    tokenization, in C) are their own, at nice +NICE: where cores are short, a decode step
    goes first. File work keeps the daemon's priority (its Python parsing holds the GIL)."""
    import os
    import threading

    import trio

    from lorad.daemon.workers import NICE, FileWorkers, Pool, TextWorkers
    from lorad.protocol import DEFAULT_LIMITS

    def niceness() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    base = os.getpriority(os.PRIO_PROCESS, 0)
    pool = Pool("test", 1, nice=True)
    assert await pool.run(niceness) == min(19, base + NICE)
    assert await Pool("plain", 1).run(niceness) == base
    # An over-long prompt's tokenization (0.8 s of C on gemma's vocabulary) on a thread at the
    # daemon's priority took a core from llama.cpp's threads: another stream's gaps reached 1.3 s
    assert await TextWorkers(DEFAULT_LIMITS).run(niceness) == min(19, base + NICE)
    assert await FileWorkers(DEFAULT_LIMITS).run(niceness) == base
    assert await trio.to_thread.run_sync(niceness) == base  # decode steps' threads
    assert pool.info()["busy"] == 0


def test_a_decode_threads_openmp_workers_run_on_the_other_cores(tiny_model: Path) -> None:
    """``[batching] pin_threads``: a model's decode thread runs on a core of its own and the
    OpenMP workers llama.cpp makes for its steps on the others (left to the kernel, the two
    shared a core at times while other work of the daemon ran: 24 ms steps took 680 ms)."""
    import os
    import threading

    from lorad.daemon import llama
    from lorad.daemon.affinity import Team, usable

    cpus = usable()
    if len(cpus) < 2:
        pytest.skip("one usable CPU: nothing to pin")
    llama.init_backend()
    model = llama.Model(str(tiny_model))
    slab = llama.Slab(model, n_seq=1, n_ctx_seq=64, n_batch=16, n_threads=2, kv_type="f32",
                      flash_attn=False)
    team = Team()
    seen: dict[str, object] = {}

    def decode() -> None:  # the decode thread: its first step of 2 threads makes the worker
        before = set(os.listdir("/proc/self/task"))
        seq = llama.Sequence(slab, 0, 64)
        team.run(2, slab.decode, [(seq, model.tokenize("Hello world", add_special=True), 1)],
                 [])
        workers = set(os.listdir("/proc/self/task")) - before
        seen["workers"] = {tid: os.sched_getaffinity(int(tid)) for tid in workers}
        seen["own"] = os.sched_getaffinity(0)

    try:
        thread = threading.Thread(target=decode)
        thread.start()
        thread.join()
    finally:
        slab.close()
        model.close()
    assert team.own in cpus and seen["own"] == {team.own}
    assert seen["workers"], "llama.cpp made no OpenMP worker for a step of 2 threads"
    assert all(mask == set(cpus) - {team.own} for mask in seen["workers"].values())
    assert os.sched_getaffinity(0) == set(cpus)  # the other threads are left alone
