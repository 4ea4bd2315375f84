"""The end-to-end path on the real default model (gemma 3 270M Q4_K_M). Opt-in: pytest -m slow."""

from __future__ import annotations

import json
from pathlib import Path

import llama_cpp
import llama_cpp.llama_cpp as C
import numpy as np
import pytest

from conftest import DaemonProcess, rss_anon_kib, start_daemon
from test_embed import TEXTS, reference_mean

pytestmark = pytest.mark.slow

PROMPT = "Write one sentence about the sea."


@pytest.fixture(scope="module")
def gemma_daemon(tmp_path_factory: pytest.TempPathFactory, gemma: Path):
    d = start_daemon(tmp_path_factory.mktemp("gemma"), [gemma.parent], "--model", str(gemma),
                     "--n-ctx", "1024")
    yield d
    assert d.stop() == 0


def in_process_greedy(model: Path, prompt: str, n: int) -> list[int]:
    """llama-cpp-python in-process, with the same use_extra_bufts=False the daemon uses (the
    AMX repacking path crashes native builds on these CPUs with Q4_K models)."""
    original = C.llama_model_default_params

    def safe_params():
        params = original()
        params.use_extra_bufts = False
        return params

    C.llama_model_default_params = safe_params
    try:
        llm = llama_cpp.Llama(model_path=str(model), n_ctx=1024, n_batch=512, n_threads=2,
                              verbose=False)
    finally:
        C.llama_model_default_params = original
    try:
        out: list[int] = []
        for tok in llm.generate(llm.tokenize(prompt.encode()), temp=0.0, repeat_penalty=1.0):
            if C.llama_vocab_is_eog(llm._model.vocab, tok) or len(out) == n:
                break
            out.append(tok)
        return out
    finally:
        llm.close()


def test_gemma_greedy_through_daemon_equals_in_process(gemma_daemon: DaemonProcess,
                                                       gemma: Path) -> None:
    expected = in_process_greedy(gemma, PROMPT, 48)
    with gemma_daemon.client() as client:
        stream = client.context("default").generate(PROMPT, max_tokens=48, temperature=0)
        tokens = [t for chunk in stream for t in chunk.token_ids]
    assert tokens == expected
    assert stream.text.strip()
    assert stream.metrics["generation_tokens_per_s"] > 5


def test_gemma_chat_template_and_cancel(gemma_daemon: DaemonProcess) -> None:
    with gemma_daemon.client() as client:
        ctx = client.context("default")
        messages = [{"role": "user", "content": "Say hello in French."}]
        # lorad gives the default model gemma's chat template (lorad.client.model_file): it
        # renders as llama.cpp's built-in "gemma" does
        stream = ctx.chat(messages, max_tokens=24, temperature=0)
        text = stream.collect()
        assert text.strip() and stream.finish_reason in ("stop", "length")
        builtin = ctx.chat(messages, template="gemma", max_tokens=24, temperature=0)
        assert builtin.collect() == text
        long = ctx.generate("Count from one to one thousand:", max_tokens=500, credit=4)
        it = iter(long)
        next(it)
        long.cancel()
        list(it)
        assert long.finish_reason == "cancelled"
        assert long.metrics["generated_tokens"] < 10


def test_gemma_embeddings_agree_with_llama_cpp_python(gemma_daemon: DaemonProcess,
                                                       gemma: Path) -> None:
    with gemma_daemon.client() as c:
        got = c.embed(TEXTS, model=str(gemma), normalize=False)
        assert got["dimensions"] == 640
        for text, vector in zip(TEXTS, got["embeddings"], strict=True):
            want = reference_mean(gemma, text)
            cos = np.array(vector) @ want / (np.linalg.norm(vector) * np.linalg.norm(want))
            # Q4_K kernels differ (repacked weights, attention path): 0.9991 seen; a pooling
            # or normalisation mistake gives far less (the tiny f32 model is checked to 2e-3).
            assert cos > 0.998
        similar = c.embed(["a cat sat on the mat", "a kitten sat on the rug",
                           "quarterly tax filing deadlines"], model=str(gemma))["embeddings"]
        e = np.array(similar)
        assert e[0] @ e[1] > e[0] @ e[2]


def test_gemma_calls_a_tool_well_formed_and_answers_in_json(gemma_daemon: DaemonProcess
                                                            ) -> None:
    """The default model (a small base model, gemma's template: the generic convention) makes
    a well-formed call when one is required (one: with parallel calls it repeats the call
    until max_tokens, as a base model does), and with auto it answers."""
    weather = {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    with gemma_daemon.client() as client:
        ctx = client.context("default")
        forced = ctx.chat(ask, tools=[weather], tool_choice="required", max_tokens=64,
                          temperature=0, parallel_tool_calls=False)
        assert forced.collect() == "" and forced.finish_reason == "tool_calls"
        (call,) = forced.tool_calls
        assert call["function"]["name"] == "get_weather"
        assert isinstance(json.loads(call["function"]["arguments"])["city"], str)
        auto = ctx.chat(ask, tools=[weather], max_tokens=64, temperature=0)
        text = auto.collect()
        assert auto.finish_reason in ("tool_calls", "stop", "length")
        assert auto.tool_calls or text  # a call, or the response's text


def test_the_daemon_gives_back_what_closed_contexts_held(tmp_path: Path, gemma: Path) -> None:
    """Rounds of 8 contexts streaming at once, then 1, made and closed on gemma: each round's
    KV caches and logits buffers (1 MiB an output row) go back to the system when the contexts
    close. With glibc's default mmap threshold, which rises to the largest block freed, the
    daemon kept 20-48 MiB more than before the first (daemon/heap.py)."""
    config = tmp_path / "lorad.toml"
    config.write_text("[batching]\nkeep_idle_s = 0\n")  # no idle slab kept for the next context
    d = start_daemon(tmp_path, [gemma.parent], "--config", str(config))

    def rss_anon_mib() -> float:
        return rss_anon_kib(d.pid) / 1024

    try:
        with d.client(timeout=120) as client:
            client.load_model(gemma)
            loaded = rss_anon_mib()
            after: list[float] = []
            for n in (8, 1, 8, 1):
                contexts = [client.create_context(gemma, n_ctx=1024) for _ in range(n)]
                streams = [c.generate(f"Story {i}: once upon a time", max_tokens=24,
                                      temperature=0) for i, c in enumerate(contexts)]
                for s in streams:
                    s.collect()
                for c in contexts:
                    c.close()
                assert not client.status()["batching"]  # every slab freed
                after.append(rss_anon_mib())
        assert max(after) - loaded < 8, (loaded, after)
    finally:
        assert d.stop() == 0, d.log()
