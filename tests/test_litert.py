"""LiteRT-LM models (``.litertlm``) behind the same protocol, through a real daemon.

The model is ``tests/fixtures/tiny.litertlm``, made by the project's own converter
(``python -m lorad.daemon.litertlm_convert tiny OUT``, with the conversion extra): 2 layers,
256 tokens, greedy output that walks through varied pieces. Each test checks what lorad
promises on this backend: the runtime's own greedy output, stop sequences, counts, cancellation,
fair turns between contexts, both clients and the HTTP door, and a typed refusal (with the
reason) for every operation the runtime cannot do.
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import trio
from test_spec import check_keys

from conftest import DaemonProcess, start_daemon
from lorad.client import (
    AsyncClient,
    BackendUnsupported,
    BadRequest,
    Client,
    Context,
    ContextOverflow,
    SpeculativeUnsupported,
    TooLarge,
)

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "tiny.litertlm"
PROMPT = "The daemon"
TEMPLATE = ("{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}"
            "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n"
            "{% endif %}")

pytestmark = pytest.mark.skipif(importlib.util.find_spec("litert_lm") is None,
                                reason="the LiteRT-LM runtime is not installed "
                                "(pip install 'lorad[litert]')")


def runtime_greedy(path: Path, prompt: str, n: int) -> list[str]:
    """What the runtime itself gives, in this process: the reference for the daemon."""
    import litert_lm

    litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)
    cache = path.parent / "cache"
    cache.mkdir(exist_ok=True)
    engine = litert_lm.Engine(str(path), litert_lm.Backend.CPU(), cache_dir=str(cache))
    session = engine.create_session(apply_prompt_template=False,
                                    sampler_config=litert_lm.SamplerConfig(top_k=1),
                                    max_output_tokens=n)
    try:
        session.run_prefill([prompt])
        return [t for r in session.run_decode_async() for t in r.texts]
    finally:
        session.close()  # before the engine (the reverse crashes)
        engine.close()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("litert")
    shutil.copy(FIXTURE, root / "tiny.litertlm")
    return root


@pytest.fixture(scope="module")
def door(tmp_path_factory: pytest.TempPathFactory, models: Path) -> Iterator[DaemonProcess]:
    d = start_daemon(tmp_path_factory.mktemp("litert-daemon"), [models],
                     "--model", str(models / "tiny.litertlm"), "--alias", "tiny",
                     "--chat-template", TEMPLATE, "--http", "127.0.0.1:0")
    yield d
    assert d.stop() == 0, d.log()
    assert '"level": "error"' not in d.log(), d.log()


@pytest.fixture
def zmq(door: DaemonProcess) -> Iterator[Client]:
    with door.client() as c:
        yield c


@pytest.fixture
def ctx(zmq: Client) -> Iterator[Context]:
    with zmq.create_context("tiny") as c:
        yield c


def test_the_model_reports_its_backend_and_what_it_cannot_do(zmq: Client) -> None:
    [model] = zmq.list_models()
    assert model["backend"] == "litert_lm" and model["n_ctx_train"] == 256
    check_keys(model, "model_litert")
    status = zmq.status()
    check_keys(status, "status")
    assert status["litert_sessions"] == [{"model": "tiny", "running": None, "waiting": 0}]
    with zmq.create_context("tiny") as ctx:
        check_keys(ctx.info, "context")
        check_keys(ctx.info["params"], "context.params")
        assert ctx.info["backend"] == "litert_lm" and ctx.info["params"]["kv_type"] is None
    caps = zmq.capabilities()
    check_keys(caps, "capabilities")
    assert caps["backends"]["litert_lm"]["available"]
    tiny = caps["models"]["tiny"]
    assert tiny["backend"] == "litert_lm" and tiny["sessions_at_once"] == 1
    assert not tiny["lora"] and not tiny["grammar"] and tiny["speculative"] == []
    assert tiny["refused"]["grammar"] == "no_grammar"
    modes = caps["speculative"]["per_model"]["tiny"]
    assert modes["mtp"]["available"] is False and "no speculative" in modes["mtp"]["reason"]


def test_greedy_output_is_the_runtimes_own(ctx: Context, models: Path) -> None:
    expected = runtime_greedy(models / "tiny.litertlm", PROMPT, 16)
    stream = ctx.generate(PROMPT, max_tokens=16, temperature=0)
    assert [c.text for c in stream] == expected
    assert stream.finish_reason == "length"
    m = stream.metrics
    assert (m["generated_tokens"], m["prompt_tokens"], m["backend"]) == (16, 3, "litert_lm")
    assert m["speculative"] is False and m["loras"] == []
    assert ctx.generate(PROMPT, max_tokens=16, temperature=0).collect() == "".join(expected)


def test_a_stop_sequence_ends_the_output_before_it(ctx: Context) -> None:
    full = ctx.generate(PROMPT, max_tokens=16, temperature=0).collect()
    stop = full[10:13]
    stream = ctx.generate(PROMPT, max_tokens=16, temperature=0, stop=[stop])
    text = stream.collect()
    assert stream.finish_reason == "stop" and text == full[:full.index(stop)]


def test_sampling_is_seeded(ctx: Context) -> None:
    a = ctx.generate(PROMPT, max_tokens=24, temperature=60.0, top_k=200, top_p=1.0,
                     seed=4).collect()
    b = ctx.generate(PROMPT, max_tokens=24, temperature=60.0, top_k=200, top_p=1.0,
                     seed=4).collect()
    assert a == b
    others = {ctx.generate(PROMPT, max_tokens=24, temperature=60.0, top_k=200, top_p=1.0,
                           seed=s).collect() for s in range(5, 9)}
    assert len(others | {a}) > 1


def test_a_prompt_that_does_not_fit_is_refused(ctx: Context) -> None:
    with pytest.raises(ContextOverflow) as err:
        ctx.generate("word " * 400, max_tokens=4).collect()
    assert err.value.details["n_ctx"] == 256


def test_cancelling_a_stream_ends_it_and_the_context_goes_on(ctx: Context) -> None:
    stream = ctx.generate(PROMPT, max_tokens=200, temperature=0, credit=2)
    first = []
    for chunk in stream:
        first.append(chunk.text)
        if len(first) == 2:
            stream.cancel()
    assert stream.finish_reason == "cancelled"
    again = ctx.generate(PROMPT, max_tokens=4, temperature=0)
    again.collect()
    assert again.finish_reason == "length"


def test_a_client_that_reads_slowly_holds_no_other_context_back(zmq: Client) -> None:
    """One engine decodes one session at a time, but the turn ends with the decoding: a stream
    nobody reads (no credit left) does not keep another context's request waiting."""
    with zmq.create_context("tiny") as a, zmq.create_context("tiny") as b:
        stalled = a.generate(PROMPT, max_tokens=100, temperature=0, credit=1)
        it = iter(stalled)
        next(it)
        other = b.generate(PROMPT, max_tokens=8, temperature=0, timeout=10)
        other.collect()
        assert other.finish_reason == "length" and other.metrics["generated_tokens"] == 8
        assert len("".join(c.text for c in it)) > 0
        assert stalled.finish_reason in ("length", "stop")  # the runtime's end token
    turns = zmq.status()["litert_sessions"]
    assert turns == [{"model": "tiny", "running": None, "waiting": 0}]


def test_chat_uses_the_template_given_at_load(ctx: Context, models: Path) -> None:
    messages = [{"role": "user", "content": "hello"}]
    stream = ctx.chat(messages, max_tokens=8, temperature=0)
    prompt = "<start_of_turn>user\nhello<end_of_turn>\n<start_of_turn>model\n"
    assert [c.text for c in stream] == runtime_greedy(models / "tiny.litertlm", prompt, 8)
    assert stream.metrics["prompt_tokens"] == len(ctx.tokenize(prompt, parse_special=True))


def test_tokenize_and_detokenize(ctx: Context) -> None:
    tokens = ctx.tokenize(PROMPT, parse_special=True)
    assert tokens[0] == 2 and ctx.detokenize(tokens[1:]).strip() == PROMPT
    assert ctx.tokenize(PROMPT, parse_special=True, add_special=False) == tokens[1:]
    with pytest.raises(BackendUnsupported) as err:
        ctx.tokenize(PROMPT)
    assert err.value.details["field"] == "parse_special"
    with pytest.raises(BadRequest):
        ctx.detokenize([5, 100000])


REFUSALS: list[tuple[dict[str, Any], str, str]] = [
    ({"grammar": 'root ::= "a"'}, "grammar", "no_grammar"),
    ({"logprobs": 2}, "logprobs", "no_logprobs"),
    ({"repeat_penalty": 1.3}, "repeat_penalty", "sampler"),
    ({"min_p": 0.2}, "min_p", "sampler"),
    ({"add_special": False}, "add_special", "start_token"),
    ({"loras": [{"path": "x.gguf"}]}, "loras", "no_lora"),
]


@pytest.mark.parametrize(("params", "field", "reason"), REFUSALS)
def test_what_the_runtime_cannot_do_is_refused_before_any_work(
        ctx: Context, params: dict[str, Any], field: str, reason: str) -> None:
    with pytest.raises(BackendUnsupported) as err:
        ctx.generate(PROMPT, max_tokens=4, **params).collect()
    details = err.value.details
    assert (details["backend"], details["field"], details["reason"]) == ("litert_lm", field,
                                                                        reason)
    assert ctx.info["id"] in {c["id"] for c in ctx._client.list_contexts()}


def test_token_prompts_tools_adapters_and_embeddings_are_refused(zmq: Client,
                                                                 ctx: Context) -> None:
    with pytest.raises(BackendUnsupported) as err:
        ctx.generate(tokens=[5, 6], max_tokens=4).collect()
    assert err.value.details["reason"] == "text_prompt"
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    with pytest.raises(BackendUnsupported) as err:
        ctx.chat([{"role": "user", "content": "hi"}], tools=[tool], max_tokens=4).collect()
    assert err.value.details["reason"] == "no_tools"
    for call in (lambda: ctx.set_lora("/nowhere/a.gguf"),
                 lambda: ctx.set_loras([("/nowhere/a.gguf", 1.0)]),
                 lambda: zmq.validate_lora("tiny", "/nowhere/a.gguf")):
        with pytest.raises(BackendUnsupported) as err:
            call()
        assert err.value.details["reason"] == "no_lora"
    assert ctx.clear_loras() == [] and ctx.loras() == []
    with pytest.raises(BackendUnsupported) as err:
        ctx.embed("hello")
    assert err.value.details == {"backend": "litert_lm", "reason": "no_embeddings",
                                 "op": "embed"}


def test_speculative_decoding_is_refused_with_the_runtimes_reason(zmq: Client,
                                                                  ctx: Context) -> None:
    with pytest.raises(SpeculativeUnsupported) as err:
        ctx.generate(PROMPT, max_tokens=4, speculative={"mode": "mtp"}).collect()
    assert err.value.details["reason"] == "no_drafter"
    assert "has_speculative_decoding_support" in str(err.value)
    with pytest.raises(SpeculativeUnsupported) as err:
        ctx.generate(PROMPT, max_tokens=4, speculative={"mode": "prompt_lookup"}).collect()
    assert err.value.details["reason"] == "backend"
    with pytest.raises(SpeculativeUnsupported):
        zmq.create_context("tiny", speculative={"mode": "mtp"})


def test_context_settings_fixed_by_the_engine_are_refused(zmq: Client) -> None:
    for params, field in (({"n_threads": 64}, "n_threads"), ({"kv_type": "q8_0"}, "kv_type"),
                          ({"flash_attn": True}, "flash_attn"), ({"n_batch": 64}, "n_batch")):
        with pytest.raises(BackendUnsupported) as err:
            zmq.create_context("tiny", **params)
        assert (err.value.details["field"], err.value.details["reason"]) == (field,
                                                                            "engine_wide")
    with pytest.raises(TooLarge) as err:
        zmq.create_context("tiny", n_ctx=1024)
    assert err.value.details["value"] == 256
    with zmq.create_context("tiny", n_ctx=64) as small:
        with pytest.raises(ContextOverflow):
            small.generate("word " * 70, max_tokens=4).collect()


def test_loading_options_the_runtime_cannot_honour_are_refused(zmq: Client,
                                                               models: Path) -> None:
    copy = models / "other.litertlm"
    shutil.copy(models / "tiny.litertlm", copy)
    with pytest.raises(BackendUnsupported) as err:
        zmq.load_model(str(copy), use_mmap=False)
    assert err.value.details["reason"] == "runtime_maps"
    with pytest.raises(BackendUnsupported) as err:
        zmq.load_model(str(copy), n_gpu_layers=10)
    assert err.value.details["reason"] == "cpu_only"
    info = zmq.load_model(str(copy))
    assert info["id"] == "other" and info["backend"] == "litert_lm"
    with zmq.create_context("other") as c:
        three = c.generate(PROMPT, max_tokens=3, temperature=0)
        three.collect()
        assert three.metrics["generated_tokens"] == 3
    assert zmq.unload_model("other")["unloaded"]


def test_a_file_that_is_not_a_bundle_is_a_typed_load_failure(zmq: Client, models: Path) -> None:
    bad = models / "junk.litertlm"
    bad.write_bytes(b"not a litertlm bundle" * 100)
    from lorad.client import ModelLoadFailed

    with pytest.raises(ModelLoadFailed) as err:
        zmq.load_model(str(bad))
    assert err.value.details["path"] == str(bad)
    assert zmq.ping()["pong"]


async def test_the_trio_client_streams_too(door: DaemonProcess, models: Path) -> None:
    expected = await trio.to_thread.run_sync(runtime_greedy, models / "tiny.litertlm", PROMPT, 8)
    async with AsyncClient(door.endpoint) as c:
        ctx = await c.create_context("tiny")
        try:
            stream = await ctx.generate(PROMPT, max_tokens=8, temperature=0)
            assert [chunk.text async for chunk in stream] == expected
            assert stream.finish_reason == "length"
        finally:
            await ctx.close()


def test_the_http_door_serves_it_to_the_openai_sdk(door: DaemonProcess, models: Path) -> None:
    from test_http import openai_api

    api = openai_api(door)
    assert [m.id for m in api.models.list().data] == ["tiny"]
    expected = "".join(runtime_greedy(models / "tiny.litertlm", PROMPT, 8))
    done = api.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0)
    assert done.choices[0].text == expected and done.usage.completion_tokens == 8
    chunks = api.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=6,
        temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    with pytest.raises(openai.UnprocessableEntityError) as err:
        api.embeddings.create(model="tiny", input="hello")
    assert err.value.body["code"] == "backend_unsupported"
    with pytest.raises(openai.UnprocessableEntityError) as err:
        api.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, logprobs=2)
    assert err.value.body["code"] == "backend_unsupported"


@pytest.mark.skipif(importlib.util.find_spec("litert_torch") is None,
                    reason="needs the conversion extra (pip install 'lorad[litert-convert]')")
def test_the_fixture_is_what_the_converter_makes(tmp_path: Path) -> None:
    """The committed fixture is the converter's tiny model: a fresh conversion gives the same
    greedy output (the bytes differ from run to run)."""
    from lorad.daemon.litertlm_convert import tiny

    made = tiny(tmp_path / "tiny.litertlm")
    assert runtime_greedy(made, PROMPT, 24) == runtime_greedy(FIXTURE, PROMPT, 24)


def test_a_stream_cancelled_after_its_decoding_ended_ends_cleanly(zmq: Client) -> None:
    """The client cancels once the runtime is done and its session closed, while items still
    wait for credit: the stream ends as cancelled (it was an internal error)."""
    with zmq.create_context("tiny") as a, zmq.create_context("tiny") as b:
        stream = a.generate(PROMPT, max_tokens=60, temperature=0, credit=1)
        it = iter(stream)
        next(it)
        b.generate(PROMPT, max_tokens=2, temperature=0).collect()  # after a's turn: in order
        stream.cancel()
        rest = list(it)
        assert stream.finish_reason == "cancelled" and len(rest) < 59
