"""Files are snapshots: what a client does to a file cannot take the daemon down.

* Adapter files (and PEFT weights) are read into private memory before anything parses them:
  a client that truncates or rewrites one while its own ``set_lora``/``validate_lora`` reads it
  gets a typed error; the daemon and every other client go on. (Before: the ``gguf`` package's
  reader memory-mapped the file, and a file that shrank under it killed the daemon with SIGBUS.)
* GGUF headers are parsed within bounds checked before anything is built: a hostile header
  (200,000 strings, lying counts and lengths) is ``lora_invalid`` naming the bound. (Before: a
  200,000-string header took 3.2 s per request to parse, and was accepted.)
* Keys llama.cpp reads with a typed getter (``adapter.lora.alpha`` as a float32...) are checked:
  llama.cpp aborts the process on another type.
* Models are memory-mapped by llama.cpp, as in every peer: a model file replaced by rename does
  not affect the loaded model; a model loaded with ``use_mmap=False`` is not affected by
  anything done to its file. (An in-place truncation of a mapped model kills the daemon: the
  README says so; it is not tested here.)
"""

from __future__ import annotations

import json
import mmap
import os
import random
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import pytest

import tinymodels
from conftest import DaemonProcess, start_daemon
from lorad.client import Client, LoradError, LoraInvalid
from lorad.daemon.gguf_header import (
    ADAPTER_BOUNDS,
    MODEL_BOUNDS,
    GGUFError,
    HeaderBounds,
    Truncated,
    parse_header,
)
from lorad.daemon.lora import inspect_adapter, read_gguf_header
from lorad.daemon.peft import convert_peft
from lorad.daemon.snapshot import read_private, snapshot
from lorad.protocol import ErrorCode, ProtocolError

PROMPT = "Hello world, the cat and the dog"
TYPED = {"lora_invalid", "lora_load_failed", "lora_file_not_found", "lora_incompatible",
         "lora_unsupported"}
"""What a request on a file that changes under it may get, besides success."""


# -- crafted GGUF bytes ------------------------------------------------------------------------
def _s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv_str(key: str, value: str) -> bytes:
    return _s(key) + struct.pack("<I", 8) + _s(value)


def kv_f32(key: str, value: float) -> bytes:
    return _s(key) + struct.pack("<If", 6, value)


ADAPTER_KV = [kv_str("general.architecture", "llama"), kv_str("general.type", "adapter"),
              kv_str("adapter.type", "lora"), kv_f32("adapter.lora.alpha", 8.0)]


def gguf_bytes(kvs: list[bytes], n_kv: int | None = None, n_tensors: int = 0,
               tail: bytes = b"") -> bytes:
    """A GGUF v3 header with these key/value records (``n_kv`` may lie), then ``tail``."""
    count = len(kvs) if n_kv is None else n_kv
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, count) + b"".join(kvs) + tail


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def write_big_header_adapter(path: Path, base: dict[str, np.ndarray], n_pad: int = 400) -> Path:
    """A valid adapter whose header spans many pages (``n_pad`` 2 KB strings), so that a
    parser reading a mapped file reaches pages a truncation has removed."""
    w = gguf.GGUFWriter(path, "llama")
    w.add_type("adapter")
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 8.0)
    for i in range(n_pad):
        w.add_string(f"lorad.test.pad.{i}", "x" * 2000)
    rng = np.random.default_rng(3)
    for name in ("blk.0.attn_q.weight", "blk.1.attn_q.weight"):
        n_out, n_in = base[name].shape
        w.add_tensor(f"{name}.lora_a", rng.normal(0, 0.1, (4, n_in)).astype(np.float32))
        w.add_tensor(f"{name}.lora_b", rng.normal(0, 0.1, (n_out, 4)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_many_strings_adapter(path: Path, base: dict[str, np.ndarray],
                               n: int = 200_000) -> Path:
    """A valid adapter but for a metadata array of ``n`` strings (llama.cpp would load it)."""
    w = gguf.GGUFWriter(path, "llama")
    w.add_type("adapter")
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 8.0)
    w.add_array("lorad.test.strings", [f"s{i}" for i in range(n)])
    n_out, n_in = base["blk.0.attn_q.weight"].shape
    w.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros((4, n_in), np.float32))
    w.add_tensor("blk.0.attn_q.weight.lora_b", np.zeros((n_out, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_peft(directory: Path, base: dict[str, np.ndarray], rank: int = 4,
               extra_bytes: int = 0) -> Path:
    """A PEFT LoRA of q_proj in both layers, written with numpy (``extra_bytes``: the size of
    a tensor that is no LoRA weight, which makes the conversion read it, then refuse)."""
    from safetensors.numpy import save_file

    directory.mkdir()
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
              "target_modules": ["q_proj"]}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(5)
    tensors = {}
    for layer in (0, 1):
        n_out, n_in = base[f"blk.{layer}.attn_q.weight"].shape
        prefix = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        tensors[f"{prefix}.lora_A.weight"] = rng.normal(0, 0.1, (rank, n_in)).astype(np.float32)
        tensors[f"{prefix}.lora_B.weight"] = rng.normal(0, 0.1, (n_out, rank)).astype(np.float32)
    if extra_bytes:
        tensors["base_model.model.extra"] = np.zeros(extra_bytes // 4, np.float32)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    return directory


# -- fixtures ----------------------------------------------------------------------------------
class Files:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.base = tinymodels.tiny_llama_tensors(seed=0)
        self.model = tinymodels.write_tiny_llama(root / "base.gguf", seed=0)
        self.small = tinymodels.write_lora(root / "small.gguf", self.base).path
        self.alora = tinymodels.write_alora(root / "alora.gguf", self.base)
        self.big = write_big_header_adapter(root / "big-header.gguf", self.base)
        self.strings = write_many_strings_adapter(root / "strings.gguf", self.base)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    return Files(tmp_path_factory.mktemp("snapshots"))


@pytest.fixture(scope="module")
def snap_daemon(tmp_path_factory: pytest.TempPathFactory, files: Files
                ) -> Iterator[DaemonProcess]:
    d = start_daemon(tmp_path_factory.mktemp("snap-daemon"), [files.root])
    yield d
    assert d.stop() == 0, d.log()
    assert '"level": "error"' not in d.log(), d.log()


@pytest.fixture
def own_daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    """A daemon of the test's own, allowed to read the test's ``tmp_path`` only."""
    d = start_daemon(tmp_path, [tmp_path])
    yield d
    assert d.stop() == 0, d.log()


@pytest.fixture
def client(snap_daemon: DaemonProcess) -> Iterator[Client]:
    with snap_daemon.client() as c:
        yield c


# -- the parser on crafted bytes ---------------------------------------------------------------
def test_every_truncation_of_an_adapter_is_a_typed_error(files: Files, tmp_path: Path) -> None:
    data = files.alora.read_bytes()
    header = parse_header(data, ADAPTER_BOUNDS)
    assert header.kv["adapter.alora.invocation_tokens"] == [5, 6, 7]
    for cut in range(len(data)):
        if cut < header.header_bytes:
            with pytest.raises(Truncated):
                parse_header(data[:cut], ADAPTER_BOUNDS)
        with pytest.raises(ProtocolError) as info:
            inspect_adapter(write(tmp_path / "cut.gguf", data[:cut]))
        assert info.value.code is ErrorCode.LORA_INVALID, (cut, info.value)
    assert inspect_adapter(write(tmp_path / "whole.gguf", data)).alora_invocation_tokens == [
        5, 6, 7]


def test_mutated_headers_parse_or_are_a_gguf_error(files: Files) -> None:
    data = files.alora.read_bytes()
    end = parse_header(data, ADAPTER_BOUNDS).header_bytes
    rng = random.Random(9)
    outcomes = {"parsed": 0, "refused": 0}
    for _ in range(3000):
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(end)
            mutated[i] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)])
        try:
            parse_header(bytes(mutated), ADAPTER_BOUNDS)
            outcomes["parsed"] += 1
        except GGUFError:
            outcomes["refused"] += 1
    assert outcomes["parsed"] and outcomes["refused"]


HOSTILE = {
    # name: (header bytes, words of the message, the bound named or None)
    "huge_kv_count": (gguf_bytes(ADAPTER_KV, n_kv=2**40), "number of keys", "max_kv"),
    "huge_tensor_count": (gguf_bytes(ADAPTER_KV, n_tensors=2**40), "number of tensors",
                          "max_tensors"),
    "huge_array_length": (gguf_bytes([*ADAPTER_KV, _s("a") + struct.pack("<IIQ", 9, 0, 2**40)]),
                          "length of the array", "max_array_len"),
    "huge_string_length": (gguf_bytes([*ADAPTER_KV, _s("a") + struct.pack("<IQ", 8, 2**60)]),
                           "string of", "max_string_bytes"),
    "huge_key_length": (gguf_bytes([struct.pack("<Q", 2**62)]), "string of",
                        "max_string_bytes"),
    "many_arrays": (gguf_bytes([*ADAPTER_KV, *(_s(f"a{i}") + struct.pack("<IIQ", 9, 0, 1000)
                                               + bytes(1000) for i in range(5))]),
                    "array elements", "max_array_elements"),
    "nested_array": (gguf_bytes([*ADAPTER_KV, _s("a") + struct.pack("<IIQ", 9, 9, 1)]),
                     "array of arrays", None),
    "unknown_type": (gguf_bytes([*ADAPTER_KV, _s("a") + struct.pack("<I", 13)]),
                     "unknown value type", None),
    "duplicate_key": (gguf_bytes([*ADAPTER_KV, kv_str("general.type", "adapter")]), "twice",
                      None),
    "empty_key": (gguf_bytes([*ADAPTER_KV, kv_str("", "x")]), "empty", None),
    "bad_alignment": (gguf_bytes([*ADAPTER_KV, _s("general.alignment")
                                  + struct.pack("<II", 4, 24)]), "power of two", None),
    "alignment_type": (gguf_bytes([*ADAPTER_KV, _s("general.alignment")
                                   + struct.pack("<IQ", 10, 32)]), "not a uint32", None),
    "five_dims": (gguf_bytes(ADAPTER_KV, n_tensors=1, tail=_s("t.lora_a")
                             + struct.pack("<I5q", 5, 1, 1, 1, 1, 1)), "dimensions", None),
    "negative_dim": (gguf_bytes(ADAPTER_KV, n_tensors=1, tail=_s("t.lora_a")
                                + struct.pack("<I2qIQ", 2, 4, -1, 0, 0)), "negative", None),
    "overflowing_dims": (gguf_bytes(ADAPTER_KV, n_tensors=1, tail=_s("t.lora_a")
                                    + struct.pack("<I2qIQ", 2, 2**62, 4, 0, 0)), "int64", None),
    "unknown_ggml_type": (gguf_bytes(ADAPTER_KV, n_tensors=1, tail=_s("t.lora_a")
                                     + struct.pack("<I2qIQ", 2, 4, 4, 999, 0)),
                          "unknown ggml type", None),
    "block_size": (gguf_bytes(ADAPTER_KV, n_tensors=1, tail=_s("t.lora_a")
                              + struct.pack("<I2qIQ", 2, 5, 4, 2, 0)), "block", None),
    "misplaced_offset": (gguf_bytes(ADAPTER_KV, n_tensors=1, tail=_s("t.lora_a")
                                    + struct.pack("<I2qIQ", 2, 4, 4, 0, 64)), "offset", None),
    "long_name": (gguf_bytes(ADAPTER_KV, n_tensors=1, tail=_s("t" * 64)
                             + struct.pack("<I2qIQ", 2, 4, 4, 0, 0)), "more than 63", None),
    "bad_magic": (b"GGUG" + bytes(20), "not a GGUF", None),
    "version_1": (b"GGUF" + struct.pack("<IQQ", 1, 0, 0), "version 1", None),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_headers_are_refused_before_anything_is_built(name: str) -> None:
    data, words, bound = HOSTILE[name]
    with pytest.raises(GGUFError) as info:
        parse_header(data, ADAPTER_BOUNDS)
    assert not isinstance(info.value, Truncated), info.value
    assert words in info.value.message
    assert info.value.bound == bound


def test_the_header_bytes_bound_holds_whatever_the_buffer() -> None:
    tight = HeaderBounds(max_header_bytes=4096, max_kv=64, max_tensors=8, max_string_bytes=8192,
                         max_array_len=8, max_array_elements=8, keep_arrays=True)
    data = gguf_bytes([*ADAPTER_KV, kv_str("big", "x" * 5000)])
    with pytest.raises(GGUFError) as info:
        parse_header(data, tight)
    assert info.value.bound == "max_header_bytes"
    with pytest.raises(GGUFError) as info:  # skipped string arrays count too
        parse_header(gguf_bytes([_s("a") + struct.pack("<IIQ", 9, 8, 8)
                                 + b"".join(_s("y" * 1000) for _ in range(8))]),
                     HeaderBounds(**{**tight.__dict__, "keep_arrays": False}))
    assert info.value.bound == "max_header_bytes"


def test_model_headers_skip_arrays_and_agree_with_gguf(files: Files) -> None:
    meta, shapes = read_gguf_header(files.model)
    reader = gguf.GGUFReader(files.model)
    assert shapes == {t.name: tuple(int(n) for n in reversed(t.shape.tolist()))
                      for t in reader.tensors}
    assert "tokenizer.ggml.tokens" not in meta and meta["general.architecture"] == "llama"
    header = parse_header(files.model.read_bytes(), MODEL_BOUNDS)
    assert header.arrays["tokenizer.ggml.tokens"][1] == len(tinymodels.default_vocab())
    assert header.kv["tokenizer.ggml.tokens"] is None  # skipped, not built


def test_nothing_lorad_parses_is_memory_mapped(files: Files, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a file was memory-mapped")

    monkeypatch.setattr(mmap, "mmap", refuse)
    monkeypatch.setattr(np, "memmap", refuse)
    assert inspect_adapter(files.small).ranks == [4]
    assert read_gguf_header(files.model)[0]["general.architecture"] == "llama"
    peft_dir = write_peft(tmp_path / "peft", files.base)
    out = convert_peft(peft_dir, files.model, tmp_path / "peft.gguf")
    assert sorted(inspect_adapter(out).targets) == ["blk.0.attn_q.weight", "blk.1.attn_q.weight"]


# -- snapshots ---------------------------------------------------------------------------------
def test_a_snapshot_is_a_sealed_copy(files: Files, tmp_path: Path) -> None:
    path = write(tmp_path / "a.gguf", files.small.read_bytes())
    with snapshot(path, 1 << 20) as snap:
        os.truncate(path, 0)  # the copy does not care
        with open(snap.path, "rb") as f:
            assert f.read() == files.small.read_bytes()
        with open(snap.path, "r+b", buffering=0) as f:  # sealed: no one can change it
            with pytest.raises(PermissionError):
                f.write(b"x")
            with pytest.raises(PermissionError):
                f.truncate(0)


def test_too_large_is_refused_before_reading(files: Files) -> None:
    size = files.small.stat().st_size
    for read in (snapshot, read_private):
        with pytest.raises(ProtocolError) as info:
            read(files.small, size - 1)
        assert info.value.code is ErrorCode.TOO_LARGE
        assert info.value.details["limit"] == "max_adapter_file_bytes"
        assert "max_adapter_file_bytes" in info.value.message


def test_a_file_that_is_not_what_fstat_said_is_refused() -> None:
    # /proc files say 0 bytes and hold more: what a file growing during the copy looks like
    for read in (snapshot, read_private):
        with pytest.raises(ProtocolError) as info:
            read(Path("/proc/self/status"), 1 << 20)
        assert info.value.code is ErrorCode.LORA_LOAD_FAILED
        assert "changed while it was being read; retry" in info.value.message


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.gguf"
    os.mkfifo(fifo)
    for read in (snapshot, read_private):
        with pytest.raises(ProtocolError) as info:
            read(fifo, 1 << 20)
        assert info.value.code is ErrorCode.LORA_FILE_NOT_FOUND


# -- through a daemon: files that change while they are read -----------------------------------
class Hammer:
    """A thread that rewrites ``path`` in place with ``good`` and truncates it to each of
    ``cuts`` in turn, as fast as it can, until stopped (same inode throughout)."""

    def __init__(self, path: Path, good: bytes, cuts: list[int]) -> None:
        self.path, self.good, self.cuts = path, good, cuts
        self.stop = threading.Event()
        self.rounds = 0
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        fd = os.open(self.path, os.O_RDWR)
        try:
            while not self.stop.is_set():
                os.pwrite(fd, self.good, 0)
                os.ftruncate(fd, self.cuts[self.rounds % len(self.cuts)])
                self.rounds += 1
            os.pwrite(fd, self.good, 0)
        finally:
            os.close(fd)

    def __enter__(self) -> Hammer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def outcome(call) -> str:
    """``ok``, or the code of the error (a daemon that died: ``unavailable``/``timeout``)."""
    try:
        result = call()
    except LoradError as exc:
        return exc.code
    if isinstance(result, dict) and result.get("problems"):
        codes = {p["code"] for p in result["problems"]}
        return codes.pop() if len(codes) == 1 else ",".join(sorted(codes))
    return "ok"


def storm(c: Client, d: DaemonProcess, calls: list, *, requests: int = 300,
          seconds: float = 30) -> dict[str, int]:
    """Run ``calls`` in turn (bounded by count and time); stop at a daemon's death."""
    seen: dict[str, int] = {}
    deadline = time.monotonic() + seconds
    for i in range(requests):
        got = outcome(calls[i % len(calls)])
        seen[got] = seen.get(got, 0) + 1
        if got not in TYPED | {"ok"} or time.monotonic() > deadline:
            break
    return seen


def assert_alive(c: Client, d: DaemonProcess, bystander) -> None:
    assert d.proc.poll() is None, f"the daemon died ({d.proc.returncode})"
    assert c.ping()["pong"]
    assert bystander.generate(PROMPT, max_tokens=4, temperature=0).collect() is not None


def test_truncating_an_adapter_while_it_loads_never_kills_the_daemon(
        client: Client, snap_daemon: DaemonProcess, files: Files, tmp_path: Path) -> None:
    """Before: SIGBUS (exit -7) within the first few requests. The file is rewritten and cut
    (at 0, inside the fixed header, inside the key/values, inside the tensor table and inside
    the data) in a tight loop while set_lora and validate_lora read it."""
    good = files.big.read_bytes()
    header = parse_header(good, ADAPTER_BOUNDS)
    cuts = [0, 13, 4096, 100_000, header.header_bytes - 9, header.data_start + 100]
    path = write(files.root / "hammered.gguf", good)
    with client.create_context(files.model, n_ctx=128) as ctx, \
            client.create_context(files.model, n_ctx=128) as bystander:
        model = str(files.model)
        with Hammer(path, good, cuts) as hammer:
            seen = storm(client, snap_daemon, [lambda: ctx.set_lora(path),
                                              lambda: client.validate_lora(model, path)])
        assert hammer.rounds > 0
        assert set(seen) <= TYPED | {"ok"}, seen
        assert_alive(client, snap_daemon, bystander)
        assert ctx.set_lora(path)[0]["path"] == str(path)  # the whole file loads again
        assert ctx.generate(PROMPT, max_tokens=4, temperature=0).collect() is not None
        ctx.clear_loras()


def test_truncating_peft_weights_while_they_convert_never_kills_the_daemon(
        client: Client, snap_daemon: DaemonProcess, files: Files) -> None:
    """Before: safetensors mapped the weights; a cut while they were copied was a SIGBUS."""
    peft_dir = write_peft(files.root / "peft-hammered", files.base, extra_bytes=4 << 20)
    weights = peft_dir / "adapter_model.safetensors"
    good = weights.read_bytes()
    cuts = [0, 100, len(good) // 3, len(good) - 4096]
    with client.create_context(files.model, n_ctx=128) as bystander:
        with Hammer(weights, good, cuts):
            seen = storm(client, snap_daemon,
                         [lambda: client.validate_lora(str(files.model), peft_dir)],
                         requests=100)
        assert set(seen) <= TYPED | {"ok"}, seen
        assert_alive(client, snap_daemon, bystander)
        report = client.validate_lora(str(files.model), peft_dir)
        assert [p["details"]["reason"] for p in report["problems"]] == ["unexpected_tensor"]


# -- through a daemon: hostile headers ---------------------------------------------------------
def test_a_header_of_200000_strings_is_refused_naming_the_bound(
        client: Client, files: Files) -> None:
    # Before: 3.2 s per request to parse (gguf.GGUFReader), then accepted. Here: under 5 ms.
    report = client.validate_lora(str(files.model), files.strings)
    [problem] = report["problems"]
    assert problem["code"] == "lora_invalid"
    assert problem["details"]["bound"] == "max_array_len"
    assert "200000" in problem["message"] and "max_array_len" in problem["message"]
    with client.create_context(files.model, n_ctx=128) as ctx:
        for _ in range(20):
            with pytest.raises(LoraInvalid) as info:
                ctx.set_lora(files.strings)
            assert info.value.details["bound"] == "max_array_len"
        assert ctx.loras() == []
    assert client.status()["adapters"] == []


@pytest.mark.parametrize("name", ["huge_kv_count", "huge_tensor_count", "huge_array_length",
                                  "huge_string_length", "many_arrays"])
def test_lying_headers_are_lora_invalid_naming_the_bound(client: Client, files: Files,
                                                         name: str) -> None:
    data, words, bound = HOSTILE[name]
    path = write(files.root / f"{name}.gguf", data)
    with client.create_context(files.model, n_ctx=128) as ctx:
        with pytest.raises(LoraInvalid) as info:
            ctx.set_lora(path)
    assert info.value.details["bound"] == bound and words in info.value.message
    report = client.validate_lora(str(files.model), path)
    assert [p["code"] for p in report["problems"]] == ["lora_invalid"]


def test_a_key_of_the_wrong_type_is_refused_not_an_abort(client: Client, files: Files) -> None:
    """llama.cpp reads ``adapter.lora.alpha`` with ``gguf_get_val_f32``, which aborts the
    process (GGML_ASSERT) when the key holds another type."""
    data = bytearray(files.small.read_bytes())
    key = _s("adapter.lora.alpha")
    at = data.index(key) + len(key)
    assert struct.unpack_from("<I", data, at) == (6,)
    struct.pack_into("<I", data, at, 5)  # an int32 of the same size: the file stays valid
    path = write(files.root / "alpha-int32.gguf", bytes(data))
    with client.create_context(files.model, n_ctx=128) as ctx:
        with pytest.raises(LoraInvalid) as info:
            ctx.set_lora(path)
        assert "adapter.lora.alpha is of type int32, not float32" in info.value.message
        assert ctx.generate(PROMPT, max_tokens=2, temperature=0).collect() is not None
    assert client.ping()["pong"]


# -- models: what lorad promises when a model file changes -------------------------------------
def _tokens(ctx) -> list[int]:
    out: list[int] = []
    for chunk in ctx.generate(PROMPT, max_tokens=16, temperature=0):
        out += chunk.token_ids
    return out


def test_a_model_replaced_by_rename_does_not_affect_the_loaded_model(
        own_daemon: DaemonProcess, tmp_path: Path) -> None:
    path = tinymodels.write_tiny_llama(tmp_path / "renamed.gguf", seed=0)
    other = tinymodels.write_tiny_llama(tmp_path / "renamed-new.gguf", seed=7)
    with own_daemon.client() as c:
        with c.create_context(other, n_ctx=128) as ctx:
            new_tokens = _tokens(ctx)
        c.unload_model(str(other))
        model = c.load_model(path)
        with c.create_context(model, n_ctx=128) as ctx:
            old_tokens = _tokens(ctx)
            assert old_tokens != new_tokens
            stream = iter(ctx.generate(PROMPT, max_tokens=16, temperature=0))
            first = next(stream).token_ids
            os.replace(other, path)  # a new file in its place, mid-stream
            assert first + [t for chunk in stream for t in chunk.token_ids] == old_tokens
            assert _tokens(ctx) == old_tokens
            assert c.load_model(path)["id"] == model["id"]  # still loaded: the old weights
        c.unload_model(model)
        with c.create_context(c.load_model(path), n_ctx=128) as ctx:
            assert _tokens(ctx) == new_tokens  # loaded again: the new file
        assert c.ping()["pong"]


def test_a_model_loaded_without_mmap_survives_its_file_being_truncated(
        own_daemon: DaemonProcess, tmp_path: Path) -> None:
    path = tinymodels.write_tiny_llama(tmp_path / "nommap.gguf", seed=0)
    with own_daemon.client() as c:
        model = c.load_model(path, use_mmap=False)
        with c.create_context(model, n_ctx=128) as ctx:
            before = _tokens(ctx)
            os.truncate(path, 0)
            assert _tokens(ctx) == before
        assert own_daemon.proc.poll() is None and c.ping()["pong"]
