"""LoRA adapters for LiteRT-LM models: the runtime's file format, written by lorad only.

What the runtime takes (``litert-lm-api`` 0.18.1, CPU), as found by running it:

- A model whose ``prefill_N`` and ``decode`` signatures themselves take the ``lora_*`` inputs
  (lorad's converter exports them; the stock exporter adds ``*_lora_rN`` signatures the runtime
  never calls, and a file set on such a model is silently ignored). lorad's converter writes a
  :class:`LoraSpec` into the bundle's system metadata; a bundle without it refuses adapters.
- An adapter file: a TFLite flatbuffer whose one subgraph ``lora_params`` holds, per layer ``i``,
  ``lora_atten_{q,k,v,o}_{a,b}_prime_weight_{i}`` (float32, ``a'``: in x rank, ``b'``:
  rank x out, so that ``delta(x) = x a' b'``), with the tensor data after the flatbuffer
  (``Buffer.offset``/``size``) and the file padded to 4,096 bytes. Inline data is refused ("LoRA
  tensor size mismatch"). Ranks 16 and 32 only on the CPU.
- The adapter of the last session made applies to every later session of the engine: lorad
  gives every session a file, the zero adapter for a context without one.

Adapters come to a LiteRT-LM context as PEFT directories (attention ``q_proj``, ``k_proj``,
``v_proj``, ``o_proj``; a lower rank is padded with zeros to the model's): lorad reads them
(bounded, no pickle), folds ``lora_alpha / r`` (or ``/ sqrt(r)`` with rsLoRA) and the scale into
``b'``, and writes the runtime's file into its cache. The runtime never reads a file a client
wrote.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lorad.protocol import ErrorCode, ProtocolError

MARKER = b"lorad-lora-spec:"
"""Where lorad's converter puts a bundle's :class:`LoraSpec` (JSON after it, in the header)."""
HEADER_BYTES = 1 << 16
"""How far into a bundle the spec is looked for (the system metadata is in the header)."""
TARGETS = ("q", "k", "v", "o")
PEFT_TARGETS = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o"}
_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?(?:language_model\.)?"
                       r"(?:model\.)?layers\.(\d+)\.self_attn\.(\w+)\.lora_([AB])\.weight$")


@dataclass(frozen=True)
class LoraSpec:
    """The LoRA inputs a bundle takes: ``rank``, ``n_layer`` layers of attention projections
    from ``d_model`` to ``q_out`` (query), ``kv_out`` (key, value) and back from ``q_out``."""

    rank: int
    n_layer: int
    d_model: int
    q_out: int
    kv_out: int

    def shapes(self, layer: int) -> dict[str, tuple[tuple[int, int], tuple[int, int]]]:
        """Each target's (a', b') shapes."""
        r = self.rank
        return {"q": ((self.d_model, r), (r, self.q_out)),
                "k": ((self.d_model, r), (r, self.kv_out)),
                "v": ((self.d_model, r), (r, self.kv_out)),
                "o": ((self.q_out, r), (r, self.d_model))}

    def to_json(self) -> str:
        return json.dumps(self.__dict__, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LoraSpec:
        raw = json.loads(text)
        values = {k: raw[k] for k in ("rank", "n_layer", "d_model", "q_out", "kv_out")}
        if not all(isinstance(v, int) and 0 < v <= 1 << 20 for v in values.values()):
            raise ValueError(f"bad LoRA spec {raw!r}")
        return cls(**values)


def read_spec(path: str | os.PathLike[str]) -> LoraSpec | None:
    """The bundle's :class:`LoraSpec` (None: it takes no adapter), from its header only."""
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    at = head.find(MARKER)
    if at < 0:
        return None
    end = head.find(b"}", at)
    if end < 0:
        return None
    try:
        return LoraSpec.from_json(head[at + len(MARKER):end + 1].decode())
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None


def tensor_name(target: str, part: str, layer: int) -> str:
    return f"lora_atten_{target}_{part}_prime_weight_{layer}"


def zeros(spec: LoraSpec) -> dict[str, np.ndarray]:
    """The zero adapter (the base model's output)."""
    out = {}
    for i in range(spec.n_layer):
        for target, (a, b) in spec.shapes(i).items():
            out[tensor_name(target, "a", i)] = np.zeros(a, np.float32)
            out[tensor_name(target, "b", i)] = np.zeros(b, np.float32)
    return out


def _align(n: int, to: int = 64) -> int:
    return (n + to - 1) // to * to


def _table_vector(b: Any, tables: list[int]) -> int:
    """A flatbuffer vector of the tables at ``tables``."""
    b.StartVector(4, len(tables), 4)
    for x in reversed(tables):
        b.PrependUOffsetTRelative(x)
    return b.EndVector()


def _flatbuffer(names: list[str], shapes: list[tuple[int, ...]], offsets: list[int],
                sizes: list[int], rank: int) -> bytes:
    """The TFLite model flatbuffer of an adapter (tensor data outside it, at ``offsets``)."""
    import flatbuffers

    b = flatbuffers.Builder(4096)
    buffers = []
    b.StartObject(3)  # Buffer 0: empty, by convention
    buffers.append(b.EndObject())
    for offset, size in zip(offsets, sizes, strict=True):
        b.StartObject(3)
        b.PrependUint64Slot(1, offset, 0)
        b.PrependUint64Slot(2, size, 0)
        buffers.append(b.EndObject())
    buffer_vec = _table_vector(b, buffers)
    tensors = []
    for i, (name, shape) in enumerate(zip(names, shapes, strict=True)):
        name_off = b.CreateString(name)
        b.StartVector(4, len(shape), 4)
        for d in reversed(shape):
            b.PrependInt32(d)
        shape_off = b.EndVector()
        b.StartObject(11)  # Tensor
        b.PrependUOffsetTRelativeSlot(0, shape_off, 0)
        b.PrependInt8Slot(1, 0, 0)  # FLOAT32
        b.PrependUint32Slot(2, i + 1, 0)
        b.PrependUOffsetTRelativeSlot(3, name_off, 0)
        tensors.append(b.EndObject())
    tensor_vec = _table_vector(b, tensors)
    sub_name = b.CreateString("lora_params")
    b.StartObject(6)  # SubGraph
    b.PrependUOffsetTRelativeSlot(0, tensor_vec, 0)
    b.PrependUOffsetTRelativeSlot(4, sub_name, 0)
    subgraph_vec = _table_vector(b, [b.EndObject()])
    meta_name = b.CreateString("lora_rank")
    b.StartObject(2)  # Metadata: the rank where a buffer index would be (the stock writer's)
    b.PrependUOffsetTRelativeSlot(0, meta_name, 0)
    b.PrependUint32Slot(1, rank, 0)
    meta_vec = _table_vector(b, [b.EndObject()])
    description = b.CreateString("lora_params")
    b.StartObject(10)  # Model
    b.PrependUint32Slot(0, 3, 0)
    b.PrependUOffsetTRelativeSlot(2, subgraph_vec, 0)
    b.PrependUOffsetTRelativeSlot(3, description, 0)
    b.PrependUOffsetTRelativeSlot(4, buffer_vec, 0)
    b.PrependUOffsetTRelativeSlot(6, meta_vec, 0)
    b.Finish(b.EndObject(), file_identifier=b"TFL3")
    return bytes(b.Output())


def write_file(path: str | os.PathLike[str], spec: LoraSpec,
               tensors: dict[str, np.ndarray]) -> None:
    """Write an adapter file the runtime takes (see the module), atomically."""
    names = [tensor_name(t, p, i) for i in range(spec.n_layer) for t in TARGETS
             for p in ("a", "b")]
    datas = [np.ascontiguousarray(tensors[n], np.float32).tobytes() for n in names]
    shapes = [tuple(tensors[n].shape) for n in names]
    head = _flatbuffer(names, shapes, [0] * len(names), [len(d) for d in datas], spec.rank)
    start = _align(len(head) + 4096)  # room for the offsets, which make the header longer
    offsets, pos = [], start
    for d in datas:
        offsets.append(pos)
        pos = _align(pos + len(d))
    head = _flatbuffer(names, shapes, offsets, [len(d) for d in datas], spec.rank)
    assert len(head) <= start
    tmp = Path(f"{path}.part")
    with open(tmp, "wb") as f:
        f.write(head + bytes(start - len(head)))
        for offset, data in zip(offsets, datas, strict=True):
            f.write(bytes(offset - f.tell()) + data)
        f.write(bytes(_align(f.tell(), 4096) - f.tell()))
    os.replace(tmp, path)


def _bad(code: ErrorCode, path: Path, message: str, **details: Any) -> ProtocolError:
    return ProtocolError(code, f"{path}: {message}", path=str(path), **details)


def from_peft(directory: Path, spec: LoraSpec, scale: float, *,
              max_bytes: int) -> dict[str, np.ndarray]:
    """The runtime's tensors for a PEFT adapter directory on a model of ``spec``, ``scale``
    folded in (typed errors for what cannot be converted or does not fit)."""
    from safetensors.numpy import load

    config_path, weights = directory / "adapter_config.json", directory / \
        "adapter_model.safetensors"
    if not config_path.is_file() or not weights.is_file():
        raise _bad(ErrorCode.LORA_INVALID, directory, "a PEFT adapter directory needs "
                   "adapter_config.json and adapter_model.safetensors")
    try:
        with open(weights, "rb") as f:  # a private copy, bounded: the file may change
            data = f.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"{weights}: more than "
                                f"limits.max_adapter_file_bytes ({max_bytes}) bytes",
                                path=str(weights), limit="max_adapter_file_bytes",
                                value=max_bytes)
        with open(config_path, "rb") as f:
            config = json.loads(f.read(1 << 20))
        raw = load(data)
    except (ValueError, OSError, struct.error) as exc:
        raise _bad(ErrorCode.LORA_INVALID, directory, f"unreadable adapter: {exc}") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise _bad(ErrorCode.LORA_UNSUPPORTED, directory, "not a LoRA adapter",
                   reason="not_lora")
    for key in ("use_dora", "fan_in_fan_out"):
        if config.get(key):
            raise _bad(ErrorCode.LORA_UNSUPPORTED, directory, f"{key} cannot be converted",
                       reason=key.removeprefix("use_"))
    r, alpha = config.get("r"), config.get("lora_alpha", config.get("r"))
    if not isinstance(r, int) or r < 1 or not isinstance(alpha, (int, float)):
        raise _bad(ErrorCode.LORA_INVALID, directory, "adapter_config.json needs r and "
                   "lora_alpha")
    if r > spec.rank:
        raise _bad(ErrorCode.LORA_INCOMPATIBLE, directory, f"rank {r} is above the "
                   f"{spec.rank} this model takes (ranks up to it are padded)",
                   reason="rank", rank=r, model_rank=spec.rank)
    factor = scale * (alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r)
    out = zeros(spec)
    for key, value in raw.items():
        m = _PEFT_KEY.match(key)
        if m is None:
            raise _bad(ErrorCode.LORA_UNSUPPORTED, directory, f"tensor {key!r}: LiteRT-LM "
                       "models take attention LoRA only (q_proj, k_proj, v_proj, o_proj)",
                       reason="litert_attention_only", tensor=key)
        layer, module, part = int(m.group(1)), m.group(2), m.group(3)
        target = PEFT_TARGETS.get(module)
        if target is None:
            raise _bad(ErrorCode.LORA_UNSUPPORTED, directory, f"tensor {key!r}: LiteRT-LM "
                       "models take attention LoRA only (q_proj, k_proj, v_proj, o_proj)",
                       reason="litert_attention_only", tensor=key)
        if layer >= spec.n_layer:
            raise _bad(ErrorCode.LORA_INCOMPATIBLE, directory, f"tensor {key!r}: the model "
                       f"has {spec.n_layer} layers", tensor=key)
        (a_shape, b_shape) = spec.shapes(layer)[target]
        value = np.asarray(value, np.float32)
        if part == "A":  # PEFT: (r, in) -> a': (in, rank)
            want = (r, a_shape[0])
            name, padded = tensor_name(target, "a", layer), np.zeros(a_shape, np.float32)
            if value.shape != want:
                raise _bad(ErrorCode.LORA_INCOMPATIBLE, directory, f"tensor {key!r} has shape "
                           f"{list(value.shape)}, the model needs {list(want)}", tensor=key)
            padded[:, :r] = value.T
        else:  # PEFT: (out, r) -> b': (rank, out), the scaling folded in
            want = (b_shape[1], r)
            name, padded = tensor_name(target, "b", layer), np.zeros(b_shape, np.float32)
            if value.shape != want:
                raise _bad(ErrorCode.LORA_INCOMPATIBLE, directory, f"tensor {key!r} has shape "
                           f"{list(value.shape)}, the model needs {list(want)}", tensor=key)
            padded[:r, :] = value.T * factor
        if not np.isfinite(padded).all():
            raise _bad(ErrorCode.LORA_INVALID, directory, f"tensor {key!r} holds NaN or "
                       "infinite values", tensor=key)
        out[name] = padded
    return out


def digest(directory: Path) -> str:
    """A PEFT directory's content, for the cache of converted files."""
    h = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        h.update(name.encode())
        with open(directory / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:32]
