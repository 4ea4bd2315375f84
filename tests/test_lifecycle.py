"""Cancellation, liveness, concurrency, hostile input, paths and shutdown, on real daemons."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest
import zmq

import tinymodels
from conftest import DaemonProcess, rss_anon_kib, start_daemon
from lorad.client import (
    AsyncClient,
    Client,
    DaemonUnavailable,
    ForbiddenPath,
    InUse,
    ModelLoadFailed,
    NotFound,
)
from lorad.protocol import TAG

HERE = Path(__file__).resolve().parent
PROMPT = "the cat and the dog went to the"


def spawn_streamer(d: DaemonProcess, context: str, prompt: str, n: int, credit: int = 64,
                   hang_after: int | None = None) -> subprocess.Popen:
    args = [sys.executable, str(HERE / "stream_client.py"), d.endpoint, context, prompt, str(n),
            str(credit)]
    if hang_after is not None:
        args.append(str(hang_after))
    return subprocess.Popen(args, stdout=subprocess.PIPE, text=True)


def expected_tokens(client: Client, model: Path, prompt: str, n: int) -> list[int]:
    with client.create_context(model, n_ctx=512) as ctx:
        return [t for c in ctx.generate(prompt, max_tokens=n, temperature=0) for t in c.token_ids]


def test_two_client_processes_stream_concurrently(daemon: DaemonProcess, client: Client,
                                                  tiny_model: Path) -> None:
    prompts = ["the cat and the dog", "hello world, the café"]
    expected = [expected_tokens(client, tiny_model, p, 200) for p in prompts]
    # shared: other client processes stream from them
    contexts = [client.create_context(tiny_model, n_ctx=512, shared=True) for _ in prompts]
    try:
        procs = [spawn_streamer(daemon, c.id, p, 200, credit=4)
                 for c, p in zip(contexts, prompts, strict=True)]
        outputs = [p.communicate(timeout=60)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0]
        finals = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
        assert [f["tokens"] for f in finals] == expected
        # Both models' weights were loaded once: one model entry with every context on it.
        (model,) = [m for m in client.list_models() if m["path"] == str(tiny_model)]
        assert {c.id for c in contexts} <= set(model["contexts"])
    finally:
        for c in contexts:
            c.close()


def test_cancel_mid_stream_stops_within_one_token_and_frees_context(
        client: Client, tiny_model: Path) -> None:
    expected = expected_tokens(client, tiny_model, PROMPT, 12)
    with client.create_context(tiny_model, n_ctx=512, max_queued=1) as ctx:
        stream = ctx.generate(PROMPT, max_tokens=400, temperature=0, credit=4)
        it = iter(stream)
        got = [next(it) for _ in range(3)]
        assert all(c.token_ids for c in got)
        stream.cancel()
        rest = list(it)
        assert stream.finish_reason == "cancelled"
        # The daemon stopped at once: it sent no more items than the granted window (the 4
        # of credit, and the 2 the client granted after reading 2), and sampled at most one
        # token it never sent (protocol §6: generated_tokens may exceed the items by one).
        assert 3 + len(rest) <= 4 + 2
        assert stream.metrics["generated_tokens"] <= 3 + len(rest) + 1
        after = [t for c in ctx.generate(PROMPT, max_tokens=12, temperature=0)
                 for t in c.token_ids]
        assert after == expected


def test_leaving_the_loop_early_cancels(client: Client, tiny_model: Path) -> None:
    with client.create_context(tiny_model, n_ctx=512, max_queued=1) as ctx:
        for _chunk in ctx.generate(PROMPT, max_tokens=400, credit=2, temperature=0):
            break  # the generator is closed here and sends the cancel
        info = client.status()
        stream = ctx.generate(PROMPT, max_tokens=4, temperature=0)
        assert len(stream.collect()) > 0 and stream.finish_reason == "length"
        assert info["counters"]["requests"] > 0


@pytest.mark.parametrize("how", ["sigkill", "sigstop"])
def test_dead_or_hung_client_frees_its_context(tmp_path: Path, models_dir: Path,
                                               tiny_model: Path, how: str) -> None:
    # Heartbeats of 300 ms: a hung peer is dropped after 3 missed intervals (~0.9 s).
    d = start_daemon(tmp_path, [models_dir], "--heartbeat-ms", "300")
    try:
        with d.client() as client:
            ctx = client.create_context(tiny_model, n_ctx=512, max_queued=1, persistent=True,
                                        shared=True)
            proc = spawn_streamer(d, ctx.id, PROMPT, 400, credit=2, hang_after=2)
            lines = [json.loads(proc.stdout.readline()) for _ in range(3)]
            assert lines[-1] == {"hanging": 2}
            assert client.context(ctx.id).info["state"] == "busy"
            started = time.monotonic()
            proc.send_signal(signal.SIGKILL if how == "sigkill" else signal.SIGSTOP)
            # This request queues behind the stuck stream and runs once that is cancelled.
            tokens = ctx.generate(PROMPT, max_tokens=4, temperature=0, timeout=15).collect()
            waited = time.monotonic() - started
            assert tokens
            # Documented bounds: a dead peer ~1 s, a hung one 3 heartbeats more (+ CI slack).
            assert waited < (3.0 if how == "sigkill" else 6.0), waited
            proc.kill()
            proc.wait()
            ctx.close()
        assert d.stop() == 0
        assert "peer_lost" in d.log()
    finally:
        if d.proc.poll() is None:
            d.proc.kill()


def test_client_contexts_close_when_the_client_dies(daemon: DaemonProcess, client: Client,
                                                    tiny_model: Path) -> None:
    code = (
        "import sys\nfrom lorad.client import Client\n"
        f"c = Client({daemon.endpoint!r})\n"
        f"t = c.create_context({str(tiny_model)!r}, n_ctx=128, shared=True)\n"
        f"p = c.create_context({str(tiny_model)!r}, n_ctx=128, persistent=True, shared=True)\n"
        "print(t.id, p.id, flush=True)\nsys.stdin.read()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    transient, persistent = proc.stdout.readline().split()
    assert {transient, persistent} <= {c["id"] for c in client.list_contexts()}
    proc.kill()
    proc.wait()
    # Any request after the disconnect is answered after the daemon probed its peers; the
    # transient context goes, the persistent one stays.
    # The daemon learns of the disconnect from libzmq's monitor and probes its peers; poll
    # until it has acted (a condition with a deadline, not a guessed sleep).
    deadline = time.monotonic() + 5
    with Client(daemon.endpoint) as other:
        ids = {c["id"] for c in other.list_contexts()}
        while transient in ids:
            assert time.monotonic() < deadline, "transient context not closed"
            ids = {c["id"] for c in other.list_contexts()}
    assert persistent in ids
    client.context(persistent).close()


def raw_socket(endpoint: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    sock.connect(endpoint)
    return sock


def raw_reply(sock: zmq.Socket) -> dict:
    tag, body = sock.recv_multipart()
    assert tag == TAG
    return msgpack.unpackb(body)


def test_malformed_and_oversized_messages(tmp_path: Path, models_dir: Path) -> None:
    config = tmp_path / "lorad.toml"
    config.write_text("[limits]\nmax_message_bytes = 65536\nmax_depth = 16\n")
    d = start_daemon(tmp_path, [models_dir], "--config", str(config))
    sock = raw_socket(d.endpoint)
    try:
        body = {"v": 1, "id": 1, "op": "ping", "args": {}}
        cases = [
            ([b"garbage"], "bad_request"),
            ([b"lorad/9", msgpack.packb(body)], "unsupported_version"),
            ([TAG, b"\xc1\xc1"], "bad_request"),
            ([TAG, msgpack.packb([1, 2, 3])], "bad_request"),
            ([TAG, msgpack.packb(body) + b"extra"], "bad_request"),
            ([TAG, msgpack.packb({**body, "op": "explode"})], "bad_request"),
            ([TAG, msgpack.packb({**body, "args": {"x": 1}})], "bad_request"),
            ([TAG, msgpack.packb({**body, "args": {"a": "x" * 67000}})], "too_large"),
            ([TAG, msgpack.packb({**body, "args": {"a": [[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]}})],
             "too_large"),
            ([TAG, msgpack.packb({"v": 1, "id": 2, "op": "load_model", "args": {"path": 5}})],
             "bad_request"),
        ]
        for i, (frames, code) in enumerate(cases):
            sock.send_multipart(frames)
            try:
                reply = raw_reply(sock)
            except zmq.Again:
                raise AssertionError(f"case {i}: no reply") from None
            assert reply["kind"] == "error", (frames[:1], reply)
            assert reply["error"]["code"] == code, (frames[:1], reply)
        # Above ZMQ_MAXMSGSIZE the daemon drops the connection instead of reading it all.
        sock.send_multipart([TAG, b"\x00" * 200_000])
        with d.client() as client:
            assert client.ping()["pong"] is True
            assert client.status()["counters"]["errors"] >= len(cases)
        assert d.stop() == 0
    finally:
        sock.close()
        if d.proc.poll() is None:
            d.proc.kill()


def test_paths_outside_allowed_dirs_are_forbidden(client: Client, models_dir: Path,
                                                  tmp_path: Path) -> None:
    with pytest.raises(ForbiddenPath):
        client.load_model("/etc/hostname")
    outside = tinymodels.write_tiny_llama(tmp_path / "outside.gguf")
    link = models_dir / "sneaky.gguf"
    link.symlink_to(outside)
    try:
        with pytest.raises(ForbiddenPath) as err:
            client.load_model(link)
        assert err.value.details["resolved"] == str(outside)
        with pytest.raises(ForbiddenPath):
            client.create_context(str(models_dir / ".." / outside.parent.name / "outside.gguf"))
    finally:
        link.unlink()
    with pytest.raises(NotFound):
        client.load_model(models_dir / "missing.gguf")
    junk = models_dir / "junk.gguf"
    junk.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(ModelLoadFailed) as err:
        client.load_model(junk)
    assert err.value.details["log"]  # llama.cpp's own words about it
    assert client.ping()["pong"]


def test_unload_model_refuses_while_used(client: Client, tiny_model_b: Path) -> None:
    model = client.load_model(tiny_model_b, alias="b-model")
    ctx = client.create_context(model, n_ctx=128)
    with pytest.raises(InUse):
        client.unload_model(model)
    result = client.unload_model(model, force=True)
    assert result["closed_contexts"] == [ctx.id]
    assert "b-model" not in {m["id"] for m in client.list_models()}
    with pytest.raises(NotFound):
        ctx.generate("x").collect()


def test_ipc_socket_is_private_and_not_hijacked(daemon: DaemonProcess, tmp_path: Path,
                                                models_dir: Path) -> None:
    path = daemon.endpoint.removeprefix("ipc://")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    second = subprocess.run(
        [sys.executable, "-m", "lorad.daemon", "--endpoint", daemon.endpoint,
         "--log-format", "json"], capture_output=True, text=True, timeout=60)
    assert second.returncode == 1
    assert "another lorad daemon" in second.stderr
    with Client(daemon.endpoint) as c:
        assert c.ping()["pong"]


def test_no_daemon_is_reported_promptly(tmp_path: Path) -> None:
    started = time.monotonic()
    with Client(f"ipc://{tmp_path}/nobody.sock", connect_timeout=0.5) as c:
        with pytest.raises(DaemonUnavailable):
            c.ping()
    assert time.monotonic() - started < 3


def test_daemon_killed_mid_stream_gives_daemon_unavailable(fresh_daemon: DaemonProcess,
                                                           tiny_model: Path) -> None:
    with fresh_daemon.client() as client:
        ctx = client.create_context(tiny_model, n_ctx=512)
        stream = ctx.generate(PROMPT, max_tokens=400, credit=2, timeout=20, temperature=0)
        it = iter(stream)
        next(it)
        started = time.monotonic()
        fresh_daemon.proc.kill()
        fresh_daemon.proc.wait()
        with pytest.raises(DaemonUnavailable):
            list(it)
        assert time.monotonic() - started < 5


def test_sigterm_drains_running_streams(fresh_daemon: DaemonProcess, tiny_model: Path) -> None:
    with fresh_daemon.client() as client:
        ctx = client.create_context(tiny_model, n_ctx=512)
        stream = ctx.generate(PROMPT, max_tokens=400, credit=2, temperature=0)
        it = iter(stream)
        next(it)  # the stream now waits for credit: it is mid-generation
        fresh_daemon.proc.send_signal(signal.SIGTERM)
        rest = list(it)
        assert stream.finish_reason == "cancelled"
        # The client keeps granting credit while it reads, so how many more tokens arrive
        # depends on how soon the signal is handled (a loaded machine: a few more).
        assert len(rest) < 399 and stream.metrics["generated_tokens"] < 400
    assert fresh_daemon.proc.wait(30) == 0
    log = fresh_daemon.log()
    assert "draining" in log and "stopped" in log
    assert not os.path.exists(fresh_daemon.endpoint.removeprefix("ipc://"))


def test_sigterm_right_after_ready_exits_cleanly(tmp_path: Path, models_dir: Path) -> None:
    """``systemctl stop`` right after start: READY=1 is only sent once signals are handled, so
    the daemon drains and exits 0 rather than being ended by the signal (exit -15)."""
    codes, logs = [], []
    for i in range(20):
        workdir = tmp_path / str(i)
        workdir.mkdir()
        d = start_daemon(workdir, [models_dir], signal_on_ready=signal.SIGTERM)
        codes.append(d.proc.wait(30))
        if codes[-1] != 0:
            logs.append(d.log())
            print(logs[-1])  # whole, in the captured output (an assertion message is cut)
    assert codes == [0] * 20, logs


def test_signals_during_the_drain_are_handled_not_fatal(tmp_path: Path,
                                                       models_dir: Path) -> None:
    """SIGTERM then SIGINT and SIGTERM again at once: the drain begins once, the later signals
    find a handler in place (never Python's default, which would end the process with -2 or
    -15), and the daemon exits 0."""
    codes, logs = [], []
    for i in range(10):
        workdir = tmp_path / str(i)
        workdir.mkdir()
        d = start_daemon(workdir, [models_dir], signal_on_ready=signal.SIGTERM)
        for sig in (signal.SIGINT, signal.SIGTERM):
            if d.proc.poll() is None:
                d.proc.send_signal(sig)
        codes.append(d.proc.wait(30))
        if codes[-1] != 0:
            logs.append(d.log())
            print(logs[-1])  # whole, in the captured output (an assertion message is cut)
    assert codes == [0] * 10, logs


@pytest.mark.parametrize(("text", "field"), [
    ("template_workers = 0", "template_workers"),
    ("template_memory_bytes = 0", "template_memory_bytes"),
    ("file_workers = 0", "file_workers"),
    ("text_workers = 0", "text_workers"),
    ("max_file_ops_per_client = 0", "max_file_ops_per_client"),
    ("max_text_ops_per_client = 0", "max_text_ops_per_client"),
    ("max_adapter_file_bytes = 0", "max_adapter_file_bytes"),
    ('grammar_ms = "fast"', "grammar_ms"),
    ("max_grammar_depth = -1", "max_grammar_depth"),
    ("max_embed_inputs = true", "max_embed_inputs"),
])
def test_config_limits_that_mean_nothing_are_refused(tmp_path: Path, text: str,
                                                     field: str) -> None:
    from lorad.daemon.config import load_config
    from lorad.daemon.errors import ConfigError

    path = tmp_path / "lorad.toml"
    path.write_text(f"[limits]\n{text}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.details["field"] == field
    path.write_text("[limits]\ngrammar_ms = 0\ntemplate_workers = 1\n")  # 0 is a real bound
    assert load_config(path).limits.grammar_ms == 0


def test_config_file_preloads_models_and_contexts(tmp_path: Path, models_dir: Path,
                                                  tiny_model: Path) -> None:
    config = tmp_path / "lorad.toml"
    config.write_text(
        f'[[models]]\npath = "{tiny_model}"\nalias = "tiny"\n\n'
        '[[contexts]]\nmodel = "tiny"\nid = "chat"\nn_ctx = 256\n'
    )
    d = start_daemon(tmp_path, [models_dir], "--config", str(config))
    try:
        with d.client() as client:
            ctx = client.context("chat")
            assert ctx.info["n_ctx"] == 256 and ctx.info["persistent"]
            assert ctx.model == "tiny"
            assert ctx.generate("hello", max_tokens=3).collect()
        assert d.stop() == 0
    finally:
        if d.proc.poll() is None:
            d.proc.kill()


def test_contexts_share_the_weights(fresh_daemon: DaemonProcess, models_dir: Path) -> None:
    big = tinymodels.write_tiny_llama(models_dir / "wide.gguf", n_embd=256, n_ff=1024,
                                      n_layer=4, n_head=4, n_head_kv=4)
    weights_kib = big.stat().st_size // 1024
    with fresh_daemon.client() as client:
        before = rss_anon_kib(fresh_daemon.pid)
        model = client.load_model(big, use_mmap=False)  # weights in anonymous memory
        loaded = rss_anon_kib(fresh_daemon.pid)
        one = client.create_context(model, n_ctx=256)
        with_one = rss_anon_kib(fresh_daemon.pid)
        more = [client.create_context(model, n_ctx=256) for _ in range(3)]
        with_four = rss_anon_kib(fresh_daemon.pid)
        assert client.load_model(big, use_mmap=False)["id"] == model["id"]
        for c in [one, *more]:
            c.close()
    assert loaded - before > 0.8 * weights_kib  # the weights are really there
    per_context = max(with_one - loaded, 1)
    # Four contexts cost about four contexts, nowhere near another copy of the weights.
    assert with_four - loaded < 4 * per_context * 1.5 + 2048
    assert with_four - loaded < weights_kib / 2



LEAN_SCRIPT = """
import sys
from lorad.daemon.lean_imports import keep_imports_lean
keep_imports_lean()
def refuses_a_missing_name(module):
    try:
        module.no_such_name
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError("a missing name resolved")
import lorad.daemon.server, lorad.daemon.llama, lorad.daemon.logs, lorad.daemon.peft
loaded = sorted(m for m in sys.modules if sys.modules[m] is not None and
                m.split(".")[0] in ("jinja2", "diskcache", "sqlite3", "rich", "pygments", "yaml")
                or m in ("llama_cpp.llama", "gguf.gguf_writer", "gguf.gguf_reader",
                         "importlib.metadata"))
assert not loaded, loaded
import gguf, gguf.constants
assert gguf.GGML_QUANT_SIZES is gguf.constants.GGML_QUANT_SIZES
assert gguf.GGUFWriter.__module__ == "gguf.gguf_writer"  # the whole package, on first use
assert gguf.GGUFReader and gguf.get_tensor_name_map and "yaml" in sys.modules
refuses_a_missing_name(gguf)
import importlib.metadata, llama_cpp
assert llama_cpp.__version__ == importlib.metadata.version("llama_cpp_python")
assert llama_cpp.llama_backend_init is sys.modules["llama_cpp.llama_cpp"].llama_backend_init
from llama_cpp import Llama  # the high-level API still resolves, imported on first use
assert Llama.__module__ == "llama_cpp.llama", Llama
refuses_a_missing_name(llama_cpp)
"""


GGUF_THREADS_SCRIPT = """
import threading
from lorad.daemon.lean_imports import keep_imports_lean
keep_imports_lean()
import gguf
errors, names = [], ("GGUFWriter", "get_tensor_name_map", "GGUFReader", "MODEL_ARCH_NAMES")
barrier = threading.Barrier(len(names))
def use(name):
    barrier.wait()
    try:
        getattr(gguf, name)
    except Exception as exc:
        errors.append(repr(exc))
threads = [threading.Thread(target=use, args=(n,)) for n in names]
[t.start() for t in threads]
[t.join() for t in threads]
assert not errors, errors
"""


def test_the_lean_gguf_package_is_whole_for_every_thread_at_once() -> None:
    """Two PEFT conversions (two file threads) may be the process's first use of ``gguf``'s
    other names at once: each waits for the package's ``__init__`` instead of seeing a half
    one (``AttributeError`` for names it has not reached yet, without the lock)."""
    subprocess.run([sys.executable, "-c", GGUF_THREADS_SCRIPT], check=True, timeout=60)


def test_the_daemon_process_imports_only_what_it_uses(daemon: DaemonProcess,
                                                      client: Client, tiny_model: Path) -> None:
    # keep_imports_lean, in a fresh interpreter: llama_cpp's high-level API, rich, gguf's
    # reader and writer stay out.
    subprocess.run([sys.executable, "-c", LEAN_SCRIPT], check=True, timeout=60)
    # ... and the daemon process applies it: diskcache (llama_cpp.llama's) would map _sqlite3.
    ctx = client.create_context(tiny_model, n_ctx=64)
    try:
        assert ctx.generate(PROMPT, max_tokens=2).collect()
    finally:
        ctx.close()
    maps = Path(f"/proc/{daemon.pid}/maps").read_text()
    assert "libllama" in maps
    assert "_sqlite3" not in maps


def test_glibcs_mmap_threshold_is_fixed_unless_the_environment_sets_it() -> None:
    """daemon/heap.py: the daemon process fixes glibc's mmap threshold (what closed contexts
    freed goes back; the slow suite measures it on gemma), and leaves it to an operator who set
    it in the environment."""
    script = "from lorad.daemon.heap import return_large_frees; print(return_large_frees())"
    clean = {k: v for k, v in os.environ.items()
             if k not in ("MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")}

    def run(**env: str) -> str:
        return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              env={**clean, **env}, timeout=60, check=True).stdout.strip()

    assert run() == "True"  # glibc, as on every machine this runs on
    assert run(MALLOC_MMAP_THRESHOLD_="65536") == "False"
    assert run(GLIBC_TUNABLES="glibc.malloc.mmap_threshold=65536") == "False"

async def test_async_client_mirrors_sync(daemon: DaemonProcess, client: Client,
                                         tiny_model: Path) -> None:
    expected = expected_tokens(client, tiny_model, PROMPT, 16)
    async with AsyncClient(daemon.endpoint) as aclient:
        assert (await aclient.ping())["pong"]
        async with await aclient.create_context(tiny_model, n_ctx=512, max_queued=1) as ctx:
            stream = await ctx.generate(PROMPT, max_tokens=16, temperature=0)
            tokens = [t async for c in stream for t in c.token_ids]
            assert tokens == expected
            assert stream.finish_reason == "length"
            assert stream.metrics["generated_tokens"] == 16
            # Leaving a stream early cancels it: the next request runs.
            async with await ctx.generate(PROMPT, max_tokens=400, credit=2, temperature=0) as long:
                async for _ in long:
                    break
            again = await ctx.generate(PROMPT, max_tokens=16, temperature=0)
            assert [t async for c in again for t in c.token_ids] == expected
        with pytest.raises(NotFound):
            await aclient.context("no-such-context")
