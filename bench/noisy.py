"""Noisy neighbour: one client streams while another floods the daemon; the streaming client's
inter-token gaps with the daemon quiet and during each flood.

Usage::

    .venv/bin/python bench/noisy.py [--model PATH | --tiny] [--phase-seconds 15] [--rounds 2]
                                    [--floods validate,prompts,contexts,credit,http]
                                    [--retries 1] [--daemon-arg=--config=FILE]
                                    [--json-out PATH]
    .venv/bin/python bench/noisy.py --tiny --phase-seconds 3 --rounds 1 --retries 0 \
        --wait-idle 0                                                    # a smoke run, ~1 min

Issue 24's target: the streaming client's inter-token p99 during any flood <= 1.5x its quiet p99.

The daemon is a real ``lorad serve`` subprocess with the settings a user gets (``--model PATH``,
which preloads the model and makes the persistent ``default`` context, ``--repack auto``, the
default ``[batching]`` and ``[limits]``; ``--daemon-arg`` adds arguments, e.g. a config file
to compare settings), on a private ipc socket, plus the HTTP door on a free
loopback port (``--http 127.0.0.1:PORT``) for the whole run. The model is the default gemma 3
270M (``lorad default-model``), ``--model PATH``, or with ``--tiny`` the tiny generated llama of
``tests/tinymodels.py`` (a smoke run: it says nothing about llama.cpp's speed).

The **streaming client** is a process of its own (``multiprocessing``, spawned) with the sync
``Client``: it creates a context with the default parameters and generates continuously (greedy,
``--stream-tokens`` tokens a request, the prompts of bench/concurrency.py in turn; a request that
ends is followed by the next at once), stamping every token as it arrives (``time.monotonic``,
one clock for every process). Its **inter-token gaps** are the gaps between consecutive tokens of
one request (a request's first token, which waits for its prompt, starts no gap; its wait is
reported as TTFT), each counted in the phase in which its later token arrived. A request that
ends with an error is counted (``stream errors``, per phase) and followed by the next.

The **flooder** is another process, started anew for each flood phase. It sets itself up (its
connections, contexts and files) before the phase pair begins, then stays idle through the
*quiet* phase (``--phase-seconds``) and floods for the *flood* phase (``--phase-seconds``); at
the end of the flood it cancels what it has in flight, closes its contexts and exits. The
streamer's tokens from the end of the flood until the daemon has finished the flood's work (see
below) plus ``--settle`` seconds are the *drain* (its longest gap is in the second table, not in
the ratios); the next pair's flooder sets up after that. Each flood is bounded in requests
(``--max-requests``, ``--credit-messages``) and in time, goes over ipc or loopback only, and
stops by itself:

``validate``
    ``--validate-connections`` connections x ``--validate-concurrency`` concurrent
    ``validate_lora`` calls (4 x 10: the 40 at once of issue 24), alternating between an adapter
    whose GGUF header holds a metadata array of ``--hostile-strings`` (200,000) strings and a
    valid adapter for the model (rank 8 on ``attn_q``/``attn_v``, written with the ``gguf``
    package like bench/lora.py's).
``prompts``
    ``--prompt-connections`` (2) connections, each with a context of the default parameters,
    each generating (4 tokens, greedy) from prompts of ``n_ctx - 16`` tokens, each a random
    window of a long random text, so that no prompt reuses a cached prefix.
``contexts``
    one connection creating contexts of ``n_ctx`` = ``limits.max_n_ctx`` (131072) one after the
    other, closing each that is made. A daemon without memory admission allocates the whole KV
    cache (issue 24 measured 9.3 GiB on gemma 3 270M; one such context alone is 2.3 GiB), so
    before each attempt the flooder checks that ``MemAvailable`` is at least
    ``--contexts-min-free-gib`` (4 GiB with a daemon that reports a memory budget in
    ``capabilities()``, else 12) and otherwise waits (counted as ``skipped_low_memory``).
``credit``
    a raw DEALER socket (no reference client): ``--credit-streams`` (8) contexts (``n_ctx``
    512), a stream on each opened with ``credit`` 1 and never read, then ``credit`` grants as
    fast as the socket takes them (up to ``--credit-messages``, 100,000) for request ids not in
    flight (answered ``granted: false``), no reply read until the phase ends (then they are
    counted for at most 2 s).
``http``
    ``--http-concurrency`` (8) httpx clients against the HTTP door: a seeded mix of malformed
    JSON, invalid UTF-8, deep JSON, wrong content types and methods, unknown paths, missing,
    unknown and wrongly typed fields, huge numbers, an over-long prompt, and valid small
    requests (``/v1/models``, ``/health``, completions and chat of 4 tokens, plain and
    streamed).
``http-refused``, ``http-valid`` (not in the default list)
    the ``http`` flood's two halves apart: only its 23 requests the door refuses, or only
    its 5 valid ones, to tell which half costs the streamer what.

Order: a warm-up (``--warmup-seconds``), then per round each flood as a pair *quiet, flood*
(the floods' order rotating from round to round). The ratio of a flood is its gaps' p99 over
the p99 of the quiet phases paired with it (pooled over the rounds); the median of the
per-round ratios is in the JSON too. Per phase the script also records the tokens/s of the
streamer, the CPU of the daemon, of the flooder and of everything else (``/proc/stat``). Before
each pair it waits (at most ``--wait-idle``, 30 s) for other processes to use under 5 % of the
machine; a pair in which they used more counts as contended and is measured again (at most
``--retries`` times; the discarded pairs stay in the JSON). After a flood the script waits (at
most ``--drain-timeout``) until the daemon's ``status()`` shows the flood's work done (its
contexts closed, no request but the streamer's, no file work, nothing on the HTTP door). On a
2-core machine the flooder's own CPU competes with llama.cpp's threads whatever the daemon
does; its share of the machine is a column of the table.

Output: a markdown table on stdout and the JSON (settings, machine, software, every phase with
its gaps, flooder outcomes, the daemon's exit code and whether its log has a traceback) under
``bench/results/noisy-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import itertools
import json
import multiprocessing
import os
import queue
import random
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from concurrency import PROMPTS, _f, _r, _table, _version, percentile
from concurrency import median as _median
from llama_server import free_port
from lora import model_tensors, write_adapter
from throughput import (
    _HZ,
    CONTENDED,
    _process_ticks,
    _system_ticks,
    default_model_path,
    git_info,
    machine_info,
    start_daemon,
    stop_daemon,
)

REPO = Path(__file__).resolve().parent.parent
FLOODS = ("validate", "prompts", "contexts", "credit", "http")
HTTP_HALVES = ("http-refused", "http-valid")  # opt-in: the http flood's cases split in two
TARGET = 1.5
SETUP_TIMEOUT = 180.0  # seconds for a client process to set itself up
WORDS = ("the sea river stone light house window garden winter summer market music letter "
         "paper city bridge forest mountain village morning evening story number science "
         "history machine water bread colour silver golden quiet early later under above "
         "between because while after before simple careful little great small long short "
         "open close read write carry follow answer question travel return remember").split()


# -- small helpers --------------------------------------------------------------------------------
def _code(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    return str(code) if code else type(exc).__name__


def _rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _mem_available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return 0.0


class Tally:
    """Outcomes (by code) and answer latencies of one flooder."""

    def __init__(self) -> None:
        self.sent = 0
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.latencies: dict[str, list[float]] = collections.defaultdict(list)
        self.bound_hit_s: float | None = None

    def add(self, outcome: str, latency: float | None = None) -> None:
        self.outcomes[outcome] += 1
        if latency is not None:
            self.latencies[outcome].append(latency * 1000)

    def report(self) -> dict[str, Any]:
        ms = [v for vs in self.latencies.values() for v in vs]
        return {"sent": self.sent, "outcomes": dict(self.outcomes.most_common()),
                "answered": len(ms), "latency_p50_ms": _r(percentile(ms, 50), 2),
                "latency_p99_ms": _r(percentile(ms, 99), 2),
                "latency_max_ms": _r(max(ms) if ms else None, 2),
                "latency_by_outcome_ms": {
                    k: {"p50": _r(percentile(v, 50), 2), "max": _r(max(v), 2)}
                    for k, v in self.latencies.items() if v},
                "bound_hit_after_s": _r(self.bound_hit_s, 2)}


# -- the streaming client -------------------------------------------------------------------------
def streamer_main(spec: dict[str, Any], ready: Any, stop: Any, results: Any) -> None:
    """Generate until ``stop`` is set; report every request's token stamps."""
    try:
        from lorad.client import Client, DaemonUnavailable, LoradError

        now = time.monotonic
        requests: list[dict[str, Any]] = []
        with Client(spec["endpoint"], timeout=120) as client:
            ctx = client.create_context(spec["model"])
            params = dict(ctx.info.get("params", {}))
            max_tokens = min(spec["tokens"], max(8, int(params.get("n_ctx", 512)) // 2))
            ctx.generate(PROMPTS[0], max_tokens=8, temperature=0).collect()  # warm
            ready.put({"context": ctx.id, "params": params, "max_tokens": max_tokens,
                       "pid": os.getpid()})
            k = 0
            while not stop.is_set():
                req: dict[str, Any] = {"t_start": now(), "stamps": [], "prompt": k % len(PROMPTS)}
                stream = ctx.generate(PROMPTS[k % len(PROMPTS)], max_tokens=max_tokens,
                                      temperature=0)
                try:
                    for chunk in stream:
                        if chunk.token_ids:
                            t = now()
                            req["stamps"].extend([t] * len(chunk.token_ids))
                        if stop.is_set():
                            stream.cancel()  # reads on to the cancelled end
                            break
                    req["finish_reason"] = stream.finish_reason
                except DaemonUnavailable:
                    raise
                except LoradError as exc:  # what the neighbour did to us: counted per phase
                    req["finish_reason"] = "error"
                    req["error"] = f"{exc.code}: {exc.message}"[:300]
                req["t_end"] = now()
                requests.append(req)
                k += 1
            ctx.close()
        results.put({"requests": requests, "cpu_s": time.process_time()})
    except BaseException:
        results.put({"error": traceback.format_exc()})
        with contextlib.suppress(Exception):
            ready.put({"error": "failed"})


# -- the flooders ---------------------------------------------------------------------------------
def flooder_main(kind: str, spec: dict[str, Any], ready: Any, go: Any, deadline: Any,
                 results: Any) -> None:
    """Set up, report ready, wait for ``go``, flood until ``deadline.value``, report."""
    try:
        if spec.get("nice"):
            os.nice(spec["nice"])
        runner = {"validate": flood_validate, "prompts": flood_prompts,
                  "contexts": flood_contexts, "credit": flood_credit, "http": flood_http,
                  "http-refused": flood_http, "http-valid": flood_http}[kind]
        out = runner({**spec, "http_cases": kind}, ready, go, deadline)
        out["cpu_s"] = round(time.process_time(), 3)
        results.put(out)
    except BaseException:
        results.put({"error": traceback.format_exc()})
        with contextlib.suppress(Exception):
            ready.put({"error": "failed"})


def _wait_go(ready: Any, go: Any, info: dict[str, Any] | None = None) -> float:
    ready.put({"pid": os.getpid(), **(info or {})})
    if not go.wait(SETUP_TIMEOUT + 600):
        raise RuntimeError("no go signal")
    return time.monotonic()


def _trio_flood(spec: dict[str, Any], ready: Any, go: Any, deadline: Any, setup: Any,
                worker: Any, workers: int) -> dict[str, Any]:
    """Run ``setup()`` (async, returns state), then ``workers`` tasks of ``worker(state, i,
    tally)`` until the deadline or the request bound; cancelled work counts as unfinished."""
    import trio

    tally = Tally()

    async def main() -> dict[str, Any]:
        async with contextlib.AsyncExitStack() as stack:
            state = await setup(stack)
            t0 = await trio.to_thread.run_sync(_wait_go, ready, go, state.get("info"))
            end = deadline.value
            with trio.move_on_after(max(end - time.monotonic(), 0)):
                async with trio.open_nursery() as nursery:
                    for i in range(workers):
                        nursery.start_soon(worker, state, i, tally, t0)
        # leaving the stack closes the contexts and connections (each call has a timeout)
        return tally.report()

    return trio.run(main)


def _bounded(tally: Tally, spec: dict[str, Any], t0: float) -> bool:
    """Count one more request; False once the bound is reached."""
    if tally.sent >= spec["max_requests"]:
        if tally.bound_hit_s is None:
            tally.bound_hit_s = time.monotonic() - t0
        return False
    tally.sent += 1
    return True


async def _timed(tally: Tally, what: Any, label: str = "ok") -> Any:
    """Await ``what``; count its outcome and latency (cancellation counts as unfinished)."""
    import trio

    t = time.monotonic()
    try:
        result = await what
    except trio.Cancelled:
        tally.add("unfinished")
        raise
    except Exception as exc:
        tally.add(_code(exc), time.monotonic() - t)
        return None
    tally.add(label if not callable(label) else label(result), time.monotonic() - t)
    return result


def flood_validate(spec: dict[str, Any], ready: Any, go: Any, deadline: Any) -> dict[str, Any]:
    from lorad.client import AsyncClient

    conns, per = spec["validate_connections"], spec["validate_concurrency"]

    async def setup(stack: contextlib.AsyncExitStack) -> dict[str, Any]:
        clients = [await stack.enter_async_context(AsyncClient(spec["endpoint"], timeout=60))
                   for _ in range(conns)]
        model = (await clients[0].load_model(spec["model"]))["id"]
        return {"clients": clients, "model": model}

    def label(report: dict[str, Any]) -> str:
        return "ok:compatible" if report.get("compatible") else "ok:problems"

    async def worker(state: dict[str, Any], i: int, tally: Tally, t0: float) -> None:
        client = state["clients"][i % conns]
        k = i
        while _bounded(tally, spec, t0):
            path = spec["hostile_adapter"] if k % 2 == 0 else spec["valid_adapter"]
            await _timed(tally, client.validate_lora(state["model"], path), label)
            k += 1

    return _trio_flood(spec, ready, go, deadline, setup, worker, conns * per)


def flood_prompts(spec: dict[str, Any], ready: Any, go: Any, deadline: Any) -> dict[str, Any]:
    from lorad.client import AsyncClient

    conns = spec["prompt_connections"]

    async def setup(stack: contextlib.AsyncExitStack) -> dict[str, Any]:
        clients = [await stack.enter_async_context(AsyncClient(spec["endpoint"], timeout=300))
                   for _ in range(conns)]
        ctxs = [await c.create_context(spec["model"]) for c in clients]
        for ctx in ctxs:
            stack.push_async_callback(ctx.close)
        n_ctx = int(ctxs[0].info["params"]["n_ctx"])
        rng = random.Random(spec["seed"])
        text = " ".join(rng.choice(WORDS) for _ in range(3 * n_ctx))
        tokens = await ctxs[0].tokenize(text)
        while len(tokens) < 2 * n_ctx:
            tokens = tokens + tokens[1:]
        length = n_ctx - 16
        return {"ctxs": ctxs, "tokens": tokens, "length": length, "rng": rng,
                "info": {"n_ctx": n_ctx, "prompt_tokens": length}}

    async def worker(state: dict[str, Any], i: int, tally: Tally, t0: float) -> None:
        ctx, toks, n = state["ctxs"][i], state["tokens"], state["length"]
        while _bounded(tally, spec, t0):
            start = state["rng"].randrange(1, len(toks) - n)

            async def one(start: int = start) -> str:
                async with await ctx.generate(tokens=toks[start:start + n], max_tokens=4,
                                              temperature=0) as stream:
                    async for _ in stream:
                        pass
                return stream.finish_reason or "?"

            await _timed(tally, one(), lambda reason: f"ok:{reason}")

    return _trio_flood(spec, ready, go, deadline, setup, worker, conns)


def flood_contexts(spec: dict[str, Any], ready: Any, go: Any, deadline: Any) -> dict[str, Any]:
    import trio

    from lorad.client import AsyncClient

    async def setup(stack: contextlib.AsyncExitStack) -> dict[str, Any]:
        client = await stack.enter_async_context(AsyncClient(spec["endpoint"], timeout=120))
        model = (await client.load_model(spec["model"]))["id"]
        return {"client": client, "model": model, "info": {"n_ctx": spec["max_n_ctx"]}}

    async def worker(state: dict[str, Any], i: int, tally: Tally, t0: float) -> None:
        client = state["client"]
        while True:
            if _mem_available_gib() < spec["contexts_min_free_gib"]:
                tally.add("skipped_low_memory")
                await trio.sleep(0.5)  # a guard against an unbounded daemon, not a readiness wait
                continue
            if not _bounded(tally, spec, t0):
                return
            ctx = await _timed(tally, client.create_context(state["model"],
                                                            n_ctx=spec["max_n_ctx"]))
            if ctx is not None:
                with trio.CancelScope(shield=True):
                    await ctx.close()

    return _trio_flood(spec, ready, go, deadline, setup, worker, 1)


def flood_credit(spec: dict[str, Any], ready: Any, go: Any, deadline: Any) -> dict[str, Any]:
    import msgpack
    import zmq

    from lorad.protocol import TAG, Request, decode_reply, encode_request

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(spec["endpoint"])
    tally = Tally()
    next_id = 0

    def send(op: str, args: dict[str, Any]) -> int:
        nonlocal next_id
        next_id += 1
        sock.send_multipart(encode_request(Request(next_id, op, args)))
        return next_id

    def answer(rid: int, timeout: float = 120) -> Any:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if sock.poll(100):
                reply = decode_reply(sock.recv_multipart())
                if reply.id == rid and reply.kind in ("result", "error"):
                    if reply.kind == "error":
                        raise RuntimeError(f"{op_of[rid]}: {reply.error}")
                    return reply.result
        raise RuntimeError(f"no answer to {op_of[rid]}")

    op_of: dict[int, str] = {}
    model_rid = send("load_model", {"path": spec["model"]})
    op_of[model_rid] = "load_model"
    model = answer(model_rid)["id"]
    contexts = []
    for _ in range(spec["credit_streams"]):
        rid = send("create_context", {"model": model, "n_ctx": 512})
        op_of[rid] = "create_context"
        contexts.append(answer(rid)["id"])
    t0 = _wait_go(ready, go, {"contexts": len(contexts)})
    end = deadline.value
    streams = [send("generate", {"context": c, "prompt": PROMPTS[0], "max_tokens": 256,
                                 "temperature": 0, "credit": 1}) for c in contexts]
    tally.sent += len(streams)
    # Grants for ids that are not in flight (answered: granted false): the requests answered
    # during the set-up, in turn; each grant a request of its own, with an id never used.
    answered = list(range(1, streams[0]))
    would_block = 0
    while time.monotonic() < end:
        if tally.sent >= spec["credit_messages"]:
            tally.bound_hit_s = time.monotonic() - t0
            break
        body = msgpack.packb({"v": 1, "id": 10_000_000 + tally.sent, "op": "credit",
                              "args": {"request": answered[tally.sent % len(answered)], "n": 1}})
        try:
            sock.send_multipart([TAG, body], zmq.NOBLOCK)
            tally.sent += 1
        except zmq.Again:
            would_block += 1
            sock.poll(1, zmq.POLLOUT)
    # The replies of the whole flood, unread until now: count them for at most 2 s. The
    # daemon takes in messages at its own pace while streams decode (its ingress gate), so the
    # socket may still be full: the cancels and closes are given 2 s each, never blocking (a
    # daemon that dropped the connection has closed the contexts itself).
    def send_soon(op: str, args: dict[str, Any]) -> None:
        nonlocal next_id
        next_id += 1
        frames = encode_request(Request(next_id, op, args))
        until = time.monotonic() + 2.0
        while time.monotonic() < until:
            try:
                sock.send_multipart(frames, zmq.NOBLOCK)
                return
            except zmq.Again:
                sock.poll(10, zmq.POLLOUT)
        tally.add(f"unsent:{op}")

    for rid in streams:
        send_soon("cancel", {"request": rid})
    drain_end = time.monotonic() + 2.0
    while time.monotonic() < drain_end:
        if not sock.poll(50):
            if tally.outcomes:
                break
            continue
        try:
            reply = decode_reply(sock.recv_multipart())
        except Exception as exc:
            tally.add(f"undecodable:{_code(exc)}")
            continue
        if reply.kind == "result" and isinstance(reply.result, dict) and "granted" in reply.result:
            tally.add(f"granted:{str(reply.result['granted']).lower()}")
        elif reply.kind == "error":
            tally.add(f"error:{(reply.error or {}).get('code')}")
        elif reply.kind in ("item", "end"):
            tally.add(f"stream:{reply.kind}")
    for c in contexts:
        send_soon("close_context", {"context": c})
    sock.close(0)
    out = tally.report()
    out["would_block"] = would_block
    out["note"] = "outcomes: replies read in the 2 s after the flood (the rest never read)"
    return out


HttpCase = tuple[str, str, dict[str, str], bytes]


def _http_cases(model: str) -> tuple[list[HttpCase], list[HttpCase]]:
    """(method, path, headers, body) of the fuzz: the valid ones (a small share) and those the
    door refuses."""
    j = {"Content-Type": "application/json"}

    def body(obj: Any) -> bytes:
        return json.dumps(obj).encode()

    comp = {"model": model, "prompt": "The sea is", "max_tokens": 4, "temperature": 0}
    chat = {"model": model, "chat_template": "chatml", "max_tokens": 4,
            "messages": [{"role": "user", "content": "Hi"}]}
    deep = ("[" * 20000 + "]" * 20000).encode()
    valid = [
        ("GET", "/v1/models", {}, b""),
        ("GET", "/health", {}, b""),
        ("POST", "/v1/completions", j, body(comp)),
        ("POST", "/v1/completions", j, body({**comp, "stream": True})),
        ("POST", "/v1/chat/completions", j, body(chat)),
    ]
    refused = [
        ("POST", "/v1/completions", j, b'{"model": "' + model.encode() + b'", "prompt": '),
        ("POST", "/v1/completions", j, b"\xff\xfe\x00garbage"),
        ("POST", "/v1/completions", j, b'{"model": "\xff\xfe", "prompt": "\xc3\x28"}'),
        ("POST", "/v1/chat/completions", j, deep),
        ("POST", "/v1/completions", j, body({"a": {"b": {"c": [[[[[[[[[[1]]]]]]]]]]}}})),
        ("POST", "/v1/completions", {"Content-Type": "text/plain"}, body(comp)),
        ("POST", "/v1/completions", {}, body(comp)),
        ("PUT", "/v1/completions", j, body(comp)),
        ("GET", "/v1/nothing", {}, b""),
        ("POST", "/v1/completions", j, body({})),
        ("POST", "/v1/completions", j, body({**comp, "unknown_field": 1})),
        ("POST", "/v1/completions", j, body({**comp, "prompt": 12345})),
        ("POST", "/v1/chat/completions", j, body({**chat, "messages": "hello"})),
        ("POST", "/v1/completions", j, body({**comp, "stop": {"a": 1}})),
        ("POST", "/v1/completions", j, body({**comp, "max_tokens": 10**30})),
        ("POST", "/v1/completions", j, body({**comp, "max_tokens": -1})),
        ("POST", "/v1/completions", j, body({**comp, "n": 10**9})),
        ("POST", "/v1/completions", j, body({**comp, "logprobs": 10**6})),
        ("POST", "/v1/completions", j, body({**comp, "temperature": 1e308})),
        ("POST", "/v1/completions", j, b'{"model": "x", "prompt": "a", "max_tokens": 1e999}'),
        ("POST", "/v1/completions", j, body({**comp, "model": "no-such-model"})),
        ("POST", "/v1/embeddings", j, body({"model": model, "input": [[1, 2, 3]] * 3})),
        ("POST", "/v1/completions", j, body({**comp, "prompt": "word " * 60_000})),
    ]
    return valid, refused


def flood_http(spec: dict[str, Any], ready: Any, go: Any, deadline: Any) -> dict[str, Any]:
    import httpx

    valid, refused = _http_cases(spec["model_id"])
    cases = {"http-refused": refused, "http-valid": valid}.get(spec.get("http_cases", ""),
                                                               valid + refused)

    async def setup(stack: contextlib.AsyncExitStack) -> dict[str, Any]:
        client = await stack.enter_async_context(httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{spec['http_port']}", timeout=60,
            limits=httpx.Limits(max_connections=spec["http_concurrency"])))
        r = await client.get("/health")
        return {"client": client, "rng": random.Random(spec["seed"]),
                "info": {"health": r.status_code, "cases": len(cases)}}

    async def worker(state: dict[str, Any], i: int, tally: Tally, t0: float) -> None:
        client = state["client"]
        while _bounded(tally, spec, t0):
            method, path, headers, content = cases[state["rng"].randrange(len(cases))]

            async def one(method: str = method, path: str = path, headers: dict = headers,
                          content: bytes = content) -> int:
                async with client.stream(method, path, headers=headers,
                                         content=content or None) as resp:
                    async for _ in resp.aiter_raw():
                        pass
                    return resp.status_code

            await _timed(tally, one(), lambda status: f"HTTP {status}")

    return _trio_flood(spec, ready, go, deadline, setup, worker, spec["http_concurrency"])


# -- the run --------------------------------------------------------------------------------------
class FloodSetupError(RuntimeError):
    """A flooder could not set itself up (the pair is skipped, the run goes on)."""


class Bench:
    def __init__(self, args: argparse.Namespace, model: str, workdir: Path) -> None:
        from lorad.client import Client

        self.args = args
        self.model = model
        self.workdir = workdir
        self.mp = multiprocessing.get_context("spawn")
        self.endpoint = f"ipc://{workdir}/lorad.sock"
        self.http_port = free_port()
        self.log_path = workdir / "daemon.log"
        self.daemon_args = ["--repack", "auto", "--model", model,
                            "--http", f"127.0.0.1:{self.http_port}", *args.daemon_arg]
        started = time.perf_counter()
        self.proc = start_daemon(self.endpoint, [Path(model).parent, workdir], self.log_path,
                                 cwd=workdir, ready_timeout=300, extra_args=self.daemon_args)
        self.start_s = time.perf_counter() - started
        self.client = Client(self.endpoint, timeout=120)
        self.capabilities = self.client.capabilities()
        self.model_id = self.client.load_model(model)["id"]
        self.limits = self.capabilities.get("limits", {})
        self.streamer: Any = None

    # -- CPU accounting
    def _cpu(self, pids: list[int]) -> dict[str, Any]:
        busy, steal = _system_ticks()
        return {"t": time.monotonic(), "busy": busy, "steal": steal,
                "daemon": _process_ticks(self.proc.pid),
                "pids": {pid: _process_ticks(pid) for pid in pids},
                "self": _process_ticks("self")}

    @staticmethod
    def _cpu_delta(a: dict[str, Any], b: dict[str, Any], streamer: int, flooder: int | None
                   ) -> dict[str, Any]:
        wall = max(b["t"] - a["t"], 1e-9)
        ncpu = os.cpu_count() or 1

        def d(pid: int | None) -> float:
            if pid is None or pid not in a["pids"]:
                return 0.0
            return max(b["pids"].get(pid, 0) - a["pids"][pid], 0) / _HZ

        daemon = (b["daemon"] - a["daemon"]) / _HZ
        ours = daemon + d(streamer) + d(flooder) + (b["self"] - a["self"]) / _HZ
        others = max((b["busy"] - a["busy"]) / _HZ - ours, 0.0) / (wall * ncpu)
        steal = (b["steal"] - a["steal"]) / _HZ / (wall * ncpu)
        return {"wall_s": round(wall, 3), "daemon_cpu_frac": round(daemon / (wall * ncpu), 3),
                "streamer_cpu_frac": round(d(streamer) / (wall * ncpu), 3),
                "flooder_cpu_frac": round(d(flooder) / (wall * ncpu), 3),
                "other_processes_cpu_frac": round(others, 3), "steal_frac": round(steal, 3),
                "contended": others + steal > CONTENDED}

    def _window(self, seconds: float, pids: list[int]) -> dict[str, Any]:
        """Wait ``seconds`` (the phase is a time window), sampling the daemon's RSS."""
        t0 = time.monotonic()
        end = t0 + seconds
        rss = []
        while True:
            left = end - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(0.1, left))  # the phase's length, not a readiness wait
            kib = _rss_kib(self.proc.pid)
            if kib is not None:
                rss.append(kib)
            if self.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited ({self.proc.returncode}) during a phase")
        return {"t0": t0, "t1": time.monotonic(),
                "daemon_rss_max_mib": _r(max(rss) / 1024 if rss else None, 1)}

    def wait_others_idle(self, max_wait: float, window: float = 0.5) -> dict[str, Any]:
        """Wait (at most ``max_wait`` s) for a ``window`` in which processes other than the
        daemon, the streamer and this script used under 5 % of the machine."""
        t0 = time.monotonic()
        pids = [self.stream_info["pid"]]
        while True:
            a = self._cpu(pids)
            time.sleep(window)  # a measurement window, not a readiness wait
            d = self._cpu_delta(a, self._cpu(pids), pids[0], None)
            waited = time.monotonic() - t0
            if not d["contended"] or waited >= max_wait:
                return {"waited_s": round(waited, 2),
                        "others": d["other_processes_cpu_frac"] + d["steal_frac"],
                        "idle": not d["contended"]}

    def start_streamer(self) -> dict[str, Any]:
        self.stream_ready = self.mp.Queue()
        self.stream_stop = self.mp.Event()
        self.stream_results = self.mp.Queue()
        spec = {"endpoint": self.endpoint, "model": self.model_id,
                "tokens": self.args.stream_tokens}
        self.streamer = self.mp.Process(target=streamer_main, daemon=True,
                                        args=(spec, self.stream_ready, self.stream_stop,
                                              self.stream_results))
        self.streamer.start()
        info = self.stream_ready.get(timeout=SETUP_TIMEOUT)
        if "error" in info:
            raise RuntimeError(f"the streaming client failed:\n"
                               f"{self.stream_results.get(timeout=10).get('error')}")
        self.stream_info = info
        return info

    def stop_streamer(self) -> dict[str, Any]:
        self.stream_stop.set()
        out = self.stream_results.get(timeout=120)
        self.streamer.join(30)
        if self.streamer.is_alive():
            self.streamer.terminate()
        if "error" in out:
            raise RuntimeError(f"the streaming client failed:\n{out['error']}")
        return out

    def flood_spec(self, seed: int) -> dict[str, Any]:
        a = self.args
        return {"endpoint": self.endpoint, "model": self.model, "model_id": self.model_id,
                "http_port": self.http_port, "seed": seed, "nice": a.flooder_nice,
                "max_requests": a.max_requests, "credit_messages": a.credit_messages,
                "validate_connections": a.validate_connections,
                "validate_concurrency": a.validate_concurrency,
                "hostile_adapter": self.hostile["path"], "valid_adapter": self.valid["path"],
                "prompt_connections": a.prompt_connections,
                "max_n_ctx": int(self.limits.get("max_n_ctx", 131072)),
                "contexts_min_free_gib": a.contexts_min_free_gib if a.contexts_min_free_gib
                is not None else (4.0 if self.capabilities.get("memory") else 12.0),
                "credit_streams": a.credit_streams, "http_concurrency": a.http_concurrency}

    def _load(self) -> dict[str, int]:
        """What the daemon has under way, from ``status()`` (keys an older daemon lacks
        count 0)."""
        st = self.client.status()
        files = st.get("file_workers") or {}
        http = st.get("http") or {}
        # the HTTP door keeps the contexts it made (they count in contexts_total)
        return {"contexts": int(st.get("contexts_total", 0)) - int(http.get("contexts", 0)),
                "requests": int(st.get("queued_requests", 0))
                + int(st.get("running_requests", 0)),
                "files": int(files.get("busy", 0)) + int(files.get("waiting", 0)),
                "http": int(http.get("queued_requests", 0)) + int(http.get("running_requests", 0))}

    def wait_settled(self, baseline: dict[str, int], timeout: float) -> dict[str, Any]:
        """Wait until the daemon is back to ``baseline`` (the contexts, the streamer's request,
        no file work, nothing on the HTTP door): the work a flood left behind."""
        t0 = time.monotonic()
        load: dict[str, int] = {}
        while time.monotonic() - t0 < timeout:
            try:
                load = self._load()
            except Exception as exc:
                load = {"error": _code(exc)}  # type: ignore[dict-item]
            if (load.get("contexts", 1 << 30) <= baseline["contexts"]
                    and load.get("requests", 1 << 30) <= baseline["requests"]
                    and load.get("files") == 0 and load.get("http") == 0):
                return {"settled_s": round(time.monotonic() - t0, 2), "settled": True}
            time.sleep(0.2)  # polling the daemon's own account of its work
        return {"settled_s": round(time.monotonic() - t0, 2), "settled": False, "left": load}

    def pair(self, kind: str, rnd: int, attempt: int) -> list[dict[str, Any]]:
        """One quiet phase and one flood phase of ``kind`` (the flooder set up before both)."""
        a = self.args
        ready, results = self.mp.Queue(), self.mp.Queue()
        go, deadline = self.mp.Event(), self.mp.Value("d", 0.0)
        idle = self.wait_others_idle(a.wait_idle) if a.wait_idle > 0 else None
        baseline = self._load()
        baseline["requests"] = max(baseline["requests"], 1)  # the streamer's request
        setup0 = time.monotonic()
        proc = self.mp.Process(target=flooder_main, daemon=True,
                               args=(kind, self.flood_spec(1000 * rnd + attempt), ready, go,
                                     deadline, results))
        proc.start()
        try:
            info = ready.get(timeout=SETUP_TIMEOUT)
        except queue.Empty:
            info = {"error": "no ready message"}
        if "error" in info:
            with contextlib.suppress(queue.Empty):
                info["error"] = results.get(timeout=10).get("error")
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
                proc.join(10)
            raise FloodSetupError(f"{kind}: the flooder failed to set up:\n{info['error']}")
        setup_s = time.monotonic() - setup0
        pids = [self.stream_info["pid"], proc.pid]
        base = {"flood": kind, "round": rnd, "attempt": attempt, "idle_wait": idle}
        time.sleep(a.settle)  # let the set-up's work (contexts made) end before measuring
        c0 = self._cpu(pids)
        quiet = self._window(a.phase_seconds, pids)
        c1 = self._cpu(pids)
        deadline.value = time.monotonic() + a.phase_seconds
        go.set()
        flood = self._window(deadline.value - time.monotonic(), pids)
        c2 = self._cpu(pids)
        try:
            out = results.get(timeout=a.phase_seconds + 120)
        except queue.Empty:
            out = {"error": "no report from the flooder within its bound"}
        proc.join(30)
        killed = proc.is_alive()
        if killed:
            proc.terminate()
            proc.join(10)
        exited = time.monotonic()
        settled = self.wait_settled(baseline, a.drain_timeout)
        time.sleep(a.settle)  # the drain: what the flood left behind, measured separately
        drain_end = time.monotonic()
        ping = None
        with contextlib.suppress(Exception):
            t = time.perf_counter()
            self.client.ping(timeout=30)
            ping = round((time.perf_counter() - t) * 1000, 2)
        if self.proc.poll() is not None:
            raise RuntimeError(f"the daemon exited ({self.proc.returncode}) after {kind}")
        spid, fpid = self.stream_info["pid"], proc.pid
        return [
            {**base, "phase": "quiet", **quiet, **self._cpu_delta(c0, c1, spid, fpid)},
            {**base, "phase": "flood", **flood, **self._cpu_delta(c1, c2, spid, fpid),
             "flooder": {**out, "setup_s": round(setup_s, 2), "setup": info,
                         "killed": killed}},
            {**base, "phase": "drain", "t0": flood["t1"], "t1": drain_end,
             "flooder_exit_after_s": round(exited - flood["t1"], 2), **settled,
             "ping_after_ms": ping},
        ]

    def close(self) -> int:
        with contextlib.suppress(Exception):
            self.client.close()
        if self.streamer is not None and self.streamer.is_alive():
            self.stream_stop.set()
            self.streamer.join(30)
            if self.streamer.is_alive():
                self.streamer.terminate()
        return stop_daemon(self.proc)


# -- analysis -------------------------------------------------------------------------------------
def gaps_in(requests: list[dict[str, Any]], t0: float, t1: float) -> dict[str, Any]:
    """The streamer's gaps (ms) whose later token arrived in [t0, t1), its tokens, TTFTs,
    and the errors that ended its requests in the window."""
    gaps: list[float] = []
    tokens = 0
    ttfts: list[float] = []
    errors = [q["error"] for q in requests if "error" in q and t0 <= q["t_end"] < t1]
    arrivals = [t0, *(t for q in requests for t in q["stamps"] if t0 <= t < t1), t1]
    arrivals.sort()
    silence = max(b - a for a, b in itertools.pairwise(arrivals)) * 1000
    for q in requests:
        st = q["stamps"]
        if not st or st[-1] < t0 or q["t_start"] >= t1:
            continue
        if t0 <= st[0] < t1:
            ttfts.append((st[0] - q["t_start"]) * 1000)
        for i, t in enumerate(st):
            if t0 <= t < t1:
                tokens += 1
                if i:
                    gaps.append((t - st[i - 1]) * 1000)
    return {"gaps": gaps, "tokens": tokens, "ttfts": ttfts, "errors": errors,
            "silence": silence}


def phase_stats(g: dict[str, Any], seconds: float) -> dict[str, Any]:
    gaps = g["gaps"]
    return {"tokens": g["tokens"], "tokens_per_s": _r(g["tokens"] / seconds if seconds else None,
                                                      2),
            "gaps": len(gaps), "gap_p50_ms": _r(percentile(gaps, 50)),
            "gap_p99_ms": _r(percentile(gaps, 99)), "gap_max_ms": _r(max(gaps) if gaps else None),
            "ttft_max_ms": _r(max(g["ttfts"]) if g["ttfts"] else None, 1),
            "requests_started": len(g["ttfts"]), "stream_errors": g["errors"],
            "silence_max_ms": _r(g["silence"], 1)}


def analyse(phases: list[dict[str, Any]], requests: list[dict[str, Any]]) -> None:
    for p in phases:
        if "t0" not in p:
            continue
        g = gaps_in(requests, p["t0"], p["t1"])
        p.update(phase_stats(g, p["t1"] - p["t0"]))
        p["gaps_ms"] = [round(v, 3) for v in g["gaps"]]


def summarise(phases: list[dict[str, Any]], floods: list[str]) -> dict[str, Any]:
    kept = [p for p in phases if not p.get("discarded")]
    out: dict[str, Any] = {}

    def pooled(ps: list[dict[str, Any]]) -> dict[str, Any]:
        gaps = [v for p in ps for v in p["gaps_ms"]]
        secs = sum(p["t1"] - p["t0"] for p in ps)
        toks = sum(p["tokens"] for p in ps)
        return {"phases": len(ps), "gaps": len(gaps), "gap_p50_ms": _r(percentile(gaps, 50)),
                "gap_p99_ms": _r(percentile(gaps, 99)),
                "gap_max_ms": _r(max(gaps) if gaps else None),
                "tokens_per_s": _r(toks / secs if secs else None, 2),
                "ttft_max_ms": _r(max((p["ttft_max_ms"] for p in ps
                                       if p["ttft_max_ms"] is not None), default=None), 1),
                "silence_max_ms": _r(max((p["silence_max_ms"] for p in ps), default=None), 1),
                "contended": sum(p.get("contended", False) for p in ps),
                "stream_errors": sum(len(p["stream_errors"]) for p in ps),
                "flooder_cpu_frac": _r(_median([p.get("flooder_cpu_frac") for p in ps])),
                "daemon_cpu_frac": _r(_median([p.get("daemon_cpu_frac") for p in ps])),
                "other_processes_cpu_frac": _r(_median([p.get("other_processes_cpu_frac")
                                                        for p in ps]))}

    out["quiet (all)"] = pooled([p for p in kept if p["phase"] == "quiet"])
    for f in floods:
        quiet = pooled([p for p in kept if p["phase"] == "quiet" and p["flood"] == f])
        flood_ps = [p for p in kept if p["phase"] == "flood" and p["flood"] == f]
        flood = pooled(flood_ps)
        ratio = (flood["gap_p99_ms"] / quiet["gap_p99_ms"]
                 if flood["gap_p99_ms"] and quiet["gap_p99_ms"] else None)
        per_round = []
        for p in flood_ps:
            q = next((x for x in kept if x["phase"] == "quiet" and x["flood"] == f
                      and x["round"] == p["round"] and x["attempt"] == p["attempt"]), None)
            if q and q["gap_p99_ms"] and p["gap_p99_ms"]:
                per_round.append(round(p["gap_p99_ms"] / q["gap_p99_ms"], 3))
        sent = sum(p["flooder"].get("sent", 0) for p in flood_ps)
        outcomes: collections.Counter[str] = collections.Counter()
        for p in flood_ps:
            outcomes.update(p["flooder"].get("outcomes", {}))
        drains = [p for p in phases if p["phase"] == "drain" and p["flood"] == f
                  and not p.get("discarded")]
        out[f] = {"quiet": quiet, "flood": flood, "p99_ratio": _r(ratio),
                  "p99_ratio_per_round": per_round, "met": ratio is not None and ratio <= TARGET,
                  "flooder_sent": sent, "flooder_outcomes": dict(outcomes.most_common()),
                  "flooder_errors": [p["flooder"]["error"] for p in flood_ps
                                     if "error" in p["flooder"]]
                  + [p["error"] for p in phases if p["phase"] == "failed" and p["flood"] == f],
                  "flooder_latency_p50_ms": _r(_median([p["flooder"].get("latency_p50_ms")
                                                        for p in flood_ps]), 2),
                  "flooder_latency_p99_ms": _r(max((p["flooder"]["latency_p99_ms"]
                                                    for p in flood_ps
                                                    if p["flooder"].get("latency_p99_ms")
                                                    is not None), default=None), 2),
                  "drain_gap_max_ms": _r(max((p["gap_max_ms"] for p in drains
                                              if p.get("gap_max_ms") is not None),
                                             default=None)),
                  "work_left_s_max": max((p.get("settled_s", 0) for p in drains), default=None),
                  "all_settled": all(p.get("settled", False) for p in drains),
                  "ping_after_ms_max": max((p["ping_after_ms"] for p in drains
                                            if p.get("ping_after_ms") is not None),
                                           default=None)}
    return out




def _outcomes(counts: dict[str, int], limit: int = 4) -> str:
    items = list(counts.items())
    text = ", ".join(f"{k} {v}" for k, v in items[:limit])
    if len(items) > limit:
        text += f", +{len(items) - limit} more"
    return text


def print_report(result: dict[str, Any]) -> None:
    s = result["summary"]
    st = result["settings"]
    m = result["machine"]
    print(f"\nCPU: {m['cpu_model']} ({m['nproc']} CPUs); model {Path(st['model']).name}; "
          f"{st['rounds']} round(s) of {st['phase_seconds']:g} s phases; streamer: "
          f"{st['stream_max_tokens']} tokens a request, greedy, context n_ctx "
          f"{st['stream_context'].get('n_ctx')}\n")
    head = ("phase", "gap p50 ms", "gap p99 ms", "p99 / quiet p99", "max gap ms",
            "TTFT max ms", "silence ms", "tok/s", "stream errors", "flooder sent", "flooder CPU",
            "others CPU", "flooder outcomes")

    def row(name: str, x: dict[str, Any], ratio: str, flood: dict[str, Any] | None
            ) -> tuple[str, ...]:
        return (name, _f(x["gap_p50_ms"], ".2f"), _f(x["gap_p99_ms"], ".2f"), ratio,
                _f(x["gap_max_ms"], ".1f"), _f(x["ttft_max_ms"], ".1f"),
                _f(x["silence_max_ms"], ".1f"), _f(x["tokens_per_s"], ".1f"),
                str(x["stream_errors"]),
                str(flood["flooder_sent"]) if flood else "",
                _f(x["flooder_cpu_frac"], ".0%") if flood else "",
                _f(x["other_processes_cpu_frac"], ".0%"),
                _outcomes(flood["flooder_outcomes"]) if flood else "")

    rows = [row("quiet (all)", s["quiet (all)"], "1.00", None)]
    for f in st["floods"]:
        x = s[f]
        ratio = x["p99_ratio"]
        mark = "" if ratio is None else (" (met)" if x["met"] else " (NOT met)")
        rows.append(row(f"quiet before {f}", x["quiet"], "", None))
        rows.append(row(f"flood: {f}", x["flood"], _f(ratio, ".2f") + mark, x))
    _table(head, rows, left=(0, -1))
    print(f"\ntarget: p99 during each flood <= {TARGET}x the p99 of the quiet phases paired with "
          "it; TTFT max: of the streamer's requests whose first token came in the phase; "
          "silence: the longest time in a phase without a token (TTFTs included); CPU columns: "
          "share of the whole machine (median over the rounds)\n")
    rows = []
    for f in st["floods"]:
        x = s[f]
        rows.append((f, _f(x["flooder_latency_p50_ms"], ".1f"),
                     _f(x["flooder_latency_p99_ms"], ".1f"),
                     _f(x["work_left_s_max"], ".1f") + ("" if x["all_settled"] else " (timeout)"),
                     _f(x["drain_gap_max_ms"], ".1f"), _f(x["ping_after_ms_max"], ".1f"),
                     str(x["p99_ratio_per_round"])))
    _table(("flood", "flooder answer p50 ms", "p99 ms", "daemon busy after s",
            "stream max gap then ms", "ping after ms", "ratio per round"), rows, left=(0, -1))
    for f in st["floods"]:
        x = s[f]
        if x["flooder_errors"]:
            print(f"{f}: flooder error(s):\n" + "\n".join(e[-1500:] for e in x["flooder_errors"]))
    d = result["daemon"]
    print(f"daemon: exit code {d['exit_code']}, traceback in its log: {d['log_has_traceback']}, "
          f"peak RSS {d['peak_rss_mib']} MiB")


# -- main -----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="GGUF model (default: the path `lorad default-model` prints)")
    p.add_argument("--tiny", action="store_true",
                   help="the tiny generated model of tests/tinymodels.py (a quick smoke run)")
    p.add_argument("--phase-seconds", type=float, default=15.0, help="length of every phase")
    p.add_argument("--rounds", type=int, default=2, help="quiet/flood pairs per flood")
    p.add_argument("--floods", default=",".join(FLOODS), help="which floods, in this order")
    p.add_argument("--warmup-seconds", type=float, default=3.0)
    p.add_argument("--settle", type=float, default=1.0,
                   help="seconds after a flooder's set-up and after its exit, not measured")
    p.add_argument("--drain-timeout", type=float, default=120.0,
                   help="after a flood, wait at most this long for the daemon to finish the "
                   "work the flood left (status(): contexts, requests, file work, HTTP)")
    p.add_argument("--wait-idle", type=float, default=30.0, metavar="SECONDS",
                   help="before each pair, wait up to this long for other processes to use "
                   "under 5 %% of the machine; 0 disables")
    p.add_argument("--retries", type=int, default=1,
                   help="measure a contended pair again at most this many times")
    p.add_argument("--stream-tokens", type=int, default=256,
                   help="max_tokens of each of the streaming client's requests")
    p.add_argument("--max-requests", type=int, default=50_000,
                   help="most requests one flood phase sends (all floods but credit)")
    p.add_argument("--validate-connections", type=int, default=4)
    p.add_argument("--validate-concurrency", type=int, default=10,
                   help="validate_lora calls in flight per connection")
    p.add_argument("--hostile-strings", type=int, default=200_000,
                   help="strings in the hostile adapter's metadata array")
    p.add_argument("--prompt-connections", type=int, default=2,
                   help="connections (each with its own context) sending giant prompts")
    p.add_argument("--contexts-min-free-gib", type=float,
                   help="the contexts flood waits while MemAvailable is below this (default: "
                   "4, or 12 with a daemon that reports no memory budget in capabilities)")
    p.add_argument("--credit-streams", type=int, default=8,
                   help="never-read streams of the credit flood (one context each)")
    p.add_argument("--credit-messages", type=int, default=100_000,
                   help="most messages the credit flood sends")
    p.add_argument("--http-concurrency", type=int, default=8)
    p.add_argument("--flooder-nice", type=int, default=0,
                   help="niceness of the flooder process (0: as a hostile client would run)")
    p.add_argument("--daemon-arg", action="append", default=[],
                   help="extra argument for the daemon, e.g. --daemon-arg=--config=FILE "
                   "(repeatable; default none: lorad's defaults)")
    p.add_argument("--keep", action="store_true",
                   help="keep the work directory (the daemon's log, the adapters)")
    p.add_argument("--json-out", help="default: bench/results/noisy-<timestamp>.json")
    args = p.parse_args(argv)
    floods = [f.strip() for f in args.floods.split(",") if f.strip()]
    if not floods or any(f not in FLOODS + HTTP_HALVES for f in floods):
        p.error(f"--floods takes some of {','.join(FLOODS + HTTP_HALVES)}")
    if args.tiny and args.model:
        p.error("--tiny and --model exclude each other")
    if args.phase_seconds <= 0 or args.rounds < 1:
        p.error("--phase-seconds must be > 0 and --rounds >= 1")

    started = time.time()
    stamp = datetime.datetime.fromtimestamp(started).strftime("%Y%m%d-%H%M%S")
    json_out = Path(args.json_out or REPO / "bench" / "results" / f"noisy-{stamp}.json")
    info = machine_info()
    workdir = Path(tempfile.mkdtemp(prefix="lorad-noisy-"))
    if args.tiny:
        sys.path.insert(0, str(REPO / "tests"))
        import tinymodels

        model = str(tinymodels.write_tiny_llama(workdir / "tiny.gguf", seed=0))
    else:
        model = str(Path(args.model).expanduser().resolve()) if args.model else \
            default_model_path()
    arch, shapes = model_tensors(model)
    adapter = {"rank": 8, "alpha": 8.0, "seed": 0, "std": 0.02}
    valid = write_adapter(workdir / "valid.gguf", arch, shapes, **adapter)
    hostile = write_adapter(workdir / "hostile.gguf", arch, shapes, **adapter,
                            strings=args.hostile_strings)
    print(f"model: {model}\ncpu: {info['cpu_model']} ({info['nproc']} CPUs); floods {floods}, "
          f"{args.rounds} round(s) of {args.phase_seconds:g} s phases\nadapters: valid "
          f"{valid['file_bytes']} bytes, hostile {hostile['file_bytes']} bytes "
          f"({args.hostile_strings} strings)", flush=True)

    bench = Bench(args, model, workdir)
    bench.valid, bench.hostile = valid, hostile
    phases: list[dict[str, Any]] = []
    stream_out: dict[str, Any] = {}
    exit_code: int | None = None
    failure = None
    try:
        sinfo = bench.start_streamer()
        print(f"daemon ready in {bench.start_s:.1f} s; streamer context {sinfo['context']} "
              f"(n_ctx {sinfo['params'].get('n_ctx')}, {sinfo['max_tokens']} tokens a request)",
              flush=True)
        t = time.monotonic()
        time.sleep(args.warmup_seconds)  # the warm-up's length
        phases.append({"flood": None, "round": -1, "attempt": 0, "phase": "warmup", "t0": t,
                       "t1": time.monotonic()})
        for rnd in range(args.rounds):
            order = floods[rnd % len(floods):] + floods[:rnd % len(floods)]
            for kind in order:
                for attempt in range(args.retries + 1):
                    try:
                        got = bench.pair(kind, rnd, attempt)
                    except FloodSetupError as exc:
                        if bench.proc.poll() is not None:
                            raise
                        print(f"  round {rnd} {kind:12s} skipped: {exc}", flush=True)
                        phases.append({"flood": kind, "round": rnd, "attempt": attempt,
                                       "phase": "failed", "error": str(exc)})
                        break
                    contended = any(x.get("contended") for x in got)
                    print(f"  round {rnd} {kind:12s} quiet/flood done"
                          f"{' (contended)' if contended else ''}; flooder sent "
                          f"{got[1]['flooder'].get('sent')}: "
                          f"{_outcomes(got[1]['flooder'].get('outcomes', {}), 6)}"
                          + (f"; ERROR {got[1]['flooder']['error'][-300:]}"
                             if "error" in got[1]["flooder"] else ""), flush=True)
                    if not contended or attempt == args.retries:
                        phases.extend(got)
                        break
                    for x in got:
                        x["discarded"] = True
                    phases.extend(got)
        stream_out = bench.stop_streamer()
    except BaseException as exc:
        failure = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        traceback.print_exc()
        raise
    finally:
        peak = None
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{bench.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = round(int(line.split()[1]) / 1024, 1)
        exit_code = bench.close()
        log = bench.log_path.read_text(errors="replace") if bench.log_path.exists() else ""
        daemon = {"exit_code": exit_code, "log_has_traceback": "Traceback" in log,
                  "peak_rss_mib": peak, "start_s": round(bench.start_s, 2),
                  "args": bench.daemon_args, "capabilities": bench.capabilities}
        if failure is not None:
            keep = workdir / "daemon.log"
            print(f"(the daemon's log is kept at {keep})", file=sys.stderr)

    requests = stream_out.get("requests", [])
    analyse(phases, requests)
    summary = summarise(phases, floods)
    result: dict[str, Any] = {
        "benchmark": "noisy",
        "date": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(),
        "duration_s": round(time.time() - started, 1),
        "machine": info,
        "software": {"llama_cpp_python": _version("llama_cpp_python"),
                     "lorad": bench.capabilities.get("version"), "git": git_info()},
        "settings": {**{k: v for k, v in vars(args).items() if k != "json_out"},
                     "model": model, "floods": floods, "target_p99_ratio": TARGET,
                     "stream_context": sinfo["params"], "stream_max_tokens": sinfo["max_tokens"],
                     "adapters": {"valid": valid, "hostile": hostile},
                     "http_port": bench.http_port},
        "daemon": daemon,
        "streamer": {"requests": len(requests), "cpu_s": stream_out.get("cpu_s"),
                     "finish_reasons": dict(collections.Counter(
                         q["finish_reason"] for q in requests)),
                     # every request, its token stamps in ms from its start (phases' t0/t1
                     # are on the same clock: time.monotonic)
                     "log": [{"t_start": q["t_start"], "finish_reason": q["finish_reason"],
                              **({"error": q["error"]} if "error" in q else {}),
                              "stamps_ms": [round((t - q["t_start"]) * 1000, 2)
                                            for t in q["stamps"]]} for q in requests]},
        "summary": summary,
        "phases": phases,
    }
    print_report(result)
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(result, indent=1) + "\n")
    if args.keep:
        print(f"work directory (the daemon's log): {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"results: {json_out} ({result['duration_s']:.0f} s)")
    ok = exit_code == 0 and not daemon["log_has_traceback"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
