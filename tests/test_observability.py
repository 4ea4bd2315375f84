"""Counters (`metrics`), the Prometheus exporter and `lorad top`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

import tinymodels
from conftest import DaemonProcess, start_daemon
from lorad.client import BadRequest

PROMPT = "Hello world, the cat and the dog"


def lorad(endpoint: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorad.client.cli", "--endpoint", endpoint,
                           *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def observed(tmp_path: Path, models_dir: Path, tiny_model: Path) -> DaemonProcess:
    d = start_daemon(tmp_path, [models_dir], "--metrics-address", "127.0.0.1:0")
    yield d
    assert d.stop() == 0, d.log()


def test_metrics_count_per_model_and_context(observed: DaemonProcess, models_dir: Path,
                                             tiny_model: Path) -> None:
    base = tinymodels.tiny_llama_tensors(seed=0)
    adapter = tinymodels.write_lora(models_dir / "obs.gguf", base, rank=2).path
    with observed.client() as c, observed.client() as other:
        ctx = c.create_context(tiny_model, n_ctx=256)
        for _ in range(3):
            ctx.generate(PROMPT, max_tokens=5, temperature=0).collect()
        ctx.generate(PROMPT, max_tokens=8, temperature=0,
                     speculative={"mode": "prompt_lookup"}).collect()
        stream = ctx.generate(PROMPT, max_tokens=50, temperature=0, credit=1)
        for i, _ in enumerate(stream):
            if i == 0:
                stream.cancel()
        with pytest.raises(BadRequest):
            ctx.generate(PROMPT, max_tokens=5, grammar="not a grammar").collect()
        ctx.set_lora(adapter, 0.5)
        ctx.set_lora(adapter, 0.25)
        ctx.generate(PROMPT, max_tokens=5, temperature=0).collect()

        m = c.metrics()
        mine = m["contexts"][ctx.id]
        assert mine["streams"] == 6 and mine["requests"] >= 9  # + set_lora x2 + the error
        assert mine["generated_tokens"] == 5 * 3 + 8 + 5 + stream.metrics["generated_tokens"]
        assert mine["prompt_tokens"] > 0
        assert mine["cancelled"] == 1
        assert mine["errors"] == {"bad_request": 1}
        assert mine["stack_changes"] == 2
        assert mine["drafted_tokens"] >= mine["accepted_tokens"] >= 0
        assert mine["time_to_first_token_ms"]["count"] == 6
        assert mine["time_to_first_token_ms"]["p50"] > 0
        model = m["models"][ctx.model]
        assert model["generated_tokens"] == mine["generated_tokens"]
        assert model["adapter_loads"] == 1
        assert m["total"]["requests"] >= model["requests"]
        assert ctx.id not in other.metrics()["contexts"]  # private

        # The Prometheus exporter shows the same numbers.
        url = re.search(r'"address": "(http://127\.0\.0\.1:\d+/metrics)"', observed.log())[1]
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        line = f'lorad_generated_tokens_total{{id="{ctx.id}",scope="context"}} '
        assert f"{line}{float(mine['generated_tokens'])}" in text
        assert 'lorad_errors_total{code="bad_request",id="' + ctx.id in text
        assert "lorad_ttft_ms{" in text and "lorad_uptime_seconds" in text

        # lorad top, one frame; lorad metrics
        ctx_shared = c.create_context(tiny_model, n_ctx=128, shared=True, loras=[(adapter, 0.5)])
        frame = lorad(observed.endpoint, "top", "--once")
        assert frame.returncode == 0, frame.stderr
        assert ctx_shared.id in frame.stdout and "obs.gguf:0.5" in frame.stdout
        assert ctx.id not in frame.stdout  # another client's private context
        out = lorad(observed.endpoint, "metrics")
        assert out.returncode == 0 and "total" in json.loads(out.stdout)
        ctx.close()
        ctx_shared.close()
        assert ctx.id not in c.metrics()["contexts"]


def test_metrics_address_must_be_loopback(tmp_path: Path, models_dir: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "lorad.daemon", "--endpoint",
                          f"ipc://{tmp_path}/x.sock", "--metrics-address", "0.0.0.0:9464"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 1 and "loopback" in out.stderr


def test_model_loading_reports_progress(tmp_path: Path, models_dir: Path) -> None:
    model = tinymodels.write_tiny_llama(models_dir / "progress.gguf", seed=3)
    d = start_daemon(tmp_path, [models_dir])
    try:
        seen: list[float] = []
        with d.client() as c:
            info = c.load_model(model, progress=seen.append)
            assert info["path"] == str(model)
            assert seen and seen == sorted(seen) and seen[-1] == 1.0
            again: list[float] = []
            assert c.load_model(model, progress=again.append)["id"] == info["id"]
            assert again == []  # already loaded: nothing to report
        other = tinymodels.write_tiny_llama(models_dir / "progress-2.gguf", seed=4)
        out = lorad(d.endpoint, "models", "load", str(other))
        assert out.returncode == 0, out.stderr
        assert "loading 100%" in out.stderr and out.stdout.strip() == "progress-2"
    finally:
        assert d.stop() == 0, d.log()


async def test_async_client_load_progress(daemon: DaemonProcess, models_dir: Path) -> None:
    from lorad.client import AsyncClient

    model = tinymodels.write_tiny_llama(models_dir / "progress-async.gguf", seed=5)
    seen: list[float] = []
    async with AsyncClient(daemon.endpoint) as c:
        info = await c.load_model(model, progress=seen.append)
        assert seen[-1] == 1.0 and info["path"] == str(model)
        await c.unload_model(info)
