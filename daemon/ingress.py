"""While llama.cpp decodes, new work waits its turn: the event loop's share of a step.

A step of a model's streams runs llama.cpp's threads on the cores (``n_threads`` is the CPUs by
default), and every barrier of the graph waits for the slowest of them: any other thread that
runs meanwhile preempts one and the whole step waits for it. On 2 cores, 25 ms steps took
150-900 ms while the event loop answered a flood of 100,000 cheap messages from one client
(``bench/noisy.py``), and Python work in the loop also delays the decode thread's every return
from llama.cpp (the GIL).

So the doors take in new work (a ZeroMQ message, an HTTP request), and the file workers start
their next piece of slow file work, during a step only while the loop's busy time in that step
(with the file workers' time) is under ``ALLOWANCE_S`` plus ``share`` of the step's time so far;
past it they wait until the step ends or the share has caught up. The waiting messages stay in
ZeroMQ's queues, whose high-water marks then hold back the peer that floods (ZeroMQ takes the
peers' messages in turn, so a quiet client's message is among the next few); HTTP requests wait
in their connections. Between steps, and when nothing decodes, nothing waits.

The loop's busy time is measured by a trio instrument (the time between its waits for I/O).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import trio

ALLOWANCE_S = 0.001
"""The loop's busy time in a step that is always allowed (a few messages a step)."""


class Ingress(trio.abc.Instrument):
    """The gate both doors pass before taking in new work (see the module). Add it to the trio
    run (``trio.lowlevel.add_instrument``) for it to see the loop's busy time."""

    def __init__(self, share: float = 0.1) -> None:
        self.share = share
        self._busy = 0.0  # the loop's busy seconds, up to ``_since``
        self._since: float | None = time.perf_counter()  # busy since then (None: waiting)
        self._decoding = 0  # steps decoding now
        self._start = 0.0  # when the oldest of them started
        self._busy_at_start = 0.0
        self._ended = trio.Event()
        self._charged = 0.0  # worker threads' busy seconds (charge), added to the loop's
        self._charge_lock = threading.Lock()
        self.waits = 0
        """How many times work waited for a step (``status``)."""

    # -- trio.abc.Instrument ----------------------------------------------------------------
    def before_io_wait(self, timeout: float) -> None:
        if self._since is not None:
            self._busy += time.perf_counter() - self._since
            self._since = None

    def after_io_wait(self, timeout: float) -> None:
        self._since = time.perf_counter()

    # -- the gate -------------------------------------------------------------------------------
    def busy(self) -> float:
        """The loop's busy seconds so far (a clock that runs only while it works), with the
        seconds worker threads charged (:meth:`charge`)."""
        since = self._since
        return (self._busy + self._charged
                + (time.perf_counter() - since if since is not None else 0.0))

    def charge(self, seconds: float) -> None:
        """Count ``seconds`` of a worker thread's work (slow file work: its Python competes
        with the decode for the cores and the GIL) as the loop's (any thread)."""
        with self._charge_lock:
            self._charged += seconds

    @contextmanager
    def decoding(self) -> Iterator[None]:
        """Around a step of llama.cpp (nested or overlapping steps count as one)."""
        if not self._decoding:
            self._start = time.perf_counter()
            self._busy_at_start = self.busy()
        self._decoding += 1
        try:
            yield
        finally:
            self._decoding -= 1
            if not self._decoding:
                self._ended.set()
                self._ended = trio.Event()

    def over(self) -> float:
        """0 when new work may come in now; else the seconds after which the loop's share of
        the step in progress will have caught up with its busy time."""
        if not self._decoding:
            return 0.0
        used = self.busy() - self._busy_at_start - ALLOWANCE_S
        if used <= 0:
            return 0.0
        return max(0.0, self._start + used / self.share - time.perf_counter())

    def info(self) -> dict[str, float | int]:
        """``status()["ingress"]``."""
        return {"loop_share": self.share, "waits": self.waits,
                "busy_s": round(self.busy(), 3)}

    async def admit(self) -> None:
        """Return when new work may come in (at once, without a checkpoint, when it may)."""
        while (wait := self.over()) > 0:
            self.waits += 1
            with trio.move_on_after(wait):
                await self._ended.wait()
