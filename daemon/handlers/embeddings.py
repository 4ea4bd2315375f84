"""Embeddings: ``embed``, one vector per input."""

from __future__ import annotations

from typing import Any

from ..requests import RequestHandle
from ..services import Services


async def embed(s: Services, h: RequestHandle) -> dict[str, Any]:
    return await s.engine.embed(h.args, h.peer, lambda: h.cancelled)
