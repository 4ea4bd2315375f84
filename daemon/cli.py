"""``lorad serve``: the daemon's own command line (``python -m lorad.daemon``).

The client's ``lorad`` command borrows :func:`add_serve_arguments` and :func:`run_serve` for its
``serve`` subcommand; this module imports nothing heavy until the daemon runs, and nothing of
``lorad.client``.
"""

from __future__ import annotations

import argparse
import functools
import signal
import sys
from typing import Any

from lorad.protocol.refs import parse_lora_option, speculative_option


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``lorad serve`` (``--endpoint`` is the caller's)."""
    p.add_argument("--config", help="TOML config file (flags given here override it)")
    p.add_argument("--group", help="make the ipc socket 0660 for this group")
    p.add_argument("--allow-dir", action="append", help="allow models from this directory "
                   "(repeatable; added to the config's)")
    p.add_argument("--model", help="preload this model and create the persistent context "
                   "'default' on it")
    p.add_argument("--alias", help="model id for --model")
    p.add_argument("--n-gpu-layers", type=int, metavar="N", help="layers of --model on the GPU "
                   "(-1: all, the default on a GPU build; 0: none; refused on a CPU build)")
    p.add_argument("--n-ctx", type=int, help="n_ctx of the default context")
    p.add_argument("--threads", type=int, help="threads of the default context")
    p.add_argument("--lora", action="append", metavar="PATH[:SCALE]",
                   help="adapter stack of the default context (repeatable, in order); "
                   "replaces the config file's stack for it")
    p.add_argument("--adapter-dir", action="append", help="look adapter names up here first "
                   "(repeatable; files there are allowed)")
    p.add_argument("--speculative", choices=["prompt_lookup", "draft_model", "mtp", "off"],
                   help="default speculative decoding of the default context")
    p.add_argument("--draft-max", type=int, help="maximum draft length (speculative)")
    p.add_argument("--draft-model", help="the draft model, id or path (--speculative "
                   "draft_model)")
    p.add_argument("--heartbeat-ms", type=int, help="ZMTP heartbeat interval (default 1000)")
    p.add_argument("--curve-secret-key", metavar="FILE", help="the daemon's CURVE certificate "
                   "(NAME.key_secret from `lorad keys generate`): encrypt and authenticate")
    p.add_argument("--curve-authorized-keys", metavar="DIR", help="public certificates (*.key) "
                   "of the clients allowed in; any other key is refused")
    p.add_argument("--metrics-address", metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (loopback only)")
    p.add_argument("--http", metavar="HOST:PORT", help="also serve the OpenAI-compatible HTTP "
                   "API here (loopback unless API keys are given; needs lorad[http])")
    p.add_argument("--http-metrics", action="store_true", help="also serve Prometheus "
                   "metrics at /metrics on the --http port (behind its API keys, if any)")
    p.add_argument("--api-key-file", metavar="FILE", help="API keys of the HTTP API, one per "
                   "line (Authorization: Bearer KEY); required for a non-loopback --http")
    p.add_argument("--chat-template", metavar="NAME|FILE", help="chat template of --model "
                   "(else of the config file's models): a llama.cpp built-in name such as "
                   "gemma or chatml, or a file of Jinja; used instead of the file's own")
    p.add_argument("--repack", choices=["auto", "on", "off"], help="let llama.cpp repack "
                   "weights for this CPU (auto: unless it has AMX; see capabilities.repack)")
    p.add_argument("--log-format", choices=["auto", "json", "console"])
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])


def run_serve(args: argparse.Namespace, speculative: dict[str, Any] | bool | None) -> int:
    """Run the daemon in the foreground with ``args`` over the config file; the exit status."""
    from .heap import return_large_frees
    from .lean_imports import keep_imports_lean

    keep_imports_lean()  # before anything imports llama_cpp or structlog
    return_large_frees()  # freed KV caches and buffers go back to the system
    import trio

    from lorad.protocol import ProtocolError

    from .config import apply_overrides, load_config
    from .errors import ConfigError, DaemonError
    from .logs import configure_logging
    from .server import run_daemon

    try:
        config = load_config(args.config)
        apply_overrides(  # explicit flags beat the config file
            config, endpoint=args.endpoint, group=args.group, allow_dir=args.allow_dir,
            adapter_dir=args.adapter_dir, log_format=args.log_format, log_level=args.log_level,
            metrics_address=args.metrics_address, curve_secret_key=args.curve_secret_key,
            curve_authorized_keys=args.curve_authorized_keys, heartbeat_ms=args.heartbeat_ms,
            repack=args.repack, http_address=args.http, api_key_file=args.api_key_file,
            model=args.model, alias=args.alias, n_gpu_layers=args.n_gpu_layers,
            n_ctx=args.n_ctx, threads=args.threads,
            speculative=speculative, chat_template=args.chat_template,
            http_metrics=args.http_metrics,
            loras=[parse_lora_option(x) for x in args.lora] if args.lora else None,
        )
    except (ConfigError, ProtocolError) as exc:
        print(f"lorad serve: {exc.message}", file=sys.stderr)
        return 2
    configure_logging(config.log_format, config.log_level)
    try:
        # The process ends with the daemon: a signal after its drain is dropped. Python puts
        # back the default handlers of those it handled as it finalizes (a SIGINT then ended
        # the process with -2 after a clean drain), but leaves ignored signals ignored.
        trio.run(functools.partial(run_daemon, config, restore_signals=False))
    except (DaemonError, ProtocolError) as exc:
        print(f"lorad serve: [{exc.code.value}] {exc.message}", file=sys.stderr)
        return 1
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lorad serve", description="run the lorad daemon")
    parser.add_argument("--endpoint", help="endpoint to serve (default: $LORAD_ENDPOINT or the "
                        "per-user ipc socket)")
    add_serve_arguments(parser)
    args = parser.parse_args(argv)
    try:
        speculative = speculative_option(args.speculative, args.draft_max, args.draft_model)
    except ValueError as exc:
        print(f"lorad serve: {exc}", file=sys.stderr)
        return 2
    try:
        return run_serve(args, speculative)
    except KeyboardInterrupt:
        return 130
