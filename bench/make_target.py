"""Write the draft-model benchmark's target: the default model dequantized to F16 (or Q8_0).

The original quantized file then drafts for it with the same vocabulary.

Usage::

    .venv/bin/python bench/make_target.py [--source PATH] [--type f16|q8_0] [--out PATH]
                                          [--force] [--check]

There is no smaller model with gemma 3's vocabulary on PyPI, but a draft model only needs the
target's vocabulary: so the target here is gemma 3 270M with every quantized tensor
(``Q4_K``, ``Q5_0``, ``Q6_K``, ``Q8_0``) dequantized with ``gguf.quants.dequantize`` and written as
F16 (or requantized to Q8_0 with ``gguf.quants.quantize``), and the draft is the original Q4_K_M
file. Every metadata key is copied (the tokenizer included) except ``general.file_type``, which
says the new type. F32 and F16 tensors are copied as they are. The F16 model computes with the
Q4_K_M weights' values (a dequantized copy adds no information) but reads twice the bytes per
token, so it decodes slower: that is all a target needs to be for speculation to pay.

The output goes to ``~/.cache/lorad/models/<source stem>-<type>-target.gguf`` (written to a
temporary file and renamed, so an interrupted run leaves no partial model); an existing output
is kept unless ``--force``. ``--check`` loads the target and the draft with llama-cpp-python and
prints their greedy continuations of a short prompt (they should be sensible and mostly agree).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

CACHE = Path("~/.cache/lorad/models").expanduser()
TYPES = {"f16": ("F16", "MOSTLY_F16"), "q8_0": ("Q8_0", "MOSTLY_Q8_0")}
KEEP = ("F32", "F16")  # tensor types copied unchanged


def default_source() -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from throughput import default_model_path

    return Path(default_model_path())


def target_path(source: Path, qtype: str = "f16") -> Path:
    stem = source.name.removesuffix(".gguf")
    return CACHE / f"{stem}-{qtype}-target.gguf"


def convert(source: Path, out: Path, qtype: str = "f16", log=print) -> None:
    """Write ``out``: ``source`` with every quantized tensor converted to ``qtype``."""
    import gguf

    ggml_name, file_type_name = TYPES[qtype]
    new_type = gguf.GGMLQuantizationType[ggml_name]
    reader = gguf.GGUFReader(source, "r")
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(tmp, arch=arch, endianess=reader.endianess)
    try:
        for field in reader.fields.values():
            # GGUF.* are virtual fields; the writer writes general.architecture itself
            if field.name.startswith("GGUF.") or field.name == gguf.Keys.General.ARCHITECTURE:
                continue
            vtype = field.types[0]
            sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            value = field.contents()
            if field.name == gguf.Keys.General.FILE_TYPE:
                value = int(gguf.LlamaFileType[file_type_name])
            writer.add_key_value(field.name, value, vtype, sub_type=sub_type)

        def converted(tensor) -> np.ndarray:
            if tensor.tensor_type.name in KEEP:
                return tensor.data
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)  # float32
            if new_type == gguf.GGMLQuantizationType.F16:
                return values.astype(np.float16)
            return gguf.quants.quantize(values, new_type)

        # The header lists every tensor's type and size first: compute them from the shapes.
        plan = []
        for t in reader.tensors:
            if t.tensor_type.name in KEEP:
                plan.append((t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type))
                continue
            shape = gguf.quants.quant_shape_from_byte_shape(t.data.shape, t.tensor_type)
            if new_type == gguf.GGMLQuantizationType.F16:
                nbytes = int(np.prod(shape)) * 2
                plan.append((t.name, shape, np.dtype(np.float16), nbytes, None))
            else:
                byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, new_type)
                plan.append((t.name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)),
                             new_type))
        for name, shape, dtype, nbytes, raw in plan:
            writer.add_tensor_info(name, shape, dtype, nbytes, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        started = time.perf_counter()
        for i, t in enumerate(reader.tensors):
            data = converted(t)
            assert data.nbytes == plan[i][3], (t.name, data.nbytes, plan[i][3])
            writer.write_tensor_data(data, tensor_endianess=reader.endianess)
        writer.close()
        os.replace(tmp, out)
        log(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {len(reader.tensors)} tensors, "
            f"{time.perf_counter() - started:.1f} s)")
    finally:
        if tmp.exists():
            tmp.unlink()


def ensure_target(source: Path | str | None = None, qtype: str = "f16", out: Path | None = None,
                  force: bool = False, log=print) -> Path:
    """The target model's path, written first if it is not there (or ``force``)."""
    source = Path(source) if source else default_source()
    out = out or target_path(source, qtype)
    if out.exists() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    log(f"writing the {qtype} target from {source} (once; cached at {out}) ...")
    convert(source, out, qtype, log)
    return out


def check(target: Path, draft: Path, prompt: str, tokens: int = 32) -> dict[str, object]:
    """Greedy continuations of ``prompt`` by the target and the draft (llama-cpp-python)."""
    import llama_cpp

    outputs = {}
    for name, path in (("target", target), ("draft", draft)):
        llm = llama_cpp.Llama(str(path), n_ctx=512, n_threads=2, verbose=False)
        try:
            ids = []
            for tok in llm.generate(llm.tokenize(prompt.encode()), temp=0.0, repeat_penalty=1.0):
                if llama_cpp.llama_cpp.llama_vocab_is_eog(llm._model.vocab, tok) \
                        or len(ids) >= tokens:
                    break
                ids.append(tok)
            outputs[name] = {"ids": ids, "text": llm.detokenize(ids).decode(errors="replace"),
                             "size_mib": round(path.stat().st_size / 2**20, 1),
                             "n_vocab": llm.n_vocab()}
        finally:
            llm.close()
    a, b = outputs["target"]["ids"], outputs["draft"]["ids"]
    same = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                min(len(a), len(b)))
    outputs["same_prefix_tokens"] = same
    return outputs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=None,
                    help="the quantized model (default: lorad default-model)")
    ap.add_argument("--type", choices=sorted(TYPES), default="f16")
    ap.add_argument("--out", type=Path, default=None,
                    help="default: ~/.cache/lorad/models/<source stem>-<type>-target.gguf")
    ap.add_argument("--force", action="store_true", help="write it again even if present")
    ap.add_argument("--check", action="store_true",
                    help="load target and draft and print their greedy continuations")
    args = ap.parse_args(argv)
    source = (args.source or default_source()).resolve()
    out = ensure_target(source, args.type, args.out, args.force)
    print(out)
    if args.check:
        result = check(out, source, "The capital of France is Paris. The capital of Germany is")
        for name in ("target", "draft"):
            r = result[name]
            print(f"{name} ({r['size_mib']} MiB, n_vocab {r['n_vocab']}): {r['text']!r}")
        print(f"identical greedy prefix: {result['same_prefix_tokens']} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
