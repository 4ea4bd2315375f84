"""Generation: ``generate`` and ``chat`` streams, queued on their context's actor."""

from __future__ import annotations

from ..requests import RequestHandle
from ..services import Services


async def generate(s: Services, h: RequestHandle) -> None:
    """Queue the stream on its context (with its own adapter stack, if it names one)."""
    actor = s.engine.context(h.args.context, h.peer)
    s.sessions.check_streams(h.peer)
    if h.args.loras is None:
        actor.submit(h, h.args)
        return
    stacks = s.engine.stacks
    stack, held = await stacks.build(actor.model, h.args.loras, actor.stack)
    try:
        actor.submit(h, h.args, stack, held)
    except BaseException:
        await stacks.release(held)
        raise


chat = generate
