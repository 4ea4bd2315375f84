"""PEFT LoRA adapters (``adapter_config.json`` + ``adapter_model.safetensors``) to llama.cpp
LoRA GGUF files, for a given model's architecture. Pure Python (numpy, safetensors, gguf).

Names are mapped with the ``gguf`` package's tensor-name maps (``model.layers.0.self_attn.q_proj``
-> ``blk.0.attn_q.weight``). llama.cpp's converter permutes the rows of the query and key
weights of llama-family models (its RoPE layout differs from Hugging Face's); a LoRA delta
``B @ A`` of those weights gets the same row permutation, which is a permutation of ``B``'s rows.

Scaling. PEFT scales each module by ``alpha_m / r_m`` (``alpha_m / sqrt(r_m)`` with rsLoRA),
where ``r_m`` and ``alpha_m`` come from the first key of ``rank_pattern`` / ``alpha_pattern``
that matches the module's name as PEFT matches it (``re.match(rf"(.*\\.)?({key})$", name)``),
else from ``r`` / ``lora_alpha``. llama.cpp scales every pair by the file's one ``alpha`` over
the pair's rank (or by 1 when ``alpha`` is 0), so the ratio of the two is folded into ``B``.

Embeddings and the output layer. A LoRA of ``embed_tokens`` (``lora_embedding_A`` ``(r,
n_vocab)``, ``lora_embedding_B`` ``(n_embd, r)``) becomes llama.cpp's ``token_embd`` layout:
``lora_a = A.T`` ``(n_vocab, r)``, whose rows llama.cpp gathers per token, and ``lora_b = B``,
which it multiplies them by; llama.cpp adds the delta before an architecture's embedding scale
(Gemma's ``sqrt(n_embd)``), as PEFT does. A LoRA of ``lm_head`` is a plain ``output`` LoRA. On a
model whose output layer is its token embedding (no ``output.weight``), llama.cpp applies a
``token_embd`` LoRA at the output as well, with a layout that does not fit there (it aborts at
the first decode), and has no separate output tensor an ``lm_head`` LoRA could target: such
adapters are refused (``tied_embeddings``). The copy of those modules' weights that PEFT saves
beside them (``base_layer.weight``) is not part of the adapter and is skipped.

What cannot be converted faithfully is refused with ``lora_unsupported`` and the reason.

Files. Both files are read once into private memory (:class:`PeftFiles`, bounded by
``limits.max_adapter_file_bytes``; a file that changes while it is read is refused), never
memory-mapped: the cache key, the checks and the conversion see the same bytes, and a client that
truncates the weights meanwhile cannot crash the daemon.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from lorad.protocol import DEFAULT_LIMITS, ErrorCode, ProtocolError

from .lora import expected_pair_shapes, read_model_header
from .snapshot import read_private

CONVERTER_VERSION = 2
"""Part of the cache key: a converted file from an older converter is converted again."""
PERMUTED_QK_ARCHS = {"llama", "granite"}
"""Architectures whose q/k weights llama.cpp's converter permutes (see module docstring)."""
_PREFIX = r"^(?:base_model\.model\.)?(?P<module>.+)\."
_LINEAR = re.compile(_PREFIX + r"lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
_EMBEDDING = re.compile(_PREFIX + r"lora_embedding_(?P<ab>[AB])(?:\.[^.]+)?$")
_BASE_LAYER = re.compile(_PREFIX + r"base_layer\.weight$")
TOKEN_EMBD, OUTPUT = "token_embd.weight", "output.weight"

_VARIANTS = {
    "use_dora": "dora", "fan_in_fan_out": "fan_in_fan_out", "use_qalora": "qalora",
    "velora_config": "velora", "monteclora_config": "monteclora", "use_bdlora": "bdlora",
    "arrow_config": "arrow", "kasa_config": "kasa", "alora_invocation_tokens": "alora",
    "layer_replication": "layer_replication", "target_parameters": "target_parameters",
    "trainable_token_indices": "trainable_tokens", "lora_bias": "lora_bias",
}
"""Config keys that, when set, make PEFT compute something other than ``W x + s B A x`` (or
change the model itself): such adapters are refused, with the mapped name as the reason."""


def is_peft_dir(path: Path) -> bool:
    return path.is_dir() and (path / "adapter_config.json").is_file()


CONFIG_MAX_BYTES = 1024 * 1024
"""The largest ``adapter_config.json`` read (real ones are a few KiB)."""


@dataclass(frozen=True)
class PeftFiles:
    """Private copies of a PEFT adapter's two files, read once (see :mod:`.snapshot`): the
    cache key, the checks and the conversion all see the same bytes."""

    config: bytes
    weights: bytes | None
    """None: there is no ``adapter_model.safetensors``."""

    @classmethod
    def read(cls, peft_dir: Path, max_bytes: int = DEFAULT_LIMITS.max_adapter_file_bytes
             ) -> PeftFiles:
        """Both files of ``peft_dir``, the weights bounded by ``max_bytes``
        (``limits.max_adapter_file_bytes``), the config by :data:`CONFIG_MAX_BYTES`; raises
        ``too_large``, ``lora_file_not_found`` or ``lora_load_failed`` (changed meanwhile)."""
        config, _ = read_private(peft_dir / "adapter_config.json", CONFIG_MAX_BYTES,
                                 "the bound of an adapter_config.json")
        weights_file = peft_dir / "adapter_model.safetensors"
        weights = read_private(weights_file, max_bytes)[0] if weights_file.is_file() else None
        return cls(config, weights)

    def digest(self) -> str:
        """A digest of the config and the weights (what a converted file is cached under)."""
        h = hashlib.sha256()
        for name, data in (("adapter_config.json", self.config),
                           ("adapter_model.safetensors", self.weights)):
            h.update(name.encode())
            if data is not None:
                h.update(data)
        return h.hexdigest()[:32]


def _refuse(path: Path, reason: str, message: str, **details: Any) -> ProtocolError:
    return ProtocolError(ErrorCode.LORA_UNSUPPORTED, f"{path.name}: {message}", path=str(path),
                         reason=reason, **details)


def _invalid(path: Path, message: str, **details: Any) -> ProtocolError:
    return ProtocolError(ErrorCode.LORA_INVALID, f"{path.name}: {message}", path=str(path),
                         **details)


def _incompatible(path: Path, message: str, **details: Any) -> ProtocolError:
    return ProtocolError(ErrorCode.LORA_INCOMPATIBLE, f"{path.name}: {message}",
                         path=str(path), **details)


def _permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` of a q/k weight's rows."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _number(peft_dir: Path, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _invalid(peft_dir, f"{name} must be a finite number, not {value!r}", field=name)
    return float(value)


def _patterns(peft_dir: Path, config: dict[str, Any], name: str) -> list[tuple[re.Pattern, Any]]:
    """``rank_pattern`` or ``alpha_pattern`` as PEFT matches them, in the file's order."""
    patterns = config.get(name) or {}
    if not isinstance(patterns, dict):
        raise _invalid(peft_dir, f"{name} must be an object, not {patterns!r}", field=name)
    out = []
    for key, value in patterns.items():
        try:
            out.append((re.compile(rf"(.*\.)?({key})$"), value))
        except re.error as exc:
            raise _invalid(peft_dir, f"{name} key {key!r} is not a regular expression ({exc})",
                           field=name, key=key) from None
    return out


def pattern_value(patterns: list[tuple[re.Pattern, Any]], module: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the value of the first key that matches ``module``."""
    return next((v for p, v in patterns if p.match(module)), default)


def convert_peft(peft_dir: Path, model_path: Path, out: Path, *,
                 max_bytes: int = DEFAULT_LIMITS.max_adapter_file_bytes) -> Path:
    """Write the llama.cpp LoRA GGUF for ``peft_dir`` and the model at ``model_path``, from
    private copies of the adapter's files (the weights at most ``max_bytes``)."""
    return _convert(peft_dir, PeftFiles.read(peft_dir, max_bytes), model_path, out)


@dataclass(frozen=True)
class PeftAdapter:
    """A PEFT LoRA adapter, read and checked (see :func:`read_adapter`): its pairs by module,
    and PEFT's scaling of each."""

    path: Path
    r: float
    alpha: float
    rslora: bool
    rank_patterns: list[tuple[re.Pattern, Any]]
    alpha_patterns: list[tuple[re.Pattern, Any]]
    pairs: dict[str, dict[str, np.ndarray]]
    """Module name -> ``{"A": ..., "B": ...}`` as PEFT saved them (float32)."""
    embedding: set[str]
    """The modules whose pair is an embedding LoRA (``lora_embedding_A/B``)."""
    base_layers: dict[str, tuple[int, ...]]
    """The shapes of the base weights PEFT saved beside some pairs."""

    def scaling(self, module: str, rank: int) -> float:
        """PEFT's scale of ``module``'s delta (``alpha_m / r_m``, or ``/ sqrt(r_m)`` with
        rsLoRA); ``lora_invalid`` when its pair's ``rank`` is not the config's."""
        r_m = _number(self.path, "rank_pattern", pattern_value(self.rank_patterns, module,
                                                               self.r))
        a_m = _number(self.path, "alpha_pattern", pattern_value(self.alpha_patterns, module,
                                                                self.alpha))
        if rank != r_m:
            raise _invalid(self.path, f"{module!r}: lora_A has rank {rank}, the config says "
                           f"{r_m:g}", tensor=module)
        return a_m / math.sqrt(r_m) if self.rslora else a_m / r_m


def read_adapter(peft_dir: Path, files: PeftFiles) -> PeftAdapter:
    """The adapter in ``files`` (private copies), with every check that does not depend on a
    model: what PEFT computes otherwise (``lora_unsupported``), malformed files and pairs
    (``lora_invalid``)."""
    from safetensors.numpy import load

    try:
        config = json.loads(files.config)
    except (ValueError, RecursionError) as exc:  # RecursionError: nesting 1 MiB deep
        raise _invalid(peft_dir, f"unreadable adapter_config.json: {exc}") from None
    if not isinstance(config, dict):
        raise _invalid(peft_dir, "adapter_config.json is not an object")
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise _refuse(peft_dir, "not_lora", f"peft_type is {config.get('peft_type')!r}, not LORA")
    for key, reason in _VARIANTS.items():
        if config.get(key):
            raise _refuse(peft_dir, reason, f"{key} adapters are not supported (lorad applies "
                          "plain LoRA deltas W + s * B @ A)")
    if config.get("modules_to_save"):
        raise _refuse(peft_dir, "modules_to_save", "modules_to_save holds whole trained modules "
                      f"({config['modules_to_save']}), which a LoRA adapter cannot carry")
    if files.weights is None:
        raise _refuse(peft_dir, "no_safetensors", "adapter_model.safetensors is missing (a "
                      ".bin adapter needs torch to read: re-save it with safe_serialization)")
    try:
        tensors = load(files.weights)  # copies out of the snapshot: no map of the file
    except Exception as exc:
        raise _invalid(peft_dir, f"unreadable adapter_model.safetensors: {exc}") from None
    r = _number(peft_dir, "r", config.get("r", 8))
    pairs: dict[str, dict[str, np.ndarray]] = {}
    embedding: set[str] = set()
    base_layers: dict[str, tuple[int, ...]] = {}
    for key, value in tensors.items():
        if m := _LINEAR.match(key):
            pairs.setdefault(m["module"], {})[m["ab"]] = value.astype(np.float32)
        elif m := _EMBEDDING.match(key):
            pairs.setdefault(m["module"], {})[m["ab"]] = value.astype(np.float32)
            embedding.add(m["module"])
        elif m := _BASE_LAYER.match(key):
            base_layers[m["module"]] = tuple(value.shape)
        elif key.endswith(("embed_tokens.weight", "lm_head.weight")):
            raise _refuse(peft_dir, "saved_embeddings", f"tensor {key!r} is a whole embedding "
                          "or output matrix (saved by PEFT when the vocabulary was resized), "
                          "which a LoRA adapter cannot carry", tensor=key)
        else:
            raise _refuse(peft_dir, "unexpected_tensor", f"tensor {key!r} is not a LoRA A/B "
                          "weight (biases and saved modules are not supported)", tensor=key)
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise _invalid(peft_dir, f"{module!r} lacks lora_{'B' if 'A' in ab else 'A'}",
                           tensor=module)
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise _invalid(peft_dir, f"{module!r}: lora_A {a.shape} and lora_B {b.shape} are not "
                           "a LoRA pair", tensor=module)
    if unpaired := sorted(set(base_layers) - set(pairs)):
        raise _refuse(peft_dir, "unexpected_tensor", f"base_layer weights without a LoRA: "
                      f"{unpaired}", tensor=unpaired[0])
    if not pairs:
        raise _invalid(peft_dir, "the adapter has no LoRA tensors")
    return PeftAdapter(peft_dir, r, _number(peft_dir, "lora_alpha", config.get("lora_alpha", r)),
                       bool(config.get("use_rslora")), _patterns(peft_dir, config, "rank_pattern"),
                       _patterns(peft_dir, config, "alpha_pattern"), pairs, embedding,
                       base_layers)


def _convert(peft_dir: Path, files: PeftFiles, model_path: Path, out: Path) -> Path:
    adapter = read_adapter(peft_dir, files)
    meta, shapes = read_model_header(model_path)
    arch = meta.get("general.architecture")
    arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}.get(arch)
    if arch_enum is None:
        raise ProtocolError(ErrorCode.LORA_INCOMPATIBLE, f"unknown model architecture {arch!r}",
                            path=str(peft_dir))
    n_layer = int(meta.get(f"{arch}.block_count") or 0)
    n_head = meta.get(f"{arch}.attention.head_count")
    n_head_kv = meta.get(f"{arch}.attention.head_count_kv", n_head)
    names = gguf.get_tensor_name_map(arch_enum, n_layer)

    alpha = adapter.alpha
    out_tensors: dict[str, np.ndarray] = {}
    for module, ab in sorted(adapter.pairs.items()):
        a, b = ab["A"], ab["B"]
        target = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if target is None:
            raise _incompatible(peft_dir, f"no {arch} tensor for module {module!r}",
                                tensor=module)
        is_embedding = module in adapter.embedding
        if is_embedding and target != TOKEN_EMBD:
            raise _refuse(peft_dir, "embedding_target", f"{module!r} is an embedding that is not "
                          "the token embedding: llama.cpp applies embedding LoRAs to "
                          f"{TOKEN_EMBD!r} only", tensor=module)
        if target == TOKEN_EMBD and not is_embedding:
            raise _invalid(peft_dir, f"{module!r} maps to {TOKEN_EMBD!r} but is not an "
                           "embedding LoRA (lora_embedding_A/B)", tensor=module)
        if target in (TOKEN_EMBD, OUTPUT) and OUTPUT not in shapes:
            raise _refuse(
                peft_dir, "tied_embeddings",
                f"{module!r}: the model's output layer is its token embedding (no {OUTPUT!r}); "
                f"llama.cpp would apply a {TOKEN_EMBD!r} LoRA at the output too, where its "
                "layout does not fit (it aborts at the first decode), and it has no separate "
                "output tensor for an lm_head LoRA, so PEFT's result cannot be reproduced",
                tensor=module, target=target)
        if target not in shapes:
            raise _incompatible(peft_dir, f"the model has no tensor {target!r} (module "
                                f"{module!r})", tensor=target)
        rank = a.shape[0]
        if is_embedding:  # PEFT: A (r, n_vocab), B (n_embd, r); llama.cpp: A.T, B
            a = a.T
        expected_a, expected_b = expected_pair_shapes(target, shapes[target], rank)
        if a.shape != expected_a or b.shape != expected_b:
            raise _incompatible(
                peft_dir, f"{module!r}: the model's {target!r} is {shapes[target]}, which "
                f"takes lora_a {expected_a} and lora_b {expected_b}; the adapter gives "
                f"{a.shape} and {b.shape}", tensor=target, model_shape=list(shapes[target]),
                expected_lora_a=list(expected_a), expected_lora_b=list(expected_b),
                found_lora_a=list(a.shape), found_lora_b=list(b.shape))
        if module in adapter.base_layers and adapter.base_layers[module] != shapes[target]:
            raise _incompatible(peft_dir, f"{module!r}: the adapter was saved with a "
                                f"{adapter.base_layers[module]} base weight, the model's "
                                f"{target!r} is {shapes[target]} (a resized vocabulary?)",
                                tensor=target)
        peft_scale = adapter.scaling(module, rank)
        llama_scale = alpha / rank if alpha else 1.0  # llama.cpp's, per unit of adapter scale
        b = b * np.float32(peft_scale / llama_scale)
        short = module.rsplit(".", 1)[-1]
        if arch in PERMUTED_QK_ARCHS and short in ("q_proj", "k_proj"):
            b = _permute(b, n_head, n_head if short == "q_proj" else n_head_kv)
        out_tensors[f"{target}.lora_a"] = np.ascontiguousarray(a)
        out_tensors[f"{target}.lora_b"] = np.ascontiguousarray(b)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    w = gguf.GGUFWriter(tmp, arch)
    w.add_type("adapter")
    w.add_name(f"peft:{peft_dir.name}")
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for name, arr in out_tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(out)
    return out


def cached_conversion(peft_dir: Path, model_path: Path, cache: Path, *,
                      max_bytes: int = DEFAULT_LIMITS.max_adapter_file_bytes) -> Path:
    """The converted GGUF for (``peft_dir``'s content, the model's architecture and shapes, the
    converter's version), converted once and kept in ``cache`` (loading it reads a snapshot of
    it, as of any adapter file)."""
    files = PeftFiles.read(peft_dir, max_bytes)
    meta, _ = read_model_header(model_path)
    st = model_path.stat()
    key = hashlib.sha256(f"{CONVERTER_VERSION}:{files.digest()}:{model_path.resolve()}:"
                         f"{st.st_size}:{st.st_mtime_ns}".encode())
    out = cache / f"{peft_dir.name}-{meta.get('general.architecture')}-{key.hexdigest()[:16]}.gguf"
    if not out.is_file():
        _convert(peft_dir, files, model_path, out)
    return out
