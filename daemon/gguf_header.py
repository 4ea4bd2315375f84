"""A bounded GGUF header parser over bytes (sans-IO), and a reader that feeds it ordinary reads.

GGUF files come from clients (adapters) and from anywhere (models): their headers are untrusted.
:func:`parse_header` checks every size a header declares against :class:`HeaderBounds` before it
reads or builds anything for it: the numbers of keys and tensors, each string's and each array's
length, the array elements of the whole header, and the header's bytes. It builds no object per
array element unless the bounds keep arrays (an adapter's few short ones); a model's arrays (a
262,144-token vocabulary) are skipped by their lengths. Whatever the bytes, it returns a
:class:`GGUFHeader` or raises :class:`GGUFError` (:class:`Truncated` where the bytes end before
the header does).

It refuses what llama.cpp's own parser (``gguf.cpp``) refuses, so a header it accepts is one
llama.cpp reads: a version other than 2 or 3, an empty or repeated key, an unknown value type or
an array of arrays, a ``general.alignment`` that is not a power of two in a ``uint32``, a tensor
name of 64 bytes or more or one repeated, more than 4 dimensions, a negative one or a product
past an int64, an unknown ggml type or one whose block size does not divide the rows, tensor
data that is not laid out in order at the alignment.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any

from gguf import GGML_QUANT_SIZES  # (elements per block, bytes per block) by ggml type: a table

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
MAX_NAME_BYTES = 63
"""A tensor name's bytes (llama.cpp's ``GGML_MAX_NAME`` is 64 with the NUL)."""
STRING, ARRAY, UINT32, FLOAT32 = 8, 9, 4, 6
"""Value types lorad checks by number."""
TYPE_NAMES = {0: "uint8", 1: "int8", 2: "uint16", 3: "int16", 4: "uint32", 5: "int32",
              6: "float32", 7: "bool", 8: "string", 9: "array", 10: "uint64", 11: "int64",
              12: "float64"}
_SCALARS = {k: struct.Struct(c) for k, c in
            ((0, "<B"), (1, "<b"), (2, "<H"), (3, "<h"), (4, "<I"), (5, "<i"), (6, "<f"),
             (7, "<?"), (10, "<Q"), (11, "<q"), (12, "<d"))}
_CODES = {k: s.format[1:] for k, s in _SCALARS.items()}
_U32, _U64, _FIXED, _ARRAY_HEAD, _TYPE_OFFSET = (
    struct.Struct(f) for f in ("<I", "<Q", "<4sIqq", "<IQ", "<IQ"))
_INT64_MAX = 2**63 - 1
MiB = 1024 * 1024


class GGUFError(ValueError):
    """Bytes that are not a GGUF header within the bounds; ``bound`` names the bound exceeded
    (a :class:`HeaderBounds` field) and ``value`` its value, where one was; ``kv`` holds the
    metadata read before the error (for a better message: a model given as an adapter)."""

    def __init__(self, message: str, bound: str | None = None, value: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.bound = bound
        self.value = value
        self.kv: dict[str, Any] = {}


class Truncated(GGUFError):
    """The bytes end inside the header: at least ``needed`` bytes would hold the next part."""

    def __init__(self, needed: int, what: str) -> None:
        super().__init__(f"the header is cut short: {what} needs {needed} bytes")
        self.needed = needed


@dataclass(frozen=True)
class HeaderBounds:
    """The largest sizes a header may declare; a header past one is refused, naming it."""

    max_header_bytes: int
    """Bytes from the magic to the end of the tensor table."""
    max_kv: int
    """Metadata keys."""
    max_tensors: int
    max_string_bytes: int
    """Bytes of one string (a key, a value, a tensor name, an array element)."""
    max_array_len: int
    """Elements of one metadata array."""
    max_array_elements: int
    """Elements of all metadata arrays together."""
    keep_arrays: bool
    """Whether arrays are returned as lists (else skipped: only their type and length kept)."""


ADAPTER_BOUNDS = HeaderBounds(
    max_header_bytes=16 * MiB, max_kv=1024, max_tensors=16384, max_string_bytes=MiB,
    max_array_len=1024, max_array_elements=4096, keep_arrays=True)
"""A LoRA adapter: some 10 keys, a pair of tensors per target (a 128-layer model with 64
targets per layer is 16,384), and arrays only for an aLoRA's invocation tokens (a few dozen)."""
MODEL_BOUNDS = HeaderBounds(
    max_header_bytes=256 * MiB, max_kv=65536, max_tensors=1 << 20, max_string_bytes=16 * MiB,
    max_array_len=1 << 22, max_array_elements=1 << 24, keep_arrays=False)
"""A model: vocabularies of up to 4M tokens (gemma's is 262,144: with its scores and token
types, 786,432 elements in 5 MiB of header); arrays are skipped."""


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table."""

    name: str
    ne: tuple[int, ...]
    """Dimensions in ggml order (the row length first)."""
    ggml_type: int
    offset: int
    """From the start of the data section."""
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """Dimensions in numpy order (the reverse of ``ne``)."""
        return tuple(reversed(self.ne))


@dataclass(frozen=True)
class GGUFHeader:
    """What a header declares."""

    version: int
    kv: dict[str, Any]
    """Each key's value: a scalar, a string, or (arrays kept) a list; None for a skipped array."""
    types: dict[str, int]
    """Each key's value type (``ARRAY`` for arrays)."""
    arrays: dict[str, tuple[int, int]]
    """Each array's element type and length."""
    tensors: list[TensorInfo]
    alignment: int
    header_bytes: int
    """Where the tensor table ends."""
    data_start: int
    """Where the data section begins (``header_bytes`` rounded up to the alignment)."""

    @property
    def data_bytes(self) -> int:
        """The data section's length: the last tensor's end."""
        return max((t.offset + t.nbytes for t in self.tensors), default=0)

    def scalars(self) -> dict[str, Any]:
        """The keys whose values are scalars or strings."""
        return {k: v for k, v in self.kv.items() if self.types[k] != ARRAY}


class _Cursor:
    def __init__(self, buf: bytes | bytearray | memoryview, bounds: HeaderBounds) -> None:
        self.buf = memoryview(buf).cast("B")
        self.end = len(self.buf)
        self.bounds = bounds
        self.pos = 0

    def take(self, n: int, what: str) -> int:
        """Move past ``n`` bytes; their start."""
        start, end = self.pos, self.pos + n
        if end > self.bounds.max_header_bytes:
            raise GGUFError(f"{what} ends past byte {self.bounds.max_header_bytes}, the most a "
                            "header may take (max_header_bytes)", "max_header_bytes",
                            self.bounds.max_header_bytes)
        if end > self.end:
            raise Truncated(end, what)
        self.pos = end
        return start

    def unpack(self, s: struct.Struct, what: str) -> tuple[Any, ...]:
        return s.unpack_from(self.buf, self.take(s.size, what))

    def string_length(self, what: str, most: int | None = None) -> int:
        (n,) = self.unpack(_U64, what)
        most = self.bounds.max_string_bytes if most is None else most
        if n > most:
            bound = "max_string_bytes" if most == self.bounds.max_string_bytes else None
            raise GGUFError(f"{what} is a string of {n} bytes, more than {most}"
                            + (" (max_string_bytes)" if bound else ""), bound, most)
        return n

    def string(self, what: str, most: int | None = None) -> str:
        n = self.string_length(what, most)
        start = self.take(n, what)
        return str(self.buf[start:start + n], "utf-8", "replace")

    def skip_strings(self, count: int, what: str) -> None:
        """Move past ``count`` strings, reading only their lengths (the hot loop of a model's
        vocabulary: :meth:`take` inlined)."""
        buf, unpack, most = self.buf, _U64.unpack_from, self.bounds.max_string_bytes
        stop = min(self.end, self.bounds.max_header_bytes)
        pos = need = self.pos
        for i in range(count):
            need = pos + 8
            if need > stop:
                break
            (n,) = unpack(buf, pos)
            if n > most:
                raise GGUFError(f"element {i} of {what} is a string of {n} bytes, more than "
                                f"{most} (max_string_bytes)", "max_string_bytes", most)
            pos = need = pos + 8 + n
            if pos > stop:
                break
        else:
            self.pos = pos
            return
        self.take(need - self.pos, what)  # past the end: raises Truncated or the bound
        raise AssertionError("unreachable")


def _bounded(what: str, n: int, bound: str, bounds: HeaderBounds) -> None:
    most = getattr(bounds, bound)
    if n > most:
        raise GGUFError(f"{what} is {n}, more than {most} ({bound})", bound, most)


def _array(cur: _Cursor, key: str, elements: int) -> tuple[Any, int, int]:
    """An array value (None where skipped), its element type and length."""
    bounds = cur.bounds
    etype, count = cur.unpack(_ARRAY_HEAD, f"the array {key!r}")
    if etype == ARRAY:
        raise GGUFError(f"{key!r} is an array of arrays (llama.cpp reads none)")
    if etype != STRING and etype not in _SCALARS:
        raise GGUFError(f"{key!r} is an array of unknown type {etype}")
    _bounded(f"the length of the array {key!r}", count, "max_array_len", bounds)
    _bounded(f"the number of array elements up to {key!r}", elements + count,
             "max_array_elements", bounds)
    what = f"the array {key!r}"
    if etype == STRING:
        if bounds.keep_arrays:
            return [cur.string(what) for _ in range(count)], etype, count
        cur.skip_strings(count, what)
        return None, etype, count
    size = _SCALARS[etype].size * count
    start = cur.take(size, what)
    if not bounds.keep_arrays:
        return None, etype, count
    return list(struct.unpack_from(f"<{count}{_CODES[etype]}", cur.buf, start)), etype, count


def _tensor(cur: _Cursor, i: int, alignment: int, expected_offset: int) -> TensorInfo:
    name = cur.string(f"the name of tensor {i}", MAX_NAME_BYTES)
    (n_dims,) = cur.unpack(_U32, f"tensor {name!r}")
    if n_dims > MAX_DIMS:
        raise GGUFError(f"tensor {name!r} has {n_dims} dimensions, more than {MAX_DIMS}")
    ne = struct.unpack_from(f"<{n_dims}q", cur.buf, cur.take(8 * n_dims, f"tensor {name!r}"))
    if any(n < 0 for n in ne):
        raise GGUFError(f"tensor {name!r} has a negative dimension {ne}")
    elements = 1
    for n in ne:
        elements *= n
    if elements > _INT64_MAX:
        raise GGUFError(f"tensor {name!r} has {elements} elements, past an int64")
    ggml_type, offset = cur.unpack(_TYPE_OFFSET, f"tensor {name!r}")
    sizes = GGML_QUANT_SIZES.get(ggml_type)  # type: ignore[call-overload]
    if sizes is None:
        raise GGUFError(f"tensor {name!r} has unknown ggml type {ggml_type}")
    block, block_bytes = sizes
    if (ne[0] if ne else 1) % block:
        raise GGUFError(f"tensor {name!r}: rows of {ne[0] if ne else 1} elements are not a "
                        f"multiple of its type's block of {block}")
    if offset != expected_offset:
        raise GGUFError(f"tensor {name!r} starts at data offset {offset}; the tensors before "
                        f"it (aligned to {alignment}) end at {expected_offset}")
    return TensorInfo(name, tuple(ne), ggml_type, offset, elements // block * block_bytes)


def _read_kv(cur: _Cursor, n_kv: int, kv: dict[str, Any], types: dict[str, int],
             arrays: dict[str, tuple[int, int]]) -> None:
    elements = 0
    for i in range(n_kv):
        key = cur.string(f"key {i}")
        if not key:
            raise GGUFError(f"key {i} is empty")
        if key in types:
            raise GGUFError(f"key {key!r} appears twice")
        (vtype,) = cur.unpack(_U32, f"the type of {key!r}")
        if vtype == ARRAY:
            value, etype, count = _array(cur, key, elements)
            elements += count
            arrays[key] = (etype, count)
        elif vtype == STRING:
            value = cur.string(f"the value of {key!r}")
        elif vtype in _SCALARS:
            (value,) = cur.unpack(_SCALARS[vtype], f"the value of {key!r}")
        else:
            raise GGUFError(f"{key!r} has unknown value type {vtype}")
        kv[key], types[key] = value, vtype


def parse_header(buf: bytes | bytearray | memoryview, bounds: HeaderBounds) -> GGUFHeader:
    """The header at the start of ``buf`` (which may hold more, such as tensor data).

    Raises :class:`Truncated` where ``buf`` ends inside the header and :class:`GGUFError` for
    anything else wrong, a bound exceeded included; never another exception.
    """
    cur = _Cursor(buf, bounds)
    magic, version, n_tensors, n_kv = cur.unpack(_FIXED, "the fixed header")
    if magic != MAGIC:
        raise GGUFError(f"not a GGUF file (magic {bytes(magic)!r})")
    if version not in (2, 3):
        raise GGUFError(f"GGUF version {version} is not supported (2 or 3)")
    if n_tensors < 0 or n_kv < 0:
        raise GGUFError(f"negative counts ({n_tensors} tensors, {n_kv} keys)")
    _bounded("the number of keys", n_kv, "max_kv", bounds)
    _bounded("the number of tensors", n_tensors, "max_tensors", bounds)
    kv: dict[str, Any] = {}
    types: dict[str, int] = {}
    arrays: dict[str, tuple[int, int]] = {}
    try:
        _read_kv(cur, n_kv, kv, types, arrays)
    except GGUFError as exc:
        exc.kv = kv
        raise
    alignment = DEFAULT_ALIGNMENT
    if "general.alignment" in types:
        if types["general.alignment"] != UINT32:
            raise GGUFError("general.alignment is not a uint32")
        alignment = kv["general.alignment"]
        if alignment <= 0 or alignment & (alignment - 1):
            raise GGUFError(f"general.alignment {alignment} is not a power of two")
    tensors: list[TensorInfo] = []
    names: set[str] = set()
    data = 0
    for i in range(n_tensors):
        t = _tensor(cur, i, alignment, data)
        if t.name in names:
            raise GGUFError(f"tensor {t.name!r} appears twice")
        names.add(t.name)
        tensors.append(t)
        data = t.offset + -(-t.nbytes // alignment) * alignment
    header_bytes = cur.pos
    data_start = -(-header_bytes // alignment) * alignment if tensors else header_bytes
    return GGUFHeader(version, kv, types, arrays, tensors, alignment, header_bytes, data_start)


def read_header(fd: int, bounds: HeaderBounds, *, first: int = MiB) -> tuple[GGUFHeader, int]:
    """The header of the open file ``fd`` and the file's size, read with ``pread`` (never a
    memory map: a file that shrinks meanwhile reads short, which is a :class:`GGUFError`).

    Reads ``first`` bytes, then as much as the parser asks for and at least 8 times more (a
    model's header is a few MiB: gemma 3's 6.2), up to the file's size and
    ``max_header_bytes``.
    """
    size = os.fstat(fd).st_size
    want = min(size, first, bounds.max_header_bytes)
    while True:
        buf = _pread(fd, want)
        try:
            return parse_header(buf, bounds), size
        except Truncated as exc:
            if len(buf) < want or exc.needed > size:
                error = GGUFError(f"the file ends at byte {len(buf)}, inside its header: "
                                  f"{exc.message} (truncated?)")
                error.kv = exc.kv
                raise error from None
            want = min(max(exc.needed, 8 * want), size, bounds.max_header_bytes)


def _pread(fd: int, n: int) -> bytes:
    """Up to ``n`` bytes from the start of ``fd`` (fewer only at the end of the file)."""
    first = os.pread(fd, n, 0)
    if len(first) == n or not first:
        return first
    parts = [first]
    done = len(first)
    while done < n and (part := os.pread(fd, n - done, done)):
        parts.append(part)
        done += len(part)
    return b"".join(parts)
