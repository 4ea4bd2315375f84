"""Tiny, deterministic llama-architecture GGUF models and LoRA adapters for tests.

Everything here is generated from ``numpy.random.default_rng(seed)``, so the same
arguments always produce byte-identical files (tens of kB to ~1 MB).

Shape convention
----------------
Arrays are given in *numpy* order, exactly as passed to ``gguf.GGUFWriter.add_tensor``
(the writer reverses the shape into ggml's ``ne``). A matmul weight ``W`` is therefore
``(n_out, n_in)`` and the layer computes ``y = W @ x``:

* ``token_embd.weight``  ``(n_vocab, n_embd)`` (row ``t`` is the embedding of token ``t``)
* ``output.weight``      ``(n_vocab, n_embd)``
* ``blk.N.attn_q``       ``(n_embd, n_embd)``
* ``blk.N.attn_k``/``attn_v`` ``(n_head_kv * head_dim, n_embd)``
* ``blk.N.attn_output``  ``(n_embd, n_embd)``
* ``blk.N.ffn_gate``/``ffn_up`` ``(n_ff, n_embd)``; ``ffn_down`` ``(n_embd, n_ff)``
* norms ``(n_embd,)``

A LoRA pair for ``W`` is ``lora_a`` ``(rank, n_in)`` and ``lora_b`` ``(n_out, rank)``; with
adapter scale ``s`` llama.cpp applies ``W + s * alpha / rank * B @ A``.

llama-cpp-python 0.3.36 notes: ``llama_adapter_lora_init`` returns a *falsy pointer object*
(not ``None``) on failure, so ``Llama(lora_path=<bad file>)`` does not raise and segfaults on the
first decode; check adapters with ``if not adapter``. ``Llama.scores`` holds logits only when
the model was created with ``logits_all=True``.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike

import gguf
import numpy as np

__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "LAYER_TENSORS",
    "LoraSpec",
    "TinyVocab",
    "default_vocab",
    "merge_loras",
    "tiny_gemma3_tensors",
    "tiny_llama_tensors",
    "write_alora",
    "write_alora_bad_token_type",
    "write_garbage",
    "write_lora",
    "write_lora_bad_shape",
    "write_lora_missing_b",
    "write_lora_rank_mismatch",
    "write_lora_unknown_tensor",
    "write_lora_wrong_arch",
    "write_not_lora_gguf",
    "write_tiny_gemma3",
    "write_tiny_llama",
    "write_token_embd_lora",
    "write_truncated_gguf",
]

StrPath = str | PathLike[str]

DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

#: Per-layer weight names (without the ``blk.N.`` prefix and ``.weight`` suffix).
LAYER_TENSORS = (
    "attn_norm",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_norm",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
)

_SPACE = "\u2581"  # "▁", SentencePiece's word-boundary marker

# Whole words get a "▁" prefix; every prefix of them is added too so that the
# SentencePiece bigram merger can always reach the full word.
_WORDS = (
    "the a an and of to in is it that for on with as was he she you I they we be at by this "
    "have from or not but what all when there can hello Hello world World The model token "
    "text test good time day new say like just know make go see how your some them than then "
    "now look only come its over think also back after use two first way well want because "
    "any these give most us very long little Lo RA daemon café"
).split()
_SUBWORDS = (
    "ing ed er es ly tion th he in an re on at en nd ou ea ll or st ar te is it al "
    "ch sh wh ng ve se le ne ri ro co de"
).split()
_SINGLES = (
    list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
    + list(".,!?'\"-:;()<>|/")
    + ["é", "ü", "日", "本", "日本", "\U0001f642"]  # é ü 日 本 日本 🙂
)


@dataclass(frozen=True)
class TinyVocab:
    """A SentencePiece-style ("llama") vocabulary: parallel lists of pieces, scores, types."""

    tokens: list[str]
    scores: list[float]
    token_types: list[int]
    bos_id: int = 1
    eos_id: int = 2
    unk_id: int = 0

    def __post_init__(self) -> None:
        if not (len(self.tokens) == len(self.scores) == len(self.token_types)):
            raise ValueError("tokens, scores and token_types must have the same length")

    def __len__(self) -> int:
        return len(self.tokens)

    def token_id(self, piece: str) -> int:
        """Id of ``piece`` (raises ``ValueError`` if absent)."""
        return self.tokens.index(piece)


def default_vocab() -> TinyVocab:
    """``<unk>``, ``<s>``, ``</s>``, 256 byte tokens, then a few hundred normal pieces."""
    tokens = ["<unk>", "<s>", "</s>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [gguf.TokenType.BYTE] * 256
    scores = [0.0] * len(tokens)

    pieces: list[str] = [_SPACE]
    for word in _WORDS:
        w = _SPACE + word
        pieces += [w[:i] for i in range(2, len(w) + 1)]
    pieces += _SUBWORDS + _SINGLES
    seen: set[str] = set(tokens)
    for piece in pieces:
        if piece in seen:
            continue
        seen.add(piece)
        tokens.append(piece)
        types.append(gguf.TokenType.NORMAL)
        # Longer pieces win merges; ties broken by list order (like sentencepiece's -rank).
        scores.append(float(len(piece)) - 1e-3 * len(scores))
    return TinyVocab(tokens=tokens, scores=scores, token_types=[int(t) for t in types])


def _layer_shapes(
    n_embd: int, n_head: int, n_head_kv: int, n_ff: int
) -> dict[str, tuple[int, ...]]:
    if n_embd % n_head:
        raise ValueError("n_embd must be divisible by n_head")
    if n_head % n_head_kv:
        raise ValueError("n_head must be divisible by n_head_kv")
    n_kv = n_head_kv * (n_embd // n_head)
    return {
        "attn_norm": (n_embd,),
        "attn_q": (n_embd, n_embd),
        "attn_k": (n_kv, n_embd),
        "attn_v": (n_kv, n_embd),
        "attn_output": (n_embd, n_embd),
        "ffn_norm": (n_embd,),
        "ffn_gate": (n_ff, n_embd),
        "ffn_up": (n_ff, n_embd),
        "ffn_down": (n_embd, n_ff),
    }


def tiny_llama_tensors(
    *,
    seed: int = 0,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    n_vocab: int | None = None,
) -> dict[str, np.ndarray]:
    """The f32 tensors :func:`write_tiny_llama` writes, keyed by GGUF name (numpy shapes).

    ``n_vocab`` defaults to ``len(default_vocab())``.
    """
    if n_vocab is None:
        n_vocab = len(default_vocab())
    rng = np.random.default_rng(seed)

    def normal(shape: tuple[int, ...], std: float) -> np.ndarray:
        return rng.normal(0.0, std, size=shape).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + rng.normal(0.0, 0.05, size=(n,))).astype(np.float32)

    out: dict[str, np.ndarray] = {"token_embd.weight": normal((n_vocab, n_embd), 1.0)}
    shapes = _layer_shapes(n_embd, n_head, n_head_kv, n_ff)
    for i in range(n_layer):
        for name, shape in shapes.items():
            key = f"blk.{i}.{name}.weight"
            if name.endswith("_norm"):
                out[key] = norm(shape[0])
            else:
                # ~unit-variance outputs for unit-variance inputs, so layers matter.
                out[key] = normal(shape, 1.0 / np.sqrt(shape[1]))
    out["output_norm.weight"] = norm(n_embd)
    out["output.weight"] = normal((n_vocab, n_embd), 0.5)
    return out


def _add_dims(w: gguf.GGUFWriter, n_ctx_train: int, n_embd: int, n_layer: int, n_ff: int,
              n_head: int, n_head_kv: int) -> None:
    """The dimensions every tiny model declares (its architecture's keys)."""
    w.add_context_length(n_ctx_train)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)


def _add_vocab(w: gguf.GGUFWriter, vocab: TinyVocab) -> None:
    """The SentencePiece-style tokenizer of a tiny model (BOS added, EOS not)."""
    w.add_tokenizer_model("llama")
    w.add_token_list(vocab.tokens)
    w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.token_types)
    w.add_bos_token_id(vocab.bos_id)
    w.add_eos_token_id(vocab.eos_id)
    w.add_unk_token_id(vocab.unk_id)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)


def write_tiny_llama(
    path: StrPath,
    *,
    seed: int = 0,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    n_ctx_train: int = 512,
    vocab: TinyVocab | None = None,
    weights: Mapping[str, np.ndarray] | None = None,
    chat_template: str | None = DEFAULT_CHAT_TEMPLATE,
) -> pathlib.Path:
    """Write a tiny llama GGUF with random f32 weights; ``weights`` overrides tensors by name."""
    path = pathlib.Path(path)
    vocab = vocab if vocab is not None else default_vocab()
    tensors = tiny_llama_tensors(
        seed=seed,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        n_head_kv=n_head_kv,
        n_ff=n_ff,
        n_vocab=len(vocab),
    )
    for name, arr in (weights or {}).items():
        if name not in tensors:
            raise ValueError(f"unknown tensor {name!r}")
        if tuple(arr.shape) != tensors[name].shape:
            raise ValueError(f"{name}: shape {tuple(arr.shape)} != expected {tensors[name].shape}")
        tensors[name] = np.ascontiguousarray(arr, dtype=np.float32)

    arch = "llama"
    w = gguf.GGUFWriter(path, arch)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(f"tiny-llama-s{seed}")
    _add_dims(w, n_ctx_train, n_embd, n_layer, n_ff, n_head, n_head_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(len(vocab))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)

    _add_vocab(w, vocab)
    if chat_template is not None:
        w.add_chat_template(chat_template)

    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    _finish(w)
    return path


GEMMA3_LAYER_TENSORS = (
    "attn_norm",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_q_norm",
    "attn_k_norm",
    "attn_output",
    "post_attention_norm",
    "ffn_norm",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
    "post_ffw_norm",
)


def tiny_gemma3_tensors(
    *,
    seed: int = 0,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    n_vocab: int | None = None,
    tied: bool = True,
) -> dict[str, np.ndarray]:
    """The f32 tensors :func:`write_tiny_gemma3` writes (numpy shapes, GGUF names).

    Norm weights are stored as llama.cpp's gemma converter stores them: ``1 + w`` of Hugging
    Face's ``Gemma3RMSNorm.weight``. ``tied``: no ``output.weight`` (the output layer is the
    token embedding, as in the released gemma 3 models).
    """
    if n_vocab is None:
        n_vocab = len(default_vocab())
    head_dim = n_embd // n_head
    rng = np.random.default_rng(seed)

    def normal(shape: tuple[int, ...], std: float) -> np.ndarray:
        return rng.normal(0.0, std, size=shape).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + rng.normal(0.0, 0.05, size=(n,))).astype(np.float32)

    # gemma multiplies embeddings by sqrt(n_embd): keep the scaled rows near unit variance.
    out: dict[str, np.ndarray] = {"token_embd.weight": normal((n_vocab, n_embd), n_embd**-0.5)}
    shapes = {
        "attn_q": (n_head * head_dim, n_embd),
        "attn_k": (n_head_kv * head_dim, n_embd),
        "attn_v": (n_head_kv * head_dim, n_embd),
        "attn_output": (n_embd, n_head * head_dim),
        "ffn_gate": (n_ff, n_embd),
        "ffn_up": (n_ff, n_embd),
        "ffn_down": (n_embd, n_ff),
    }
    for i in range(n_layer):
        for name in GEMMA3_LAYER_TENSORS:
            key = f"blk.{i}.{name}.weight"
            if name in ("attn_q_norm", "attn_k_norm"):
                out[key] = norm(head_dim)
            elif name.endswith("_norm"):
                out[key] = norm(n_embd)
            else:
                out[key] = normal(shapes[name], 1.0 / np.sqrt(shapes[name][1]))
    out["output_norm.weight"] = norm(n_embd)
    if not tied:
        out["output.weight"] = normal((n_vocab, n_embd), 0.5)
    return out


def write_tiny_gemma3(
    path: StrPath,
    *,
    seed: int = 0,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    n_ctx_train: int = 512,
    tied: bool = True,
) -> pathlib.Path:
    """Write a tiny gemma3 GGUF (f32, no sliding window, the tiny SentencePiece vocabulary).

    llama.cpp scales its queries by ``1/sqrt(head_dim)`` (Hugging Face:
    ``query_pre_attn_scalar = head_dim``), uses one RoPE base (10000) for every layer and the
    tanh-approximated GELU."""
    path = pathlib.Path(path)
    vocab = default_vocab()
    tensors = tiny_gemma3_tensors(seed=seed, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                                  n_head_kv=n_head_kv, n_ff=n_ff, n_vocab=len(vocab), tied=tied)
    w = gguf.GGUFWriter(path, "gemma3")
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(f"tiny-gemma3-s{seed}{'' if tied else '-untied'}")
    _add_dims(w, n_ctx_train, n_embd, n_layer, n_ff, n_head, n_head_kv)
    w.add_key_length(n_embd // n_head)
    w.add_value_length(n_embd // n_head)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(len(vocab))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    _add_vocab(w, vocab)
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    _finish(w)
    return path


def _finish(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _write_adapter(
    path: StrPath,
    tensors: Mapping[str, np.ndarray],
    *,
    arch: str = "llama",
    alpha: float = 8.0,
    general_type: str = "adapter",
    invocation_tokens: Sequence[int] | None = None,
    invocation_type: gguf.GGUFValueType = gguf.GGUFValueType.UINT32,
) -> pathlib.Path:
    """Write an adapter GGUF with exactly the given tensors (no validation: used for bad files)."""
    path = pathlib.Path(path)
    w = gguf.GGUFWriter(path, arch)
    w.add_type(general_type)
    w.add_name("tiny-lora")
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    if invocation_tokens is not None:
        w.add_key_value(gguf.Keys.Adapter.ALORA_INVOCATION_TOKENS, list(invocation_tokens),
                        gguf.GGUFValueType.ARRAY, sub_type=invocation_type)
    for name, arr in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
    _finish(w)
    return path


@dataclass
class LoraSpec:
    """What :func:`write_lora` wrote: ``tensors`` maps base tensor name -> ``(A, B)``."""

    path: pathlib.Path
    alpha: float
    rank: int
    tensors: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def delta(self, name: str, scale: float = 1.0) -> np.ndarray:
        """``scale * alpha / rank * B @ A`` for base tensor ``name`` (numpy ``(n_out, n_in)``)."""
        a, b = self.tensors[name]
        return (scale * self.alpha / self.rank) * (b.astype(np.float64) @ a.astype(np.float64))

    def merged(
        self, base_tensors: Mapping[str, np.ndarray], scale: float = 1.0
    ) -> dict[str, np.ndarray]:
        """Copy of ``base_tensors`` with this adapter merged in at ``scale`` (f32)."""
        return merge_loras(base_tensors, [(self, scale)])


def merge_loras(
    base_tensors: Mapping[str, np.ndarray], stack: Iterable[tuple[LoraSpec, float]]
) -> dict[str, np.ndarray]:
    """Base tensors with every ``(spec, scale)`` of ``stack`` merged in (f32 copies)."""
    acc = {k: np.asarray(v, dtype=np.float64) for k, v in base_tensors.items()}
    for spec, scale in stack:
        for name in spec.tensors:
            acc[name] = acc[name] + spec.delta(name, scale)
    return {k: v.astype(np.float32) for k, v in acc.items()}


def _target_names(
    base_tensors: Mapping[str, np.ndarray], targets: Sequence[str], layers: Iterable[int] | None
) -> list[str]:
    n_layer = 0
    while f"blk.{n_layer}.attn_norm.weight" in base_tensors:
        n_layer += 1
    layer_ids = list(range(n_layer)) if layers is None else list(layers)
    names = []
    for target in targets:
        if target.endswith(".weight"):  # a full tensor name, e.g. "output.weight"
            if target.startswith("token_embd"):
                raise ValueError("token_embd LoRA (transposed layout) is not supported")
            names.append(target)
            continue
        names += [f"blk.{i}.{target}.weight" for i in layer_ids]
    for name in names:
        if name not in base_tensors or base_tensors[name].ndim != 2:
            raise ValueError(f"no 2-D base tensor {name!r} to target")
    return names


def write_lora(
    path: StrPath,
    base_tensors: Mapping[str, np.ndarray],
    *,
    targets: Sequence[str] = ("attn_q", "attn_v"),
    layers: Iterable[int] | None = None,
    rank: int = 4,
    alpha: float = 8.0,
    seed: int = 1,
    arch: str = "llama",
    std: float = 0.1,
    invocation_tokens: Sequence[int] | None = None,
) -> LoraSpec:
    """Write a llama.cpp LoRA adapter with random (non-zero) A and B for each target.

    ``targets`` are per-layer names (``"attn_q"``, ``"ffn_up"``, ...) applied to ``layers``
    (default: all), or full tensor names ending in ``.weight`` (e.g. ``"output.weight"``).
    With ``invocation_tokens`` it is an activated LoRA (aLoRA).
    """
    rng = np.random.default_rng(seed)
    spec = LoraSpec(path=pathlib.Path(path), alpha=float(alpha), rank=rank)
    out: dict[str, np.ndarray] = {}
    for name in _target_names(base_tensors, targets, layers):
        n_out, n_in = base_tensors[name].shape
        a = rng.normal(0.0, std, size=(rank, n_in)).astype(np.float32)
        b = rng.normal(0.0, std, size=(n_out, rank)).astype(np.float32)
        spec.tensors[name] = (a, b)
        out[f"{name}.lora_a"] = a
        out[f"{name}.lora_b"] = b
    _write_adapter(path, out, arch=arch, alpha=alpha, invocation_tokens=invocation_tokens)
    return spec


def write_token_embd_lora(
    path: StrPath, model: StrPath, *, rank: int = 4, alpha: float = 4.0, seed: int = 5
) -> pathlib.Path:
    """A LoRA of ``token_embd.weight`` for the model GGUF at ``model``, in llama.cpp's
    embedding layout: ``lora_a`` ``(n_vocab, rank)`` (rows gathered per token), ``lora_b``
    ``(n_embd, rank)``; the architecture is the model's."""
    reader = gguf.GGUFReader(model)
    arch = reader.get_field("general.architecture").contents()
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    n_embd, n_vocab = (int(n) for n in embd.shape)
    rng = np.random.default_rng(seed)
    tensors = {"token_embd.weight.lora_a": rng.normal(0.0, 0.1, size=(n_vocab, rank)),
               "token_embd.weight.lora_b": rng.normal(0.0, 0.1, size=(n_embd, rank))}
    return _write_adapter(path, tensors, arch=arch, alpha=alpha)


# --- purpose-made bad files ---------------------------------------------------------------


def _ab(
    base: Mapping[str, np.ndarray], name: str, rank_a: int = 4, rank_b: int = 4, extra_in: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    n_out, n_in = base[name].shape
    a = rng.normal(0.0, 0.1, size=(rank_a, n_in + extra_in)).astype(np.float32)
    b = rng.normal(0.0, 0.1, size=(n_out, rank_b)).astype(np.float32)
    return a, b


def write_lora_wrong_arch(path: StrPath, base: Mapping[str, np.ndarray]) -> pathlib.Path:
    """A well-formed LoRA whose ``general.architecture`` is ``gpt2``."""
    return write_lora(path, base, arch="gpt2").path


def write_lora_missing_b(path: StrPath, base: Mapping[str, np.ndarray]) -> pathlib.Path:
    """A complete ``blk.0.attn_q`` pair plus a ``blk.0.attn_v`` ``lora_a`` without ``lora_b``."""
    a, b = _ab(base, "blk.0.attn_q.weight")
    a_v, _ = _ab(base, "blk.0.attn_v.weight")
    tensors = {
        "blk.0.attn_q.weight.lora_a": a,
        "blk.0.attn_q.weight.lora_b": b,
        "blk.0.attn_v.weight.lora_a": a_v,
    }
    return _write_adapter(path, tensors)


def write_lora_rank_mismatch(path: StrPath, base: Mapping[str, np.ndarray]) -> pathlib.Path:
    """``lora_a`` of rank 4 with a ``lora_b`` of rank 3."""
    a, b = _ab(base, "blk.0.attn_q.weight", rank_a=4, rank_b=3)
    return _write_adapter(path, {"blk.0.attn_q.weight.lora_a": a, "blk.0.attn_q.weight.lora_b": b})


def write_lora_bad_shape(path: StrPath, base: Mapping[str, np.ndarray]) -> pathlib.Path:
    """``lora_a`` whose ``n_in`` is one larger than the base tensor's."""
    a, b = _ab(base, "blk.0.attn_q.weight", extra_in=1)
    return _write_adapter(path, {"blk.0.attn_q.weight.lora_a": a, "blk.0.attn_q.weight.lora_b": b})


def write_lora_unknown_tensor(path: StrPath, base: Mapping[str, np.ndarray]) -> pathlib.Path:
    """A LoRA pair for ``blk.99.attn_q.weight``, which the base model lacks."""
    a, b = _ab(base, "blk.0.attn_q.weight")
    return _write_adapter(
        path, {"blk.99.attn_q.weight.lora_a": a, "blk.99.attn_q.weight.lora_b": b}
    )


def write_alora(
    path: StrPath, base: Mapping[str, np.ndarray], invocation_tokens: Sequence[int] = (5, 6, 7)
) -> pathlib.Path:
    """A well-formed activated LoRA (aLoRA): a pair for ``blk.0.attn_q`` plus invocation
    tokens (``adapter.alora.invocation_tokens``, uint32, as llama.cpp expects)."""
    a, b = _ab(base, "blk.0.attn_q.weight")
    return _write_adapter(path, {"blk.0.attn_q.weight.lora_a": a, "blk.0.attn_q.weight.lora_b": b},
                          invocation_tokens=invocation_tokens)


def write_alora_bad_token_type(path: StrPath, base: Mapping[str, np.ndarray]) -> pathlib.Path:
    """An aLoRA whose invocation tokens are an int32 array: llama.cpp refuses to load it
    ("invalid gguf element type"), although every tensor is fine."""
    a, b = _ab(base, "blk.0.attn_q.weight")
    return _write_adapter(path, {"blk.0.attn_q.weight.lora_a": a, "blk.0.attn_q.weight.lora_b": b},
                          invocation_tokens=[5, 6, 7], invocation_type=gguf.GGUFValueType.INT32)


def write_not_lora_gguf(path: StrPath) -> pathlib.Path:
    """A valid (loadable) tiny model GGUF, ``general.type = "model"``: not an adapter."""
    return write_tiny_llama(path, n_embd=32, n_layer=1, n_head=2, n_head_kv=1, n_ff=64)


def write_garbage(path: StrPath, size: int = 4096, seed: int = 0) -> pathlib.Path:
    """Random bytes that are not a GGUF (the magic is never ``GGUF``)."""
    path = pathlib.Path(path)
    data = bytearray(np.random.default_rng(seed).bytes(size))
    if data[:4] == b"GGUF":
        data[0] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def write_truncated_gguf(path: StrPath, good_path: StrPath) -> pathlib.Path:
    """The first half of ``good_path``."""
    path = pathlib.Path(path)
    data = pathlib.Path(good_path).read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path
