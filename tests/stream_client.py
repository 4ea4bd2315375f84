"""A client process for the tests: streams one generation and prints a JSON line per chunk.

Usage: python stream_client.py ENDPOINT CONTEXT PROMPT MAX_TOKENS [CREDIT [HANG_AFTER]]
The last line is {"end": finish_reason, "tokens": [...]}. With HANG_AFTER=N the process prints
{"hanging": N} after N chunks and stops reading for good (a stuck client, for the tests to kill).
"""

from __future__ import annotations

import json
import sys
import threading

from lorad.client import Client


def main() -> None:
    endpoint, context, prompt, max_tokens = sys.argv[1:5]
    credit = int(sys.argv[5]) if len(sys.argv) > 5 else 64
    hang_after = int(sys.argv[6]) if len(sys.argv) > 6 else None
    with Client(endpoint) as client:
        ctx = client.context(context)
        stream = ctx.generate(prompt, max_tokens=int(max_tokens), temperature=0, credit=credit)
        tokens: list[int] = []
        for chunk in stream:
            tokens.extend(chunk.token_ids)
            print(json.dumps({"tokens": chunk.token_ids}), flush=True)
            if hang_after is not None and len(tokens) >= hang_after:
                print(json.dumps({"hanging": len(tokens)}), flush=True)
                threading.Event().wait()  # never returns: the test kills this process
        print(json.dumps({"end": stream.finish_reason, "tokens": tokens}), flush=True)


if __name__ == "__main__":
    main()
