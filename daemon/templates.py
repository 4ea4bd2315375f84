"""Chat templates rendered where they cannot hurt the daemon: a small pool of worker processes.

Jinja chat templates come from clients and from GGUF files of any origin, so they are untrusted
code. Each render runs in a worker process (``template_worker.py``) under Jinja's immutable
sandbox and an address-space limit; the daemon waits for it without blocking its event loop, and
kills a worker that takes longer than ``limits.template_timeout_ms``. A killed or broken worker is
replaced on the next render; at most ``limits.template_workers`` renders run at once.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgpack
import trio

from lorad.protocol import ErrorCode, Limits, ProtocolError

from .logs import log

WORKER = Path(__file__).with_name("template_worker.py")
_BROKEN = object()


class _Worker:
    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.buffer = b""

    async def call(self, request: dict[str, Any]) -> dict[str, Any]:
        body = msgpack.packb(request)
        assert self.process.stdin is not None and self.process.stdout is not None
        await self.process.stdin.send_all(struct.pack(">I", len(body)) + body)
        size = struct.unpack(">I", await self._read(4))[0]
        return msgpack.unpackb(await self._read(size))

    async def _read(self, n: int) -> bytes:
        assert self.process.stdout is not None
        while len(self.buffer) < n:
            chunk = await self.process.stdout.receive_some(max(65536, n - len(self.buffer)))
            if not chunk:
                raise EOFError("the template worker ended")
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

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
        process = await trio.lowlevel.open_process(
            [sys.executable, "-I", str(WORKER), str(self.limits.template_memory_bytes),
             str(self.limits.max_template_output), str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )
        return _Worker(process)

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
                    f"chat template: rendering took longer than {self.limits.template_timeout_ms}"
                    " ms (limits.template_timeout_ms) or ended its worker",
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
        None when it took longer than ``timeout`` (the worker is killed), or ``_BROKEN`` when
        the worker failed (it had ended, or its reply was not one)."""
        try:
            worker = self._idle.pop() if reuse and self._idle else await self._spawn()
        except OSError as exc:
            raise ProtocolError(ErrorCode.INTERNAL, "chat template: could not start a "
                                f"worker process: {exc}") from None
        reply: dict[str, Any] | None = None
        try:
            with trio.move_on_after(timeout):
                reply = await worker.call(request)
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
