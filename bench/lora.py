"""LoRA adapters through lorad: stack-change latency, memory (PSS) and generation speed.

Usage::

    .venv/bin/python bench/lora.py [--model PATH] [--sections latency,memory,generation]
                                   [--repeats 50] [--reload-repeats 15] [--contexts 8]
                                   [--n-ctx 1024] [--rank 16] [--tokens 128] [--runs 5]
                                   [--json-out bench/results/lora.json]

The adapters are written by this script into a temporary directory with the ``gguf`` package:
llama.cpp LoRA GGUFs for the model's own architecture (``general.type = adapter``,
``adapter.type = lora``, ``adapter.lora.alpha``), with f32 ``<tensor>.lora_a`` (numpy shape
``(rank, n_in)``) and ``<tensor>.lora_b`` (``(n_out, rank)``) for ``attn_q`` and ``attn_v`` of
every layer, random and small, each file with its own seed (so each is a different adapter).

The daemon is a real ``lorad serve`` subprocess (``python -m lorad.daemon``) on a private ipc
endpoint, ready when it sends ``READY=1`` on the ``NOTIFY_SOCKET`` this script listens on (see
bench/throughput.py); the sync ``Client`` talks to it.

Sections (``--sections``):

``latency``
    Round trip of one client call, from before the call to the reply in hand
    (``time.perf_counter``), ``--repeats`` times each, interleaved in one loop: ``ping`` (the
    floor), ``set_lora`` of an adapter already in the daemon's cache (another context holds
    it), a scale change of an adapter already in the stack, ``remove_lora`` (stack not yet
    applied), ``set_loras`` of two cached adapters, ``set_lora`` of a new file (a first load:
    every check, then ``llama_adapter_lora_init``), and ``remove_lora`` of that adapter after a
    one-token generation applied it (the daemon re-applies the stack at once and frees the
    adapter, its last holder). Baseline: what users of llama-cpp-python do today to change
    adapters, i.e. construct a new ``llama_cpp.Llama(model, lora_path=...)`` with the same
    context settings (``--reload-repeats`` times, in the same loop). Also: time to first token
    of the next generation after a scale change versus after no change (a stack change
    invalidates the context's KV cache, so the prompt is evaluated again).
``memory``
    PSS (``Pss:`` of ``/proc/PID/smaps_rollup``: shared pages divided among the processes that
    map them, so the page-cache-backed weights are not counted twice as with RSS) of a fresh
    daemon with the model and ``--contexts`` contexts, each with a different adapter and after
    one short generation, measured after each added context; against a separate process that
    holds ``--contexts`` ``llama_cpp.Llama`` objects, each with one adapter (same settings),
    measured the same way. The two never run at the same time (pages shared between them would
    halve each one's PSS), and the script checks that no other process maps the model file.
``generation``
    Decode speed with 0, 1 and 3 adapters active (per-request ``generate(..., loras=[...])``),
    same prompt, greedy, ``--tokens`` tokens, ``--runs`` runs of each configuration in rotating
    order, with the definitions of bench/throughput.py (generation tokens/s =
    ``(n - 1) / (t_last - t_first)`` over the tokens as the client receives them).

Everything runs in one process run and configurations are interleaved, so a noisy shared
machine hurts them alike: compare the ratios, not absolute figures across runs.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from throughput import (
    CONTENDED,
    CpuSnapshot,
    default_model_path,
    git_info,
    llama_kwargs,
    machine_info,
    no_extra_bufts,
    start_daemon,
    stop_daemon,
    wait_for_idle,
)

REPO = Path(__file__).resolve().parent.parent
PROMPT = "Here is a long list of numbered facts about the ocean:\n1."
SHORT_PROMPT = "The sea is"
# A longer prompt for the "next generation after a scale change" measurement (the cached
# prefix matters there).
LONG_PROMPT = ("You are a helpful assistant. Answer briefly and precisely. " * 8
               + "Question: what is the largest ocean on Earth? Answer:")
TARGETS = ("attn_q", "attn_v")
SCALE_CHANGE_TARGET_MS = 1.0
MEMORY_FORMULA_TOLERANCE = 1.3


# -- statistics ---------------------------------------------------------------------------------
def _r(v: float | None, nd: int = 3) -> float | None:
    return round(v, nd) if v is not None else None


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100)."""
    if not values:
        return None
    s = sorted(values)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def stats_ms(values: list[float]) -> dict[str, Any]:
    """median, p90, min, max of ``values`` (seconds) in milliseconds, and the samples."""
    ms = [v * 1000 for v in values]
    return {
        "n": len(ms),
        "median_ms": _r(statistics.median(ms) if ms else None, 4),
        "p90_ms": _r(percentile(ms, 90), 4),
        "min_ms": _r(min(ms) if ms else None, 4),
        "max_ms": _r(max(ms) if ms else None, 4),
        "samples_ms": [round(v, 4) for v in ms],
    }


def print_table(title: str, head: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(head)]
    line = "  ".join(h.ljust(w) if i == 0 else h.rjust(w)
                     for i, (h, w) in enumerate(zip(head, widths, strict=True)))
    print(f"\n{title}")
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(r, widths, strict=True))))


def fmt(v: float | None, spec: str = ".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def mib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f}"


# -- adapters -----------------------------------------------------------------------------------
def model_tensors(model: str) -> tuple[str, dict[str, tuple[int, ...]]]:
    """The model's architecture and tensor shapes in numpy order (reversed ggml ``ne``)."""
    import gguf

    reader = gguf.GGUFReader(model, "r")
    arch_field = reader.get_field("general.architecture")
    arch = arch_field.contents() if arch_field is not None else None
    shapes = {t.name: tuple(int(n) for n in reversed(t.shape.tolist())) for t in reader.tensors}
    del reader, arch_field
    gc.collect()  # drop the reader's memory map of the model (it would count in our PSS checks)
    if not arch:
        raise RuntimeError(f"{model}: no general.architecture")
    return arch, shapes


def write_adapter(path: Path, arch: str, shapes: dict[str, tuple[int, ...]], *, rank: int,
                  alpha: float, seed: int, std: float, strings: int = 0) -> dict[str, Any]:
    """Write a llama.cpp LoRA GGUF for ``attn_q`` and ``attn_v`` of every layer; with
    ``strings``, its header also holds a metadata array of that many strings (a hostile
    header: bench/noisy.py)."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    names = sorted(n for n in shapes
                   if n.startswith("blk.") and n.split(".")[2] in TARGETS
                   and n.endswith(".weight") and len(shapes[n]) == 2)
    if not names:
        raise RuntimeError(f"the model has no {TARGETS} tensors to adapt")
    w = gguf.GGUFWriter(path, arch)
    w.add_type("adapter")
    w.add_name(f"bench-lora-{seed}")
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    if strings:
        w.add_array("bench.strings", [f"s{i}" for i in range(strings)])
    nbytes = 0
    for name in names:
        n_out, n_in = shapes[name]
        a = rng.normal(0.0, std, size=(rank, n_in)).astype(np.float32)
        b = rng.normal(0.0, std, size=(n_out, rank)).astype(np.float32)
        w.add_tensor(f"{name}.lora_a", a)
        w.add_tensor(f"{name}.lora_b", b)
        nbytes += a.nbytes + b.nbytes
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"path": str(path), "tensors": len(names) * 2, "tensor_bytes": nbytes,
            "file_bytes": path.stat().st_size}


class Adapters:
    """Adapter files written on demand into one directory, each with its own seed."""

    def __init__(self, directory: Path, arch: str, shapes: dict[str, tuple[int, ...]], *,
                 rank: int, alpha: float, std: float) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.arch, self.shapes = arch, shapes
        self.rank, self.alpha, self.std = rank, alpha, std
        self._seed = 1000
        self.written: list[dict[str, Any]] = []

    def new(self, name: str) -> Path:
        self._seed += 1
        path = self.dir / f"{name}.gguf"
        self.written.append(write_adapter(path, self.arch, self.shapes, rank=self.rank,
                                          alpha=self.alpha, seed=self._seed, std=self.std))
        return path


# -- in-process baseline -----------------------------------------------------------------------
LORA_PATH = "lora_path"
BY_HAND = "mmap_by_hand"


class LlamaWithAdapter:
    """A ``llama_cpp.Llama`` with one adapter, loaded with ``use_extra_bufts = False``.

    ``LORA_PATH``: ``Llama(model, lora_path=adapter)``, what llama-cpp-python users do today;
    note that llama-cpp-python then loads the weights without mmap (``use_mmap = use_mmap and
    lora_path is None`` in ``Llama.__init__``), i.e. a private copy of the weights per object.
    ``BY_HAND``: ``Llama(model)`` (weights mmapped) and the adapter applied through the C API
    (``llama_adapter_lora_init`` + ``llama_set_adapters_lora``), as lorad does.
    """

    def __init__(self, model: str, adapter: str, mode: str, kwargs: dict[str, Any]) -> None:
        import ctypes

        import llama_cpp

        C = llama_cpp.llama_cpp
        with no_extra_bufts():
            if mode == LORA_PATH:
                self.llm = llama_cpp.Llama(model, lora_path=adapter, **kwargs)
            elif mode == BY_HAND:
                self.llm = llama_cpp.Llama(model, **kwargs)
                ptr = C.llama_adapter_lora_init(self.llm._model.model, adapter.encode())
                if not ptr:
                    raise RuntimeError(f"llama_adapter_lora_init failed for {adapter}")
                # Freed when the Llama closes, before its context and model (its exit stack
                # unwinds last-in first-out), as Llama does with its own lora_path adapter.
                self.llm._stack.callback(C.llama_adapter_lora_free, ptr)
                adapters = (C.llama_adapter_lora_p_ctypes * 1)(ptr)
                scales = (ctypes.c_float * 1)(1.0)
                if C.llama_set_adapters_lora(self.llm._ctx.ctx, adapters, 1, scales):
                    raise RuntimeError("llama_set_adapters_lora failed")
            else:
                raise ValueError(mode)
        if self.llm.model_params.use_extra_bufts:
            raise RuntimeError("use_extra_bufts is still on: the llama_cpp wrapper did not apply")

    def generate(self, prompt: str, max_tokens: int) -> list[int]:
        llm = self.llm
        tokens = llm.tokenize(prompt.encode(), add_bos=True, special=False)
        out: list[int] = []
        for tok in llm.generate(tokens, temp=0.0, repeat_penalty=1.0):
            out.append(tok)
            if len(out) >= max_tokens:
                break
        return out

    def close(self) -> None:
        self.llm.close()


# -- memory -------------------------------------------------------------------------------------
def smaps_rollup(pid: int | str) -> dict[str, int]:
    """``/proc/PID/smaps_rollup`` in bytes: Rss, Pss, Pss_Anon, Pss_File, ..."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    if "Pss" not in out:
        raise RuntimeError(f"no Pss line in /proc/{pid}/smaps_rollup")
    return out


def memory_point(pid: int | str, label: str) -> dict[str, Any]:
    m = smaps_rollup(pid)
    keys = ("Pss", "Pss_Anon", "Pss_File", "Pss_Shmem", "Rss")
    return {"label": label, **{k.lower(): m.get(k) for k in keys}}


def processes_mapping(path: str) -> list[int]:
    """PIDs of the processes that map ``path`` (to make sure PSS is not shared with others)."""
    real = os.path.realpath(path)
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/maps") as f:
                if any(line.rstrip("\n").endswith(real) for line in f):
                    pids.append(int(entry.name))
        except OSError:
            continue
    return pids


# -- the daemon ---------------------------------------------------------------------------------
class Daemon:
    """A ``lorad serve`` subprocess and a sync client of it."""

    def __init__(self, workdir: Path, allow_dirs: list[Path], adapter_dir: Path,
                 name: str) -> None:
        from lorad.client import Client

        self.log_path = workdir / f"{name}.log"
        self.endpoint = f"ipc://{workdir}/{name}.sock"
        self.proc = start_daemon(self.endpoint, allow_dirs, self.log_path, cwd=workdir,
                                 extra_args=["--adapter-dir", str(adapter_dir)])
        self.pid = self.proc.pid
        self.client = Client(self.endpoint, timeout=120)
        self.exit_code: int | None = None

    def log_errors(self) -> list[str]:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        return [ln for ln in text.splitlines()
                if '"level": "error"' in ln or "Traceback" in ln]

    def close(self) -> int:
        with contextlib.suppress(Exception):
            self.client.close()
        if self.exit_code is None:
            self.exit_code = stop_daemon(self.proc)
        return self.exit_code


def generate(ctx: Any, prompt: str, max_tokens: int, **kw: Any) -> dict[str, Any]:
    """One greedy generation; token timestamps as the client receives them."""
    now = time.perf_counter
    t0 = now()
    stamps: list[float] = []
    tokens: list[int] = []
    stream = ctx.generate(prompt, max_tokens=max_tokens, temperature=0, seed=0, **kw)
    for chunk in stream:
        if chunk.token_ids:
            t = now()
            stamps.extend([t] * len(chunk.token_ids))
            tokens.extend(chunk.token_ids)
    t_done = now()
    n = len(stamps)
    gen = (n - 1) / (stamps[-1] - stamps[0]) if n >= 2 and stamps[-1] > stamps[0] else None
    return {
        "tokens": n,
        "token_ids": tokens,
        "finish_reason": stream.finish_reason,
        "ttft_ms": (stamps[0] - t0) * 1000 if stamps else None,
        "generation_tokens_per_s": gen,
        "total_ms": (t_done - t0) * 1000,
        "daemon_metrics": dict(stream.metrics),
    }


# -- section (a): latency -----------------------------------------------------------------------
def section_latency(args: argparse.Namespace, model: str, workdir: Path, adapters: Adapters,
                    problems: list[str]) -> dict[str, Any]:
    shared_x = adapters.new("lat-shared-x")
    shared_y = adapters.new("lat-shared-y")
    fresh = [adapters.new(f"lat-first-{i:03d}") for i in range(args.repeats)]
    daemon = Daemon(workdir, [Path(model).parent, adapters.dir], adapters.dir, "latency")
    samples: dict[str, list[float]] = {k: [] for k in (
        "ping", "set_lora_cached", "scale_change", "remove_lora", "set_loras_2_cached",
        "set_lora_first_load", "remove_lora_applied_frees", "first_adapter_on_model",
        "llama_reload_with_lora", "llama_reload_mmap_by_hand", "ttft_unchanged_stack",
        "ttft_after_scale_change")}
    checks: dict[str, Any] = {}
    now = time.perf_counter

    def timed(key: str, fn: Callable[[], Any]) -> Any:
        t0 = now()
        result = fn()
        samples[key].append(now() - t0)
        return result

    try:
        c = daemon.client
        checks["capabilities_lora"] = c.capabilities().get("features", {}).get("lora")
        model_info = c.load_model(model)
        params = {"n_ctx": args.n_ctx, "n_threads": args.threads, "n_batch": args.n_batch}
        holder = c.create_context(model_info, **params)
        target = c.create_context(model_info, **params)
        # The daemon's first adapter on a model also reads the model's tensor table.
        timed("first_adapter_on_model", lambda: holder.set_lora(shared_x, 1.0))
        holder.set_lora(shared_y, 1.0)
        cached = {a["path"] for a in c.status()["adapters"]}
        checks["holder_adapters_cached"] = {str(shared_x), str(shared_y)} <= cached

        def expect(stack: list[dict[str, Any]], want: list[tuple[Path, float]], what: str
                   ) -> None:
            got = [(s["path"], round(float(s["scale"]), 6)) for s in stack]
            exp = [(str(p), round(float(sc), 6)) for p, sc in want]
            if got != exp:
                problems.append(f"latency/{what}: the stack returned is {got}, expected {exp}")

        def one_round(i: int, record: bool) -> None:
            def t(key: str, fn: Callable[[], Any]) -> Any:
                return timed(key, fn) if record else fn()

            c.ping()  # untimed: the first call after a pause pays for waking the daemon up
            t("ping", c.ping)
            expect(t("set_lora_cached", lambda: target.set_lora(shared_x, 1.0)),
                   [(shared_x, 1.0)], "set_lora_cached")
            scale = 0.5 if i % 2 == 0 else 0.75
            expect(t("scale_change", lambda: target.set_lora(shared_x, scale)),
                   [(shared_x, scale)], "scale_change")
            expect(t("remove_lora", lambda: target.remove_lora(shared_x)), [], "remove_lora")
            pair = [(shared_x, 1.0), (shared_y, 0.5)]
            expect(t("set_loras_2_cached", lambda: target.set_loras(pair)), pair,
                   "set_loras_2_cached")
            target.clear_loras()
            path = fresh[i] if record else shared_y
            expect(t("set_lora_first_load", lambda: target.set_lora(path, 1.0)),
                   [(path, 1.0)], "set_lora_first_load")
            generate(target, SHORT_PROMPT, 1)  # applies the stack to the llama context
            expect(t("remove_lora_applied_frees", lambda: target.remove_lora(path)), [],
                   "remove_lora_applied_frees")

        kwargs = llama_kwargs(n_ctx=args.n_ctx, n_threads=args.threads, n_batch=args.n_batch)

        def reload_llama(path: Path, mode: str, key: str | None) -> None:
            t0 = now()
            llm = LlamaWithAdapter(model, str(path), mode, kwargs)
            if key is not None:
                samples[key].append(now() - t0)
            llm.close()

        one_round(0, record=False)  # warm-up (every code path once)
        reload_llama(shared_x, LORA_PATH, None)
        reload_llama(shared_x, BY_HAND, None)
        for i in range(args.repeats):
            one_round(i, record=True)
            if i < args.reload_repeats:
                # alternate which of the two baselines goes first
                modes = [(LORA_PATH, "llama_reload_with_lora"),
                         (BY_HAND, "llama_reload_mmap_by_hand")]
                for mode, key in modes if i % 2 == 0 else modes[::-1]:
                    reload_llama(fresh[i], mode, key)
        adapters_left = [a["path"] for a in c.status()["adapters"]]
        checks["first_load_adapters_freed"] = not any(str(p) in adapters_left for p in fresh)
        if not checks["first_load_adapters_freed"]:
            problems.append("latency: adapters removed from their only stack were not freed: "
                            f"{[p for p in adapters_left if 'lat-first' in p]}")

        # The cost a stack change moves to the next generation: the KV cache is invalidated.
        target.clear_loras()
        target.set_lora(shared_x, 1.0)
        generate(target, LONG_PROMPT, 1)
        for i in range(args.ttft_repeats):
            generate(target, LONG_PROMPT, 1)  # the stack is applied and the prompt cached
            r = generate(target, LONG_PROMPT, 1)
            samples["ttft_unchanged_stack"].append(r["ttft_ms"] / 1000)
            target.set_lora(shared_x, 0.5 if i % 2 == 0 else 1.0)
            r = generate(target, LONG_PROMPT, 1)
            samples["ttft_after_scale_change"].append(r["ttft_ms"] / 1000)
        checks["long_prompt_tokens"] = len(target.tokenize(LONG_PROMPT))
        holder.close()
        target.close()
    finally:
        exit_code = daemon.close()
    result = {k: stats_ms(v) for k, v in samples.items()}
    scale_median = result["scale_change"]["median_ms"]
    return {
        "stats": result,
        "checks": checks,
        "scale_change_target_ms": SCALE_CHANGE_TARGET_MS,
        "scale_change_meets_target": scale_median is not None
        and scale_median < SCALE_CHANGE_TARGET_MS,
        "daemon_exit_code": exit_code,
        "daemon_log_errors": daemon.log_errors(),
    }


def print_latency(res: dict[str, Any]) -> None:
    labels = {
        "ping": "ping (round-trip floor)",
        "set_lora_cached": "set_lora, adapter cached (held by another ctx)",
        "scale_change": "set_lora scale change (adapter in stack)",
        "remove_lora": "remove_lora (stack not applied yet)",
        "set_loras_2_cached": "set_loras, 2 cached adapters",
        "set_lora_first_load": "set_lora, first load of a new file",
        "remove_lora_applied_frees": "remove_lora after a generation (re-apply + free)",
        "first_adapter_on_model": "first set_lora on a fresh model (tensor table read)",
        "llama_reload_with_lora": "baseline: new llama_cpp.Llama(lora_path=...)",
        "llama_reload_mmap_by_hand": "baseline: new Llama (mmap) + adapter via C API",
        "ttft_unchanged_stack": "TTFT of next generation, stack unchanged",
        "ttft_after_scale_change": "TTFT of next generation after a scale change",
    }
    rows = [(labels[k], str(s["n"]), fmt(s["median_ms"]), fmt(s["p90_ms"]), fmt(s["max_ms"]))
            for k, s in res["stats"].items()]
    print_table("(a) latency, client round trip", ("operation", "n", "median ms", "p90 ms",
                                                    "max ms"), rows)
    s = res["stats"]
    reload_ms, scale_ms = s["llama_reload_with_lora"]["median_ms"], s["scale_change"]["median_ms"]
    verdict = "PASS" if res["scale_change_meets_target"] else "ABOVE TARGET"
    print(f"scale change median {fmt(scale_ms)} ms (target < {SCALE_CHANGE_TARGET_MS} ms: "
          f"{verdict})")
    if reload_ms and scale_ms:
        first = s["set_lora_first_load"]["median_ms"]
        print(f"reload / scale change: {reload_ms / scale_ms:.0f}x;  reload / first load: "
              f"{reload_ms / first:.1f}x" if first else "")


# -- section (b): memory ------------------------------------------------------------------------
def child_llamas(spec_json: str) -> int:
    """A baseline process: N ``Llama`` objects, one adapter each; reports its own PSS."""
    spec = json.loads(spec_json)
    points = [memory_point("self", "imported llama_cpp")]
    llms = []
    for i, path in enumerate(spec["adapters"]):
        llm = LlamaWithAdapter(spec["model"], path, spec["mode"], spec["kwargs"])
        llm.generate(spec["prompt"], spec["max_tokens"])
        llms.append(llm)
        points.append(memory_point("self", f"{i + 1} Llama"))
    print(json.dumps({"points": points}), flush=True)
    sys.stdin.read()  # the parent measures us from outside, then closes our stdin
    for llm in llms:
        llm.close()
    return 0


def run_llama_process(args: argparse.Namespace, model: str, workdir: Path, paths: list[Path],
                      mode: str) -> dict[str, Any]:
    """Run :func:`child_llamas` in a subprocess; its PSS points, final PSS and model mappers."""
    spec = {"model": model, "adapters": [str(p) for p in paths], "prompt": SHORT_PROMPT,
            "max_tokens": args.memory_tokens, "mode": mode,
            "kwargs": llama_kwargs(n_ctx=args.n_ctx, n_threads=args.threads,
                                   n_batch=args.n_batch)}
    child_log = workdir / f"llamas-{mode}.log"
    with open(child_log, "wb") as err:
        child = subprocess.Popen([sys.executable, __file__, "--child-llamas", json.dumps(spec)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                 text=True, cwd=workdir)
    try:
        line = child.stdout.readline() if child.stdout else ""
        if not line:
            child.wait()
            raise RuntimeError(f"the Llama baseline process ({mode}) failed (exit code "
                               f"{child.returncode}): "
                               f"{child_log.read_text(errors='replace')[-3000:]}")
        out = {"mode": mode, "points": json.loads(line)["points"],
               "mapping_model": processes_mapping(model),
               "final": memory_point(child.pid, "final"), "pid": child.pid}
    finally:
        if child.stdin:
            child.stdin.close()
        try:
            child.wait(60)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        if child.stdout:
            child.stdout.close()
    d = [out["points"][i]["pss"] - out["points"][i - 1]["pss"]
         for i in range(1, len(out["points"]))]
    out["pss_deltas_per_instance"] = d
    out["per_instance_bytes"] = statistics.median(d[1:]) if len(d) > 1 else None
    out["first_instance_bytes"] = d[0] if d else None
    out["pss_bytes"] = out["final"]["pss"]
    return out


def _check_mappers(what: str, mappers: list[int], pid: int, problems: list[str]) -> None:
    """PSS divides shared pages among the processes mapping them: nobody else may map it."""
    others = [p for p in mappers if p != pid]
    if others:
        problems.append(f"memory: during the {what} measurement other processes mapped the "
                        f"model ({others}): its PSS is understated")


def section_memory(args: argparse.Namespace, model: str, workdir: Path, adapters: Adapters,
                   problems: list[str]) -> dict[str, Any]:
    paths = [adapters.new(f"mem-{i}") for i in range(args.contexts)]
    n = args.contexts
    out: dict[str, Any] = {"contexts": n, "n_ctx": args.n_ctx}
    out["processes_mapping_model_at_start"] = processes_mapping(model)
    if os.getpid() in out["processes_mapping_model_at_start"]:
        problems.append("memory: this process maps the model file (PSS would be shared)")

    # The daemon: the model, then one context at a time (its adapter, a short generation).
    daemon = Daemon(workdir, [Path(model).parent, adapters.dir], adapters.dir, "memory")
    points = [memory_point(daemon.pid, "daemon started")]
    try:
        c = daemon.client
        info = c.load_model(model)
        out["model_size_bytes"] = info.get("size_bytes")
        points.append(memory_point(daemon.pid, "model loaded"))
        # The first adapter check on a model reads its tensor table (a one-off per model):
        # done before the per-context measurements so that it is not charged to context 1.
        report = c.validate_lora(info, paths[0])
        if not report.get("compatible"):
            problems.append(f"memory: validate_lora says the adapter is incompatible: {report}")
        points.append(memory_point(daemon.pid, "validate_lora (model tensor table read)"))
        ctxs = []
        for i, path in enumerate(paths):
            ctx = c.create_context(info, n_ctx=args.n_ctx, n_threads=args.threads,
                                   n_batch=args.n_batch)
            stack = ctx.set_loras([(path, 1.0)])
            if [s["path"] for s in stack] != [str(path)]:
                problems.append(f"memory: context {i} stack is {stack}")
            r = generate(ctx, SHORT_PROMPT, args.memory_tokens)
            if r["tokens"] < 1:
                problems.append(f"memory: context {i} generated nothing ({r['finish_reason']})")
            ctxs.append(ctx)
            points.append(memory_point(daemon.pid, f"{i + 1} contexts"))
        status = c.status()
        out["daemon_adapters"] = [{k: a.get(k) for k in ("path", "bytes", "refs", "contexts")}
                                  for a in status["adapters"]]
        out["daemon_adapter_bytes"] = sum(a.get("bytes") or 0 for a in status["adapters"])
        if len(status["adapters"]) != n:
            problems.append(f"memory: the daemon lists {len(status['adapters'])} adapters, "
                            f"expected {n}")
        _check_mappers("daemon", processes_mapping(model), daemon.pid, problems)
        final = memory_point(daemon.pid, "final")
        for ctx in ctxs:
            ctx.close()
    finally:
        out["daemon_exit_code"] = daemon.close()
        out["daemon_log_errors"] = daemon.log_errors()
    out["daemon_points"] = points
    out["daemon_final"] = final

    # The baselines, one after the other and after the daemon has exited.
    out["llamas"] = {}
    for mode in (LORA_PATH, BY_HAND):
        res = run_llama_process(args, model, workdir, paths, mode)
        _check_mappers(f"Llama ({mode})", res["mapping_model"], res["pid"], problems)
        out["llamas"][mode] = res

    # Per-context cost: the mean PSS delta per added context. (A median served while each
    # context had a llama context of its own; with batching, the first context of a slab
    # allocates the KV cache of all its sequences, and the next ones almost nothing.)
    d = [points[i]["pss"] - points[i - 1]["pss"] for i in range(3, len(points))]
    per_ctx = (points[-1]["pss"] - points[2]["pss"]) / n
    weights = out.get("model_size_bytes") or os.path.getsize(model)
    expected = weights + n * per_ctx
    pss_daemon = final["pss"]
    pss_llama = out["llamas"][LORA_PATH]["pss_bytes"]
    pss_by_hand = out["llamas"][BY_HAND]["pss_bytes"]
    ratio = pss_daemon / expected
    out.update({
        "daemon_pss_deltas_per_context": d,
        "per_context_bytes": per_ctx,
        "runtime_bytes": points[0]["pss"],
        "model_load_bytes": points[1]["pss"] - points[0]["pss"],
        "tensor_table_read_bytes": points[2]["pss"] - points[1]["pss"],
        "weights_bytes": weights,
        "formula_bytes": expected,
        "daemon_pss_bytes": pss_daemon,
        "llama_pss_bytes": pss_llama,
        "daemon_over_formula": _r(ratio, 4),
        "daemon_over_formula_plus_runtime": _r(pss_daemon / (expected + points[0]["pss"]), 4),
        "daemon_over_llamas": _r(pss_daemon / pss_llama, 4),
        "daemon_over_llamas_by_hand": _r(pss_daemon / pss_by_hand, 4),
        "formula_within_tolerance": 1 / MEMORY_FORMULA_TOLERANCE <= ratio
        <= MEMORY_FORMULA_TOLERANCE,
        "below_llamas": pss_daemon < pss_llama,
    })
    return out


def print_memory(m: dict[str, Any]) -> None:
    n = m["contexts"]
    lp, bh = m["llamas"][LORA_PATH], m["llamas"][BY_HAND]
    rows = [
        (f"daemon: 1 model + {n} contexts, 1 adapter each", mib(m["daemon_pss_bytes"]),
         mib(m["daemon_final"]["pss_anon"]), mib(m["daemon_final"]["pss_file"]),
         mib(m["daemon_final"]["rss"]), mib(m["per_context_bytes"])),
        (f"1 process, {n} x Llama(lora_path=...)", mib(lp["pss_bytes"]),
         mib(lp["final"]["pss_anon"]), mib(lp["final"]["pss_file"]), mib(lp["final"]["rss"]),
         mib(lp["per_instance_bytes"])),
        (f"1 process, {n} x Llama (mmap) + adapter by hand", mib(bh["pss_bytes"]),
         mib(bh["final"]["pss_anon"]), mib(bh["final"]["pss_file"]), mib(bh["final"]["rss"]),
         mib(bh["per_instance_bytes"])),
    ]
    print_table(f"(b) memory in MiB (n_ctx {m['n_ctx']}, after one short generation each)",
                ("configuration", "PSS", "PSS anon", "PSS file", "RSS", "per ctx/Llama"), rows)
    print(f"daemon PSS / (weights {mib(m['weights_bytes'])} + {n} x per-context "
          f"{mib(m['per_context_bytes'])}) = {fmt(m['daemon_over_formula'])} "
          f"(within {MEMORY_FORMULA_TOLERANCE}x: "
          f"{'yes' if m['formula_within_tolerance'] else 'NO'}); with the idle daemon's own "
          f"{mib(m['runtime_bytes'])} MiB added to the formula: "
          f"{fmt(m['daemon_over_formula_plus_runtime'])}")
    print(f"daemon / Llama(lora_path) process = {fmt(m['daemon_over_llamas'])} "
          f"(below: {'yes' if m['below_llamas'] else 'NO'});  daemon / Llama by hand = "
          f"{fmt(m['daemon_over_llamas_by_hand'])}")
    print(f"daemon breakdown: runtime {mib(m['runtime_bytes'])}, model load "
          f"{mib(m['model_load_bytes'])}, first adapter check (tensor table read) "
          f"{mib(m['tensor_table_read_bytes'])}, contexts "
          f"{[round(x / 2**20, 1) for x in m['daemon_pss_deltas_per_context']]} MiB; "
          f"adapter tensors {mib(m['daemon_adapter_bytes'])} MiB in all")


# -- section (c): generation speed --------------------------------------------------------------
def section_generation(args: argparse.Namespace, model: str, workdir: Path,
                       adapters: Adapters, problems: list[str]) -> dict[str, Any]:
    gen_adapters = [adapters.new(f"gen-{i}") for i in range(3)]
    configs = {"0 adapters": [], "1 adapter": [(gen_adapters[0], 1.0)],
               "3 adapters": [(p, 1.0) for p in gen_adapters]}
    names = list(configs)
    daemon = Daemon(workdir, [Path(model).parent, adapters.dir], adapters.dir, "generation")
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in names}
    warmup: list[dict[str, Any]] = []
    logprobs: dict[str, list[list[float]]] = {}
    discarded: list[dict[str, Any]] = []
    try:
        c = daemon.client
        ctx = c.create_context(model, n_ctx=args.n_ctx, n_threads=args.threads,
                               n_batch=args.n_batch)
        # Another context holds the three adapters, so that they stay loaded between requests
        # (a per-request stack alone would load and free them on every request).
        holder = c.create_context(model, n_ctx=256, n_threads=1, n_batch=64)
        holder.set_loras([(p, 1.0) for p in gen_adapters])

        def run(name: str, index: int) -> dict[str, Any]:
            idle = (wait_for_idle(args.wait_idle, args.idle_threshold)
                    if args.wait_idle > 0 else None)
            loras = [(str(p), s) for p, s in configs[name]]
            before = CpuSnapshot.take(daemon.pid)
            r = generate(ctx, PROMPT, args.tokens, loras=loras)
            r["cpu"] = CpuSnapshot.take(daemon.pid).since(before)
            r["idle_wait"] = idle
            r["config"], r["run"] = name, index
            got = [e.get("path") for e in r["daemon_metrics"].get("loras", [])]
            if got != [str(p) for p, _ in configs[name]]:
                problems.append(f"generation/{name}: the daemon reports adapters {got}")
            label = "warm-up" if index < 0 else f"run {index}"
            print(f"  {label:7s} {name:10s} {r['tokens']:4d} tokens  "
                  f"{r['generation_tokens_per_s'] or 0:7.2f} tok/s  "
                  f"TTFT {r['ttft_ms'] or 0:7.1f} ms  [{r['finish_reason']}]", flush=True)
            return r

        # Do the adapters apply? The first token's top log-probabilities must differ from
        # the base model's (greedy text can stay the same for a while with small adapters).
        for name in names:
            logprobs[name] = first_token_logprobs(ctx, [(str(p), s) for p, s in configs[name]])
        for name in names:
            warmup.append(run(name, -1))
        for i in range(args.runs):
            k = i % len(names)
            order = names[k:] + names[:k]  # rotate the order
            for attempt in range(args.retries + 1):
                batch = {name: run(name, i) for name in order}
                if attempt == args.retries or not any(
                        r["cpu"]["other_processes_cpu_frac"] > CONTENDED for r in batch.values()):
                    break
                discarded.extend(batch.values())
                print(f"  run {i}: contended, measuring the round again", flush=True)
            for name in order:
                runs[name].append(batch[name])
        ctx.close()
        holder.close()
    finally:
        exit_code = daemon.close()

    def med(rs: list[dict[str, Any]], key: str) -> float | None:
        vals = [r[key] for r in rs if r[key] is not None]
        return statistics.median(vals) if vals else None

    summary = {}
    base = med(runs[names[0]], "generation_tokens_per_s")
    for name in names:
        tps = med(runs[name], "generation_tokens_per_s")
        summary[name] = {
            "runs": len(runs[name]),
            "tokens": [r["tokens"] for r in runs[name]],
            "median_generation_tokens_per_s": _r(tps),
            "median_ttft_ms": _r(med(runs[name], "ttft_ms")),
            "ratio_to_0_adapters": _r(tps / base, 4) if tps and base else None,
            "contended_runs": sum(r["cpu"]["other_processes_cpu_frac"] > CONTENDED
                                  for r in runs[name]),
        }
    # Each configuration must give the same tokens every run, and adapters must change them.
    ids = {name: [r["token_ids"] for r in warmup + runs[name] if r["config"] == name]
           for name in names}
    deterministic = {name: all(t == v[0] for t in v) for name, v in ids.items()}
    differs = {name: logprobs[name] != logprobs[names[0]] for name in names[1:]}
    text_differs = {name: ids[name][0] != ids[names[0]][0] for name in names[1:]}
    for name, same in deterministic.items():
        if not same:
            problems.append(f"generation/{name}: greedy output differs between runs")
    for name, d in differs.items():
        if not d:
            problems.append(f"generation/{name}: first-token log-probabilities identical to "
                            "0 adapters: the adapters did not apply")
    short = [r for rs in runs.values() for r in rs if r["tokens"] < args.tokens]
    if short:
        problems.append(f"generation: {len(short)} run(s) stopped before {args.tokens} tokens")
    # Per-run ratios: each run of a configuration against the 0-adapter run of the same round.
    paired = {name: [_r(a["generation_tokens_per_s"] / b["generation_tokens_per_s"], 4)
                     for a, b in zip(runs[name], runs[names[0]], strict=True)
                     if a["generation_tokens_per_s"] and b["generation_tokens_per_s"]]
              for name in names[1:]}
    for name in names[1:]:
        summary[name]["median_per_run_ratio"] = _r(statistics.median(paired[name]), 4) \
            if paired[name] else None
    return {
        "configs": {k: [{"path": str(p), "scale": s} for p, s in v] for k, v in configs.items()},
        "summary": summary,
        "deterministic": deterministic,
        "adapters_change_logprobs": differs,
        "adapters_change_greedy_tokens": text_differs,
        "first_token_top_logprobs": logprobs,
        "per_run_ratios": paired,
        "warmup": [_strip(r) for r in warmup],
        "discarded_contended_runs": [_strip(r) for r in discarded],
        "runs": {k: [_strip(r) for r in v] for k, v in runs.items()},
        "daemon_exit_code": exit_code,
        "daemon_log_errors": daemon.log_errors(),
    }


def first_token_logprobs(ctx: Any, loras: list[tuple[str, float]], k: int = 5
                         ) -> list[list[float]]:
    """The top-``k`` log-probabilities of the first generated token (rounded)."""
    stream = ctx.generate(PROMPT, max_tokens=1, temperature=0, seed=0, logprobs=k, loras=loras)
    out: list[list[float]] = []
    for chunk in stream:
        for entry in chunk.logprobs or []:
            out.extend([int(t), round(float(lp), 4)] for t, lp in entry)
    return out


def _strip(r: dict[str, Any]) -> dict[str, Any]:
    return {k: (_r(v) if isinstance(v, float) else v) for k, v in r.items()}


def print_generation(g: dict[str, Any], tokens: int) -> None:
    rows = [(name, fmt(s["median_generation_tokens_per_s"], ".2f"),
             fmt(s["ratio_to_0_adapters"], ".3f"), fmt(s.get("median_per_run_ratio"), ".3f"),
             fmt(s["median_ttft_ms"], ".1f"), f"{s['runs']} ({s['contended_runs']})")
            for name, s in g["summary"].items()]
    print_table(f"(c) generation through the daemon ({tokens} tokens greedy, medians)",
                ("adapters", "gen tok/s", "ratio", "paired ratio", "TTFT ms",
                 "runs (contended)"), rows)
    print("adapters change the first token's log-probabilities: "
          + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in
                      g["adapters_change_logprobs"].items())
          + "; the greedy tokens: "
          + ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in
                      g["adapters_change_greedy_tokens"].items())
          + ";  deterministic: " + ("yes" if all(g["deterministic"].values()) else "NO"))


# -- main ---------------------------------------------------------------------------------------
SECTIONS = ("latency", "memory", "generation")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="GGUF model (default: the path `lorad default-model` prints)")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--repeats", type=int, default=50, help="latency repeats per operation")
    p.add_argument("--reload-repeats", type=int, default=15,
                   help="constructions of llama_cpp.Llama for the reload baseline")
    p.add_argument("--ttft-repeats", type=int, default=10,
                   help="TTFT pairs (unchanged stack / after a scale change)")
    p.add_argument("--contexts", type=int, default=8, help="contexts (and Llama objects)")
    p.add_argument("--memory-tokens", type=int, default=8,
                   help="tokens of the short generation in each memory context")
    p.add_argument("--n-ctx", type=int, default=1024)
    p.add_argument("--n-batch", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rank", type=int, default=16, help="rank of the generated adapters")
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--std", type=float, default=0.03,
                   help="standard deviation of the random A and B entries")
    p.add_argument("--tokens", type=int, default=128, help="tokens per generation run")
    p.add_argument("--runs", type=int, default=5, help="generation runs per configuration")
    p.add_argument("--wait-idle", type=float, default=20.0, metavar="SECONDS",
                   help="before each generation run, wait up to this long for an idle machine")
    p.add_argument("--idle-threshold", type=float, default=0.10)
    p.add_argument("--retries", type=int, default=3,
                   help="measure a generation round again (at most this many times) when "
                   "another process was busy during one of its runs")
    p.add_argument("--json-out", default=str(REPO / "bench" / "results" / "lora.json"))
    p.add_argument("--child-llamas", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_llamas:
        return child_llamas(args.child_llamas)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}")
    if args.repeats < 2 or args.runs < 1 or args.contexts < 3 or args.tokens < 2:
        p.error("need --repeats >= 2, --runs >= 1, --contexts >= 3, --tokens >= 2")
    args.reload_repeats = min(args.reload_repeats, args.repeats)

    import llama_cpp

    started = time.time()
    info = machine_info()
    model = str(Path(args.model).expanduser().resolve()) if args.model else default_model_path()
    arch, shapes = model_tensors(model)
    print(f"model: {model} ({arch})")
    workdir = Path(tempfile.mkdtemp(prefix="lorad-lora-"))
    adapters = Adapters(workdir / "adapters", arch, shapes, rank=args.rank, alpha=args.alpha,
                        std=args.std)
    problems: list[str] = []
    results: dict[str, Any] = {}
    runners = {"latency": section_latency, "memory": section_memory,
               "generation": section_generation}
    printers = {"latency": print_latency, "memory": print_memory,
                "generation": lambda g: print_generation(g, args.tokens)}
    try:
        for name in sections:
            print(f"\n== {name} ==", flush=True)
            try:
                results[name] = runners[name](args, model, workdir, adapters, problems)
            except Exception as exc:
                text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
                problems.append(f"{name}: failed: {text}")
                results[name] = {"error": text, "traceback": traceback.format_exc()}
                for log in sorted(workdir.glob(f"{name}.log")):
                    tail = log.read_text(errors="replace").splitlines()[-30:]
                    results[name]["daemon_log_tail"] = tail
                print(f"{name} FAILED: {text}", file=sys.stderr)
                continue
            printers[name](results[name])
    finally:
        one = adapters.written[0] if adapters.written else {}
        settings = {
            "sections": sections, "repeats": args.repeats, "reload_repeats": args.reload_repeats,
            "ttft_repeats": args.ttft_repeats, "contexts": args.contexts, "n_ctx": args.n_ctx,
            "n_batch": args.n_batch, "n_threads": args.threads, "rank": args.rank,
            "alpha": args.alpha, "std": args.std, "targets": list(TARGETS),
            "tokens": args.tokens, "runs": args.runs, "retries": args.retries,
            "memory_tokens": args.memory_tokens,
            "prompt": PROMPT, "use_extra_bufts": False,
        }
        info["loadavg_end"] = list(os.getloadavg())
        result = {
            "benchmark": "lora",
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "duration_s": round(time.time() - started, 1),
            "machine": info,
            "software": {"llama_cpp_python": llama_cpp.__version__, "git": git_info()},
            "model": {"path": model, "architecture": arch,
                      "size_bytes": os.path.getsize(model)},
            "adapter": {k: one.get(k) for k in ("tensors", "tensor_bytes", "file_bytes")},
            "settings": settings,
            "definitions": {
                "latency": "perf_counter around one sync Client call (request sent -> reply)",
                "pss": "Pss: line of /proc/PID/smaps_rollup (bytes)",
                "per_context_bytes": "median PSS delta per added context, first one excluded",
                "formula_bytes": "model weights bytes (llama_model_size) + contexts x "
                                 "per_context_bytes",
                "runtime_bytes": "PSS of the daemon right after READY=1 (no model)",
                "generation_tokens_per_s": "(n - 1) / (t_last_token - t_first_token)",
            },
            **results,
            "problems": problems,
        }
        out = Path(args.json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        shutil.rmtree(workdir, ignore_errors=True)
    if problems:
        print("\nproblems:")
        for line in problems:
            print(f"  - {line}")
    print(f"\nJSON: {out}")
    return 1 if any("failed" in pr for pr in problems) else 0


if __name__ == "__main__":
    sys.exit(main())
