"""LoRA adapter files: name resolution, GGUF inspection and compatibility checks (pure Python).

Every check llama.cpp makes when it loads an adapter is made here first, with the ``gguf``
package, so that a bad adapter gets a typed, precise error instead of llama.cpp's bare NULL:

* ``lora_file_not_found``: no such file (or unreadable); a name that resolves nowhere lists the
  places searched;
* ``lora_invalid``: not a GGUF, not an adapter (``general.type``/``adapter.type``), a tensor with
  an unexpected suffix, a ``lora_a`` without its ``lora_b``, ranks that disagree;
* ``lora_incompatible``: another architecture, a target tensor the model lacks, a shape that does
  not fit the model's tensor.

Shapes are reported in numpy order (rows, columns): a weight ``W`` is ``(n_out, n_in)``, its
``lora_a`` ``(rank, n_in)`` and its ``lora_b`` ``(n_out, rank)``.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from lorad.protocol import ErrorCode, ProtocolError, looks_like_path

from .paths import AllowedDirs, check_path_text

SUFFIXES = (".lora_a", ".lora_b")


@dataclass(frozen=True)
class FileIdentity:
    """What says a file is still the one that was loaded: device, inode, size, mtime."""

    dev: int
    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> FileIdentity:
        st = path.stat()
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


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


def _field(reader: gguf.GGUFReader, key: str) -> Any:
    f = reader.get_field(key)
    return None if f is None else f.contents()


def _shape(tensor: gguf.ReaderTensor) -> tuple[int, ...]:
    """numpy order: the reverse of ggml's ``ne``."""
    return tuple(int(n) for n in reversed(tensor.shape.tolist()))


def inspect_adapter(path: Path) -> AdapterInfo:
    """Read and check an adapter file's header and tensor table; raises ``lora_invalid``."""
    try:
        identity = FileIdentity.of(path)
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ProtocolError(ErrorCode.LORA_FILE_NOT_FOUND, f"cannot read {str(path)!r}: {exc}",
                            path=str(path)) from None
    if magic != b"GGUF":
        raise _invalid(path, "not a GGUF file (bad magic)", magic=magic.hex())
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as exc:  # the gguf reader raises ValueError, IndexError, struct errors
        raise _invalid(path, f"unreadable GGUF ({type(exc).__name__}: {exc})") from None
    general_type = _field(reader, "general.type")
    if general_type != "adapter":
        raise _invalid(path, f"general.type is {general_type!r}, not 'adapter' (is this a model?)",
                       general_type=general_type)
    adapter_type = _field(reader, "adapter.type")
    if adapter_type != "lora":
        raise _invalid(path, f"adapter.type is {adapter_type!r}, not 'lora'",
                       adapter_type=adapter_type)
    alpha = _field(reader, "adapter.lora.alpha")
    invocation = _field(reader, "adapter.alora.invocation_tokens")
    a_shapes: dict[str, tuple[int, ...]] = {}
    b_shapes: dict[str, tuple[int, ...]] = {}
    nbytes = 0
    file_size = identity.size
    for t in reader.tensors:
        if t.name.endswith(".lora_a"):
            a_shapes[t.name.removesuffix(".lora_a")] = _shape(t)
        elif t.name.endswith(".lora_b"):
            b_shapes[t.name.removesuffix(".lora_b")] = _shape(t)
        else:
            raise _invalid(path, f"tensor {t.name!r} has neither a .lora_a nor a .lora_b suffix",
                           tensor=t.name)
        if t.data_offset + t.n_bytes > file_size:
            raise _invalid(path, f"tensor {t.name!r} lies beyond the end of the file "
                                 "(truncated?)", tensor=t.name)
        nbytes += int(t.n_bytes)
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
    return AdapterInfo(
        path=path, identity=identity,
        architecture=_field(reader, "general.architecture"),
        alpha=float(alpha) if isinstance(alpha, (int, float)) else None,
        name=_field(reader, "general.name"),
        targets=targets, nbytes=nbytes,
        alora_invocation_tokens=[int(t) for t in invocation] if invocation is not None else None,
    )


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}


def read_gguf_header(path: Path) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """A GGUF file's scalar and string metadata (arrays skipped) and its tensors' shapes in
    numpy order, read straight from the header.

    ``gguf.GGUFReader`` builds an object per array element: on a model with a 262,144-entry
    vocabulary that takes over ten seconds and tens of MiB, where this takes a fraction of one.
    """
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ValueError("not a GGUF file")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version < 2:
            raise ValueError(f"GGUF version {version} is not supported")
        pos = 24

        def string() -> str:
            nonlocal pos
            (n,) = struct.unpack_from("<Q", buf, pos)
            text = bytes(buf[pos + 8:pos + 8 + n]).decode("utf-8", "replace")
            pos += 8 + n
            return text

        def skip(kind: int, count: int) -> None:
            nonlocal pos
            if kind == 8:
                for _ in range(count):
                    (n,) = struct.unpack_from("<Q", buf, pos)
                    pos += 8 + n
            elif kind == 9:
                for _ in range(count):
                    sub, sub_count = struct.unpack_from("<IQ", buf, pos)
                    pos += 12
                    skip(sub, sub_count)
            else:
                pos += struct.calcsize(_SCALARS[kind]) * count

        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = string()
            (kind,) = struct.unpack_from("<I", buf, pos)
            pos += 4
            if kind == 8:
                meta[key] = string()
            elif kind == 9:
                sub, count = struct.unpack_from("<IQ", buf, pos)
                pos += 12
                skip(sub, count)
            else:
                (meta[key],) = struct.unpack_from(_SCALARS[kind], buf, pos)
                pos += struct.calcsize(_SCALARS[kind])
        shapes: dict[str, tuple[int, ...]] = {}
        for _ in range(n_tensors):
            name = string()
            (n_dims,) = struct.unpack_from("<I", buf, pos)
            dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
            pos += 4 + 8 * n_dims + 4 + 8  # dims, type, offset
            shapes[name] = tuple(int(d) for d in reversed(dims))
    return meta, shapes


@dataclass(frozen=True)
class ModelTensors:
    """A model's architecture and its tensors' shapes (numpy order), read from its GGUF."""

    architecture: str | None
    shapes: dict[str, tuple[int, ...]]

    @classmethod
    def read(cls, path: Path) -> ModelTensors:
        meta, shapes = read_gguf_header(path)
        return cls(meta.get("general.architecture"), shapes)


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
