"""Contexts on LiteRT-LM models: each request is one runtime session, and a model's sessions
take turns.

A LiteRT-LM engine decodes one session at a time (no batching across sessions), so the requests
of every context on a model wait for their turn in arrival order (:class:`Turns`, a fair lock;
``status`` shows who runs and how many wait). A request is checked against what the runtime can
do when it is queued, before any work (:func:`check_request`): what it cannot do is refused
with ``backend_unsupported`` (or ``speculative_unsupported``) and the reason, never ignored.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from lorad.protocol import DEFAULT_LIMITS, ErrorCode, Limits, ProtocolError
from lorad.protocol.args import OpArgs

from . import litert, llama
from .litert_adapters import LitertAdapter, SessionFiles
from .output import Output
from .queue_actor import Actor, Job
from .registry import LoadedModel
from .requests import RequestHandle
from .speculative import OFF_METRICS
from .speculative import refuse as refuse_speculative
from .templates import TemplateRenderer
from .workers import Pool, TextWorkers

MIN_P_DEFAULT = 0.05
"""``min_p``'s protocol default: accepted (and not applied: the runtime has no min-p), like 0."""


REFUSED = {
    "grammar": "no_grammar", "logprobs": "no_logprobs", "repeat_penalty": "sampler",
    "min_p": "sampler", "tokens": "text_prompt", "add_special": "start_token",
    "tools": "no_tools", "loras": "one_adapter",
    "op:set_lora": "no_lora_inputs", "op:embed": "no_embeddings",
    "speculative.prompt_lookup": "backend", "speculative.draft_model": "backend",
    "n_threads": "engine_wide", "kv_type": "engine_wide", "flash_attn": "engine_wide",
    "n_batch": "engine_wide", "n_gpu_layers": "cpu_only", "use_mmap": "runtime_maps",
}
"""What a LiteRT-LM model refuses, and the ``reason`` it says (``capabilities`` lists it)."""


def features(model: LoadedModel) -> dict[str, Any]:
    """A LiteRT-LM model's capabilities (``capabilities``' ``models``)."""
    lora = model.model.lora_spec is not None
    return {"backend": litert.BACKEND, "streaming": True, "cancel": True, "stop": True,
            "chat_template": True, "sampling": ["temperature", "top_k", "top_p", "seed"],
            "logprobs": False, "grammar": False, "tools": False, "token_prompts": False,
            "prefix_cache": False, "lora": lora, "lora_stack": False,
            "lora_per_request": lora, "alora": False, "embeddings": False,
            "batching": False, "sessions_at_once": 1,
            "speculative": ["mtp"] if model.model.speculative else [],
            "refused": REFUSED}


def unsupported(what: str, reason: str, message: str, **details: Any) -> ProtocolError:
    """``backend_unsupported`` for ``what`` (an argument or an operation) on LiteRT-LM."""
    key = "op" if what.startswith("op:") else "field"
    return ProtocolError(ErrorCode.BACKEND_UNSUPPORTED, f"LiteRT-LM models: {message}",
                         backend=litert.BACKEND, reason=reason,
                         **{key: what.removeprefix("op:")}, **details)


def check_speculative(spec: dict[str, Any], model: LoadedModel) -> None:
    """``mtp`` runs where the runtime says the bundle carries a drafter; nothing else does."""
    if spec["mode"] != "mtp":
        raise refuse_speculative(spec, "backend", f"{spec['mode']} drafts through llama.cpp "
                                 "contexts; LiteRT-LM models take mtp only, where the bundle "
                                 "carries a drafter", backend=litert.BACKEND)
    if not model.model.speculative:
        raise refuse_speculative(spec, "no_drafter", "the runtime says this bundle has no "
                                 "speculative-decoding support (ModelInfo.llm."
                                 "has_speculative_decoding_support() is False: only bundles "
                                 "with an MTP drafter, such as Gemma 4's, have it)",
                                 backend=litert.BACKEND)


def check_request(h: RequestHandle, args: OpArgs, model: LoadedModel,
                  default_spec: dict[str, Any] | bool | None) -> None:
    """Refuse what a LiteRT-LM session cannot do, before any work."""
    if args.grammar is not None:
        raise unsupported("grammar", "no_grammar", "grammars are llama.cpp's; the runtime "
                          "has no grammar sampler")
    if args.logprobs:
        raise unsupported("logprobs", "no_logprobs", "the runtime streams text pieces, not "
                          "token scores")
    if args.repeat_penalty != 1.0:
        raise unsupported("repeat_penalty", "sampler", "the runtime's sampler takes "
                          "temperature, top_k, top_p and seed only")
    if args.min_p not in (0.0, MIN_P_DEFAULT):
        raise unsupported("min_p", "sampler", "the runtime's sampler takes temperature, "
                          "top_k, top_p and seed only (min_p 0 or its default are accepted "
                          "and not applied)")
    if h.op == "generate":
        if args.tokens is not None:
            raise unsupported("tokens", "text_prompt", "the runtime takes prompts as text: "
                              "pass prompt")
        if not args.add_special:
            raise unsupported("add_special", "start_token", "the runtime always adds the "
                              "start token to a prompt")
    elif args.tools is not None or args.tool_choice is not None or any(
            m.get("tool_calls") or m["role"] == "tool" for m in args.messages):
        raise unsupported("tools", "no_tools", "tool calling is not served on LiteRT-LM "
                          "models in lorad")
    spec = args.speculative if args.speculative is not None else default_spec
    if spec:
        check_speculative(spec, model)


class Turns:
    """A LiteRT-LM model's engine, one session at a time, in arrival order; and the adapter
    files its sessions get (:mod:`.litert_adapters`)."""

    def __init__(self, files: SessionFiles) -> None:
        self.files = files
        self._lock = trio.Lock()  # fair: the longest waiter is next
        self.waiting = 0
        self.running: str | None = None
        """The context whose request runs now."""

    @asynccontextmanager
    async def turn(self, context: str) -> Any:
        self.waiting += 1
        try:
            await self._lock.acquire()
        finally:
            self.waiting -= 1
        self.running = context
        try:
            yield
        finally:
            self.running = None
            self._lock.release()

    def info(self) -> dict[str, Any]:
        return {"running": self.running, "waiting": self.waiting}


@dataclass
class _Run:
    """One request's run on the engine, shared by its tasks."""

    text: str
    max_tokens: int
    speculative: bool
    sampling: litert.Sampling
    adapter: tuple[LitertAdapter | None, float]
    """The adapter the session applies, and its scale."""
    session: litert.Session | None = None
    """Set once the turn has come and the session is made."""
    waiting: trio.CancelScope = field(default_factory=trio.CancelScope)
    counts: litert.Counts = field(default_factory=lambda: litert.Counts())
    failed: Exception | None = None


class LitertActor(Actor):
    """A context on a LiteRT-LM model (see the module)."""

    backend = litert.BACKEND

    def __init__(self, context_id: str, model: LoadedModel, turns: Turns, *, n_ctx: int,
                 seed: int, max_queued: int, persistent: bool, owner: bytes | None,
                 params: dict[str, Any], templates: TemplateRenderer,
                 speculative: dict[str, Any] | bool | None = None,
                 limits: Limits = DEFAULT_LIMITS, text: Pool | None = None) -> None:
        super().__init__(context_id, model, n_ctx=n_ctx, max_queued=max_queued,
                         persistent=persistent, owner=owner, params=params,
                         speculative=speculative)
        self.turns = turns
        self.templates = templates
        self.limits = limits
        self.text = text if text is not None else TextWorkers(limits)
        """Where prompts are tokenized (the daemon's pool for text work)."""
        self._rng = random.Random(seed)

    def submit(self, handle: RequestHandle, args: OpArgs, stack: Any = None,
               held: Any = None) -> None:
        check_request(handle, args, self.model, self.speculative)
        super().submit(handle, args, stack, held)

    async def set_stack(self, stack: list[Any]) -> None:
        """One adapter at most (the stack's builder refuses more); the next session applies
        it. A running generation keeps the adapter it started with."""
        if self.closing:
            raise ProtocolError(ErrorCode.NOT_FOUND, f"context {self.id!r} is closing",
                                context=self.id)
        if len(stack) > 1:
            raise unsupported("loras", "one_adapter", "the runtime applies one adapter per "
                              "session: remove the context's adapter first, or replace it "
                              "with set_loras", value=len(stack))
        if self.on_stack_change is not None:
            self.on_stack_change(self)
        self.stack = list(stack)

    def set_scales(self, stack: list[Any]) -> None:
        """The same adapter at another scale (its file is written when a session needs it)."""
        if [id(e.adapter) for e in stack] != [id(e.adapter) for e in self.stack]:
            raise ValueError("set_scales changes scales only")
        if self.on_stack_change is not None:
            self.on_stack_change(self)
        self.stack = list(stack)

    async def prepare_speculative(self, spec: dict[str, Any]) -> None:
        """A context's default: checked when it is created."""
        check_speculative(spec, self.model)

    async def _prompt(self, h: RequestHandle, args: OpArgs) -> str:
        if h.op == "generate":
            return args.prompt
        template = args.template or self.model.template
        if template is not None and "{" not in template:
            return await trio.to_thread.run_sync(
                llama.apply_builtin_chat_template, template, args.messages,
                args.add_generation_prompt)
        if template is None:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "this model has no chat template: "
                                "load it with chat_template=, pass template=, or use generate "
                                "with your own prompt format", field="template",
                                builtin=llama.builtin_chat_templates())
        model = self.model.model
        bos = model.token_text(model.bos)
        text = await self.templates.render(
            template, messages=args.messages, add_generation_prompt=args.add_generation_prompt,
            bos_token=bos, eos_token=model.token_text(model.stops[0][0] if model.stops
                                                      else None),
            tools=None)
        return text.removeprefix(bos) if bos else text  # the runtime adds the start token

    async def _generate(self, job: Job) -> None:
        h, args = job.handle, job.args
        started = time.perf_counter()
        model = self.model.model
        text = await self._prompt(h, args)
        if not text:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "the prompt is empty", field="prompt")
        tokens = await self.text.run(model.tokenize, text)
        if not tokens:  # the runtime fails to prefill the start token alone
            raise ProtocolError(ErrorCode.BAD_REQUEST, "the prompt has no tokens (this model's "
                                "tokenizer drops what it holds)", field="prompt")
        n_prompt = len(tokens) + 1  # + the start token
        if n_prompt >= self.n_ctx:
            raise ProtocolError(ErrorCode.CONTEXT_OVERFLOW, f"prompt of {n_prompt} tokens does "
                                f"not fit in n_ctx={self.n_ctx}", prompt_tokens=n_prompt,
                                n_ctx=self.n_ctx)
        seed = args.seed if args.seed is not None else self._rng.randrange(2**32)
        spec = args.speculative if args.speculative is not None else self.speculative
        stack = job.stack if job.stack is not None else list(self.stack)
        run = _Run(text, min(args.max_tokens, self.n_ctx - n_prompt), bool(spec),
                   litert.Sampling(args.temperature, args.top_k, args.top_p, seed),
                   (stack[0].adapter, stack[0].scale) if stack else (None, 1.0))
        pieces: list[bytes] = []
        out = Output(pieces.__getitem__, lambda _i: False, args.stop, received_at=h.received_at,
                     started=started, token_ids=False)
        send, recv = trio.open_memory_channel[str](math.inf)  # at most max_tokens pieces
        finish: str | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._decode, h, run, out, send)
            nursery.start_soon(self._watch, h, run)
            async for piece in recv:
                if finish is not None:
                    continue  # ended by lorad: the runtime stops within a token
                pieces.append(piece.encode())
                item = out.token(len(pieces) - 1)
                assert item is not None
                if not await h.send_item(item):
                    finish = "cancelled"
                elif out.finish is not None:
                    finish = "stop"  # a stop sequence
                if finish is not None and run.session is not None:
                    run.session.cancel()
            nursery.cancel_scope.cancel()  # the watcher (the decoding has ended)
        if run.failed is not None:
            raise run.failed
        if h.cancelled or run.session is None:
            finish = "cancelled"
        elif finish is None:  # the runtime ended it: a stop token, or max_output_tokens
            finish = "length" if run.counts.generated_tokens >= run.max_tokens else "stop"
        if finish != "cancelled":
            tail = out.close()
            if tail is not None:
                await h.send_item(tail)
        stats = out.stats(run.counts.prompt_tokens or n_prompt, 0)
        stats["generated_tokens"] = max(run.counts.generated_tokens, out.generated)
        metrics = {**stats, "seed": seed, "backend": litert.BACKEND,
                   "loras": [{"ref": e.ref, "path": str(e.adapter.path), "scale": e.scale}
                             for e in stack],
                   **(OFF_METRICS if not spec else
                      {**OFF_METRICS, "speculative": True, "speculative_mode": "mtp",
                       "drafted_tokens": None, "accepted_tokens": None})}
        h.send_end({"finish_reason": finish, "metrics": metrics})

    async def _decode(self, h: RequestHandle, run: _Run, out: Output,
                      send: trio.MemorySendChannel[str]) -> None:
        """The request's turn on the engine: a session that decodes in a worker thread and
        hands its pieces to ``send``. The turn ends with the decoding, so a client that reads
        slowly holds no other context back."""
        token = trio.lowlevel.current_trio_token()

        def work(session: litert.Session) -> None:
            try:
                stream: Iterator[str] = session.run(
                    run.text, lambda: token.run_sync_soon(out.prompt_done))
                for piece in stream:
                    token.run_sync_soon(send.send_nowait, piece)
            except Exception as exc:  # raised by the request, as itself
                run.failed = exc

        try:
            with run.waiting:  # cancelled by the watcher while the turn is awaited
                async with self.turns.turn(self.id):
                    if h.cancelled:
                        return
                    with trio.CancelScope(shield=True):  # never a session left unclosed
                        session = await trio.to_thread.run_sync(self._session, run)
                    run.session = session
                    try:
                        if not h.cancelled:
                            await trio.to_thread.run_sync(work, session)
                    finally:
                        run.counts = session.counts()
                        with trio.CancelScope(shield=True):
                            await trio.to_thread.run_sync(session.close)
        except litert.LitertError as exc:
            run.failed = exc
        finally:
            send.close()

    def _session(self, run: _Run) -> litert.Session:
        """The request's session, with its adapter file (in its turn: the runtime's adapter
        is the engine's, so the file is chosen when no other session can be made)."""
        lora = self.turns.files.for_session(*run.adapter)
        return self.model.model.session(run.sampling, run.max_tokens,
                                        speculative=run.speculative, lora=lora)

    async def _watch(self, h: RequestHandle, run: _Run) -> None:
        """Cancel the request's turn while it is awaited, or its session once it runs."""
        await h.wait_cancelled()
        if run.session is None:
            run.waiting.cancel()
        else:
            run.session.cancel()

    def info(self) -> dict[str, Any]:
        return {**super().info(), "cached_tokens": 0}
