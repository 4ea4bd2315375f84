"""PEFT LoRA adapters (``adapter_config.json`` + ``adapter_model.safetensors``) to llama.cpp
LoRA GGUF files, for a given model's architecture. Pure Python (numpy, safetensors, gguf).

Names are mapped with the ``gguf`` package's tensor-name maps (``model.layers.0.self_attn.q_proj``
-> ``blk.0.attn_q.weight``). llama.cpp's converter permutes the rows of the query and key
weights of llama-family models (its RoPE layout differs from Hugging Face's); a LoRA delta
``B @ A`` of those weights gets the same row permutation, which is a permutation of ``B``'s rows.
Per-module ranks and alphas (``rank_pattern``, ``alpha_pattern``) and rsLoRA are folded into
``B`` so that llama.cpp's single ``alpha / rank`` scaling gives each module its PEFT scaling.
What cannot be converted faithfully is refused with ``lora_unsupported`` and the reason.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from lorad.protocol import ErrorCode, ProtocolError

from .lora import read_gguf_header

PERMUTED_QK_ARCHS = {"llama", "granite"}
"""Architectures whose q/k weights llama.cpp's converter permutes (see module docstring)."""
_PAIR = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?"
                   r"\.weight$")


def is_peft_dir(path: Path) -> bool:
    return path.is_dir() and (path / "adapter_config.json").is_file()


def content_hash(peft_dir: Path) -> str:
    """A digest of the adapter's config and weights (what a converted file is cached under)."""
    h = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        f = peft_dir / name
        h.update(name.encode())
        if f.is_file():
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:32]


def _refuse(path: Path, reason: str, message: str, **details: Any) -> ProtocolError:
    return ProtocolError(ErrorCode.LORA_UNSUPPORTED, f"{path.name}: {message}", path=str(path),
                         reason=reason, **details)


def _invalid(path: Path, message: str, **details: Any) -> ProtocolError:
    return ProtocolError(ErrorCode.LORA_INVALID, f"{path.name}: {message}", path=str(path),
                         **details)


def _permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` of a q/k weight's rows."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def convert_peft(peft_dir: Path, model_path: Path, out: Path) -> Path:
    """Write the llama.cpp LoRA GGUF for ``peft_dir`` and the model at ``model_path``."""
    from safetensors.numpy import load_file

    try:
        config = json.loads((peft_dir / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise _invalid(peft_dir, f"unreadable adapter_config.json: {exc}") from None
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise _refuse(peft_dir, "not_lora", f"peft_type is {config.get('peft_type')!r}, not LORA")
    for key, reason in (("use_dora", "dora"), ("fan_in_fan_out", "fan_in_fan_out")):
        if config.get(key):
            raise _refuse(peft_dir, reason, f"{key} adapters are not supported (llama.cpp applies "
                          "plain LoRA deltas to (out, in) weights)")
    if config.get("modules_to_save"):
        raise _refuse(peft_dir, "modules_to_save", "modules_to_save holds whole trained modules "
                      f"({config['modules_to_save']}), which a LoRA GGUF cannot carry")
    weights_file = peft_dir / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise _refuse(peft_dir, "no_safetensors", "adapter_model.safetensors is missing (a "
                      ".bin adapter needs torch to read: re-save it with safe_serialization)")
    try:
        tensors = load_file(str(weights_file))
    except Exception as exc:
        raise _invalid(peft_dir, f"unreadable adapter_model.safetensors: {exc}") from None

    meta, shapes = read_gguf_header(model_path)
    arch = meta.get("general.architecture")
    arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}.get(arch)
    if arch_enum is None:
        raise ProtocolError(ErrorCode.LORA_INCOMPATIBLE, f"unknown model architecture {arch!r}",
                            path=str(peft_dir))
    n_layer = int(meta.get(f"{arch}.block_count") or 0)
    n_head = meta.get(f"{arch}.attention.head_count")
    n_head_kv = meta.get(f"{arch}.attention.head_count_kv", n_head)
    names = gguf.get_tensor_name_map(arch_enum, n_layer)

    r = int(config.get("r", 8))
    alpha = float(config.get("lora_alpha", r))
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora"))

    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        m = _PAIR.match(key)
        if m is None:
            raise _refuse(peft_dir, "unexpected_tensor", f"tensor {key!r} is not a lora_A/lora_B "
                          "weight (embedding LoRA, biases and saved modules are not supported)",
                          tensor=key)
        pairs.setdefault(m["module"], {})[m["ab"]] = value.astype(np.float32)

    out_tensors: dict[str, np.ndarray] = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise _invalid(peft_dir, f"{module!r} lacks lora_{'B' if 'A' in ab else 'A'}",
                           tensor=module)
        a, b = ab["A"], ab["B"]
        target = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if target is None:
            raise ProtocolError(ErrorCode.LORA_INCOMPATIBLE, f"{peft_dir.name}: no {arch} tensor "
                                f"for module {module!r}", path=str(peft_dir), tensor=module)
        if target not in shapes:
            raise ProtocolError(ErrorCode.LORA_INCOMPATIBLE, f"{peft_dir.name}: the model has no "
                                f"tensor {target!r} (module {module!r})", path=str(peft_dir),
                                tensor=target)
        rank = a.shape[0]
        short = module.rsplit(".", 1)[-1]
        r_m = next((v for k, v in rank_pattern.items() if module.endswith(k)), r)
        a_m = next((v for k, v in alpha_pattern.items() if module.endswith(k)), alpha)
        if rank != r_m:
            raise _invalid(peft_dir, f"{module!r}: lora_A has rank {rank}, the config says "
                           f"{r_m}", tensor=module)
        peft_scale = a_m / math.sqrt(r_m) if rslora else a_m / r_m
        b = b * np.float32(peft_scale * rank / alpha)  # llama.cpp scales by alpha / rank
        if arch in PERMUTED_QK_ARCHS and short in ("q_proj", "k_proj"):
            b = _permute(b, n_head, n_head if short == "q_proj" else n_head_kv)
        out_tensors[f"{target}.lora_a"] = np.ascontiguousarray(a)
        out_tensors[f"{target}.lora_b"] = np.ascontiguousarray(b)
    if not out_tensors:
        raise _invalid(peft_dir, "the adapter has no LoRA tensors")

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


def cached_conversion(peft_dir: Path, model_path: Path, cache: Path) -> Path:
    """The converted GGUF for (``peft_dir``'s content, the model's architecture and shapes),
    converted once and kept in ``cache``."""
    meta, _ = read_gguf_header(model_path)
    st = model_path.stat()
    key = hashlib.sha256(f"{content_hash(peft_dir)}:{model_path.resolve()}:{st.st_size}:"
                         f"{st.st_mtime_ns}".encode())
    out = cache / f"{peft_dir.name}-{meta.get('general.architecture')}-{key.hexdigest()[:16]}.gguf"
    if not out.is_file():
        convert_peft(peft_dir, model_path, out)
    return out
