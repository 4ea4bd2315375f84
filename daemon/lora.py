"""LoRA adapter files: name resolution, GGUF inspection and compatibility checks (pure Python).

Every check llama.cpp makes when it loads an adapter is made here first, on a private snapshot of
the file (:mod:`.snapshot`) with a bounded header parser (:mod:`.gguf_header`), so that a bad
adapter gets a typed, precise error instead of llama.cpp's bare NULL (or its ``abort()`` on a
key of an unexpected type), and what was checked is what llama.cpp loads:

* ``lora_file_not_found``: no such file (or unreadable); a name that resolves nowhere lists the
  places searched;
* ``lora_invalid``: not a GGUF, a header past its bounds or cut short, not an adapter
  (``general.type``/``adapter.type``), a key of a type llama.cpp does not expect, a tensor with
  an unexpected suffix, a ``lora_a`` without its ``lora_b``, ranks that disagree;
* ``lora_incompatible``: another architecture, a target tensor the model lacks, a shape that does
  not fit the model's tensor.

Shapes are reported in numpy order (rows, columns): a weight ``W`` is ``(n_out, n_in)``, its
``lora_a`` ``(rank, n_in)`` and its ``lora_b`` ``(n_out, rank)``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorad.protocol import DEFAULT_LIMITS, ErrorCode, ProtocolError, looks_like_path

from .gguf_header import (
    ADAPTER_BOUNDS,
    FLOAT32,
    MODEL_BOUNDS,
    STRING,
    TYPE_NAMES,
    GGUFError,
    read_header,
)
from .paths import AllowedDirs, check_path_text
from .snapshot import FileIdentity, Snapshot, snapshot

SUFFIXES = (".lora_a", ".lora_b")


def _is_adapter(path: Path) -> bool:
    return path.is_file() or (path.is_dir() and (path / "adapter_config.json").is_file())


def resolve_adapter(ref: str, adapter_dirs: list[Path], allowed: AllowedDirs) -> Path:
    """The resolved file (or PEFT directory) for ``ref``: a path, or a name looked up in
    ``adapter_dirs``.

    A name ``N`` is the first existing candidate among ``<dir>/N.gguf`` and ``<dir>/N`` (a file,
    or a PEFT adapter directory with ``adapter_config.json``) for each adapter directory, in
    order. Raises ``lora_file_not_found`` or ``forbidden_path``.
    """
    check_path_text(ref)
    if looks_like_path(ref):
        candidates = [Path(ref).expanduser()]
    else:
        if not ref or ref in (".", ".."):  # (a NUL byte was refused above)
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"invalid adapter name {ref!r}",
                                field="path")
        candidates = [d / f"{ref}.gguf" for d in adapter_dirs] + [d / ref for d in adapter_dirs]
    found = next((c for c in candidates if _is_adapter(c)), None)
    if found is None:
        if looks_like_path(ref):
            raise ProtocolError(ErrorCode.LORA_FILE_NOT_FOUND,
                                f"adapter {ref!r} is neither a regular file nor a PEFT adapter "
                                "directory (with adapter_config.json)",
                                path=ref, searched=[str(c) for c in candidates])
        raise ProtocolError(
            ErrorCode.LORA_FILE_NOT_FOUND,
            f"no adapter named {ref!r} in the adapter directories",
            path=ref, searched=[str(c) for c in candidates],
            adapter_dirs=[str(d) for d in adapter_dirs],
        )
    try:
        resolved = allowed.check(found, "adapter", directory=found.is_dir())
    except ProtocolError as exc:
        if exc.code is ErrorCode.NOT_FOUND:  # vanished in between
            raise ProtocolError(ErrorCode.LORA_FILE_NOT_FOUND, exc.message, **exc.details) from None
        raise
    if not os.access(resolved, os.R_OK):
        raise ProtocolError(ErrorCode.LORA_FILE_NOT_FOUND,
                            f"adapter {str(resolved)!r} is not readable by the daemon",
                            path=ref, resolved=str(resolved))
    return resolved


@dataclass(frozen=True)
class LoraPair:
    """One target tensor of an adapter: the shapes of its A and B (numpy order) and its rank."""

    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]

    @property
    def rank(self) -> int:
        return self.b_shape[1] if len(self.b_shape) == 2 else 0  # B's columns, either layout


@dataclass
class AdapterInfo:
    """What an adapter file holds, read from its GGUF header without loading it."""

    path: Path
    identity: FileIdentity
    architecture: str | None
    alpha: float | None
    name: str | None
    targets: dict[str, LoraPair] = field(default_factory=dict)
    nbytes: int = 0
    alora_invocation_tokens: list[int] | None = None

    @property
    def ranks(self) -> list[int]:
        return sorted({p.rank for p in self.targets.values()})

    @property
    def is_alora(self) -> bool:
        return self.alora_invocation_tokens is not None

    def to_wire(self) -> dict[str, Any]:
        ranks = self.ranks
        return {
            "path": str(self.path),
            "name": self.name,
            "architecture": self.architecture,
            "alpha": self.alpha,
            "rank": ranks[0] if len(ranks) == 1 else None,
            "ranks": ranks,
            "n_targets": len(self.targets),
            "targets": sorted(self.targets),
            "bytes": self.nbytes,
            "alora": self.is_alora,
            "alora_invocation_tokens": self.alora_invocation_tokens,
        }


def _invalid(path: Path, message: str, **details: Any) -> ProtocolError:
    return ProtocolError(ErrorCode.LORA_INVALID, f"{path.name}: {message}", path=str(path),
                         **details)


def _header_invalid(path: Path, exc: GGUFError) -> ProtocolError:
    details: dict[str, Any] = {} if exc.bound is None else {"bound": exc.bound,
                                                             "value": exc.value}
    return _invalid(path, exc.message, **details)


_TYPED_KEYS = {"general.type": STRING, "general.architecture": STRING, "adapter.type": STRING,
               "adapter.lora.alpha": FLOAT32}
"""Keys llama.cpp reads with a typed getter, which aborts the process on another type."""


def _check_general_type(path: Path, kv: dict[str, Any]) -> None:
    general_type = kv.get("general.type")
    if general_type != "adapter":
        raise _invalid(path, f"general.type is {general_type!r}, not 'adapter' (is this a model?)",
                       general_type=general_type)


def inspect_snapshot(snap: Snapshot) -> AdapterInfo:
    """Check an adapter's header and tensor table in its snapshot (what :func:`inspect_adapter`
    does, for a snapshot that is then loaded); raises ``lora_invalid``."""
    path = snap.origin
    magic = os.pread(snap.fd, 4, 0)
    if magic != b"GGUF":
        raise _invalid(path, "not a GGUF file (bad magic)", magic=magic.hex())
    try:
        header, size = read_header(snap.fd, ADAPTER_BOUNDS)
    except GGUFError as exc:
        if exc.kv.get("general.type", "adapter") != "adapter":  # a model's vocabulary, say
            _check_general_type(path, exc.kv)
        raise _header_invalid(path, exc) from None
    kv, types = header.kv, header.types
    _check_general_type(path, kv)
    adapter_type = kv.get("adapter.type")
    if adapter_type != "lora":
        raise _invalid(path, f"adapter.type is {adapter_type!r}, not 'lora'",
                       adapter_type=adapter_type)
    for key, want in _TYPED_KEYS.items():
        if key in types and types[key] != want:
            raise _invalid(path, f"{key} is of type {TYPE_NAMES[types[key]]}, not "
                                 f"{TYPE_NAMES[want]} (llama.cpp would abort)", key=key)
    invocation = kv.get("adapter.alora.invocation_tokens")
    if "adapter.alora.invocation_tokens" in types and not (
            isinstance(invocation, list)
            and all(isinstance(t, int) and not isinstance(t, bool) for t in invocation)):
        raise _invalid(path, "adapter.alora.invocation_tokens is not an array of integers")
    a_shapes: dict[str, tuple[int, ...]] = {}
    b_shapes: dict[str, tuple[int, ...]] = {}
    nbytes = 0
    for t in header.tensors:
        if t.name.endswith(".lora_a"):
            a_shapes[t.name.removesuffix(".lora_a")] = t.shape
        elif t.name.endswith(".lora_b"):
            b_shapes[t.name.removesuffix(".lora_b")] = t.shape
        else:
            raise _invalid(path, f"tensor {t.name!r} has neither a .lora_a nor a .lora_b suffix",
                           tensor=t.name)
        if header.data_start + t.offset + t.nbytes > size:
            raise _invalid(path, f"tensor {t.name!r} lies beyond the end of the file "
                                 "(truncated?)", tensor=t.name)
        nbytes += t.nbytes
    if not a_shapes and not b_shapes:
        raise _invalid(path, "the adapter has no LoRA tensors")
    targets: dict[str, LoraPair] = {}
    for base in sorted(a_shapes.keys() | b_shapes.keys()):
        if base not in a_shapes or base not in b_shapes:
            missing = "lora_b" if base in a_shapes else "lora_a"
            raise _invalid(path, f"{base!r} has no {missing} (a LoRA pair is missing one "
                                 "component)", tensor=base, missing=missing)
        a, b = a_shapes[base], b_shapes[base]
        if len(a) != 2 or len(b) != 2:
            raise _invalid(path, f"{base!r}: lora_a and lora_b must be matrices, got {a} and {b}",
                           tensor=base, lora_a=list(a), lora_b=list(b))
        if base != "token_embd.weight" and a[0] != b[1]:
            raise _invalid(path, f"{base!r}: rank of lora_a {a} ({a[0]}) differs from rank of "
                                 f"lora_b {b} ({b[1]})",
                           tensor=base, lora_a=list(a), lora_b=list(b))
        targets[base] = LoraPair(a, b)
    alpha = kv.get("adapter.lora.alpha")
    return AdapterInfo(
        path=path, identity=snap.identity,
        architecture=kv.get("general.architecture"),
        alpha=float(alpha) if isinstance(alpha, float) else None,
        name=name if isinstance(name := kv.get("general.name"), str) else None,
        targets=targets, nbytes=nbytes,
        alora_invocation_tokens=list(invocation) if invocation is not None else None,
    )


def inspect_adapter(path: Path, max_bytes: int = DEFAULT_LIMITS.max_adapter_file_bytes
                    ) -> AdapterInfo:
    """Read and check an adapter file's header and tensor table, from a private snapshot of it
    (at most ``max_bytes``); raises ``lora_invalid`` (and the errors of :func:`snapshot`)."""
    with snapshot(path, max_bytes) as snap:
        return inspect_snapshot(snap)


def read_gguf_header(path: Path) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """A GGUF file's scalar and string metadata (arrays skipped) and its tensors' shapes in
    numpy order, read from its header with ordinary reads (never a memory map) within
    :data:`MODEL_BOUNDS`; raises :class:`GGUFError` or ``OSError``."""
    with open(path, "rb") as f:
        header, _ = read_header(f.fileno(), MODEL_BOUNDS)
    return header.scalars(), {t.name: t.shape for t in header.tensors}


def read_model_header(path: Path) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """:func:`read_gguf_header` of a loaded model's file, for checking an adapter against it;
    ``lora_load_failed`` where the file cannot be read (changed since it was loaded?)."""
    try:
        return read_gguf_header(path)
    except (OSError, GGUFError) as exc:
        raise ProtocolError(ErrorCode.LORA_LOAD_FAILED,
                            f"cannot read the model file {str(path)!r} to check the adapter "
                            f"against it (changed since it was loaded?): {exc}",
                            model_path=str(path)) from None


@dataclass(frozen=True)
class ModelTensors:
    """A model's architecture and its tensors' shapes (numpy order), read from its GGUF."""

    architecture: str | None
    shapes: dict[str, tuple[int, ...]]

    @classmethod
    def read(cls, path: Path) -> ModelTensors:
        meta, shapes = read_model_header(path)
        arch = meta.get("general.architecture")
        return cls(arch if isinstance(arch, str) else None, shapes)


def expected_pair_shapes(target: str, weight: tuple[int, ...], rank: int
                         ) -> tuple[tuple[int, int], tuple[int, int]]:
    """The ``lora_a`` and ``lora_b`` shapes (numpy order) llama.cpp takes for ``target`` whose
    weight is ``weight`` (``(n_out, n_in)``): ``(rank, n_in)`` and ``(n_out, rank)``, except for
    the token embedding, whose ``lora_a`` rows are gathered per token: ``(n_vocab, rank)`` and
    ``(n_embd, rank)``."""
    n_out, n_in = weight
    if target == "token_embd.weight":
        return (n_out, rank), (n_in, rank)
    return (rank, n_in), (n_out, rank)


def incompatibilities(info: AdapterInfo, model: ModelTensors) -> list[ProtocolError]:
    """Every reason ``info`` cannot apply to ``model`` (``lora_incompatible``), in file order."""
    problems: list[ProtocolError] = []

    def add(message: str, **details: Any) -> None:
        problems.append(ProtocolError(ErrorCode.LORA_INCOMPATIBLE,
                                      f"{info.path.name}: {message}", path=str(info.path),
                                      **details))

    if info.architecture != model.architecture:
        add(f"adapter architecture {info.architecture!r} differs from the model's "
            f"{model.architecture!r}", adapter_architecture=info.architecture,
            model_architecture=model.architecture)
    for base, pair in info.targets.items():
        w = model.shapes.get(base)
        if w is None:
            add(f"target tensor {base!r} does not exist in the model", tensor=base)
            continue
        if len(w) != 2:
            add(f"target tensor {base!r} is not a matrix in the model (shape {w})",
                tensor=base, model_shape=list(w))
            continue
        rank = pair.rank
        if base == "token_embd.weight" and "output.weight" not in model.shapes:
            # Tied output: llama.cpp finds adapters by tensor, so it would apply this LoRA at
            # the output as well, where its layout does not fit: it aborts at the first decode.
            add(f"{base!r}: the model's output layer is its token embedding (tied), and "
                "llama.cpp would apply an embedding LoRA there too, which it cannot (it aborts)",
                tensor=base)
            continue
        expected_a, expected_b = expected_pair_shapes(base, w, rank)
        ok = pair.a_shape == expected_a and pair.b_shape == expected_b
        if not ok:
            add(f"{base!r}: model weight is {w}, so lora_a must be {expected_a} and lora_b "
                f"{expected_b}; the adapter has {pair.a_shape} and {pair.b_shape}",
                tensor=base, model_shape=list(w), expected_lora_a=list(expected_a),
                expected_lora_b=list(expected_b), found_lora_a=list(pair.a_shape),
                found_lora_b=list(pair.b_shape))
    return problems
