"""Speculative decoding (``prompt_lookup``) through a real daemon on a tiny generated model.

Greedy output with speculative decoding on must be token-for-token the output with it off, at
any draft depth, with logprobs, stop sequences, max_tokens cut mid-draft and LoRA stacks.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import tinymodels
from conftest import DaemonProcess, start_daemon
from lorad.client import BadRequest, Client, SpeculativeUnsupported

# Repetitive, input-grounded: n-gram drafts find matches in it.
PROMPT = "the cat and the dog and the cat and the dog and the cat and the dog and the"
LOOKUP = {"mode": "prompt_lookup"}


@pytest.fixture(scope="module")
def spec_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("spec")
    base = tinymodels.tiny_llama_tensors(seed=0)
    model = tinymodels.write_tiny_llama(root / "base.gguf", seed=0)
    lora = tinymodels.write_lora(root / "a.gguf", base, rank=4, alpha=8, seed=1, std=0.3).path
    return {"root": root, "model": model, "lora": lora}


@pytest.fixture(scope="module")
def spec_daemon(tmp_path_factory: pytest.TempPathFactory,
                spec_files: dict[str, Path]) -> Iterator[DaemonProcess]:
    d = start_daemon(tmp_path_factory.mktemp("spec-daemon"), [spec_files["root"]])
    yield d
    assert d.stop() == 0, d.log()


@pytest.fixture
def client(spec_daemon: DaemonProcess) -> Iterator[Client]:
    with spec_daemon.client() as c:
        yield c


def greedy(ctx, prompt: str = PROMPT, **params):
    params.setdefault("max_tokens", 80)
    stream = ctx.generate(prompt, temperature=0, **params)
    chunks = list(stream)
    tokens = [t for c in chunks for t in c.token_ids]
    logprobs = [lp for c in chunks for lp in c.logprobs or []]
    return tokens, logprobs, stream


@pytest.mark.parametrize("spec", [
    LOOKUP,
    {"mode": "prompt_lookup", "max_draft": 1},
    {"mode": "prompt_lookup", "max_draft": 64, "ngram_min": 1, "ngram_max": 1},
    {"mode": "prompt_lookup", "max_draft": 64, "ngram_min": 4, "ngram_max": 8},
])
def test_greedy_output_is_identical_at_any_depth(client: Client, spec_files, spec) -> None:
    with client.create_context(spec_files["model"], n_ctx=512) as off_ctx, \
         client.create_context(spec_files["model"], n_ctx=512) as on_ctx:
        off, _, s_off = greedy(off_ctx, speculative=False)
        on, _, s_on = greedy(on_ctx, speculative=spec)
    assert on == off
    assert s_off.metrics["speculative"] is False and s_off.metrics["drafted_tokens"] == 0
    m = s_on.metrics
    assert m["speculative"] is True and m["speculative_mode"] == "prompt_lookup"
    assert m["drafted_tokens"] > 0
    assert 0 < m["accepted_tokens"] <= m["drafted_tokens"]
    assert m["acceptance_rate"] == round(m["accepted_tokens"] / m["drafted_tokens"], 4)
    assert m["generated_tokens"] == len(on)


def test_logprobs_stop_and_max_tokens_mid_draft(client: Client, spec_files) -> None:
    deep = {"mode": "prompt_lookup", "max_draft": 64, "ngram_min": 1}
    with client.create_context(spec_files["model"], n_ctx=512) as ctx:
        off, lp_off, _ = greedy(ctx, speculative=False, logprobs=3)
        on, lp_on, _ = greedy(ctx, speculative=deep, logprobs=3)
        assert on == off
        assert [[t for t, _ in step] for step in lp_on] == [[t for t, _ in step] for step in lp_off]
        for a, b in zip(lp_on, lp_off, strict=True):
            assert all(abs(x[1] - y[1]) < 1e-3 for x, y in zip(a, b, strict=True))
        for n in (1, 2, 7, 13, 33):  # cut wherever a draft happens to end or not
            cut, _, stream = greedy(ctx, speculative=deep, max_tokens=n)
            assert cut == off[:n] and stream.finish_reason == "length"
        stop_text = ctx.detokenize(off[10:12])
        s_off = ctx.generate(PROMPT, max_tokens=80, temperature=0, stop=[stop_text])
        s_on = ctx.generate(PROMPT, max_tokens=80, temperature=0, stop=[stop_text],
                            speculative=deep)
        assert s_on.collect() == s_off.collect()
        assert s_on.finish_reason == s_off.finish_reason == "stop"


def test_with_a_lora_stack_and_the_cache_afterwards(client: Client, spec_files) -> None:
    with client.create_context(spec_files["model"], n_ctx=512,
                               loras=[(spec_files["lora"], 0.7)]) as ctx, \
         client.create_context(spec_files["model"], n_ctx=512,
                               loras=[(spec_files["lora"], 0.7)]) as fresh:
        expected, _, _ = greedy(fresh)
        on, _, stream = greedy(ctx, speculative=LOOKUP)
        assert on == expected and stream.metrics["speculative"] is True
        # Rejected draft tokens never stay in the KV cache: a later request sees a clean cache.
        again, _, _ = greedy(ctx, prompt=PROMPT + " cat", speculative=False)
        assert again == greedy(fresh, prompt=PROMPT + " cat")[0]


def test_context_default_and_request_override(client: Client, spec_files) -> None:
    with client.create_context(spec_files["model"], n_ctx=512, speculative=LOOKUP) as ctx:
        assert ctx.info["params"]["speculative"]["mode"] == "prompt_lookup"
        _, _, by_default = greedy(ctx, max_tokens=30)
        assert by_default.metrics["speculative"] is True
        _, _, off = greedy(ctx, max_tokens=30, speculative=False)
        assert off.metrics["speculative"] is False
        with pytest.raises(SpeculativeUnsupported) as info:  # the context's choice, refused
            ctx.generate(PROMPT, max_tokens=4, temperature=0.8).collect()
        assert info.value.details["reason"] == "sampling_not_implemented"
        # Off for this request: sampling runs normally.
        ctx.generate(PROMPT, max_tokens=4, temperature=0.8, speculative=False).collect()


@pytest.mark.parametrize(("spec", "reason"), [
    ({"mode": "telepathy"}, "unknown_mode"),
    ({"mode": "draft_model", "model": "x"}, "mode_not_implemented"),
    ({"mode": "mtp"}, "mode_not_implemented"),
    ({"mode": "prompt_lookup", "max_draft": 0}, "out_of_range"),
    ({"mode": "prompt_lookup", "max_draft": 65}, "out_of_range"),
    ({"mode": "prompt_lookup", "ngram_min": 3, "ngram_max": 2}, "out_of_range"),
    ({"mode": "prompt_lookup", "depth": 3}, "unknown_parameter"),
])
def test_unsupported_requests_fail_loudly(client: Client, spec_files, spec, reason) -> None:
    with client.create_context(spec_files["model"], n_ctx=128) as ctx:
        with pytest.raises(SpeculativeUnsupported) as info:
            ctx.generate(PROMPT, max_tokens=4, temperature=0, speculative=spec).collect()
        assert info.value.details["reason"] == reason
        with pytest.raises(SpeculativeUnsupported):
            client.create_context(spec_files["model"], n_ctx=128, speculative=spec)
    with client.create_context(spec_files["model"], n_ctx=128) as ctx:
        for params in ({"temperature": 0.5}, {"temperature": 0, "repeat_penalty": 1.1},
                       {"temperature": 0, "grammar": 'root ::= "a"'}):
            with pytest.raises(SpeculativeUnsupported):
                ctx.generate(PROMPT, max_tokens=4, speculative=LOOKUP, **params).collect()
        with pytest.raises(BadRequest):
            ctx.generate(PROMPT, max_tokens=4, speculative=True).collect()


def test_capabilities_list_the_modes(client: Client, spec_files) -> None:
    model = client.load_model(spec_files["model"])
    caps = client.capabilities()["speculative"]
    assert caps["modes"] == ["prompt_lookup"]
    assert caps["per_model"][model["id"]] == ["prompt_lookup"]
    assert set(caps["not_implemented"]) == {"draft_model", "mtp"}


def test_cli_and_serve_switches(spec_daemon: DaemonProcess, spec_files, tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "lorad.client.cli", "generate", PROMPT, "--endpoint",
         spec_daemon.endpoint, "--model", str(spec_files["model"]), "--temperature", "0",
         "--max-tokens", "30", "--speculative", "prompt_lookup", "--draft-max", "4"],
        capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "speculative prompt_lookup:" in out.stderr and "drafted tokens accepted" in out.stderr
    d = start_daemon(tmp_path, [spec_files["root"]], "--model", str(spec_files["model"]),
                     "--speculative", "prompt_lookup", "--draft-max", "5")
    try:
        with d.client() as c:
            ctx = c.context("default")
            assert ctx.info["params"]["speculative"] == {
                "mode": "prompt_lookup", "ngram_min": 1, "ngram_max": 3, "max_draft": 5}
            assert greedy(ctx, max_tokens=20)[2].metrics["speculative"] is True
    finally:
        assert d.stop() == 0, d.log()
    assert '"speculative": true' in d.log() and '"drafted_tokens"' in d.log()
