"""Activated LoRAs (aLoRA) on the batching engine, against an oracle built without lorad.

The oracle (llama-cpp-python in this process): the prompt up to the invocation is evaluated by
the base model, its KV state is moved into a context of the model with the aLoRA merged into
its weights, which evaluates the rest and generates. lorad must give those tokens exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import llama_cpp
import pytest

import tinymodels
from conftest import DaemonProcess, start_daemon
from lorad.client import Client, LoraUnsupported

N = 12
EXACT = {"n_ctx": 256, "kv_type": "f32", "flash_attn": False}
PREFIX = ("The cat and the dog went to the park on a sunny day, and the bird sang while the "
          "world was quiet and the people walked")
INVOKE = " cat dog bird"
QUESTION = " the day"


class Files:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.base = tinymodels.tiny_llama_tensors(seed=0)
        self.model = tinymodels.write_tiny_llama(root / "base.gguf", seed=0)
        vocab = llama_cpp.Llama(str(self.model), vocab_only=True, verbose=False)
        self.tokenize = lambda text: vocab.tokenize(text.encode(), add_bos=True, special=False)
        # the invocation as its tokens appear inside a prompt (alone, it would get a leading
        # space token): an aLoRA is invoked by tokens, not by text
        start = len(self.tokenize(PREFIX))
        self.invocation = self.tokenize(PREFIX + INVOKE)[start:]
        assert self.tokenize(PREFIX + INVOKE + QUESTION)[start:][:len(self.invocation)] == (
            self.invocation)
        # K, V and the FFN of every layer: the cache of a prefix differs with and without it
        self.alora = tinymodels.write_lora(
            root / "alora.gguf", self.base, rank=4, alpha=8, seed=11, std=0.3,
            targets=("attn_k", "attn_v", "ffn_up"), invocation_tokens=self.invocation)
        self.merged = tinymodels.write_tiny_llama(
            root / "merged.gguf", seed=0, weights=tinymodels.merge_loras(self.base,
                                                                       [(self.alora, 1.0)]))
        self.other = tinymodels.write_lora(
            root / "other.gguf", self.base, rank=2, alpha=4, seed=12, std=0.3,
            targets=("attn_q",), invocation_tokens=self.invocation)
        self.plain = tinymodels.write_lora(root / "plain.gguf", self.base, rank=2, alpha=4,
                                           seed=13, std=0.3, targets=("ffn_down",))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    return Files(tmp_path_factory.mktemp("alora"))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, files: Files) -> Iterator[DaemonProcess]:
    d = start_daemon(tmp_path_factory.mktemp("alora-daemon"), [files.root])
    yield d
    assert d.stop() == 0, d.log()
    assert '"level": "error"' not in d.log(), d.log()


@pytest.fixture
def client(daemon: DaemonProcess) -> Iterator[Client]:
    with daemon.client() as c:
        yield c


def oracle(files: Files, tokens: list[int], split: int) -> list[int]:
    """Greedy tokens: ``tokens[:split]`` by the base model, the rest by the merged model."""
    kw = {"n_ctx": 256, "verbose": False, "flash_attn": False, "type_k": 0, "type_v": 0}
    merged = llama_cpp.Llama(str(files.merged), **kw)
    if split:
        base = llama_cpp.Llama(str(files.model), **kw)
        base.eval(tokens[:split])
        merged.load_state(base.save_state())  # the base model's KV cache for the prefix
    out = []
    for token in merged.generate(tokens, temp=0.0, top_k=1, repeat_penalty=1.0):
        if token == merged.token_eos() or len(out) == N:
            break
        out.append(token)
    return out


def run(ctx, tokens: list[int], **params) -> tuple[list[int], dict]:
    stream = ctx.generate(tokens=tokens, max_tokens=N, temperature=0, **params)
    ids = [t for chunk in stream for t in chunk.token_ids]
    return ids, stream.metrics


def test_output_is_the_base_prefix_then_the_merged_adapter(client: Client,
                                                           files: Files) -> None:
    tokens = files.tokenize(PREFIX + INVOKE + QUESTION)
    split = len(files.tokenize(PREFIX))
    assert tokens[split:split + len(files.invocation)] == files.invocation
    want = oracle(files, tokens, split)
    with client.create_context(files.model, **EXACT) as ctx:
        got, metrics = run(ctx, tokens, loras=[files.alora.path])
        assert metrics["alora_invocation_start"] == split
        base, _ = run(ctx, tokens)
    assert got == want
    # the activation matters: neither the base model nor the adapter on every token gives it
    assert base != want
    assert oracle(files, tokens, 0) != want


def test_without_its_invocation_an_alora_has_no_effect(client: Client, files: Files) -> None:
    tokens = files.tokenize(PREFIX + QUESTION)
    with client.create_context(files.model, **EXACT) as ctx:
        base, _ = run(ctx, tokens)
        ctx.set_lora(files.alora.path)  # the context's own stack, this time
        got, metrics = run(ctx, tokens)
    assert got == base and metrics["alora_invocation_start"] is None


def test_the_last_invocation_counts_and_plain_adapters_apply_everywhere(
        client: Client, files: Files) -> None:
    tokens = files.tokenize(PREFIX) + files.invocation + files.tokenize(" and then")[1:] + (
        files.invocation + files.tokenize(QUESTION)[1:])
    k = len(files.invocation)
    last = max(i for i in range(len(tokens)) if tokens[i:i + k] == files.invocation)
    assert last > len(files.tokenize(PREFIX))
    with client.create_context(files.model, **EXACT) as ctx:
        _, metrics = run(ctx, tokens, loras=[files.plain.path, files.alora.path])
        assert metrics["alora_invocation_start"] == last
        with_plain, _ = run(ctx, tokens, loras=[files.plain.path, files.alora.path])
        only_alora, _ = run(ctx, tokens, loras=[files.alora.path])
    assert with_plain != only_alora


def test_alternating_base_and_alora_reuses_the_shared_prefix(client: Client,
                                                             files: Files) -> None:
    prefix = files.tokenize(PREFIX * 2)
    base_tokens = prefix + files.tokenize(QUESTION)[1:]
    alora_tokens = prefix + files.invocation + files.tokenize(QUESTION)[1:]
    with client.create_context(files.model, **EXACT) as ctx:
        _, first = run(ctx, base_tokens)
        assert first["cached_prompt_tokens"] == 0
        _, skill = run(ctx, alora_tokens, loras=[files.alora.path])
        # only the invocation and what follows is evaluated: the base model's cache of the
        # conversation is reused under the aLoRA
        assert skill["cached_prompt_tokens"] == len(prefix)
        _, back = run(ctx, base_tokens)
        assert back["cached_prompt_tokens"] == len(prefix)
        _, again = run(ctx, alora_tokens, loras=[files.alora.path])
        assert again["cached_prompt_tokens"] == len(prefix)
        # the same aLoRA request twice: its own tokens (under the aLoRA) are reused too
        _, twice = run(ctx, alora_tokens, loras=[files.alora.path])
        assert twice["cached_prompt_tokens"] == len(alora_tokens) - 1


def test_reports_and_limits(client: Client, files: Files) -> None:
    model = client.load_model(files.model)
    report = client.validate_lora(model, files.alora.path)
    assert report["compatible"] is True and report["problems"] == []
    assert report["adapter"]["alora"] is True
    assert report["adapter"]["alora_invocation_tokens"] == files.invocation
    assert client.capabilities()["features"]["alora"] is True
    with client.create_context(model, **EXACT) as ctx:
        ctx.set_loras([(files.alora.path, 1.0)])
        [entry] = ctx.loras()
        assert entry["alora_invocation_tokens"] == files.invocation
        with pytest.raises(LoraUnsupported) as e:
            ctx.set_lora(files.other.path)  # a second aLoRA in the stack
        assert e.value.details["reason"] == "several_aloras"
        assert len(ctx.loras()) == 1
        with pytest.raises(LoraUnsupported) as e:
            ctx.generate(PREFIX, max_tokens=1,
                         loras=[files.alora.path, files.other.path]).collect()
        assert e.value.details["reason"] == "several_aloras"
        with pytest.raises(LoraUnsupported) as e:
            ctx.embed("the cat")
        assert e.value.details == {"path": str(files.alora.path), "reason": "alora_embedding"}


def test_an_alora_from_the_config_file(tmp_path: Path, files: Files) -> None:
    config = tmp_path / "lorad.toml"
    config.write_text(f'[[models]]\npath = "{files.model}"\nalias = "tiny"\n\n'
                      f'[[contexts]]\nmodel = "tiny"\nid = "skill"\nn_ctx = 256\n'
                      f'kv_type = "f32"\nflash_attn = false\n'
                      f'loras = ["{files.alora.path}"]\n')
    d = start_daemon(tmp_path, [files.root], "--config", str(config))
    try:
        tokens = files.tokenize(PREFIX + INVOKE + QUESTION)
        with d.client() as c:
            got, _ = run(c.context("skill"), tokens)
        assert got == oracle(files, tokens, len(files.tokenize(PREFIX)))
    finally:
        assert d.stop() == 0, d.log()


def test_an_alora_through_the_http_door(tmp_path: Path, files: Files) -> None:
    import json

    import openai

    d = start_daemon(tmp_path, [files.root], "--model", str(files.model), "--alias", "tiny",
                     "--http", "127.0.0.1:0")
    try:
        url = next(json.loads(line)["http"] for line in d.log().splitlines()
                   if '"serving"' in line)
        api = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        prompt = PREFIX + INVOKE + QUESTION
        got = api.completions.create(model="tiny", prompt=prompt, max_tokens=N, temperature=0,
                                     extra_body={"lora": [{"path": str(files.alora.path)}]})
        with d.client() as c, c.create_context("tiny") as ctx:
            stream = ctx.generate(prompt, max_tokens=N, temperature=0,
                                  loras=[files.alora.path])
            want = stream.collect()
            assert stream.metrics["alora_invocation_start"] == len(files.tokenize(PREFIX))
            base = ctx.generate(prompt, max_tokens=N, temperature=0).collect()
        assert got.choices[0].text == want != base
    finally:
        assert d.stop() == 0, d.log()
