"""Whether llama.cpp may repack weights for this CPU ("extra buffer types"), decided at start.

Repacking lays quantized weights out for the CPU's SIMD kernels: about 9 % more tokens/s on the
AMD EPYC (AVX2) machines this project runs on. On Intel Xeons with AMX, a native llama.cpp
build crashed in ``llama_decode`` on Q4_K models through the AMX repack path. So ``auto`` repacks
unless the CPU has AMX; ``on`` and ``off`` override the choice (``--repack``, ``repack`` in
the config file). ``capabilities`` reports the choice and why.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class RepackChoice:
    mode: str
    enabled: bool
    reason: str

    def to_wire(self) -> dict[str, Any]:
        return {"mode": self.mode, "enabled": self.enabled, "reason": self.reason}


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags (empty where ``/proc/cpuinfo`` cannot be read)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def decide(mode: str = "auto", flags: set[str] | None = None) -> RepackChoice:
    """The repack choice for ``mode`` on a CPU with ``flags`` (this CPU's by default)."""
    if mode not in MODES:
        raise ValueError(f"repack must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "on":
        return RepackChoice(mode, True, "forced on (repack = on)")
    if mode == "off":
        return RepackChoice(mode, False, "forced off (repack = off)")
    amx = sorted(f for f in (cpu_flags() if flags is None else flags) if f.startswith("amx"))
    if amx:
        return RepackChoice(mode, False, f"this CPU has AMX ({', '.join(amx)}): llama.cpp's AMX "
                            "repack path crashed on Q4_K models on such CPUs, so weights are "
                            "not repacked (force with repack = on)")
    return RepackChoice(mode, True, "no AMX on this CPU: weights are repacked for its SIMD "
                        "kernels")
