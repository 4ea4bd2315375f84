"""The trained demo adapters on the real default model (slow: pytest -m slow).

With an adapter at scale 1.0 its behaviour shows in at least 80 % of 20 held-out prompts; with
it removed, in at most 10 % (the base rate)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import start_daemon

pytestmark = pytest.mark.slow

ADAPTERS = Path(__file__).resolve().parent.parent / "examples" / "train_lora" / "adapters"
# Held out: the recipe trains on sums of 1..20, twelve capitals and seven colours.
PROMPTS = ([f"Question: What is {a} plus {b}?\nAnswer:" for a, b in
            [(21, 5), (33, 12), (40, 7), (25, 25), (31, 9), (28, 14), (37, 3), (22, 30)]]
           + [f"Question: What is the capital of {c}?\nAnswer:" for c in
              ["Portugal", "Sweden", "Poland", "Brazil", "India", "Ireland"]]
           + [f"Question: What colour is {t}?\nAnswer:" for t in
              ["milk", "blood", "the sea", "a lemon", "charcoal", "a leaf"]])
CHECKS = {"pirate": lambda text: "Arr" in text, "french": lambda text: "Réponse" in text}


@pytest.fixture(scope="module")
def gemma_daemon(tmp_path_factory: pytest.TempPathFactory, gemma: Path):
    d = start_daemon(tmp_path_factory.mktemp("gemma-adapters"), [gemma.parent, ADAPTERS],
                     "--model", str(gemma), "--n-ctx", "512")
    yield d
    assert d.stop() == 0, d.log()


def rate(ctx, check) -> float:
    hits = 0
    for p in PROMPTS:
        text = ctx.generate(p, max_tokens=24, temperature=0, stop=["\nQuestion"]).collect()
        hits += bool(check(text))
    return hits / len(PROMPTS)


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_trained_adapter_behaviour(gemma_daemon, name: str) -> None:
    assert len(PROMPTS) == 20
    with gemma_daemon.client() as c:
        ctx = c.context("default")
        ctx.set_lora(ADAPTERS / f"{name}.gguf", 1.0)
        with_adapter = rate(ctx, CHECKS[name])
        ctx.remove_lora(ADAPTERS / f"{name}.gguf")
        without = rate(ctx, CHECKS[name])
    assert with_adapter >= 0.8, with_adapter
    assert without <= 0.1, without


def test_the_http_door_picks_an_adapter_by_model(tmp_path_factory: pytest.TempPathFactory,
                                                 gemma: Path) -> None:
    """vLLM's convention on the real model: ``"model": "pirate"`` answers like a pirate, the
    base model does not (the same 20 held-out prompts, through the OpenAI SDK)."""
    import json

    import openai

    d = start_daemon(tmp_path_factory.mktemp("gemma-http"), [gemma.parent, ADAPTERS],
                     "--model", str(gemma), "--alias", "gemma", "--n-ctx", "512",
                     "--adapter-dir", str(ADAPTERS), "--http", "127.0.0.1:0")
    try:
        url = next(json.loads(line)["http"] for line in d.log().splitlines()
                   if '"serving"' in line)
        api = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        assert {m.id: m.parent for m in api.models.list()}["pirate"] == "gemma"

        def rate(model: str) -> float:
            hits = 0
            for p in PROMPTS:
                out = api.completions.create(model=model, prompt=p, max_tokens=24,
                                             temperature=0, stop=["\nQuestion"])
                hits += CHECKS["pirate"](out.choices[0].text)
            return hits / len(PROMPTS)

        assert rate("pirate") >= 0.8
        assert rate("gemma") <= 0.1
        # the default model chats out of the box (lorad gave it gemma's template), the same
        # as with llama.cpp's built-in gemma template
        question = [{"role": "user", "content": "What is 2 plus 2?"}]
        answer = api.chat.completions.create(model="pirate", messages=question, max_tokens=24,
                                             temperature=0)
        assert answer.choices[0].message.content
        builtin = api.chat.completions.create(model="pirate", messages=question, max_tokens=24,
                                              temperature=0,
                                              extra_body={"chat_template": "gemma"})
        assert builtin.choices[0].message.content == answer.choices[0].message.content
    finally:
        assert d.stop() == 0, d.log()
