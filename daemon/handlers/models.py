"""Models: load, unload, list; tokenize and detokenize with a model's vocabulary."""

from __future__ import annotations

import time
from typing import Any

import trio

from lorad.protocol import ErrorCode, ProtocolError

from .. import litert, llama
from ..litert_actor import unsupported
from ..requests import RequestHandle
from ..services import Services


async def load_model(s: Services, h: RequestHandle) -> dict[str, Any]:
    a = h.args
    progress = None
    if a.progress:
        token = trio.lowlevel.current_trio_token()
        last = [-1]

        def progress(fraction: float) -> bool:  # in the loading thread
            percent = int(fraction * 100)
            if percent != last[0]:  # at most 101 items
                last[0] = percent
                token.run_sync_soon(h.send_progress, {"progress": round(fraction, 4)})
            return not h.cancelled  # a cancelled load stops

    started = time.perf_counter()
    entry = await s.engine.models.load(a.path, n_gpu_layers=a.n_gpu_layers,
                                       use_mmap=a.use_mmap, alias=a.alias,
                                       chat_template=a.chat_template, progress=progress)
    info = entry.info()
    if a.progress:  # a stream of progress items, then the end with the model
        h.send_end({"finish_reason": "stop", "model": info,
                    "metrics": {"load_ms": round((time.perf_counter() - started) * 1000, 3),
                                "progress_items": h.seq}})
    return info


async def unload_model(s: Services, h: RequestHandle) -> dict[str, Any]:
    return await s.engine.unload_model(h.args.model, h.args.force)


async def list_models(s: Services, h: RequestHandle) -> list[dict[str, Any]]:
    return [m.info() for m in s.engine.models]


async def tokenize(s: Services, h: RequestHandle) -> list[int]:
    entry, a = s.engine.tokenizer(h.args, h.peer), h.args
    limit = s.limits.max_array_len  # what a client can decode
    if entry.backend == litert.BACKEND:
        return await _litert_tokenize(s, entry, a.text, a.add_special, a.parse_special, limit)
    try:
        async with entry.using() as model:  # an unload waits for the thread
            return await s.engine.text.run(
                lambda: model.tokenize(a.text, add_special=a.add_special,
                                       parse_special=a.parse_special, limit=limit))
    except llama.TooManyTokens as exc:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"the text has {exc.count()} tokens, more than "
                            f"limits.max_array_len ({limit}) can carry", field="text",
                            limit="max_array_len", value=limit) from None


async def _litert_tokenize(s: Services, entry: Any, text: str, add_special: bool,
                           parse_special: bool, limit: int) -> list[int]:
    """A LiteRT-LM model's tokens: its tokenizer always reads its special pieces in the
    text, and a prompt gets the start token (``add_special``)."""
    if not parse_special:
        raise unsupported("parse_special", "tokenizer", "the runtime's tokenizer always "
                          "reads special pieces written in the text: pass parse_special=true")
    if len(text) > limit * 64:  # no token is made of more than 64 characters here
        raise ProtocolError(ErrorCode.TOO_LARGE, "the text is too long to tokenize within "
                            f"limits.max_array_len ({limit}) tokens", field="text",
                            limit="max_array_len", value=limit)
    async with entry.using() as model:
        tokens = await s.engine.text.run(lambda: model.tokenize(text))
    tokens = ([model.bos] if add_special and model.bos is not None else []) + tokens
    if len(tokens) > limit:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"the text has {len(tokens)} tokens, more "
                            f"than limits.max_array_len ({limit}) can carry", field="text",
                            limit="max_array_len", value=limit)
    return tokens


async def detokenize(s: Services, h: RequestHandle) -> str:
    entry, tokens = s.engine.tokenizer(h.args, h.peer), h.args.tokens
    if entry.backend == litert.BACKEND:
        async with entry.using() as model:
            try:
                return await s.engine.text.run(lambda: model.detokenize(tokens))
            except litert.LitertError as exc:
                raise ProtocolError(ErrorCode.BAD_REQUEST, exc.message, field="tokens") from None
    async with entry.using() as model:  # an unload waits for the thread
        bad = next((t for t in tokens if t >= model.n_vocab), None)
        if bad is not None:
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                f"token {bad} is outside the vocabulary ({model.n_vocab})",
                                field="tokens")
        return await s.engine.text.run(lambda: model.detokenize(tokens))
