"""The adapter cache: one loaded LoRA adapter per (model, file version), shared by contexts.

An adapter is loaded the first time a context (or a request) asks for it on a model, counted
while stacks hold it, and freed when the last holder lets go (or with its model). A file that
changed on disk (device, inode, size or mtime) is a new version: it is loaded afresh, never
served stale. A file is read once into a private snapshot (:mod:`.snapshot`), which is checked
and then given to llama.cpp: a client that rewrites the file meanwhile gets an error for its
request, never a daemon that reads a half-written file. Loading and freeing adapters of one
model are serialised (llama.cpp keeps a per-model set of adapters).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from lorad.protocol import DEFAULT_LIMITS, ErrorCode, ProtocolError

from . import llama
from .errors import LlamaError
from .logs import log
from .lora import (
    AdapterInfo,
    ModelTensors,
    incompatibilities,
    inspect_snapshot,
)
from .metrics import Metrics
from .registry import LoadedModel, unloaded
from .snapshot import FileIdentity, changed, identity_of, snapshot
from .workers import FileWorkers

Key = tuple[str, str, FileIdentity]
INSPECTED = 256
"""File versions whose inspection (the adapter's header and tensor table, or why it is not an
adapter) is remembered: validating an unchanged file again does not read it again."""
INSPECTED_TARGETS = 1 << 16
"""The most adapter targets the remembered inspections hold together (a few MiB): files of
many targets cannot make the memory grow past it."""


@dataclass(eq=False)
class LoadedAdapter:
    """One adapter loaded on one model; ``refs`` counts the stacks and requests holding it."""

    key: Key
    model: LoadedModel
    info: AdapterInfo
    adapter: llama.Adapter
    refs: int = 0
    contexts: set[str] = field(default_factory=set)
    loaded_at: float = field(default_factory=time.time)
    load_ms: float = 0.0

    @property
    def path(self) -> Path:
        return self.info.path

    def to_wire(self) -> dict[str, Any]:
        return {
            "model": self.model.id,
            "path": str(self.path),
            "bytes": self.info.nbytes,
            "refs": self.refs,
            "contexts": sorted(self.contexts),
            "load_ms": round(self.load_ms, 3),
            "loaded_at": self.loaded_at,
        }


class AdapterCache:
    """Loads, shares and frees adapters; every public method may be called from trio tasks."""

    def __init__(self, files: FileWorkers, max_bytes: int = 4 * 1024**3,
                 metrics: Metrics | None = None, *,
                 max_file_bytes: int = DEFAULT_LIMITS.max_adapter_file_bytes) -> None:
        self.files = files
        """The pool that reads and parses adapter files (see :mod:`.workers`)."""
        self.max_bytes = max_bytes
        """Total adapter tensor bytes allowed (``limits.max_adapter_bytes``)."""
        self.max_file_bytes = max_file_bytes
        """The largest adapter file read (``limits.max_adapter_file_bytes``)."""
        self.metrics = metrics
        self._entries: dict[Key, LoadedAdapter] = {}
        self._loading: dict[Key, trio.Event] = {}
        self._locks: dict[str, trio.Lock] = {}
        self._model_tensors: dict[str, ModelTensors] = {}
        self._inspected: OrderedDict[tuple[str, FileIdentity],
                                     AdapterInfo | ProtocolError] = OrderedDict()
        self.inspections_reused = 0
        """Inspections answered from memory (the file unchanged) since start."""

    def inspections(self) -> dict[str, int]:
        """How many file versions' inspections are remembered, and how often one was reused."""
        return {"remembered": len(self._inspected), "reused": self.inspections_reused}

    def __iter__(self):
        return iter(list(self._entries.values()))

    def _lock(self, model: LoadedModel) -> trio.Lock:
        return self._locks.setdefault(model.id, trio.Lock())

    async def model_tensors(self, model: LoadedModel) -> ModelTensors:
        tensors = self._model_tensors.get(model.id) or model.tensors
        if tensors is None:
            tensors = await self.files.run(ModelTensors.read, model.path)
            if model.detached:  # unloaded meanwhile: nothing may keep its tensors
                raise unloaded(model)
            self._model_tensors[model.id] = tensors
        return tensors

    async def validate(self, model: LoadedModel, path: Path) -> tuple[AdapterInfo,
                                                                      list[ProtocolError]]:
        """Inspect ``path`` and list why it does not fit ``model`` (empty: it fits).

        Raises ``lora_file_not_found``/``lora_invalid`` for a file that is not a LoRA adapter.
        """
        info = await self.inspect(path)
        return info, incompatibilities(info, await self.model_tensors(model))

    async def inspect(self, path: Path) -> AdapterInfo:
        """What :func:`~lorad.daemon.lora.inspect_adapter` says of the file's current version,
        remembered per version (device, inode, size, mtime, as loaded adapters are): a flood
        of validations of one file costs a ``stat`` each, not a read and a parse. Only a
        version that stayed the same while it was read is remembered, its refusal
        (``lora_invalid``) included."""
        identity = await self.files.run(identity_of, path)
        key = (str(path), identity)
        result = self._inspected.get(key)
        if result is None:
            result, seen = await self.files.run(self._inspect_version, path)
            if seen == identity:
                self._inspected[key] = result
                weight = sum(map(_weight, self._inspected.values()))
                while len(self._inspected) > INSPECTED or weight > INSPECTED_TARGETS:
                    weight -= _weight(self._inspected.popitem(last=False)[1])
        else:
            self._inspected.move_to_end(key)
            self.inspections_reused += 1
        if isinstance(result, ProtocolError):
            raise ProtocolError(result.code, result.message, **result.details)
        return result

    def _inspect_version(self, path: Path
                         ) -> tuple[AdapterInfo | ProtocolError, FileIdentity | None]:
        """In a file worker: the inspection of one snapshot of ``path`` (or why the file is
        not an adapter) and the version it was taken of (None: no version was read whole)."""
        with snapshot(path, self.max_file_bytes) as snap:
            try:
                return inspect_snapshot(snap), snap.identity
            except ProtocolError as exc:  # kept without its traceback (and the frames' data)
                return ProtocolError(exc.code, exc.message, **exc.details), snap.identity

    async def acquire(self, model: LoadedModel, path: Path) -> LoadedAdapter:
        """The loaded adapter for the current version of ``path``, with one more reference.

        Every check runs before llama.cpp sees the file; the caller must :meth:`release` it.
        """
        identity = await self.files.run(identity_of, path)
        key = (model.id, str(path), identity)
        while key in self._loading:
            await self._loading[key].wait()
        entry = self._entries.get(key)
        if entry is None:
            done = self._loading[key] = trio.Event()
            try:
                entry = await self._load(model, path, key)
            finally:
                del self._loading[key]
                done.set()
        return self.hold(entry)

    async def _load(self, model: LoadedModel, path: Path, key: Key) -> LoadedAdapter:
        tensors = await self.model_tensors(model)
        started = time.perf_counter()
        async with model.using(), self._lock(model):  # an unload waits for the load
            loaded = sum(e.info.nbytes for e in self._entries.values())
            info, adapter = await self.files.run(self._load_file, model, path, key[2], tensors,
                                                 loaded)
        entry = LoadedAdapter(key, model, info, adapter)
        entry.load_ms = (time.perf_counter() - started) * 1000
        if adapter.alora_invocation_tokens is not None and info.alora_invocation_tokens is None:
            info.alora_invocation_tokens = adapter.alora_invocation_tokens
        self._entries[key] = entry
        if self.metrics is not None:
            self.metrics.adapter_loaded(model.id)
        log.info("adapter_loaded", model=model.id, path=str(path), bytes=info.nbytes,
                 ms=round(entry.load_ms, 3))
        return entry

    def _load_file(self, model: LoadedModel, path: Path, identity: FileIdentity,
                   tensors: ModelTensors, loaded: int) -> tuple[AdapterInfo, llama.Adapter]:
        """In a file worker: snapshot ``path``, check the snapshot and load it into llama.cpp.

        The snapshot lives only in this call (at most one per model at a time: the caller holds
        the model's lock), and llama.cpp reads the very bytes that were checked.
        """
        with snapshot(path, self.max_file_bytes) as snap:
            info = inspect_snapshot(snap)
            if problems := incompatibilities(info, tensors):
                wire = [p.to_wire() for p in problems]
                first = problems[0]
                raise ProtocolError(first.code, first.message, **first.details, problems=wire)
            if loaded + info.nbytes > self.max_bytes:
                raise ProtocolError(ErrorCode.TOO_LARGE,
                                    f"{path.name} needs {info.nbytes} bytes; loaded adapters "
                                    f"hold {loaded} of limits.max_adapter_bytes "
                                    f"({self.max_bytes})", path=str(path),
                                    limit="max_adapter_bytes", value=self.max_bytes)
            if snap.identity != identity:  # another version than the one asked for: retry
                raise changed(path)
            try:
                adapter = llama.Adapter(model.model, snap.path)
            except LlamaError as exc:  # name the client's file, not the snapshot
                raise type(exc)(f"llama.cpp could not load adapter {str(path)!r}",
                                **{**exc.details, "path": str(path)}) from None
        adapter.path = str(path)
        return info, adapter

    def hold(self, entry: LoadedAdapter) -> LoadedAdapter:
        """One more reference to an adapter already held (release it with :meth:`release`)."""
        entry.refs += 1
        return entry

    async def release(self, entry: LoadedAdapter) -> None:
        """Drop one reference; free the adapter when none is left."""
        entry.refs -= 1
        if entry.refs > 0 or self._entries.get(entry.key) is not entry:
            return
        del self._entries[entry.key]
        async with self._lock(entry.model):
            await trio.to_thread.run_sync(entry.adapter.free)
        log.info("adapter_freed", model=entry.model.id, path=str(entry.path))

    async def drop_model(self, model: LoadedModel) -> None:
        """Free every adapter of ``model`` (before the model itself is freed)."""
        for entry in [e for e in self._entries.values() if e.model is model]:
            del self._entries[entry.key]
            async with self._lock(entry.model):
                await trio.to_thread.run_sync(entry.adapter.free)
        self._locks.pop(model.id, None)
        self._model_tensors.pop(model.id, None)


def _weight(result: AdapterInfo | ProtocolError) -> int:
    """What a remembered inspection holds, in adapter targets (at least 1)."""
    return 1 + (len(result.targets) if isinstance(result, AdapterInfo) else 0)
