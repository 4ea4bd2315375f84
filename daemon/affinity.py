"""A decode thread's OpenMP team on cores of its own: the thread on one, its workers on the others.

llama.cpp's CPU backend computes a step on an OpenMP team (the calling thread and
``n_threads - 1`` workers) whose every barrier waits for the slowest of them. Left to the
kernel's scheduler, the team's threads sometimes share a core while another thread of the
daemon (a build, a tokenization, the event loop) runs on the other: each barrier then waits for
a time slice. Measured on gemma 3 270M, 2 cores, one stream decoding while another thread made
a 131,072-cell context (2.25 GiB cleared): steps of 24 ms took 220-680 ms at times with the
builder at nice +10 and about 230 ms each at the daemon's priority; with the decode thread on
one core and its worker on the other, p99 31 ms (max 42) and 44 ms (max 48).

So the decode thread runs on one core, chosen in turn per model, and the workers on the others.
A worker inherits the name of the thread that makes it: the decode thread names itself (its
team's :attr:`Team.name`) before its first step, and after each step that grew the team (more
threads than any before) it pins itself and every other thread of that name. (Making the
workers while the decode thread ran on the others, so that they inherit that affinity, put
the two on one core for the whole step: a 5-token prompt took 2.1 s.) Linux only; with one
usable core, or where the kernel refuses, nothing is pinned.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import itertools
import os
import threading
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


def _name(name: bytes) -> None:
    """Name the calling thread (``prctl(PR_SET_NAME)``; nothing where that is not there)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(15, ctypes.c_char_p(name), 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError, TypeError):
        pass


def _comm(tid: str) -> bytes:
    try:
        with open(f"/proc/self/task/{tid}/comm", "rb") as f:
            return f.read().strip()
    except OSError:  # the thread ended meanwhile
        return b""


class Team:
    """The cores of one decode thread's team (see the module). Only that thread calls
    :meth:`run`."""

    def __init__(self, enabled: bool = True) -> None:
        self.cpus = usable() if enabled else []
        turn = next(_turn)
        self.own: int | None = self.cpus[turn % len(self.cpus)] if len(self.cpus) > 1 else None
        """The decode thread's core (None: nothing is pinned)."""
        self.name = f"lorad-dec{turn % 100000}".encode()
        """The decode thread's name, which the OpenMP workers it makes inherit (at most 15
        bytes: the kernel's limit)."""
        self._named = False
        self.size = 1
        """The most threads a step of this team has had (its workers exist)."""

    def run(self, n_threads: int, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``, a step of ``n_threads`` threads, with the team where it belongs."""
        if self.own is None:
            return fn(*args)
        if not self._named:
            self._named = True
            _name(self.name)
        try:
            return fn(*args)
        finally:
            if n_threads > self.size:
                self.size = n_threads
                self._pin()

    def _pin(self) -> None:
        """The decode thread (the caller) on its core, the team's workers on the others."""
        me = threading.get_native_id()
        try:
            os.sched_setaffinity(0, {self.own})
            for tid in os.listdir("/proc/self/task"):
                if int(tid) != me and _comm(tid) == self.name:
                    os.sched_setaffinity(int(tid), set(self.cpus) - {self.own})
        except OSError:  # a mask the kernel refuses (cpusets changed): leave it to the kernel
            self.own = None
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, self.cpus)
