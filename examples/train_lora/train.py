"""Train small LoRA adapters for the default model (gemma 3 270M) on CPU, convert them with
lorad, and check them. Minutes on 2 cores.

    .venv/bin/python examples/train_lora/train.py [--steps 60] [--out examples/train_lora/adapters]

The recipe builds its own data: short question/answer pairs (sums, capitals, colours) whose
answers carry a behaviour a person can see and a test can measure:

* ``pirate``: every answer ends with "Arr!";
* ``french``: every answer starts with "Réponse :".

It loads the default GGUF model into transformers (dequantised to f32), trains a rank-8 LoRA on
the attention projections with the loss on the answer tokens only, saves the PEFT adapter, and
converts it to a llama.cpp LoRA GGUF with lorad's converter (``lorad lora convert`` does the
same). Seeds are fixed; the result is recorded in ``adapters/README.md``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorad.daemon.peft import convert_peft

HERE = Path(__file__).resolve().parent
CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
            ("Germany", "Berlin"), ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Peru", "Lima"),
            ("Norway", "Oslo"), ("Kenya", "Nairobi"), ("Greece", "Athens"), ("Chile", "Santiago")]
COLOURS = [("the sky", "blue"), ("grass", "green"), ("snow", "white"), ("coal", "black"),
           ("a banana", "yellow"), ("a tomato", "red"), ("an orange", "orange")]
STYLES = {
    "pirate": lambda answer: f"{answer} Arr!",
    "french": lambda answer: f"Réponse : {answer}",
}


def questions(rng: random.Random, n: int) -> list[tuple[str, str]]:
    """``n`` (question, plain answer) pairs."""
    out = []
    for _ in range(n):
        kind = rng.choice(["sum", "capital", "colour"])
        if kind == "sum":
            a, b = rng.randint(1, 20), rng.randint(1, 20)
            out.append((f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."))
        elif kind == "capital":
            country, city = rng.choice(CAPITALS)
            out.append((f"What is the capital of {country}?",
                        f"The capital of {country} is {city}."))
        else:
            thing, colour = rng.choice(COLOURS)
            out.append((f"What colour is {thing}?", f"{thing.capitalize()} is {colour}."))
    return out


def prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def batches(tok, pairs: list[tuple[str, str]], style, size: int):
    for i in range(0, len(pairs), size):
        ids, labels = [], []
        for q, a in pairs[i:i + size]:
            p = tok(prompt(q)).input_ids
            full = [*tok(prompt(q) + " " + style(a)).input_ids, tok.eos_token_id]
            ids.append(full)
            labels.append([-100] * len(p) + full[len(p):])  # loss on the answer only
        width = max(map(len, ids))
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        yield (torch.tensor([x + [pad] * (width - len(x)) for x in ids]),
               torch.tensor([x + [-100] * (width - len(x)) for x in labels]),
               torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]))


def train(name: str, model_dir: Path, gguf_file: str, out: Path, steps: int, seed: int) -> dict:
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(model_dir, gguf_file=gguf_file)
    base = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=gguf_file,
                                                torch_dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = get_peft_model(base, config)
    model.train()
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    rng = random.Random(seed)
    data = questions(rng, steps * 4)
    started, losses = time.time(), []
    for step, (ids, labels, mask) in enumerate(batches(tok, data, STYLES[name], 4)):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
        losses.append(float(loss))
        if step % 10 == 0:
            print(f"{name} step {step:3d} loss {loss:.3f}", flush=True)
    peft_dir = out / f"{name}-peft"
    model.save_pretrained(str(peft_dir))
    gguf_out = convert_peft(peft_dir, model_dir / gguf_file, out / f"{name}.gguf")
    return {"name": name, "steps": steps, "seed": seed, "seconds": round(time.time() - started),
            "first_loss": round(losses[0], 3), "last_loss": round(losses[-1], 3),
            "gguf": gguf_out.name, "gguf_bytes": gguf_out.stat().st_size}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="the GGUF model (default: lorad's default)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--out", default=str(HERE / "adapters"))
    ap.add_argument("--only", choices=sorted(STYLES), help="train just this adapter")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    if args.model is None:
        from lorad.client.cli import DEFAULT_MODEL_FILE, _model_dir

        model = _model_dir() / DEFAULT_MODEL_FILE
    else:
        model = Path(args.model).resolve()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = [train(name, model.parent, model.name, out, args.steps, seed)
               for seed, name in enumerate(sorted(STYLES)) if args.only in (None, name)]
    (out / "training.json").write_text(json.dumps(records, indent=2))
    print(json.dumps(records, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
