"""Speculative decoding on the gemma 270M model: off versus ``prompt_lookup`` through the daemon,
and llama-cpp-python's own ``LlamaPromptLookupDecoding`` in-process as the reference.

Usage::

    .venv/bin/python bench/speculative.py [--model PATH] [--tokens 128] [--runs 3]
                                          [--json-out bench/results/speculative.json]

Two prompts: an input-grounded one (rewrite a passage the prompt contains: n-gram drafts find
it) and an open-ended one (drafts rarely help: the adaptive depth must keep it from getting
slower). For each prompt the four configurations run alternately, ``--runs`` times each, in one
process run, so that a noisy shared machine hurts all alike; the table shows medians.

Decode tokens/s is ``(n - 1) / (t_last - t_first)`` over the token timestamps seen by the
consumer (the prompt is not counted). Greedy everywhere; the daemon's speculative output is
checked token for token against its output without speculation. The in-process models load with
``use_extra_bufts = False`` like the daemon's (see bench/throughput.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import (
    default_model_path,
    llama_kwargs,
    machine_info,
    no_extra_bufts,
    start_daemon,
    stop_daemon,
)

PASSAGE = (
    "The lighthouse stood on a narrow spit of rock at the mouth of the harbour. Every evening, "
    "as the sun went down behind the western hills, the keeper climbed the one hundred and "
    "twelve steps of the spiral staircase, trimmed the wick, polished the great lens, and lit "
    "the lamp. Its beam swept across the water every ten seconds, warning the fishing boats "
    "away from the reef that lay hidden just below the surface. In the morning he put the lamp "
    "out, wrote the weather in his logbook, and walked down to the village for bread and news."
)
PROMPTS = {
    "grounded": ("Copy the following passage exactly, word for word.\n\nPassage:\n" + PASSAGE
                 + "\n\nCopy:\n"),
    "open": "Write a short story about a cat who wants to become a pilot. Once upon a time,",
}
SPEC = {"mode": "prompt_lookup", "ngram_min": 1, "ngram_max": 3, "max_draft": 8}


def decode_tps(stamps: list[float]) -> float | None:
    if len(stamps) < 2 or stamps[-1] <= stamps[0]:
        return None
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


class DaemonRunner:
    def __init__(self, model: str, workdir: Path, n_ctx: int, threads: int) -> None:
        from lorad.client import Client

        self.proc = start_daemon(f"ipc://{workdir}/lorad.sock", [Path(model).parent],
                                 workdir / "daemon.log", cwd=workdir)
        self.client = Client(f"ipc://{workdir}/lorad.sock", timeout=300)
        self.ctx = self.client.create_context(model, n_ctx=n_ctx, n_threads=threads)

    def run(self, prompt: str, tokens: int, speculative: Any) -> dict[str, Any]:
        self.ctx.generate("Flush.", max_tokens=1, temperature=0).collect()  # no prefix reuse
        stamps, ids = [], []
        stream = self.ctx.generate(prompt, max_tokens=tokens, temperature=0,
                                   speculative=speculative)
        for chunk in stream:
            now = time.perf_counter()
            for t in chunk.token_ids:
                stamps.append(now)
                ids.append(t)
        m = stream.metrics
        return {"tps": decode_tps(stamps), "tokens": ids,
                "acceptance_rate": m.get("acceptance_rate"),
                "drafted": m.get("drafted_tokens"), "accepted": m.get("accepted_tokens")}

    def close(self) -> None:
        self.ctx.close()
        self.client.close()
        stop_daemon(self.proc)


class InProcessRunner:
    def __init__(self, model: str, n_ctx: int, threads: int, lookup: bool) -> None:
        import llama_cpp
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        kwargs = llama_kwargs(n_ctx=n_ctx, n_threads=threads, n_batch=512)
        if lookup:
            kwargs["draft_model"] = LlamaPromptLookupDecoding(num_pred_tokens=SPEC["max_draft"])
        with no_extra_bufts():
            self.llm = llama_cpp.Llama(model, **kwargs)
        self.is_eog = llama_cpp.llama_cpp.llama_vocab_is_eog

    def run(self, prompt: str, tokens: int) -> dict[str, Any]:
        ids, stamps = [], []
        prompt_ids = self.llm.tokenize(prompt.encode(), add_bos=True)
        for tok in self.llm.generate(prompt_ids, temp=0.0, repeat_penalty=1.0, reset=True):
            now = time.perf_counter()
            if self.is_eog(self.llm._model.vocab, tok):
                break
            ids.append(tok)
            stamps.append(now)
            if len(ids) >= tokens:
                break
        return {"tps": decode_tps(stamps), "tokens": ids}

    def close(self) -> None:
        self.llm.close()


def median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return round(statistics.median(vals), 2) if vals else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--json-out", default=str(Path(__file__).parent / "results" /
                                              "speculative.json"))
    args = ap.parse_args(argv)
    model = str(Path(args.model or default_model_path()).resolve())
    configs = ["daemon off", "daemon prompt_lookup", "llama-cpp-python",
               "llama-cpp-python prompt lookup"]
    results: dict[str, dict[str, list[dict[str, Any]]]] = {
        p: {c: [] for c in configs} for p in PROMPTS}
    with tempfile.TemporaryDirectory(prefix="lorad-spec-") as tmp:
        daemon = DaemonRunner(model, Path(tmp), args.n_ctx, args.threads)
        plain = InProcessRunner(model, args.n_ctx, args.threads, lookup=False)
        lookup = InProcessRunner(model, args.n_ctx, args.threads, lookup=True)
        try:
            for r in range(args.runs):
                for name, prompt in PROMPTS.items():
                    order = configs if r % 2 == 0 else configs[::-1]
                    for c in order:
                        if c == "daemon off":
                            res = daemon.run(prompt, args.tokens, False)
                        elif c == "daemon prompt_lookup":
                            res = daemon.run(prompt, args.tokens, SPEC)
                        elif c == "llama-cpp-python":
                            res = plain.run(prompt, args.tokens)
                        else:
                            res = lookup.run(prompt, args.tokens)
                        results[name][c].append(res)
        finally:
            daemon.close()
            plain.close()
            lookup.close()

    summary: dict[str, Any] = {}
    print(f"\nspeculative decoding, gemma 270M Q4_K_M, {args.threads} threads, "
          f"{args.tokens} tokens greedy, medians of {args.runs} alternating runs\n")
    print(f"{'prompt':<9} {'configuration':<32} {'decode tok/s':>12} {'vs off':>7} "
          f"{'acceptance':>10} {'same tokens as off':>19}")
    for name in PROMPTS:
        off_tps = median([x["tps"] for x in results[name]["daemon off"]])
        off_tokens = results[name]["daemon off"][0]["tokens"]
        summary[name] = {}
        for c in configs:
            runs = results[name][c]
            tps = median([x["tps"] for x in runs])
            acc = median([x.get("acceptance_rate") for x in runs])
            same = all(x["tokens"] == off_tokens for x in runs)
            ratio = round(tps / off_tps, 3) if tps and off_tps else None
            summary[name][c] = {"decode_tokens_per_s": tps, "ratio_vs_daemon_off": ratio,
                                "acceptance_rate": acc, "same_tokens_as_daemon_off": same,
                                "runs": [{k: v for k, v in x.items() if k != "tokens"}
                                         for x in runs]}
            print(f"{name:<9} {c:<32} {tps or 0:>12.2f} {ratio or 0:>7.3f} "
                  f"{'' if acc is None else f'{acc:.3f}':>10} {same!s:>19}")
    out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
           "machine": machine_info(), "model": model, "tokens": args.tokens,
           "runs": args.runs, "threads": args.threads, "speculative": SPEC,
           "prompts": PROMPTS, "results": summary}
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(out, indent=2))
    print(f"\nJSON: {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
