"""Generation through a real daemon process on tiny generated models."""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import pytest

from lorad.client import BadRequest, Client, ContextBusy, ContextOverflow, NotFound

PROMPT = "Hello world, the cat and the dog"


def reference_greedy(model_path: Path, prompt: str, n: int) -> list[int]:
    """Greedy tokens from llama-cpp-python in-process (what users run today)."""
    llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=512, n_batch=512, n_threads=2,
                          verbose=False, seed=0)
    try:
        tokens = llm.tokenize(prompt.encode())
        out: list[int] = []
        for tok in llm.generate(tokens, temp=0.0, repeat_penalty=1.0, top_k=1):
            if llama_cpp.llama_vocab_is_eog(llm._model.vocab, tok):
                break
            out.append(tok)
            if len(out) == n:
                break
        return out
    finally:
        llm.close()


def greedy(ctx, prompt: str | None = PROMPT, n: int = 24, **params) -> tuple[list[int], object]:
    stream = ctx.generate(prompt, max_tokens=n, temperature=0, **params)
    tokens = [t for chunk in stream for t in chunk.token_ids]
    return tokens, stream


def test_greedy_equals_llama_cpp_python_in_process(client: Client, tiny_model: Path) -> None:
    expected = reference_greedy(tiny_model, PROMPT, 24)
    assert len(set(expected)) > 3  # the tiny model is not degenerate
    with client.create_context(tiny_model, n_ctx=512) as ctx:
        tokens, stream = greedy(ctx)
    assert tokens == expected
    assert stream.finish_reason == ("length" if len(expected) == 24 else "stop")
    m = stream.metrics
    assert m["generated_tokens"] == len(tokens)
    assert m["prompt_tokens"] == len(client.tokenize(ctx.model, PROMPT))
    for key in ("time_to_first_token_ms", "prompt_tokens_per_s", "generation_tokens_per_s"):
        assert m[key] > 0


def test_model_loaded_once_and_shared(client: Client, tiny_model: Path) -> None:
    first = client.load_model(tiny_model)
    again = client.load_model(str(tiny_model))
    assert first["id"] == again["id"]
    contexts = [client.create_context(first, n_ctx=128) for _ in range(3)]
    contexts.append(client.create_context(str(tiny_model), n_ctx=128))  # by path
    try:
        models = [m for m in client.list_models() if m["path"] == str(tiny_model)]
        assert len(models) == 1
        assert set(models[0]["contexts"]) >= {c.id for c in contexts}
        info = models[0]
        for key in ("architecture", "n_params", "size_bytes", "n_ctx_train", "n_vocab", "n_embd",
                    "n_layer", "chat_template"):
            assert key in info
        assert info["architecture"] == "llama" and info["n_layer"] == 2
        assert info["chat_template"] is True
    finally:
        for c in contexts:
            c.close()


def test_prefix_reuse_never_changes_output(client: Client, tiny_model: Path) -> None:
    with client.create_context(tiny_model, n_ctx=512) as fresh:
        expected, _ = greedy(fresh, PROMPT + " and more words")
    with client.create_context(tiny_model, n_ctx=512) as ctx:
        greedy(ctx, PROMPT)
        tokens, stream = greedy(ctx, PROMPT + " and more words")
        assert stream.metrics["cached_prompt_tokens"] > 0
        assert tokens == expected
        # The very same prompt again: everything but the last token comes from the cache.
        again, stream = greedy(ctx, PROMPT + " and more words")
        assert again == expected
        assert stream.metrics["cached_prompt_tokens"] == stream.metrics["prompt_tokens"] - 1


def test_stream_text_is_never_broken_utf8(client: Client, tiny_model: Path) -> None:
    with client.create_context(tiny_model, n_ctx=512) as ctx:
        stream = ctx.generate("café 日本 ü", max_tokens=64, temperature=1.5, seed=3)
        chunks = list(stream)
        ids = [t for c in chunks for t in c.token_ids]
        # Byte-fallback tokens make multi-byte characters span several tokens.
        whole = ctx.detokenize(ids)
    assert "".join(c.text for c in chunks) == whole
    assert all("\ufffd" not in c.text for c in chunks) or "\ufffd" in whole


def test_seeded_sampling_is_reproducible(client: Client, tiny_model: Path) -> None:
    with client.create_context(tiny_model, n_ctx=256) as ctx:
        a = [t for c in ctx.generate(PROMPT, max_tokens=16, seed=42) for t in c.token_ids]
        b = [t for c in ctx.generate(PROMPT, max_tokens=16, seed=42) for t in c.token_ids]
        c = [t for c in ctx.generate(PROMPT, max_tokens=16, seed=43, temperature=2.0)
             for t in c.token_ids]
    assert a == b
    assert a != c


def test_logprobs_are_sorted_and_match_greedy(client: Client, tiny_model: Path) -> None:
    with client.create_context(tiny_model, n_ctx=256) as ctx:
        chunks = list(ctx.generate(PROMPT, max_tokens=8, temperature=0, logprobs=5))
    for chunk in chunks:
        assert chunk.logprobs is not None and len(chunk.logprobs) == len(chunk.token_ids)
        for token, entry in zip(chunk.token_ids, chunk.logprobs, strict=True):
            assert len(entry) == 5
            values = [lp for _, lp in entry]
            assert values == sorted(values, reverse=True)
            assert all(lp <= 0 for lp in values)
            assert entry[0][0] == token  # greedy picks the most likely token
        assert chunk.token_logprobs == pytest.approx([e[0][1] for e in chunk.logprobs])


def test_the_chosen_tokens_logprob_comes_even_outside_the_candidates(
        client: Client, tiny_model: Path) -> None:
    with client.create_context(tiny_model, n_ctx=256) as ctx:
        chunks = list(ctx.generate(PROMPT, max_tokens=24, temperature=5.0, top_k=0, min_p=0.0,
                                   top_p=1.0, seed=3, logprobs=1))
    outside = 0
    for chunk in chunks:
        if not chunk.token_ids:
            continue
        assert chunk.token_logprobs is not None
        for token, entry, lp in zip(chunk.token_ids, chunk.logprobs, chunk.token_logprobs,
                                    strict=True):
            assert lp <= entry[0][1] + 1e-9  # never above the best candidate's
            if token != entry[0][0]:
                outside += 1
                assert lp < entry[0][1]
    assert outside > 0  # a hot sampler picked tokens that were not the single candidate


def test_stop_sequence_cuts_text(client: Client, tiny_model: Path) -> None:
    with client.create_context(tiny_model, n_ctx=256) as ctx:
        full = ctx.generate(PROMPT, max_tokens=24, temperature=0).collect()
        assert len(full) > 6
        stop = full[4:7]
        stream = ctx.generate(PROMPT, max_tokens=24, temperature=0, stop=[stop])
        text = stream.collect()
    assert stream.finish_reason == "stop"
    assert text == full[: full.index(stop)]


def test_chat_uses_the_models_template(client: Client, tiny_model: Path) -> None:
    messages = [{"role": "user", "content": "hello there"}]
    rendered = "<|user|>hello there\n<|assistant|>"
    with client.create_context(tiny_model, n_ctx=256) as ctx:
        chat_tokens = [t for c in ctx.chat(messages, max_tokens=12, temperature=0)
                       for t in c.token_ids]
        plain, _ = greedy(ctx, rendered, n=12)
    assert chat_tokens == plain


def test_tokenize_detokenize_round_trip(client: Client, tiny_model: Path) -> None:
    model = client.load_model(tiny_model)["id"]
    tokens = client.tokenize(model, "the café", add_special=False)
    assert client.detokenize(model, tokens).strip() == "the café"
    with pytest.raises(BadRequest) as err:
        client.detokenize(model, [10**6])
    assert err.value.details["field"] == "tokens"


def test_tokens_prompt_and_errors(client: Client, tiny_model: Path) -> None:
    with client.create_context(tiny_model, n_ctx=64) as ctx:
        tokens = ctx.tokenize(PROMPT)
        by_tokens, _ = greedy(ctx, None, tokens=tokens, n=8)
        by_text, _ = greedy(ctx, PROMPT, n=8)
        assert by_tokens == by_text
        with pytest.raises(ContextOverflow):
            ctx.generate(" ".join(["word"] * (ctx.info["n_ctx"] + 1)), max_tokens=4).collect()
        with pytest.raises(BadRequest) as err:
            ctx.generate(PROMPT, max_tokens=0).collect()
        assert err.value.details["field"] == "max_tokens"
        with pytest.raises(BadRequest) as err:
            ctx.generate(PROMPT, bogus=1).collect()
        assert err.value.details["field"] == "bogus"
        # A full context ends the stream with "length" rather than an error.
        stream = ctx.generate(PROMPT, max_tokens=500, temperature=0)
        stream.collect()
        assert stream.finish_reason in ("length", "stop")
        # The last sampled token need not enter the KV cache.
        assert len(tokens) + stream.metrics["generated_tokens"] <= ctx.info["n_ctx"] + 1
    with pytest.raises(NotFound):
        list(ctx.generate(PROMPT))


def test_a_prompt_that_cannot_fit_is_refused_without_being_tokenized(
        client: Client, tiny_model: Path) -> None:
    """A text longer than the room times the vocabulary's longest piece has more tokens than
    the room whatever they are: refused untokenized, with a lower bound (``at_least``);
    tokenizing such a text (the HTTP fuzz's 4 MiB string) took 1.6 s of a core on gemma 3.
    Shorter over-long prompts get their exact count. In process: the bound never refuses a
    text that fits, and never says more tokens than the text has."""
    from lorad.daemon import llama

    with client.create_context(tiny_model, n_ctx=64) as ctx:
        with pytest.raises(ContextOverflow) as err:
            ctx.generate("x" * (1 << 20), max_tokens=4).collect()
        assert err.value.details["at_least"] is True
        assert ctx.info["n_ctx"] < err.value.details["prompt_tokens"] <= (1 << 20)
        words = " ".join(["word"] * (ctx.info["n_ctx"] + 1))
        with pytest.raises(ContextOverflow) as err:
            ctx.generate(words, max_tokens=4).collect()
        assert "at_least" not in err.value.details
        assert err.value.details["prompt_tokens"] == len(ctx.tokenize(words))

    llama.init_backend()
    model = llama.Model(str(tiny_model))
    try:
        longest = model.longest_piece
        assert longest is not None and longest >= 1
        texts = [unit * n for unit in ("x", "the cat ", "日本", " ", "tttt", "\n")
                 for n in (100, 1000, 5000, 20000)]
        bounded = 0
        for text in texts:
            exact = len(model.tokenize(text, add_special=False))
            for limit in (1, 8, 64, 500):
                try:
                    got = model.tokenize(text, add_special=False, limit=limit)
                except llama.TooManyTokens as exc:
                    assert exact > limit and exc.n <= exact, (text[:8], len(text), limit)
                    bounded += exc.at_least
                else:
                    assert len(got) == exact <= limit
        assert bounded  # the bound was taken, not only exact counts
    finally:
        model.close()


def test_busy_context_answers_context_busy(client: Client, tiny_model: Path) -> None:
    with client.create_context(tiny_model, n_ctx=256, max_queued=0) as ctx:
        # Greedy: a sampled run could draw end-of-generation at once and free the context.
        running = ctx.generate(PROMPT, max_tokens=200, credit=1, temperature=0)
        it = iter(running)  # keep it: a dropped iterator cancels its stream
        first = next(it)  # holds the context: it waits for credit
        assert first.token_ids
        with pytest.raises(ContextBusy) as err:
            ctx.generate(PROMPT, max_tokens=2).collect()
        assert err.value.details["max_queued"] == 0
        running.cancel()


def test_queued_requests_run_in_order(client: Client, tiny_model: Path) -> None:
    with client.create_context(tiny_model, n_ctx=256, max_queued=4) as ctx:
        expected, _ = greedy(ctx, PROMPT, n=6)
        streams = [ctx.generate(PROMPT, max_tokens=6, temperature=0) for _ in range(3)]
        results = [[t for c in s for t in c.token_ids] for s in reversed(streams)]
    assert results == [expected] * 3


def test_chat_with_an_explicit_template(client: Client, tiny_model: Path) -> None:
    messages = [{"role": "user", "content": "hi"}]
    chatml = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    jinja = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}>"
    with client.create_context(tiny_model, n_ctx=256) as ctx:
        by_name = [t for c in ctx.chat(messages, template="chatml", max_tokens=8, temperature=0)
                   for t in c.token_ids]
        assert by_name == greedy(ctx, chatml, n=8)[0]
        by_source = [t for c in ctx.chat(messages, template=jinja, max_tokens=8, temperature=0)
                     for t in c.token_ids]
        assert by_source == greedy(ctx, "[user] hi>", n=8)[0]
        with pytest.raises(BadRequest) as err:
            ctx.chat(messages, template="no-such-template").collect()
        assert err.value.details["field"] == "template"
