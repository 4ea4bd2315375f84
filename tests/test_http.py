"""The OpenAI-compatible HTTP door, driven by the official ``openai`` package (and httpx).

A real daemon with ``--http 127.0.0.1:0`` on a generated tiny model, with adapters in its
adapter directory; what comes through HTTP is compared with what the ZeroMQ protocol gives for
the same request on the same daemon.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

import tinymodels
from conftest import DaemonProcess, start_daemon
from lorad.client import Client

PROMPT = "Hello world, the cat and the dog"
CHAT = [{"role": "user", "content": "hello there, the cat"}]
LONG = {"model": "tiny", "prompt": PROMPT, "max_tokens": 1500, "temperature": 0, "stream": True}
"""A stream that runs until it is stopped (the small door's contexts have n_ctx 2048)."""


def http_url(d: DaemonProcess) -> str:
    """The door's URL, from the daemon's ``serving`` log line (logged before READY=1)."""
    for line in d.log().splitlines():
        if '"serving"' in line:
            return json.loads(line)["http"]
    raise AssertionError(d.log())


def openai_api(d: DaemonProcess) -> openai.OpenAI:
    """The ``openai`` SDK on the door of ``d`` (no key, no retries)."""
    return openai.OpenAI(base_url=http_url(d) + "/v1", api_key="unused", max_retries=0)


def stop_cleanly(d: DaemonProcess) -> None:
    """Stop ``d``: it exits 0 and logged no error."""
    assert d.stop() == 0, d.log()
    assert '"level": "error"' not in d.log(), d.log()


class Files:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.adapters = root / "adapters"
        self.adapters.mkdir()
        self.base = tinymodels.tiny_llama_tensors(seed=0)
        self.model = tinymodels.write_tiny_llama(root / "base.gguf", seed=0)
        self.pirate = tinymodels.write_lora(self.adapters / "pirate.gguf", self.base, rank=4,
                                            alpha=8, seed=3, std=0.3)
        self.b = tinymodels.write_lora(root / "b.gguf", self.base, rank=2, alpha=4, seed=2,
                                       std=0.3, targets=("ffn_up", "attn_output"))
        self.wrong = tinymodels.write_lora_wrong_arch(root / "gpt2.gguf", self.base)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    return Files(tmp_path_factory.mktemp("http"))


@pytest.fixture(scope="module")
def door(tmp_path_factory: pytest.TempPathFactory, files: Files) -> Iterator[DaemonProcess]:
    d = start_daemon(tmp_path_factory.mktemp("http-daemon"), [files.root],
                     "--model", str(files.model), "--alias", "tiny", "--n-ctx", "256",
                     "--adapter-dir", str(files.adapters), "--http", "127.0.0.1:0")
    yield d
    assert d.stop() == 0, d.log()
    assert '"level": "error"' not in d.log(), d.log()


@pytest.fixture(scope="module")
def api(door: DaemonProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=http_url(door) + "/v1", api_key="unused", max_retries=0)


@pytest.fixture
def zmq(door: DaemonProcess) -> Iterator[Client]:
    with door.client() as c:
        yield c


def greedy(ctx, *, loras=None, n: int = 12) -> str:
    return ctx.generate(PROMPT, max_tokens=n, temperature=0, loras=loras).collect()


# -- models -----------------------------------------------------------------------------------
def test_models_lists_the_model_and_the_adapters_with_their_parent(api: openai.OpenAI) -> None:
    models = {m.id: m for m in api.models.list()}
    assert set(models) == {"tiny", "pirate"}
    assert models["tiny"].owned_by == "lorad" and models["tiny"].parent is None
    assert models["pirate"].parent == "tiny"  # vLLM's convention


# -- generation -------------------------------------------------------------------------------
def test_chat_streamed_gives_the_same_text_as_plain(api: openai.OpenAI) -> None:
    plain = api.chat.completions.create(model="tiny", messages=CHAT, max_tokens=12,
                                        temperature=0)
    choice = plain.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert plain.object == "chat.completion" and plain.model == "tiny"
    assert plain.usage.prompt_tokens > 0
    assert 0 < plain.usage.completion_tokens <= 12
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens
    chunks = list(api.chat.completions.create(model="tiny", messages=CHAT, max_tokens=12,
                                              temperature=0, stream=True,
                                              stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == choice.finish_reason and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == (
        plain.usage.completion_tokens)


def test_chat_matches_the_protocol(api: openai.OpenAI, zmq: Client) -> None:
    with zmq.create_context("tiny", n_ctx=256) as ctx:
        want = ctx.chat(CHAT, max_tokens=10, temperature=0).collect()
    got = api.chat.completions.create(model="tiny", messages=CHAT, max_tokens=10,
                                      temperature=0)
    assert got.choices[0].message.content == want


def test_completions_plain_and_streamed(api: openai.OpenAI, zmq: Client) -> None:
    with zmq.create_context("tiny", n_ctx=256) as ctx:
        want = greedy(ctx)
    plain = api.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    assert plain.object == "text_completion" and plain.choices[0].text == want
    streamed = list(api.completions.create(model="tiny", prompt=PROMPT, max_tokens=12,
                                           temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == want
    assert streamed[-1].choices[0].finish_reason == plain.choices[0].finish_reason


def test_stop_seed_and_logprobs(api: openai.OpenAI) -> None:
    full = api.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0)
    text = full.choices[0].text
    cut = api.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0,
                                 stop=text[3:6])
    assert cut.choices[0].text == text[:text.index(text[3:6])]
    assert cut.choices[0].finish_reason == "stop"
    a, b = (api.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=1.5,
                                   seed=11).choices[0].text for _ in range(2))
    assert a == b
    chat = api.chat.completions.create(model="tiny", messages=CHAT, max_tokens=6,
                                       temperature=0, logprobs=True, top_logprobs=3)
    entries = chat.choices[0].logprobs.content
    assert len(entries) == chat.usage.completion_tokens
    for e in entries:
        assert len(e.top_logprobs) == 3
        assert e.token == e.top_logprobs[0].token  # greedy: the best candidate
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob)
        assert e.logprob <= 0 and bytes(e.bytes).decode("utf-8", "replace") == e.token
    legacy = api.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0,
                                    logprobs=2)
    lp = legacy.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == legacy.choices[0].text
    assert all(len(t) <= 2 for t in lp.top_logprobs)


def test_response_format_json_schema_constrains_the_output(api: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    out = api.chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=64, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": schema}})
    value = json.loads(out.choices[0].message.content)
    assert set(value) == {"ok"} and isinstance(value["ok"], bool)
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(
            model="tiny", messages=CHAT, max_tokens=8,
            response_format={"type": "json_schema", "json_schema": {
                "name": "t", "schema": {"type": "array", "minItems": 10**9}}})
    assert e.value.body["param"] == "response_format"


# -- adapters ---------------------------------------------------------------------------------
def test_an_adapter_chosen_by_model_runs_on_its_base(api: openai.OpenAI, zmq: Client,
                                                      files: Files) -> None:
    with zmq.create_context("tiny", n_ctx=256) as ctx:
        base = greedy(ctx)
        want = greedy(ctx, loras=[(str(files.pirate.path), 1.0)])
    assert want != base
    for model in ("pirate", "tiny:pirate"):
        got = api.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0)
        assert got.choices[0].text == want, model
        assert got.model == model
    # and back to the base model on the same engine contexts: no KV reused across stacks
    again = api.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    assert again.choices[0].text == base


def test_a_stack_with_scales_from_the_lora_list(api: openai.OpenAI, zmq: Client,
                                                files: Files) -> None:
    stack = [(str(files.pirate.path), 0.5), (str(files.b.path), -0.8)]
    with zmq.create_context("tiny", n_ctx=256) as ctx:
        want = greedy(ctx, loras=stack)
    got = api.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0,
                                 extra_body={"lora": [{"name": "pirate", "scale": 0.5},
                                                      {"path": str(files.b.path),
                                                       "scale": -0.8}]})
    assert got.choices[0].text == want
    same = api.completions.create(model="pirate", prompt=PROMPT, max_tokens=12, temperature=0,
                                  extra_body={"lora": [{"path": str(files.b.path),
                                                        "scale": -0.8}]})
    with zmq.create_context("tiny", n_ctx=256) as ctx:
        assert same.choices[0].text == greedy(
            ctx, loras=[(str(files.pirate.path), 1.0), (str(files.b.path), -0.8)])


def test_embeddings(api: openai.OpenAI, zmq: Client) -> None:
    out = api.embeddings.create(model="tiny", input=["the cat", "the dog"])
    assert [d.index for d in out.data] == [0, 1]
    want = zmq.embed(["the cat", "the dog"], model="tiny")
    for d, v in zip(out.data, want["embeddings"], strict=True):
        assert d.embedding == pytest.approx(v)
        assert math.isclose(sum(x * x for x in d.embedding), 1.0, rel_tol=1e-6)
    assert out.usage.prompt_tokens == want["prompt_tokens"]
    plain = httpx.post(str(api.base_url) + "embeddings", json={
        "model": "tiny", "input": "the cat", "encoding_format": "float"}).json()
    assert plain["data"][0]["embedding"] == pytest.approx(want["embeddings"][0])


# -- errors -----------------------------------------------------------------------------------
def _error(exc: pytest.ExceptionInfo) -> dict:
    return exc.value.body


def test_errors_have_openais_shape_and_lorads_code(api: openai.OpenAI, files: Files,
                                                   tmp_path: Path) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        api.completions.create(model="nope", prompt=PROMPT, max_tokens=2)
    assert _error(e)["code"] == "model_not_found" and _error(e)["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(model="tiny", messages=CHAT, n=2)
    assert _error(e)["param"] == "n" and "one choice" in _error(e)["message"]
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(model="tiny", messages=CHAT, tools=[{
            "type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}])
    assert _error(e)["param"] == "tools" and "tool 'f'" in _error(e)["message"]
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(model="tiny", messages=CHAT, extra_body={"bogus": 1})
    assert _error(e)["param"] == "bogus" and _error(e)["code"] == "unknown_parameter"
    with pytest.raises(openai.NotFoundError) as e:
        api.completions.create(model="tiny", prompt=PROMPT, extra_body={"lora": [
            {"path": str(files.root / "missing.gguf")}]})
    assert _error(e)["code"] == "lora_file_not_found"
    with pytest.raises(openai.UnprocessableEntityError) as e:
        api.completions.create(model="tiny", prompt=PROMPT, extra_body={"lora": [
            {"path": str(files.wrong)}]})
    assert _error(e)["code"] == "lora_incompatible"
    with pytest.raises(openai.BadRequestError) as e:
        api.completions.create(model="tiny", prompt=PROMPT, extra_body={"lora": [
            {"name": "pirate", "scale": "high"}]})
    assert _error(e)["code"] == "lora_invalid_scale"
    outside = tmp_path / "a.gguf"
    outside.write_bytes(files.pirate.path.read_bytes())
    with pytest.raises(openai.PermissionDeniedError) as e:
        api.completions.create(model="tiny", prompt=PROMPT, extra_body={"lora": [
            {"path": str(outside)}]})
    assert _error(e)["code"] == "forbidden_path"
    with pytest.raises(openai.BadRequestError) as e:
        api.completions.create(model="tiny", prompt="the cat " * 400, max_tokens=4)
    assert _error(e)["code"] == "context_overflow"
    with pytest.raises(openai.BadRequestError) as e:
        api.completions.create(model="tiny", prompt=PROMPT, temperature=-1)
    assert _error(e)["code"] == "bad_request" and _error(e)["param"] == "temperature"


def test_a_body_over_the_limit_is_413(door: DaemonProcess) -> None:
    url = http_url(door)
    r = httpx.post(url + "/v1/completions", content=b"x" * (17 * 1024 * 1024),
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
    r = httpx.post(url + "/v1/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_integers_past_64_bits_are_refused_wherever_they_are(door: DaemonProcess) -> None:
    """An integer a lorad message cannot carry is a 400 naming its field, found by the JSON
    parser (a body's text is not searched for digits: 3.3 ms of the event loop for 300 KB);
    digits inside a string are text."""
    url = http_url(door)

    def post(body: bytes) -> httpx.Response:
        return httpx.post(url + "/v1/completions", content=body,
                          headers={"content-type": "application/json"})

    for raw in (b'"max_tokens": 18446744073709551616', b'"max_tokens": -9223372036854775809',
                b'"logit_bias": {"5": 100000000000000000000000}'):
        r = post(b'{"model": "tiny", "prompt": "x", ' + raw + b"}")
        assert r.status_code == 400, r.text
        assert "does not fit 64 bits" in r.json()["error"]["message"], r.text
        assert r.json()["error"]["param"] == raw.split(b'"')[1].decode(), r.text
    r = post(json.dumps({"model": "tiny", "prompt": "call 12345678901234567890123 now",
                         "max_tokens": 1}).encode())
    assert r.status_code == 200, r.text


def test_the_door_refuses_what_a_web_page_could_send(door: DaemonProcess) -> None:
    url = http_url(door)
    body = json.dumps({"model": "tiny", "prompt": PROMPT, "max_tokens": 2})
    r = httpx.post(url + "/v1/completions", content=body,
                   headers={"content-type": "text/plain"})  # a "simple" cross-site POST
    assert r.status_code == 415 and r.json()["error"]["code"] == "bad_request"
    r = httpx.get(url + "/v1/models", headers={"host": "evil.example"})  # DNS rebinding
    assert r.status_code == 400
    for host in ("localhost:1", "127.0.0.1", "[::1]:8080"):  # loopback names, IPv6 too
        assert httpx.get(url + "/v1/models", headers={"host": host}).status_code == 200, host
    r = httpx.get(url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(url + "/v1/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_refused_requests_are_counted_and_logged(api: openai.OpenAI, zmq: Client,
                                                door: DaemonProcess) -> None:
    before = zmq.metrics()["transports"].get("http", {}).get("errors", {})
    for _ in range(2):
        with pytest.raises(openai.NotFoundError):
            api.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=2)
    after = zmq.metrics()["transports"]["http"]["errors"]
    assert after.get("model_not_found", 0) == before.get("model_not_found", 0) + 2
    api.completions.create(model="tiny", prompt=PROMPT, max_tokens=2)
    lines = [json.loads(line) for line in door.log().splitlines() if line.startswith("{")]
    http = [x for x in lines if x.get("event") == "request" and x.get("transport") == "http"]
    refused = [x for x in http if x.get("outcome") == "model_not_found"]
    served = [x for x in http if x.get("outcome") == "length"]
    assert refused and served
    for line in refused[-1], served[-1]:  # who asked: the client's address
        assert line["client"].startswith("127.0.0.1:"), line


def test_sse_with_plain_httpx(door: DaemonProcess) -> None:
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 8, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", http_url(door) + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_http_requests_are_counted_by_transport(api: openai.OpenAI, zmq: Client,
                                                door: DaemonProcess) -> None:
    before = zmq.metrics()["transports"].get("http", {}).get("requests", 0)
    api.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, temperature=0)
    after = zmq.metrics()["transports"]["http"]["requests"]
    assert after == before + 1
    assert zmq.metrics()["transports"]["zmq"]["requests"] > 0
    assert zmq.capabilities()["http"] == {"url": http_url(door), "api_keys": False}


# -- a busy door, a dropped stream -------------------------------------------------------------
@pytest.fixture
def small_door(tmp_path: Path, files: Files) -> Iterator[DaemonProcess]:
    config = tmp_path / "lorad.toml"
    config.write_text("[http]\ncontexts = 1\nmax_queued = 0\n")
    d = start_daemon(tmp_path, [files.root], "--config", str(config), "--model",
                     str(files.model), "--alias", "tiny", "--n-ctx", "2048", "--http",
                     "127.0.0.1:0")
    yield d
    assert d.stop() == 0, d.log()


def test_a_full_queue_is_429_and_a_dropped_stream_frees_its_context(
        small_door: DaemonProcess) -> None:
    url = http_url(small_door) + "/v1/completions"
    short = {"model": "tiny", "prompt": PROMPT, "max_tokens": 2, "temperature": 0}
    with httpx.stream("POST", url, json=LONG) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")  # it runs
        with small_door.client() as c:  # the door's private context, seen in status
            status = c.status()
        assert status["http"] == {"contexts": 1, "queued_requests": 0, "running_requests": 1}
        assert [x["id"] for x in status["contexts"]] == ["default"]  # --model's context only
        assert status["contexts_total"] == 2
        busy = httpx.post(url, json=short)
        assert busy.status_code == 429, busy.text
        assert busy.headers["retry-after"] == "1"
        assert busy.json()["error"]["code"] == "context_busy"
    # the client dropped the stream: its request is cancelled within a token or so
    deadline = time.monotonic() + 1.0
    while True:
        r = httpx.post(url, json=short)
        if r.status_code == 200 or time.monotonic() > deadline:
            break
    assert r.status_code == 200, r.text
    with small_door.client() as c:
        assert c.metrics()["transports"]["http"]["cancelled"] >= 1


def test_a_taken_port_is_one_clear_error(tmp_path: Path, files: Files) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError) as e:
            start_daemon(tmp_path, [files.root], "--http", f"127.0.0.1:{port}")
    assert "cannot serve HTTP on" in str(e.value)
    assert "Traceback" not in str(e.value)


# -- API keys ---------------------------------------------------------------------------------
def test_a_public_address_needs_api_keys(tmp_path: Path, files: Files) -> None:
    with pytest.raises(RuntimeError, match="not loopback"):
        start_daemon(tmp_path, [files.root], "--http", "0.0.0.0:0")
    keys = tmp_path / "keys"
    keys.write_text("# the door's keys\nsecret-one\nsecret-two\n")
    d = start_daemon(tmp_path, [files.root], "--model", str(files.model), "--alias", "tiny",
                     "--http", "0.0.0.0:0", "--api-key-file", str(keys))
    try:
        port = http_url(d).rsplit(":", 1)[1]
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(base + "/health").status_code == 200  # health needs no key
        r = httpx.get(base + "/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.get(base + "/v1/models", headers={"Authorization": "Bearer secret-three"})
        assert r.status_code == 401
        api = openai.OpenAI(base_url=base + "/v1", api_key="secret-two", max_retries=0)
        assert [m.id for m in api.models.list()] == ["tiny"]
    finally:
        assert d.stop() == 0, d.log()


def test_a_draining_daemon_ends_http_streams_with_an_error_event(
        small_door: DaemonProcess) -> None:
    import signal

    url = http_url(small_door) + "/v1/completions"
    with httpx.stream("POST", url, json=LONG) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        small_door.proc.send_signal(signal.SIGTERM)
        events = [json.loads(line[6:]) for line in lines
                  if line.startswith("data: ") and line != "data: [DONE]"]
    assert "error" in events[-1] and events[-1]["error"]["code"] == "cancelled", events[-1]
    assert small_door.proc.wait(30) == 0


def test_a_model_without_a_chat_template(tmp_path: Path, files: Files) -> None:
    bare = tinymodels.write_tiny_llama(files.root / "bare.gguf", seed=0, chat_template=None)
    config = tmp_path / "lorad.toml"
    config.write_text('[http]\nchat_template = "chatml"\n')
    (tmp_path / "plain").mkdir()
    plain = start_daemon(tmp_path / "plain", [files.root], "--model", str(bare),
                         "--alias", "bare", "--http", "127.0.0.1:0")
    try:
        api = openai.OpenAI(base_url=http_url(plain) + "/v1", api_key="-", max_retries=0)
        with pytest.raises(openai.BadRequestError) as e:
            api.chat.completions.create(model="bare", messages=CHAT, max_tokens=4)
        assert _error(e)["param"] == "chat_template" and "chat_template" in _error(e)["message"]
        named = api.chat.completions.create(model="bare", messages=CHAT, max_tokens=4,
                                            temperature=0,
                                            extra_body={"chat_template": "chatml"})
    finally:
        assert plain.stop() == 0, plain.log()
    (tmp_path / "configured").mkdir()
    configured = start_daemon(tmp_path / "configured", [files.root], "--config", str(config),
                              "--model", str(bare), "--alias", "bare", "--http", "127.0.0.1:0")
    try:
        api = openai.OpenAI(base_url=http_url(configured) + "/v1", api_key="-", max_retries=0)
        default = api.chat.completions.create(model="bare", messages=CHAT, max_tokens=4,
                                              temperature=0)
    finally:
        assert configured.stop() == 0, configured.log()
    assert default.choices[0].message.content == named.choices[0].message.content
