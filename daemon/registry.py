"""The model registry: each (file, load parameters) is loaded once and shared by its contexts."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from lorad.protocol import ErrorCode, ProtocolError, looks_like_path

from . import gpu, litert, llama
from .budget import MemoryBudget, Reservation
from .gguf_header import HeaderBounds, read_header
from .logs import log
from .lora import ModelTensors
from .paths import AllowedDirs, check_path_text
from .workers import BUILD


@dataclass
class LoadedModel:
    id: str
    path: Path
    key: tuple[Any, ...]
    model: llama.Model | litert.Model
    params: dict[str, Any]
    contexts: set[str] = field(default_factory=set)
    loaded_at: float = field(default_factory=time.time)
    load_seconds: float = 0.0
    detached: bool = False
    """Unloaded or being unloaded: nothing new may use its weights."""
    reservation: Reservation | None = None
    """Its weights in the memory budget (released when it is freed)."""
    creating: int = 0
    """Contexts being created on it: an unload without ``force`` refuses (``in_use``)."""
    chat_template: str | None = None
    """The chat template given at load (a llama.cpp built-in name or Jinja source): used instead
    of the file's for chat requests that name none."""
    tensors: ModelTensors | None = None
    """Its architecture and tensor shapes, read from its file's header when it was loaded (what
    adapters are checked against: a file replaced by rename since is not the loaded one)."""
    backend: str = "llama.cpp"
    """What runs it: ``llama.cpp``, or ``litert_lm`` for a ``.litertlm`` bundle."""
    _users: int = 0
    _unused: trio.Event | None = None
    _info: dict[str, Any] | None = None

    @asynccontextmanager
    async def using(self) -> AsyncIterator[llama.Model]:
        """Hold the weights while a worker thread reads them or something is built on them (a
        context, an adapter): an unload waits for the holders, and once it has begun, this
        raises ``not_found``."""
        if self.detached:
            raise unloaded(self)
        self._users += 1
        try:
            yield self.model
        finally:
            self._users -= 1
            if not self._users and self._unused is not None:
                self._unused.set()

    def piece(self, token: int) -> bytes:
        """The bytes of one token, for the trio thread (the HTTP door's log-probabilities,
        after a run): ``not_found`` once an unload has begun, since the vocabulary is freed
        after it (the check and the call cannot be parted by an await)."""
        if self.detached:
            raise unloaded(self)
        return self.model.piece(token)

    @property
    def in_use(self) -> bool:
        """Whether something holds the weights through :meth:`using`."""
        return self._users > 0

    async def wait_unused(self) -> None:
        """Return once nothing holds the weights through :meth:`using`."""
        while self._users:
            self._unused = trio.Event()
            await self._unused.wait()

    @property
    def template(self) -> str | None:
        """The chat template of requests that name none: the one given at load, else the
        file's (None: neither; a LiteRT-LM bundle's own is not read)."""
        if self.backend == litert.BACKEND:
            return self.chat_template
        return self.chat_template or self.model.chat_template

    def info(self) -> dict[str, Any]:
        if self._info is None:
            self._info = self.model.info()
        if self.backend == litert.BACKEND:
            return {"id": self.id, "path": str(self.path), **self._info,
                    "chat_template": self.template is not None, "params": self.params,
                    "contexts": sorted(self.contexts),
                    "load_seconds": round(self.load_seconds, 3)}
        layers = self.params["n_gpu_layers"]
        return {
            "id": self.id,
            "path": str(self.path),
            "backend": self.backend,
            **self._info,
            "chat_template": self.template is not None,
            "params": self.params,
            "offloaded_layers": gpu.offloaded(layers, self._info["n_layer"]),
            "contexts": sorted(self.contexts),
            "load_seconds": round(self.load_seconds, 3),
        }


def _header(path: Path) -> ModelTensors | None:
    """The model file's tensor shapes (None if lorad's parser cannot read its header: adapters
    are then checked against a later read, or by llama.cpp alone)."""
    try:
        return ModelTensors.read(path)
    except Exception:  # a model llama.cpp loads but the bounded parser refuses
        return None


def _block_count(path: Path) -> int:
    """The model's number of repeating layers, from its header (0 where it says none)."""
    with open(path, "rb") as f:
        header, _ = read_header(f.fileno(), HeaderBounds())
    kv = header.scalars()
    count = kv.get(f"{kv.get('general.architecture')}.block_count")
    return count if isinstance(count, int) and count > 0 else 0


def unloaded(entry: LoadedModel) -> ProtocolError:
    """The error for a request that found ``entry`` before it was unloaded."""
    return ProtocolError(ErrorCode.NOT_FOUND, f"model {entry.id!r} was unloaded", model=entry.id)


class ModelRegistry:
    """Loads, shares and frees models. Lookups accept an id, an alias or a file path."""

    def __init__(self, allowed: AllowedDirs, repack: bool = False,
                 memory: MemoryBudget | None = None, threads: int = 1) -> None:
        self.allowed = allowed
        self.threads = threads
        """The threads of a LiteRT-LM engine (engine-wide: its contexts cannot choose)."""
        self.repack = repack
        """Whether llama.cpp may repack weights for this CPU (decided once, at start)."""
        self.memory = memory if memory is not None else MemoryBudget()
        """Model weights are reserved here (their file's size) before llama.cpp loads them."""
        self._by_id: dict[str, LoadedModel] = {}
        self._by_key: dict[tuple[Any, ...], LoadedModel] = {}
        self._loading: dict[tuple[Any, ...], trio.Event] = {}

    def __iter__(self):
        return iter(list(self._by_id.values()))

    def _new_id(self, path: Path, alias: str | None) -> str:
        if alias:
            if alias in self._by_id:
                raise ProtocolError(
                    ErrorCode.BAD_REQUEST, f"model id {alias!r} is taken", field="alias"
                )
            return alias
        base = path.name.removesuffix(".gguf").removesuffix(litert.SUFFIX)
        candidate, n = base, 2
        while candidate in self._by_id:
            candidate, n = f"{base}-{n}", n + 1
        return candidate

    async def load(self, path: str, *, n_gpu_layers: int | None = None, use_mmap: bool = True,
                   alias: str | None = None, chat_template: str | None = None,
                   progress: Callable[[float], bool] | None = None) -> LoadedModel:
        """Load ``path`` or return the model already loaded from it with the same params
        (``n_gpu_layers`` None: the build's default, :func:`lorad.daemon.gpu.default_layers`;
        ``chat_template``: see :attr:`LoadedModel.chat_template`)."""
        if chat_template is not None and "{" not in chat_template:
            llama.check_builtin_chat_template(chat_template, "chat_template")
        resolved = self.allowed.check(path, "model")
        if litert.is_litertlm(resolved):
            return await self._load_litert(resolved, path, n_gpu_layers=n_gpu_layers,
                                           use_mmap=use_mmap, alias=alias,
                                           chat_template=chat_template)
        n_gpu_layers = gpu.resolve_layers(n_gpu_layers, llama.supports_gpu_offload())

        async def fits(size: int) -> None:
            if n_gpu_layers != 0:  # a GPU build: the offloaded share must fit the GPUs' memory
                n_layer = await BUILD.run(_block_count, resolved)
                free = sum(d.free_bytes for d in gpu.offload_devices(gpu.devices()))
                gpu.check_fit(size, n_layer, gpu.offloaded(n_gpu_layers, n_layer), free)

        def make() -> tuple[llama.Model, ModelTensors | None]:
            model = llama.Model(str(resolved), n_gpu_layers=n_gpu_layers, use_mmap=use_mmap,
                                progress=progress, repack=self.repack)
            return model, _header(resolved)

        return await self._load(resolved, path, (str(resolved), n_gpu_layers, use_mmap),
                                {"n_gpu_layers": n_gpu_layers, "use_mmap": use_mmap},
                                alias=alias, chat_template=chat_template, fits=fits, make=make,
                                backend="llama.cpp")

    async def _load(self, resolved: Path, path: str, key: tuple[Any, ...],
                    params: dict[str, Any], *, alias: str | None, chat_template: str | None,
                    fits: Callable[[int], Awaitable[None]] | None,
                    make: Callable[[], tuple[Any, ModelTensors | None]],
                    backend: str) -> LoadedModel:
        """Load once per ``key`` (a request for a model being loaded shares that load): the
        file's size is checked by ``fits`` and reserved in the memory budget, then ``make``
        loads it in a worker thread."""
        while key in self._loading:  # another request loads the same model: share its result
            await self._loading[key].wait()
        if key in self._by_key:
            return self._already(key, chat_template)
        model_id = self._new_id(resolved, alias)
        try:
            size = resolved.stat().st_size
        except OSError as exc:  # gone since it was checked
            raise ProtocolError(ErrorCode.NOT_FOUND, f"cannot read model {path!r}: "
                                f"{exc.strerror}", path=path) from None
        if fits is not None:
            await fits(size)
        reservation = self.memory.reserve(f"model {resolved.name!r}", size, path=str(resolved))
        done = self._loading[key] = trio.Event()
        started = time.perf_counter()
        try:
            model, tensors = await BUILD.run(make)
        except BaseException:
            reservation.release()
            raise
        finally:
            del self._loading[key]
            done.set()
        entry = LoadedModel(model_id, resolved, key, model, params, reservation=reservation,
                            tensors=tensors, chat_template=chat_template, backend=backend)
        entry.load_seconds = time.perf_counter() - started
        self._by_id[model_id] = self._by_key[key] = entry
        log.info("model_loaded", model=model_id, path=str(resolved), backend=backend,
                 seconds=round(entry.load_seconds, 3))
        return entry

    def _already(self, key: tuple[Any, ...], chat_template: str | None) -> LoadedModel:
        """The model loaded with ``key``, if the chat template asked for is its own."""
        loaded = self._by_key[key]
        if chat_template is not None and chat_template != loaded.chat_template:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST, f"model {loaded.id!r} is loaded from this file "
                "already, with another chat template: unload it first, or name the "
                "template per request (chat's template)", field="chat_template",
                model=loaded.id)
        return loaded

    async def _load_litert(self, resolved: Path, path: str, *, n_gpu_layers: int | None,
                           use_mmap: bool, alias: str | None,
                           chat_template: str | None) -> LoadedModel:
        """A ``.litertlm`` bundle, on the CPU with the daemon's threads (see
        :mod:`lorad.daemon.litert`)."""
        if n_gpu_layers:
            raise ProtocolError(ErrorCode.BACKEND_UNSUPPORTED, "LiteRT-LM models run on the CPU "
                                "in lorad: leave n_gpu_layers out", field="n_gpu_layers",
                                backend=litert.BACKEND, reason="cpu_only")
        if not use_mmap:
            raise ProtocolError(ErrorCode.BACKEND_UNSUPPORTED, "the LiteRT-LM runtime maps "
                                "its model file itself: use_mmap=false cannot be honoured",
                                field="use_mmap", backend=litert.BACKEND, reason="runtime_maps")
        threads = self.threads
        return await self._load(
            resolved, path, (str(resolved), litert.BACKEND, threads), {"threads": threads},
            alias=alias, chat_template=chat_template, fits=None, backend=litert.BACKEND,
            make=lambda: (litert.Model(str(resolved), threads=threads), None))

    def get(self, ref: str) -> LoadedModel:
        """A loaded model by id or by path (resolved); ``not_found`` otherwise."""
        entry = self._by_id.get(ref)
        if entry is not None:
            return entry
        check_path_text(ref, "model")
        resolved = str(Path(ref).expanduser().resolve())
        for e in self._by_id.values():
            if str(e.path) == resolved:
                return e
        raise ProtocolError(
            ErrorCode.NOT_FOUND, f"no loaded model {ref!r}", model=ref, loaded=sorted(self._by_id)
        )

    def holds(self, entry: LoadedModel) -> bool:
        """Whether ``entry`` is still loaded (not unloaded, nor replaced under its id)."""
        return self._by_id.get(entry.id) is entry

    def is_path(self, ref: str) -> bool:
        return ref not in self._by_id and looks_like_path(ref)

    def detach(self, entry: LoadedModel) -> None:
        """Forget the model: lookups no longer find it (it is still allocated), and what
        found it before must not start using it (``detached``)."""
        entry.detached = True
        if self._by_id.get(entry.id) is entry:
            del self._by_id[entry.id]
        if self._by_key.get(entry.key) is entry:
            del self._by_key[entry.key]

    async def unload(self, entry: LoadedModel) -> None:
        """Forget and free the model (the caller has closed what uses it)."""
        self.detach(entry)
        await trio.to_thread.run_sync(entry.model.close)
        if entry.reservation is not None:
            entry.reservation.release()
        log.info("model_unloaded", model=entry.id)
