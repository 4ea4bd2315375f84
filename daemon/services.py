"""What an operation handler may use: the engine, the sessions and the daemon's own state."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from lorad.protocol import Limits

from .config import DaemonConfig
from .engine import Engine
from .metrics import Metrics
from .requests import RequestHandle
from .sessions import Sessions

VERSION = "0.1.0"


@dataclass
class Services:
    """Handed to every handler with the request (see :mod:`lorad.daemon.operations`)."""

    config: DaemonConfig
    engine: Engine
    sessions: Sessions
    metrics: Metrics
    started_at: float = field(default_factory=time.time)
    draining: bool = False
    http_url: str | None = None
    """The OpenAI-compatible door's URL once it serves (None: off)."""
    counters: dict[str, int] = field(
        default_factory=lambda: {"requests": 0, "errors": 0, "peers_lost": 0})

    @property
    def limits(self) -> Limits:
        return self.config.limits

    def record(self, handle: RequestHandle) -> None:
        """Count a finished request (either door: ``handle.transport``)."""
        if handle.outcome not in ("ok", "stop", "length", "tool_calls", "cancelled"):
            self.counters["errors"] += 1
        actor = (self.engine.contexts.get(handle.context) if isinstance(handle.context, str)
                 else None)
        self.metrics.request(model=actor.model.id if actor else None,
                             context=actor.id if actor else None,
                             outcome=handle.outcome or "ok", end_metrics=handle.end_metrics,
                             elapsed_ms=handle.elapsed_ms, transport=handle.transport)
