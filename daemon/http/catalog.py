"""What an OpenAI ``model`` field names: a loaded model, or an adapter on its base model.

The conventions of vLLM and LoRAX: ``"model": "pirate"`` names an adapter of the adapter
directories (resolved like lorad's adapter names), run on the loaded model it fits;
``"model": "model-id:pirate"`` says which model when several are loaded. ``GET /v1/models``
lists the loaded models and, for each adapter found in the adapter directories, the model it
fits as its ``parent`` (an adapter that fits several models is listed once per model, as
``model-id:adapter``). Whether an adapter fits a model is lorad's own validation, cached per
file version.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import trio

from lorad.protocol import ErrorCode, ProtocolError, looks_like_path
from lorad.protocol.errors import echo

from ..engine import Engine
from ..registry import LoadedModel
from .openai import ApiError

MAX_LISTED = 1000
"""Entries of the adapter directories looked at for ``/v1/models``."""


def _not_found(ref: str, engine: Engine) -> ApiError:
    return ApiError(404, f"the model {echo(ref)!r} does not exist: give a loaded model id, an "
                    "adapter name from the adapter directories, or model-id:adapter "
                    f"(loaded: {', '.join(m.id for m in engine.models) or 'none'})",
                    code="model_not_found", param="model")


class Catalog:
    """Resolves ``model`` fields and lists models and adapters."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._fits: dict[tuple[str, str, str, int, int], bool] = {}

    async def fitting(self, models: list[LoadedModel], name: str
                      ) -> tuple[list[LoadedModel], os.stat_result | None]:
        """The models adapter ``name`` passes lorad's validation for, and its file's stat
        (None: no such adapter); the file is found once for all the models."""
        stacks = self.engine.stacks

        def locate() -> tuple[Path, os.stat_result]:
            path = stacks.resolve(name)
            return path, path.stat()

        try:
            path, stat = await trio.to_thread.run_sync(locate)
        except (ProtocolError, OSError):
            return [], None
        out = []
        for entry in models:
            key = (entry.id, str(entry.path), str(path), stat.st_mtime_ns, stat.st_size)
            if key not in self._fits:
                if len(self._fits) >= 4 * MAX_LISTED:
                    self._fits.clear()
                try:
                    report = await stacks.validate(entry, name)
                except ProtocolError:
                    continue
                self._fits[key] = bool(report["compatible"])
            if self._fits[key]:
                out.append(entry)
        return out, stat

    async def resolve(self, ref: str) -> tuple[LoadedModel, list[str]]:
        """The model and the adapter names the ``model`` field ``ref`` stands for."""
        engine = self.engine
        models = list(engine.models)
        for entry in models:
            if entry.id == ref:
                return entry, []
        for entry in models:
            if ref.startswith(entry.id + ":") and len(ref) > len(entry.id) + 1:
                return entry, [ref[len(entry.id) + 1:]]
        if looks_like_path(ref) or not models:
            raise _not_found(ref, engine)
        try:
            await trio.to_thread.run_sync(engine.stacks.resolve, ref)
        except ProtocolError as exc:
            if exc.code in (ErrorCode.LORA_FILE_NOT_FOUND, ErrorCode.BAD_REQUEST):
                raise _not_found(ref, engine) from None
            raise
        if len(models) == 1:  # whether it fits is checked (and said) when the stack is built
            return models[0], [ref]
        fitting, _ = await self.fitting(models, ref)
        if len(fitting) == 1:
            return fitting[0], [ref]
        if not fitting:
            raise ApiError(422, f"the adapter {ref!r} fits none of the loaded models "
                           f"({', '.join(m.id for m in models)})",
                           code=ErrorCode.LORA_INCOMPATIBLE.value, param="model")
        raise ApiError(400, f"the adapter {ref!r} fits several loaded models: say which, as "
                       f"{' or '.join(repr(m.id + ':' + ref) for m in fitting)}",
                       code="ambiguous_model", param="model")

    def adapter_names(self) -> list[str]:
        """Adapter names: those registered at run time, then those of the adapter directories
        (GGUF files and PEFT directories), each once, in lookup order."""
        names: dict[str, None] = dict.fromkeys(self.engine.stacks.names)
        seen = 0
        for directory in self.engine.adapter_dirs:
            try:
                entries = sorted(os.scandir(directory), key=lambda e: e.name)
            except OSError:
                continue
            for e in entries:
                seen += 1
                if seen > MAX_LISTED:
                    return list(names)
                if e.name.startswith("."):
                    continue
                if e.name.endswith(".gguf") and e.is_file():
                    names.setdefault(e.name[: -len(".gguf")], None)
                elif e.is_dir() and (Path(e.path) / "adapter_config.json").is_file():
                    names.setdefault(e.name, None)
        return list(names)

    async def listing(self) -> list[dict[str, Any]]:
        """``GET /v1/models``'s ``data``."""
        models = list(self.engine.models)
        data = [{"id": m.id, "object": "model", "created": _created(m.path),
                 "owned_by": "lorad", "root": str(m.path), "parent": None} for m in models]
        for name in await trio.to_thread.run_sync(self.adapter_names):
            fitting, stat = await self.fitting(models, name)
            for m in fitting:
                data.append({"id": name if len(fitting) == 1 else f"{m.id}:{name}",
                             "object": "model", "created": int(stat.st_mtime),
                             "owned_by": "lorad",
                             "root": name, "parent": m.id})
        return data

    async def entry(self, model_id: str) -> dict[str, Any]:
        """``GET /v1/models/{id}``: the listing's entry with that id."""
        for item in await self.listing():
            if item["id"] == model_id:
                return item
        raise _not_found(model_id, self.engine)

    async def adapters(self) -> list[dict[str, Any]]:
        """``GET /lora-adapters`` (llama-server's): the adapters requests can name, each with
        its index, name and resolved path; ``scale`` 0: none applies unless a request asks."""
        def found() -> list[tuple[str, Path]]:  # the file system, in one thread
            out = []
            for name in self.adapter_names():
                try:
                    out.append((name, self.engine.stacks.resolve(name)))
                except ProtocolError:
                    continue
            return out

        return [{"id": i, "name": name, "path": str(path), "scale": 0.0}
                for i, (name, path) in enumerate(await trio.to_thread.run_sync(found))]


def _created(path: Path) -> int:
    try:
        return int(path.stat().st_mtime)
    except OSError:
        return 0
