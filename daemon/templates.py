"""Chat templates rendered where they cannot hurt the daemon: a small pool of worker processes.

Jinja chat templates come from clients and from GGUF files of any origin, so they are untrusted
code. Each render runs in a worker process (``template_worker.py``) under Jinja's immutable
sandbox and an address-space limit, at nice 19; the daemon waits for it without blocking its
event loop, and kills a worker whose render has used ``limits.template_timeout_ms`` of CPU time
(its own, read from ``/proc``: a worker at nice 19 beside busy decode threads gets a few percent
of a core, so the wall time of a render says little about what it costs), or has waited
``WAIT_FACTOR`` times that for the CPU. A worker's start (its imports) is not a render's time.
A killed or broken worker is replaced on the next render; at most ``limits.template_workers``
renders run at once.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import trio

from lorad.protocol import ErrorCode, Limits, ProtocolError

from .logs import log

WORKER = Path(__file__).with_name("template_worker.py")
_BROKEN = object()
START_S = 30.0
"""How long a new worker may take to start (Python and jinja2's imports, on a busy machine)."""
WAIT_FACTOR = 10
"""A render is refused too once it has waited this many times ``template_timeout_ms`` (wall
time) without using that much CPU: the machine gave it too little of its cores (a runaway
template on a busy machine holds its worker that long)."""
_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float | None:
    """The CPU time process ``pid`` has used (user + system; None once it cannot be read)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
        return (int(fields[11]) + int(fields[12])) / _TICKS
    except (OSError, IndexError, ValueError):
        return None


class _Worker:
    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.buffer = b""

    async def send(self, request: dict[str, Any]) -> None:
        body = msgpack.packb(request)
        assert self.process.stdin is not None
        await self.process.stdin.send_all(struct.pack(">I", len(body)) + body)

    async def receive(self) -> dict[str, Any]:
        """The next reply (a cancelled wait loses nothing: what was read stays buffered)."""
        await self._fill(4)
        size = struct.unpack(">I", self.buffer[:4])[0]
        await self._fill(4 + size)
        data, self.buffer = self.buffer[4:4 + size], self.buffer[4 + size:]
        return msgpack.unpackb(data)

    def spent(self) -> Callable[[], float]:
        """From now on, what the worker spends: its CPU time (its wall time where ``/proc``
        cannot be read)."""
        cpu, wall = _cpu_seconds(self.process.pid), time.monotonic()

        def since() -> float:
            now = _cpu_seconds(self.process.pid) if cpu is not None else None
            return now - cpu if now is not None and cpu is not None else time.monotonic() - wall

        return since

    async def _fill(self, n: int) -> None:
        assert self.process.stdout is not None
        while len(self.buffer) < n:
            chunk = await self.process.stdout.receive_some(max(65536, n - len(self.buffer)))
            if not chunk:
                raise EOFError("the template worker ended")
            self.buffer += chunk

    async def kill(self) -> None:
        with trio.CancelScope(shield=True):
            self.process.kill()
            await self.process.wait()
            for stream in (self.process.stdin, self.process.stdout):
                if stream is not None:
                    await stream.aclose()


class TemplateRenderer:
    """Renders Jinja chat templates in worker processes, bounded in time, memory and output."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._idle: list[_Worker] = []
        self._slots = trio.Semaphore(limits.template_workers)

    async def _spawn(self) -> _Worker:
        """A new worker, once it has said it is ready (within ``START_S``; else ``OSError``)."""
        process = await trio.lowlevel.open_process(
            [sys.executable, "-I", str(WORKER), str(self.limits.template_memory_bytes),
             str(self.limits.max_template_output), str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )
        worker = _Worker(process)
        try:
            with trio.fail_after(START_S):
                ready = await worker.receive()
            if ready != {"ready": True}:
                raise OSError(f"the template worker said {ready!r} instead of being ready")
        except (trio.TooSlowError, EOFError, struct.error, ValueError, msgpack.UnpackException,
                trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            await worker.kill()
            raise OSError(f"the template worker did not start: {type(exc).__name__}: {exc}"
                          ) from None
        except BaseException:
            await worker.kill()
            raise
        return worker

    async def warm_up(self) -> None:
        """Start one worker ahead of the first chat request (a failure is logged: the first
        render tries again, and only that request fails if it cannot)."""
        async with self._slots:
            if not self._idle:
                try:
                    self._idle.append(await self._spawn())
                except OSError as exc:
                    log.warning("template_worker_not_started", error=str(exc))

    async def render(self, source: str, **variables: Any) -> str:
        """Render ``source`` with ``variables`` (messages, add_generation_prompt, bos_token,
        eos_token); ``bad_request`` when the template fails, raises or exceeds a limit."""
        timeout = self.limits.template_timeout_ms / 1000
        async with self._slots:
            reused = bool(self._idle)
            reply = await self._call({"source": source, **variables}, timeout, reuse=True)
            if reply is _BROKEN and reused:  # an idle worker had ended: once more, on a new one
                reply = await self._call({"source": source, **variables}, timeout, reuse=False)
            if not isinstance(reply, dict):
                raise ProtocolError(
                    ErrorCode.BAD_REQUEST,
                    f"chat template: rendering took more than {self.limits.template_timeout_ms}"
                    " ms of CPU time (limits.template_timeout_ms), or waited "
                    f"{WAIT_FACTOR} times that for the CPU, or ended its worker",
                    field="template", limit="template_timeout_ms",
                    value=self.limits.template_timeout_ms,
                )
        if "text" in reply:
            return reply["text"]
        kind, message = reply["error"], reply["message"]
        if kind == "raised":
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"chat template: {message}",
                                field="messages")
        if kind == "output":
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"chat template: {message} "
                                "(limits.max_template_output)", field="template",
                                limit="max_template_output",
                                value=self.limits.max_template_output)
        if kind == "memory":
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"chat template: {message} "
                                "(limits.template_memory_bytes)", field="template",
                                limit="template_memory_bytes",
                                value=self.limits.template_memory_bytes)
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"chat template failed: {message}",
                            field="template")

    async def _call(self, request: dict[str, Any], timeout: float, *, reuse: bool
                    ) -> dict[str, Any] | object | None:
        """One render on a worker (an idle one when ``reuse``, else a new one): its reply,
        None when it used more than ``timeout`` of CPU time or waited ``WAIT_FACTOR`` times
        that (the worker is killed), or ``_BROKEN`` when the worker failed (it had ended, or
        its reply was not one)."""
        try:
            worker = self._idle.pop() if reuse and self._idle else await self._spawn()
        except OSError as exc:
            raise ProtocolError(ErrorCode.INTERNAL, "chat template: could not start a "
                                f"worker process: {exc}") from None
        reply: dict[str, Any] | None = None
        try:
            spent, until = worker.spent(), trio.current_time() + WAIT_FACTOR * timeout
            await worker.send(request)
            while reply is None:
                now, left = trio.current_time(), timeout - spent()
                if left <= 0 or now >= until:
                    break
                # a render uses no more CPU time than the time that passes: it is not over its
                # budget before ``left`` has passed
                with trio.move_on_after(min(max(left, 0.01), until - now)):
                    reply = await worker.receive()
        except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError,
                struct.error, ValueError, msgpack.UnpackException) as exc:
            log.warning("template_worker_failed", error=f"{type(exc).__name__}: {exc}")
            await worker.kill()
            return _BROKEN
        except BaseException:
            await worker.kill()  # cancelled mid-render: its reply would be out of step
            raise
        if reply is None:
            await worker.kill()
            return None
        self._idle.append(worker)
        return reply

    async def aclose(self) -> None:
        while self._idle:
            await self._idle.pop().kill()
