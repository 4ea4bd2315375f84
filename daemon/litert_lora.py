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
``v_proj``, ``o_proj``; a lower rank is padded with zeros to the model's), read and checked as
for llama.cpp models (:func:`lorad.daemon.peft.read_adapter`: private bounded copies, PEFT's
per-module scaling, its variants refused); lorad folds the scaling and the scale into ``b'``
and writes the runtime's file into its cache. The runtime never reads a file a client wrote.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from lorad.protocol import ErrorCode, ProtocolError

MARKER = b"lorad-lora-spec:"
"""Where lorad's converter puts a bundle's :class:`LoraSpec` (JSON after it, in the header)."""
HEADER_BYTES = 1 << 16
"""How far into a bundle the spec is looked for (the system metadata is in the header)."""
TARGETS = ("q", "k", "v", "o")
PEFT_TARGETS = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o"}
_PEFT_MODULE = re.compile(r"^(?:model\.)?(?:language_model\.)?(?:model\.)?layers\.(\d+)"
                          r"\.self_attn\.(\w+)$")
"""A PEFT module name (the base_model.model. prefix taken off) of an attention projection."""


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
    return ProtocolError(code, f"{path.name}: {message}", path=str(path), **details)


class Pairs(Protocol):
    """LoRA pairs under PEFT's module names, and how each is scaled: a PEFT adapter
    (:class:`lorad.daemon.peft.PeftAdapter`) or a llama.cpp GGUF's
    (:class:`lorad.daemon.litert_adapters.GgufPairs`)."""

    path: Path
    pairs: dict[str, dict[str, np.ndarray]]
    embedding: Any

    def scaling(self, module: str, rank: int) -> float: ...


def runtime_tensors(adapter: Pairs, spec: LoraSpec, scale: float) -> dict[str, np.ndarray]:
    """The runtime's tensors for LoRA pairs (a PEFT adapter read and checked by
    :func:`lorad.daemon.peft.read_adapter`, or a GGUF's) on a model of ``spec``, the scaling
    and ``scale`` folded into ``b'``; typed errors for what does not fit."""
    path = adapter.path
    out = zeros(spec)
    for module, ab in adapter.pairs.items():
        m = _PEFT_MODULE.match(module)
        if m is None or module in adapter.embedding or m.group(2) not in PEFT_TARGETS:
            raise _bad(ErrorCode.LORA_UNSUPPORTED, path, f"module {module!r}: LiteRT-LM models "
                       "take attention LoRA only (q_proj, k_proj, v_proj, o_proj)",
                       reason="litert_attention_only", tensor=module)
        layer, target = int(m.group(1)), PEFT_TARGETS[m.group(2)]
        if layer >= spec.n_layer:
            raise _bad(ErrorCode.LORA_INCOMPATIBLE, path, f"module {module!r}: the model has "
                       f"{spec.n_layer} layers", tensor=module)
        a, b = ab["A"], ab["B"]  # PEFT: A (r, in), B (out, r)
        rank = a.shape[0]
        if rank > spec.rank:
            raise _bad(ErrorCode.LORA_INCOMPATIBLE, path, f"rank {rank} is above the "
                       f"{spec.rank} this model takes (ranks up to it are padded)",
                       reason="rank", rank=rank, model_rank=spec.rank)
        a_shape, b_shape = spec.shapes(layer)[target]
        if a.shape[1] != a_shape[0] or b.shape[0] != b_shape[1]:
            raise _bad(ErrorCode.LORA_INCOMPATIBLE, path, f"module {module!r}: lora_A "
                       f"{list(a.shape)} and lora_B {list(b.shape)} do not fit the model's "
                       f"{a_shape[0]} -> {b_shape[1]} projection", tensor=module)
        factor = np.float32(adapter.scaling(module, rank) * scale)
        a_out, b_out = np.zeros(a_shape, np.float32), np.zeros(b_shape, np.float32)
        a_out[:, :rank] = a.T  # a': (in, rank), zero-padded
        b_out[:rank, :] = b.T * factor  # b': (rank, out), the scaling folded in
        if not (np.isfinite(a_out).all() and np.isfinite(b_out).all()):
            raise ProtocolError(ErrorCode.LORA_INVALID, f"{path.name}: module {module!r} "
                                "holds NaN or infinite values", path=str(path), tensor=module)
        out[tensor_name(target, "a", layer)] = a_out
        out[tensor_name(target, "b", layer)] = b_out
    return out


