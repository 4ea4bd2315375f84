"""Control round trips: lorad's ``ping`` and adapter scale change against the transport floor.

Usage::

    .venv/bin/python bench/control_latency.py [--iterations 2000] [--rounds 5] [--warmup 300]
                                              [--retries 1] [--wait-idle 5] [--no-decomposition]
                                              [--json-out bench/results/control_latency.json]

Every configuration is a client in this process and a server in another process, over ipc. They
are measured in this one process run, alternately: a warm-up block of each, then per round one
block of ``--iterations`` round trips of each, the order rotating from round to round.

``floor``
    The transport floor: a raw pyzmq DEALER socket here and a raw pyzmq ROUTER echo server in a
    child process (this script with ``--echo-server``). The messages are shaped like lorad's
    (``protocol/codec.py``): two frames, the protocol tag and a msgpack body, a ``ping`` request
    ``{v, id, op, args}`` one way and a ``result`` reply ``{v, kind, id, result}`` the other;
    the echo server answers each operation with the result the daemon gave to it (recorded at
    start), so the bodies have lorad's sizes. Both sides pack and unpack the body; blocking
    ``recv_multipart``, default socket options: the least a request/reply over ZeroMQ costs.
``ping``
    ``Client.ping()`` (``lorad.client.Client``, the sync client) against a real ``lorad serve``
    subprocess on a tiny generated llama model (``tests/tinymodels.py``), JSON logs to a file
    (as under systemd, where stderr is not a TTY).
``scale``
    ``Context.set_lora(adapter, scale)`` of the adapter already in the context's stack, the
    scale alternating between two values so that every call is a change (the daemon edits the
    stack; no file access and no llama.cpp call). A one-token generation applied the stack first.

The decomposition (off with ``--no-decomposition``) swaps one side at a time, to say which side
the time goes to: ``floor_scale`` (the raw pair with ``set_lora``-shaped messages), ``raw_ping``
and ``raw_scale`` (the raw DEALER sending the same requests to the daemon: the daemon's share),
``echo_ping`` and ``echo_scale`` (the sync client against the echo server: the client's share).
The context is created ``shared`` so that the raw DEALER, another peer, may edit its stack.

Each round trip is timed with ``time.perf_counter_ns`` from before the call to the decoded
reply in hand. Reported per configuration, over the samples of all rounds: p50, p90, p99 and
mean in µs; the **ratio** is the configuration's p50 over the ``floor``'s p50, also given as
the median of the per-round ratios (the blocks of one round are back to back). The targets
(issue 10): ``ping`` <= 2.0x, scale change <= 2.5x.

CPU per round trip, from ``/proc/PID/task/*/schedstat`` (nanoseconds, per thread): this
process's Python thread and its other (libzmq) threads, the server's main thread and its other
threads. Wall time per round trip minus the CPU on the critical path is wake-up latency.

A shared machine: before each block the script waits (at most ``--wait-idle`` s) for the
machine to be idle, counts a block as contended when other processes (or the hypervisor, as
steal time) took more than 5 % of the CPUs during it (``/proc/stat`` minus this benchmark's own
processes), and measures a contended block again (at most ``--retries`` times; the discarded
blocks' summaries stay in the JSON). Compare the ratios, not absolute figures across runs.
The daemon's readiness is its ``READY=1`` datagram (see bench/throughput.py), the echo
server's a line on its stdout; both die with this script (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import argparse
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import zmq
from throughput import (
    CONTENDED,
    _system_ticks,
    _term_with_parent,
    git_info,
    machine_info,
    start_daemon,
    stop_daemon,
    wait_for_idle,
)

REPO = Path(__file__).resolve().parent.parent
TARGETS = {"ping": 2.0, "scale": 2.5}
"""The ratio to the floor's p50 that issue 10 asks for."""
SCALES = (0.5, 0.75)
MAIN = ("floor", "ping", "scale")
DECOMPOSITION = ("floor_scale", "raw_ping", "raw_scale", "echo_ping", "echo_scale")
LABELS = {
    "floor": "floor: raw DEALER <-> ROUTER echo, ping-shaped",
    "ping": "lorad Client.ping()",
    "scale": "lorad Context.set_lora() scale change",
    "floor_scale": "floor, set_lora-shaped messages",
    "raw_ping": "raw DEALER -> daemon: ping",
    "raw_scale": "raw DEALER -> daemon: set_lora",
    "echo_ping": "lorad Client -> echo server: ping",
    "echo_scale": "lorad Context -> echo server: set_lora",
}

_HZ = os.sysconf("SC_CLK_TCK")


# -- the raw side: an echo server (a child process) and a DEALER ---------------------------------
def echo_server(endpoint: str, results_path: str) -> int:
    """ROUTER echo: each request ``[peer, tag, body]`` gets a ``result`` reply carrying the
    result recorded for its operation (``results_path``: a msgpack map op -> result)."""
    with open(results_path, "rb") as f:
        results = msgpack.unpackb(f.read(), raw=False)
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    print("ready", flush=True)
    while True:
        peer, tag, body = sock.recv_multipart()
        request = msgpack.unpackb(body, raw=False)
        reply = {"v": 1, "kind": "result", "id": request["id"],
                 "result": results.get(request["op"], {})}
        sock.send_multipart([peer, tag, msgpack.packb(reply, use_bin_type=True)])
        if request["op"] == "stop":
            sock.close()
            return 0


class RawDealer:
    """A raw pyzmq DEALER: packs a lorad-shaped request, blocks for the reply, unpacks it."""

    def __init__(self, endpoint: str) -> None:
        from lorad.protocol import TAG

        self.tag = TAG
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self._id = 0

    def call(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        self._id += 1
        body = {"v": 1, "id": self._id, "op": op, "args": args}
        self.sock.send_multipart([self.tag, msgpack.packb(body, use_bin_type=True)])
        _tag, reply = self.sock.recv_multipart()
        return msgpack.unpackb(reply, raw=False)

    def close(self) -> None:
        self.sock.close(linger=0)


class EchoServer:
    """The echo server process."""

    def __init__(self, endpoint: str, results: dict[str, Any], workdir: Path) -> None:
        path = workdir / "echo-results.msgpack"
        path.write_bytes(msgpack.packb(results, use_bin_type=True))
        self.endpoint = endpoint
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--echo-server", endpoint, str(path)],
            stdout=subprocess.PIPE, text=True, preexec_fn=_term_with_parent)
        if self.proc.stdout is None or self.proc.stdout.readline().strip() != "ready":
            self.proc.kill()
            raise RuntimeError("the echo server did not start")

    def close(self) -> int:
        raw = RawDealer(self.endpoint)
        try:
            raw.sock.RCVTIMEO = 5000
            raw.call("stop", {})
        except zmq.ZMQError:
            self.proc.kill()
        raw.close()
        return self.proc.wait(10)


# -- the daemon side -----------------------------------------------------------------------------
class LoradSide:
    """A ``lorad serve`` subprocess on a tiny model, a sync client and a context with one adapter
    in its stack (applied by a one-token generation)."""

    def __init__(self, workdir: Path, *, daemon_args: list[str] | None = None) -> None:
        sys.path.insert(0, str(REPO / "tests"))
        import tinymodels
        from lorad.client import Client

        models = workdir / "models"
        models.mkdir()
        self.model = tinymodels.write_tiny_llama(models / "tiny.gguf", seed=0)
        base = tinymodels.tiny_llama_tensors(seed=0)
        self.adapter = str(tinymodels.write_lora(models / "a.gguf", base, rank=4, alpha=8,
                                                 seed=1).path)
        self.log_path = workdir / "daemon.log"
        self.endpoint = f"ipc://{workdir}/lorad.sock"
        self.proc = start_daemon(self.endpoint, [models], self.log_path, cwd=workdir,
                                 extra_args=daemon_args)
        self.client = Client(self.endpoint, timeout=60)
        # shared: the decomposition's raw DEALER (another peer) edits its stack too
        self.ctx = self.client.create_context(str(self.model), n_ctx=256, shared=True,
                                              loras=[(self.adapter, 1.0)])
        list(self.ctx.generate("a", max_tokens=1, temperature=0))

    def close(self) -> int:
        try:
            self.ctx.close()
            self.client.close()
        finally:
            rc = stop_daemon(self.proc)
        return rc


class Flip:
    """The scale of the next scale change (alternating), and a check of the reply."""

    def __init__(self) -> None:
        self.i = 0

    def next(self) -> float:
        self.i ^= 1
        return SCALES[self.i]

    def check_stack(self, stack: Any) -> None:
        if [e["scale"] for e in stack] != [SCALES[self.i]]:
            raise RuntimeError(f"unexpected stack after a scale change: {stack!r}")


Call = Callable[[], Any]


def make_calls(lorad: LoradSide, echo_endpoint: str, decomposition: bool
               ) -> tuple[dict[str, tuple[Call, str]], list[Any]]:
    """Each configuration's call and which server it talks to (``daemon`` or ``echo``); the
    second list holds what to close afterwards."""
    from lorad.client import Client

    ctx_id, adapter = lorad.ctx.id, lorad.adapter
    raw_echo = RawDealer(echo_endpoint)
    flips = {name: Flip() for name in ("scale", "raw_scale", "floor_scale", "echo_scale")}

    def scale() -> Any:
        flip = flips["scale"]
        flip.check_stack(lorad.ctx.set_lora(adapter, flip.next()))

    def raw_set_lora(raw: RawDealer, name: str, check: bool) -> Call:
        flip = flips[name]

        def call() -> Any:
            reply = raw.call("set_lora", {"context": ctx_id, "path": adapter,
                                          "scale": flip.next()})
            if check:
                if reply.get("kind") != "result":
                    raise RuntimeError(f"set_lora failed: {reply!r}")
                flip.check_stack(reply["result"]["loras"])
        return call

    calls: dict[str, tuple[Call, str]] = {
        "floor": (lambda: raw_echo.call("ping", {}), "echo"),
        "ping": (lorad.client.ping, "daemon"),
        "scale": (scale, "daemon"),
    }
    closing: list[Any] = [raw_echo]
    if decomposition:
        raw_daemon = RawDealer(lorad.endpoint)
        echo_client = Client(echo_endpoint, timeout=60)
        # create_context answered by the echo server: a Context of this client with the id of
        # the daemon's context (the echo server answers set_lora with the daemon's own reply).
        echo_ctx = echo_client.create_context(str(lorad.model))
        closing += [raw_daemon, echo_client]
        calls.update({
            "floor_scale": (raw_set_lora(raw_echo, "floor_scale", False), "echo"),
            "raw_ping": (lambda: raw_daemon.call("ping", {}), "daemon"),
            "raw_scale": (raw_set_lora(raw_daemon, "raw_scale", True), "daemon"),
            "echo_ping": (echo_client.ping, "echo"),
            "echo_scale": (lambda: echo_ctx.set_lora(adapter, flips["echo_scale"].next()),
                           "echo"),
        })
    return calls, closing


def recorded_results(lorad: LoradSide) -> dict[str, Any]:
    """What the daemon answers to the operations the echo server must answer alike."""
    stack = lorad.ctx.set_lora(lorad.adapter, SCALES[0])
    return {"ping": lorad.client.ping(), "create_context": lorad.ctx.info,
            "set_lora": {"context": lorad.ctx.id, "loras": stack}, "stop": {}}


# -- measuring ---------------------------------------------------------------------------------
def thread_cpu_ns(pid: int) -> dict[int, int]:
    """CPU time (ns) of each thread of ``pid`` (``/proc/PID/task/TID/schedstat``)."""
    out: dict[int, int] = {}
    task_dir = f"/proc/{pid}/task"
    try:
        tids = os.listdir(task_dir)
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"{task_dir}/{tid}/schedstat") as f:
                out[int(tid)] = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended meanwhile
    return out


def cpu_delta(pid: int, before: dict[int, int], after: dict[int, int]) -> tuple[int, int]:
    """(main thread, other threads) CPU ns between two :func:`thread_cpu_ns` snapshots."""
    main = after.get(pid, 0) - before.get(pid, 0)
    other = sum(ns - before.get(tid, 0) for tid, ns in after.items() if tid != pid)
    return main, other


def percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile of already sorted values (``q`` in 0..100)."""
    return sorted_values[max(0, math.ceil(q / 100 * len(sorted_values)) - 1)]


def summary_us(samples_ns: list[int]) -> dict[str, float]:
    s = sorted(samples_ns)
    return {"n": len(s), "p50_us": round(percentile(s, 50) / 1000, 1),
            "p90_us": round(percentile(s, 90) / 1000, 1),
            "p99_us": round(percentile(s, 99) / 1000, 1),
            "mean_us": round(statistics.fmean(s) / 1000, 1),
            "min_us": round(s[0] / 1000, 1), "max_us": round(s[-1] / 1000, 1)}


@dataclass
class Block:
    config: str
    round: int  # -1 for the warm-up
    samples_ns: list[int] = field(default_factory=list)
    cpu: dict[str, Any] = field(default_factory=dict)
    idle_wait: dict[str, Any] | None = None

    @property
    def contended(self) -> bool:
        cpu = self.cpu
        return cpu.get("other_processes_cpu_frac", 0.0) + cpu.get("steal_frac", 0.0) > CONTENDED

    def to_json(self, with_samples: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"config": self.config, "round": self.round,
                               **summary_us(self.samples_ns), "cpu": self.cpu,
                               "contended": self.contended, "idle_wait": self.idle_wait}
        if with_samples:
            out["samples_us"] = [round(v / 1000, 1) for v in self.samples_ns]
        return out


def run_block(config: str, rnd: int, call: Call, n: int, server_pid: int,
              other_pids: list[int]) -> Block:
    """``n`` timed calls; the CPU of this process, of the server, and of the whole machine."""
    block = Block(config, rnd)
    samples = block.samples_ns
    clock = time.perf_counter_ns
    me = os.getpid()
    gc.collect()
    pids = [me, server_pid, *other_pids]
    busy0, steal0 = _system_ticks()
    before = {pid: thread_cpu_ns(pid) for pid in pids}
    wall0 = time.monotonic()
    for _ in range(n):
        t0 = clock()
        call()
        samples.append(clock() - t0)
    wall = time.monotonic() - wall0
    busy1, steal1 = _system_ticks()
    deltas = {pid: cpu_delta(pid, before[pid], thread_cpu_ns(pid)) for pid in pids}
    ours_s = sum(m + o for m, o in deltas.values()) / 1e9
    busy_s = (busy1 - busy0) / _HZ
    ncpu = os.cpu_count() or 1
    block.cpu = {
        "wall_s": round(wall, 3),
        "client_main_us": round(deltas[me][0] / n / 1000, 1),
        "client_other_us": round(deltas[me][1] / n / 1000, 1),
        "server_main_us": round(deltas[server_pid][0] / n / 1000, 1),
        "server_other_us": round(deltas[server_pid][1] / n / 1000, 1),
        # CPU used by everything else, as a fraction of the machine (0..1).
        "other_processes_cpu_frac": round(max(busy_s - ours_s, 0.0) / (wall * ncpu), 3),
        # CPU time the hypervisor gave to other guests while we wanted it.
        "steal_frac": round((steal1 - steal0) / _HZ / (wall * ncpu), 3),
    }
    return block


CPU_KEYS = ("client_main_us", "client_other_us", "server_main_us", "server_other_us")


def summarise(blocks: dict[str, list[Block]]) -> dict[str, Any]:
    """Pooled percentiles per configuration, ratios to the floor (pooled and per round)."""
    out: dict[str, Any] = {}
    pooled = {c: summary_us([v for b in bs for v in b.samples_ns]) for c, bs in blocks.items()}
    floor_p50 = pooled["floor"]["p50_us"]
    per_round_floor = {b.round: summary_us(b.samples_ns)["p50_us"] for b in blocks["floor"]}
    for config, bs in blocks.items():
        per_round = [(b.round, summary_us(b.samples_ns)["p50_us"]) for b in bs]
        ratios = [p50 / per_round_floor[r] for r, p50 in per_round if per_round_floor.get(r)]
        out[config] = {
            **pooled[config],
            "ratio_p50": round(pooled[config]["p50_us"] / floor_p50, 3),
            "ratio_p50_per_round_median": round(statistics.median(ratios), 3),
            "ratios_per_round": [round(r, 3) for r in ratios],
            "p50_per_round_us": [p for _, p in per_round],
            "cpu_per_call_us": {k: round(statistics.median(b.cpu[k] for b in bs), 1)
                                for k in CPU_KEYS},
        }
        if config in TARGETS:
            out[config]["target_ratio"] = TARGETS[config]
            out[config]["meets_target"] = out[config]["ratio_p50"] <= TARGETS[config]
    return out


def decomposition(summary: dict[str, Any]) -> dict[str, Any]:
    """p50 above the floor of the same message shapes, split into the daemon's and the
    client's share (each measured with the other side replaced by its raw counterpart)."""
    out = {}
    for op, floor in (("ping", "floor"), ("scale", "floor_scale")):
        base = summary[floor]["p50_us"]
        total = summary[op]["p50_us"] - base
        daemon = summary[f"raw_{op}"]["p50_us"] - base
        client = summary[f"echo_{op}"]["p50_us"] - base
        out[op] = {"floor_p50_us": base, "above_floor_us": round(total, 1),
                   "daemon_share_us": round(daemon, 1), "client_share_us": round(client, 1),
                   "remainder_us": round(total - daemon - client, 1)}
    return out


def _table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |")
    print("| " + " | ".join("-" * w if i == 0 else "-" * (w - 1) + ":"
                            for i, w in enumerate(widths)) + " |")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                for i, (c, w) in enumerate(zip(r, widths, strict=True))) + " |")


def print_tables(summary: dict[str, Any], parts: dict[str, Any] | None) -> None:
    head = ("configuration", "n", "p50 µs", "p90 µs", "p99 µs", "mean µs", "x floor p50",
            "per round", "target")
    rows = []
    for config in summary:
        s = summary[config]
        target = s.get("target_ratio")
        verdict = "" if target is None else (
            f"<= {target:.1f}: " + ("met" if s["meets_target"] else "NOT met"))
        rows.append((LABELS[config], str(s["n"]), f"{s['p50_us']:.1f}", f"{s['p90_us']:.1f}",
                     f"{s['p99_us']:.1f}", f"{s['mean_us']:.1f}", f"{s['ratio_p50']:.2f}",
                     f"{s['ratio_p50_per_round_median']:.2f}", verdict))
    _table(head, rows)
    if parts:
        print("\nWhere the time above the floor goes (p50 µs; each share measured with the other "
              "side raw):\n")
        _table(("operation", "floor", "above floor", "daemon share", "client share",
                "remainder"),
               [(op, f"{d['floor_p50_us']:.1f}", f"{d['above_floor_us']:.1f}",
                 f"{d['daemon_share_us']:.1f}", f"{d['client_share_us']:.1f}",
                 f"{d['remainder_us']:.1f}") for op, d in parts.items()])
    print("\nCPU per round trip (µs, median of the blocks; 'other' = libzmq and worker "
          "threads):\n")
    _table(("configuration", "client Python", "client other", "server main", "server other"),
           [(LABELS[c], *(f"{summary[c]['cpu_per_call_us'][k]:.1f}" for k in CPU_KEYS))
            for c in summary])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iterations", type=int, default=2000, help="round trips per block")
    p.add_argument("--rounds", type=int, default=5, help="blocks of each configuration")
    p.add_argument("--warmup", type=int, default=300, help="round trips of each, not counted")
    p.add_argument("--wait-idle", type=float, default=5.0, metavar="SECONDS",
                   help="before each block, wait up to this long for the machine to be idle; "
                   "0 disables")
    p.add_argument("--idle-threshold", type=float, default=0.10)
    p.add_argument("--retries", type=int, default=1,
                   help="measure a contended block again (at most this many times)")
    p.add_argument("--no-decomposition", dest="decomposition", action="store_false",
                   help="measure only the floor, ping and the scale change")
    p.add_argument("--daemon-arg", action="append", default=[],
                   help="extra argument for `lorad serve` (repeatable)")
    p.add_argument("--json-out",
                   default=str(REPO / "bench" / "results" / "control_latency.json"))
    p.add_argument("--echo-server", nargs=2, metavar=("ENDPOINT", "RESULTS"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.echo_server:
        return echo_server(*args.echo_server)
    if args.iterations < 100 or args.rounds < 1:
        p.error("--iterations must be >= 100 and --rounds >= 1")

    started = time.time()
    info = machine_info()
    print(f"cpu: {info['cpu_model']} ({info['nproc']} CPUs), Python {info['python']}; "
          f"{args.rounds} rounds x {args.iterations} round trips per configuration")
    workdir = Path(tempfile.mkdtemp(prefix="lorad-ctl-"))
    echo: EchoServer | None = None
    lorad: LoradSide | None = None
    closing: list[Any] = []
    daemon_rc = echo_rc = None
    configs = MAIN + (DECOMPOSITION if args.decomposition else ())
    blocks: dict[str, list[Block]] = {c: [] for c in configs}
    discarded: list[Block] = []
    warmup: list[Block] = []
    try:
        lorad = LoradSide(workdir, daemon_args=args.daemon_arg)
        echo = EchoServer(f"ipc://{workdir}/echo.sock", recorded_results(lorad), workdir)
        calls, closing = make_calls(lorad, echo.endpoint, args.decomposition)
        server_pids = {"daemon": lorad.proc.pid, "echo": echo.proc.pid}

        def block(config: str, rnd: int, n: int) -> Block:
            idle = (wait_for_idle(args.wait_idle, args.idle_threshold)
                    if args.wait_idle > 0 else None)
            call, server = calls[config]
            pid = server_pids[server]
            b = run_block(config, rnd, call, n, pid,
                          [p for p in server_pids.values() if p != pid])
            b.idle_wait = idle
            s = summary_us(b.samples_ns)
            label = "warm-up" if rnd < 0 else f"round {rnd}"
            note = (f"  (others used {b.cpu['other_processes_cpu_frac']:.0%} of the CPUs, "
                    f"steal {b.cpu['steal_frac']:.0%}: contended)" if b.contended else "")
            print(f"  {label:8s} {config:12s} p50 {s['p50_us']:7.1f} µs  p90 {s['p90_us']:7.1f}"
                  f"  mean {s['mean_us']:7.1f}{note}", flush=True)
            return b

        for config in configs:
            warmup.append(block(config, -1, args.warmup))
        for rnd in range(args.rounds):
            k = rnd % len(configs)
            order = configs[k:] + configs[:k]
            for config in order:
                for attempt in range(args.retries + 1):
                    b = block(config, rnd, args.iterations)
                    if not b.contended or attempt == args.retries:
                        break
                    discarded.append(b)
                    print(f"  round {rnd} {config}: contended, measuring it again", flush=True)
                blocks[config].append(b)
    finally:
        for thing in closing:
            thing.close()
        if lorad is not None:
            daemon_rc = lorad.close()
        if echo is not None:
            echo_rc = echo.close()

    summary = summarise(blocks)
    parts = decomposition(summary) if args.decomposition else None
    print(f"\nControl round trips over ipc, {args.rounds} rounds x {args.iterations} (pooled "
          "percentiles; x floor = p50 / floor p50; per round = median of the rounds' ratios):\n")
    print_tables(summary, parts)
    contended = sum(b.contended for bs in blocks.values() for b in bs)
    print(f"\ncontended blocks kept: {contended} of {sum(map(len, blocks.values()))}, measured "
          f"again: {len(discarded)}; daemon exit {daemon_rc}, echo server exit {echo_rc}")

    log_text = lorad.log_path.read_text(errors="replace") if lorad is not None else ""
    result = {
        "benchmark": "control_latency",
        "date": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(),
        "duration_s": round(time.time() - started, 1),
        "machine": info,
        "software": {"pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(),
                     "msgpack": ".".join(map(str, msgpack.version)), "git": git_info()},
        "settings": {"iterations": args.iterations, "rounds": args.rounds,
                     "warmup": args.warmup, "retries": args.retries,
                     "wait_idle_s": args.wait_idle, "transport": "ipc",
                     "daemon_args": ["--log-format", "json", *args.daemon_arg],
                     "model": "tests/tinymodels.py write_tiny_llama(seed=0)",
                     "adapter": "tinymodels.write_lora(rank=4, alpha=8, attn_q + attn_v)",
                     "scales": list(SCALES),
                     "order": "a warm-up block of each, then per round one block of each, "
                              "the order rotating by one each round"},
        "labels": {c: LABELS[c] for c in configs},
        "targets": TARGETS,
        "summary": summary,
        "decomposition": parts,
        "daemon_exit": daemon_rc,
        "daemon_log_lines": log_text.count("\n"),
        "daemon_log_errors": log_text.count('"level": "error"'),
        "blocks": [b.to_json(True) for bs in blocks.values() for b in bs],
        "warmup": [b.to_json(False) for b in warmup],
        "discarded": [b.to_json(False) for b in discarded],
    }
    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    shutil.rmtree(workdir, ignore_errors=True)
    print(f"results: {out}")
    return 0 if daemon_rc == 0 and echo_rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
