"""The memory budget: what the daemon commits to model weights and KV caches, and admission.

Every model load, slab (a batched llama context: the KV cache of its sequences) and other
llama context (embeddings, draft models) reserves its size here before llama.cpp allocates
it; a reservation that would take the total past the budget is refused with ``too_large`` and
the figures (``needed``, ``budget``, ``in_use``), so nothing is allocated for it. What is held
only to be reused (a slab kept idle for the next context of its kind) is freed first when that
makes the room. Sizes are computed from the model's shape, not measured:

* a model: its file's size (the weights llama.cpp maps or reads);
* a KV cache: ``n_cells * n_layer * (n_embd_k + n_embd_v) * element size``, with ``n_embd_k``
  = key length x KV heads (likewise for values) and 2 bytes an element for ``f16``, 4 for
  ``f32``, 34/32 for ``q8_0``. Every layer is counted at full length: models with
  sliding-window layers (gemma 3) allocate less, so the figure is an upper bound.

The default budget is 80 % of the machine's memory (its cgroup's limit where lower).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from lorad.protocol import ErrorCode, ProtocolError

from .workers import BUILD

T = TypeVar("T")

SHARE = 0.8
"""The default budget's share of the machine's memory."""
KV_ELEMENT_BYTES = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32}


def machine_memory() -> int:
    """Physical memory, or the cgroup's memory limit where that is lower (bytes)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max",
                       "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


@dataclass(frozen=True)
class KvShape:
    """What one KV cell of a model costs, per element type: layers and K/V widths."""

    n_layer: int
    n_embd_k: int
    n_embd_v: int

    @classmethod
    def of(cls, model: Any) -> KvShape:
        """A llama model's (anything with ``kv_widths()``)."""
        return cls(*model.kv_widths())

    def bytes(self, cells: int, kv_type: str) -> int:
        """The KV cache of ``cells`` cells (all sequences together)."""
        per_cell = self.n_layer * (self.n_embd_k + self.n_embd_v)
        return int(cells * per_cell * KV_ELEMENT_BYTES[kv_type])


@dataclass(eq=False)
class Reservation:
    """Bytes held in a :class:`MemoryBudget` until :meth:`release` (idempotent)."""

    budget: MemoryBudget
    what: str
    nbytes: int
    id: int
    reclaim: Callable[[], None] | None = None
    """Set while what it holds is idle (a slab kept for the next context of its kind): frees
    it and releases the reservation, when the budget needs the room."""

    def release(self) -> None:
        self.budget._held.pop(self.id, None)

    def resize(self, nbytes: int, what: str | None = None) -> None:
        """Now holding ``nbytes`` for ``what`` (a slab that grew; checked by the caller)."""
        if self.id in self.budget._held:
            self.nbytes = nbytes
            self.what = what or self.what


class MemoryBudget:
    """Reservations against one budget; every method runs in the trio thread."""

    def __init__(self, limit: int = 0) -> None:
        self.machine = machine_memory()
        self.derived = limit <= 0
        self.limit = int(self.machine * SHARE) if self.derived else limit
        self._held: dict[int, Reservation] = {}
        self._ids = itertools.count(1)
        self.refused = 0
        self.reclaimed = 0
        """Idle reservations freed to make room."""

    @property
    def in_use(self) -> int:
        return sum(r.nbytes for r in self._held.values())

    def check(self, what: str, nbytes: int, *, replacing: int = 0, **details: Any) -> None:
        """``too_large`` if ``nbytes`` more (less ``replacing``, freed once it is made) would
        not fit; ``details`` go into the error."""
        in_use = self.in_use
        if in_use + nbytes > self.limit:
            in_use = self._reclaim(in_use + nbytes - self.limit)
        if in_use + nbytes > self.limit:
            self.refused += 1
            raise ProtocolError(
                ErrorCode.TOO_LARGE,
                f"{what} needs {_mib(nbytes)} and the daemon already holds {_mib(in_use)} of "
                f"its memory budget of {_mib(self.limit)} (limits.memory_budget_bytes)"
                + (f"; {_mib(replacing)} of it would be freed after" if replacing else ""),
                limit="memory_budget_bytes", needed=nbytes, budget=self.limit, in_use=in_use,
                **details)

    def _reclaim(self, short: int) -> int:
        """Free idle reservations, the oldest first, until ``short`` bytes are back (none if
        all of them would not be enough); what is in use after."""
        idle = sorted((r for r in self._held.values() if r.reclaim is not None),
                      key=lambda r: r.id)
        if sum(r.nbytes for r in idle) >= short:
            for r in idle:
                if short <= 0:
                    break
                short -= r.nbytes
                assert r.reclaim is not None
                r.reclaim()
                r.release()
                self.reclaimed += 1
        return self.in_use

    def reserve(self, what: str, nbytes: int, **details: Any) -> Reservation:
        """Hold ``nbytes`` for ``what``, or raise ``too_large`` (see :meth:`check`)."""
        self.check(what, nbytes, **details)
        reservation = Reservation(self, what, nbytes, next(self._ids))
        self._held[reservation.id] = reservation
        return reservation

    async def make(self, what: str, nbytes: int, build: Callable[[], T], **details: Any
                   ) -> tuple[T, Reservation]:
        """``build()`` on the build threads once ``nbytes`` are reserved for ``what`` (the
        reservation is released if it fails): what it made and its reservation."""
        reservation = self.reserve(what, nbytes, **details)
        try:
            return await BUILD.run(build), reservation
        except BaseException:
            reservation.release()
            raise

    def info(self) -> dict[str, Any]:
        return {"budget": self.limit, "in_use": self.in_use, "machine": self.machine,
                "source": (f"derived: {SHARE:.0%} of the machine's memory" if self.derived
                           else "limits.memory_budget_bytes"),
                "refused": self.refused, "reclaimed": self.reclaimed,
                "held": [{"what": r.what, "bytes": r.nbytes,
                          **({"idle": True} if r.reclaim is not None else {})}
                         for r in self._held.values()]}


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:,.1f} MiB"
