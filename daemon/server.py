"""The daemon's lifecycle: wires the transport, the dispatcher and the engine, and runs them.

Start: bind the endpoint, start the engine, handle signals, load the configured models and
contexts, then ``READY=1``. Stop (SIGTERM/SIGINT or :meth:`Daemon.shutdown`): no new work, running
streams end as cancelled, contexts close, queued replies are flushed, and the process exits 0.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import trio

from lorad.protocol import ProtocolError

from . import llama
from .config import DaemonConfig
from .dispatch import Dispatcher
from .engine import Engine
from .errors import ConfigError, DaemonError
from .logs import log
from .metrics import Metrics
from .sdnotify import notify, watchdog_interval
from .services import VERSION, Services
from .sessions import Sessions
from .transport import ZmqTransport

__all__ = ["VERSION", "Daemon", "run_daemon"]


class Daemon:
    """Serve lorad on ``config.endpoint`` until SIGTERM/SIGINT or :meth:`shutdown`."""

    def __init__(self, config: DaemonConfig, *, restore_signals: bool = True) -> None:
        self.config = config
        metrics = Metrics()
        self.engine = Engine(config, metrics)
        self.services = Services(config, self.engine, Sessions(config.limits), metrics)
        self.transport = ZmqTransport(
            config.endpoint, config.limits, heartbeat_ms=config.heartbeat_ms, group=config.group,
            curve_secret_key=config.curve_secret_key,
            curve_authorized_keys=config.curve_authorized_keys, admit=self.engine.ingress.admit)
        self._stop = trio.Event()
        self._previous_handlers: dict[int, Any] = {}
        self._restore = restore_signals
        """Whether the handlers before :meth:`serve` come back when it returns (in a process
        of its own, ``lorad serve``, they do not: a signal after the drain is dropped, where
        Python's default handlers, back too soon, ended the process with -2 or 1)."""
        if config.http_address:  # checked before anything binds
            try:
                from .http.serve import check_exposure
            except ImportError as exc:
                raise ConfigError(f"--http needs the HTTP extra ({exc.name} is missing): "
                                  "pip install 'lorad[http]'", field="http_address") from None
            check_exposure(config.http_address, config.api_keys)

    def shutdown(self) -> None:
        """Begin draining: no new requests, running streams end as cancelled, then exit."""
        self._stop.set()

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        llama.init_backend()
        if self.config.metrics_address:
            from .prometheus import start_exporter

            host, port = start_exporter(self.config.metrics_address,
                                        self.services.metrics.snapshot)
            log.info("metrics_exporter", address=f"http://{host}:{port}/metrics")
        self.transport.bind()
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self._watch_signals)  # handled before READY=1 is sent
                await nursery.start(self.engine.run)
                dispatcher = Dispatcher(self.services, self.transport.send, nursery)
                await nursery.start(self.transport.run, dispatcher)
                interval = watchdog_interval()
                if interval is not None:
                    nursery.start_soon(self._watchdog, interval)
                notify("STATUS=loading models")
                await self.engine.preload()
                http = None
                if self.config.http_address:
                    http = self.services.http_url = await nursery.start(self._serve_http)
                log.info("serving", endpoint=self.config.endpoint, pid=os.getpid(),
                         models=[m.id for m in self.engine.models], http=http,
                         contexts=sorted(self.engine.contexts))
                notify("READY=1", f"STATUS=serving on {self.config.endpoint}"
                       + (f" and {http}" if http else ""))
                task_status.started(self.config.endpoint)
                await self._stop.wait()
                await self._drain()
                nursery.cancel_scope.cancel()
        finally:
            self.transport.close()
            log.info("stopped")
            self._restore_signals()

    async def _drain(self) -> None:
        self.services.draining = True
        notify("STOPPING=1", "STATUS=draining")
        log.info("draining", requests=self.services.sessions.running(),
                 contexts=len(self.engine.contexts))
        await self.engine.drain()
        with trio.move_on_after(5):
            await self.transport.flushed()

    async def _serve_http(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
                          ) -> None:
        from .http.door import Door
        from .http.serve import serve_http

        c = self.config
        self.http_door = Door(self.services, c.http)
        await serve_http(self.http_door, c.http_address, api_keys=c.api_keys,
                         cors_origins=c.cors_origins, metrics=c.http.metrics,
                         task_status=task_status)

    async def _watchdog(self, interval: float) -> None:
        """``WATCHDOG=1`` from the trio loop itself: a wedged loop stops the pings and systemd
        restarts the daemon (``WatchdogSec=`` in the unit)."""
        while True:
            notify("WATCHDOG=1")
            await trio.sleep(interval)

    async def _watch_signals(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                             ) -> None:
        """SIGTERM and SIGINT begin the drain, from READY=1 until the daemon has stopped.

        Not ``trio.open_signal_receiver``: leaving its block with a signal not yet read (this
        task is cancelled when the drain ends) re-raises that signal with Python's default
        handler, which ends the process with -15 instead of 0. The handler here stays until
        :meth:`serve` returns, and a signal it cannot hand to trio any more is dropped."""
        token = trio.lowlevel.current_trio_token()

        def on_signal(signum: int, _frame: object) -> None:
            try:
                token.run_sync_soon(self._on_signal, signum)
            except trio.RunFinishedError:
                pass  # trio has ended: the daemon is stopping anyway

        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous_handlers[signum] = signal.signal(signum, on_signal)
        task_status.started()

    def _on_signal(self, signum: int) -> None:
        log.info("signal", signal=signal.Signals(signum).name)
        self.shutdown()

    def _restore_signals(self) -> None:
        if not self._restore:
            return
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()


async def run_daemon(config: DaemonConfig,
                     task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED, *,
                     restore_signals: bool = True) -> None:
    try:
        await Daemon(config, restore_signals=restore_signals).serve(task_status=task_status)
    except BaseException as exc:  # one failure at start: itself, not a task group of one
        leaf = exc
        while isinstance(getattr(leaf, "exceptions", None), tuple) and len(leaf.exceptions) == 1:
            leaf = leaf.exceptions[0]
        if leaf is not exc and isinstance(leaf, (DaemonError, ProtocolError)):
            raise leaf from None
        raise
