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
import json
import shutil
import tempfile
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
from lorad.daemon import litert_lora

FIXTURES = Path(__file__).resolve().parent / "fixtures"
FIXTURE = FIXTURES / "tiny.litertlm"
"""The tiny model, with LoRA inputs of rank 16 in the signatures the runtime calls."""
MERGED = FIXTURES / "tiny-merged.litertlm"
"""The same model with ``tiny-peft`` (every attention projection, rank 4) in its weights."""
PROMPT = "The daemon"
TEMPLATE = ("{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}"
            "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n"
            "{% endif %}")

pytestmark = pytest.mark.skipif(importlib.util.find_spec("litert_lm") is None,
                                reason="the LiteRT-LM runtime is not installed "
                                "(pip install 'lorad[litert]')")


def runtime_greedy(path: Path, prompt: str, n: int, lora: Path | None = None) -> list[str]:
    """What the runtime itself gives, in this process: the reference for the daemon (``lora``:
    an adapter file, else the zero adapter on a model that takes one)."""
    import litert_lm

    litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)
    cache = tempfile.mkdtemp(prefix="litert-cache-")
    engine = litert_lm.Engine(str(path), litert_lm.Backend.CPU(), cache_dir=cache)
    spec = litert_lora.read_spec(path)
    if lora is None and spec is not None:  # as the daemon does: always a file on such models
        lora = f"{cache}/zero.lora"
        litert_lora.write_file(lora, spec, litert_lora.zeros(spec))
    session = engine.create_session(apply_prompt_template=False,
                                    sampler_config=litert_lm.SamplerConfig(top_k=1),
                                    max_output_tokens=n,
                                    lora_config=litert_lm.LoraConfig(
                                        lora_path=str(lora) if lora else None))
    try:
        session.run_prefill([prompt])
        return [t for r in session.run_decode_async() for t in r.texts]
    finally:
        session.close()  # before the engine (the reverse crashes)
        engine.close()
        shutil.rmtree(cache, ignore_errors=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("litert")
    shutil.copy(FIXTURE, root / "tiny.litertlm")
    shutil.copy(MERGED, root / "merged.litertlm")
    shutil.copytree(FIXTURES / "tiny-peft", root / "peft")
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
    assert tiny["lora"] and tiny["lora_per_request"] and not tiny["lora_stack"]
    assert not tiny["grammar"] and tiny["speculative"] == []
    assert model["lora_rank"] == 16
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


def test_token_prompts_tools_and_embeddings_are_refused(ctx: Context) -> None:
    with pytest.raises(BackendUnsupported) as err:
        ctx.generate(tokens=[5, 6], max_tokens=4).collect()
    assert err.value.details["reason"] == "text_prompt"
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    with pytest.raises(BackendUnsupported) as err:
        ctx.chat([{"role": "user", "content": "hi"}], tools=[tool], max_tokens=4).collect()
    assert err.value.details["reason"] == "no_tools"
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
def test_the_fixtures_are_what_the_converter_makes(tmp_path: Path) -> None:
    """The committed fixtures are the converter's: a fresh conversion gives the same greedy
    output, with and without the adapter (the bytes differ from run to run)."""
    from lorad.daemon.litertlm_convert import fixtures

    tiny, peft, merged = fixtures(tmp_path)
    assert runtime_greedy(tiny, PROMPT, 24) == runtime_greedy(FIXTURE, PROMPT, 24)
    assert runtime_greedy(merged, PROMPT, 24) == runtime_greedy(MERGED, PROMPT, 24)
    assert (peft / "adapter_model.safetensors").read_bytes() == \
        (FIXTURES / "tiny-peft" / "adapter_model.safetensors").read_bytes()


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


# -- LoRA ---------------------------------------------------------------------------------------
def test_an_adapter_gives_the_output_of_its_weights_merged(ctx: Context, models: Path) -> None:
    """A PEFT adapter set on a context: the runtime's output equals the model with the adapter
    merged into its weights (PEFT's W + alpha/r B A), token for token."""
    merged = runtime_greedy(models / "merged.litertlm", PROMPT, 24)
    base = runtime_greedy(models / "tiny.litertlm", PROMPT, 24)
    assert merged != base  # the adapter changes the output
    [entry] = ctx.set_lora(str(models / "peft"))
    check_keys(entry, "stack_entry")
    assert (entry["rank"], entry["alpha"], entry["targets"]) == (4, 8.0, ["k", "o", "q", "v"])
    stream = ctx.generate(PROMPT, max_tokens=24, temperature=0)
    assert [c.text for c in stream] == merged
    assert stream.metrics["loras"] == [{"ref": str(models / "peft"),
                                        "path": str(models / "peft"), "scale": 1.0}]
    assert ctx.clear_loras() == []
    assert ctx.generate(PROMPT, max_tokens=24, temperature=0).collect() == "".join(base)


def test_an_adapter_stays_with_its_context(zmq: Client, models: Path) -> None:
    """The runtime's adapter is engine-wide (the last loaded applies to every later session):
    lorad gives every session its own, the zero adapter for a context without one."""
    merged = "".join(runtime_greedy(models / "merged.litertlm", PROMPT, 16))
    base = "".join(runtime_greedy(models / "tiny.litertlm", PROMPT, 16))
    with zmq.create_context("tiny", loras=[str(models / "peft")]) as a, \
            zmq.create_context("tiny") as b:
        for _ in range(2):
            assert a.generate(PROMPT, max_tokens=16, temperature=0).collect() == merged
            assert b.generate(PROMPT, max_tokens=16, temperature=0).collect() == base
        # per request, on the context without one, and back
        one = b.generate(PROMPT, max_tokens=16, temperature=0, loras=[str(models / "peft")])
        assert one.collect() == merged
        assert b.generate(PROMPT, max_tokens=16, temperature=0).collect() == base


def test_a_scale_is_folded_into_the_adapter(ctx: Context, models: Path) -> None:
    base = "".join(runtime_greedy(models / "tiny.litertlm", PROMPT, 16))
    merged = "".join(runtime_greedy(models / "merged.litertlm", PROMPT, 16))
    ctx.set_lora(str(models / "peft"), scale=0.0)
    assert ctx.generate(PROMPT, max_tokens=16, temperature=0).collect() == base
    [entry] = ctx.set_lora(str(models / "peft"), scale=1.0)  # a scale change
    assert entry["scale"] == 1.0
    assert ctx.generate(PROMPT, max_tokens=16, temperature=0).collect() == merged
    ctx.remove_lora(str(models / "peft"))
    assert ctx.loras() == []


def _peft(root: Path, name: str, *, rank: int = 4, module: str = "q_proj",
          d_in: int = 64, d_out: int = 64) -> Path:
    import numpy as np
    from safetensors.numpy import save_file

    out = root / name
    out.mkdir(exist_ok=True)
    key = f"base_model.model.model.layers.0.self_attn.{module}"
    save_file({f"{key}.lora_A.weight": np.ones((rank, d_in), "f4"),
               f"{key}.lora_B.weight": np.ones((d_out, rank), "f4")},
              str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank,
                                                         "lora_alpha": rank}))
    return out


def test_adapters_the_runtime_cannot_take_are_refused_by_name(zmq: Client, ctx: Context,
                                                             models: Path) -> None:
    from lorad.client import LoraIncompatible, LoraInvalid, LoraUnsupported

    peft = str(models / "peft")
    with pytest.raises(BackendUnsupported) as err:
        ctx.set_loras([(peft, 1.0), (str(_peft(models, "second")), 1.0)])
    assert (err.value.details["reason"], err.value.details["value"]) == ("one_adapter", 2)
    ctx.set_lora(peft)
    with pytest.raises(BackendUnsupported) as err:
        ctx.set_lora(str(_peft(models, "second")))
    assert err.value.details["reason"] == "one_adapter"
    assert [e["path"] for e in ctx.loras()] == [peft]  # unchanged
    junk = models / "junk.gguf"
    junk.write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(LoraInvalid):
        ctx.set_loras([(str(junk), 1.0)])
    with pytest.raises(LoraUnsupported) as err:
        ctx.set_loras([(str(_peft(models, "mlp", module="mlp.up_proj", d_out=128)), 1.0)])
    assert err.value.details["reason"] == "litert_attention_only"
    with pytest.raises(LoraIncompatible) as err:
        ctx.set_loras([(str(_peft(models, "wide", rank=64)), 1.0)])
    assert (err.value.details["rank"], err.value.details["model_rank"]) == (64, 16)
    with pytest.raises(LoraIncompatible):
        ctx.set_loras([(str(_peft(models, "narrow", d_in=32)), 1.0)])
    alora = _peft(models, "alora")  # PEFT's variants are refused as on llama.cpp models
    config = json.loads((alora / "adapter_config.json").read_text())
    (alora / "adapter_config.json").write_text(json.dumps({**config,
                                                           "alora_invocation_tokens": [5]}))
    with pytest.raises(LoraUnsupported) as err:
        ctx.set_loras([(str(alora), 1.0)])
    assert err.value.details["reason"] == "alora"
    assert [e["path"] for e in ctx.loras()] == [peft]
    report = zmq.validate_lora("tiny", str(_peft(models, "wide", rank=64)))
    assert not report["compatible"] and report["problems"][0]["code"] == "lora_incompatible"
    assert zmq.validate_lora("tiny", peft)["compatible"]


def test_a_bundle_without_lora_inputs_refuses_adapters(zmq: Client, models: Path) -> None:
    """A bundle exported without LoRA inputs in the signatures the runtime calls would ignore
    an adapter silently (checked: its output does not change): lorad refuses it."""
    info = zmq.load_model(str(models / "merged.litertlm"))
    assert info["lora_rank"] is None and zmq.capabilities()["models"]["merged"]["lora"] is False
    try:
        with zmq.create_context("merged") as c:
            with pytest.raises(BackendUnsupported) as err:
                c.set_lora(str(models / "peft"))
            assert err.value.details["reason"] == "no_lora_inputs"
            with pytest.raises(BackendUnsupported):
                c.generate(PROMPT, max_tokens=2, loras=[str(models / "peft")]).collect()
    finally:
        zmq.unload_model("merged")


def test_lorad_lora_convert_writes_the_runtimes_file(tmp_path: Path, models: Path) -> None:
    """Offline: ``lorad lora convert PEFT --model X.litertlm -o F`` writes the file the
    runtime takes, which gives the merged model's output."""
    import subprocess
    import sys

    out = tmp_path / "tiny.lora"
    subprocess.run([sys.executable, "-m", "lorad.client.cli", "lora", "convert",
                    str(models / "peft"), "--model", str(models / "tiny.litertlm"), "-o",
                    str(out)], check=True)
    assert runtime_greedy(models / "tiny.litertlm", PROMPT, 16, lora=out) == \
        runtime_greedy(models / "merged.litertlm", PROMPT, 16)
    refused = subprocess.run([sys.executable, "-m", "lorad.client.cli", "lora", "convert",
                              str(models / "peft"), "--model", str(models / "merged.litertlm"),
                              "-o", str(tmp_path / "x.lora")], capture_output=True, text=True)
    assert refused.returncode == 1 and "no_lora_inputs" not in refused.stderr
    assert "takes no adapter" in refused.stderr and not (tmp_path / "x.lora").exists()


@pytest.mark.parametrize("params", [
    {"top_k": 0}, {"top_p": 0.0, "temperature": 1.0}, {"temperature": 100.0, "top_k": 1000},
    {"seed": 2**32 - 1, "temperature": 0.5}, {"max_tokens": 1}, {"stop": ["x" * 200]},
])
def test_sampling_edges_run(ctx: Context, params: dict[str, Any]) -> None:
    stream = ctx.generate(PROMPT, **{"max_tokens": 8, **params})
    stream.collect()
    assert stream.finish_reason in ("length", "stop")
    assert 1 <= stream.metrics["generated_tokens"] <= 8


@pytest.mark.parametrize("prompt", ["<start_of_turn>", "日本語 🎉 \u200b\ufeff", " ", "\n" * 50,
                                    "<end_of_turn>" * 30, "\x00\x01"])
def test_odd_prompts_run_or_are_refused_by_name(ctx: Context, prompt: str) -> None:
    try:
        stream = ctx.generate(prompt, max_tokens=4, temperature=0)
        stream.collect()
    except BadRequest as exc:  # a prompt the tokenizer turns into nothing
        assert exc.details == {"field": "prompt"} and "no tokens" in str(exc)
        return
    assert stream.finish_reason in ("length", "stop")


def test_many_clients_at_once_with_cancels(door: DaemonProcess) -> None:
    """Twelve streams on four contexts of one engine, every third cancelled after its first
    item: every stream ends, the engine's queue empties, and the contexts serve again."""
    import threading

    results: list[str] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        with door.client() as c:
            ctxs = [c.create_context("tiny") for _ in range(1)]
            stream = ctxs[0].generate(PROMPT, max_tokens=40, temperature=0, credit=2)
            for n, _chunk in enumerate(stream, 1):
                if i % 3 == 0 and n == 1:
                    stream.cancel()
            with lock:
                results.append(stream.finish_reason)
            ctxs[0].close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results).count("cancelled") >= 4 and len(results) == 12
    with door.client() as c:
        assert c.status()["litert_sessions"] == [{"model": "tiny", "running": None,
                                                  "waiting": 0}]
        with c.create_context("tiny") as ctx:
            assert ctx.generate(PROMPT, max_tokens=3, temperature=0).collect()


def as_gguf(peft: Path, out: Path, *, dtype: str = "f4") -> Path:
    """The PEFT adapter as a llama.cpp LoRA GGUF (what ``lorad lora convert`` writes for a
    gemma 3 model: ``blk.N.attn_q.weight.lora_a`` is PEFT's A, ``lora_b`` its B)."""
    import gguf
    from safetensors.numpy import load_file

    config = json.loads((peft / "adapter_config.json").read_text())
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
    w = gguf.GGUFWriter(str(out), "gemma3")
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(config["lora_alpha"]))
    for key, value in sorted(load_file(str(peft / "adapter_model.safetensors")).items()):
        layer, module, half = key.split(".")[4], key.split(".")[6], key.split(".")[7]
        name = f"blk.{layer}.{names[module]}.weight.lora_{half[-1].lower()}"
        w.add_tensor(name, value.astype(dtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.mark.parametrize("dtype", ["f4", "f2"])
def test_a_llama_cpp_adapter_runs_on_litert_too(ctx: Context, models: Path,
                                                dtype: str) -> None:
    """The same adapter file on both backends: a llama.cpp LoRA GGUF of the tiny model's
    attention gives, on LiteRT-LM, the output of the weights with it merged (F16 in the file:
    the same as the merged weights up to F16's rounding, so only the first tokens)."""
    gguf_adapter = as_gguf(models / "peft", models / f"tiny-{dtype}.gguf", dtype=dtype)
    [entry] = ctx.set_lora(str(gguf_adapter))
    assert entry["path"] == str(gguf_adapter) and entry["rank"] == 4
    merged = runtime_greedy(models / "merged.litertlm", PROMPT, 24)
    got = [c.text for c in ctx.generate(PROMPT, max_tokens=24, temperature=0)]
    assert got == merged if dtype == "f4" else got[:4] == merged[:4]


def test_a_forced_unload_while_sessions_run_and_wait(zmq: Client, models: Path) -> None:
    """The runtime crashed when an engine was closed with a session alive: an unload closes
    the contexts first (a running session is cancelled and closed, a waiting one never made),
    then the engine; the daemon goes on."""
    copy = models / "unload.litertlm"
    shutil.copy(models / "tiny.litertlm", copy)
    zmq.load_model(str(copy))
    a, b = zmq.create_context("unload"), zmq.create_context("unload")
    running = a.generate(PROMPT, max_tokens=200, temperature=0, credit=1)
    it = iter(running)
    next(it)
    waiting = b.generate(PROMPT, max_tokens=200, temperature=0, credit=1)
    assert zmq.unload_model("unload", force=True)["unloaded"]
    rest = list(it)
    assert running.finish_reason == "cancelled" and len(rest) < 199
    list(waiting)
    assert waiting.finish_reason == "cancelled"
    assert "unload" not in [m["id"] for m in zmq.list_models()] and zmq.ping()["pong"]
