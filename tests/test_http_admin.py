"""The HTTP door's small endpoints: ``GET /v1/models/{id}``, vLLM's adapter loading
(``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter``), llama-server's ``/lora-adapters`` and
Prometheus' ``/metrics`` on the door's port."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from test_http import CHAT, PROMPT, Files, http_url, openai_api, stop_cleanly

import tinymodels
from conftest import DaemonProcess, start_daemon


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    files = Files(tmp_path_factory.mktemp("http-admin"))
    files.outside = tmp_path_factory.mktemp("not-allowed")  # type: ignore[attr-defined]
    tinymodels.write_lora(files.outside / "x.gguf", files.base, rank=2, alpha=4, seed=5,
                          std=0.3)
    return files


@pytest.fixture(scope="module")
def door(tmp_path_factory: pytest.TempPathFactory, files: Files) -> Iterator[DaemonProcess]:
    d = start_daemon(tmp_path_factory.mktemp("http-admin-daemon"), [files.root],
                     "--model", str(files.model), "--alias", "tiny", "--n-ctx", "256",
                     "--adapter-dir", str(files.adapters), "--http", "127.0.0.1:0",
                     "--http-metrics")
    yield d
    stop_cleanly(d)


@pytest.fixture(scope="module")
def api(door: DaemonProcess) -> openai.OpenAI:
    return openai_api(door)


@pytest.fixture(scope="module")
def http(door: DaemonProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=http_url(door), timeout=30) as c:
        yield c


def _completion(api: openai.OpenAI, model: str) -> str:
    return api.completions.create(model=model, prompt=PROMPT, max_tokens=8,
                                  temperature=0).choices[0].text


def test_models_retrieve_gives_one_entry(api: openai.OpenAI) -> None:
    model = api.models.retrieve("tiny")
    assert model.id == "tiny" and model.owned_by == "lorad"
    adapter = api.models.retrieve("pirate")
    assert adapter.id == "pirate" and adapter.model_extra["parent"] == "tiny"
    with pytest.raises(openai.NotFoundError) as e:
        api.models.retrieve("nosuch")
    assert e.value.body["code"] == "model_not_found"


def test_an_adapter_loaded_over_http_is_named_listed_and_unloaded(
        api: openai.OpenAI, http: httpx.Client, files: Files) -> None:
    by_path = api.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0,
                                     extra_body={"lora": [{"path": str(files.b.path)}]})
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "bee",
                                                 "lora_path": str(files.b.path)})
    assert r.status_code == 200 and "bee" in r.text, r.text
    assert _completion(api, "bee") == by_path.choices[0].text != _completion(api, "tiny")
    listed = {m.id: m for m in api.models.list()}
    assert listed["bee"].model_extra["parent"] == "tiny"
    assert api.models.retrieve("bee").id == "bee"
    adapters = http.get("/lora-adapters").json()
    assert {"id": 0, "name": "bee", "path": str(files.b.path), "scale": 0.0} in adapters
    assert any(a["name"] == "pirate" for a in adapters)
    # taken, unless replaced in place
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "bee",
                                                 "lora_path": str(files.pirate.path)})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_name"
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "bee", "load_inplace": True,
                                                 "lora_path": str(files.pirate.path)})
    assert r.status_code == 200
    assert _completion(api, "bee") == _completion(api, "pirate")
    r = http.post("/v1/unload_lora_adapter", json={"lora_name": "bee"})
    assert r.status_code == 200 and "removed" in r.text
    with pytest.raises(openai.NotFoundError):
        api.completions.create(model="bee", prompt=PROMPT, max_tokens=2)
    assert "bee" not in {m.id for m in api.models.list()}
    r = http.post("/v1/unload_lora_adapter", json={"lora_name": "bee"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "lora_name"


@pytest.mark.parametrize(("body", "status", "code"), [
    ({"lora_name": "x"}, 400, "bad_request"),  # no path
    ({"lora_name": "x", "lora_path": "relative"}, 400, "bad_request"),
    ({"lora_name": "a/b", "lora_path": "/x.gguf"}, 400, "bad_request"),
    ({"lora_name": "a:b", "lora_path": "/x.gguf"}, 400, "bad_request"),
    ({"lora_name": "tiny", "lora_path": "/x.gguf"}, 400, "bad_request"),  # a model's id
    ({"lora_name": "x", "lora_path": "/nonexistent/x.gguf"}, 404, "lora_file_not_found"),
    ({"lora_name": "x", "lora_path": "OUTSIDE"}, 403, "forbidden_path"),
    ({"lora_name": "x", "lora_path": "WRONG"}, 422, "lora_incompatible"),
    ({"lora_name": "x", "lora_path": "/x.gguf", "extra": 1}, 400, "unknown_parameter"),
])
def test_load_lora_adapter_refusals(http: httpx.Client, files: Files, body: dict,
                                    status: int, code: str) -> None:
    paths = {"OUTSIDE": str(files.outside / "x.gguf"),  # type: ignore[attr-defined]
             "WRONG": str(files.wrong)}
    body = {k: paths.get(v, v) if isinstance(v, str) else v for k, v in body.items()}
    r = http.post("/v1/load_lora_adapter", json=body)
    assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text
    assert "x" not in [a["name"] for a in http.get("/lora-adapters").json()]


def test_global_scales_are_refused_by_name(http: httpx.Client) -> None:
    r = http.post("/lora-adapters", json=[{"id": 0, "scale": 0.5}])
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_parameter"


def test_metrics_on_the_http_port(api: openai.OpenAI, http: httpx.Client) -> None:
    api.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2)
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    line = next(x for x in r.text.splitlines()
                if x.startswith('lorad_transport_requests_total{transport="http"}'))
    assert float(line.split()[-1]) >= 1


def test_metrics_need_asking_and_api_keys(tmp_path: Path, files: Files) -> None:
    keys = tmp_path / "keys"
    keys.write_text("secret\n")
    d = start_daemon(tmp_path, [files.root], "--model", str(files.model), "--http",
                     "127.0.0.1:0", "--api-key-file", str(keys))
    try:
        r = httpx.get(http_url(d) + "/metrics", headers={"Authorization": "Bearer secret"})
        assert r.status_code == 404  # not asked for
    finally:
        assert d.stop() == 0, d.log()
    (tmp_path / "2").mkdir()
    d = start_daemon(tmp_path / "2", [files.root], "--model", str(files.model), "--http",
                     "127.0.0.1:0", "--api-key-file", str(keys), "--http-metrics")
    try:
        assert httpx.get(http_url(d) + "/metrics").status_code == 401
        r = httpx.get(http_url(d) + "/metrics", headers={"Authorization": "Bearer secret"})
        assert r.status_code == 200 and "lorad_requests_total" in r.text
    finally:
        assert d.stop() == 0, d.log()


def test_an_embedding_request_is_cancelled_when_its_client_goes(door: DaemonProcess) -> None:
    """Embeddings go through the request pipeline like generations: a client that hangs up
    cancels its request between inputs (the request's log line says ``cancelled``)."""
    import json as _json
    import socket
    import time
    from urllib.parse import urlsplit

    url = urlsplit(http_url(door))
    body = _json.dumps({"model": "tiny", "input": ["the cat and the dog " * 60] * 64}).encode()
    with socket.create_connection((url.hostname, url.port)) as sock:
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        sock.shutdown(socket.SHUT_RDWR)  # gone before any answer

    def embed_lines() -> list[dict]:
        return [_json.loads(x) for x in door.log().splitlines() if x.startswith("{")
                and '"op": "embed"' in x and '"transport": "http"' in x]

    deadline = time.monotonic() + 30
    while not embed_lines() and time.monotonic() < deadline:
        time.sleep(0.05)  # polling the log for the request's line, bounded
    assert embed_lines() and embed_lines()[-1]["outcome"] == "cancelled", embed_lines()


def test_metrics_on_the_http_port_need_the_http_port(tmp_path: Path) -> None:
    """Neither the flag nor the config file's setting is silently ignored without --http."""
    from lorad.daemon.config import apply_overrides, load_config
    from lorad.daemon.errors import ConfigError

    with pytest.raises(ConfigError, match="give --http"):
        apply_overrides(load_config(None), http_metrics=True, environ={})
    config = tmp_path / "lorad.toml"
    config.write_text("[http]\nmetrics = true\n")
    with pytest.raises(ConfigError, match="give --http"):
        apply_overrides(load_config(config), environ={})
    served = apply_overrides(load_config(config), http_address="127.0.0.1:0", environ={})
    assert served.http.metrics
