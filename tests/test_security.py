"""Boundaries between clients, and limits answered with typed errors."""

from __future__ import annotations

from pathlib import Path

import pytest

import tinymodels
from conftest import DaemonProcess, start_daemon
from lorad.client import BadRequest, Client, NotFound, TooLarge

PROMPT = "Hello world, the cat and the dog"


def test_private_contexts_are_invisible_to_other_clients(daemon: DaemonProcess,
                                                         tiny_model: Path) -> None:
    with daemon.client() as alice, daemon.client() as bob:
        private = alice.create_context(tiny_model, n_ctx=128)
        shared = alice.create_context(tiny_model, n_ctx=128, shared=True)
        try:
            assert {c["id"] for c in alice.list_contexts()} >= {private.id, shared.id}
            seen_by_bob = {c["id"] for c in bob.list_contexts()}
            assert private.id not in seen_by_bob and shared.id in seen_by_bob
            assert private.id not in {c["id"] for c in bob.status()["contexts"]}
            # Every operation on another client's private context is not_found, exactly as for
            # a context that does not exist (no information about it leaks).
            calls = [
                lambda ctx: bob._call("generate", {"context": ctx, "prompt": "x"}),
                lambda ctx: bob._call("close_context", {"context": ctx}),
                lambda ctx: bob._call("tokenize", {"context": ctx, "text": "x"}),
                lambda ctx: bob._call("set_lora", {"context": ctx, "path": "x"}),
                lambda ctx: bob._call("list_loras", {"context": ctx}),
                lambda ctx: bob._call("clear_loras", {"context": ctx}),
            ]
            for call in calls:
                with pytest.raises(NotFound) as theirs:
                    call(private.id)
                with pytest.raises(NotFound) as missing:
                    call("ctx-00000000")
                assert theirs.value.message.replace(private.id, "ID") == \
                    missing.value.message.replace("ctx-00000000", "ID")
            with pytest.raises(NotFound):
                bob.context(private.id)
            # The shared one works for both; the private one still works for its creator.
            assert bob.context(shared.id).generate(PROMPT, max_tokens=2).collect() is not None
            assert private.generate(PROMPT, max_tokens=2, temperature=0).collect()
            assert private.info["shared"] is False and shared.info["shared"] is True
        finally:
            private.close()
            shared.close()


def test_persistent_contexts_must_be_shared(client: Client, tiny_model: Path) -> None:
    with pytest.raises(BadRequest) as err:
        client.create_context(tiny_model, n_ctx=128, persistent=True)
    assert err.value.details["field"] == "persistent"


@pytest.fixture
def limited(tmp_path: Path, models_dir: Path, tiny_model: Path) -> DaemonProcess:
    config = tmp_path / "lorad.toml"
    config.write_text(
        "[limits]\nmax_contexts = 3\nmax_contexts_per_client = 2\nmax_n_ctx = 256\n"
        "max_streams_per_client = 1\nmax_adapter_bytes = 10000\n")
    d = start_daemon(tmp_path, [models_dir], "--config", str(config))
    yield d
    assert d.stop() == 0, d.log()


def test_limits_are_typed_errors(limited: DaemonProcess, models_dir: Path,
                                 tiny_model: Path) -> None:
    base = tinymodels.tiny_llama_tensors(seed=0)
    small = tinymodels.write_lora(models_dir / "small.gguf", base, rank=2)  # 4 KiB
    big = tinymodels.write_lora(models_dir / "big.gguf", base, rank=8, seed=3)  # 16 KiB
    with limited.client() as a, limited.client() as b:
        with pytest.raises(TooLarge) as err:
            a.create_context(tiny_model, n_ctx=512)
        assert err.value.details["limit"] == "max_n_ctx"
        one = a.create_context(tiny_model, n_ctx=128)
        a.create_context(tiny_model, n_ctx=128)
        with pytest.raises(TooLarge) as err:
            a.create_context(tiny_model, n_ctx=128)
        assert err.value.details["limit"] == "max_contexts_per_client"
        b.create_context(tiny_model, n_ctx=128)
        with pytest.raises(TooLarge) as err:
            b.create_context(tiny_model, n_ctx=128)
        assert err.value.details["limit"] == "max_contexts"
        # One stream at a time per client: a second concurrent one is refused.
        running = one.generate(PROMPT, max_tokens=100, credit=1, temperature=0)
        it = iter(running)
        next(it)
        with pytest.raises(TooLarge) as err:
            one.generate(PROMPT, max_tokens=1).collect()
        assert err.value.details["limit"] == "max_streams_per_client"
        running.cancel()
        list(it)
        assert one.generate(PROMPT, max_tokens=1, temperature=0).collect() is not None
        # Adapter memory: the small adapter fits, the big one would pass the total.
        one.set_lora(small.path)
        with pytest.raises(TooLarge) as err:
            one.set_lora(big.path)
        assert err.value.details["limit"] == "max_adapter_bytes"
        assert [e["path"] for e in one.loras()] == [str(small.path)]
        assert a.ping()["pong"] and b.ping()["pong"]
