"""Generation: ``generate`` and ``chat`` streams, queued on their context's actor."""

from __future__ import annotations

from ..requests import RequestHandle
from ..services import Services


async def generate(s: Services, h: RequestHandle) -> None:
    """Queue the stream on its context (with its own adapter stack, if it names one)."""
    actor = s.engine.context(h.args.context, h.peer)
    s.sessions.check_streams(h.peer)
    await s.engine.stacks.submit(actor, h)


chat = generate
