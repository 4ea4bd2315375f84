"""Soak: many client processes with mixed requests, random cancels and adapter swaps against
one daemon for a while; samples the daemon's RSS and file descriptors and checks that every
request ended and nothing grew.

Usage::

    .venv/bin/python bench/soak.py [--clients 8] [--requests 500] [--json-out ...]

Each client runs ``tests/mixed_client.py`` (a context of its own, ``--requests`` mixed requests).
The model and adapters are tiny generated ones (``tests/tinymodels.py``), so the run measures
the daemon's own bookkeeping, not llama.cpp's speed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

from throughput import start_daemon, stop_daemon  # noqa: E402

import tinymodels  # noqa: E402


def sample(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return {"t": round(time.monotonic(), 2), "rss_kib": rss,
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--json-out", default=str(REPO / "bench" / "results" / "soak.json"))
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lorad-soak-") as tmp:
        d = Path(tmp)
        base = tinymodels.tiny_llama_tensors(seed=0)
        model = tinymodels.write_tiny_llama(d / "tiny.gguf", seed=0)
        adapters = [tinymodels.write_lora(d / f"a{i}.gguf", base, rank=2 + i, seed=i).path
                    for i in range(3)]
        proc = start_daemon(f"ipc://{d}/s.sock", [d], d / "daemon.log", cwd=d)
        samples = [sample(proc.pid)]
        clients = [subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "mixed_client.py"), f"ipc://{d}/s.sock",
             str(model), *map(str, adapters), str(seed), str(args.requests)],
            stdout=subprocess.PIPE, text=True) for seed in range(args.clients)]
        while any(c.poll() is None for c in clients):
            try:
                clients[0].wait(timeout=1.0)  # a bounded wait between samples, not a sleep
            except subprocess.TimeoutExpired:
                pass
            samples.append(sample(proc.pid))
        summaries = [json.loads(c.stdout.read()) for c in clients]
        samples.append(sample(proc.pid))
        code = stop_daemon(proc)
        log = (d / "daemon.log").read_text()
    ended = sum(sum(s["ended"].values()) + sum(s["errors"].values()) for s in summaries)
    result = {
        "clients": args.clients, "requests_per_client": args.requests,
        "requests_ended": ended, "all_ended": ended == args.clients * args.requests,
        "errors": [s["errors"] for s in summaries], "daemon_exit": code,
        "log_has_traceback": "Traceback" in log,
        "rss_kib_first_last_max": [samples[0]["rss_kib"], samples[-1]["rss_kib"],
                                   max(s["rss_kib"] for s in samples)],
        "fds_first_last": [samples[0]["fds"], samples[-1]["fds"]],
        "samples": samples,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(result, indent=2))
    ok = result["all_ended"] and code == 0 and not result["log_has_traceback"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
