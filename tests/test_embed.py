"""``embed``: one vector per input, checked against llama-cpp-python's own embedding code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import DaemonProcess
from lorad.client import AsyncClient, BadRequest, Client, ContextOverflow, TooLarge

TEXTS = ["hello world, the cat", "the dog and the cat"]


def reference_mean(model: Path, text: str) -> np.ndarray:
    """Mean of the per-token embeddings, computed by llama-cpp-python's ``Llama.embed``, with
    weights repacked as the daemon decides for this CPU (``Llama`` always repacks, and on CPUs
    with AMX llama.cpp's repacked Q4_K path crashes: gemma's reference died with SIGSEGV)."""
    import llama_cpp
    import llama_cpp.llama as high_level

    from lorad.daemon.repack import decide

    defaults = llama_cpp.llama_model_default_params

    def as_the_daemon() -> llama_cpp.llama_model_params:
        params = defaults()
        params.use_extra_bufts = decide("auto").enabled
        return params

    high_level.llama_cpp.llama_model_default_params = as_the_daemon
    try:
        ref = llama_cpp.Llama(str(model), embedding=True, n_ctx=128, verbose=False,
                              pooling_type=llama_cpp.LLAMA_POOLING_TYPE_NONE)
    finally:
        high_level.llama_cpp.llama_model_default_params = defaults
    try:
        return np.mean(np.array(ref.embed(text, normalize=False)), axis=0)
    finally:
        ref.close()


def test_embed_is_the_mean_of_the_token_vectors(client: Client, tiny_model: Path) -> None:
    client.load_model(tiny_model)
    raw = client.embed(TEXTS, model="tiny", normalize=False)
    unit = client.embed(TEXTS, model="tiny")
    assert raw["dimensions"] == 64 and raw["pooling"] == "mean" and raw["model"] == "tiny"
    assert len(raw["embeddings"]) == 2 and raw["input_tokens"][0] > 1
    assert raw["prompt_tokens"] == sum(raw["input_tokens"])
    for text, got, normed in zip(TEXTS, raw["embeddings"], unit["embeddings"], strict=True):
        want = reference_mean(tiny_model, text)
        got = np.array(got)
        assert np.abs(got - want).max() < 2e-3
        assert got @ want / (np.linalg.norm(got) * np.linalg.norm(want)) > 0.99999
        assert np.allclose(normed, got / np.linalg.norm(got), atol=1e-9)
    single = client.embed(TEXTS[0], model="tiny")  # one string is one input
    assert np.allclose(single["embeddings"][0], unit["embeddings"][0])


def test_embed_never_touches_a_generation_context(client: Client, tiny_model: Path) -> None:
    with client.create_context(tiny_model, n_ctx=128) as ctx:
        before = ctx.generate("hello world", max_tokens=8, temperature=0).collect()
        cached = next(c for c in client.list_contexts() if c["id"] == ctx.id)["cached_tokens"]
        by_context = ctx.embed(TEXTS)
        after = next(c for c in client.list_contexts() if c["id"] == ctx.id)["cached_tokens"]
        assert after == cached > 0
        assert ctx.generate("hello world", max_tokens=8, temperature=0).collect() == before
        by_model = client.embed(TEXTS, model=by_context["model"])
        assert np.allclose(by_context["embeddings"], by_model["embeddings"])
        assert by_context["context"] == ctx.id


def test_embed_errors(client: Client, tiny_model: Path) -> None:
    client.load_model(tiny_model)
    with pytest.raises(BadRequest) as err:
        client.embed([], model="tiny")
    assert err.value.details["field"] == "input"
    with pytest.raises(BadRequest) as err:
        client.embed(["ok", ""], model="tiny")
    assert err.value.details == {"field": "input", "index": 1}
    limit = client.capabilities()["limits"]["max_embed_inputs"]
    with pytest.raises(TooLarge) as err:
        client.embed(["x"] * (limit + 1), model="tiny")
    assert err.value.details["limit"] == "max_embed_inputs"
    with pytest.raises(ContextOverflow) as err:
        client.embed(["short", "the cat " * 400], model="tiny")
    assert err.value.details["index"] == 1 and err.value.details["n_ctx"] == 512
    with pytest.raises(BadRequest):
        client.embed("x", model="tiny", context="ctx-nope")


async def test_async_client_and_cli_embed(daemon: DaemonProcess, tiny_model: Path) -> None:
    async with AsyncClient(daemon.endpoint) as c:
        await c.load_model(tiny_model)
        result = await c.embed(TEXTS, model="tiny")
        async with await c.create_context(tiny_model, n_ctx=64) as ctx:
            assert np.allclose((await ctx.embed(TEXTS))["embeddings"], result["embeddings"])
    out = subprocess.run([sys.executable, "-m", "lorad.client.cli", "--endpoint",
                          daemon.endpoint, "embed", "--model", "tiny", *TEXTS],
                         capture_output=True, text=True, check=True)
    printed = json.loads(out.stdout)
    assert np.allclose(printed["embeddings"], result["embeddings"])


class _EmbedRace:
    """An engine in this process (the tiny model allowed), and an embedding and a forced unload
    of ``entry`` (set once it is loaded) whose outcomes are recorded: the number of vectors or
    the error code, and whether the model was unloaded."""

    def __init__(self, tmp_path: Path, tiny_model: Path) -> None:
        from lorad.daemon.config import DaemonConfig
        from lorad.daemon.engine import Engine
        from lorad.daemon.metrics import Metrics

        self.engine = Engine(DaemonConfig(
            endpoint="inproc://unused", allowed_dirs=[str(tiny_model.parent)],
            adapter_dirs=[str(tmp_path)], peft_cache_dir=str(tmp_path / "peft")), Metrics())
        self.entry: Any = None
        self.outcomes: dict[str, object] = {}

    async def embed(self) -> None:
        from lorad.protocol import ProtocolError
        from lorad.protocol.args import parse_args

        try:
            result = await self.engine.embed(
                parse_args("embed", {"model": self.entry.id, "input": ["hello"]}), None,
                lambda: False)
            self.outcomes["embed"] = len(result["embeddings"])
        except ProtocolError as exc:
            self.outcomes["embed"] = exc.code.value

    async def unload(self) -> None:
        unloaded = await self.engine.unload_model(self.entry.id, force=True)
        self.outcomes["unload"] = unloaded["unloaded"]


@pytest.mark.parametrize("first", ["embed", "unload"])
async def test_embed_racing_an_unload_is_not_found_never_a_freed_context(
        tmp_path: Path, tiny_model: Path, first: str) -> None:
    """An embedding waiting for the embedding context while its model is unloaded gets
    ``not_found`` (it used to run on the freed context), and nothing is left behind."""
    import trio
    import trio.testing

    race = _EmbedRace(tmp_path, tiny_model)
    engine, outcomes, embed, unload = race.engine, race.outcomes, race.embed, race.unload
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        race.entry = await engine.models.load(str(tiny_model))
        busy = await engine._embedder(race.entry)
        async with trio.open_nursery() as racers:
            async with busy.lock:  # an embedding in progress holds the context
                for task in ((embed, unload) if first == "embed" else (unload, embed)):
                    racers.start_soon(task)
                    await trio.testing.wait_all_tasks_blocked()
                    with trio.fail_after(10):  # tokenized (a text thread): it waits for it
                        while task is embed and "embed" not in outcomes and \
                                not busy.lock.statistics().tasks_waiting:
                            await trio.sleep(0.001)
        assert outcomes == {"embed": "not_found", "unload": True}
        assert not engine._embedders and not list(engine.models)
        nursery.cancel_scope.cancel()


async def test_an_unload_waits_for_an_embeddings_tokenizing(tmp_path: Path,
                                                           tiny_model: Path) -> None:
    """An embedding's inputs are tokenized on the text workers before it takes the embedding
    context: an unload that begins meanwhile waits for that thread before it frees the
    vocabulary (the embedding then gets its vectors or ``not_found``)."""
    import threading

    import trio
    import trio.testing

    race = _EmbedRace(tmp_path, tiny_model)
    engine, outcomes = race.engine, race.outcomes
    release = threading.Event()

    async def block() -> None:  # a text thread, busy until released
        await engine.text.run(release.wait, 30)

    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        entry = race.entry = await engine.models.load(str(tiny_model))
        await engine._embedder(entry)
        async with trio.open_nursery() as racers:
            for _ in range(engine.text.threads):
                racers.start_soon(block)
            await trio.testing.wait_all_tasks_blocked()
            racers.start_soon(race.embed)  # its tokenizing waits for a text thread
            await trio.testing.wait_all_tasks_blocked()
            try:  # it holds the weights (an unload's wait_unused waits for it)
                assert entry.in_use
            finally:
                racers.start_soon(race.unload)
                await trio.testing.wait_all_tasks_blocked()
                release.set()
        assert outcomes["unload"] is True and outcomes["embed"] in (1, "not_found"), outcomes
        assert not list(engine.models)
        nursery.cancel_scope.cancel()
