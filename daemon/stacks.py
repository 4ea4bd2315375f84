"""Adapter stacks: resolving adapter references, building stacks and editing a context's stack.

A reference is a path or a name looked up in the adapter directories; a PEFT directory is
converted to GGUF once per content. Adapters come from the :class:`AdapterCache` (the only place
their references are counted); every stack change is atomic: on any error nothing is held and
the context's stack is unchanged.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import trio

from lorad.protocol import ErrorCode, Limits, ProtocolError, looks_like_path
from lorad.protocol.errors import echo

from . import litert
from .actor import ContextActor, StackEntry
from .adapters import AdapterCache, LoadedAdapter
from .alora import check_aloras
from .litert_actor import unsupported
from .litert_adapters import LitertAdapter
from .litert_adapters import load as load_litert_adapter
from .litert_lora import LoraSpec
from .lora import resolve_adapter
from .paths import AllowedDirs
from .peft import cached_conversion
from .registry import LoadedModel
from .requests import RequestHandle

Edit = Callable[[list[StackEntry]], Awaitable[tuple[list[StackEntry], list[LoadedAdapter]]]]
VALIDATION_CODES = (ErrorCode.LORA_FILE_NOT_FOUND, ErrorCode.LORA_INVALID,
                    ErrorCode.FORBIDDEN_PATH, ErrorCode.LORA_INCOMPATIBLE,
                    ErrorCode.LORA_UNSUPPORTED)
"""Errors that ``validate_lora`` reports as a problem of the adapter rather than raises."""
MAX_NAMES = 1000
"""Adapter names registered at run time."""
MAX_NAME_CHARS = 200


class Stacks:
    """Builds adapter stacks for models and applies stack edits to contexts."""

    def __init__(self, adapters: AdapterCache, adapter_dirs: list[Path], allowed: AllowedDirs,
                 peft_cache: Path, limits: Limits) -> None:
        self.adapters = adapters
        self.adapter_dirs = adapter_dirs
        self.allowed = allowed
        self.peft_cache = peft_cache
        self.limits = limits
        self.names: dict[str, str] = {}
        """Adapter names registered at run time (the HTTP door's ``/v1/load_lora_adapter``),
        each for a path: looked up before the adapter directories."""

    async def release(self, held: list[LoadedAdapter]) -> None:
        with trio.CancelScope(shield=True):
            for adapter in held:
                await self.adapters.release(adapter)

    def resolve(self, ref: str) -> Path:
        """The adapter file or PEFT directory ``ref`` names (a registered name, a path, or a
        name in the adapter directories), checked against the allowed directories."""
        return resolve_adapter(self.names.get(ref, ref), self.adapter_dirs, self.allowed)

    def _check_name(self, name: str, replace: bool) -> None:
        """``bad_request`` for a name that is not one, or taken (unless ``replace``);
        ``too_large`` past :data:`MAX_NAMES`."""
        if (not name or name in (".", "..") or looks_like_path(name) or ":" in name
                or len(name) > MAX_NAME_CHARS or not name.isprintable()):
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"{echo(name)!r} is not an adapter name: "
                                f"at most {MAX_NAME_CHARS} printable characters, no '/' or "
                                "':', not ending in .gguf", field="name")
        if name in self.names and not replace:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"the adapter name {name!r} is taken "
                                f"(by {self.names[name]!r}): unname it first, or replace it",
                                field="name")
        if name not in self.names and len(self.names) >= MAX_NAMES:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"at most {MAX_NAMES} adapter names",
                                field="name", limit="max_names", value=MAX_NAMES)

    async def name(self, models: list[LoadedModel], name: str, path: str, *,
                   replace: bool = False) -> dict[str, Any]:
        """``name_lora``: name the adapter at ``path`` (resolved and checked now, and again at
        each use) once it fits one of ``models`` (``lora_incompatible`` with each model's
        problems otherwise; none loaded: not checked). The name is given only then."""
        self._check_name(name, replace)
        if not looks_like_path(path):
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"{echo(path)!r} is not a path: give an "
                                "absolute path to a GGUF adapter or a PEFT directory",
                                field="path")
        resolved = await self.adapters.files.run(resolve_adapter, path, [], self.allowed)
        models = [m for m in models if m.backend != litert.BACKEND]  # they take no adapter
        reports = [await self.validate(m, str(resolved)) for m in models]
        if models and not any(r["compatible"] for r in reports):
            raise ProtocolError(ErrorCode.LORA_INCOMPATIBLE, f"the adapter at {str(resolved)!r} "
                                "fits none of the loaded models", field="path",
                                models={r["model"]: r["problems"] for r in reports})
        self._check_name(name, replace)  # again: another request may have taken it meanwhile
        self.names[name] = str(resolved)
        return {"name": name, "path": str(resolved),
                "models": [r["model"] for r in reports if r["compatible"]]}

    def unregister(self, name: str) -> str:
        """Forget a registered name (contexts that hold the adapter keep it); its path."""
        if name not in self.names:
            raise ProtocolError(ErrorCode.NOT_FOUND, f"no adapter registered as {echo(name)!r}",
                                field="name", registered=sorted(self.names))
        return self.names.pop(name)

    async def adapter_file(self, ref: str, model: LoadedModel) -> Path:
        """The GGUF file for ``ref``: the file itself, or a PEFT directory converted for
        ``model`` (cached by content)."""
        path = await self.adapters.files.run(self.resolve, ref)
        if path.is_dir():
            path = await self.adapters.files.run(partial(
                cached_conversion, path, model.path, self.peft_cache,
                max_bytes=self.limits.max_adapter_file_bytes))
        return path

    def _too_many(self, field: str) -> ProtocolError:
        return ProtocolError(ErrorCode.TOO_LARGE,
                             f"at most {self.limits.max_loras} adapters in a stack",
                             field=field, limit="max_loras", value=self.limits.max_loras)

    async def build(self, model: LoadedModel, items: list[tuple[str, float]],
                    current: list[StackEntry]) -> tuple[list[StackEntry], list[LoadedAdapter]]:
        """Stack entries for ``items``, each adapter held once (release the second list).

        An item naming an entry of ``current`` reuses its adapter without touching the file
        system; the others are resolved, checked and loaded (or shared from the cache). On any
        error nothing stays held.
        """
        if model.backend == litert.BACKEND:
            return await self._build_litert(model, items, current), []
        if len(items) > self.limits.max_loras:
            raise self._too_many("loras")
        stack: list[StackEntry] = []
        held: list[LoadedAdapter] = []
        try:
            for ref, scale in items:
                same = next((e for e in current if e.matches(ref)), None)
                if same is not None:
                    adapter = self.adapters.hold(same.adapter)
                else:
                    path = await self.adapter_file(ref, model)
                    adapter = await self.adapters.acquire(model, path)
                held.append(adapter)
                if any(e.adapter.path == adapter.path for e in stack):
                    raise ProtocolError(ErrorCode.BAD_REQUEST,
                                        f"adapter {str(adapter.path)!r} is twice in the stack",
                                        field="loras", path=str(adapter.path))
                stack.append(StackEntry(ref, adapter, scale))
            check_aloras(stack)
        except BaseException:
            await self.release(held)
            raise
        return stack, held

    def _litert_spec(self, model: LoadedModel) -> LoraSpec:
        spec = model.model.lora_spec
        if spec is None:
            raise unsupported("op:set_lora", "no_lora_inputs", f"model {model.id!r} was not "
                              "exported with LoRA inputs in the signatures the runtime calls "
                              "(lorad's converter exports them): an adapter would be ignored",
                              model=model.id)
        return spec

    async def _litert_adapter(self, model: LoadedModel, ref: str) -> LitertAdapter:
        """A PEFT directory or a llama.cpp LoRA GGUF converted for a LiteRT-LM model (see
        :mod:`.litert_adapters`)."""
        spec = self._litert_spec(model)
        path = await self.adapters.files.run(self.resolve, ref)
        return await self.adapters.files.run(partial(
            load_litert_adapter, path, spec, max_bytes=self.limits.max_adapter_file_bytes))

    async def _build_litert(self, model: LoadedModel, items: list[tuple[str, float]],
                            current: list[StackEntry]) -> list[StackEntry]:
        """A LiteRT-LM context's stack: one adapter at most (the runtime applies one per
        session); nothing is held (lorad owns the converted tensors)."""
        if len(items) > 1:
            raise unsupported("loras", "one_adapter", "the runtime applies one adapter per "
                              "session: a stack of several is not served on LiteRT-LM models",
                              value=len(items))
        stack = []
        for ref, scale in items:
            same = next((e for e in current if e.matches(ref)), None)
            adapter = same.adapter if same is not None else \
                await self._litert_adapter(model, ref)
            stack.append(StackEntry(ref, adapter, scale))
        return stack

    async def submit(self, actor: ContextActor, handle: RequestHandle) -> None:
        """Queue a generation on ``actor`` with the request's own stack (``loras``), if any:
        its adapters are held by the job once queued, released here otherwise."""
        if handle.args.loras is None:
            actor.submit(handle, handle.args)
            return
        stack, held = await self.build(actor.model, handle.args.loras, actor.stack)
        try:
            actor.submit(handle, handle.args, stack, held)
        except BaseException:
            await self.release(held)
            raise

    async def change(self, actor: ContextActor, edit: Edit) -> dict[str, Any]:
        """Apply ``edit`` to the context's stack (serialised per context)."""
        async with actor.stack_lock:
            stack, held = await edit(list(actor.stack))
            try:
                check_aloras(stack)
                await actor.set_stack(stack)
            finally:
                await self.release(held)
        return {"context": actor.id, "loras": [e.to_wire() for e in actor.stack]}

    # -- the stack operations -----------------------------------------------------------------
    async def set_one(self, actor: ContextActor, ref: str, scale: float) -> dict[str, Any]:
        """Add ``ref`` at ``scale``, or change its scale if it is in the stack already."""
        async def edit(stack: list[StackEntry]):
            i = next((i for i, e in enumerate(stack) if e.matches(ref)), None)
            if i is not None:  # a scale change: no file system access, no reload
                stack[i] = StackEntry(stack[i].ref, stack[i].adapter, scale)
                return stack, []
            [entry], held = await self.build(actor.model, [(ref, scale)], [])
            i = next((i for i, e in enumerate(stack) if e.adapter.path == entry.adapter.path),
                     None)
            if i is not None:  # the same file under another name (or a newer version of it)
                stack[i] = entry
            elif len(stack) >= self.limits.max_loras:
                await self.release(held)
                raise self._too_many("path")
            else:
                stack.append(entry)
            return stack, held

        return await self.change(actor, edit)

    def scale_now(self, actor: ContextActor, ref: str, scale: float) -> dict[str, Any] | None:
        """``set_lora`` of an adapter already in the stack, done at once (no file access, no
        llama.cpp call, no task); None when it needs :meth:`set_one` (another adapter, or a
        stack change in progress)."""
        if actor.closing or actor.stack_lock.locked():
            return None
        i = next((i for i, e in enumerate(actor.stack) if e.matches(ref)), None)
        if i is None:
            return None
        stack = list(actor.stack)
        stack[i] = StackEntry(stack[i].ref, stack[i].adapter, scale)
        actor.set_scales(stack)
        return {"context": actor.id, "loras": [e.to_wire() for e in actor.stack]}

    async def remove(self, actor: ContextActor, ref: str) -> dict[str, Any]:
        async def edit(stack: list[StackEntry]):
            i = next((i for i, e in enumerate(stack) if e.matches(ref)), None)
            if i is None and stack:
                try:
                    path = await trio.to_thread.run_sync(self.resolve, ref)
                except ProtocolError:
                    path = None
                i = next((i for i, e in enumerate(stack) if e.adapter.path == path), None)
            if i is None:
                raise ProtocolError(ErrorCode.NOT_FOUND,
                                    f"adapter {ref!r} is not in the stack of context "
                                    f"{actor.id!r}", path=ref, stack=[e.ref for e in stack])
            del stack[i]
            return stack, []

        return await self.change(actor, edit)

    async def replace(self, actor: ContextActor, items: list[tuple[str, float]]
                      ) -> dict[str, Any]:
        async def edit(stack: list[StackEntry]):
            return await self.build(actor.model, items, stack)

        return await self.change(actor, edit)

    async def clear(self, actor: ContextActor) -> dict[str, Any]:
        async def edit(stack: list[StackEntry]):
            return [], []

        return await self.change(actor, edit)

    async def validate(self, model: LoadedModel, ref: str) -> dict[str, Any]:
        """Every check of a load, without loading: a report, not an error, for a bad adapter."""
        report: dict[str, Any] = {"model": model.id, "path": ref}
        if model.backend == litert.BACKEND:
            try:
                adapter = await self._litert_adapter(model, ref)
            except ProtocolError as exc:
                if exc.code not in VALIDATION_CODES:
                    raise
                return {**report, "compatible": False, "problems": [exc.to_wire()],
                        "adapter": None}
            return {**report, "resolved": str(adapter.path), "compatible": True,
                    "problems": [], "adapter": adapter.info.to_wire()}
        try:
            path = await self.adapter_file(ref, model)
            report["resolved"] = str(path)
            info, problems = await self.adapters.validate(model, path)
        except ProtocolError as exc:
            if exc.code not in VALIDATION_CODES:
                raise
            return {**report, "compatible": False, "problems": [exc.to_wire()], "adapter": None}
        return {**report, "compatible": not problems, "problems": [p.to_wire() for p in problems],
                "adapter": info.to_wire()}
