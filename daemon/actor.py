"""Context actors: one trio task per context runs its requests one at a time.

A context is a sequence of a batched llama context (:mod:`.batching`): the actor owns its
queue, adapter stack, cancellation and streaming state. It turns a request into a
:class:`~lorad.daemon.generation.Generation` (prompt, stack, sampler, drafter) and asks its
slab's scheduler for the generation's steps one at a time; the scheduler decodes each together
with the steps of other contexts and returns its tokens, which the actor turns into replies
(:class:`~lorad.daemon.output.Output`: text, stop sequences, the end). Requests wait in a FIFO
queue of ``max_queued`` places; when it is full the context answers ``context_busy``. The
engine checks for cancellation between steps and between a prompt's chunks.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import trio

from lorad.protocol import DEFAULT_LIMITS, ErrorCode, Limits, ProtocolError
from lorad.protocol.args import OpArgs

from . import llama, tools
from .adapters import AdapterCache, LoadedAdapter
from .alora import activation
from .batching import Batcher, SlabScheduler
from .budget import KvShape, Reservation
from .generation import Generation
from .grammar import check_grammar
from .ngrams import Memory
from .output import Output
from .queue_actor import Actor, Job
from .registry import LoadedModel
from .requests import RequestHandle
from .speculative import (
    OFF_METRICS,
    Acceptance,
    Drafter,
    DraftModel,
    check_request,
    check_vocabularies,
)
from .speculative import refuse as refuse_speculative
from .templates import TemplateRenderer
from .workers import Pool, TextWorkers


@dataclass(frozen=True)
class StackEntry:
    """One adapter of a stack: how the client named it, the loaded adapter, its scale."""

    ref: str
    adapter: LoadedAdapter
    scale: float

    def matches(self, ref: str) -> bool:
        """Same entry, by the name or path it was given with or its resolved path (no I/O)."""
        return ref in (self.ref, str(self.adapter.path))

    def to_wire(self) -> dict[str, Any]:
        return {"ref": self.ref, "scale": self.scale, **self.adapter.info.to_wire()}


@dataclass(frozen=True)
class Tooling:
    """A chat's tools as :meth:`ContextActor._tooling` prepared them."""

    use: tools.ToolUse
    format: str
    grammar: str | None


class ContextActor(Actor):
    """Owns one sequence of a batched llama context; ``run`` is its task, ``submit`` queues
    work for it."""

    def __init__(self, context_id: str, model: LoadedModel, batcher: Batcher,
                 scheduler: SlabScheduler, seq: llama.Sequence, *,
                 seed: int, max_queued: int, persistent: bool, owner: bytes | None,
                 params: dict[str, Any], adapters: AdapterCache,
                 templates: TemplateRenderer, speculative: dict[str, Any] | bool | None = None,
                 limits: Limits = DEFAULT_LIMITS, text: Pool | None = None) -> None:
        super().__init__(context_id, model, n_ctx=seq.n_ctx, max_queued=max_queued,
                         persistent=persistent, owner=owner, params=params,
                         speculative=speculative)
        self.limits = limits
        self.text = text if text is not None else TextWorkers(limits)
        """Where prompts are tokenized (the daemon's pool for text work)."""
        self.templates = templates
        """Where Jinja chat templates are rendered (worker processes shared by the daemon)."""
        self.drafts: dict[str, tuple[LoadedModel, llama.Context]] = {}
        """Draft-model contexts of this context, by draft model id (no adapters on them)."""
        self._draft_memory: dict[str, Reservation] = {}
        """Each draft context's KV cache in the memory budget."""
        self.draft_seconds: dict[int, float] = {}
        """What drafting a token took on each draft context (by ``id``), kept across
        requests: a draft model too slow to pay is not tried again by every request."""
        self.memory = Memory()
        """What this context's earlier requests generated: ``prompt_lookup`` drafts from it
        too (a request sent again, or an output shaped like an earlier one)."""
        self.acceptance = Acceptance()
        """How its ``prompt_lookup`` drafts were accepted, kept across requests: a request
        starts from what the earlier ones judged (a passage copied again is trusted at once)."""
        self.batcher = batcher
        self.scheduler = scheduler
        self.seq = seq
        self.adapters = adapters
        self._applied: list[StackEntry] = []  # the stack its cached tokens were computed under
        self._held: dict[int, LoadedAdapter] = {}
        self._rng = random.Random(seed)

    # -- adapter stack ------------------------------------------------------------------------
    async def _release(self, adapters: list[LoadedAdapter]) -> None:
        with trio.CancelScope(shield=True):
            for adapter in adapters:
                await self.adapters.release(adapter)

    async def _sync_holds(self) -> None:
        """Hold exactly the adapters of the stack and of the llama context's current stack."""
        want = {id(e.adapter): e.adapter for e in [*self.stack, *self._applied]}
        for key, adapter in want.items():
            if key not in self._held:
                self.adapters.hold(adapter)
            adapter.contexts.add(self.id)
        gone = [a for key, a in self._held.items() if key not in want]
        self._held = want
        for adapter in gone:
            adapter.contexts.discard(self.id)
        await self._release(gone)

    async def set_stack(self, stack: list[StackEntry]) -> None:
        """Make ``stack`` the context's own stack (its adapters are held by the caller).

        A running generation keeps the stack it started with; the next one uses the new stack.
        When an adapter leaves the stack of an idle context, the tokens cached under it are
        dropped at once so that the adapter can be freed; scale changes and additions cost no
        llama.cpp call.
        """
        if self.closing:
            raise ProtocolError(ErrorCode.NOT_FOUND, f"context {self.id!r} is closing",
                                context=self.id)
        if self.on_stack_change is not None:
            self.on_stack_change(self)
        self.stack = list(stack)
        await self._sync_holds()
        kept = {id(e.adapter) for e in self.stack}
        if all(id(e.adapter) in kept for e in self._applied):
            return  # nothing to free: the next generation applies the new stack (and scales)
        if self.current is not None:
            return  # busy: the next generation applies it
        seq = self.seq
        await self.scheduler.clear(seq)
        if self.current is None:
            self._applied = []
            await self._sync_holds()

    def set_scales(self, stack: list[StackEntry]) -> None:
        """Make ``stack`` the context's stack when it holds the same adapters, in the same
        order, as the current one (only scales differ): no holds change and llama.cpp is not
        called; the next generation applies the scales."""
        if [id(e.adapter) for e in stack] != [id(e.adapter) for e in self.stack]:
            raise ValueError("set_scales changes scales only")
        if self.on_stack_change is not None:
            self.on_stack_change(self)
        self.stack = list(stack)

    async def _apply(self, stack: list[StackEntry]) -> None:
        """Hold ``stack``'s adapters while tokens cached under it exist."""
        self._applied = list(stack)
        await self._sync_holds()

    def info(self) -> dict[str, Any]:
        return {**super().info(), "cached_tokens": len(self.seq.tokens)}

    # -- speculative decoding -----------------------------------------------------------------
    async def prepare_speculative(self, spec: dict[str, Any]) -> DraftModel | None:
        """Check that ``spec`` can run on this context (and set up its draft model)."""
        model = self.model.model
        if spec["mode"] == "mtp":
            if model.n_nextn == 0:
                raise refuse_speculative(spec, "no_mtp_heads", "this model has no multi-token-"
                                         "prediction heads (llama_model_n_layer_nextn = 0)")
            raise refuse_speculative(spec, "mtp_not_implemented", "driving MTP heads through "
                                     "llama.cpp's C API is not implemented in lorad yet")
        if not model.can_roll_back:
            raise refuse_speculative(spec, "no_rollback", "this model's memory (recurrent or "
                                     "hybrid) cannot roll back rejected draft tokens")
        if spec["mode"] == "draft_model":
            return DraftModel(await self.draft_context(spec["model"]), spec["p_min"])
        return None

    async def drafter(self, spec: dict[str, Any], args: OpArgs) -> Drafter:
        """The request's drafter; ``speculative_unsupported`` for what cannot run exactly."""
        source = await self.prepare_speculative(spec)
        check_request(spec, args, self.model.model.can_roll_back)
        if source is None:
            return Drafter("prompt_lookup", spec["max_draft"], spec["ngram_min"],
                           spec["ngram_max"], adaptive=spec["adaptive"],
                           acceptance=self.acceptance)
        return Drafter("draft_model", spec["max_draft"], source=source,
                       adaptive=spec["adaptive"],
                       draft_seconds=self.draft_seconds.get(id(source.ctx)))

    async def _free(self) -> None:
        await self.batcher.detach(self.scheduler, self.seq)
        for entry, draft in self.drafts.values():
            await trio.to_thread.run_sync(draft.close)
            entry.contexts.discard(self.id)
        self.drafts.clear()
        for reservation in self._draft_memory.values():
            reservation.release()
        self._draft_memory.clear()
        self.draft_seconds.clear()
        self.stack, self._applied = [], []
        await self._sync_holds()

    async def draft_context(self, ref: str) -> llama.Context:
        """This context's llama context on the draft model ``ref`` (created on first use)."""
        if self.resolve_model is None:
            raise ProtocolError(ErrorCode.INTERNAL, "no model resolver for draft models")
        entry = await self.resolve_model(ref)
        if entry.id in self.drafts:
            return self.drafts[entry.id][1]
        if entry is self.model:
            raise refuse_speculative({"mode": "draft_model"}, "same_model",
                                     "the draft model is the target model itself; use a "
                                     "smaller model with the same vocabulary")
        target = self.model.model
        async with entry.using() as model:  # an unload of the draft model waits, then closes
            await trio.to_thread.run_sync(check_vocabularies, target, model)  # this context
            if not model.can_roll_back:
                raise refuse_speculative({"mode": "draft_model"}, "no_rollback", "the draft "
                                         "model's memory cannot roll back rejected tokens")
            p = self.params
            draft, reservation = await self.batcher.memory.make(
                f"the draft context of {self.id!r} on model {entry.id!r}",
                KvShape.of(model).bytes(self.n_ctx, "f16"), lambda: llama.Context(
                    model, n_ctx=self.n_ctx, n_batch=p["n_batch"], n_threads=p["n_threads"]),
                model=entry.id)
            self.drafts[entry.id] = (entry, draft)
            self._draft_memory[entry.id] = reservation
            entry.contexts.add(self.id)
        return draft

    # -- generation ---------------------------------------------------------------------------
    async def _tooling(self, h: RequestHandle, args: OpArgs) -> Tooling | None:
        """A chat's tools (:mod:`.tools`): how they are used, the template's format and the
        grammar that holds the output; None for a request without tools or tool messages."""
        if h.op != "chat" or (args.tools is None and args.tool_choice is None and not any(
                m.get("tool_calls") or m["role"] == "tool" for m in args.messages)):
            return None
        fmt = tools.detect(args.template or self.model.template)
        use = tools.parse_tools(args.tools, args.tool_choice, args.parallel_tool_calls, fmt)
        grammar = await trio.to_thread.run_sync(tools.grammar, use, fmt)
        if grammar is not None and args.grammar is not None:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "give either grammar or tools: calls "
                                "that are forced (tool_choice required or a function), or "
                                "made on a template without tool syntax, bring their own "
                                "grammar", field="grammar")
        return Tooling(use, fmt, grammar)

    async def _prompt_tokens(self, h: RequestHandle, args: OpArgs,
                             tooling: Tooling | None = None) -> list[int]:
        model = self.model.model
        room = self.n_ctx - 1  # a prompt leaves room for at least one generated token

        def overflow(n: int, at_least: bool = False) -> ProtocolError:
            extra = {"at_least": True} if at_least else {}
            return ProtocolError(ErrorCode.CONTEXT_OVERFLOW,
                                 f"prompt of {'at least ' if at_least else ''}{n} tokens does "
                                 f"not fit in n_ctx={self.n_ctx}",
                                 prompt_tokens=n, n_ctx=self.n_ctx, **extra)

        if h.op != "chat" and args.tokens is not None:
            tokens = args.tokens
            if len(tokens) > room:
                raise overflow(len(tokens))
            bad = next((t for t in tokens if t >= model.n_vocab), None)
            if bad is not None:
                raise ProtocolError(ErrorCode.BAD_REQUEST,
                                    f"token {bad} is outside the vocabulary ({model.n_vocab})",
                                    field="tokens")
        elif h.op == "chat":
            messages, tools_var = args.messages, None
            if tooling is not None:
                messages, tools_var = tools.prepare(messages, tooling.use, tooling.format)
            text = await render_chat(self.templates, model, messages,
                                     args.add_generation_prompt,
                                     args.template or self.model.chat_template, tools_var)
            bos_text = model.token_text(model.bos) if model.add_bos else ""
            bos = [model.bos] if model.add_bos and not (bos_text and text.startswith(bos_text)) \
                else []
            try:
                tokens = bos + await self.text.run(lambda: model.tokenize(
                    text, add_special=False, parse_special=True, limit=room - len(bos)))
            except llama.TooManyTokens as exc:
                raise overflow(exc.n + len(bos), exc.at_least) from None
        else:
            try:
                tokens = await self.text.run(lambda: model.tokenize(
                    args.prompt, add_special=args.add_special, limit=room))
            except llama.TooManyTokens as exc:
                raise overflow(exc.n, exc.at_least) from None
        if not tokens:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "the prompt is empty", field="prompt")
        return tokens

    async def _generate(self, job: Job) -> None:
        h, args = job.handle, job.args
        started = time.perf_counter()
        tooling = await self._tooling(h, args)
        prompt = await self._prompt_tokens(h, args, tooling)
        seed = args.seed if args.seed is not None else self._rng.randrange(2**32)
        params = llama.SamplingParams(
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            min_p=args.min_p, repeat_penalty=args.repeat_penalty,
            repeat_last_n=args.repeat_last_n, seed=seed,
            grammar=tooling.grammar if tooling and tooling.grammar else args.grammar,
        )
        spec = args.speculative if args.speculative is not None else self.speculative
        drafter = await self.drafter(spec, args) if spec else None
        greedy = args.temperature == 0
        stack = job.stack if job.stack is not None else list(self.stack)
        if [(e.adapter, e.scale) for e in stack] != [(e.adapter, e.scale) for e in self._applied]:
            await self._apply(stack)  # the scheduler reuses no token cached under another stack
        active, before, split = activation(stack, prompt)  # an aLoRA starts at its invocation
        if params.grammar is not None:
            await trio.to_thread.run_sync(check_grammar, params.grammar, self.limits)
        model = self.model.model
        sampler = await trio.to_thread.run_sync(
            lambda: llama.Sampler(model, params, self.limits.grammar_ms))
        gen = Generation(
            self.seq, prompt, [(e.adapter.adapter, e.scale) for e in active], sampler,
            args.max_tokens,
            plain_greedy=greedy and params.grammar is None and args.repeat_penalty == 1.0,
            params=None if greedy else params, rng=np.random.default_rng(seed),
            n_logprobs=args.logprobs, chunk=self.params["n_batch"],
            pre_stack=([(e.adapter.adapter, e.scale) for e in before] if before is not None
                       else None),
            split=split or 0, drafter=drafter, memory=self.memory,
            should_stop=lambda: h.cancelled, client=self.creator)
        out = Output(model.piece, model.is_eog, args.stop,
                     tools.StreamSplitter(tooling.use, tooling.format) if tooling else None,
                     received_at=h.received_at, started=started)
        self.scheduler.join(self.seq)
        try:
            finish = await self._stream(h, gen, out)
            if finish != "cancelled":
                tail = out.close()
                finish = out.finish or finish
                if tail is not None:
                    await h.send_item(tail)
        finally:
            # its client (a context of none: itself, as its steps' owner)
            self.scheduler.leave(self.seq, ended=self.creator if self.creator is not None
                                 else id(self.seq))
            self.memory.add(prompt, out.tokens)
            await trio.to_thread.run_sync(sampler.close)
            if drafter is not None and drafter.source is not None and drafter.draft_seconds:
                self.draft_seconds[id(drafter.source.ctx)] = drafter.draft_seconds
        metrics = {
            **out.stats(len(prompt), gen.reused),
            "seed": seed,
            "loras": [{"ref": e.ref, "path": str(e.adapter.path), "scale": e.scale}
                      for e in stack],
            **({"alora_invocation_start": split} if any(e.adapter.info.is_alora for e in stack)
               else {}),
            **(drafter.metrics() if drafter is not None else OFF_METRICS),
        }
        end: dict[str, Any] = {"finish_reason": finish, "metrics": metrics}
        if tooling is not None:
            end["tool_calls"] = out.calls
        h.send_end(end)

    async def _stream(self, h: RequestHandle, gen: Generation, out: Output) -> str:
        """Step ``gen`` and send its tokens as they come, until it ends: ``cancelled``, or
        ``length`` (``out.finish`` says when a stop sequence or the end-of-generation token
        ended it first). A client with no credit left takes its sequence out of the batches
        until it reads again."""
        scheduler, seq = self.scheduler, self.seq
        while True:
            output = await scheduler.next(gen)
            if out.prompted is None:
                out.prompt_done()
            if output.end == "cancelled":
                return "cancelled"
            for token, logprobs in output.tokens:
                item = out.token(token, logprobs)
                if item is None:  # the end-of-generation token
                    return "length"
                if h.credit <= 0:  # waits for the client: the batches go on without it
                    scheduler.leave(seq)
                sent = await h.send_item(item)
                scheduler.join(seq)
                if not sent:
                    return "cancelled"
                if out.finish is not None:  # a stop sequence
                    return "length"
            if output.end is not None:
                return output.end


async def render_chat(templates: TemplateRenderer, model: llama.Model,
                      messages: list[dict[str, Any]], add_generation_prompt: bool,
                      template: str | None = None,
                      tools: list[dict[str, Any]] | None = None) -> str:
    """Format messages with ``template`` (a llama.cpp built-in name or Jinja source), else
    with the model's own Jinja chat template (rendered by ``templates``, out of process);
    ``tools``: the Jinja template's ``tools`` variable."""
    if template is not None and "{" not in template:
        return await trio.to_thread.run_sync(
            llama.apply_builtin_chat_template, template, messages, add_generation_prompt)
    source = template or model.chat_template
    if source is None:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST,
            "this model has no chat template: pass template= (a llama.cpp built-in name or "
            "Jinja source), or use generate with your own prompt format",
            field="template", builtin=llama.builtin_chat_templates(),
        )
    return await templates.render(
        source, messages=messages, add_generation_prompt=add_generation_prompt,
        bos_token=model.token_text(model.bos), eos_token=model.token_text(model.eos),
        tools=tools,
    )
