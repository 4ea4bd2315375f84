"""Checks that the tiny GGUF fixtures in ``tinymodels`` are what llama.cpp expects."""

from __future__ import annotations

import ctypes
import pathlib

import gguf
import numpy as np
import pytest

from tinymodels import (
    DEFAULT_CHAT_TEMPLATE,
    default_vocab,
    merge_loras,
    tiny_llama_tensors,
    write_garbage,
    write_lora,
    write_lora_bad_shape,
    write_lora_missing_b,
    write_lora_rank_mismatch,
    write_lora_unknown_tensor,
    write_lora_wrong_arch,
    write_not_lora_gguf,
    write_tiny_llama,
    write_truncated_gguf,
)

llama_cpp = pytest.importorskip("llama_cpp")

PROMPT = b"Hello world, the cafe is good"


def _llama(path: pathlib.Path, **kw) -> llama_cpp.Llama:
    return llama_cpp.Llama(
        model_path=str(path), n_ctx=256, n_threads=2, verbose=False, seed=0, logits_all=True, **kw
    )


def _last_logits(llm: llama_cpp.Llama, prompt: bytes = PROMPT) -> np.ndarray:
    toks = llm.tokenize(prompt)
    llm.reset()
    llm.eval(toks)  # Llama.scores is only filled with logits_all=True
    logits = np.array(llm.scores[len(toks) - 1], dtype=np.float64)
    assert logits.std() > 0.1
    return logits


def _greedy(llm: llama_cpp.Llama, prompt: bytes, n: int = 32) -> list[int]:
    out: list[int] = []
    for tok in llm.generate(llm.tokenize(prompt), temp=0.0):
        out.append(tok)
        if len(out) == n:
            break
    return out


def _close_logits(a: np.ndarray, b: np.ndarray) -> None:
    scale = max(1.0, float(np.abs(b).max()))
    assert np.abs(a - b).max() < 1e-3 * scale


def test_deterministic_files(tmp_path: pathlib.Path) -> None:
    a = write_tiny_llama(tmp_path / "a.gguf", seed=3)
    b = write_tiny_llama(tmp_path / "b.gguf", seed=3)
    c = write_tiny_llama(tmp_path / "c.gguf", seed=4)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    assert a.stat().st_size < 1_000_000

    reader = gguf.GGUFReader(a)
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["tokenizer.chat_template"].contents() == DEFAULT_CHAT_TEMPLATE
    expected = tiny_llama_tensors(seed=3)
    assert {t.name for t in reader.tensors} == set(expected)
    for t in reader.tensors:
        np.testing.assert_array_equal(np.asarray(t.data), expected[t.name])

    no_tmpl = write_tiny_llama(tmp_path / "d.gguf", chat_template=None)
    assert "tokenizer.chat_template" not in gguf.GGUFReader(no_tmpl).fields


def test_weights_override_validated(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError):
        write_tiny_llama(tmp_path / "x.gguf", weights={"nope.weight": np.zeros(3)})
    with pytest.raises(ValueError):
        write_tiny_llama(tmp_path / "x.gguf", weights={"output.weight": np.zeros((3, 3))})


def test_loads_tokenizes_and_generates(tmp_path: pathlib.Path) -> None:
    path = write_tiny_llama(tmp_path / "m.gguf")
    llm = _llama(path)
    vocab = default_vocab()
    assert llm.n_vocab() == len(vocab)
    assert llm.token_bos() == vocab.bos_id and llm.token_eos() == vocab.eos_id

    text = "Hello world, the café"
    toks = llm.tokenize(text.encode())
    assert toks[0] == vocab.bos_id
    pieces = [vocab.tokens[t] for t in toks[1:]]
    assert pieces == ["▁Hello", "▁world", ",", "▁the", "▁café"]
    assert llm.detokenize(toks).decode() == text

    # Characters outside the vocabulary fall back to byte tokens and round-trip.
    rare = "straße ✓"
    toks = llm.tokenize(rare.encode())
    assert "<0xC3>" in [vocab.tokens[t] for t in toks]
    assert llm.detokenize(toks).decode() == rare

    first = _greedy(llm, b"Hello world, the")
    assert len(first) == 32 and len(set(first)) >= 4
    assert _greedy(llm, b"Hello world, the") == first
    assert _greedy(_llama(path), b"Hello world, the") == first


@pytest.mark.parametrize("scale", [1.0, -0.5])
def test_lora_matches_merged_model(tmp_path: pathlib.Path, scale: float) -> None:
    base = tiny_llama_tensors()
    base_path = write_tiny_llama(tmp_path / "base.gguf")
    spec = write_lora(
        tmp_path / "lora.gguf", base, targets=("attn_q", "attn_v", "ffn_down", "output.weight")
    )
    merged_path = write_tiny_llama(tmp_path / "merged.gguf", weights=spec.merged(base, scale))

    plain = _last_logits(_llama(base_path))
    with_lora = _last_logits(_llama(base_path, lora_path=str(spec.path), lora_scale=scale))
    merged = _last_logits(_llama(merged_path))
    assert np.abs(with_lora - plain).max() > 0.1  # the adapter visibly changes the output
    _close_logits(with_lora, merged)


def test_lora_stack_low_level_api(tmp_path: pathlib.Path) -> None:
    base = tiny_llama_tensors()
    base_path = write_tiny_llama(tmp_path / "base.gguf")
    s1 = write_lora(tmp_path / "l1.gguf", base, targets=("attn_q", "attn_v"), seed=1)
    s2 = write_lora(
        tmp_path / "l2.gguf", base, targets=("attn_k", "ffn_up"), layers=[1], rank=2, seed=2
    )
    stack = [(s1, 0.7), (s2, -1.5)]
    merged_path = write_tiny_llama(tmp_path / "merged.gguf", weights=merge_loras(base, stack))

    llm = _llama(base_path)
    plain = _last_logits(llm)
    adapters = [
        llama_cpp.llama_adapter_lora_init(llm.model, str(s.path).encode()) for s, _ in stack
    ]
    assert all(adapters)  # NULL on failure is a falsy pointer object, never None
    arr = (llama_cpp.llama_adapter_lora_p_ctypes * len(stack))(*adapters)
    scales = (ctypes.c_float * len(stack))(*[sc for _, sc in stack])
    assert llama_cpp.llama_set_adapters_lora(llm._ctx.ctx, arr, len(stack), scales) == 0
    stacked = _last_logits(llm)
    assert np.abs(stacked - plain).max() > 0.1
    _close_logits(stacked, _last_logits(_llama(merged_path)))


def _bad_files(tmp_path: pathlib.Path) -> dict[str, pathlib.Path]:
    base = tiny_llama_tensors()
    good = write_lora(tmp_path / "good.gguf", base).path
    return {
        "wrong_arch": write_lora_wrong_arch(tmp_path / "wrong_arch.gguf", base),
        "missing_b": write_lora_missing_b(tmp_path / "missing_b.gguf", base),
        "rank_mismatch": write_lora_rank_mismatch(tmp_path / "rank.gguf", base),
        "bad_shape": write_lora_bad_shape(tmp_path / "shape.gguf", base),
        "unknown_tensor": write_lora_unknown_tensor(tmp_path / "unknown.gguf", base),
        "not_lora": write_not_lora_gguf(tmp_path / "model.gguf"),
        "garbage": write_garbage(tmp_path / "garbage.gguf"),
        "truncated": write_truncated_gguf(tmp_path / "trunc.gguf", good),
    }


def test_bad_files_written(tmp_path: pathlib.Path) -> None:
    files = _bad_files(tmp_path)
    for path in files.values():
        assert path.is_file() and path.stat().st_size > 0
    assert files["garbage"].read_bytes()[:4] != b"GGUF"


def test_bad_files_refused_by_llama_cpp(tmp_path: pathlib.Path) -> None:
    llm = _llama(write_tiny_llama(tmp_path / "base.gguf"))
    for name, path in _bad_files(tmp_path).items():
        adapter = llama_cpp.llama_adapter_lora_init(llm.model, str(path).encode())
        assert not adapter, name
