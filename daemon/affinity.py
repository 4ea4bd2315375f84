"""A decode thread's OpenMP team on cores of its own: the thread on one, its workers on the others.

llama.cpp's CPU backend computes a step on an OpenMP team (the calling thread and
``n_threads - 1`` workers) whose every barrier waits for the slowest of them. Left to the
kernel's scheduler, the team's threads sometimes share a core while another thread of the
daemon (a build, a tokenization, the event loop) runs on the other: each barrier then waits for
a time slice. Measured on gemma 3 270M, 2 cores, one stream decoding while another thread made
a 131,072-cell context (2.25 GiB cleared): steps of 24 ms took 220-680 ms at times with the
builder at nice +10 and about 230 ms each at the daemon's priority; with the decode thread on
one core and its worker on the other, p99 31 ms (max 42) and 44 ms (max 48).

So the decode thread runs on one core, chosen in turn per model, and the workers on the others:
a worker inherits the affinity of the thread that makes it, so while the team may grow (a step
with more threads than any before) the decode thread runs on the others, and on its own core
after. Linux only; with one usable core, or where the kernel refuses, nothing is pinned.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_turn = itertools.count()
"""Which core the next team's decode thread takes (teams of several models spread out)."""


def usable() -> list[int]:
    """The CPUs this process may run on (its affinity mask), sorted; [] where unknown."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return []


class Team:
    """The cores of one decode thread's team (see the module). Only that thread calls
    :meth:`run`."""

    def __init__(self, enabled: bool = True) -> None:
        self.cpus = usable() if enabled else []
        self.own: int | None = (self.cpus[next(_turn) % len(self.cpus)]
                                if len(self.cpus) > 1 else None)
        """The decode thread's core (None: nothing is pinned)."""
        self.size = 1
        """The most threads a step of this team has had (its workers exist)."""

    def run(self, n_threads: int, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``, a step of ``n_threads`` threads, with the team where it belongs."""
        if self.own is None:
            return fn(*args)
        grows = n_threads > self.size
        if grows:  # the workers it makes go to the other cores
            self._pin(set(self.cpus) - {self.own})
        try:
            return fn(*args)
        finally:
            if grows:
                self.size = n_threads
                self._pin({self.own})

    def _pin(self, cpus: set[int]) -> None:
        try:
            os.sched_setaffinity(0, cpus)  # the calling thread (Linux)
        except OSError:  # a mask the kernel refuses (cpusets changed): leave it to the kernel
            self.own = None
            try:
                os.sched_setaffinity(0, self.cpus)
            except OSError:
                pass

    def info(self) -> dict[str, Any]:
        """What ``status`` shows of the team."""
        return {"decode_cpu": self.own, "threads": self.size}
