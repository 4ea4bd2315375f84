"""The table of operations: one record per operation says everything the daemon does with it.

Its argument schema comes from :data:`lorad.protocol.OPS` (shared with the clients); here are
its handler, whether it streams, whether it is answered inline (in the transport's task: quick
and never blocking) or in a task of its own, and whether it is served while the daemon drains.
The table is checked complete when this module is imported.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from lorad.protocol import OPS, STREAMING_OPS
from lorad.protocol.ops import Arg

from .handlers import adapters, admin, contexts, embeddings, generation, models
from .requests import RequestHandle
from .services import Services

Handler = Callable[[Services, RequestHandle], Awaitable[Any]]


@dataclass(frozen=True)
class Operation:
    name: str
    handler: Handler
    inline: bool = False
    """Answered in the transport's task (it must not wait on llama.cpp or the file system)."""
    while_draining: bool = False
    """Still served while the daemon shuts down."""
    now: Callable[[Services, RequestHandle], Any] | None = None
    """An inline path tried first: its result answers the request at once; None sends the
    request on to ``handler``."""

    @property
    def schema(self) -> dict[str, Arg]:
        return OPS[self.name]

    @property
    def streams(self) -> bool:
        return self.name in STREAMING_OPS

    def runs_inline(self, args: dict[str, Any]) -> bool:
        # A per-request adapter stack may have to load files: that runs in a task of its own.
        return self.inline and not (self.streams and args.get("loras"))


def _table(*ops: Operation) -> dict[str, Operation]:
    table = {op.name: op for op in ops}
    missing, extra = set(OPS) - set(table), set(table) - set(OPS)
    if missing or extra or len(table) != len(ops):
        raise RuntimeError(f"the operation table does not match the protocol's operations: "
                           f"missing {sorted(missing)}, unknown {sorted(extra)}")
    return table


OPERATIONS: dict[str, Operation] = _table(
    Operation("ping", admin.ping, inline=True, while_draining=True),
    Operation("status", admin.status, inline=True, while_draining=True),
    Operation("capabilities", admin.capabilities, inline=True, while_draining=True),
    Operation("metrics", admin.metrics, inline=True, while_draining=True),
    Operation("cancel", admin.cancel, inline=True, while_draining=True),
    Operation("credit", admin.credit, inline=True, while_draining=True),
    Operation("list_models", models.list_models, inline=True, while_draining=True),
    Operation("load_model", models.load_model),
    Operation("unload_model", models.unload_model),
    Operation("tokenize", models.tokenize),
    Operation("detokenize", models.detokenize),
    Operation("list_contexts", contexts.list_contexts, inline=True, while_draining=True),
    Operation("create_context", contexts.create_context),
    Operation("close_context", contexts.close_context, while_draining=True),
    Operation("list_loras", adapters.list_loras, inline=True, while_draining=True),
    Operation("set_lora", adapters.set_lora, now=adapters.set_lora_now),
    Operation("remove_lora", adapters.remove_lora),
    Operation("clear_loras", adapters.clear_loras),
    Operation("set_loras", adapters.set_loras),
    Operation("validate_lora", adapters.validate_lora),
    Operation("generate", generation.generate, inline=True),
    Operation("chat", generation.chat, inline=True),
    Operation("embed", embeddings.embed),
)
