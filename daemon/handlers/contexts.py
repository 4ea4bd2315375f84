"""Contexts: create, close, list."""

from __future__ import annotations

from typing import Any

from lorad.protocol import ErrorCode, ProtocolError

from ..requests import RequestHandle
from ..services import Services


async def create_context(s: Services, h: RequestHandle) -> dict[str, Any]:
    a = h.args
    if a.persistent and not a.shared:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "a persistent context outlives its "
                            "creator's connection, so a private one would be unreachable: "
                            "pass shared=True as well", field="persistent")
    s.sessions.check_new_context(len(s.engine.contexts), s.engine.created_by(h.peer),
                                 a.n_ctx)
    actor = await s.engine.create_context(a, creator=h.peer)
    if actor.owner is not None:
        s.sessions.own(h.peer, actor.id)
        if h.cancelled:  # the creator went away while we built it
            await s.engine.close_context(actor)
    return actor.info()


async def close_context(s: Services, h: RequestHandle) -> dict[str, Any]:
    actor = s.engine.context(h.args.context, h.peer)
    await s.engine.close_context(actor)
    return {"context": actor.id, "closed": True}


async def list_contexts(s: Services, h: RequestHandle) -> list[dict[str, Any]]:
    return [a.info() for a in s.engine.visible_contexts(h.peer)]
