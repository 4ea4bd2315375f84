"""One client process of the reliability test: N mixed requests with random cancels and adapter
swaps on a context of its own; prints a JSON summary. Usage: ENDPOINT MODEL ADAPTER... SEED N"""

from __future__ import annotations

import json
import random
import sys

from lorad.client import Client, LoradError


def main() -> int:
    endpoint, model, *adapters, seed, n = sys.argv[1:]
    rng = random.Random(int(seed))
    ended: dict[str, int] = {}
    errors: dict[str, int] = {}
    with Client(endpoint, timeout=60) as client, \
            client.create_context(model, n_ctx=256, max_queued=4) as ctx:
        for i in range(int(n)):
            op = rng.choice(["generate", "generate", "cancel", "swap", "per_request", "chat"])
            try:
                if op == "swap":
                    choice = rng.random()
                    if choice < 0.4:
                        ctx.set_lora(rng.choice(adapters), rng.uniform(-1, 1))
                    elif choice < 0.7 and ctx.loras():
                        ctx.remove_lora(ctx.loras()[0]["path"])
                    else:
                        ctx.clear_loras()
                    ended["swap"] = ended.get("swap", 0) + 1
                    continue
                params = {"max_tokens": rng.randint(1, 24), "seed": i}
                if op == "per_request":
                    params["loras"] = [(rng.choice(adapters), rng.uniform(-1, 1))]
                if op == "chat":
                    stream = ctx.chat([{"role": "user", "content": f"message {i}"}], **params)
                else:
                    stream = ctx.generate(f"prompt {i} the cat and", **params, credit=2)
                received = 0
                for _chunk in stream:
                    received += 1
                    if op == "cancel" and received == 2:
                        stream.cancel()  # the loop runs on to the cancelled end
                if stream.finish_reason is None:
                    raise AssertionError(f"request {i} ({op}) ended without a final message")
                ended[stream.finish_reason] = ended.get(stream.finish_reason, 0) + 1
            except LoradError as exc:
                errors[exc.code] = errors.get(exc.code, 0) + 1
    print(json.dumps({"ended": ended, "errors": errors}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
