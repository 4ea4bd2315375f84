"""Counters and latency summaries, per model and per context, for ``metrics`` and Prometheus.

Everything here is plain Python updated from the trio thread; the Prometheus collector reads a
snapshot (``Metrics.snapshot``) from its own thread, which only copies dictionaries.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

LATENCY_WINDOW = 1000
"""Latency summaries are over the last this many requests."""


def _quantiles(values: deque[float]) -> dict[str, float | None]:
    if not values:
        return {"count": 0, "p50": None, "p90": None, "p99": None, "max": None}
    data = sorted(values)

    def q(p: float) -> float:
        return round(data[min(len(data) - 1, int(p * len(data)))], 3)

    return {"count": len(data), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99),
            "max": round(data[-1], 3)}


@dataclass
class Stats:
    """What one model or one context has done."""

    requests: int = 0
    streams: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    cancelled: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    adapter_loads: int = 0
    stack_changes: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    ttft_ms: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    total_ms: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))

    def to_wire(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "streams": self.streams,
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "cancelled": self.cancelled,
            "errors": dict(self.errors),
            "adapter_loads": self.adapter_loads,
            "stack_changes": self.stack_changes,
            "drafted_tokens": self.drafted_tokens,
            "accepted_tokens": self.accepted_tokens,
            "acceptance_rate": (round(self.accepted_tokens / self.drafted_tokens, 4)
                                if self.drafted_tokens else None),
            "time_to_first_token_ms": _quantiles(self.ttft_ms),
            "request_ms": _quantiles(self.total_ms),
        }


class Metrics:
    """The daemon's counters: overall, per model id and per (live) context id."""

    def __init__(self) -> None:
        self.started = time.time()
        self.total = Stats()
        self.models: dict[str, Stats] = {}
        self.contexts: dict[str, Stats] = {}
        self.transports: dict[str, Stats] = {}
        """Per door: ``zmq`` (the protocol) and ``http`` (the OpenAI-compatible API)."""

    def _targets(self, model: str | None, context: str | None) -> list[Stats]:
        out = [self.total]
        for key, table in ((model, self.models), (context, self.contexts)):
            if key is not None:
                stats = table.get(key)
                if stats is None:
                    stats = table[key] = Stats()
                out.append(stats)
        return out

    def request(self, *, model: str | None, context: str | None, outcome: str,
                end_metrics: dict[str, Any] | None, elapsed_ms: float,
                transport: str = "zmq") -> None:
        """Count one finished request (``outcome``: ok, a finish reason or an error code)."""
        by_door = self.transports.get(transport)
        if by_door is None:
            by_door = self.transports[transport] = Stats()
        for s in [*self._targets(model, context), by_door]:
            s.requests += 1
            s.total_ms.append(elapsed_ms)
            if outcome == "cancelled":
                s.cancelled += 1
            elif outcome not in ("ok", "stop", "length", "tool_calls"):
                s.errors[outcome] += 1
            if end_metrics is not None:
                s.streams += 1
                s.prompt_tokens += int(end_metrics.get("prompt_tokens") or 0)
                s.generated_tokens += int(end_metrics.get("generated_tokens") or 0)
                s.drafted_tokens += int(end_metrics.get("drafted_tokens") or 0)
                s.accepted_tokens += int(end_metrics.get("accepted_tokens") or 0)
                ttft = end_metrics.get("time_to_first_token_ms")
                if ttft is not None and end_metrics.get("generated_tokens"):
                    s.ttft_ms.append(float(ttft))

    def adapter_loaded(self, model: str) -> None:
        for s in self._targets(model, None):
            s.adapter_loads += 1

    def stack_changed(self, model: str, context: str) -> None:
        for s in self._targets(model, context):
            s.stack_changes += 1

    def forget_context(self, context: str) -> None:
        self.contexts.pop(context, None)

    def forget_model(self, model: str) -> None:
        self.models.pop(model, None)

    def snapshot(self, contexts: set[str] | None = None) -> dict[str, Any]:
        """The wire form; ``contexts`` limits the per-context part to those ids."""
        return {
            "uptime_s": round(time.time() - self.started, 3),
            "total": self.total.to_wire(),
            "models": {k: v.to_wire() for k, v in list(self.models.items())},
            "contexts": {k: v.to_wire() for k, v in list(self.contexts.items())
                         if contexts is None or k in contexts},
            "transports": {k: v.to_wire() for k, v in list(self.transports.items())},
        }
