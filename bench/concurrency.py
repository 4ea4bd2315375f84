"""Concurrent clients: aggregate decode throughput of N client processes, lorad in its default
configuration versus llama-server, speculation on versus off under load, and adapter stacks.

Usage::

    .venv/bin/python bench/concurrency.py [--clients 1,4,8,16,32] [--tokens 96]
                                          [--tokens-at 32=64] [--rounds 2] [--no-lookup]
                                          [--server-variants default,no-repack] [--no-stacks]
                                          [--n-ctx 1024] [--threads 2] [--llama-server PATH]
                                          [--batching 'sequences = 16'] [--wait-idle 20]
                                          [--retries 1] [--estimate] [--json-out PATH]
    .venv/bin/python bench/concurrency.py --quick      # smoke test: clients 1,2, 16 tokens,
                                                       # 1 round, no stacks, no retries

N client *processes* (``multiprocessing``, spawned) each stream one greedy generation of
``--tokens`` tokens at the same time, every client its own prompt (``PROMPTS``, 32 distinct
short English prompts that make gemma 3 270M write at length: the earlier eight, then lists of
facts and histories of 24 topics, each checked to give 96 greedy tokens without an end of
generation), against:

``lorad``
    A real ``lorad serve`` subprocess (``python -m lorad.daemon``) on a private ipc endpoint in
    **lorad's default configuration**: no config file, so no ``[batching]`` section (a slab starts
    with one sequence and doubles up to ``sequences`` = 64, so the N contexts of a run become the
    N sequences of one batched llama context), ``--repack auto`` (the daemon's default; it
    repacks weights unless the CPU has AMX), the memory budget and ``prompt_share`` at their
    defaults. The slabs' width (``sequences``) and ``used`` are read from
    ``status()["batching"]`` once every client has its context, and reported (a warning when the
    N contexts are not the sequences of one slab), not assumed. Opt-ins that change the
    configuration: ``--batching "sequences = 16"`` (repeatable: lines of a ``[batching]``
    section in a config file, e.g. the earlier fixed width), ``--kv-unified``, ``--repack``,
    ``--daemon-arg``. Each client process creates its own context (``n_ctx`` ``--n-ctx``,
    ``n_threads`` ``--threads``) on the default model with the sync ``lorad.client.Client``,
    then streams ``Context.generate(prompt, max_tokens, temperature=0)``; the context is closed
    after the run, so that every run starts from a daemon without contexts.
``lorad lookup``
    The same, every context created with ``speculative={"mode": "prompt_lookup"}`` (adaptive,
    lorad's defaults): every request drafts by prompt lookup. The drafted and accepted tokens
    come from each request's end metrics.
``llama-server``
    llama.cpp's own server (``--llama-server``, by default ``~/.cache/lorad/llama-server/
    llama-server``; without it those columns are skipped and the reason printed), started with
    ``-m MODEL -np N -c N*n_ctx -t THREADS -tb THREADS --no-webui`` and otherwise its own
    defaults: N slots of ``n_ctx`` cells each (``-c`` is the only size given: its default, the
    model's training length split among the slots, would give one client 32768 cells and 32
    clients 1024 each), a KV pool per slot (with ``-np`` given, ``kv_unified`` is off, as
    lorad's), ``-b 2048 -ub 512``, an SWA cache of the window's size (lorad keeps a full-size
    one: ``llama_context_default_params`` has ``swa_full`` on), weights repacked.
    ``--server-variants`` lists the llama-server columns, each a configuration of its own:
    ``default`` (the above), ``no-repack`` (the same with ``--no-repack``: lorad does not repack
    on CPUs with AMX, README "Weight repacking"), ``swa-full`` (this script's earlier flags,
    ``-b 512 -ub 512 --swa-full --no-kv-unified``: lorad's step budget and SWA cache; not in
    the default set, since each column adds about a fifth to the run's time). Default:
    ``default,no-repack``. A variant that does not start or dies (llama-server with repacked
    weights crashes with SIGSEGV on CPUs with AMX) is reported and skipped for the rest of the
    run. Each client process POSTs ``/completion`` with ``{"prompt", "n_predict",
    "temperature": 0, "stream": true, "cache_prompt": false, "ignore_eos": true,
    "return_tokens": true}`` on a connection it opened beforehand (``http.client``) and reads
    the server-sent events.

**Just started and warm.** One server runs at a time (another process mapping the model file
would take half of its pages' PSS). Per round, for each N, each configuration in turn (the
order rotating every round) gets a server started for it, and two runs on it: the first is
**just started** (a daemon that has not decoded a step: no step cost learnt, drafting decided
from its priors; llama-server as fresh), the second, after the contexts were closed and made
again, is **warm** (the daemon knows what steps of this width cost); then the server stops.
The two are reported apart. Before the first round a warm-up run of each side (1 client,
``--warmup-tokens``, not counted; a server of its own) fills the page cache and finds a
llama-server variant that crashes.

Clients start together: every client process sets up (connects, creates its context) and waits
on a ``multiprocessing.Barrier``; this script checks the setup, then passes the barrier, which
releases them all. Each client timestamps (``time.monotonic``, one clock for every process) its
request just before sending it and every token when it reaches the client (lorad: tokens of one
streamed chunk share its timestamp). Per configuration run:

* **aggregate tokens/s** = tokens generated by all clients / (last token of any client - first
  request of any client): prompt processing and the start-up of the batch count, as a user
  waiting for all N answers sees it;
* **inter-token gaps**: p50 and p99 (ms) of the gaps between consecutive tokens of a stream,
  pooled over the streams; also TTFT (each client's request to its first token);
* **PSS** of the server process (``Pss:`` of ``/proc/PID/smaps_rollup``) at the end of the run,
  while the N contexts (slots) still exist; its ratio to llama-server's, and for lorad PSS /
  (the model file's size + N x one context's KV cache, from ``status()["memory"]``: the issue's
  "weights + N KV caches"). Other processes that map the model file meanwhile are recorded;
* **the Python share of a step** (lorad, speculation off). In the run's *steady window*, from
  the last first token of any stream to the first last token (every stream generating, every
  prompt done), each step gives each stream one token. The slab's own timeline
  (``status()["batching"][i]["timeline"]``: when each of its last 256 steps began, on the
  machine's monotonic clock that the clients stamp tokens with, and what its decode took,
  timed around the worker thread's ``llama_decode`` and the in-place sampling after it) gives
  the steps that began in that window: Python share = 1 - their decode time / the time from
  the first one's start to the last one's: what the scheduler, the context actors, the
  emission and the transport add to a step outside the timed call, measured on the same steps
  (the median-based figure of earlier versions, 1 - the median N-token ``step_ms`` over the
  whole run / the median gap in the window, compared two windows and went negative on a
  machine whose speed moves within a run; it is kept in the JSON as ``share_of_medians``). It
  is a lower bound of the daemon's Python (the sampling glue inside the timed call counts as
  decode) and is not computed with speculation on (steps then differ in size and give a stream
  several tokens). Also reported: the CPU time of the daemon's trio thread (the scheduler,
  actors and transport; ``/proc/PID/task/PID/schedstat``) per step over the run, some of
  which overlaps the decode;
* the tokens each client got: llama-server ignores end-of-generation (``ignore_eos``) and always
  gives ``--tokens``; lorad has no such option and stops at an end-of-generation token, so the
  prompts were chosen to make the model write long answers and the token counts are reported
  (a note is printed when a lorad stream ends early). The greedy token ids of lorad and of the
  first llama-server column are compared per client (common prefix), as a check that both do
  the same work; so are lorad's with and without speculation.

Ratios: lorad / each llama-server column and ``lorad lookup`` / ``lorad`` per N and phase, as
the ratio of the medians across rounds and as the median of the per-round ratios.

Stacks (``--no-stacks`` skips them): 4 clients on lorad, each context created with an adapter
stack (``create_context(model, loras=[(path, 1.0)])``, the trained demo adapters in
``examples/train_lora/adapters``): all 4 on ``[pirate @1.0]`` (1 stack) versus 2 on
``[pirate @1.0]`` and 2 on ``[french @1.0]`` (2 stacks). llama.cpp applies one adapter set to a
whole batch, so lorad's scheduler serves the stacks in rotation, in turns of 4 steps; the **stacks
ratio** is 2 stacks / 1 stack aggregate tokens/s. The adapters were trained to give short
answers and stop (a list prompt ends after 2-10 tokens under them), so here each client asks
short questions of their kind (``QUESTIONS``, "Question: ...\nAnswer:") one after the other,
each request asking for the tokens still missing, until it has ``--tokens`` tokens: short-answer
serving, prompts included. The answers that show the adapter's behaviour ("Arr" / "Réponse")
are counted, as a check that the stacks apply. llama-server can do this too (adapters loaded
with ``--lora A --lora B --lora-init-without-apply``, a per-request ``"lora": [{"id",
"scale"}]``, ``cache_prompt`` on like lorad's prefix reuse within a context, ``ignore_eos``
off); it batches only slots with equal adapters, and each step it takes the first generating
slot in slot order (no rotation), so the other stack's slots wait while the first stack has
work. It is measured the same way when the binary is there, with the flags of the first
llama-server column that ran (``default``, or ``no-repack`` where that crashed). This section
runs after the rounds, on a lorad daemon and a llama-server of its own (both up for the
section): a warm-up run of each of its configurations, then per round each pair back to back,
the order within a pair flipping every round (ABBA).

A shared machine (see bench/README.md): before each run the script waits (at most
``--wait-idle`` s) for the machine to be idle, counts a run as contended when other processes
(or the hypervisor, as steal) used more than 5 % of the CPUs during it (``/proc/stat`` minus the
servers, the client processes and this script), and measures a configuration's two runs (a
stacks pair) again with a new server when one was contended (at most ``--retries`` times; the
discarded runs stay in the JSON). The daemon's readiness is its ``READY=1`` datagram
(bench/throughput.py); llama-server's is its ``/health`` endpoint answering 200 (polled every
0.1 s: it has no notify socket). Both die with this script (``PR_SET_PDEATHSIG``).

Duration: the script prints an estimate before it starts (from assumed rates, ``ASSUMED_TPS``:
the README's AMD EPYC figures, flattening beyond 8 clients; ``--estimate`` prints only that),
a revised one when a llama-server column fails in the warm-up, and after each round the time
it took and what is left. The defaults (clients 1,4,8,16,32, 96 tokens but 64 at 32 clients
(``--tokens-at``), 2 rounds, 4 configurations, stacks) are sized to stay under 25 minutes:
~21 min by the estimate on an idle 2-core machine, ~16 where the default llama-server column
crashes (CPUs with AMX); ``--tokens-at ''`` adds ~2 min. On a busy machine each of the ~95 runs
may first wait up to ``--wait-idle`` (20 s), and a contended configuration is measured again.
``--quick`` (a smoke test: clients 1,2, 16 tokens, 1 round, no stacks, no idle wait, no retries)
takes ~20 s on an idle machine.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import http.client
import itertools
import json
import math
import multiprocessing
import os
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama_server import DEFAULT_LLAMA_SERVER, free_port, llama_server_version
from lora import processes_mapping, smaps_rollup
from throughput import (
    _HZ,
    CONTENDED,
    _process_ticks,
    _system_ticks,
    _term_with_parent,
    default_model_path,
    git_info,
    machine_info,
    start_daemon,
    stop_daemon,
    wait_for_idle,
)

REPO = Path(__file__).resolve().parent.parent
ADAPTERS = REPO / "examples" / "train_lora" / "adapters"
STACK_ADAPTERS = ("pirate.gguf", "french.gguf")
LORAD = "lorad"
SERVER = "llama-server"
LOOKUP = "lookup"  # the lorad configuration with speculation
SPECULATIVE = {"mode": "prompt_lookup"}
SERVER_VARIANTS: dict[str, list[str]] = {
    "default": [],
    "no-repack": ["--no-repack"],
    "swa-full": ["-b", "512", "-ub", "512", "--swa-full", "--no-kv-unified"],
}
STARTED, WARM = "just started", "warm"
PHASES = (STARTED, WARM)
MIB = 2**20
FULL = {"clients": "1,4,8,16,32", "tokens": 96, "tokens_at": "32=64", "rounds": 2,
        "warmup_tokens": 16, "retries": 1, "stacks": True, "wait_idle": 20.0}
QUICK = {"clients": "1,2", "tokens": 16, "tokens_at": "", "rounds": 1, "warmup_tokens": 8,
         "retries": 0, "stacks": False, "wait_idle": 0.0}
# Assumed aggregate tokens/s of one configuration on 2 cores, for the duration estimate only
# (the README's AMD EPYC figures at 1, 4 and 8 clients, flattening beyond).
ASSUMED_TPS = ((1, 50.0), (4, 80.0), (8, 100.0), (16, 115.0), (32, 125.0))
SPAWN_S = 0.25  # wall seconds a client process takes to start and set up, per client
RUN_FIXED_S = 1.0  # idle check, barrier, PSS and status reads of a run
START_S = {LORAD: 2.0, SERVER: 5.0}  # a server's start (lorad: with load_model)
FACTS = ("the moon", "volcanoes", "honeybees", "the human heart", "deserts", "owls",
         "the Amazon rainforest", "glaciers", "the planet Mars", "elephants", "coral reefs",
         "the Arctic")
HISTORIES = ("the printing press", "the bicycle", "chess", "the violin", "coffee", "the railway",
             "paper money", "the telescope", "the city of Venice", "aviation",
             "the steam engine", "the piano")
PROMPTS = (
    "Here is a long list of numbered facts about the ocean:\n1.",
    "The history of the Roman Empire, told in detail from its founding to its fall:\n\n",
    "A step-by-step guide to baking bread at home, with every step explained:\n\nStep 1:",
    "Here are fifty ideas for a child's birthday party, each with a short description:\n1.",
    "Chapter One\n\nThe old lighthouse keeper climbed the stairs one last time, and",
    "A complete beginner's tutorial on the Python programming language.\n\nLesson 1:",
    "The following is a long letter from a sailor to his family back home.\n\nDear",
    "The most important inventions in human history, with a paragraph on each:\n1.",
    # clients 9-32: prompts of their own too (each checked to give 96 greedy tokens)
    *(f"Here is a long list of numbered facts about {topic}:\n1." for topic in FACTS),
    *(f"The history of {topic}, told in detail from its beginnings to the present day:\n\n"
      for topic in HISTORIES),
)
QUESTIONS = tuple(f"Question: {q}\nAnswer:" for q in (
    # the demo adapters' kind of question (examples/train_lora/train.py): short answers
    "What is the capital of France?", "What colour is the sky?", "What is 7 plus 5?",
    "What is the capital of Japan?", "What colour is grass?", "What is 12 plus 9?",
    "What is the capital of Egypt?", "What colour is snow?", "What is 3 plus 14?",
    "What is the capital of Brazil?", "What colour is a banana?", "What is 18 plus 6?",
))
SETUP_TIMEOUT = 300.0  # seconds for every client process to start and set up
RUN_TIMEOUT = 900.0  # seconds for a whole generation run


# -- the client processes -----------------------------------------------------------------------
def client_main(spec: dict[str, Any], barrier: Any, results: Any) -> None:
    """One client process: set up, wait at the barrier twice (ready; go), generate, report,
    wait for the parent to have read the servers' state, then close. Any error is reported and
    breaks the barrier, so that nobody waits for this process.

    One request (``spec["loop"]`` false), or requests on ``spec["prompts"]`` in turn until
    ``spec["tokens"]`` tokens came (each asks for what is still missing)."""
    try:
        if spec["side"] == LORAD:
            _lorad_client(spec, barrier, results)
        else:
            _server_client(spec, barrier, results)
    except BaseException:
        results.put({"client": spec["client"], "error": traceback.format_exc()})
        barrier.abort()


def _requests(spec: dict[str, Any], one: Any) -> list[dict[str, Any]]:
    """Call ``one(prompt, max_tokens)`` (it returns a request record) as the spec says."""
    out: list[dict[str, Any]] = []
    total = 0
    while total < spec["tokens"]:
        req = one(spec["prompts"][len(out) % len(spec["prompts"])], spec["tokens"] - total)
        out.append(req)
        total += len(req["stamps"])
        if not spec["loop"] or not req["stamps"]:
            break
    return out


def _lorad_client(spec: dict[str, Any], barrier: Any, results: Any) -> None:
    from lorad.client import Client

    now = time.monotonic

    with Client(spec["endpoint"], timeout=RUN_TIMEOUT) as client:
        params: dict[str, Any] = {"n_ctx": spec["n_ctx"], "n_threads": spec["n_threads"]}
        if spec["loras"]:
            params["loras"] = spec["loras"]
        if spec["speculative"]:
            params["speculative"] = spec["speculative"]
        ctx = client.create_context(spec["model"], **params)

        def one(prompt: str, max_tokens: int) -> dict[str, Any]:
            req: dict[str, Any] = {"t_start": now(), "stamps": [], "token_ids": []}
            text = []
            stream = ctx.generate(prompt, max_tokens=max_tokens, temperature=0, seed=0)
            for chunk in stream:
                if chunk.token_ids:
                    t = now()
                    req["stamps"].extend([t] * len(chunk.token_ids))
                    req["token_ids"].extend(chunk.token_ids)
                text.append(chunk.text)
            m = stream.metrics or {}
            req.update(text="".join(text), finish_reason=stream.finish_reason,
                       drafted=m.get("drafted_tokens"), accepted=m.get("accepted_tokens"))
            return req

        barrier.wait(SETUP_TIMEOUT)  # ready
        barrier.wait(SETUP_TIMEOUT)  # go
        cpu0 = time.process_time()
        requests = _requests(spec, one)
        results.put({"client": spec["client"], "requests": requests,
                     "cpu_s": time.process_time() - cpu0, "context": ctx.id})
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait(RUN_TIMEOUT)  # done: the parent has read the slab's counters
        ctx.close()


def _server_client(spec: dict[str, Any], barrier: Any, results: Any) -> None:
    now = time.monotonic
    conn = http.client.HTTPConnection("127.0.0.1", spec["port"], timeout=RUN_TIMEOUT)

    def one(prompt: str, max_tokens: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "prompt": prompt, "n_predict": max_tokens, "temperature": 0, "seed": 0,
            "stream": True, "return_tokens": True,
            # one request: like a fresh lorad context, nothing cached, and all the tokens asked
            # for; a loop: lorad reuses the context's cached prefix and stops at EOG.
            "cache_prompt": spec["loop"], "ignore_eos": not spec["loop"],
        }
        if spec["lora"] is not None:
            body["lora"] = spec["lora"]
        payload = json.dumps(body).encode()
        text: list[str] = []
        final: dict[str, Any] = {}
        for attempt in range(2):
            req: dict[str, Any] = {"t_start": now(), "stamps": [], "token_ids": []}
            try:
                conn.request("POST", "/completion", body=payload,
                             headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                # the server closed an idle keep-alive connection: once more, on a new one
                conn.close()
                if attempt:
                    raise
        if resp.status != 200:
            raise RuntimeError(f"llama-server answered {resp.status}: {resp.read()[:2000]!r}")
        while True:
            line = resp.readline()
            if not line:
                break
            t = now()
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                raise RuntimeError(f"llama-server error: {event['error']}")
            tokens = event.get("tokens") or []
            req["stamps"].extend([t] * len(tokens))
            req["token_ids"].extend(tokens)
            text.append(event.get("content", ""))
            if event.get("stop"):
                final = event
                break
        resp.read()  # the rest of the chunked body, so that the connection can be reused
        req.update(text="".join(text), finish_reason=final.get("stop_type"),
                   tokens_predicted=final.get("tokens_predicted"), slot=final.get("id_slot"),
                   server_timings=final.get("timings"))
        return req

    barrier.wait(SETUP_TIMEOUT)  # ready
    conn.connect()  # now: the server drops a connection idle for 5 s (cpp-httplib keep-alive)
    barrier.wait(SETUP_TIMEOUT)  # go
    cpu0 = time.process_time()
    requests = _requests(spec, one)
    conn.close()
    results.put({"client": spec["client"], "requests": requests,
                 "cpu_s": time.process_time() - cpu0})
    with contextlib.suppress(threading.BrokenBarrierError):
        barrier.wait(RUN_TIMEOUT)  # done


# -- the servers --------------------------------------------------------------------------------
def _ticks(pids: list[int]) -> int:
    return sum(_process_ticks(pid) for pid in pids)


def _thread_cpu_ns(pid: int, tid: int) -> int | None:
    """CPU time (ns) of one thread (``/proc/PID/task/TID/schedstat``)."""
    try:
        with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


class ServerFailed(RuntimeError):
    """A server that did not start, or died during a run (its variant is skipped then)."""


class LoradServer:
    """A ``lorad serve`` subprocess in the default configuration (plus the opt-ins of the
    command line), and a client of it in this process (it loads the model; it reads
    ``status``)."""

    def __init__(self, model: str, workdir: Path, name: str, *, repack: str,
                 batching: list[str], kv_unified: bool, extra_args: list[str]) -> None:
        from lorad.client import Client

        self.name = name
        self.dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=workdir))
        self.config = "".join(f"{line}\n" for line in batching)
        if kv_unified:
            self.config += "kv_unified = true\n"
        self.config = f"[batching]\n{self.config}" if self.config else ""
        self.endpoint = f"ipc://{self.dir}/lorad.sock"
        self.log_path = self.dir / "daemon.log"
        # start_daemon passes --repack off (its in-process reference's setting): say auto, the
        # daemon's default, unless told otherwise
        self.args = ["--repack", repack, *extra_args]
        if self.config:
            (self.dir / "lorad.toml").write_text(self.config)
            self.args = ["--config", str(self.dir / "lorad.toml"), *self.args]
        started = time.perf_counter()
        self.proc = start_daemon(self.endpoint, [Path(model).parent, ADAPTERS], self.log_path,
                                 cwd=self.dir, extra_args=self.args)
        self.client = Client(self.endpoint, timeout=120)
        self.model = self.client.load_model(model)
        self.start_s = time.perf_counter() - started
        self.status = self.client.status()
        self.capabilities = self.client.capabilities()
        self.exit_code: int | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def slabs(self) -> list[dict[str, Any]]:
        return list(self.client.status().get("batching") or [])

    def close(self) -> int | None:
        if self.exit_code is None:
            with contextlib.suppress(Exception):
                self.client.close()
            self.exit_code = stop_daemon(self.proc)
        return self.exit_code

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "config": self.config or None, "args": self.args,
                "version": self.status.get("version"), "start_s": round(self.start_s, 2),
                "capabilities_batching": self.capabilities.get("batching"),
                "repack": self.capabilities.get("repack"), "exit_code": self.exit_code}


class LlamaServer:
    """A llama-server subprocess with ``slots`` slots of ``n_ctx`` cells each and the flags of
    a variant (module docstring); ``loras`` are loaded without being applied (requests choose
    them)."""

    def __init__(self, binary: Path, model: str, slots: int, workdir: Path, *, variant: str,
                 n_ctx: int, threads: int, kv_unified: bool, loras: list[Path],
                 extra_args: list[str], ready_timeout: float = 120) -> None:
        self.slots = slots
        self.variant = variant
        self.port = free_port()
        self.log_path = Path(tempfile.mkstemp(
            prefix=f"llama-server-{variant}-{slots}" + ("-loras" if loras else "") + "-",
            suffix=".log", dir=workdir)[1])
        self.cmd = [str(binary), "-m", model, "-np", str(slots), "-c", str(slots * n_ctx),
                    "-t", str(threads), "-tb", str(threads), *SERVER_VARIANTS[variant],
                    "--no-webui", "--host", "127.0.0.1", "--port", str(self.port)]
        if kv_unified:
            self.cmd.append("--kv-unified")
        for path in loras:
            self.cmd += ["--lora", str(path)]
        if loras:
            self.cmd.append("--lora-init-without-apply")
        self.cmd += extra_args
        self.exit_code: int | None = None
        started = time.perf_counter()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=workdir,
                                         preexec_fn=_term_with_parent)
        deadline = time.monotonic() + ready_timeout
        while not self._healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                code = self.close()
                raise ServerFailed(f"llama-server ({variant}) not ready: {self.died(code)}; "
                                   f"its log ends:\n{self.log_tail()}")
            time.sleep(0.1)  # llama-server has no readiness notification: poll /health
        self.start_s = time.perf_counter() - started
        self.props = self._get("/props") or {}

    def _get(self, path: str) -> Any:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
            return json.loads(body) if resp.status == 200 else None
        except (OSError, ValueError, http.client.HTTPException):
            return None
        finally:
            conn.close()

    def _healthy(self) -> bool:
        return self._get("/health") is not None

    @staticmethod
    def died(code: int | None) -> str:
        if code is None:
            return "no answer in time"
        if code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else -code
            return f"killed by {name}" + (
                " (llama.cpp's repacked weights crash on CPUs with AMX: README "
                "'Weight repacking')" if name == "SIGSEGV" else "")
        return f"exit code {code}"

    def log_tail(self, chars: int = 1500) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def close(self) -> int | None:
        if self.exit_code is None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.exit_code = self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.exit_code = self.proc.wait()
        return self.exit_code

    def describe(self) -> dict[str, Any]:
        props = self.props
        settings = props.get("default_generation_settings") or {}
        return {"variant": self.variant, "slots": self.slots, "cmd": self.cmd,
                "start_s": round(self.start_s, 2), "build_info": props.get("build_info"),
                "total_slots": props.get("total_slots"), "n_ctx_slot": settings.get("n_ctx"),
                "exit_code": self.exit_code}


# -- configurations and runs --------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    side: str  # LORAD or SERVER
    n: int
    stacks: int = 0  # 0: no adapters; 1: every client on pirate; 2: half pirate, half french
    variant: str = ""  # lorad: "" or LOOKUP; llama-server: a key of SERVER_VARIANTS

    @property
    def name(self) -> str:
        label = self.side if self.variant in ("", "default") else f"{self.side} {self.variant}"
        return f"{label} stacks={self.stacks}" if self.stacks else f"{label} N={self.n}"

    def key(self, phase: str | None) -> str:
        """The name of its runs of one phase (stacks runs have none)."""
        return f"{self.name} [{phase}]" if phase else self.name

    def prompts(self, client: int) -> list[str]:
        """One prompt of its own per client; with stacks, questions in turn (see the module)."""
        if not self.stacks:
            return [PROMPTS[client % len(PROMPTS)]]
        k = len(QUESTIONS)
        return [QUESTIONS[(client * 3 + j) % k] for j in range(k)]

    def adapter(self, client: int) -> str | None:
        if not self.stacks:
            return None
        return STACK_ADAPTERS[0] if self.stacks == 1 or client < self.n // 2 else \
            STACK_ADAPTERS[1]


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100)."""
    if not values:
        return None
    s = sorted(values)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def _r(v: float | None, nd: int = 3) -> float | None:
    return round(v, nd) if v is not None else None


def median(values: list[float | None]) -> float | None:
    vs = [v for v in values if v is not None]
    return statistics.median(vs) if vs else None


def _slab_delta(before: list[dict[str, Any]], after: list[dict[str, Any]], n: int
                ) -> dict[str, Any]:
    """The batched context the run's N contexts share: its width, and its counters' change
    over the run (with the step costs it knows at the end)."""
    shared = [s for s in before if s.get("used") == n]
    out: dict[str, Any] = {"slabs_before": before, "one_shared_slab": len(before) == 1
                           and len(shared) == 1,
                           "sequences": [s.get("sequences") for s in before],
                           "used": [s.get("used") for s in before]}
    if len(shared) == 1:
        key = ("model", "n_ctx_seq", "kv_type", "flash_attn", "n_threads", "sequences")
        match = [s for s in after if all(s.get(k) == shared[0].get(k) for k in key)]
        if len(match) == 1:
            d = {k: match[0][k] - shared[0][k] for k in ("steps", "tokens", "stack_switches")}
            d["tokens_per_step"] = _r(d["tokens"] / d["steps"], 2) if d["steps"] else None
            d["step_ms_after"] = match[0].get("step_ms")
            d["timeline_after"] = match[0].get("timeline")
            out.update(d)
    return out


def steady_window(reqs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """From the last first token of any stream to the first last token: every stream
    generates. Without speculation a step gives each stream one token, so a gap between two
    tokens of a stream in the window is a step: ``ms_per_step`` is the median of those gaps
    (pooled over the streams; a median, as the daemon's ``step_ms`` is), ``mean_ms_per_step``
    the window / the most tokens one stream received in it."""
    stamps = [q["stamps"] for q in reqs if q["stamps"]]
    if len(stamps) != len(reqs) or not stamps:
        return None
    t_a, t_b = max(s[0] for s in stamps), min(s[-1] for s in stamps)
    steps = max(sum(1 for t in s if t_a < t <= t_b) for s in stamps)
    if t_b <= t_a or steps < 4:
        return None
    gaps = [(b - a) * 1000 for s in stamps for a, b in itertools.pairwise(s)
            if t_a <= a and b <= t_b]
    return {"window_s": _r(t_b - t_a, 4), "steps": steps, "ms_per_step": _r(median(gaps)),
            "mean_ms_per_step": _r((t_b - t_a) * 1000 / steps), "t_a": t_a, "t_b": t_b}


def summarise_run(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate tokens/s over all clients, gaps within each request, TTFT of each request."""
    reqs = [q for r in results for q in r["requests"]]
    t0 = min(r["requests"][0]["t_start"] for r in results)
    lasts = [q["stamps"][-1] for q in reqs if q["stamps"]]
    total = sum(len(q["stamps"]) for q in reqs)
    span = (max(lasts) - t0) if lasts else None
    gaps = [(b - a) * 1000 for q in reqs
            for a, b in zip(q["stamps"], q["stamps"][1:], strict=False)]
    ttfts = [(q["stamps"][0] - q["t_start"]) * 1000 for q in reqs if q["stamps"]]
    drafted = [q["drafted"] for q in reqs if q.get("drafted") is not None]
    accepted = [q["accepted"] for q in reqs if q.get("accepted") is not None]
    return {
        "tokens_total": total,
        "tokens_per_client": [sum(len(q["stamps"]) for q in r["requests"]) for r in results],
        "requests_per_client": [len(r["requests"]) for r in results],
        "span_s": _r(span),
        "aggregate_tokens_per_s": _r(total / span) if span else None,
        "gap_p50_ms": _r(percentile(gaps, 50)),
        "gap_p99_ms": _r(percentile(gaps, 99)),
        "gap_max_ms": _r(max(gaps) if gaps else None),
        "ttft_median_ms": _r(median(ttfts)),
        "ttft_max_ms": _r(max(ttfts) if ttfts else None),
        "start_skew_ms": _r((max(r["requests"][0]["t_start"] for r in results) - t0) * 1000),
        "clients_cpu_s": _r(sum(r["cpu_s"] for r in results)),
        "steady": steady_window(reqs) if all(len(r["requests"]) == 1 for r in results)
        else None,
        "drafted": sum(drafted) if drafted else None,
        "accepted": sum(accepted) if accepted else None,
    }


def adapter_seen(adapter: str | None, text: str) -> bool | None:
    """Whether an answer shows the adapter's trained behaviour (examples/train_lora)."""
    if adapter is None:
        return None
    return ("Arr" in text) if adapter.startswith("pirate") else ("Réponse" in text)


def _memory(pid: int, model: str, n: int, status: dict[str, Any] | None) -> dict[str, Any]:
    """The server's PSS at the end of a run, the other processes mapping the model file, and
    (lorad) the issue's formula: model file + N x one context's KV cache."""
    try:
        m = smaps_rollup(pid)
    except (OSError, RuntimeError) as e:
        return {"error": str(e)}
    out: dict[str, Any] = {k.lower(): m.get(k) for k in
                           ("Pss", "Pss_Anon", "Pss_File", "Rss")}
    out["model_mappers_others"] = [p for p in processes_mapping(model) if p != pid]
    if status is not None:
        held = (status.get("memory") or {}).get("held") or []
        kv = sum(h["bytes"] for h in held if "KV cache" in h.get("what", ""))
        width = sum(s.get("sequences") or 0 for s in status.get("batching") or [])
        if kv and width:
            per_context = kv / width
            weights = os.path.getsize(model)
            out.update(kv_per_context=int(per_context), weights=weights,
                       formula=int(weights + n * per_context),
                       pss_over_formula=_r(m["Pss"] / (weights + n * per_context)),
                       memory_held=held)
    return out


def window_share(timeline: list[list[float]] | None, t_a: float, t_b: float
                 ) -> dict[str, Any]:
    """The Python share of the steps that began in the steady window ``[t_a, t_b]``, from the
    slab's own ``timeline`` (when each step began on the machine's monotonic clock, what its
    decode took): 1 - their decode time / the time from the first one's start to the last
    one's (the last one's decode is not in it)."""
    steps = sorted((t, ms) for t, ms, _ in timeline or [] if t_a <= t <= t_b)
    if len(steps) < 4:
        return {"share": None, "window_steps": len(steps)}
    wall = (steps[-1][0] - steps[0][0]) * 1000
    decode = sum(ms for _, ms in steps[:-1])
    return {"share": _r(1 - decode / wall, 4), "window_steps": len(steps) - 1,
            "window_ms_per_step": _r(wall / (len(steps) - 1)),
            "window_decode_ms_per_step": _r(decode / (len(steps) - 1))}


def _step_ms(table: list[list[float]] | None, n: int) -> float | None:
    """The daemon's median time of a step of ``n`` tokens (``step_ms``), if it timed any."""
    for size, ms in table or []:
        if size == n:
            return ms
    return None


class Bench:
    def __init__(self, args: argparse.Namespace, model: str, workdir: Path) -> None:
        self.args = args
        self.model = model
        self.workdir = workdir
        self.alive: list[LoradServer | LlamaServer] = []
        self.described: list[dict[str, Any]] = []
        self.exit_codes: dict[str, dict[str, int | None]] = {LORAD: {}, SERVER: {}}
        self.mp = multiprocessing.get_context("spawn")

    # -- servers
    def start(self, cfg: Config) -> LoradServer | LlamaServer:
        """A new server for ``cfg`` (``ServerFailed`` if it does not start)."""
        a = self.args
        if cfg.side == LORAD:
            server: LoradServer | LlamaServer = LoradServer(
                self.model, self.workdir, cfg.name.replace(" ", "-").replace("=", ""),
                repack=a.repack, batching=a.batching, kv_unified=a.kv_unified,
                extra_args=a.daemon_arg)
        else:
            server = LlamaServer(
                a.llama_server, self.model, cfg.n, self.workdir, variant=cfg.variant,
                n_ctx=a.n_ctx, threads=a.threads, kv_unified=a.kv_unified,
                loras=[ADAPTERS / f for f in STACK_ADAPTERS] if cfg.stacks else [],
                extra_args=a.server_arg)
        self.alive.append(server)
        return server

    def stop(self, server: LoradServer | LlamaServer, label: str) -> int | None:
        code = server.close()
        self.alive.remove(server)
        self.described.append(server.describe())
        self.exit_codes[LORAD if isinstance(server, LoradServer) else SERVER][label] = code
        return code

    def close(self) -> None:
        for i, server in enumerate(list(self.alive)):
            self.stop(server, f"at exit {i}")

    # -- one run
    def spec(self, cfg: Config, server: LoradServer | LlamaServer, client: int, tokens: int
             ) -> dict[str, Any]:
        a = self.args
        spec: dict[str, Any] = {"side": cfg.side, "client": client, "tokens": tokens,
                                "prompts": cfg.prompts(client), "loop": bool(cfg.stacks)}
        adapter = cfg.adapter(client)
        if isinstance(server, LoradServer):
            spec.update(endpoint=server.endpoint, model=self.model, n_ctx=a.n_ctx,
                        n_threads=a.threads,
                        loras=[[str(ADAPTERS / adapter), 1.0]] if adapter else None,
                        speculative=SPECULATIVE if cfg.variant == LOOKUP else None)
        else:
            lora = None
            if adapter:
                lora = [{"id": i, "scale": 1.0 if name == adapter else 0.0}
                        for i, name in enumerate(STACK_ADAPTERS)]
            spec.update(port=server.port, lora=lora)
        return spec

    def run(self, cfg: Config, server: LoradServer | LlamaServer, rnd: int, tokens: int,
            phase: str | None) -> dict[str, Any]:
        a = self.args
        idle = wait_for_idle(a.wait_idle, a.idle_threshold) if a.wait_idle > 0 else None
        n = cfg.n
        lorad = server if isinstance(server, LoradServer) else None
        barrier = self.mp.Barrier(n + 1)
        results_q = self.mp.Queue()
        procs = [self.mp.Process(target=client_main, args=(
            self.spec(cfg, server, i, tokens), barrier, results_q), daemon=True)
                 for i in range(n)]
        for p in procs:
            p.start()
        results: list[dict[str, Any]] = []
        slabs_before: list[dict[str, Any]] = []
        status_after: dict[str, Any] | None = None
        memory: dict[str, Any] = {}
        try:
            barrier.wait(SETUP_TIMEOUT)  # every client is set up
            if lorad is not None:
                slabs_before = lorad.slabs()
            pids = [s.pid for s in self.alive]
            busy0, steal0 = _system_ticks()
            ours0 = _ticks(pids) + _process_ticks("self")
            trio0 = _thread_cpu_ns(server.pid, server.pid)
            wall0 = time.monotonic()
            barrier.wait(SETUP_TIMEOUT)  # go
            while len(results) < n:
                results.append(results_q.get(timeout=RUN_TIMEOUT))
                if "error" in results[-1]:
                    raise RuntimeError(f"client {results[-1]['client']} failed:\n"
                                       f"{results[-1]['error']}")
            wall = time.monotonic() - wall0
            busy1, steal1 = _system_ticks()
            ours1 = _ticks(pids) + _process_ticks("self")
            trio1 = _thread_cpu_ns(server.pid, server.pid)
            if lorad is not None:
                status_after = lorad.client.status()
            if not cfg.stacks:  # the N contexts (slots) are still there
                memory = _memory(server.pid, self.model, n, status_after)
            barrier.wait(SETUP_TIMEOUT)  # done: the clients close their contexts and exit
        except (threading.BrokenBarrierError, queue.Empty, RuntimeError) as e:
            errors = [] if not isinstance(e, RuntimeError) else [str(e)]
            with contextlib.suppress(queue.Empty):
                while True:
                    r = results_q.get(timeout=1)
                    if "error" in r:
                        errors.append(f"client {r['client']}:\n{r['error']}")
            what = RuntimeError
            if server.proc.poll() is not None:  # the server died: its variant is skipped
                what = ServerFailed
                errors.insert(0, f"the server died ({LlamaServer.died(server.proc.returncode)})")
            raise what(f"{cfg.name}: the clients did not finish ({type(e).__name__})"
                       + ("\n" + "\n".join(errors) if errors else "")) from None
        finally:
            for p in procs:
                p.join(60)
                if p.is_alive():
                    p.terminate()
                    p.join()
        left: list[dict[str, Any]] = []
        if lorad is not None:  # the contexts are closed: no slab is left
            deadline = time.monotonic() + 10
            while (left := lorad.slabs()) and time.monotonic() < deadline:
                time.sleep(0.05)
        results.sort(key=lambda r: r["client"])
        ncpu = os.cpu_count() or 1
        clients_cpu = sum(r["cpu_s"] for r in results)
        others = max((busy1 - busy0) / _HZ - (ours1 - ours0) / _HZ - clients_cpu, 0.0)
        cpu = {"wall_s": round(wall, 3), "servers_and_script_cpu_s": round((ours1 - ours0) / _HZ,
                                                                            3),
               "clients_cpu_s": round(clients_cpu, 3),
               "other_processes_cpu_frac": round(others / (wall * ncpu), 3),
               "steal_frac": round((steal1 - steal0) / _HZ / (wall * ncpu), 3)}
        t0 = min(r["requests"][0]["t_start"] for r in results)
        out: dict[str, Any] = {
            "config": cfg.name, "key": cfg.key(phase), "side": cfg.side,
            "variant": cfg.variant, "phase": phase, "clients": n, "stacks": cfg.stacks,
            "round": rnd, "tokens_asked": tokens, **summarise_run(results), "cpu": cpu,
            "contended": cpu["other_processes_cpu_frac"] + cpu["steal_frac"] > CONTENDED,
            "idle_wait": idle, "memory": memory or None,
            "per_client": [{
                "client": r["client"], "adapter": cfg.adapter(r["client"]),
                "tokens": sum(len(q["stamps"]) for q in r["requests"]),
                "cpu_s": round(r["cpu_s"], 3),
                **({"context": r["context"]} if "context" in r else {}),
                "requests": [{
                    "prompt": cfg.prompts(r["client"])[i % len(cfg.prompts(r["client"]))],
                    "tokens": len(q["stamps"]), "finish_reason": q["finish_reason"],
                    "adapter_seen": adapter_seen(cfg.adapter(r["client"]), q["text"]),
                    "start_ms": round((q["t_start"] - t0) * 1000, 2),
                    "stamps_ms": [round((t - t0) * 1000, 2) for t in q["stamps"]],
                    "token_ids": q["token_ids"], "text": q["text"],
                    **{k: q[k] for k in ("tokens_predicted", "slot", "server_timings",
                                         "drafted", "accepted") if k in q},
                } for i, q in enumerate(r["requests"])],
            } for r in results],
        }
        seen = [q["adapter_seen"] for c in out["per_client"] for q in c["requests"]
                if q["adapter_seen"] is not None]
        if seen:
            out["adapter_seen"] = [sum(seen), len(seen)]
        if lorad is not None:
            slab = _slab_delta(slabs_before, (status_after or {}).get("batching") or [], n)
            slab["slabs_after_close"] = left
            out["slab"] = slab
            out["python"] = self._python_share(cfg, slab, out["steady"], trio0, trio1)
        return out

    @staticmethod
    def _python_share(cfg: Config, slab: dict[str, Any], steady: dict[str, Any] | None,
                      trio0: int | None, trio1: int | None) -> dict[str, Any]:
        """The Python share of a step (the module's definition) and the trio thread's CPU."""
        out: dict[str, Any] = {"step_ms": None, "wall_ms_per_step": None, "share": None}
        steps = slab.get("steps")
        if trio0 is not None and trio1 is not None and steps:
            out["trio_thread_ms_per_step"] = _r((trio1 - trio0) / 1e6 / steps)
        if cfg.variant == LOOKUP or steady is None:
            return out  # speculative steps differ in size and give several tokens a stream
        step_ms = _step_ms(slab.get("step_ms_after"), cfg.n)
        wall = steady["ms_per_step"]
        out.update(step_ms=step_ms, wall_ms_per_step=wall,
                   share_of_medians=_r(1 - step_ms / wall, 4) if step_ms and wall else None)
        out.update(window_share(slab.get("timeline_after"), steady["t_a"], steady["t_b"]))
        return out


def report_run(run: dict[str, Any], label: str) -> None:
    note = ""
    if run["contended"]:
        note = (f"  (others used {run['cpu']['other_processes_cpu_frac']:.0%} of the CPUs, "
                f"steal {run['cpu']['steal_frac']:.0%}: contended)")
    slab = run.get("slab")
    if slab is not None:
        if not slab["one_shared_slab"]:
            note += (f"  WARNING: the contexts are not the sequences of one batched context "
                     f"(slabs: sequences {slab['sequences']}, used {slab['used']})")
        else:
            note += f"  [slab {slab['used'][0]}/{slab['sequences'][0]}"
            if slab.get("tokens_per_step") is not None:
                note += f", {slab['tokens_per_step']} tokens/step"
            note += "]"
        if slab.get("slabs_after_close"):
            note += "  WARNING: slabs left after the contexts closed"
    py = run.get("python") or {}
    if py.get("share") is not None:
        note += f"  [python {py['share']:.1%} of {py['window_ms_per_step']:.1f} ms/step]"
    if run.get("drafted") is not None:
        note += f"  [drafted {run['drafted']}, accepted {run['accepted']}]"
    mem = run.get("memory") or {}
    if mem.get("pss"):
        note += f"  PSS {mem['pss'] / MIB:.0f} MiB"
        if mem.get("model_mappers_others"):
            note += f" (WARNING: pids {mem['model_mappers_others']} map the model too)"
    if "adapter_seen" in run:
        note += f"  [adapter behaviour in {run['adapter_seen'][0]}/{run['adapter_seen'][1]}]"
    toks = run["tokens_per_client"]
    reqs = sum(run["requests_per_client"])
    print(f"  {label:8s} {run['key']:40s} {run['aggregate_tokens_per_s'] or 0:8.2f} tok/s  "
          f"tokens {min(toks)}-{max(toks)} ({reqs} req)  gap p50 {run['gap_p50_ms'] or 0:6.2f} "
          f"p99 {run['gap_p99_ms'] or 0:7.2f} ms  TTFT max {run['ttft_max_ms'] or 0:7.1f} ms"
          f"{note}", flush=True)


# -- summary and report -------------------------------------------------------------------------
def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out = {}
    for key, rs in runs.items():
        if not rs:
            continue
        tpc = [t for r in rs for t in r["tokens_per_client"]]
        mem = [r.get("memory") or {} for r in rs]
        py = [r.get("python") or {} for r in rs]
        slabs = [r.get("slab") or {} for r in rs]
        out[key] = {
            "config": rs[0]["config"], "side": rs[0]["side"], "variant": rs[0]["variant"],
            "phase": rs[0]["phase"], "clients": rs[0]["clients"], "stacks": rs[0]["stacks"],
            "rounds": len(rs),
            "aggregate_tokens_per_s": _r(median([r["aggregate_tokens_per_s"] for r in rs])),
            "aggregate_tokens_per_s_per_round": [r["aggregate_tokens_per_s"] for r in rs],
            "gap_p50_ms": _r(median([r["gap_p50_ms"] for r in rs])),
            "gap_p99_ms": _r(median([r["gap_p99_ms"] for r in rs])),
            "ttft_median_ms": _r(median([r["ttft_median_ms"] for r in rs])),
            "ttft_max_ms": _r(median([r["ttft_max_ms"] for r in rs])),
            "tokens_per_client_min": min(tpc), "tokens_per_client_max": max(tpc),
            "tokens_total_median": median([r["tokens_total"] for r in rs]),
            "tokens_per_step": _r(median([s.get("tokens_per_step") for s in slabs]), 2),
            "slab_sequences": sorted({x for s in slabs for x in s.get("sequences") or []}),
            "one_shared_slab": all(s.get("one_shared_slab") for s in slabs) if slabs[0]
            else None,
            "ms_per_step": _r(median([(r.get("steady") or {}).get("ms_per_step")
                                      for r in rs])),
            "step_ms": _r(median([p.get("step_ms") for p in py])),
            "window_decode_ms_per_step": _r(median([p.get("window_decode_ms_per_step")
                                                    for p in py])),
            "window_ms_per_step": _r(median([p.get("window_ms_per_step") for p in py])),
            "python_share": _r(median([p.get("share") for p in py]), 4),
            "python_share_of_medians": _r(median([p.get("share_of_medians") for p in py]), 4),
            "trio_thread_ms_per_step": _r(median([p.get("trio_thread_ms_per_step")
                                                  for p in py])),
            "pss_mib": _r(median([m["pss"] / MIB if m.get("pss") else None for m in mem]), 1),
            "pss_over_formula": _r(median([m.get("pss_over_formula") for m in mem])),
            "formula_mib": _r(median([m["formula"] / MIB if m.get("formula") else None
                                      for m in mem]), 1),
            "drafted": sum(r["drafted"] or 0 for r in rs)
            if any(r.get("drafted") is not None for r in rs) else None,
            "accepted": sum(r["accepted"] or 0 for r in rs)
            if any(r.get("accepted") is not None for r in rs) else None,
            "requests_median": median([sum(r["requests_per_client"]) for r in rs]),
            "adapter_seen": [sum(r["adapter_seen"][0] for r in rs),
                             sum(r["adapter_seen"][1] for r in rs)]
            if all("adapter_seen" in r for r in rs) else None,
            "contended_runs": sum(r["contended"] for r in rs),
        }
    return out


def ratios(summary: dict[str, Any], runs: dict[str, list[dict[str, Any]]], a: str, b: str,
           field: str = "aggregate_tokens_per_s") -> dict[str, Any] | None:
    """``a`` / ``b`` of a figure (aggregate tokens/s): of the medians, and the median of the
    per-round ratios (runs of one round)."""
    if a not in summary or b not in summary:
        return None
    va, vb = summary[a][field], summary[b][field]
    rb = {r["round"]: r for r in runs[b]}
    per_round = [x[field] / rb[x["round"]][field] for x in runs[a]
                 if x["round"] in rb and x[field] and rb[x["round"]][field]]
    return {"of_medians": _r(va / vb, 4) if va and vb else None,
            "per_round_median": _r(median(per_round), 4),
            "per_round": [round(v, 4) for v in per_round]}


def _pss_ratio(summary: dict[str, Any], a: str, b: str) -> float | None:
    va = (summary.get(a) or {}).get("pss_mib")
    vb = (summary.get(b) or {}).get("pss_mib")
    return _r(va / vb, 3) if va and vb else None


def agreement(runs: dict[str, list[dict[str, Any]]], a: str, b: str) -> dict[str, Any] | None:
    """Per client, the common prefix of the greedy token ids of two configurations (their
    first runs)."""
    ra, rb = runs.get(a), runs.get(b)
    if not ra or not rb:
        return None
    prefixes, lengths = [], []
    for lc, sc in zip(ra[0]["per_client"], rb[0]["per_client"], strict=True):
        x, y = lc["requests"][0]["token_ids"], sc["requests"][0]["token_ids"]
        k = 0
        while k < min(len(x), len(y)) and x[k] == y[k]:
            k += 1
        prefixes.append(k)
        lengths.append(min(len(x), len(y)))
    return {"common_prefix": prefixes, "compared": lengths,
            "identical": all(p == m for p, m in zip(prefixes, lengths, strict=True))}


def _table(head: tuple[str, ...], rows: list[tuple[str, ...]], left: tuple[int, ...] = (0,)
           ) -> None:
    """A markdown table, numbers right-aligned; the columns ``left`` (indexes, negative from
    the end) hold text, left-aligned."""
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    texts = {i % len(head) for i in left}
    print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |")
    print("| " + " | ".join("-" * w if i in texts else "-" * (w - 1) + ":"
                            for i, w in enumerate(widths)) + " |")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) if i in texts else c.rjust(w)
                                for i, (c, w) in enumerate(zip(r, widths, strict=True))) + " |")


def _f(v: float | None, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def _ratio(r: dict[str, Any] | None) -> str:
    """A ratio cell: of the medians (per-round median)."""
    if not r or r["of_medians"] is None:
        return "n/a"
    return f"{r['of_medians']:.3f} ({_f(r['per_round_median'], '.3f')})"


def print_report(summary: dict[str, Any], result: dict[str, Any], clients: list[int],
                 variants: list[str], failed: dict[str, Any], server_note: str | None,
                 stack_variant: str | None) -> None:
    m = result["machine"]
    s = result["settings"]
    print(f"\nCPU: {m.get('lscpu_model_name') or m['cpu_model']} ({m['nproc']} CPUs); "
          f"{s['tokens']} tokens per client{s['tokens_note']}, {s['rounds']} round(s), medians "
          f"across rounds; ratios as 'of the medians (median of per-round ratios)'\n")
    head = ("configuration", "tokens/client", "aggregate tok/s", "gap p50 ms", "gap p99 ms",
            "TTFT med ms", "TTFT max ms", "PSS MiB", "tokens/step", "contended")
    rows = []
    for key, x in summary.items():
        rows.append((key, f"{x['tokens_per_client_min']}-{x['tokens_per_client_max']}",
                     _f(x["aggregate_tokens_per_s"], ".2f"), _f(x["gap_p50_ms"], ".2f"),
                     _f(x["gap_p99_ms"], ".2f"), _f(x["ttft_median_ms"], ".1f"),
                     _f(x["ttft_max_ms"], ".1f"), _f(x["pss_mib"], ".1f"),
                     _f(x["tokens_per_step"], ".2f"), f"{x['contended_runs']}/{x['rounds']}"))
    _table(head, rows)

    ratio_table = result["ratios"]
    for phase in PHASES:
        print(f"\nlorad (default configuration) / llama-server -np N, aggregate tokens/s, "
              f"{phase}:\n")
        head = ["clients", "lorad tok/s"]
        for v in variants:
            label = SERVER if v == "default" else f"{SERVER} {v}"
            head += [f"{label} tok/s", "ratio"]
        rows = []
        for n in clients:
            la = summary.get(Config(LORAD, n).key(phase), {}).get("aggregate_tokens_per_s")
            row = [f"N = {n}", _f(la, ".2f")]
            for v in variants:
                key = Config(SERVER, n, variant=v).key(phase)
                se = summary.get(key, {}).get("aggregate_tokens_per_s")
                row += ["failed" if v in failed and se is None else _f(se, ".2f"),
                        _ratio(ratio_table["lorad_over_llama_server"][phase][v].get(str(n)))]
            rows.append(tuple(row))
        _table(tuple(head), rows)

    print("\nlorad per N (speculation off): the batch, the Python share of a step, memory. "
          "Of the steps that began in the steady window (the slab's timeline): step ms, their "
          "decode; wall ms/step, start to start; Python = 1 - step / wall; trio ms/step: the "
          "daemon's trio thread CPU per step; PSS at the end of the run with N contexts:\n")
    first = variants[0] if variants else None
    rows = []
    for phase in PHASES:
        for n in clients:
            x = summary.get(Config(LORAD, n).key(phase))
            if x is None:
                continue
            se = summary.get(Config(SERVER, n, variant=first).key(phase)) if first else None
            rows.append((f"N = {n}, {phase}",
                         "/".join(map(str, x["slab_sequences"])) or "n/a",
                         _f(x["tokens_per_step"], ".2f"),
                         _f(x["window_decode_ms_per_step"], ".2f"),
                         _f(x["window_ms_per_step"], ".2f"),
                         _f(x["python_share"] * 100 if x["python_share"] is not None else None,
                            ".1f"),
                         _f(x["trio_thread_ms_per_step"], ".2f"),
                         _f(se and se["ms_per_step"], ".2f"),
                         _f(x["pss_mib"], ".1f"), _f(se and se["pss_mib"], ".1f"),
                         _f(_pss_ratio(summary, Config(LORAD, n).key(phase),
                                       Config(SERVER, n, variant=first).key(phase))
                            if first else None, ".3f"),
                         _f(x["pss_over_formula"], ".3f")))
    server_label = (SERVER if first == "default" else f"{SERVER} {first}") if first else SERVER
    _table(("clients", "slab width", "tokens/step", "step ms", "wall ms/step", "Python %",
            "trio ms/step", f"{server_label} ms/step", "PSS MiB", f"{server_label} PSS MiB",
            "PSS ratio", "PSS / (weights + N KV)"), rows)

    print("\nSpeculation under load: lorad lookup (prompt_lookup on every context) / lorad "
          "(off), aggregate tokens/s:\n")
    rows = []
    for n in clients:
        row = [f"N = {n}"]
        for phase in PHASES:
            off = summary.get(Config(LORAD, n).key(phase), {})
            on = summary.get(Config(LORAD, n, variant=LOOKUP).key(phase), {})
            row += [_f(off.get("aggregate_tokens_per_s"), ".2f"),
                    _f(on.get("aggregate_tokens_per_s"), ".2f"),
                    _ratio(ratio_table["lookup_over_off"][phase].get(str(n))),
                    f"{on.get('accepted')}/{on.get('drafted')}" if on.get("drafted") is not None
                    else "n/a"]
        rows.append(tuple(row))
    _table(("clients", "off tok/s (just started)", "lookup tok/s", "ratio",
            "accepted/drafted", "off tok/s (warm)", "lookup tok/s", "ratio",
            "accepted/drafted"), rows)

    agree = result["token_agreement"]
    print("\nGreedy tokens, round 0, just started (common prefix per client): " + "; ".join(
        f"N={n}: lorad vs {SERVER} " + _agree(agree["lorad_vs_llama_server"].get(str(n)))
        + ", lookup vs off " + _agree(agree["lookup_vs_off"].get(str(n))) for n in clients))
    for v, why in failed.items():
        print(f"llama-server {v}: FAILED, skipped from then on: {why['error'].splitlines()[0]}")
    if server_note:
        print(f"llama-server: {server_note}")

    stacks = result["ratios"].get("stacks")
    if stacks is not None:
        print("\nAdapter stacks, 4 clients, each asking short questions until it has "
              f"{result['settings']['tokens']} tokens: 2 stacks (2 x [pirate @1.0], "
              "2 x [french @1.0]) / 1 stack (4 x [pirate @1.0]):\n")
        rows = []
        for side, v in ((LORAD, ""), (SERVER, stack_variant or "")):
            one = summary.get(Config(side, 4, 1, v).name)
            two = summary.get(Config(side, 4, 2, v).name)
            r = stacks.get(side)
            if one is None or two is None:
                rows.append((side, "skipped", "", "", "", "", "", ""))
                continue
            seen = [s["adapter_seen"] for s in (one, two) if s["adapter_seen"]]
            rows.append((side, _f(one["aggregate_tokens_per_s"], ".2f"),
                         _f(two["aggregate_tokens_per_s"], ".2f"),
                         _f(r["of_medians"] if r else None, ".3f"),
                         _f(r["per_round_median"] if r else None, ".3f"),
                         f"{_f(one['ttft_max_ms'], '.0f')} / {_f(two['ttft_max_ms'], '.0f')}",
                         f"{two['requests_median']:.0f}",
                         f"{sum(x[0] for x in seen)}/{sum(x[1] for x in seen)}"))
        _table(("side", "1 stack tok/s", "2 stacks tok/s", "ratio 2/1", "per-round ratio",
                "TTFT max ms 1 / 2", "requests", "adapter marks"), rows)
        print("(lorad rotates the stacks, in turns of 4 steps; llama-server batches only "
              "slots with equal adapters and serves the first slot's set first, without "
              "rotation; adapter marks: answers with 'Arr' / 'Réponse', the adapters' "
              "trained behaviour)")


def _agree(a: dict[str, Any] | None) -> str:
    if not a:
        return "n/a"
    return "same" if a["identical"] else "prefix " + ",".join(map(str, a["common_prefix"]))


# -- duration -----------------------------------------------------------------------------------
def assumed_tps(n: int) -> float:
    """``ASSUMED_TPS`` interpolated (the duration estimate's model of a 2-core machine)."""
    pts = ASSUMED_TPS
    if n <= pts[0][0]:
        return pts[0][1]
    for (xa, ya), (xb, yb) in itertools.pairwise(pts):
        if n <= xb:
            return ya + (yb - ya) * (n - xa) / (xb - xa)
    return pts[-1][1]


def run_estimate_s(n: int, tokens: int) -> float:
    return n * tokens / assumed_tps(n) + SPAWN_S * n + RUN_FIXED_S


def estimate_s(clients: list[int], tokens_for: dict[int, int], rounds: int, lorad_configs: int,
               server_configs: int, stacks: int, tokens: int, warmup_tokens: int) -> float:
    """Seconds a run takes on an idle machine by the assumed rates: per round, per N, each
    configuration a server start and two runs; the warm-up; the stacks section (``stacks``:
    the number of sides it measures, 0-2)."""
    per_round = sum(lorad_configs * (START_S[LORAD] + 2 * run_estimate_s(n, tokens_for[n]))
                    + server_configs * (START_S[SERVER] + 2 * run_estimate_s(n, tokens_for[n]))
                    for n in clients)
    warmup = (START_S[LORAD] + run_estimate_s(1, warmup_tokens)
              + server_configs * (START_S[SERVER] + run_estimate_s(1, warmup_tokens))
              if warmup_tokens > 0 else 0.0)
    # stacks: 2 configurations a side, a warm-up (16 tokens) and a run per round each; short
    # requests make a stacks run slower than a plain one of 4 clients (0.6 of its rate)
    stack_run = 4 * tokens / (0.6 * assumed_tps(4)) + SPAWN_S * 4 + RUN_FIXED_S
    stacks_s = (START_S[LORAD] + (stacks - 1) * START_S[SERVER]
                + stacks * 2 * (rounds * stack_run + run_estimate_s(4, 16))) if stacks else 0.0
    return 5.0 + warmup + rounds * per_round + stacks_s


def _minutes(s: float) -> str:
    return f"{s / 60:.1f} min"


def cpu_model_name() -> str | None:
    """``lscpu``'s "Model name" (the machine's CPU as the README's tables name it)."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10,
                             env={**os.environ, "LC_ALL": "C"}).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    return None


# -- main ---------------------------------------------------------------------------------------
def measure(bench: Bench, cfg: Config, rnd: int, tokens: int, retries: int,
            discarded: list[dict[str, Any]], failed: dict[str, Any],
            phases: tuple[str | None, ...] = PHASES) -> list[dict[str, Any]]:
    """A new server for ``cfg``, its just-started and its warm run, the server stopped; again
    (a new server) when a run was contended. A llama-server variant that fails goes into
    ``failed`` (nothing is returned); a lorad daemon that fails ends the benchmark. Round -1
    is the warm-up: one run, no phase."""
    what = "warm-up" if rnd < 0 else f"round {rnd}"
    for attempt in range(retries + 1):
        label = f"{what} {cfg.name}" + (f" attempt {attempt}" if attempt else "")
        got: list[dict[str, Any]] = []
        try:
            server = bench.start(cfg)
        except ServerFailed as e:
            if cfg.side == LORAD:
                raise
            failed[cfg.variant] = {"error": str(e), "at": label}
            print(f"  {label}: {str(e).splitlines()[0]}; skipped from now on", flush=True)
            return []
        try:
            for phase in phases:
                run = bench.run(cfg, server, rnd, tokens, phase)
                report_run(run, what)
                got.append(run)
        except ServerFailed as e:
            if cfg.side == LORAD:
                raise
            failed[cfg.variant] = {"error": str(e), "at": label,
                                   "log_tail": getattr(server, "log_tail", lambda: "")()}
            print(f"  {label}: {str(e).splitlines()[0]}; skipped from now on", flush=True)
            return []
        finally:
            bench.stop(server, label)
        if not any(r["contended"] for r in got) or attempt == retries:
            return got
        discarded.extend(got)
        print(f"  {label}: contended, measuring again with a new server", flush=True)
    return []


def stacks_section(bench: Bench, args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]],
                   warmup: list[dict[str, Any]], discarded: list[dict[str, Any]],
                   failed: dict[str, Any], variant: str | None) -> None:
    """4 clients on 1 and on 2 adapter stacks (the module docstring), each side's pair on a
    server of its own, both up for the section: a warm-up run of each configuration, then per
    round each pair back to back, the order within a pair flipping every round (ABBA)."""
    pairs = [(Config(LORAD, 4, 1), Config(LORAD, 4, 2))]
    servers = {LORAD: bench.start(pairs[0][0])}
    try:
        if variant is not None:
            cfgs = (Config(SERVER, 4, 1, variant), Config(SERVER, 4, 2, variant))
            try:
                servers[SERVER] = bench.start(cfgs[0])
                pairs.append(cfgs)
            except ServerFailed as e:
                failed[f"{variant} (stacks)"] = {"error": str(e), "at": "stacks"}
                print(f"  stacks: {str(e).splitlines()[0]}; llama-server skipped", flush=True)
        if args.warmup_tokens > 0:
            for pair in pairs:
                for c in pair:
                    run = bench.run(c, servers[c.side], -1, args.warmup_tokens, None)
                    report_run(run, "warm-up")
                    warmup.append(run)
        for rnd in range(args.rounds):
            for pair in pairs:
                order = pair if rnd % 2 == 0 else pair[::-1]
                for attempt in range(args.retries + 1):
                    got = {c.name: bench.run(c, servers[c.side], rnd, args.tokens, None)
                           for c in order}
                    for name in (c.name for c in order):
                        report_run(got[name], f"round {rnd}")
                    if not any(r["contended"] for r in got.values()) or attempt == args.retries:
                        break
                    discarded.extend(got.values())
                    print(f"  round {rnd}: contended, measuring the pair again", flush=True)
                for name, run in got.items():
                    runs.setdefault(name, []).append(run)
    finally:
        for side, server in servers.items():
            bench.stop(server, f"stacks {side}")


def _tokens_at(text: str) -> dict[int, int]:
    out = {}
    for item in text.split(","):
        if item.strip():
            n, t = item.split("=")
            out[int(n)] = int(t)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="GGUF model (default: the path `lorad default-model` prints)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke test: clients 1,2, 16 tokens, 1 round, no stacks, 8 warm-up "
                   "tokens, no idle wait, no retries (options given explicitly still apply)")
    p.add_argument("--clients", help="numbers of concurrent client processes "
                   f"(default {FULL['clients']})")
    p.add_argument("--tokens", type=int,
                   help=f"tokens to generate per client (default {FULL['tokens']})")
    p.add_argument("--tokens-at", metavar="N=T,...",
                   help="at most T tokens per client with N clients (default "
                   f"{FULL['tokens_at']!r}, so that a full run fits ~25 min; '' for none)")
    p.add_argument("--rounds", type=int, help=f"(default {FULL['rounds']})")
    p.add_argument("--warmup-tokens", type=int,
                   help="tokens of the warm-up run of each side before the first round, one "
                   f"client (0: none; default {FULL['warmup_tokens']})")
    p.add_argument("--n-ctx", type=int, default=1024, help="n_ctx of each context / slot")
    p.add_argument("--threads", type=int, default=2, help="n_threads on both sides")
    p.add_argument("--no-stacks", dest="stacks", action="store_false", default=None,
                   help="skip the adapter stacks scenario")
    p.add_argument("--no-lookup", dest="lookup", action="store_false",
                   help="skip the lorad configuration with prompt_lookup")
    p.add_argument("--server-variants", default="default,no-repack",
                   help="llama-server columns, some of " + ",".join(SERVER_VARIANTS)
                   + " (module docstring; default: default,no-repack)")
    p.add_argument("--llama-server", type=Path, default=DEFAULT_LLAMA_SERVER,
                   help=f"llama-server binary (default {DEFAULT_LLAMA_SERVER})")
    p.add_argument("--no-llama-server", dest="use_server", action="store_false",
                   help="measure lorad only")
    p.add_argument("--repack", choices=("auto", "on", "off"), default="auto",
                   help="lorad's --repack (default auto, the daemon's default)")
    p.add_argument("--batching", action="append", default=[], metavar="'KEY = VALUE'",
                   help="a line of a [batching] section in a config file for lorad "
                   "(repeatable; default none: lorad's defaults), e.g. 'sequences = 16'")
    p.add_argument("--kv-unified", action="store_true",
                   help="one KV pool per batched context on both sides (default: one per seq)")
    p.add_argument("--daemon-arg", action="append", default=[],
                   help="extra argument for `lorad serve` (repeatable)")
    p.add_argument("--server-arg", action="append", default=[],
                   help="extra argument for llama-server (repeatable)")
    p.add_argument("--wait-idle", type=float, metavar="SECONDS",
                   help="before each run, wait up to this long for the machine to be idle; "
                   f"0 disables (default {FULL['wait_idle']:g})")
    p.add_argument("--idle-threshold", type=float, default=0.10)
    p.add_argument("--retries", type=int,
                   help="measure a configuration again (at most this many times, a new "
                   f"server) when a run of it was contended (default {FULL['retries']})")
    p.add_argument("--estimate", action="store_true",
                   help="print the estimated duration of the run and exit")
    p.add_argument("--json-out", help="default: bench/results/concurrency-<timestamp>.json")
    args = p.parse_args(argv)
    for k, v in (QUICK if args.quick else FULL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    try:
        clients = sorted({int(x) for x in args.clients.split(",") if x.strip()})
        tokens_at = _tokens_at(args.tokens_at)
    except ValueError:
        p.error("--clients takes numbers separated by commas, e.g. 1,4,8; --tokens-at N=T,...")
    if not clients or min(clients) < 1 or max(clients) > 64:
        p.error("--clients must be between 1 and 64")
    if args.tokens < 2 or args.rounds < 1 or any(t < 2 for t in tokens_at.values()):
        p.error("--tokens (and --tokens-at) must be >= 2 and --rounds >= 1")
    tokens_for = {n: min(args.tokens, tokens_at.get(n, args.tokens)) for n in clients}
    variants = [v.strip() for v in args.server_variants.split(",") if v.strip()]
    if any(v not in SERVER_VARIANTS for v in variants) or len(set(variants)) < len(variants):
        p.error(f"--server-variants takes some of {','.join(SERVER_VARIANTS)}")
    if args.stacks and not all((ADAPTERS / f).is_file() for f in STACK_ADAPTERS):
        print(f"stacks: skipped, the demo adapters are missing in {ADAPTERS} "
              "(make train-adapters)", file=sys.stderr)
        args.stacks = False

    server_note = None
    if not args.use_server:
        server_note = "skipped (--no-llama-server)"
    elif not (args.llama_server.is_file() and os.access(args.llama_server, os.X_OK)):
        server_note = f"skipped: no executable at {args.llama_server}"
    elif not variants:
        server_note = "skipped (--server-variants is empty)"
    if server_note:
        print(f"llama-server: {server_note}")
        variants = []
    use_server = server_note is None

    lorad_kinds = [""] + ([LOOKUP] if args.lookup else [])
    est = estimate_s(clients, tokens_for, args.rounds, len(lorad_kinds), len(variants),
                     (1 + use_server) if args.stacks else 0, args.tokens, args.warmup_tokens)
    tokens_note = "".join(f", {t} at N = {n}" for n, t in tokens_for.items() if t != args.tokens)
    n_runs = (args.rounds * len(clients) * 2 * (len(lorad_kinds) + len(variants))
              + (1 + len(variants)) * (args.warmup_tokens > 0)
              + (2 + 2 * use_server) * (args.rounds + 1) * bool(args.stacks))
    print(f"estimated duration on an idle 2-core machine: ~{_minutes(est)} (clients {clients}, "
          f"{args.tokens} tokens{tokens_note}, {args.rounds} round(s), "
          f"{len(lorad_kinds) + len(variants)} configurations a round and N, two runs each, "
          f"stacks {'on' if args.stacks else 'off'}; assumed rates {ASSUMED_TPS} tok/s); on a "
          f"busy machine up to {n_runs} x {args.wait_idle:g} s of idle waits and "
          f"{args.retries} retr{'y' if args.retries == 1 else 'ies'} a configuration more",
          flush=True)
    if args.estimate:
        return 0

    started = time.time()
    stamp = datetime.datetime.fromtimestamp(started).strftime("%Y%m%d-%H%M%S")
    json_out = Path(args.json_out or REPO / "bench" / "results" / f"concurrency-{stamp}.json")
    info = machine_info()
    info["lscpu_model_name"] = cpu_model_name()
    model = str(Path(args.model).expanduser().resolve()) if args.model else default_model_path()
    print(f"model: {model}\nCPU: {info['lscpu_model_name'] or info['cpu_model']} "
          f"({info['nproc']} CPUs); n_ctx {args.n_ctx}, {args.threads} threads; lorad "
          + (f"[batching] {'; '.join(args.batching)}" if args.batching else "default config")
          + (f"; llama-server columns {', '.join(variants)}" if variants else ""), flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="lorad-conc-"))
    bench = Bench(args, model, workdir)
    runs: dict[str, list[dict[str, Any]]] = {}
    warmup: list[dict[str, Any]] = []
    discarded: list[dict[str, Any]] = []
    failed: dict[str, Any] = {}
    round_s: list[float] = []
    stack_variant: str | None = None
    stacks_error: str | None = None
    try:
        if args.warmup_tokens > 0:  # page cache, and a llama-server variant that crashes
            for cfg in [Config(LORAD, 1), *(Config(SERVER, 1, variant=v) for v in variants)]:
                warmup += measure(bench, cfg, -1, args.warmup_tokens, 0, discarded, failed,
                                  (None,))
            if failed:
                left = estimate_s(clients, tokens_for, args.rounds, len(lorad_kinds),
                                  len([v for v in variants if v not in failed]),
                                  (1 + use_server) if args.stacks else 0, args.tokens, 0)
                print(f"without llama-server {', '.join(failed)}: about {_minutes(left)} left "
                      "on an idle machine", flush=True)
        for rnd in range(args.rounds):
            t_round = time.perf_counter()
            for n in clients:
                units = [Config(LORAD, n, variant=k) for k in lorad_kinds] + [
                    Config(SERVER, n, variant=v) for v in variants]
                k = rnd % len(units)
                for cfg in units[k:] + units[:k]:  # the order rotates every round
                    if cfg.side == SERVER and cfg.variant in failed:
                        continue
                    for run in measure(bench, cfg, rnd, tokens_for[n], args.retries,
                                       discarded, failed):
                        runs.setdefault(run["key"], []).append(run)
            round_s.append(time.perf_counter() - t_round)
            left = (args.rounds - rnd - 1) * statistics.mean(round_s)
            if args.stacks:
                left += estimate_s([], {}, args.rounds, 0, 0, 1 + use_server, args.tokens, 0)
            print(f"round {rnd} took {_minutes(round_s[-1])}; {_minutes(time.time() - started)} "
                  f"so far, about {_minutes(left)} left", flush=True)
        if args.stacks:
            stack_variant = next((v for v in variants if v not in failed), None)
            try:
                stacks_section(bench, args, runs, warmup, discarded, failed, stack_variant)
            except (ServerFailed, RuntimeError) as e:  # keep what the rounds measured
                stacks_error = f"{type(e).__name__}: {e}"
                print(f"stacks: FAILED: {stacks_error}", flush=True)
    finally:
        bench.close()

    summary = summarise(runs)
    first = next((v for v in variants if any(
        Config(SERVER, n, variant=v).key(STARTED) in runs for n in clients)), None)
    result: dict[str, Any] = {
        "benchmark": "concurrency",
        "date": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(),
        "duration_s": round(time.time() - started, 1),
        "estimated_s": round(est, 1),
        "machine": info,
        "software": {
            "llama_cpp_python": _version("llama_cpp_python"),
            "lorad": next((s["version"] for s in bench.described if "version" in s), None),
            "llama_server": llama_server_version(args.llama_server) if use_server else None,
            "git": git_info(),
        },
        "settings": {
            "model": model, "clients": clients, "tokens": args.tokens,
            "tokens_for": {str(n): t for n, t in tokens_for.items()},
            "tokens_note": tokens_note, "rounds": args.rounds,
            "warmup_tokens": args.warmup_tokens, "n_ctx": args.n_ctx, "n_threads": args.threads,
            "lorad": {"repack": args.repack, "batching": args.batching or None,
                      "kv_unified": args.kv_unified, "daemon_args": args.daemon_arg,
                      "configurations": {"lorad": "speculation off", **(
                          {"lorad lookup": {"speculative": SPECULATIVE}} if args.lookup
                          else {})}},
            "llama_server": {"variants": {v: SERVER_VARIANTS[v] for v in variants},
                             "server_args": args.server_arg},
            "phases": list(PHASES), "retries": args.retries, "wait_idle_s": args.wait_idle,
            "prompts": list(PROMPTS), "quick": args.quick,
            "sampling": "greedy (temperature 0); llama-server ignore_eos, lorad stops at EOG",
            "stacks": {"adapters": [str(ADAPTERS / f) for f in STACK_ADAPTERS],
                       "1": "4 x [pirate @1.0]", "2": "2 x [pirate @1.0] + 2 x [french @1.0]",
                       "llama_server_variant": stack_variant}
            if args.stacks else None,
            "order": "a warm-up run of each side (1 client); then per round, per N, each "
                     "configuration in turn (the order rotating every round) on a server "
                     "started for it: a just-started run and a warm run, the server stopped; "
                     "then the stacks pairs, ABBA",
        },
        "servers": bench.described,
        "server_exit_codes": bench.exit_codes,
        "stacks_error": stacks_error,
        "llama_server_note": server_note,
        "llama_server_failed": failed,
        "summary": summary,
        "ratios": {
            "lorad_over_llama_server": {phase: {v: {
                str(n): ratios(summary, runs, Config(LORAD, n).key(phase),
                               Config(SERVER, n, variant=v).key(phase)) for n in clients}
                for v in variants} for phase in PHASES},
            "lookup_over_off": {phase: {
                str(n): ratios(summary, runs, Config(LORAD, n, variant=LOOKUP).key(phase),
                               Config(LORAD, n).key(phase)) for n in clients}
                for phase in PHASES},
            "pss_lorad_over_llama_server": {phase: {v: {
                str(n): _pss_ratio(summary, Config(LORAD, n).key(phase),
                                   Config(SERVER, n, variant=v).key(phase)) for n in clients}
                for v in variants} for phase in PHASES},
            "stacks": {side: ratios(summary, runs, Config(side, 4, 2, v).name,
                                    Config(side, 4, 1, v).name)
                       for side, v in ((LORAD, ""), (SERVER, stack_variant or ""))}
            if args.stacks else None,
        },
        "token_agreement": {
            "lorad_vs_llama_server": {str(n): agreement(
                runs, Config(LORAD, n).key(STARTED),
                Config(SERVER, n, variant=first or "").key(STARTED)) for n in clients},
            "lookup_vs_off": {str(n): agreement(
                runs, Config(LORAD, n, variant=LOOKUP).key(STARTED),
                Config(LORAD, n).key(STARTED)) for n in clients},
        },
        "runs": [r for rs in runs.values() for r in rs],
        "warmup": warmup,
        "discarded": discarded,
    }
    print_report(summary, result, clients, variants, failed, server_note, stack_variant)
    short = [(r["config"], r["round"], c["client"], c["tokens"]) for rs in runs.values()
             for r in rs for c in r["per_client"] if c["tokens"] < r["tokens_asked"]]
    if short:
        print(f"\nnote: {len(short)} stream(s) ended before the tokens asked (end of "
              "generation; lorad has no ignore_eos): see tokens/client and the JSON")
    contended = sum(r["contended"] for rs in runs.values() for r in rs)
    print(f"contended runs kept: {contended} of {sum(map(len, runs.values()))}, measured again: "
          f"{len(discarded)}; took {_minutes(time.time() - started)} (estimated "
          f"{_minutes(est)})")
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(result, indent=1) + "\n")
    shutil.rmtree(workdir, ignore_errors=True)
    print(f"results: {json_out}")
    bad = {k: c for k, c in bench.exit_codes[LORAD].items() if c != 0}
    if bad:
        print(f"lorad daemons that did not exit cleanly: {bad}")
    return 1 if bad or stacks_error else 0


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
