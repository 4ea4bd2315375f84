"""Administration: ping, status, capabilities, metrics, and the peer's own cancel and credit."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from lorad.protocol import OPS, PROTOCOL_VERSION, STREAMING_OPS

from .. import gpu, litert, llama
from ..litert_actor import features as litert_features
from ..requests import RequestHandle
from ..services import VERSION, Services


async def ping(s: Services, h: RequestHandle) -> dict[str, Any]:
    return {"pong": True, "version": VERSION, "protocol": PROTOCOL_VERSION, "time": time.time()}


async def status(s: Services, h: RequestHandle) -> dict[str, Any]:
    engine = s.engine
    contexts = [a.info() for a in engine.visible_contexts(h.peer)]
    return {
        "version": VERSION,
        "pid": os.getpid(),
        "endpoint": s.config.endpoint,
        "uptime_s": round(time.time() - s.started_at, 3),
        "draining": s.draining,
        "models": [m.info() for m in engine.models],
        "contexts": contexts,
        "adapters": [a.to_wire() for a in engine.adapters],
        "batching": engine.batching_info(),
        "litert_sessions": engine.litert_info(),
        "memory": engine.memory.info(),
        "file_workers": engine.files.info(),
        "adapter_inspections": engine.adapters.inspections(),
        "text_workers": engine.text.info(),
        "ingress": engine.ingress.info(),
        "contexts_total": len(engine.contexts),
        "queued_requests": sum(c["queued"] for c in contexts),
        "running_requests": sum(1 for c in contexts if c["running"] is not None),
        "clients": len(s.sessions),
        "counters": {**s.counters, "peers_lost": s.sessions.lost},
        "http": _door_load(s),
    }


def _door_load(s: Services) -> dict[str, int] | None:
    """The HTTP door's contexts (private to it, so not in ``contexts``) and their work."""
    if s.http_url is None:
        return None
    door = [a for a in s.engine.contexts.values() if a.managed]
    return {"contexts": len(door), "queued_requests": sum(len(a.queued) for a in door),
            "running_requests": sum(1 for a in door if a.current is not None)}


def _gpu(supported: bool) -> dict[str, Any]:
    """What layers can be offloaded to, and where models go by default."""
    return {"offload": supported, "default_n_gpu_layers": gpu.default_layers(supported),
            "devices": [d.to_wire() for d in gpu.devices()]}


FEATURES = {
    "streaming": True, "cancel": True, "logprobs": True, "grammar": True, "chat_template": True,
    "prefix_cache": True, "lora": True, "lora_stack": True, "lora_per_request": True,
    "alora": True, "speculative": True, "batching": True,
}
"""What llama.cpp models can do (a LiteRT-LM model's: :func:`.litert_actor.features`)."""


async def capabilities(s: Services, h: RequestHandle) -> dict[str, Any]:
    info = llama.system_info()
    engine = s.engine
    return {
        "version": VERSION,
        "protocol_version": PROTOCOL_VERSION,
        "llama_cpp": info,
        "gpu_offload": info["gpu_offload"],
        "gpu": _gpu(info["gpu_offload"]),
        "operations": sorted(OPS),
        "streaming_operations": sorted(STREAMING_OPS),
        "features": {"credit_flow_control": True, **FEATURES},
        "batching": dataclasses.asdict(s.config.batching),
        "http": ({"url": s.http_url, "api_keys": bool(s.config.api_keys)}
                 if s.http_url else None),
        "repack": engine.repack.to_wire(),
        "busy_policy": "queue",
        "heartbeat_ms": s.config.heartbeat_ms,
        "limits": s.limits.__dict__,
        "memory": {"budget": engine.memory.limit, "in_use": engine.memory.in_use,
                   "machine": engine.memory.machine, "source": engine.memory.info()["source"]},
        "max_n_threads": engine.max_threads,
        "allowed_dirs": [str(d) for d in engine.allowed.dirs],
        "adapter_dirs": [str(d) for d in engine.adapter_dirs],
        "backends": {"llama.cpp": {"available": True, "version": info["llama_cpp_python"]},
                     "litert_lm": {"available": litert.version() is not None,
                                   "version": litert.version(), "suffix": litert.SUFFIX}},
        "models": {m.id: (litert_features(m) if m.backend == litert.BACKEND
                          else {"backend": m.backend, **FEATURES}) for m in engine.models},
        "speculative": {
            "modes": ["prompt_lookup", "draft_model", "mtp"],
            "sampling": True,
            "per_model": {m.id: engine.speculative_modes(m) for m in engine.models},
        },
    }


async def metrics(s: Services, h: RequestHandle) -> dict[str, Any]:
    return s.metrics.snapshot({a.id for a in s.engine.visible_contexts(h.peer)})


async def cancel(s: Services, h: RequestHandle) -> dict[str, Any]:
    return s.sessions.cancel(h.peer, h.args.request, by=h)


async def credit(s: Services, h: RequestHandle) -> dict[str, Any]:
    return s.sessions.credit(h.peer, h.args.request, h.args.n)
