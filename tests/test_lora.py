"""LoRA adapter stacks through a real daemon, on tiny generated models and adapters.

The reference for "the adapter is applied right" is a second model file whose weights are the
base weights with the adapters merged in (``W + s * alpha / rank * B @ A``, computed in numpy):
greedy tokens must be equal and top log-probabilities agree to 1e-3.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

import tinymodels
from conftest import DaemonProcess, start_daemon
from lorad.client import (
    AsyncClient,
    Client,
    ForbiddenPath,
    LoraFileNotFound,
    LoraIncompatible,
    LoraInvalid,
    LoraInvalidScale,
    LoraLoadFailed,
    NotFound,
)

PROMPT = "Hello world, the cat and the dog"
N = 16
TOL = 1e-3
# Flash attention computes in f16 whatever the KV type (~1e-3 noise on these random models): the
# comparisons of exact math run without it and with an f32 KV cache.
EXACT = {"n_ctx": 256, "kv_type": "f32", "flash_attn": False}


class Files:
    """Every model and adapter file of this module, written once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.adapter_dir = root / "adapters"
        self.adapter_dir.mkdir()
        self.outside = root.parent / f"{root.name}-outside"
        self.outside.mkdir()
        self.base = tinymodels.tiny_llama_tensors(seed=0)
        self.model = tinymodels.write_tiny_llama(root / "base.gguf", seed=0)
        # a: rank 4 on attention q/v; b: rank 2 on ffn_up and attn_output.
        self.a = tinymodels.write_lora(root / "a.gguf", self.base, rank=4, alpha=8, seed=1,
                                       std=0.3)
        self.b = tinymodels.write_lora(root / "b.gguf", self.base, rank=2, alpha=4, seed=2,
                                       std=0.3, targets=("ffn_up", "attn_output"))
        self.named = tinymodels.write_lora(self.adapter_dir / "french.gguf", self.base, rank=4,
                                           alpha=8, seed=3, std=0.3)
        self.merged_a = self.merged("merged-a", [(self.a, 0.7)])
        self.merged_b = self.merged("merged-b", [(self.b, 0.5)])
        self.merged_ab = self.merged("merged-ab", [(self.a, 0.6), (self.b, -0.8)])
        self.merged_named = self.merged("merged-named", [(self.named, 1.0)])
        self.bad = {
            "garbage": tinymodels.write_garbage(root / "garbage.gguf"),
            "not_lora": tinymodels.write_not_lora_gguf(root / "model-not-lora.gguf"),
            "truncated": tinymodels.write_truncated_gguf(root / "truncated.gguf", self.a.path),
            "missing_b": tinymodels.write_lora_missing_b(root / "missing-b.gguf", self.base),
            "rank_mismatch": tinymodels.write_lora_rank_mismatch(root / "rank.gguf", self.base),
            "wrong_arch": tinymodels.write_lora_wrong_arch(root / "gpt2.gguf", self.base),
            "unknown_tensor": tinymodels.write_lora_unknown_tensor(root / "blk99.gguf",
                                                                   self.base),
            "bad_shape": tinymodels.write_lora_bad_shape(root / "shape.gguf", self.base),
        }
        self.alora = tinymodels.write_alora(root / "alora.gguf", self.base)
        self.alora_bad = tinymodels.write_alora_bad_token_type(root / "alora-i32.gguf",
                                                               self.base)
        self.forbidden = shutil.copy(self.a.path, self.outside / "a.gguf")

    def merged(self, name: str, stack) -> Path:
        weights = tinymodels.merge_loras(self.base, stack)
        return tinymodels.write_tiny_llama(self.root / f"{name}.gguf", seed=0, weights=weights)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    return Files(tmp_path_factory.mktemp("lora"))


@pytest.fixture(scope="module")
def lora_daemon(tmp_path_factory: pytest.TempPathFactory, files: Files) -> Iterator[DaemonProcess]:
    workdir = tmp_path_factory.mktemp("lora-daemon")
    d = start_daemon(workdir, [files.root], "--adapter-dir", str(files.adapter_dir))
    yield d
    assert d.stop() == 0, d.log()
    assert '"level": "error"' not in d.log(), d.log()


@pytest.fixture
def client(lora_daemon: DaemonProcess) -> Iterator[Client]:
    with lora_daemon.client() as c:
        yield c
        leftover = [ctx["id"] for ctx in c.list_contexts()]
    assert leftover == [], "a test left contexts open"


def run(ctx, **params) -> tuple[list[int], list[list[list[float]]]]:
    """Greedy tokens and top-5 log-probabilities of PROMPT."""
    stream = ctx.generate(PROMPT, max_tokens=N, temperature=0, logprobs=5, **params)
    tokens, logprobs = [], []
    for chunk in stream:
        tokens += chunk.token_ids
        logprobs += chunk.logprobs or []
    return tokens, logprobs


def assert_close(got, want, tol: float = TOL) -> None:
    assert got[0] == want[0]
    for step_got, step_want in zip(got[1], want[1], strict=True):
        assert [t for t, _ in step_got] == [t for t, _ in step_want]
        for (_, lp_got), (_, lp_want) in zip(step_got, step_want, strict=True):
            assert abs(lp_got - lp_want) <= tol


@pytest.fixture(scope="module")
def expected(lora_daemon: DaemonProcess, files: Files) -> dict[str, tuple]:
    """Outputs of fresh contexts on the base and on each merged model."""
    out = {}
    with lora_daemon.client() as c:
        for key, path in [("base", files.model), ("a", files.merged_a), ("b", files.merged_b),
                          ("ab", files.merged_ab), ("named", files.merged_named)]:
            with c.create_context(path, **EXACT) as ctx:
                out[key] = run(ctx)
            if key != "base":
                c.unload_model(c.load_model(path))
    assert len({tuple(v[0]) for v in out.values()}) == len(out), "adapters change nothing?"
    return out


def refs(stack: list[dict]) -> list[tuple[str, float]]:
    return [(e["ref"], e["scale"]) for e in stack]


# -- the math ----------------------------------------------------------------------------------
def test_adapter_output_equals_merged_model(client: Client, files: Files, expected) -> None:
    with client.create_context(files.model, **EXACT) as ctx:
        stack = ctx.set_lora(files.a.path, 0.7)
        assert refs(stack) == [(str(files.a.path), 0.7)]
        info = stack[0]
        assert info["alpha"] == 8.0 and info["rank"] == 4 and info["alora"] is False
        assert info["n_targets"] == 4 and "blk.0.attn_q.weight" in info["targets"]
        assert info["bytes"] == sum(a.nbytes + b.nbytes for a, b in files.a.tensors.values())
        got = run(ctx)
        assert_close(got, expected["a"])
        # The end metrics say which stack produced the output.
        stream = ctx.generate(PROMPT, max_tokens=2, temperature=0)
        stream.collect()
        assert stream.metrics["loras"] == [
            {"ref": str(files.a.path), "path": str(files.a.path), "scale": 0.7}
        ]


def test_stack_of_two_with_a_negative_scale(client: Client, files: Files, expected) -> None:
    with client.create_context(files.model, **EXACT) as ctx:
        ctx.set_lora(files.a.path, 0.6)
        stack = ctx.set_lora(files.b.path, -0.8)
        assert refs(stack) == [(str(files.a.path), 0.6), (str(files.b.path), -0.8)]
        assert [e["rank"] for e in stack] == [4, 2]
        assert_close(run(ctx), expected["ab"])


def test_scale_zero_remove_and_clear_give_exactly_the_base(client: Client, files: Files,
                                                           expected) -> None:
    with client.create_context(files.model, **EXACT) as ctx:
        assert run(ctx) == expected["base"]
        ctx.set_lora(files.a.path, 0.0)
        assert run(ctx) == expected["base"]  # same tokens, same logprobs, bit for bit
        ctx.set_lora(files.a.path, 0.7)  # a scale change of the entry already there
        assert len(ctx.loras()) == 1
        assert_close(run(ctx), expected["a"])
        assert ctx.remove_lora(files.a.path) == []
        assert run(ctx) == expected["base"]
        ctx.set_loras([(files.a.path, 0.6), (files.b.path, -0.8)])
        assert_close(run(ctx), expected["ab"])
        assert ctx.clear_loras() == []
        assert run(ctx) == expected["base"]


def test_kv_cache_is_not_reused_across_a_stack_change(client: Client, files: Files,
                                                      expected) -> None:
    with client.create_context(files.model, **EXACT) as ctx:
        run(ctx)  # the prompt is in the KV cache, computed without adapters
        ctx.set_lora(files.a.path, 0.7)
        after_change = run(ctx)
        with client.create_context(files.model, **EXACT,
                                   loras=[(files.a.path, 0.7)]) as fresh:
            assert run(fresh) == after_change  # exactly the output of a fresh context
        ctx.set_lora(files.a.path, 0.5)  # a scale change alone also invalidates the cache
        with client.create_context(files.model, **EXACT,
                                   loras=[(files.a.path, 0.5)]) as fresh:
            assert run(ctx) == run(fresh)


def test_per_request_stack_leaves_the_context_stack(client: Client, files: Files,
                                                    expected) -> None:
    with client.create_context(files.model, **EXACT, loras=[(files.a.path, 0.7)]) as ctx:
        assert_close(run(ctx, loras=[(files.b.path, 0.5)]), expected["b"])
        assert refs(ctx.loras()) == [(str(files.a.path), 0.7)]
        assert run(ctx, loras=[]) == expected["base"]
        assert_close(run(ctx), expected["a"])
        assert refs(ctx.loras()) == [(str(files.a.path), 0.7)]


def test_two_contexts_stream_concurrently_with_their_own_stacks(
    client: Client, lora_daemon: DaemonProcess, files: Files, expected
) -> None:
    # shared: each is streamed by a client (and socket) of its own thread
    with client.create_context(files.model, **EXACT, loras=[files.a.path], shared=True) as one, \
         client.create_context(files.model, **EXACT, shared=True) as two, \
         client.create_context(files.model, **EXACT, shared=True) as three:
        one.set_lora(files.a.path, 0.7)
        two.set_lora(files.b.path, 0.5)
        three.set_lora(files.a.path, 0.7)  # shares the adapter loaded for `one`
        adapters = [a for a in client.status()["adapters"] if a["path"] == str(files.a.path)]
        assert len(adapters) == 1
        assert sorted(adapters[0]["contexts"]) == sorted([one.id, three.id])
        results: dict[str, tuple] = {}

        def stream(name: str, context_id: str) -> None:
            with lora_daemon.client() as c:  # a client (and socket) per thread
                results[name] = run(c.context(context_id))

        threads = [threading.Thread(target=stream, args=(name, c.id))
                   for name, c in [("one", one), ("two", two), ("three", three)]]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert_close(results["one"], expected["a"])
        assert_close(results["two"], expected["b"])
        assert_close(results["three"], expected["a"])
    assert client.status()["adapters"] == []  # freed with the last context holding them


def test_four_contexts_on_three_stacks_batched_give_their_outputs_alone(
    client: Client, lora_daemon: DaemonProcess, files: Files, expected
) -> None:
    # One batched llama context holds all four; a batch holds one stack, so the scheduler
    # rotates between the empty stack, a@0.7 (two contexts: batched together) and b@0.5.
    stacks = {"base": None, "a": [(files.a.path, 0.7)], "b": [(files.b.path, 0.5)],
              "a-too": [(files.a.path, 0.7)]}
    want = {"base": expected["base"], "a": expected["a"], "b": expected["b"],
            "a-too": expected["a"]}
    ctxs = {name: client.create_context(files.model, **EXACT, loras=stack, shared=True)
            for name, stack in stacks.items()}
    try:
        [slab] = client.status()["batching"]
        assert slab["used"] == 4
        before = slab["stack_switches"]
        results: dict[str, tuple] = {}
        barrier = threading.Barrier(len(ctxs))

        def stream(name: str, context_id: str) -> None:
            with lora_daemon.client() as c:
                barrier.wait(10)
                results[name] = run(c.context(context_id))

        threads = [threading.Thread(target=stream, args=(name, c.id))
                   for name, c in ctxs.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for name in stacks:
            assert results[name][0] == want[name][0], name  # token for token
            assert_close(results[name], want[name])
        [slab] = client.status()["batching"]
        assert slab["stack_switches"] - before >= 3  # the stacks took turns
    finally:
        for c in ctxs.values():
            c.close()


# -- errors ------------------------------------------------------------------------------------
BAD_FILES = [
    ("garbage", LoraInvalid, "not a GGUF"),
    ("not_lora", LoraInvalid, "general.type"),
    ("truncated", LoraInvalid, ""),
    ("missing_b", LoraInvalid, "lora_b"),
    ("rank_mismatch", LoraInvalid, "rank"),
    ("wrong_arch", LoraIncompatible, "architecture"),
    ("unknown_tensor", LoraIncompatible, "blk.99.attn_q.weight"),
    ("bad_shape", LoraIncompatible, "blk.0.attn_q.weight"),
]


@pytest.mark.parametrize(("kind", "error", "words"), BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_adapter_is_refused_and_the_stack_is_unchanged(
    client: Client, files: Files, expected, kind: str, error: type, words: str
) -> None:
    with client.create_context(files.model, **EXACT, loras=[(files.a.path, 0.7)]) as ctx:
        with pytest.raises(error) as info:
            ctx.set_lora(files.bad[kind], 1.0)
        assert words in info.value.message
        assert info.value.details["path"] == str(files.bad[kind])
        if kind == "bad_shape":
            d = info.value.details
            assert d["tensor"] == "blk.0.attn_q.weight"
            assert d["model_shape"] == [64, 64]
            assert d["expected_lora_a"] == [4, 64] and d["found_lora_a"] == [4, 65]
        if kind == "unknown_tensor":
            assert info.value.details["tensor"] == "blk.99.attn_q.weight"
        # Atomic: one bad entry in a whole new stack changes nothing either.
        with pytest.raises(error):
            ctx.set_loras([(files.b.path, 0.5), (files.bad[kind], 1.0)])
        assert refs(ctx.loras()) == [(str(files.a.path), 0.7)]
        assert_close(run(ctx), expected["a"])
        # Nothing of the failed attempts stays loaded.
        loaded = {a["path"] for a in client.status()["adapters"]}
        assert loaded == {str(files.a.path)}


def test_missing_forbidden_and_unloadable_adapters(client: Client, files: Files,
                                                   expected) -> None:
    with client.create_context(files.model, **EXACT, loras=[(files.a.path, 0.7)]) as ctx:
        with pytest.raises(LoraFileNotFound) as info:
            ctx.set_lora(files.root / "nope.gguf")
        assert info.value.details["path"] == str(files.root / "nope.gguf")
        with pytest.raises(ForbiddenPath):
            ctx.set_lora(files.forbidden)
        # Passes every check of ours; llama.cpp itself refuses it: its log lines come along.
        with pytest.raises(LoraLoadFailed) as info:
            ctx.set_lora(files.alora_bad)
        assert any("invalid gguf element type" in line for line in info.value.details["log"])
        with pytest.raises(NotFound):
            ctx.remove_lora(files.b.path)
        assert refs(ctx.loras()) == [(str(files.a.path), 0.7)]
        assert_close(run(ctx), expected["a"])


def test_an_embedding_lora_on_a_tied_model_is_refused_not_an_abort(client: Client,
                                                                    files: Files) -> None:
    """llama.cpp would apply a token_embd LoRA at a tied output layer too and abort
    (GGML_ASSERT in mul_mat) at the first decode: it is refused before llama.cpp sees it."""
    tied = tinymodels.write_tiny_gemma3(files.root / "tied.gguf", tied=True)
    untied = tinymodels.write_tiny_gemma3(files.root / "untied.gguf", tied=False)
    on_tied = tinymodels.write_token_embd_lora(files.root / "embd-tied.gguf", tied)
    on_untied = tinymodels.write_token_embd_lora(files.root / "embd-untied.gguf", untied)
    with client.create_context(tied, n_ctx=64) as ctx:
        with pytest.raises(LoraIncompatible, match="tied") as info:
            ctx.set_lora(on_tied)
        assert info.value.details["tensor"] == "token_embd.weight"
        assert ctx.generate(PROMPT, max_tokens=2, temperature=0).collect() is not None
    report = client.validate_lora(str(tied), on_tied)
    assert not report["compatible"] and report["adapter"]["targets"]
    with client.create_context(untied, n_ctx=64) as ctx:
        ctx.set_lora(on_untied)
        assert [e["rank"] for e in ctx.loras()] == [4]  # not n_vocab: B's columns
        assert ctx.generate(PROMPT, max_tokens=2, temperature=0).collect() is not None
    assert client.ping()["pong"]
    for path in (tied, untied):
        client.unload_model(str(path))


def test_alora_is_reported_and_applied(client: Client, files: Files) -> None:
    model = client.load_model(files.model)
    report = client.validate_lora(model, files.alora)
    assert report["adapter"]["alora"] is True
    assert report["adapter"]["alora_invocation_tokens"] == [5, 6, 7]
    assert report["problems"] == [] and report["compatible"] is True
    with client.create_context(model, n_ctx=128) as ctx:
        ctx.set_lora(files.alora)  # its activation is tested in test_alora.py
        assert [e["alora"] for e in ctx.loras()] == [True]
        ctx.generate(PROMPT, max_tokens=1).collect()
        ctx.clear_loras()


@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf, "1.0", None, True])
def test_invalid_scales(client: Client, files: Files, scale) -> None:
    with client.create_context(files.model, n_ctx=128, loras=[(files.a.path, 0.5)]) as ctx:
        if scale is not None:
            with pytest.raises(LoraInvalidScale) as info:
                ctx.set_lora(files.a.path, scale)
            assert info.value.details["field"] == "scale"
        with pytest.raises(LoraInvalidScale):
            ctx.set_loras([(files.b.path, scale)])
        with pytest.raises(LoraInvalidScale):
            ctx.generate(PROMPT, max_tokens=1, loras=[(files.b.path, scale)]).collect()
        assert refs(ctx.loras()) == [(str(files.a.path), 0.5)]


def test_bad_stack_at_creation_creates_no_context(client: Client, files: Files) -> None:
    with pytest.raises(LoraIncompatible):
        client.create_context(files.model, n_ctx=128,
                              loras=[files.a.path, files.bad["bad_shape"]])
    assert client.list_contexts() == []
    assert client.status()["adapters"] == []


def test_validate_lora_reports_without_applying(client: Client, files: Files) -> None:
    model = client.load_model(files.model)
    good = client.validate_lora(model["id"], files.a.path)
    assert good["compatible"] is True and good["problems"] == []
    assert good["adapter"]["rank"] == 4 and good["adapter"]["architecture"] == "llama"
    bad = client.validate_lora(model["id"], files.bad["bad_shape"])
    assert bad["compatible"] is False
    assert [p["code"] for p in bad["problems"]] == ["lora_incompatible"]
    assert bad["problems"][0]["details"]["tensor"] == "blk.0.attn_q.weight"
    missing = client.validate_lora(model["id"], files.root / "nope.gguf")
    assert [p["code"] for p in missing["problems"]] == ["lora_file_not_found"]
    assert client.status()["adapters"] == []


def test_a_file_validated_again_unchanged_is_not_read_again(client: Client, files: Files
                                                             ) -> None:
    """Validations are remembered per file version: the same file again is answered from
    memory (a refusal too), and a file replaced since is read again, never answered stale."""
    model = client.load_model(files.model)["id"]
    path = files.root / "validated.gguf"
    shutil.copy(files.a.path, path)

    def reused() -> int:
        return client.status()["adapter_inspections"]["reused"]

    first, before = client.validate_lora(model, path), reused()
    assert first["compatible"] is True
    assert client.validate_lora(model, path) == first
    assert reused() == before + 1
    garbage = client.validate_lora(model, files.bad["garbage"])
    assert [p["code"] for p in garbage["problems"]] == ["lora_invalid"]
    assert client.validate_lora(model, files.bad["garbage"]) == garbage
    assert reused() == before + 2
    shutil.copy(files.bad["bad_shape"], path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)  # another version: read again
    replaced = client.validate_lora(model, path)
    assert replaced["compatible"] is False
    assert [p["code"] for p in replaced["problems"]] == ["lora_incompatible"]
    assert reused() == before + 2


async def test_remembered_inspections_are_bounded_and_hold_no_traceback(files: Files) -> None:
    """What the adapter cache remembers of inspections is small: a refusal without its
    traceback (whose frames held the file's parsed header: the full fuzz run's RSS grew
    46 MiB with them), and at most ``INSPECTED`` versions."""
    from lorad.daemon import adapters as adapters_mod
    from lorad.daemon.adapters import AdapterCache
    from lorad.daemon.workers import FileWorkers
    from lorad.protocol import Limits, ProtocolError

    cache = AdapterCache(FileWorkers(Limits()))
    with pytest.raises(ProtocolError):
        await cache.inspect(files.bad["garbage"])
    info = await cache.inspect(files.a.path)
    [refusal, kept] = cache._inspected.values()
    assert isinstance(refusal, ProtocolError) and refusal.__traceback__ is None
    assert refusal.__context__ is None and kept is info
    paths = []
    for i in range(adapters_mod.INSPECTED + 3):
        paths.append(files.root / f"copy-{i}.gguf")
        shutil.copy(files.a.path, paths[-1])
        await cache.inspect(paths[-1])
    assert len(cache._inspected) == adapters_mod.INSPECTED
    kept_paths = {p for p, _ in cache._inspected}
    assert str(paths[-1]) in kept_paths and str(paths[2]) not in kept_paths  # oldest first


# -- names, files that change, lifetimes -------------------------------------------------------
def test_adapter_by_name(client: Client, files: Files, expected) -> None:
    with client.create_context(files.model, **EXACT) as ctx:
        stack = ctx.set_lora("french")
        assert refs(stack) == [("french", 1.0)]
        assert stack[0]["path"] == str(files.named.path)
        assert_close(run(ctx), expected["named"])
        ctx.set_lora("french", 0.0)  # the name finds the same entry
        assert run(ctx) == expected["base"]
        assert ctx.remove_lora("french") == []
        with pytest.raises(LoraFileNotFound) as info:
            ctx.set_lora("german")
        assert str(files.adapter_dir / "german.gguf") in info.value.details["searched"]


def test_changed_file_is_loaded_afresh(client: Client, files: Files, expected) -> None:
    path = files.root / "changing.gguf"
    shutil.copy(files.a.path, path)
    with client.create_context(files.model, **EXACT, loras=[(path, 0.7)]) as one:
        assert_close(run(one), expected["a"])
        shutil.copy(files.b.path, path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)  # a new inode, size and mtime
        with client.create_context(files.model, **EXACT, loras=[(path, 0.5)]) as two:
            assert_close(run(two), expected["b"])
            versions = [a for a in client.status()["adapters"] if a["path"] == str(path)]
            assert len(versions) == 2
            # `one` keeps the version it loaded until it names the file anew.
            assert_close(run(one), expected["a"])
            one.remove_lora(path)
            one.set_lora(path, 0.5)
            assert_close(run(one), expected["b"])
            versions = [a for a in client.status()["adapters"] if a["path"] == str(path)]
            assert len(versions) == 1 and sorted(versions[0]["contexts"]) == sorted(
                [one.id, two.id])


def test_unload_model_releases_adapters(client: Client, files: Files, expected) -> None:
    model = client.load_model(files.model)
    ctx = client.create_context(model, n_ctx=128, loras=[files.a.path, files.b.path])
    assert len(client.status()["adapters"]) == 2
    client.unload_model(model, force=True)
    assert client.status()["adapters"] == []
    with pytest.raises(NotFound):
        ctx.loras()
    with client.create_context(files.model, **EXACT) as again:
        assert again.loras() == []  # a reloaded model starts without adapters
        assert run(again) == expected["base"]


async def test_async_client_mirrors_the_lora_api(lora_daemon: DaemonProcess, files: Files,
                                                 expected) -> None:
    async with AsyncClient(lora_daemon.endpoint) as client:
        async with await client.create_context(files.model, **EXACT) as ctx:
            stack = await ctx.set_lora(files.a.path, 0.7)
            assert refs(stack) == [(str(files.a.path), 0.7)]
            stream = await ctx.generate(PROMPT, max_tokens=N, temperature=0)
            tokens = [t async for chunk in stream for t in chunk.token_ids]
            assert tokens == expected["a"][0]
            assert refs(await ctx.set_loras([(files.b.path, 0.5)])) == [(str(files.b.path), 0.5)]
            assert refs(await ctx.loras()) == [(str(files.b.path), 0.5)]
            assert await ctx.remove_lora(files.b.path) == []
            await ctx.set_lora("french")
            assert await ctx.clear_loras() == []
            report = await client.validate_lora(ctx.model, files.bad["wrong_arch"])
            assert report["compatible"] is False
            with pytest.raises(LoraInvalid):
                await ctx.set_lora(files.bad["garbage"])
        await trio.lowlevel.checkpoint()


# -- configuration and command line ------------------------------------------------------------
def lorad(endpoint: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorad.client.cli", "--endpoint", endpoint,
                           *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def test_cli_lora_commands(lora_daemon: DaemonProcess, client: Client, files: Files,
                           expected) -> None:
    ep = lora_daemon.endpoint
    with client.create_context(files.model, **EXACT, shared=True) as ctx:  # the CLI is another
        # client process
        out = lorad(ep, "lora", "set", "a.gguf", "--scale", "0.7", "--context", ctx.id,
                    cwd=files.root)  # a relative path is the CLI's, not the daemon's
        assert out.returncode == 0, out.stderr
        assert refs(ctx.loras()) == [(str(files.a.path), 0.7)]
        out = lorad(ep, "lora", "ls", "--context", ctx.id, "--json")
        assert refs(__import__("json").loads(out.stdout)) == [(str(files.a.path), 0.7)]
        out = lorad(ep, "lora", "set", str(files.b.path), "--scale", "nan", "--context", ctx.id)
        assert out.returncode == 1 and "lora_invalid_scale" in out.stderr
        out = lorad(ep, "lora", "rm", str(files.a.path), "--context", ctx.id)
        assert out.returncode == 0 and "base model" in out.stdout
        out = lorad(ep, "lora", "set", "french", "--context", ctx.id)
        assert out.returncode == 0
        out = lorad(ep, "lora", "clear", "--context", ctx.id)
        assert out.returncode == 0 and ctx.loras() == []
        out = lorad(ep, "lora", "validate", str(files.bad["bad_shape"]), "--model", ctx.model)
        assert out.returncode == 1 and "lora_incompatible" in out.stdout
        out = lorad(ep, "lora", "validate", str(files.a.path), "--model", ctx.model)
        assert out.returncode == 0 and out.stdout.startswith("compatible")
        out = lorad(ep, "generate", PROMPT, "--context", ctx.id, "--max-tokens", str(N),
                    "--temperature", "0", "--lora", f"{files.a.path}:0.7", "--json")
        assert out.returncode == 0, out.stderr
        assert __import__("json").loads(out.stdout)["token_ids"] == expected["a"][0]
        assert ctx.loras() == []


def test_config_stack_and_cli_override(tmp_path: Path, files: Files) -> None:
    config = tmp_path / "lorad.toml"
    config.write_text(
        f'adapter_dirs = ["{files.adapter_dir}"]\n'
        f'[[contexts]]\nid = "default"\nmodel = "{files.model}"\nn_ctx = 128\n'
        f'loras = [{{ path = "{files.a.path}", scale = 0.7 }}, "french"]\n'
    )
    d = start_daemon(tmp_path, [files.root], "--config", str(config))
    try:
        with d.client() as c:
            assert refs(c.context("default").loras()) == [(str(files.a.path), 0.7),
                                                          ("french", 1.0)]
    finally:
        assert d.stop() == 0, d.log()
    # An explicit --lora replaces the config file's stack of the default context.
    workdir = tmp_path / "second"
    workdir.mkdir()
    d = start_daemon(workdir, [files.root], "--config", str(config),
                     "--lora", f"{files.b.path}:-0.5")
    try:
        with d.client() as c:
            assert refs(c.context("default").loras()) == [(str(files.b.path), -0.5)]
    finally:
        assert d.stop() == 0, d.log()


def test_fast_header_reader_agrees_with_gguf(files: Files) -> None:
    import gguf

    from lorad.daemon.lora import read_gguf_header

    for path in (files.model, files.a.path, files.alora):
        reader = gguf.GGUFReader(path)
        meta, shapes = read_gguf_header(path)
        assert shapes == {t.name: tuple(int(n) for n in reversed(t.shape.tolist()))
                          for t in reader.tensors}
        for key in ("general.architecture", "general.type", "general.name"):
            field = reader.get_field(key)
            assert meta.get(key) == (field.contents() if field else None)
