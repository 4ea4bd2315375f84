"""Speculative decoding (``prompt_lookup``) through a real daemon on a tiny generated model.

Greedy output with speculative decoding on must be token-for-token the output with it off, at
any draft depth, with logprobs, stop sequences, max_tokens cut mid-draft and LoRA stacks.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import tinymodels
from conftest import DaemonProcess, start_daemon
from lorad.client import BadRequest, Client, NotFound, SpeculativeUnsupported
from lorad.daemon import llama
from lorad.daemon.ngrams import Ngrams
from lorad.daemon.speculative import chain_probs, lookup_draft, verify

# Repetitive, input-grounded: n-gram drafts find matches in it.
PROMPT = "the cat and the dog and the cat and the dog and the cat and the dog and the"
LOOKUP = {"mode": "prompt_lookup"}


@pytest.fixture(scope="module")
def spec_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("spec")
    base = tinymodels.tiny_llama_tensors(seed=0)
    model = tinymodels.write_tiny_llama(root / "base.gguf", seed=0)
    lora = tinymodels.write_lora(root / "a.gguf", base, rank=4, alpha=8, seed=1, std=0.3).path
    rng = np.random.default_rng(5)
    noisy = {name: base[name] + rng.normal(0, 0.15, base[name].shape).astype(np.float32)
             for name in ("output.weight", "blk.1.ffn_down.weight")}
    vocab = tinymodels.default_vocab()
    other = tinymodels.TinyVocab(tokens=[*vocab.tokens[:-1], "zz-other"], scores=vocab.scores,
                                 token_types=vocab.token_types)
    return {
        "root": root, "model": model, "lora": lora,
        "copy": tinymodels.write_tiny_llama(root / "draft-copy.gguf", seed=0),
        "perturbed": tinymodels.write_tiny_llama(root / "draft-perturbed.gguf", seed=0,
                                                 weights=noisy),
        "other_vocab": tinymodels.write_tiny_llama(root / "draft-vocab.gguf", seed=0,
                                                   vocab=other),
    }


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
    {"mode": "prompt_lookup", "max_draft": 1, "adaptive": False},
    {"mode": "prompt_lookup", "max_draft": 64, "ngram_min": 1, "ngram_max": 1,
     "adaptive": False},
    {"mode": "prompt_lookup", "max_draft": 64, "ngram_min": 4, "ngram_max": 8,
     "adaptive": False},
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
    if spec.get("adaptive", True):  # it may stop drafting after rejections: timing decides
        assert 0 <= m["accepted_tokens"] <= m["drafted_tokens"], m
    else:  # a fixed length drafts whenever the n-gram matches: some drafts are accepted
        assert 0 < m["accepted_tokens"] <= m["drafted_tokens"], m
    assert m["acceptance_rate"] == round(m["accepted_tokens"] / m["drafted_tokens"], 4)
    assert m["generated_tokens"] == len(on)


def test_logprobs_stop_and_max_tokens_mid_draft(client: Client, spec_files) -> None:
    deep = {"mode": "prompt_lookup", "max_draft": 64, "ngram_min": 1}
    # Without flash attention: with it, llama.cpp computes a batch of many tokens (a deep
    # draft's verification) in f16 tiles whose rounding moves a log-probability by up to
    # about 1e-2 against the same token decoded alone (measured; the tokens are the same).
    with client.create_context(spec_files["model"], n_ctx=512, flash_attn=False) as ctx:
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
        sampled = ctx.generate(PROMPT, max_tokens=30, temperature=0.8, seed=3)
        sampled.collect()
        assert sampled.metrics["speculative"] is True  # sampling runs speculatively too
        with pytest.raises(SpeculativeUnsupported) as info:  # the context's choice, refused
            ctx.generate(PROMPT, max_tokens=4, temperature=0, repeat_penalty=1.2).collect()
        assert info.value.details["reason"] == "sampler_not_supported"
        # Off for this request: the penalty runs normally.
        ctx.generate(PROMPT, max_tokens=4, temperature=0, repeat_penalty=1.2,
                     speculative=False).collect()


@pytest.mark.parametrize(("spec", "reason"), [
    ({"mode": "telepathy"}, "unknown_mode"),
    ({"mode": "draft_model"}, "missing_parameter"),
    ({"mode": "mtp"}, "no_mtp_heads"),
    ({"mode": "prompt_lookup", "max_draft": 0}, "out_of_range"),
    ({"mode": "prompt_lookup", "max_draft": 65}, "out_of_range"),
    ({"mode": "draft_model", "model": "x", "p_min": 1.5}, "out_of_range"),
    ({"mode": "prompt_lookup", "ngram_min": 3, "ngram_max": 2}, "out_of_range"),
    ({"mode": "prompt_lookup", "depth": 3}, "unknown_parameter"),
    ("other_vocab", "vocab_mismatch"),
    ("model", "same_model"),
])
def test_unsupported_requests_fail_loudly(client: Client, spec_files, spec, reason) -> None:
    if isinstance(spec, str):
        spec = {"mode": "draft_model", "model": str(spec_files[spec])}
    with client.create_context(spec_files["model"], n_ctx=128) as ctx:
        with pytest.raises(SpeculativeUnsupported) as info:
            ctx.generate(PROMPT, max_tokens=4, temperature=0, speculative=spec).collect()
        assert info.value.details["reason"] == reason
        assert ctx.generate(PROMPT, max_tokens=4, temperature=0).collect()  # still works
    before = len(client.list_contexts())
    with pytest.raises(SpeculativeUnsupported):
        client.create_context(spec_files["model"], n_ctx=128, speculative=spec)
    assert len(client.list_contexts()) == before


def test_other_refusals(client: Client, spec_files) -> None:
    with client.create_context(spec_files["model"], n_ctx=128) as ctx:
        for params in ({"repeat_penalty": 1.1}, {"grammar": 'root ::= "a"'}):
            with pytest.raises(SpeculativeUnsupported):
                ctx.generate(PROMPT, max_tokens=4, temperature=0, speculative=LOOKUP,
                             **params).collect()
        with pytest.raises(BadRequest):
            ctx.generate(PROMPT, max_tokens=4, speculative=True).collect()
        with pytest.raises(NotFound):
            ctx.generate(PROMPT, max_tokens=4, speculative={"mode": "draft_model",
                                                            "model": "no-such-model"}).collect()


def test_capabilities_list_the_modes(client: Client, spec_files) -> None:
    model = client.load_model(spec_files["model"])
    caps = client.capabilities()["speculative"]
    assert caps["modes"] == ["prompt_lookup", "draft_model", "mtp"] and caps["sampling"] is True
    modes = caps["per_model"][model["id"]]
    assert modes["prompt_lookup"]["available"] and modes["draft_model"]["available"]
    assert modes["mtp"] == {"available": False, "reason": "the model has no MTP heads"}


# -- draft model -------------------------------------------------------------------------------
def draft(spec_files, which: str, **params) -> dict:
    return {"mode": "draft_model", "model": str(spec_files[which]), **params}


@pytest.mark.parametrize("which", ["copy", "perturbed"])
def test_draft_model_greedy_is_identical(client: Client, spec_files, which: str) -> None:
    with client.create_context(spec_files["model"], n_ctx=512) as ctx:
        off, _, _ = greedy(ctx, speculative=False)
        for depth in (1, 4, 16):
            on, _, stream = greedy(ctx, speculative=draft(spec_files, which, max_draft=depth,
                                                          p_min=0.0, adaptive=False))
            assert on == off
            m = stream.metrics
            assert m["speculative_mode"] == "draft_model" and m["drafted_tokens"] > 0
            if which == "copy":
                assert m["acceptance_rate"] == 1.0
            else:
                assert 0 < m["acceptance_rate"] < 1
        cut, _, _ = greedy(ctx, speculative=draft(spec_files, which, max_draft=16), max_tokens=9)
        assert cut == off[:9]
        info = [c for c in client.list_contexts() if c["id"] == ctx.id]
        assert info  # the draft context belongs to this context: no other context appears
    # Closing the target context frees its draft context.
    draft_model = next(m for m in client.list_models() if m["path"] == str(spec_files[which]))
    assert draft_model["contexts"] == []


def test_draft_model_with_a_lora_stack(client: Client, spec_files) -> None:
    stack = [(spec_files["lora"], 0.7)]
    with client.create_context(spec_files["model"], n_ctx=512, loras=stack) as ctx:
        off, _, _ = greedy(ctx, speculative=False)
        on, _, stream = greedy(ctx, speculative=draft(spec_files, "copy", p_min=0.0))
        assert on == off
        # The draft runs without the adapters: it now proposes the base model's tokens.
        assert stream.metrics["acceptance_rate"] < 1


# -- sampling: the output distribution is the target's own ------------------------------------
def test_verify_keeps_the_target_distribution() -> None:
    """The acceptance rule, on a 5-token vocabulary: the first produced token is distributed as
    the target's p whatever the draft's q (checked to 3 sigma of the binomial error)."""
    params = llama.SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    logits = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05]))
    p = chain_probs(logits, params)
    assert np.allclose(p, [0.5, 0.2, 0.15, 0.1, 0.05])
    rows = np.stack([logits, logits])
    rng = np.random.default_rng(0)
    n = 20000
    for q in (None, np.array([0.05, 0.05, 0.1, 0.2, 0.6]), np.array([0.0, 1.0, 0.0, 0.0, 0.0])):
        counts = np.zeros(5)
        for _ in range(n):
            if q is None:
                d = 3  # an n-gram draft: deterministic
            else:
                d = int(rng.choice(5, p=q))
            counts[verify(rows, [d], None if q is None else [q], params, rng)[0]] += 1
        assert np.all(np.abs(counts / n - p) <= 3 * np.sqrt(p * (1 - p) / n) + 1e-9), counts


def test_chain_probs_mirror_the_sampler_chain() -> None:
    params = llama.SamplingParams(temperature=0.5, top_k=3, top_p=0.9, min_p=0.2)
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.06, 0.04]))
    p = chain_probs(logits, params)
    # top_k keeps 3; top_p (on those, renormalised: .444 .333 .222) keeps 3 (0.778 < 0.9);
    # min_p 0.2: .222 >= .2 * .444 keeps all 3; temperature 0.5 squares them.
    kept = np.array([0.4, 0.3, 0.2]) ** 2
    assert np.allclose(p[:3], kept / kept.sum()) and p[3] == p[4] == 0


def chi_square_critical(df: int, z: float = 3.09) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile; z = 3.09 is p = 0.001."""
    return df * (1 - 2 / (9 * df) + z * np.sqrt(2 / (9 * df))) ** 3


def test_speculative_sampling_matches_plain_sampling(client: Client, spec_files) -> None:
    """Token frequencies at the first speculative position over many seeded samples, on
    (perturbed draft model, every token drafted) versus off: a chi-square homogeneity test at
    p = 0.001. The draft's own distribution differs enough that accepting drafts blindly fails
    this test (see the last assertion)."""
    n = 300
    spec = draft(spec_files, "perturbed", max_draft=3, p_min=0.0)
    prompt = "the cat and the"

    def second_tokens(ctx, speculative) -> list[int]:
        out = []
        for seed in range(n):
            stream = ctx.generate(prompt, max_tokens=2, temperature=1.0, seed=seed,
                                  speculative=speculative)
            tokens = [t for c in stream for t in c.token_ids]
            out.append(tokens[1])
        return out

    with client.create_context(spec_files["model"], n_ctx=128) as ctx:
        off = second_tokens(ctx, False)
        on = second_tokens(ctx, spec)
    with client.create_context(spec_files["perturbed"], n_ctx=128) as draft_ctx:
        blind = second_tokens(draft_ctx, False)  # what always accepting the draft would give

    def chi2(a: list[int], b: list[int]) -> tuple[float, int]:
        tokens = sorted(set(a) | set(b))
        table = np.array([[a.count(t) for t in tokens], [b.count(t) for t in tokens]], float)
        big = table.sum(axis=0) >= 10  # pool rare tokens so expected counts stay >= 5
        table = np.column_stack([table[:, big], table[:, ~big].sum(axis=1)])
        table = table[:, table.sum(axis=0) > 0]
        expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0) / table.sum()
        return float(((table - expected) ** 2 / expected).sum()), table.shape[1] - 1

    stat, df = chi2(on, off)
    assert stat < chi_square_critical(df), (stat, df)
    stat, df = chi2(blind, off)
    assert stat > chi_square_critical(df), (stat, df)


def test_lookup_draft() -> None:
    assert lookup_draft([1, 2, 3, 4, 1, 2], 1, 3, 5) == ([3, 4, 1, 2], 2, False)
    assert lookup_draft([1, 2, 3, 4, 1, 2], 1, 3, 1) == ([3], 2, False)
    assert lookup_draft([5, 6, 7], 1, 3, 4) == ([], 0, False)
    assert lookup_draft([1, 2, 3], 1, 3, 0) == ([], 0, False)
    # the agreement is measured beyond ngram_max (up to `longest`): a copied passage agrees
    # over many tokens, which makes its drafts trusted sooner
    passage = [10, 11, 12, 13, 14, 15, 16, 17]
    assert lookup_draft([*passage, 99, *passage[:6]], 1, 3, 2) == ([16, 17], 6, False)
    assert lookup_draft([*passage, 99, *passage[:6]], 1, 3, 2, longest=4) == ([16, 17], 4, False)


def scan(history: list[int], ngram_min: int, ngram_max: int, n: int) -> tuple[list[int], int]:
    """The lookup as a scan of the history (the reference for the index)."""
    size = len(history)
    for g in range(min(ngram_max, size - 1), ngram_min - 1, -1):
        for start in range(size - g - 1, -1, -1):
            if history[start:start + g] == history[size - g:]:
                matched = g
                while (matched < 16 and start + g - matched - 1 >= 0
                       and history[start + g - matched - 1] == history[size - matched - 1]):
                    matched += 1
                return history[start + g:start + g + n], matched
    return [], 0


def test_the_ngram_index_finds_what_a_scan_finds() -> None:
    from lorad.daemon.ngrams import Ngrams

    rng = np.random.default_rng(3)
    for _ in range(400):
        history = [int(t) for t in rng.integers(0, 4, int(rng.integers(1, 60)))]
        lo = int(rng.integers(1, 4))
        hi = int(rng.integers(lo, 6))
        found, matched, from_memory = lookup_draft(history, lo, hi, 5)
        assert (found, matched) == scan(history, lo, hi, 5) and not from_memory
        grown = Ngrams(range(lo, hi + 1))  # token by token, as a request's output comes
        for t in history:
            grown.append(t)
        assert lookup_draft(grown.tokens, lo, hi, 5, index=grown)[:2] == (found, matched)


def test_memory_drafts_where_it_agrees_longer_than_the_request() -> None:
    from lorad.daemon.ngrams import END, MEMORY_PROMPT, Memory

    memory = Memory()
    prompt = list(range(100, 130))
    answer = [7, 8, 9, 10, 11, 12]
    memory.add(prompt, answer)
    assert memory.tokens == [*prompt[-MEMORY_PROMPT:], *answer, END]
    # the same prompt again, with one token of output: the memory agrees over all of it
    history = [*prompt, 7]
    found, matched, from_memory = lookup_draft(history, 1, 3, 4, memory=memory.index(range(1, 4)))
    assert (found, from_memory) == ([8, 9, 10, 11], True) and matched == 16
    # where the request's own text agrees at least as long, it wins
    history = [5, 6, 7, 8, 1, 5, 6, 7]
    assert lookup_draft(history, 1, 3, 2, memory=memory.index(range(1, 4))) == ([8, 1], 3, False)
    # an output never seen: nothing
    assert lookup_draft([1, 2, 3, 4], 1, 3, 2, memory=memory.index(range(1, 4)))[0] == []
    memory.add(prompt, [])  # a request that generated nothing leaves nothing
    assert len(memory) == MEMORY_PROMPT + len(answer) + 1


LOOP_PROMPT = list(range(100, 120))


def looped_memory() -> Ngrams:
    """The indexed memory of an answer that looped back to its beginning (it ends with its
    prompt's last 3 tokens and the answer's first), then of another request."""
    from lorad.daemon.ngrams import Memory

    memory = Memory()
    memory.add(LOOP_PROMPT, [7, 8, 9, 10, 11, *LOOP_PROMPT[-3:], 7, 8, 9])
    memory.add([50, 51, 52], [53])
    return memory.index(range(1, 4))


def test_memory_drafts_from_the_occurrence_that_agrees_longest() -> None:
    """The same prompt sent again drafts from the occurrence after the remembered prompt (it
    agrees longer and goes on), not from the newest one, where the output ended."""
    index = looped_memory()
    assert index.find(tuple(LOOP_PROMPT[-3:])) == 16 + 5  # the newest start: the output's end
    found, matched, from_memory = lookup_draft([*LOOP_PROMPT], 1, 3, 8, memory=index)
    assert (found, matched, from_memory) == ([7, 8, 9, 10, 11, 117, 118, 119], 16, True)


def test_memory_drafts_stop_where_an_earlier_output_ended() -> None:
    """Where the occurrence that agrees longest ends an output, the draft stops there, never
    running on into the next request's prompt, and an n-gram that only ends an output is not
    drafted from."""
    index = looped_memory()
    found, matched, from_memory = lookup_draft([10, 11, *LOOP_PROMPT[-3:]], 1, 3, 8,
                                               memory=index)
    assert (found, matched, from_memory) == ([7, 8, 9], 5, True)
    # [8, 9] last ended the output: the history's own occurrence drafts instead
    assert lookup_draft([8, 9, 4, 8, 9], 1, 3, 2, memory=index) == ([4, 8], 2, False)


def test_a_memory_index_keeps_the_last_starts_of_each_ngram() -> None:
    """Built at once or token by token, a memory's index holds the newest ``MEMORY_STARTS``
    starts of each n-gram that has a token after it, as a scan finds them."""
    from lorad.daemon.ngrams import MEMORY_STARTS, RecentNgrams

    rng = np.random.default_rng(5)
    for k in range(200):
        tokens = [int(t) for t in rng.integers(0, 3, int(rng.integers(1, 50)) if k > 3 else k)]
        sizes = range(1, int(rng.integers(1, 4)) + 1) if k > 3 else range(1, 4)
        whole, grown = RecentNgrams(sizes, tokens), RecentNgrams(range(1, 2))
        for t in tokens:
            grown.append(t)
        grown.cover(sizes)
        for g in sizes:
            for gram in {tuple(tokens[i:i + g]) for i in range(len(tokens) - g + 1)}:
                starts = [i for i in range(len(tokens) - g)
                          if tuple(tokens[i:i + g]) == gram][-MEMORY_STARTS:]
                assert whole.starts(gram) == grown.starts(gram) == starts
                assert whole.find(gram) == (starts[-1] if starts else None)


def test_memory_is_bounded_and_keeps_the_newest() -> None:
    from lorad.daemon.ngrams import END, Memory

    memory = Memory(limit=100)
    for k in range(10):
        memory.add([], [1000 + 20 * k + i for i in range(20)])
        assert len(memory) <= 100
        index = memory.index(range(1, 3))
        assert index.tokens == memory.tokens
    assert memory.tokens[-2:] == [1000 + 20 * 9 + 19, END]  # the newest stay
    assert memory.index(range(1, 3)).find((1000,)) is None  # the oldest went
    assert memory.pending(range(1, 3)) == 0
    assert memory.pending(range(1, 5)) == 2 * len(memory)  # sizes new to it: all tokens again


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
                "mode": "prompt_lookup", "ngram_min": 1, "ngram_max": 3, "max_draft": 5,
                "adaptive": True}
            assert greedy(ctx, max_tokens=20)[2].metrics["speculative"] is True
    finally:
        assert d.stop() == 0, d.log()
    assert '"speculative": true' in d.log() and '"drafted_tokens"' in d.log()


def test_a_request_sent_again_drafts_from_the_contexts_memory(client: Client, spec_files) -> None:
    prompt = "dog the and cat"  # short and not repetitive: little to copy from the prompt
    # (a fixed depth: what is drafted does not depend on the machine's step times)
    spec = {"mode": "prompt_lookup", "ngram_min": 2, "adaptive": False, "max_draft": 8}
    with client.create_context(spec_files["model"], n_ctx=512) as ctx, \
         client.create_context(spec_files["model"], n_ctx=512) as fresh:
        off, _, _ = greedy(fresh, prompt=prompt, speculative=False, max_tokens=60)
        first, _, s1 = greedy(ctx, prompt=prompt, speculative=spec, max_tokens=60)
        second, _, s2 = greedy(ctx, prompt=prompt, speculative=spec, max_tokens=60)
        other, _, s3 = greedy(fresh, prompt=prompt, speculative=spec, max_tokens=60)
    assert first == second == other == off
    assert s1.metrics["memory_drafted_tokens"] == 0  # a new context remembers nothing
    m = s2.metrics
    assert 0 < m["memory_drafted_tokens"] <= m["drafted_tokens"], m
    assert m["accepted_tokens"] > s1.metrics["accepted_tokens"], (m, s1.metrics)
    # memory is per context, and a request with speculation off fills it too
    assert s3.metrics["memory_drafted_tokens"] > 0, s3.metrics


def test_cancel_mid_stream_leaves_a_clean_cache(client: Client, spec_files) -> None:
    deep = {"mode": "prompt_lookup", "max_draft": 16}
    with client.create_context(spec_files["model"], n_ctx=512) as ctx, \
            client.create_context(spec_files["model"], n_ctx=512) as fresh:
        stream = ctx.generate(PROMPT, max_tokens=200, temperature=0, speculative=deep, credit=1)
        received = 0
        for chunk in stream:
            received += len(chunk.token_ids)
            if received == 5:
                stream.cancel()  # the loop goes on to the cancelled end and its metrics
        assert stream.finish_reason == "cancelled"
        # Stopped within one verification step: at most one draft (16) + 1 past what we read,
        # give or take the one item of credit in flight.
        assert stream.metrics["generated_tokens"] <= received + 17 + 1
        assert greedy(ctx, prompt=PROMPT + " dog")[0] == greedy(fresh, prompt=PROMPT + " dog")[0]


def test_cli_refuses_orphan_draft_options_and_runs_a_draft_model(spec_daemon: DaemonProcess,
                                                                 spec_files) -> None:
    def generate(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "lorad.client.cli", "generate", PROMPT, "--endpoint",
             spec_daemon.endpoint, "--model", str(spec_files["model"]), "--temperature", "0",
             "--max-tokens", "20", *extra], capture_output=True, text=True, timeout=60)

    for extra in (["--draft-max", "4"], ["--speculative", "off", "--draft-max", "4"],
                  ["--speculative", "prompt_lookup", "--draft-model", "x"]):
        out = generate(*extra)
        assert out.returncode == 2 and "--draft-" in out.stderr, (extra, out.stderr)
    out = generate("--speculative", "draft_model", "--draft-model",
                   str(spec_files["copy"]), "--draft-max", "4")
    assert out.returncode == 0, out.stderr
    assert "speculative draft_model:" in out.stderr


# -- the adaptive depth (pure) ---------------------------------------------------------------
def test_adaptive_depth_weighs_acceptance_against_what_a_draft_token_costs() -> None:
    from lorad.daemon.speculative import PROBE_EVERY, Drafter

    cheap = Drafter("prompt_lookup", 8, cost=lambda d: 1 + 0.05 * d)
    for _ in range(10):
        cheap.record(4, 4)  # every draft token accepted
    assert cheap.choose_depth(64) == 8  # drafting pays: as deep as allowed
    assert cheap.choose_depth(3) == 3  # ... within the room left
    costly = Drafter("prompt_lookup", 8, cost=lambda d: 1 + 1.0 * d)  # a token = a step
    for _ in range(10):
        costly.record(4, 4)
    assert costly.choose_depth(64) == 0  # never pays: the drafts would cost more than they give
    # A draft model (its proposal costs its own decoding: no free judgement) probes. (A token
    # costs 0.15 of a step: cheap enough that probes come at their own interval, within
    # PROBE_BUDGET.)
    rejected = Drafter("draft_model", 8, cost=lambda d: 1 + 0.15 * d)
    assert rejected.choose_depth(64) >= 1  # the prior (p = 0.7) drafts
    for _ in range(8):
        rejected.record(2, 0)
    assert rejected.p_accept() < 0.2
    # one accepted token would make drafting pay again: the first chance probes at once, the
    # next one PROBE_EVERY later, or later where PROBE_BUDGET asks (here 0.15 / 0.01 = 15)
    gap = max(PROBE_EVERY, 15)
    depths = [rejected.choose_depth(64) for _ in range(gap + 1)]
    assert depths == [1] + [0] * (gap - 1) + [1]
    rejected.record(1, 0)  # the probe failed: the next one comes twice as late
    depths = [rejected.choose_depth(64) for _ in range(2 * PROBE_EVERY)]
    assert depths.count(1) == 1 and depths[-1] == 1
    # where even an accepted probe would leave drafting unpaid (prior 0.3 here), there is no
    # probe at all
    common = Drafter("draft_model", 8, cost=lambda d: 1 + 0.9 * d, _bucket=0)
    assert [common.choose_depth(64) for _ in range(300)] == [0] * 300
    # n-gram drafts never probe: they are judged for free (below)
    ngram = Drafter("prompt_lookup", 8, cost=lambda d: 1 + 0.15 * d, _bucket=1, _matched=2)
    for _ in range(8):
        ngram.record(2, 0)
    assert [ngram.choose_depth(64) for _ in range(300)] == [0] * 300
    fixed = Drafter("prompt_lookup", 8, adaptive=False, cost=lambda d: 1 + 1.0 * d)
    fixed.record(8, 0)
    assert fixed.choose_depth(64) == 8 and fixed.choose_depth(5) == 5


def test_a_draft_in_a_wide_batch_must_pay_for_every_sequence_it_slows() -> None:
    """In a step of ``width`` sequences, what a draft adds to the step's time every one of
    them waits for: the bar is ``width`` times higher than alone. A draft that pays alone (a
    token costing 0.1 of a step, accepted 7 times in 10) does not pay beside 7 others, and a
    near-certain one (a copy) still does while its tokens are cheap enough."""
    from lorad.daemon.speculative import Drafter

    def drafter(width: int, cost: float) -> Drafter:
        d = Drafter("prompt_lookup", 8, cost=lambda n: 1 + cost * n, width=lambda: width,
                    _bucket=2)
        return d

    assert drafter(1, 0.1).choose_depth(64) >= 1  # the prior (p = 0.7) pays alone
    assert drafter(8, 0.1).choose_depth(64) == 0  # 8 x 0.1 per token: 0.7 is not enough
    copy = drafter(8, 0.02)
    for _ in range(30):
        copy.record(8, 8)  # everything accepted
    assert copy.choose_depth(64) == 8
    costly = drafter(8, 0.15)
    for _ in range(30):
        costly.record(8, 8)
    assert costly.choose_depth(64) == 0  # 8 x 0.15 = 1.2 steps a token: never pays
    # no optimistic prior beside others: a first sight of a 16-token agreement (prior 0.98)
    # drafts alone, not beside 3 others, until the context's own judged tokens show it pays
    def fresh(width: int) -> Drafter:
        return Drafter("prompt_lookup", 8, cost=lambda n: 1 + 0.15 * n, width=lambda: width,
                       _bucket=4, _matched=16)

    assert fresh(1).choose_depth(64) == 8
    seen = fresh(4)
    assert seen.p_wide() == 0.5 and seen.choose_depth(64) == 0
    for _ in range(12):
        seen._judge([(16, True)])  # its first token judged right (drafted or not), 12 steps
    assert seen.p_wide() > 0.95 and seen.choose_depth(64) >= 4


def test_step_cost_is_learnt_from_step_times() -> None:
    from lorad.daemon.batching import StepCost

    cost = StepCost()
    assert cost.relative(1, 1) == pytest.approx(1 + StepCost.PRIOR)  # nothing seen: the prior
    for _ in range(20):
        cost.observe(1, 0.020)
    assert cost.relative(1, 1) == pytest.approx(1 + StepCost.PRIOR)  # one size: prior's shape
    for _ in range(20):
        cost.observe(2, 0.040)  # a second token costs a whole step (as on these CPUs) ...
    assert cost.relative(1, 1) == pytest.approx(2.0)
    # ... but beyond the sizes seen, tokens are assumed to cost only the prior (optimistic:
    # a deep draft gets tried when its acceptance would pay, then its cost is known)
    assert cost.time(8) == pytest.approx(0.040 + 6 * StepCost.PRIOR * 0.020)
    for _ in range(20):
        cost.observe(8, 0.100)  # 8 tokens: 100 ms
    assert cost.time(5) == pytest.approx(0.070)  # interpolated between the sizes seen
    assert cost.time(12) == pytest.approx(0.100 + 4 * min(StepCost.PRIOR * 0.020, 0.060 / 6))
    # a size off the grid (a request's last step) costs what it was seen to cost, but is no
    # point to interpolate from: it is dearer than the sizes around it
    for _ in range(3):
        cost.observe(7, 0.110)
    assert cost.time(7) == pytest.approx(0.110)
    assert cost.time(6) == pytest.approx(0.080) and cost.time(12) > 0.100
    assert cost.table() == [[1, 20.0], [2, 40.0], [7, 110.0], [8, 100.0]]
    cost.observe(1, 1.0)  # a spike on a shared machine moves the median, not the mean
    assert cost.time(1) == pytest.approx(0.020)
    only_odd = StepCost()  # no size on the grid seen yet: the others are the points
    only_odd.observe(5, 0.050)
    only_odd.observe(7, 0.070)
    assert only_odd.time(6) == pytest.approx(0.060)


def test_a_long_agreement_is_trusted_with_a_deeper_draft_than_a_common_word() -> None:
    from lorad.daemon.speculative import Drafter

    passage = list(range(100, 140))
    copying = Drafter("prompt_lookup", 16, cost=lambda d: 1 + 0.35 * d)
    copying.start([*passage, 1, *passage[:20]])  # 20 tokens agree with the passage
    draft = copying.draft(64)
    assert len(draft) >= 3 and draft == passage[20:20 + len(draft)]
    chatting = Drafter("prompt_lookup", 16, cost=lambda d: 1 + 0.35 * d)
    chatting.start([5, 7, 8, 9, 5])  # a common word seen before: one token agrees
    assert chatting.draft(64) == []  # its prior (0.3) does not pay (and n-gram drafts never
    # probe)
    copying.record(len(draft), 0)  # estimates are per agreement length: this one drops ...
    assert copying.p_accept() < 0.9
    assert chatting.p_accept(0) == pytest.approx(0.3)  # ... the others keep theirs


def test_a_contexts_acceptance_carries_into_its_next_request() -> None:
    """A context hands its acceptance counts to each request's n-gram drafter: a passage that
    was copied well is trusted with a deep draft from the next request's first step, where a
    fresh estimate (the prior) drafts shallower."""
    from lorad.daemon.speculative import Acceptance, Drafter

    passage = list(range(100, 180))
    kept = Acceptance()

    def drafter(acceptance: Acceptance | None) -> Drafter:
        d = Drafter("prompt_lookup", 64, cost=lambda d: 1 + 0.2 * d,
                    **({"acceptance": acceptance} if acceptance is not None else {}))
        d.start([*passage, 1, *passage[:20]])  # agrees over 16+ tokens
        return d

    fresh_depth = len(drafter(None).draft(64))
    earlier = drafter(kept)
    for _ in range(4):  # a request that copied: its drafts all accepted
        n = len(earlier.draft(64))
        earlier.record(n, n)
    assert kept.trials[4] > 2.0  # the context's counts, not the request's own
    assert len(drafter(kept).draft(64)) > fresh_depth > 0


def test_each_draft_token_has_the_estimate_of_its_own_agreement() -> None:
    from lorad.daemon.speculative import BUCKET_PRIORS, Drafter

    # A draft whose first token agrees over 12 tokens: its 5th agrees over 16 once the first 4
    # are accepted, and has the (higher) estimate of 16+ tokens of agreement.
    copy = Drafter("prompt_lookup", 32, cost=lambda d: 1 + 0.15 * d, _bucket=3, _matched=12)
    flat = Drafter("prompt_lookup", 32, cost=lambda d: 1 + 0.15 * d, _bucket=3)  # all 8-15's
    assert copy.choose_depth(32) > 2 * flat.choose_depth(32) > 0
    # judged token by token: 4 accepted at 12-15 tokens of agreement, then 6 accepted and the
    # seventh rejected at 16+
    copy.record(12, 10)
    assert copy.p_accept(3) > BUCKET_PRIORS[3]
    assert copy.p_accept(4) < BUCKET_PRIORS[4]
    assert copy.p_accept(2) == pytest.approx(BUCKET_PRIORS[2])  # no token of 4-7: untouched
    assert (copy.drafted, copy.accepted) == (12, 10)
    # each length has its own record too, drawn toward its bucket's: 16+ saw 6 accepted and
    # one rejected, 12 one accepted
    assert copy.length_estimate(16) < copy.p_accept(4) < copy.length_estimate(12) <= 1.0
    assert copy.length_estimate(5) == pytest.approx(BUCKET_PRIORS[2])


def test_ngram_proposals_are_judged_without_drafting_them() -> None:
    from lorad.daemon.speculative import BUCKET_PRIORS, Drafter

    # Open text where a two-token agreement keeps coming back and keeps being right: the
    # prior (0.45) does not pay at this cost, but every step judges the proposal's next token
    # against the token produced, so drafting starts without one token spent on finding out.
    drafter = Drafter("prompt_lookup", 8, cost=lambda d: 1 + 0.5 * d)
    drafter.start([1, 2, 3, 9, 1, 2])  # "1 2" was followed by 3
    assert drafter.draft(64) == [] and drafter._found[:1] == [3]
    assert drafter.length_estimate(2) == pytest.approx(BUCKET_PRIORS[1])
    assert drafter.choose_depth(4) == 0
    depths = []
    for _ in range(6):
        drafter.record(0, 0, 3)  # ... and the step produced 3 again
        depths.append(drafter.choose_depth(4))
    assert drafter.drafted == 0 and drafter.length_estimate(2) > 0.8
    assert depths[-1] >= 2
    # Where the proposal's next token is wrong, its length's estimate drops and nothing is
    # drafted (no probe spends a step on it)
    wrong = Drafter("prompt_lookup", 8, cost=lambda d: 1 + 0.5 * d)
    wrong.start([1, 2, 3, 9, 1, 2])
    for _ in range(50):
        assert wrong.draft(64) == []
        wrong.record(0, 0, 4)
    assert wrong.length_estimate(2) < 0.05 and wrong.drafted == 0
    # a drafted token that was accepted, then the proposal's next one judged by the step's own
    # token: the draft's two tokens are judged, and the estimate of their lengths rises
    taken = Drafter("prompt_lookup", 8, cost=lambda d: 1 + 0.35 * d, _found=[5, 6, 7],
                    _matched=8, _bucket=3)
    taken.record(1, 1, 6)
    assert (taken.acceptance.length_trials[8:11] == [1.0, 1.0, 0.0]
            and taken.acceptance.length_hits[9] == 1.0)


def test_a_draft_models_own_time_counts_in_the_depth() -> None:
    from lorad.daemon.speculative import Drafter

    free = Drafter("draft_model", 8, cost=lambda d: 1 + 0.2 * d, step_seconds=lambda: 0.030)
    slow = Drafter("draft_model", 8, cost=lambda d: 1 + 0.2 * d, step_seconds=lambda: 0.030)
    slow.draft_seconds = 0.030  # the draft model is as slow as the target
    for d in (free, slow):
        for _ in range(10):
            d.record(4, 4)
    assert free.choose_depth(64) == 8
    assert slow.choose_depth(64) == 0  # every accepted token costs a whole step to draft


def test_no_probe_where_even_accepted_drafts_could_not_pay() -> None:
    from lorad.daemon.speculative import PROBE_EVERY, Drafter

    slow = Drafter("draft_model", 8, cost=lambda d: 1 + 0.5 * d, step_seconds=lambda: 0.030)
    slow.draft_seconds = 0.060  # drafting a token costs two steps: nothing can pay
    assert [slow.choose_depth(64) for _ in range(4 * PROBE_EVERY)] == [0] * (4 * PROBE_EVERY)


def test_probes_are_rarer_where_they_are_dear() -> None:

    from lorad.daemon.speculative import PROBE_BUDGET, PROBE_EVERY, Drafter

    dear = Drafter("draft_model", 8, cost=lambda d: 1 + 0.3 * d)  # a token: 0.3 of a step
    for _ in range(3):
        dear.record(2, 0)
    assert dear._best([dear.p_accept()] * 64) == 0 < dear._best([dear._p_if_accepted()] * 64)
    depths = [dear.choose_depth(64) for _ in range(400)]
    probes = [k for k, d in enumerate(depths) if d]
    assert len(probes) >= 3
    gaps = [b - a for a, b in itertools.pairwise(probes)]
    assert min(gaps) >= round(0.3 / PROBE_BUDGET) > PROBE_EVERY  # a failing probe costs <= its
    # budget


def test_draft_depths_make_steps_of_sizes_on_the_grid() -> None:
    from lorad.daemon.batching import whole
    from lorad.daemon.speculative import Drafter

    assert [n for n in range(1, 100) if whole(n)] == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64,
                                                      96]
    copying = Drafter("prompt_lookup", 64, cost=lambda d: 1 + 0.3 * d,
                      whole=lambda d: whole(1 + d), _bucket=4, _matched=16)
    anywhere = Drafter("prompt_lookup", 64, cost=lambda d: 1 + 0.3 * d, _bucket=4, _matched=16)
    for drafter in (copying, anywhere):
        for _ in range(6):
            drafter.record(8, 8)  # a passage being copied: deep drafts pay
    free = [anywhere.choose_depth(limit) for limit in range(1, 65)]
    sized = [copying.choose_depth(limit) for limit in range(1, 65)]
    assert all(d > 0 for d in free + sized)
    # ... on the grid where the room would allow more (a step of the draft and the token
    # before it), all of the room where it is less than max_draft
    assert all(whole(d + 1) or d == limit for limit, d in enumerate(sized, 1))
    assert sized[-1] == 63 and any(not whole(d + 1) for d in free)
    assert sized[9] == 10  # the room left (max_tokens or n_ctx) is 10 tokens


def test_the_step_that_could_finish_the_request_counts_what_a_shorter_draft_leaves() -> None:
    from lorad.daemon.speculative import Drafter

    def cost(d: int) -> float:  # 49 draft tokens a little dearer per token than 47
        return 1 + 0.3 * d + (0.4 if d == 49 else 0.0)

    copying = Drafter("prompt_lookup", 64, cost=cost, _bucket=4, _matched=16)
    for _ in range(6):
        copying.record(8, 8)
    assert copying.choose_depth(49) == 47  # more to come after: the cheaper rate
    copying._room = 49  # ... but 49 finish the request, where 47 leave 2 to one more step
    assert copying.choose_depth(49) == 49
