"""LoRA adapters: a context's stack (set, remove, clear, replace, list) and validation."""

from __future__ import annotations

from typing import Any

from ..requests import RequestHandle
from ..services import Services


async def set_lora(s: Services, h: RequestHandle) -> dict[str, Any]:
    actor = s.engine.context(h.args.context, h.peer)
    return await s.engine.stacks.set_one(actor, h.args.path, h.args.scale)


def set_lora_now(s: Services, h: RequestHandle) -> dict[str, Any] | None:
    """The inline path of ``set_lora``: a scale change of an adapter in the stack (else None:
    the request runs :func:`set_lora` in a task of its own)."""
    actor = s.engine.contexts.get(h.args.context)
    if actor is None or not s.engine.visible(actor, h.peer):
        return None  # set_lora answers not_found
    return s.engine.stacks.scale_now(actor, h.args.path, h.args.scale)


async def remove_lora(s: Services, h: RequestHandle) -> dict[str, Any]:
    actor = s.engine.context(h.args.context, h.peer)
    return await s.engine.stacks.remove(actor, h.args.path)


async def clear_loras(s: Services, h: RequestHandle) -> dict[str, Any]:
    return await s.engine.stacks.clear(s.engine.context(h.args.context, h.peer))


async def set_loras(s: Services, h: RequestHandle) -> dict[str, Any]:
    actor = s.engine.context(h.args.context, h.peer)
    return await s.engine.stacks.replace(actor, h.args.loras)


async def list_loras(s: Services, h: RequestHandle) -> list[dict[str, Any]]:
    return [e.to_wire() for e in s.engine.context(h.args.context, h.peer).stack]


async def name_lora(s: Services, h: RequestHandle) -> dict[str, Any]:
    """Name the adapter at ``path`` for every client and door (checked: the allowed
    directories, and that it fits a loaded model)."""
    return await s.engine.stacks.name(list(s.engine.models), h.args.name, h.args.path,
                                      replace=h.args.replace)


async def unname_lora(s: Services, h: RequestHandle) -> dict[str, Any]:
    path = s.engine.stacks.unregister(h.args.name)
    return {"name": h.args.name, "path": path}


async def list_lora_names(s: Services, h: RequestHandle) -> list[dict[str, Any]]:
    return [{"name": n, "path": p} for n, p in s.engine.stacks.names.items()]


async def validate_lora(s: Services, h: RequestHandle) -> dict[str, Any]:
    model = await s.engine.model_for(h.args.model)
    return await s.engine.stacks.validate(model, h.args.path)
