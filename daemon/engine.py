"""The engine: models, adapters, chat templates and context actors; no sockets, no transport.

Handlers call it; it calls :mod:`lorad.daemon.llama` (through the registry, the adapter cache
and the actors). Contexts belong to an opaque owner (the transport's peer id, or None for the
config file's): a private context is visible to its creator alone.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import trio

from lorad.protocol import ErrorCode, ProtocolError
from lorad.protocol.args import OpArgs, parse_args

from . import litert, llama
from .actor import ContextActor
from .adapters import AdapterCache
from .batching import Batcher
from .budget import KvShape, MemoryBudget, Reservation
from .config import DaemonConfig
from .ingress import Ingress
from .litert_actor import LitertActor, Turns, unsupported
from .litert_adapters import SessionFiles
from .logs import log
from .metrics import Metrics
from .paths import AllowedDirs
from .queue_actor import Actor
from .registry import LoadedModel, ModelRegistry, unloaded
from .repack import decide as decide_repack
from .sessions import is_http_peer
from .stacks import Stacks
from .templates import TemplateRenderer
from .workers import FileWorkers, TextWorkers, usable_cpus

DEFAULT_N_CTX = 4096
UNUSED_WAIT_S = 30
"""How long a stopping daemon waits for worker threads still reading a model."""
EMBED_N_CTX = 2048
"""Context size of the embedding contexts (at most the model's training context)."""


@dataclass(eq=False)
class _Embedder:
    """A model's embedding context, and the lock that gives it to one request at a time."""

    model: LoadedModel
    ctx: llama.Context
    reservation: Reservation
    lock: trio.Lock = field(default_factory=trio.Lock)


class Engine:
    """Owns every model, adapter and context of the daemon."""

    def __init__(self, config: DaemonConfig, metrics: Metrics) -> None:
        self.config = config
        self.limits = config.limits
        self.metrics = metrics
        self.allowed = AllowedDirs(config.allowed_dirs)
        adapter_dirs = [Path(d).expanduser().resolve() for d in config.adapter_dirs]
        peft_cache = Path(config.peft_cache_dir).expanduser()
        self.repack = decide_repack(config.repack)
        self.memory = MemoryBudget(config.limits.memory_budget_bytes)
        """Model weights and KV caches, admitted against ``limits.memory_budget_bytes``."""
        self.ingress = Ingress(config.batching.loop_share)
        """The doors' gate while steps decode (see :mod:`lorad.daemon.ingress`)."""
        self.max_threads = config.limits.max_n_threads or usable_cpus()
        self.models = ModelRegistry(self.allowed, repack=self.repack.enabled, memory=self.memory,
                                    threads=min(os.cpu_count() or 1, self.max_threads))
        self.files = FileWorkers(config.limits, gate=self.ingress)
        self.text = TextWorkers(config.limits)
        self.adapters = AdapterCache(self.files, config.limits.max_adapter_bytes, metrics,
                                     max_file_bytes=config.limits.max_adapter_file_bytes)
        self.stacks = Stacks(
            self.adapters, adapter_dirs,
            AllowedDirs([*config.allowed_dirs, *config.adapter_dirs, peft_cache]),
            peft_cache, config.limits)
        self.templates = TemplateRenderer(config.limits)
        self.contexts: dict[str, Actor] = {}
        """Every context, of either backend (:class:`ContextActor`, :class:`LitertActor`)."""
        self.on_closed: Callable[[Actor], None] | None = None
        """Called when a context closes (the sessions forget its owner's claim on it)."""
        self._nursery: trio.Nursery | None = None
        self._embedders: dict[str, _Embedder] = {}
        """One embedding context per model id (never a generation context)."""
        self._closing: set[Actor] = set()
        """Contexts being closed (out of ``contexts`` already): a drain waits for them too."""
        self._batchers: dict[int, Batcher] = {}
        """The batched llama contexts of each model (by ``id`` of its LoadedModel)."""
        self._turns: dict[int, Turns] = {}
        """The session queue of each LiteRT-LM model (by ``id`` of its LoadedModel)."""

    @property
    def adapter_dirs(self) -> list[Path]:
        return self.stacks.adapter_dirs

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Host the context actors until cancelled; then free models and template workers."""
        trio.lowlevel.add_instrument(self.ingress)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self.templates.warm_up)
                task_status.started()
                await trio.sleep_forever()
        finally:
            trio.lowlevel.remove_instrument(self.ingress)
            with trio.CancelScope(shield=True):
                await self.templates.aclose()
                # A request's worker thread may still read a model (a tokenization of
                # megabytes takes a second): its weights are freed only once it is done.
                with trio.move_on_after(UNUSED_WAIT_S):
                    for entry in self.models:
                        await entry.wait_unused()
            for embedder in self._embedders.values():
                embedder.ctx.close()
            for batcher in self._batchers.values():
                batcher.close()
            for entry in self.models:
                if not entry.in_use:  # else left to the process's exit
                    entry.model.close()

    # -- models -------------------------------------------------------------------------------
    async def model_for(self, ref: str) -> LoadedModel:
        """A loaded model by id, alias or path; a path not loaded yet is loaded."""
        if self.models.is_path(ref):
            return await self.models.load(ref)
        return self.models.get(ref)

    async def unload_model(self, ref: str, force: bool) -> dict[str, Any]:
        entry = self.models.get(ref)
        in_use = sorted(c for c in entry.contexts if c not in self.contexts
                        or not self.contexts[c].managed or not self.contexts[c].idle)
        if (in_use or entry.creating) and not force:
            raise ProtocolError(
                ErrorCode.IN_USE,
                f"model {entry.id!r} has {len(in_use)} context(s)"
                + (f" and {entry.creating} being created" if entry.creating else "")
                + "; close them or force", model=entry.id, contexts=in_use,
                creating=entry.creating)
        self.models.detach(entry)  # from here no new context, embedding or adapter finds it
        await entry.wait_unused()  # a context being made, an adapter or a text being read
        for actor in [a for a in self._closing if a.model is entry]:
            await actor.closed.wait()  # a context being closed still frees its sequence
        closed = sorted(entry.contexts)
        for ctx_id in closed:
            if ctx_id in self.contexts:
                await self.close_context(self.contexts[ctx_id])
        embedder = self._embedders.pop(entry.id, None)
        if embedder is not None:
            async with embedder.lock:  # an embedding in progress finishes first
                await trio.to_thread.run_sync(embedder.ctx.close)
            embedder.reservation.release()
        batcher = self._batchers.pop(id(entry), None)  # its contexts are closed
        if batcher is not None:
            batcher.close()  # the idle slabs kept for its next contexts; its decode thread
        self._turns.pop(id(entry), None)
        await self.adapters.drop_model(entry)
        await self.models.unload(entry)
        self.metrics.forget_model(entry.id)
        return {"model": entry.id, "unloaded": True, "closed_contexts": closed}

    def tokenizer(self, args: OpArgs, owner: bytes | None) -> LoadedModel:
        """The model of ``args.context`` (if ``owner`` may use it) or ``args.model``."""
        if args.context is not None:
            return self.context(args.context, owner).model
        return self.models.get(args.model)

    # -- embeddings ---------------------------------------------------------------------------
    async def embed(self, args: OpArgs, owner: bytes | None,
                    cancelled: Callable[[], bool]) -> dict[str, Any]:
        """One vector per input, from the model (or a context's model, under its adapter
        stack), computed in the model's embedding context: never a generation context's KV."""
        actor = self.context(args.context, owner) if args.context is not None else None
        entry = actor.model if actor is not None else self.models.get(args.model)
        if entry.backend == litert.BACKEND:
            raise unsupported("op:embed", "no_embeddings", "the runtime gives no hidden states "
                              "of a language model (its embedding models are not served)")
        found = await self._embedder(entry)
        embedder = found.ctx
        model, inputs = entry.model, args.input
        alora = next((e for e in actor.stack if e.adapter.info.is_alora), None) if actor else None
        if alora is not None:
            raise ProtocolError(ErrorCode.LORA_UNSUPPORTED, "embeddings under an activated "
                                "LoRA (aLoRA) are not supported: embed with the model, or "
                                "from a context without it", path=str(alora.adapter.path),
                                reason="alora_embedding")
        held = [self.adapters.hold(e.adapter) for e in actor.stack] if actor else []
        stack = [(e.adapter.adapter, e.scale) for e in actor.stack] if actor else []

        def tokenize() -> list[list[int]]:
            tokenized = []
            for i, text in enumerate(inputs):
                try:
                    tokenized.append(model.tokenize(text, add_special=True,
                                                    limit=embedder.n_ctx))
                except llama.TooManyTokens as exc:
                    raise ProtocolError(
                        ErrorCode.CONTEXT_OVERFLOW, f"input {i} has {exc.count()} tokens, more "
                        f"than the embedding context's {embedder.n_ctx}", field="input",
                        index=i, prompt_tokens=exc.n, n_ctx=embedder.n_ctx,
                        **({"at_least": True} if exc.at_least else {})) from None
            return tokenized

        def pooled(tokens: list[int]) -> list[float]:
            vector = embedder.embed(tokens).astype(np.float64)
            norm = float(np.linalg.norm(vector))
            if args.normalize and norm > 0:
                vector /= norm
            return vector.tolist()

        def work(tokenized: list[list[int]]) -> list[list[float]]:
            embedder.set_adapters(stack)
            try:
                vectors = []
                for tokens in tokenized:
                    if cancelled():
                        raise ProtocolError(ErrorCode.CANCELLED, "cancelled")
                    vectors.append(pooled(tokens))
                return vectors
            finally:  # the context must not keep adapters that may be freed after this
                embedder.set_adapters([])

        try:
            async with entry.using():  # an unload waits for the text thread
                tokenized = await self.text.run(tokenize)
            async with found.lock:
                if self._embedders.get(entry.id) is not found:  # unloaded while we waited
                    raise unloaded(entry)
                vectors = await trio.to_thread.run_sync(work, tokenized)
        finally:
            await self.stacks.release(held)
        counts = [len(t) for t in tokenized]
        return {"model": entry.id, "context": actor.id if actor else None,
                "embeddings": vectors, "dimensions": model.n_embd, "pooling": embedder.pooling,
                "normalized": args.normalize, "prompt_tokens": sum(counts),
                "input_tokens": counts}

    async def _embedder(self, entry: LoadedModel) -> _Embedder:
        """The model's embedding context, made on first use."""
        found = self._embedders.get(entry.id)
        if found is not None and found.model is entry:
            return found
        n_ctx = min(entry.info()["n_ctx_train"] or EMBED_N_CTX, EMBED_N_CTX,
                    self.limits.max_n_ctx)
        async with entry.using() as model:  # an unload waits, then frees what is made here
            ctx, reservation = await self.memory.make(
                f"the embedding context of model {entry.id!r}",
                KvShape.of(model).bytes(n_ctx, "f16"), lambda: llama.Context(
                    model, n_ctx=n_ctx, n_batch=n_ctx, n_threads=self.max_threads,
                    embeddings=True), model=entry.id)
            found = self._embedders.get(entry.id)
            if found is None and self.models.holds(entry):
                found = self._embedders[entry.id] = _Embedder(entry, ctx, reservation)
                return found
            reservation.release()
            await trio.to_thread.run_sync(ctx.close)  # made meanwhile, or the model went away
        if found is not None and found.model is entry:
            return found
        raise unloaded(entry)

    # -- contexts -----------------------------------------------------------------------------
    def created_by(self, owner: bytes) -> int:
        return sum(1 for a in self.contexts.values() if a.creator == owner)

    def visible(self, actor: Actor, owner: bytes | None) -> bool:
        """A client sees its own contexts and the shared ones (config contexts are shared);
        an HTTP connection, the contexts of the HTTP door's pool (``managed``)."""
        return actor.shared or actor.creator == owner or (actor.managed and is_http_peer(owner))

    def visible_contexts(self, owner: bytes | None) -> list[Actor]:
        return [a for a in self.contexts.values() if self.visible(a, owner)]

    def context(self, context_id: str, owner: bytes | None) -> Actor:
        """The context, if ``owner`` may use it; another client's private context is
        ``not_found`` exactly like one that does not exist."""
        actor = self.contexts.get(context_id)
        if actor is None or actor.closing or not self.visible(actor, owner):
            raise ProtocolError(ErrorCode.NOT_FOUND, f"no context {context_id!r}",
                                context=context_id)
        return actor

    async def create_context(self, args: OpArgs, *, creator: bytes | None,
                             context_id: str | None = None) -> Actor:
        """A new context actor (running); persistent unless ``creator`` owns it."""
        entry = await self.model_for(args.model)
        entry.creating += 1  # an unload without force refuses until it is made or failed
        try:
            if entry.backend == litert.BACKEND:
                return await self._create_litert(entry, args, creator=creator,
                                                 context_id=context_id)
            return await self._create_llama(entry, args, creator=creator,
                                            context_id=context_id)
        finally:
            entry.creating -= 1

    async def _create_llama(self, entry: LoadedModel, args: OpArgs, *, creator: bytes | None,
                            context_id: str | None) -> ContextActor:
        """A context on a llama.cpp model: a sequence of a batched llama context."""
        n_ctx = args.n_ctx or min(entry.info()["n_ctx_train"], DEFAULT_N_CTX,
                                  self.limits.max_n_ctx)
        if args.n_threads is not None and args.n_threads > self.max_threads:
            raise ProtocolError(
                ErrorCode.TOO_LARGE, f"n_threads {args.n_threads} is above the "
                f"{self.max_threads} this daemon may run (limits.max_n_threads, default: its "
                "CPUs)", field="n_threads", limit="max_n_threads", value=self.max_threads)
        n_threads = args.n_threads or min(os.cpu_count() or 1, self.max_threads)
        n_batch = min(args.n_batch, n_ctx)
        async with entry.using():  # an unload of the model waits, then closes it
            batcher = self._batcher(entry)
            scheduler, seq = await batcher.attach(n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads,
                                                  kv_type=args.kv_type, flash_attn=args.flash_attn)
            n_ctx = seq.n_ctx
            context_id = context_id or f"ctx-{secrets.token_hex(4)}"
            persistent = creator is None or args.persistent
            shared = creator is None or args.shared
            params = {"n_ctx": n_ctx, "n_batch": n_batch, "n_threads": n_threads,
                      "seed": args.seed, "kv_type": args.kv_type,
                      "flash_attn": args.flash_attn, "speculative": args.speculative,
                      "shared": shared}
            actor = ContextActor(context_id, entry, batcher, scheduler, seq, seed=args.seed,
                                 max_queued=args.max_queued, persistent=persistent,
                                 owner=None if persistent else creator, params=params,
                                 adapters=self.adapters, speculative=args.speculative,
                                 templates=self.templates, limits=self.limits,
                                 text=self.text)
            await self._start(actor, args, creator=creator)
        log.info("context_created", context=context_id, model=entry.id, **params)
        return actor

    async def _start(self, actor: Actor, args: OpArgs, *, creator: bytes | None) -> None:
        """Set up a new context of either backend (its default speculation checked, its
        adapter stack built), then register it and start its task; on failure it is freed."""
        entry = actor.model
        actor.creator = creator
        actor.shared = creator is None or args.shared
        actor.resolve_model = self.model_for
        actor.on_stack_change = lambda a: self.metrics.stack_changed(a.model.id, a.id)
        try:
            if args.speculative:  # a context default that cannot run fails here, not later
                await actor.prepare_speculative(args.speculative)
            if args.loras:
                stack, held = await self.stacks.build(entry, args.loras, [])
                try:
                    await actor.set_stack(stack)
                finally:
                    await self.stacks.release(held)
            if entry.detached:  # a forced unload began meanwhile: it would close it
                raise unloaded(entry)
        except BaseException:
            await actor.dispose()
            raise
        self.contexts[actor.id] = actor
        entry.contexts.add(actor.id)
        assert self._nursery is not None, "the engine is not running"
        self._nursery.start_soon(actor.run)

    async def _create_litert(self, entry: LoadedModel, args: OpArgs, *, creator: bytes | None,
                             context_id: str | None) -> LitertActor:
        """A context on a LiteRT-LM model: what the engine fixed for all its sessions (its
        KV cache size, threads, types) cannot be chosen per context."""
        model = entry.model
        assert isinstance(model, litert.Model)
        if args.n_ctx > model.n_ctx:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"n_ctx {args.n_ctx} is above the "
                                f"{model.n_ctx} tokens this bundle's KV cache holds",
                                field="n_ctx", limit="bundle", value=model.n_ctx)
        fixed = {"n_threads": (args.n_threads, None, model.threads),
                 "kv_type": (args.kv_type, "f16", None), "flash_attn": (args.flash_attn, None,
                                                                       None),
                 "n_batch": (args.n_batch, 512, None)}
        for name, (value, default, allowed) in fixed.items():
            if value != default and value != allowed:
                raise unsupported(name, "engine_wide", f"{name} is fixed by the runtime for "
                                  "every session of a model (threads: the daemon's, set at "
                                  "load), not chosen per context", value=value)
        async with entry.using():
            turns = self._turns.get(id(entry))
            if turns is None:
                turns = self._turns[id(entry)] = Turns(SessionFiles(model.cache_dir,
                                                                    model.lora_spec))
            context_id = context_id or f"ctx-{secrets.token_hex(4)}"
            persistent = creator is None or args.persistent
            shared = creator is None or args.shared
            n_ctx = args.n_ctx or model.n_ctx
            params = {"n_ctx": n_ctx, "n_batch": None, "n_threads": model.threads,
                      "seed": args.seed, "kv_type": None, "flash_attn": None,
                      "speculative": args.speculative, "shared": shared}
            actor = LitertActor(context_id, entry, turns, n_ctx=n_ctx, seed=args.seed,
                                max_queued=args.max_queued, persistent=persistent,
                                owner=None if persistent else creator, params=params,
                                templates=self.templates, speculative=args.speculative,
                                limits=self.limits, text=self.text)
            await self._start(actor, args, creator=creator)
        log.info("context_created", context=context_id, model=entry.id, backend=litert.BACKEND,
                 **params)
        return actor

    def litert_info(self) -> list[dict[str, Any]]:
        """Each LiteRT-LM model's session queue: who runs, how many wait."""
        return [{"model": m.id, **self._turns[id(m)].info()} for m in self.models
                if id(m) in self._turns]

    def _batcher(self, entry: LoadedModel) -> Batcher:
        batcher = self._batchers.get(id(entry))
        if batcher is None or batcher.model is not entry.model:
            assert self._nursery is not None, "the engine is not running"
            b = self.config.batching
            batcher = self._batchers[id(entry)] = Batcher(
                entry.model, sequences=b.sequences, budget=b.step_tokens, unified=b.kv_unified,
                nursery=self._nursery, memory=self.memory, model_id=entry.id,
                prompt_share=b.prompt_share, ingress=self.ingress, keep_idle=b.keep_idle_s,
                pin_threads=b.pin_threads, start_interval=b.start_interval_s)
        return batcher

    def batching_info(self) -> list[dict[str, Any]]:
        """Every batched llama context, with the model it belongs to."""
        return [{"model": m.id, **slab} for m in self.models
                for slab in (self._batchers[id(m)].info() if id(m) in self._batchers else [])]

    async def close_context(self, actor: Actor) -> None:
        """Cancel its work, stop its actor, free its llama context (idempotent)."""
        if self.contexts.get(actor.id) is not actor:
            if actor in self._closing:  # another task closes it: done when it is
                await actor.closed.wait()
            return
        del self.contexts[actor.id]
        self._closing.add(actor)
        actor.model.contexts.discard(actor.id)
        if self.on_closed is not None:
            self.on_closed(actor)
        try:
            await actor.close()
        finally:
            self._closing.discard(actor)
        self.metrics.forget_context(actor.id)
        log.info("context_closed", context=actor.id)

    def close_soon(self, actor: Actor) -> None:
        """Close a context in the background (a peer that went away owned it)."""
        if self._nursery is not None:
            self._nursery.start_soon(self.close_context, actor)

    # -- lifecycle ----------------------------------------------------------------------------
    async def preload(self) -> None:
        """The config file's models and (persistent, shared) contexts."""
        for spec in self.config.models:
            await self.models.load(spec.path, n_gpu_layers=spec.n_gpu_layers,
                                   use_mmap=spec.use_mmap, alias=spec.alias,
                                   chat_template=spec.chat_template)
        for spec in self.config.contexts:
            args = parse_args("create_context", {"model": spec.model, **spec.params,
                                                  "persistent": True})
            await self.create_context(args, creator=None, context_id=spec.id)

    async def drain(self, timeout: float = 30) -> None:
        """Cancel every request and close every context (within ``timeout`` seconds)."""
        for actor in list(self.contexts.values()):
            actor.cancel_all()
        with trio.move_on_after(timeout):
            async with trio.open_nursery() as nursery:
                for actor in [*self.contexts.values(), *self._closing]:
                    nursery.start_soon(self.close_context, actor)

    @staticmethod
    def speculative_modes(entry: LoadedModel) -> dict[str, Any]:
        """Which speculative modes can run on a model, and why not."""
        if entry.backend == litert.BACKEND:
            llama_only = "drafts through llama.cpp contexts: not on LiteRT-LM models"
            has = entry.model.speculative
            return {"prompt_lookup": {"available": False, "reason": llama_only},
                    "draft_model": {"available": False, "reason": llama_only},
                    "mtp": {"available": has, "reason": None if has else "the runtime says "
                            "this bundle has no speculative-decoding support"}}
        rollback = entry.model.can_roll_back
        why_not = None if rollback else "its memory cannot roll back rejected tokens"
        nextn = entry.model.n_nextn
        return {
            "prompt_lookup": {"available": rollback, "reason": why_not},
            "draft_model": {"available": rollback, "reason": why_not},
            "mtp": {"available": False,
                    "reason": "driving MTP heads is not implemented in lorad yet" if nextn
                    else "the model has no MTP heads"},
        }
