"""Unloading a model while something still reads its weights in a worker thread (a context or
an adapter being made, a text being tokenized): the unload waits for it, and what starts after
the unload has begun is refused with ``not_found`` instead of touching freed weights. In
process, on the real llama.cpp and a generated model; the interleaving is forced with trio's
test helpers, not timed."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

import tinymodels
from lorad.daemon.adapters import AdapterCache
from lorad.daemon.paths import AllowedDirs
from lorad.daemon.registry import LoadedModel, ModelRegistry
from lorad.daemon.workers import FileWorkers
from lorad.protocol import ErrorCode, Limits, ProtocolError


async def load(tmp_path: Path) -> tuple[ModelRegistry, LoadedModel, Path]:
    model_path = tinymodels.write_tiny_llama(tmp_path / "base.gguf", seed=0)
    lora = tmp_path / "a.gguf"
    tinymodels.write_lora(lora, tinymodels.tiny_llama_tensors(seed=0), rank=2, alpha=4)
    registry = ModelRegistry(AllowedDirs([tmp_path]))
    return registry, await registry.load(str(model_path)), lora


async def unload(registry: ModelRegistry, entry: LoadedModel, adapters: AdapterCache,
                 log: list[str]) -> None:
    """What ``Engine.unload_model`` does, in its order."""
    registry.detach(entry)
    await entry.wait_unused()
    log.append("unloading")
    await adapters.drop_model(entry)
    await registry.unload(entry)


async def test_an_unload_waits_for_the_weights_in_use_then_refuses_new_use(
        tmp_path: Path) -> None:
    registry, entry, _ = await load(tmp_path)
    adapters = AdapterCache(FileWorkers(Limits()))
    log: list[str] = []
    async with trio.open_nursery() as nursery:
        async with entry.using() as model:
            nursery.start_soon(unload, registry, entry, adapters, log)
            await trio.testing.wait_all_tasks_blocked()
            assert log == []  # the unload has begun and waits for this holder
            with pytest.raises(ProtocolError) as refused:
                async with entry.using():
                    pass
            assert refused.value.code == ErrorCode.NOT_FOUND
            tokens = await trio.to_thread.run_sync(model.tokenize, "hello world")
            assert tokens  # the weights are still there
            log.append("used")
    assert log == ["used", "unloading"]


async def test_an_adapter_is_not_loaded_on_a_model_being_unloaded(tmp_path: Path) -> None:
    registry, entry, lora = await load(tmp_path)
    adapters = AdapterCache(FileWorkers(Limits()))
    held = await adapters.acquire(entry, lora)  # loads while the model is there
    await adapters.release(held)
    log: list[str] = []
    async with trio.open_nursery() as nursery:
        async with entry.using():  # (a context being made holds the weights)
            nursery.start_soon(unload, registry, entry, adapters, log)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(ProtocolError) as refused:  # checked, then refused before
                await adapters.acquire(entry, lora)  # llama.cpp reads the file
            assert refused.value.code == ErrorCode.NOT_FOUND
            assert "unloaded" in str(refused.value)
    assert log == ["unloading"] and not list(adapters)


async def test_a_token_piece_is_refused_once_an_unload_has_begun(tmp_path: Path) -> None:
    """The HTTP door renders log-probability tokens on the trio thread after a run: once the
    model is being unloaded (its vocabulary freed after the holders go), that is ``not_found``,
    not a read of freed memory."""
    registry, entry, _ = await load(tmp_path)
    token = (await trio.to_thread.run_sync(entry.model.tokenize, "hello"))[-1]
    assert entry.piece(token) == entry.model.piece(token)
    await unload(registry, entry, AdapterCache(FileWorkers(Limits())), [])
    with pytest.raises(ProtocolError) as refused:
        entry.piece(token)
    assert refused.value.code == ErrorCode.NOT_FOUND
