"""Adapters on LiteRT-LM contexts: PEFT directories and llama.cpp LoRA GGUFs, read into private
memory and converted when a request names them, and the runtime's files lorad writes from them,
per scale, in the model's own cache directory.

The runtime's LoRA belongs to its engine: the adapter of the last session made applies to every
later one. Sessions of a model run one at a time (:class:`lorad.daemon.litert_actor.Turns`), and
each gets a file: its context's adapter at its scale, or the zero adapter. Always a file: a
session given none on a model with LoRA inputs reads whatever the inputs hold, which was
garbage (empty output) once another engine had run in the process. Switching costs the
runtime's load of a file of ``rank x (d_model + q_out) x 2 x 2 x n_layer`` floats per session
(4.4 MB on gemma 3 270M at rank 16); lorad writes each (adapter, scale) once.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lorad.protocol import ErrorCode, ProtocolError

from . import litert_lora
from .gguf_header import ADAPTER_BOUNDS, read_header
from .litert_lora import LoraSpec
from .lora import inspect_snapshot
from .peft import PeftFiles, read_adapter
from .snapshot import snapshot

MAX_FILES = 64
"""Adapter files kept per model (the oldest are deleted past it)."""


@dataclass(frozen=True)
class AdapterInfo:
    """What ``list_loras`` says of an adapter on a LiteRT-LM context (the stack entry's keys)."""

    path: Path
    alpha: float
    ranks: tuple[int, ...]
    targets: tuple[str, ...]
    nbytes: int
    is_alora = False

    def to_wire(self) -> dict[str, Any]:
        return {"path": str(self.path), "name": None, "architecture": None,
                "alpha": self.alpha,
                "rank": self.ranks[0] if len(self.ranks) == 1 else None,
                "ranks": list(self.ranks),
                "n_targets": len(self.targets), "targets": sorted(self.targets),
                "bytes": self.nbytes, "alora": False, "alora_invocation_tokens": None}


@dataclass(eq=False)
class LitertAdapter:
    """An adapter (PEFT or GGUF) converted for one LiteRT-LM model (tensors at scale 1)."""

    info: AdapterInfo
    key: str
    """Its content's digest (and the model's spec): the name of its files."""
    tensors: dict[str, np.ndarray] = field(repr=False)

    @property
    def path(self) -> Path:
        return self.info.path


def load_peft(directory: Path, spec: LoraSpec, *, max_bytes: int) -> LitertAdapter:
    """Read, check and convert a PEFT directory for a model of ``spec`` (blocking: a file
    worker's)."""
    files = PeftFiles.read(directory, max_bytes)
    adapter = read_adapter(directory, files)
    return _converted(adapter, spec, files.digest(), adapter.alpha)


def load(path: Path, spec: LoraSpec, *, max_bytes: int) -> LitertAdapter:
    """A PEFT directory or a llama.cpp LoRA GGUF, converted for a model of ``spec``."""
    if path.is_dir():
        return load_peft(path, spec, max_bytes=max_bytes)
    with snapshot(path, max_bytes) as snap:  # a private copy: the file may change meanwhile
        info = inspect_snapshot(snap)  # lora_invalid for a malformed adapter
        if info.is_alora:
            raise ProtocolError(ErrorCode.LORA_UNSUPPORTED, f"{path.name}: an activated LoRA "
                                "(aLoRA) cannot run on LiteRT-LM models", path=str(path),
                                reason="alora")
        header, _ = read_header(snap.fd, ADAPTER_BOUNDS)
        data = {t.name: _tensor(snap.fd, header.data_start, t, path) for t in header.tensors}
        h = hashlib.sha256()
        for offset in range(0, snap.size, 1 << 20):
            h.update(os.pread(snap.fd, 1 << 20, offset))
        digest = h.hexdigest()
    return _converted(GgufPairs.of(path, info.alpha, data), spec, digest,
                      info.alpha if info.alpha is not None else 0.0)


def _converted(adapter: litert_lora.Pairs, spec: LoraSpec, digest: str,
               alpha: float) -> LitertAdapter:
    tensors = litert_lora.runtime_tensors(adapter, spec, 1.0)
    targets = tuple(sorted({name.split("_")[2] for name, t in tensors.items() if t.any()}))
    ranks = tuple(sorted({int(ab["A"].shape[0]) for ab in adapter.pairs.values()}))
    key = hashlib.sha256(f"{digest}:{spec.to_json()}".encode()).hexdigest()[:24]
    info = AdapterInfo(adapter.path, alpha, ranks, targets,
                       sum(t.nbytes for t in tensors.values()))
    return LitertAdapter(info, key, tensors)


_GGML_FLOATS = {0: np.float32, 1: np.float16}
"""The tensor types an adapter's pairs are read in (F32, F16; BF16 below)."""
_BF16 = 30
_ATTENTION = {"attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj",
              "attn_output": "o_proj"}


def _tensor(fd: int, start: int, t: Any, path: Path) -> np.ndarray:
    """One tensor of an adapter snapshot, as float32 in numpy order."""
    raw = os.pread(fd, t.nbytes, start + t.offset)
    if t.ggml_type in _GGML_FLOATS:
        values = np.frombuffer(raw, _GGML_FLOATS[t.ggml_type]).astype(np.float32)
    elif t.ggml_type == _BF16:
        values = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        raise ProtocolError(ErrorCode.LORA_UNSUPPORTED, f"{path.name}: tensor {t.name!r} is "
                            "quantized: LiteRT-LM contexts take F32, F16 and BF16 adapters",
                            path=str(path), reason="quantized", tensor=t.name)
    return values.reshape(t.shape)


@dataclass(frozen=True)
class GgufPairs:
    """A llama.cpp LoRA GGUF's pairs under PEFT's module names (its ``lora_a`` is PEFT's A,
    ``(r, in)``, its ``lora_b`` PEFT's B, ``(out, r)``), scaled as llama.cpp scales them:
    ``alpha / rank``, or 1 without an alpha."""

    path: Path
    alpha: float | None
    pairs: dict[str, dict[str, np.ndarray]]
    embedding: frozenset[str] = frozenset()

    @classmethod
    def of(cls, path: Path, alpha: float | None, data: dict[str, np.ndarray]) -> GgufPairs:
        pairs: dict[str, dict[str, np.ndarray]] = {}
        for name, value in data.items():
            base, half = name.rsplit(".", 1)  # blk.N.attn_q.weight . lora_a
            parts = base.split(".")
            module = base  # refused by name below unless it is an attention projection
            if len(parts) == 4 and parts[0] == "blk" and parts[2] in _ATTENTION:
                module = f"model.layers.{parts[1]}.self_attn.{_ATTENTION[parts[2]]}"
            pairs.setdefault(module, {})["A" if half == "lora_a" else "B"] = value
        return cls(path, alpha, pairs)

    def scaling(self, module: str, rank: int) -> float:
        return self.alpha / rank if self.alpha else 1.0


class SessionFiles:
    """A LiteRT-LM model's adapter files (see the module); methods block (file work)."""

    def __init__(self, directory: str, spec: LoraSpec | None) -> None:
        self.directory = directory
        self.spec = spec
        self._files: OrderedDict[tuple[str, float], str] = OrderedDict()
        self._lock = threading.Lock()

    def for_session(self, adapter: LitertAdapter | None, scale: float) -> str | None:
        """The file a session gets: ``adapter`` at ``scale``, else the zero adapter (None: the
        model takes no adapter)."""
        if self.spec is None:
            return None
        if adapter is None:
            return self._file(("zero", 0.0), None, 0.0)
        return self._file((adapter.key, scale), adapter, scale)

    def _file(self, key: tuple[str, float], adapter: LitertAdapter | None,
              scale: float) -> str:
        assert self.spec is not None
        with self._lock:
            found = self._files.get(key)
            if found is not None and os.path.exists(found):
                self._files.move_to_end(key)
                return found
            path = os.path.join(self.directory, f"{key[0]}-{scale!r}.lora")
            if adapter is None:
                tensors = litert_lora.zeros(self.spec)
            else:
                tensors = {n: t if not n.startswith("lora_atten_") or "_b_prime" not in n
                           else t * np.float32(scale) for n, t in adapter.tensors.items()}
            litert_lora.write_file(path, self.spec, tensors)
            self._files[key] = path
            while len(self._files) > MAX_FILES:
                _, old = self._files.popitem(last=False)
                if old != path:  # a session that has it keeps its mapping
                    with contextlib.suppress(OSError):
                        os.unlink(old)
            return path
