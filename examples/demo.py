"""The LoRA demo: one loaded model, adapters swapped live.

Start the daemon first (``make serve``: the default model with a context named ``default``),
then::

    .venv/bin/python examples/demo.py [--context default]

It prints the base output, the ``pirate`` adapter at scale 0.5 and 1.0, ``pirate`` and
``french`` stacked, and the base again after ``clear_loras`` (identical to the first), each
with the time the stack change took. The adapters are the ones ``examples/train_lora`` trains.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from lorad.client import Client

ADAPTERS = Path(__file__).resolve().parent / "train_lora" / "adapters"
PROMPT = "Question: What is the capital of Norway?\nAnswer:"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", default="default")
    ap.add_argument("--endpoint", default=None)
    args = ap.parse_args(argv)
    pirate, french = ADAPTERS / "pirate.gguf", ADAPTERS / "french.gguf"
    with Client(args.endpoint) as client:
        ctx = client.context(args.context)

        def show(label: str, change=None) -> str:
            ms = None
            if change is not None:
                t = time.perf_counter()
                change()
                ms = (time.perf_counter() - t) * 1000
            text = ctx.generate(PROMPT, max_tokens=24, temperature=0,
                                stop=["\nQuestion"]).collect().strip()
            swap = f"{ms:7.2f} ms" if ms is not None else "       -  "
            print(f"{label:<28} {swap}  {text!r}")
            return text

        print(f"prompt: {PROMPT!r}\n{'stack':<28} {'change':>10}  output")
        base = show("base model")
        show("pirate 0.5", lambda: ctx.set_lora(pirate, 0.5))
        show("pirate 1.0 (scale change)", lambda: ctx.set_lora(pirate, 1.0))
        show("pirate 1.0 + french 1.0", lambda: ctx.set_lora(french, 1.0))
        again = show("cleared", ctx.clear_loras)
        print(f"cleared output identical to the base: {again == base}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
