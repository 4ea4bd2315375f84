"""A model's chat template given at load: ``load_model(chat_template=...)`` and
``lorad serve --chat-template NAME|FILE``, through both doors."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest

import tinymodels
from conftest import DaemonProcess, start_daemon
from lorad.client import BadRequest, model_file

CHAT = [{"role": "user", "content": "hello there, the cat"}]
JINJA = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
         "{% if add_generation_prompt %}[assistant] {% endif %}")


def _http_url(d: DaemonProcess) -> str:
    for line in d.log().splitlines():
        if '"serving"' in line:
            return json.loads(line)["http"]
    raise AssertionError(d.log())


@pytest.fixture(scope="module")
def bare(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("templates")
    return tinymodels.write_tiny_llama(root / "bare.gguf", seed=0, chat_template=None)


def _greedy_chat(ctx, template: str | None = None) -> str:
    return ctx.chat(CHAT, max_tokens=8, temperature=0, template=template).collect()


def test_a_template_given_at_load_is_the_models(tmp_path: Path, bare: Path) -> None:
    d = start_daemon(tmp_path, [bare.parent])
    try:
        with d.client() as c:
            with pytest.raises(BadRequest) as e:
                c.load_model(bare, chat_template="no-such-template")
            assert e.value.details["field"] == "chat_template"
            assert "chatml" in e.value.details["builtin"]
            info = c.load_model(bare, alias="bare", chat_template=JINJA)
            assert info["chat_template"] is True
            with c.create_context("bare", n_ctx=256) as ctx:
                # the model's template is the one given: the same as naming it per request
                assert _greedy_chat(ctx) == _greedy_chat(ctx, JINJA)
                assert _greedy_chat(ctx) != _greedy_chat(ctx, "chatml")
            with pytest.raises(BadRequest) as e:  # the same file, another template
                c.load_model(bare, chat_template="chatml")
            assert e.value.details["field"] == "chat_template"
            assert c.load_model(bare, chat_template=JINJA)["id"] == "bare"  # the same: shared
    finally:
        assert d.stop() == 0, d.log()


def test_serve_chat_template_file_chats_through_both_doors(tmp_path: Path, bare: Path) -> None:
    template = tmp_path / "turns.jinja"
    template.write_text(JINJA)
    d = start_daemon(tmp_path, [bare.parent], "--model", str(bare), "--alias", "bare",
                     "--n-ctx", "256", "--chat-template", str(template),
                     "--http", "127.0.0.1:0")
    try:
        with d.client() as c:
            ctx = c.context("default")
            expected = _greedy_chat(ctx, JINJA)
            assert _greedy_chat(ctx) == expected
        api = openai.OpenAI(base_url=_http_url(d) + "/v1", api_key="-", max_retries=0)
        reply = api.chat.completions.create(model="bare", messages=CHAT, max_tokens=8,
                                            temperature=0)
        assert reply.choices[0].message.content == expected
    finally:
        assert d.stop() == 0, d.log()


def test_serve_chat_template_by_name_and_its_refusals(tmp_path: Path, bare: Path) -> None:
    d = start_daemon(tmp_path, [bare.parent], "--model", str(bare), "--n-ctx", "256",
                     "--chat-template", "chatml")
    try:
        with d.client() as c:
            ctx = c.context("default")
            assert _greedy_chat(ctx) == _greedy_chat(ctx, "chatml")
    finally:
        assert d.stop() == 0, d.log()
    # without a model to apply it to, or naming a file that is not there: refused at start
    (tmp_path / "none").mkdir()
    (tmp_path / "nofile").mkdir()
    with pytest.raises(RuntimeError, match="--chat-template applies to the models"):
        start_daemon(tmp_path / "none", [bare.parent], "--chat-template", "chatml",
                     ready_timeout=30)
    with pytest.raises(RuntimeError, match="no such file"):
        start_daemon(tmp_path / "nofile", [bare.parent], "--model", str(bare),
                     "--chat-template", str(tmp_path / "missing.jinja"), ready_timeout=30)


def test_a_template_added_to_a_files_metadata_is_read_by_llama_cpp(tmp_path: Path,
                                                                    bare: Path) -> None:
    """What ``lorad default-model`` does to the default model (an older file, without the
    template, is given it in place), on a tiny model: only the header changes."""
    copy = tmp_path / "m.gguf"
    copy.write_bytes(bare.read_bytes())
    assert not model_file.has_key(copy, model_file.CHAT_TEMPLATE_KEY)
    model_file.assemble_default_model(copy)
    assert model_file.has_key(copy, model_file.CHAT_TEMPLATE_KEY)
    old, new = bare.read_bytes(), copy.read_bytes()
    assert new.endswith(old[-100_000:])  # the tensor data, unchanged
    d = start_daemon(tmp_path, [tmp_path, bare.parent])
    try:
        with d.client() as c:
            info = c.load_model(copy, alias="m")
            assert info["chat_template"] is True
            gemma = model_file.GEMMA3_CHAT_TEMPLATE
            with (c.create_context("m", n_ctx=256) as ctx,
                  c.create_context(str(bare), n_ctx=256) as plain):
                assert _greedy_chat(ctx) == _greedy_chat(ctx, gemma)
                # the same weights: the same tokens
                assert (ctx.generate("the cat", max_tokens=8, temperature=0).collect()
                        == plain.generate("the cat", max_tokens=8, temperature=0).collect())
    finally:
        assert d.stop() == 0, d.log()
