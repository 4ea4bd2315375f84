"""Speculative decoding: lorad against llama-server, with n-gram drafts and with a draft model.

Usage::

    .venv/bin/python bench/speculative.py [--rounds 3] [--tokens 128] [--threads 2]
                                          [--sections ngram,repeat,draft] [--open 6]
                                          [--repeat-open 2] [--draft-open 2]
                                          [--llama-server PATH] [--llama-cpp-python]
                                          [--lookup-extra '{"adaptive": false}']
                                          [--json-out bench/results/speculative.json]

Three sections, each its own table (``--help`` lists every option):

``ngram``, first sight (the default model, gemma 3 270M Q4_K_M)
    One input-grounded prompt (copy a passage the prompt contains: n-gram drafts are accepted
    often) and six open-ended ones (a list, explanations, an essay, a product description). The
    open prompts were chosen among ~60 tried because the small model's greedy continuation does
    not repeat itself within 128 tokens: its greedy stories and most explanations fall into a
    loop within 30-60 tokens (and a loop is exactly what n-grams predict). The table shows, for
    each prompt, the share of output tokens that a 3-gram lookup in the prompt and the output so
    far predicts (``3g-hit``), from lorad's output without speculation. Configurations:
    ``lorad off``; ``lorad prompt_lookup`` (``{"mode": "prompt_lookup"}``: the defaults, adaptive
    draft length, ``ngram`` 1-3, ``max_draft`` 64); ``llama-server none``; ``llama-server
    ngram-simple`` and ``llama-server ngram-mod`` (``--spec-type``, with llama-server's own
    defaults for each mode: ngram-simple looks up a 12-token n-gram and drafts up to 48 tokens,
    ngram-mod drafts 48-64 after a 24-token match). ``--llama-cpp-python`` adds the rows of the
    previous version of this script: llama-cpp-python in-process, plain and with its
    ``LlamaPromptLookupDecoding`` (``num_pred_tokens`` 8). Every run is a first sight: lorad
    runs it on a new context, and llama-server is restarted before it. ``ngram-mod`` keeps one
    table of every text the server has seen, across requests and slots, so without the restart
    every round after the first (and the warm-up) drafts the answer it gave before: measured,
    114 tok/s the first time the grounded prompt is sent and 173 tok/s the second.
``repeat``, the request sent again (the grounded prompt and the first ``--repeat-open`` open
    prompts)
    Each configuration gets the same request twice in a row, the second measured: lorad on one
    context (its memory of earlier outputs), llama-server restarted before the pair (its
    ``ngram-mod`` table). Configurations: ``lorad off``, ``lorad prompt_lookup``,
    ``llama-server none`` and ``ngram-mod``. This is a "regenerate", or an agent sending a
    request it sent before.
``draft`` (a draft-model pair)
    The target is the default model with every tensor dequantized to F16 (written once by
    ``bench/make_target.py`` into ``~/.cache/lorad/models/``), the draft is the Q4_K_M original:
    the same vocabulary, and the draft reads half the bytes per token. The grounded prompt and
    the first ``--draft-open`` open prompts. Configurations: ``lorad off``, ``lorad draft_model``
    (``{"mode": "draft_model", "model": <Q4_K_M path>}``: defaults, ``max_draft`` 8, ``p_min``
    0.5, adaptive), ``llama-server none`` and ``llama-server draft`` on the F16 target
    (``--spec-type draft-simple -md <Q4_K_M path> --spec-draft-n-max 8 --spec-draft-p-min 0.5``:
    lorad's defaults, so like is compared with like).

**Decode tokens/s**, the same definition on both sides and measured inside each engine:
``(generated tokens - 1) / generation time``, where generation time runs from the first token
(sampled from the prompt's last batch: it costs no decoding step) to the end of the generation.
llama-server: ``timings.predicted_per_second`` of the ``/completion`` response, which is exactly
``(predicted_n - 1) / predicted_ms``. lorad: from the end metrics, generation time =
``generated_tokens / generation_tokens_per_s`` (the daemon counts from the end of prompt
processing, when the first token is sampled, to the end; that end also includes closing the
sampler and the last send, a few hundred microseconds that count against lorad). The prompt is
not counted on either side. lorad's rate as its client sees the tokens arrive,
``(n - 1) / (t_last - t_first)``, is in the JSON too (``consumer_tps``).

Fairness: every configuration is greedy (temperature 0; llama-server ``repeat_penalty`` 1) with
``--tokens`` new tokens at most (both stop at end-of-generation), ``--threads`` threads, the whole
prompt evaluated each time (llama-server ``cache_prompt: false``; lorad after one token from a
prompt without BOS on its context, new or not, so that no prefix is reused: logits differ slightly
with the shape of the batch a token is computed in, so a prompt evaluated once whole and once after
a reused BOS can part greedy outputs at a near tie, and a request sent again would part from its
first answer for that reason alone), the same weight repacking on both sides (``--repack``: lorad's
``auto`` rule decides for both), llama-server ``-c 4096 -np 1 --swa-full``, lorad ``n_ctx`` 2048.
``--swa-full`` because lorad keeps a full-size SWA cache: with llama-server's default smaller SWA
cache its greedy output on an open prompt differs from lorad's from the third token (a near tie
that the other KV layout flips). The generated token ids of every configuration are compared with
lorad's without speculation (greedy speculative output should be the same; a different batch shape
can flip a near tie, so this is reported, not required).

Alternation: each round runs every configuration on a prompt back to back, in an order that
rotates from round to round and prompt to prompt (ABCDE, BCDEA, ...), after one warm-up run of
each configuration; the tables show medians over ``--rounds`` rounds, and ratios of medians
(the median of the per-round ratios is in the JSON). A shared machine: before each run the script
waits (at most ``--wait-idle`` s) for the machine to be idle, and measures a prompt's round again
(at most ``--retries`` times) when another process used more than 5 % of the CPUs during one of
its runs, keeping the least contended attempt (the table warns if contended runs were kept); the
discarded runs stay in the JSON.

Targets (printed with pass/fail): lorad ``prompt_lookup`` >= 1.0x lorad off on every open
prompt; lorad ``prompt_lookup`` on the grounded prompt >= 1.0x llama-server's best n-gram mode,
at first sight and sent again.
The JSON (``--json-out``) has every run, the settings, the commands, the CPU model, the git
commit and a digest of the daemon/client/protocol sources.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import http.client
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from llama_server import DEFAULT_LLAMA_SERVER, free_port, llama_server_version
from throughput import (
    CONTENDED,
    _process_ticks,
    _system_ticks,
    _term_with_parent,
    default_model_path,
    git_info,
    llama_kwargs,
    machine_info,
    median,
    no_extra_bufts,
    start_daemon,
    stop_daemon,
    wait_for_idle,
)

from passages import COPY

REPO = Path(__file__).resolve().parent.parent
FLUSH_PROMPT = "Flush."

GROUNDED = {"grounded": COPY}  # copy a passage the prompt contains (tests/passages.py)

# Greedy continuations by gemma 3 270M that do not loop within 128 tokens (module docstring).
OPEN = {
    "tips": "Here are some tips for staying healthy during the winter:\n\n1.",
    "internet": "The internet changed the world in many ways. First,",
    "printing": "The invention of the printing press changed Europe in many ways. First,",
    "backpack": "Product description: This lightweight backpack",
    "smartphone": "The smartphone changed our lives in many ways. First,",
    "exercise": "Regular exercise has many benefits. First,",
}
LOOKUP = {"mode": "prompt_lookup"}  # every parameter at its default (adaptive)
SECTION_TITLES = {"ngram": "first sight", "repeat": "the request sent again",
                  "draft": "draft model"}

LORAD_OFF, LORAD_LOOKUP, LORAD_DRAFT = "lorad off", "lorad prompt_lookup", "lorad draft_model"
SRV_NONE, SRV_SIMPLE, SRV_MOD = ("llama-server none", "llama-server ngram-simple",
                                 "llama-server ngram-mod")
SRV_DRAFT = "llama-server draft"
LCP, LCP_LOOKUP = "llama-cpp-python", "llama-cpp-python prompt lookup"


def ngram_hit_rate(prompt_ids: list[int], output: list[int], n: int = 3) -> float | None:
    """Share of ``output`` tokens that the token after the last earlier occurrence of the
    preceding ``n``-gram (in prompt + output so far) predicts: how repetitive the output is."""
    if not output:
        return None
    seq, hits = list(prompt_ids), 0
    for tok in output:
        suffix, predicted = seq[-n:], None
        for i in range(len(seq) - n - 1, -1, -1):
            if seq[i:i + n] == suffix:
                predicted = seq[i + n]
                break
        hits += predicted == tok
        seq.append(tok)
    return round(hits / len(output), 3)


def _r(v: float | None, nd: int = 2) -> float | None:
    return round(v, nd) if v is not None else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


# -- llama-server -------------------------------------------------------------------------------
def llama_server_problem(binary: Path) -> str | None:
    """Why llama-server cannot be used (None: it can)."""
    if not binary.exists():
        return f"{binary} does not exist"
    if not os.access(binary, os.X_OK):
        return f"{binary} is not executable"
    try:
        out = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{binary} --help failed: {e}"
    text = out.stdout + out.stderr
    if out.returncode != 0 or "--spec-type" not in text:
        return (f"{binary} --help exited {out.returncode} or lists no --spec-type: "
                f"{text.strip()[-300:]}")
    missing = [m for m in ("ngram-simple", "ngram-mod", "draft-simple") if m not in text]
    if missing:
        return f"{binary} lacks spec types {missing}"
    return None


class LlamaServer:
    """A llama-server subprocess; ready when ``/health`` answers 200 (it has no notification)."""

    def __init__(self, binary: Path, model: str, label: str, args: list[str], workdir: Path,
                 *, threads: int, n_ctx: int, repack: bool, ready_timeout: float = 180) -> None:
        self.label = label
        self.ready_timeout = ready_timeout
        self.log_path = workdir / f"{label.replace(' ', '-')}.log"
        self.workdir = workdir
        self.cmd = [str(binary), "-m", model, "-t", str(threads), "-tb", str(threads),
                    "-c", str(n_ctx), "-np", "1", "--no-webui", "--host", "127.0.0.1",
                    "--swa-full", *([] if repack else ["--no-repack"]), *args]
        self._start()

    def _start(self) -> None:
        self.port = free_port()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([*self.cmd, "--port", str(self.port)], stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=self.workdir, preexec_fn=_term_with_parent)
        deadline = time.monotonic() + self.ready_timeout
        while self._request("GET", "/health", timeout=5)[0] != 200:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"{self.label} not ready; its log:\n"
                                   f"{self.log_path.read_text(errors='replace')[-4000:]}")
            time.sleep(0.2)  # llama-server has no readiness notification: poll /health

    def restart(self) -> None:
        """A new process: nothing learnt from earlier requests (``ngram-mod`` keeps a table of
        every text it has seen, across requests and slots)."""
        self.close()
        self._start()

    def _request(self, method: str, path: str, body: Any = None, timeout: float = 600
                 ) -> tuple[int | None, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=data,
                         headers={"Content-Type": "application/json"} if data else {})
            resp = conn.getresponse()
            raw = resp.read()
            try:
                return resp.status, json.loads(raw)
            except ValueError:
                return resp.status, raw.decode(errors="replace")
        except (OSError, http.client.HTTPException):
            return None, None
        finally:
            conn.close()

    def run(self, prompt: str, tokens: int) -> dict[str, Any]:
        status, r = self._request("POST", "/completion", {
            "prompt": prompt, "n_predict": tokens, "temperature": 0, "repeat_penalty": 1.0,
            "cache_prompt": False, "return_tokens": True})
        if status != 200 or not isinstance(r, dict):
            raise RuntimeError(f"{self.label}: /completion answered {status}: {r!r:.500}")
        t = r["timings"]
        n, gen_ms = t["predicted_n"], t["predicted_ms"]
        drafted = t.get("draft_n", 0)
        return {"n": n, "gen_s": gen_ms / 1000,
                "tps": (n - 1) / (gen_ms / 1000) if n > 1 and gen_ms > 0 else None,
                "server_predicted_per_second": t.get("predicted_per_second"),
                "prompt_tokens": t.get("prompt_n"), "prompt_ms": t.get("prompt_ms"),
                "tokens": r.get("tokens") or [],
                "drafted": drafted, "accepted": t.get("draft_n_accepted", 0),
                "finish": r.get("stop_type"), "text": r.get("content", "")}

    def pids(self) -> list[int]:
        return [self.proc.pid]

    def close(self) -> None:
        stop_daemon(self.proc)  # SIGTERM, SIGKILL after 30 s


# -- lorad --------------------------------------------------------------------------------------
class Lorad:
    """A ``lorad serve`` subprocess (readiness: ``READY=1`` on a notify socket) and a client."""

    def __init__(self, workdir: Path, allow_dirs: list[Path], *, repack: bool) -> None:
        from lorad.client import Client

        endpoint = f"ipc://{workdir}/lorad.sock"
        self.log_path = workdir / "daemon.log"
        self.proc = start_daemon(endpoint, allow_dirs, self.log_path, cwd=workdir,
                                 extra_args=["--repack", "on" if repack else "off"])
        self.client = Client(endpoint, timeout=600)
        self.contexts: dict[str, Any] = {}

    def context(self, model: str, *, n_ctx: int, threads: int) -> Any:
        if model not in self.contexts:
            self.contexts[model] = self.client.create_context(model, n_ctx=n_ctx,
                                                              n_threads=threads)
        return self.contexts[model]

    def renew(self, model: str, *, n_ctx: int, threads: int) -> None:
        """Close ``model``'s context and create another: no memory of earlier requests."""
        old = self.contexts.pop(model, None)
        if old is not None:
            old.close()
        self.context(model, n_ctx=n_ctx, threads=threads)

    def run(self, model: str, prompt: str, tokens: int, speculative: Any) -> dict[str, Any]:
        ctx = self.contexts[model]
        # Before every run, new context or not: a prompt without BOS, so that no prefix is
        # reused and every run evaluates the whole prompt in one batch (the module's "Fairness").
        ctx.generate(FLUSH_PROMPT, max_tokens=1, temperature=0, add_special=False).collect()
        stamps: list[float] = []
        ids: list[int] = []
        stream = ctx.generate(prompt, max_tokens=tokens, temperature=0, speculative=speculative)
        for chunk in stream:
            now = time.perf_counter()
            for t in chunk.token_ids:
                stamps.append(now)
                ids.append(t)
        m = stream.metrics
        n, rate = m["generated_tokens"], m.get("generation_tokens_per_s")
        gen_s = n / rate if rate else None
        consumer = ((len(stamps) - 1) / (stamps[-1] - stamps[0])
                    if len(stamps) > 1 and stamps[-1] > stamps[0] else None)
        return {"n": n, "gen_s": gen_s, "tps": (n - 1) / gen_s if gen_s and n > 1 else None,
                "generation_tokens_per_s": rate, "consumer_tps": consumer,
                "prompt_tokens": m.get("prompt_tokens"),
                "ttft_ms": m.get("time_to_first_token_ms"), "tokens": ids,
                "drafted": m.get("drafted_tokens"), "accepted": m.get("accepted_tokens"),
                "memory_drafted": m.get("memory_drafted_tokens"),
                "speculative": m.get("speculative"), "finish": stream.finish_reason,
                "text": stream.text}

    def pids(self) -> list[int]:
        return [self.proc.pid]

    def close(self) -> None:
        for ctx in self.contexts.values():
            with contextlib.suppress(Exception):
                ctx.close()
        with contextlib.suppress(Exception):
            self.client.close()
        stop_daemon(self.proc)


# -- llama-cpp-python in-process (the previous version's reference rows) -----------------------
class InProcess:
    def __init__(self, model: str, *, n_ctx: int, threads: int, lookup: bool,
                 repack: bool) -> None:
        import llama_cpp
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        kwargs = llama_kwargs(n_ctx=n_ctx, n_threads=threads, n_batch=512)
        if lookup:
            kwargs["draft_model"] = LlamaPromptLookupDecoding(num_pred_tokens=8)
        with contextlib.nullcontext() if repack else no_extra_bufts():
            self.llm = llama_cpp.Llama(model, **kwargs)
        self.is_eog = llama_cpp.llama_cpp.llama_vocab_is_eog

    def run(self, prompt: str, tokens: int) -> dict[str, Any]:
        ids: list[int] = []
        stamps: list[float] = []
        prompt_ids = self.llm.tokenize(prompt.encode(), add_bos=True)
        for tok in self.llm.generate(prompt_ids, temp=0.0, repeat_penalty=1.0, reset=True):
            now = time.perf_counter()
            if self.is_eog(self.llm._model.vocab, tok):
                break
            ids.append(tok)
            stamps.append(now)
            if len(ids) >= tokens:
                break
        n = len(ids)
        gen_s = stamps[-1] - stamps[0] if n > 1 else None
        return {"n": n, "gen_s": gen_s, "tps": (n - 1) / gen_s if gen_s else None,
                "tokens": ids, "text": self.llm.detokenize(ids).decode(errors="replace")}

    def pids(self) -> list[int]:
        return []

    def close(self) -> None:
        self.llm.close()


# -- configurations, runs, rounds ---------------------------------------------------------------
@dataclass
class Config:
    name: str
    runner: Any  # a callable (prompt, tokens) -> run dict
    spec: Any = None  # what it runs, for the JSON
    renew: Any = None  # a callable that forgets earlier requests (before each run, untimed)


class OwnCpu:
    """Busy CPU of the machine minus this benchmark's own processes, between two points."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.t0 = time.monotonic()
        self.busy0, _ = _system_ticks()
        self.own0 = self._own()

    def _own(self) -> int:
        return _process_ticks("self") + sum(_process_ticks(p) for p in self.pids)

    def stop(self) -> dict[str, float]:
        hz = os.sysconf("SC_CLK_TCK")
        wall = max(time.monotonic() - self.t0, 1e-9)
        busy, _ = _system_ticks()
        own = (self._own() - self.own0) / hz
        other = max((busy - self.busy0) / hz - own, 0.0) / (wall * (os.cpu_count() or 1))
        return {"wall_s": round(wall, 3), "own_cpu_s": round(own, 3),
                "other_processes_cpu_frac": round(other, 3)}


def measure(config: Config, prompt: str, tokens: int, pids: Any, wait_idle: float
            ) -> dict[str, Any]:
    idle = wait_for_idle(wait_idle, 0.10) if wait_idle > 0 else None
    cpu = OwnCpu(pids())
    run = config.runner(prompt, tokens)
    run["cpu"] = cpu.stop()
    run["idle_wait"] = idle
    run["contended"] = run["cpu"]["other_processes_cpu_frac"] > CONTENDED
    return run


def run_section(name: str, configs: list[Config], prompts: dict[str, str], args: Any,
                pids: Any, *, again: bool = False) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Every configuration on every prompt, ``args.rounds`` rounds, rotating order; returns
    ``{prompt: {config: [run, ...]}}`` (discarded runs have ``discarded: True``). Each run
    starts by forgetting earlier requests where a configuration can (``renew``); ``again``:
    then the same request once, unmeasured, so that the measured run is its second.
    ``pids``: a callable, the benchmark's processes now."""
    results: dict[str, dict[str, list[dict[str, Any]]]] = {
        p: {c.name: [] for c in configs} for p in prompts}
    warm = next(iter(prompts.values()))
    for c in configs:  # warm-up: first requests, loads on demand (lorad's draft model)
        c.runner(warm, min(args.tokens, 16))
    for r in range(args.rounds):
        for pi, (pname, prompt) in enumerate(prompts.items()):
            k = (r + pi) % len(configs)
            order = configs[k:] + configs[:k]
            attempts: list[list[dict[str, Any]]] = []
            for attempt in range(args.retries + 1):
                runs = []
                for c in order:
                    if c.renew is not None:
                        c.renew()
                    if again:
                        c.runner(prompt, args.tokens)
                    run = measure(c, prompt, args.tokens, pids, args.wait_idle)
                    run.update(round=r, attempt=attempt, config=c.name)
                    runs.append(run)
                attempts.append(runs)
                contended = [x["config"] for x in runs if x["contended"]]
                retry = bool(contended) and attempt < args.retries
                tps = "  ".join(f"{x['config'].replace('llama-server', 'srv')}="
                                f"{x['tps'] or 0:.1f}" for x in runs)
                flag = f"  contended: {', '.join(contended)}" if contended else ""
                print(f"  [{name}] round {r + 1}/{args.rounds} {pname:<10} {tps}{flag}"
                      + ("  (measured again)" if retry else ""), flush=True)
                if not retry:
                    break
            # keep the least contended attempt (the last one unless all were contended)
            best = min(range(len(attempts)), key=lambda i: (
                any(x["contended"] for x in attempts[i]),
                max(x["cpu"]["other_processes_cpu_frac"] for x in attempts[i])))
            for i, runs in enumerate(attempts):
                for x in runs:
                    x["discarded"] = i != best
                    results[pname][x["config"]].append(x)
    return results


def summarise(results: dict[str, dict[str, list[dict[str, Any]]]], base: str,
              prompt_ids: dict[str, list[int]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pname, by_config in results.items():
        kept = {c: [x for x in runs if not x["discarded"]] for c, runs in by_config.items()}
        base_runs = kept.get(base) or []
        base_tokens = base_runs[0]["tokens"] if base_runs else None
        base_tps = median([x["tps"] for x in base_runs])
        entry: dict[str, Any] = {
            "sample_text": base_runs[0].get("text") if base_runs else None, "configs": {}}
        for c, runs in kept.items():
            tps = median([x["tps"] for x in runs])
            drafted = sum(x.get("drafted") or 0 for x in runs)
            accepted = sum(x.get("accepted") or 0 for x in runs)
            per_round = []
            for x in runs:
                b = next((y for y in base_runs if y["round"] == x["round"]), None)
                if b is not None and x["tps"] and b["tps"]:
                    per_round.append(x["tps"] / b["tps"])
            entry["configs"][c] = {
                "decode_tokens_per_s": _r(tps),
                "ratio_vs_" + base.replace(" ", "_"): _ratio(tps, base_tps),
                "median_per_round_ratio": _r(median(per_round), 3),
                "acceptance_rate": round(accepted / drafted, 3) if drafted else None,
                "drafted_per_run": round(drafted / len(runs), 1) if runs else None,
                "memory_drafted_per_run": round(sum(x.get("memory_drafted") or 0
                                                    for x in runs) / len(runs), 1)
                if runs else None,
                "generated_tokens": [x["n"] for x in runs],
                "contended_runs_kept": sum(x["contended"] for x in runs),
                "same_tokens_as_" + base.replace(" ", "_"):
                    all(x["tokens"] == base_tokens for x in runs) if base_tokens else None,
                "consumer_tps": _r(median([x.get("consumer_tps") for x in runs])),
                "ngram3_hit_rate": ngram_hit_rate(prompt_ids.get(pname, []),
                                                  runs[0]["tokens"]) if runs else None,
                "first_run_tokens": runs[0]["tokens"] if runs else None,
                "first_run_text": runs[0].get("text") if runs else None,
                "runs": [{k: v for k, v in x.items() if k not in ("tokens", "text")}
                         for x in by_config[c]],
            }
        out[pname] = entry
    return out


def print_table(title: str, summary: dict[str, Any], configs: list[str], base: str) -> None:
    print(f"\n{title}\n")
    ratio_key = "ratio_vs_" + base.replace(" ", "_")
    same_key = "same_tokens_as_" + base.replace(" ", "_")
    print(f"{'prompt':<11} {'3g-hit':>6}  {'configuration':<28} {'decode tok/s':>12} "
          f"{'x ' + base:>10} {'acceptance':>10} {'draft/run':>9} {'tokens':>6}  same tokens")
    for pname, entry in summary.items():
        for i, c in enumerate(configs):
            s = entry["configs"].get(c)
            if s is None:
                continue
            hit = s["ngram3_hit_rate"]
            acc = s["acceptance_rate"]
            dpr = s["drafted_per_run"]
            ntok = min(s["generated_tokens"]) if s["generated_tokens"] else 0
            print(f"{pname if i == 0 else '':<11} "
                  f"{'' if hit is None else f'{hit:.2f}':>6}  {c:<28} "
                  f"{s['decode_tokens_per_s'] or 0:>12.2f} {s[ratio_key] or 0:>10.3f} "
                  f"{'' if acc is None else f'{acc:.3f}':>10} "
                  f"{'' if not dpr else f'{dpr:.0f}':>9} {ntok:>6}  "
                  f"{'' if s[same_key] is None else ('yes' if s[same_key] else 'NO')}")
    contended = sum(s["contended_runs_kept"] for e in summary.values()
                    for s in e["configs"].values())
    if contended:
        print(f"WARNING: {contended} of the runs kept were contended (other processes used "
              f"> {CONTENDED:.0%} of the CPUs): their figures are not reliable")


def check_targets(summary: dict[str, Any], open_names: list[str], have_server: bool,
                  *, again: bool = False) -> list[dict[str, Any]]:
    """The targets of an n-gram section (``again``: the repeat section, grounded only)."""
    targets = []
    if open_names:
        ratios = {p: summary[p]["configs"][LORAD_LOOKUP]["ratio_vs_lorad_off"]
                  for p in open_names if p in summary}
        worst = min(ratios, key=lambda p: ratios[p] or 0)
        targets.append({
            "target": "lorad prompt_lookup >= 1.0x lorad off on every open prompt",
            "pass": all((v or 0) >= 1.0 for v in ratios.values()), "ratios": ratios,
            "detail": f"lowest {ratios[worst] or 0:.3f} on '{worst}'"})
    g = summary.get("grounded")
    if g is None:
        return targets
    lookup = g["configs"][LORAD_LOOKUP]["decode_tokens_per_s"]
    servers = {c: g["configs"][c]["decode_tokens_per_s"] for c in (SRV_SIMPLE, SRV_MOD)
               if c in g["configs"]}
    name = "lorad prompt_lookup on the grounded prompt >= 1.0x llama-server's best n-gram mode"
    name += " (the request sent again)" if again else " (first sight)"
    if not have_server or not servers:
        targets.append({"target": name, "pass": None, "detail": "skipped: no llama-server"})
    else:
        best = max(servers, key=lambda c: servers[c] or 0)
        ratio = _ratio(lookup, servers[best])
        targets.append({"target": name, "pass": (ratio or 0) >= 1.0, "ratio": ratio,
                        "best_server_mode": best,
                        "detail": f"{lookup} vs {best} {servers[best]} tok/s: {ratio}x"})
    return targets


# -- main ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: lorad default-model")
    ap.add_argument("--sections", default="ngram,repeat,draft",
                    help="a comma-separated choice of ngram, repeat and draft")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=2048, help="lorad's contexts")
    ap.add_argument("--server-ctx", type=int, default=4096, help="llama-server's -c")
    ap.add_argument("--open", type=int, default=len(OPEN),
                    help=f"how many of the {len(OPEN)} open prompts (ngram section)")
    ap.add_argument("--repeat-open", type=int, default=2,
                    help="how many open prompts in the repeat section (besides the grounded one)")
    ap.add_argument("--draft-open", type=int, default=2,
                    help="how many open prompts in the draft section (besides the grounded one)")
    ap.add_argument("--llama-server", type=Path, default=DEFAULT_LLAMA_SERVER)
    ap.add_argument("--no-llama-server", action="store_true", help="skip llama-server")
    ap.add_argument("--llama-cpp-python", action="store_true",
                    help="add llama-cpp-python in-process rows (plain, prompt lookup)")
    ap.add_argument("--repack", choices=["auto", "on", "off"], default="auto",
                    help="weight repacking on both sides (auto: lorad's rule for this CPU)")
    ap.add_argument("--target", type=Path, default=None,
                    help="the draft section's target (default: bench/make_target.py's F16)")
    ap.add_argument("--lookup-extra", action="append", default=[], metavar="JSON",
                    help="another lorad prompt_lookup row (ngram section): parameters merged "
                         "into {\"mode\": \"prompt_lookup\"}, e.g. '{\"adaptive\": false}'")
    ap.add_argument("--server-draft-max", type=int, default=8)
    ap.add_argument("--server-draft-p-min", type=float, default=0.5)
    ap.add_argument("--wait-idle", type=float, default=20,
                    help="before each run, wait up to this long for an idle machine (0: never)")
    ap.add_argument("--retries", type=int, default=2,
                    help="measure a prompt's round again when a run was contended")
    ap.add_argument("--json-out", default=str(REPO / "bench" / "results" / "speculative.json"))
    args = ap.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if not set(sections) <= set(SECTION_TITLES) or not sections:
        ap.error("--sections: a comma-separated choice of ngram, repeat and draft")
    if args.tokens < 2 or args.rounds < 1:
        ap.error("--tokens must be >= 2 and --rounds >= 1")

    from lorad.daemon.repack import decide

    started = time.time()
    info = machine_info()
    repack = decide(args.repack)
    model = str(Path(args.model).expanduser().resolve()) if args.model else default_model_path()
    server_problem = "--no-llama-server" if args.no_llama_server else \
        llama_server_problem(args.llama_server)
    if server_problem:
        print(f"llama-server columns skipped: {server_problem}")
    server_version = None if server_problem else llama_server_version(args.llama_server)
    open_ngram = dict(list(OPEN.items())[:args.open])
    open_draft = dict(list(OPEN.items())[:args.draft_open])
    open_repeat = dict(list(OPEN.items())[:args.repeat_open])
    print(f"CPU: {info['cpu_model']} ({info['nproc']} CPUs), repack "
          f"{'on' if repack.enabled else 'off'} ({repack.reason}); llama-server: "
          f"{server_version or 'skipped'}")

    out: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "machine": info, "git": git_info(), "llama_server": {
            "binary": str(args.llama_server), "version": server_version,
            "skipped": server_problem},
        "settings": {
            "tokens": args.tokens, "rounds": args.rounds, "threads": args.threads,
            "lorad_n_ctx": args.n_ctx, "server_ctx": args.server_ctx,
            "repack": repack.to_wire(), "wait_idle_s": args.wait_idle,
            "retries": args.retries, "sampling": "greedy (temperature 0)",
            "decode_tokens_per_s": "(generated - 1) / generation time (first token sampled to "
                                   "the end), measured in each engine (module docstring)",
            "order": "warm-up of each configuration, then per round and prompt every "
                     "configuration back to back in a rotating order"},
        "prompts": {**GROUNDED, **OPEN}, "sections": {}}

    all_targets: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="lorad-spec-") as tmp:
        workdir = Path(tmp)
        models_dir = Path(model).parent
        target = None
        if "draft" in sections:
            from make_target import ensure_target

            target = str((args.target or ensure_target(model)).resolve())
        allow = sorted({models_dir, *([Path(target).parent] if target else [])})
        lorad = Lorad(workdir, allow, repack=repack.enabled)
        try:
            for section in [x for x in ("ngram", "repeat") if x in sections]:
                again = section == "repeat"
                lorad.context(model, n_ctx=args.n_ctx, threads=args.threads)
                renew = functools.partial(lorad.renew, model, n_ctx=args.n_ctx,
                                          threads=args.threads)
                prompts = {**GROUNDED, **(open_repeat if again else open_ngram)}
                lookups = [(LORAD_LOOKUP, LOOKUP)]
                for extra_json in args.lookup_extra:
                    extra = {**LOOKUP, **json.loads(extra_json)}
                    lookups.append(("lorad lookup " + ",".join(
                        f"{k}={json.dumps(v)}" for k, v in extra.items() if k != "mode"), extra))
                configs = [Config(LORAD_OFF, lambda p, n: lorad.run(model, p, n, False), False,
                                  renew)]
                configs += [Config(label, lambda p, n, s=spec: lorad.run(model, p, n, s), spec,
                                   renew) for label, spec in lookups]
                modes = [(SRV_NONE, []), (SRV_SIMPLE, ["--spec-type", "ngram-simple"]),
                         (SRV_MOD, ["--spec-type", "ngram-mod"])]
                closers: list[Any] = []
                try:
                    if not server_problem:
                        for label, extra in modes if not again else [modes[0], modes[2]]:
                            srv = LlamaServer(args.llama_server, model, label, extra, workdir,
                                              threads=args.threads, n_ctx=args.server_ctx,
                                              repack=repack.enabled)
                            closers.append(srv)
                            configs.append(Config(label, srv.run, srv.cmd, srv.restart))
                    if args.llama_cpp_python and not again:
                        for label, lookup in ((LCP, False), (LCP_LOOKUP, True)):
                            ip = InProcess(model, n_ctx=args.n_ctx, threads=args.threads,
                                           lookup=lookup, repack=repack.enabled)
                            closers.append(ip)
                            configs.append(Config(label, ip.run, "in-process"))
                    results = run_section(
                        section, configs, prompts, args,
                        lambda cs=closers: lorad.pids() + [p for c in cs for p in c.pids()],
                        again=again)
                finally:
                    for c in closers:
                        c.close()
                ids = {p: lorad.contexts[model].tokenize(t) for p, t in prompts.items()}
                summary = summarise(results, LORAD_OFF, ids)
                print_table(f"n-gram speculation, {SECTION_TITLES[section]}: {Path(model).name}, "
                            f"{args.threads} threads, {args.tokens} tokens greedy, medians of "
                            f"{args.rounds} rounds (decode tok/s = (n - 1) / generation time, "
                            f"engine-side)", summary, [c.name for c in configs], LORAD_OFF)
                targets = check_targets(summary, [] if again else list(open_ngram),
                                        not server_problem, again=again)
                all_targets += targets
                out["sections"][section] = {
                    "model": model, "configs": {c.name: c.spec for c in configs},
                    "results": summary, "targets": targets}

            if "draft" in sections:
                assert target is not None
                ctx = lorad.context(target, n_ctx=args.n_ctx, threads=args.threads)
                spec = {"mode": "draft_model", "model": model}
                prompts = {**GROUNDED, **open_draft}
                configs = [  # one context throughout: a draft model's cost is learnt per context
                    Config(LORAD_OFF, lambda p, n: lorad.run(target, p, n, False), False),
                    Config(LORAD_DRAFT, lambda p, n: lorad.run(target, p, n, spec), spec)]
                closers = []
                try:
                    if not server_problem:
                        draft_args = ["--spec-type", "draft-simple", "-md", model,
                                      "--spec-draft-n-max", str(args.server_draft_max),
                                      "--spec-draft-p-min", str(args.server_draft_p_min)]
                        for label, extra in ((SRV_NONE, []), (SRV_DRAFT, draft_args)):
                            srv = LlamaServer(args.llama_server, target, label, extra, workdir,
                                              threads=args.threads, n_ctx=args.server_ctx,
                                              repack=repack.enabled)
                            closers.append(srv)
                            configs.append(Config(label, srv.run, srv.cmd))
                    results = run_section("draft", configs, prompts, args,
                                          lambda: lorad.pids() + [p for c in closers
                                                                  for p in c.pids()])
                finally:
                    for c in closers:
                        c.close()
                ids = {p: ctx.tokenize(t) for p, t in prompts.items()}
                summary = summarise(results, LORAD_OFF, ids)
                mib = Path(target).stat().st_size / 2**20
                print_table(f"draft model: target {Path(target).name} ({mib:.0f} MiB), draft "
                            f"{Path(model).name} ({Path(model).stat().st_size / 2**20:.0f} MiB)"
                            f", {args.threads} threads, {args.tokens} tokens greedy, medians of "
                            f"{args.rounds} rounds", summary, [c.name for c in configs],
                            LORAD_OFF)
                g = summary["grounded"]["configs"]
                lines = {"lorad draft_model / lorad off": (LORAD_DRAFT, LORAD_OFF),
                         "llama-server draft / llama-server none": (SRV_DRAFT, SRV_NONE),
                         "lorad draft_model / llama-server draft": (LORAD_DRAFT, SRV_DRAFT),
                         "lorad off / llama-server none": (LORAD_OFF, SRV_NONE)}
                ratios: dict[str, dict[str, float | None]] = {}
                for label, (a, b) in lines.items():
                    per = {p: _ratio(summary[p]["configs"].get(a, {}).get("decode_tokens_per_s"),
                                     summary[p]["configs"].get(b, {}).get("decode_tokens_per_s"))
                           for p in summary}
                    if a in g and b in g:
                        ratios[label] = per
                        print(f"  {label:<42} " + "  ".join(f"{p} {v or 0:.3f}"
                                                            for p, v in per.items()))
                sample = summary[next(iter(open_draft), "grounded")]["sample_text"] or ""
                print(f"  target greedy sample (lorad off): {sample[:160]!r}")
                out["sections"]["draft"] = {
                    "target": target, "target_size_bytes": Path(target).stat().st_size,
                    "draft": model, "configs": {c.name: c.spec for c in configs},
                    "results": summary, "ratios": ratios}
        finally:
            lorad.close()

    print()
    for t in all_targets:
        verdict = "skipped" if t["pass"] is None else ("PASS" if t["pass"] else "FAIL")
        print(f"target: {t['target']}: {verdict} ({t['detail']})")
    out["targets"] = all_targets
    out["elapsed_s"] = round(time.time() - started, 1)
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(out, indent=2))
    print(f"\nJSON: {args.json_out} ({out['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
