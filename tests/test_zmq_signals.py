"""ZeroMQ calls while signals arrive: what pyzmq does not retry on ``EINTR``, lorad does.

pyzmq retries sends, receives, polls, socket options, binds and connects when a signal
interrupts them, but not ``zmq_socket_monitor``: a SIGTERM arriving while the daemon opened its
socket's monitor ended it with exit 1 (``tests/test_lifecycle.py``'s signals test, once in CI).
Another process sends this one signals as fast as it can while lorad opens monitors.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest
import zmq

from lorad.client.transport import MONITOR_EVENTS, open_monitor
from lorad.daemon.pump import monitor_socket

# Ends with its parent (signalling a parent that died, a zombie, would succeed forever).
STORM = ("import os, signal\nparent = os.getppid()\n"
         "while os.getppid() == parent: os.kill(parent, signal.SIGUSR1)")


@pytest.fixture
def signal_storm() -> Iterator[None]:
    previous = signal.signal(signal.SIGUSR1, lambda *_: None)
    storm = None
    try:
        storm = subprocess.Popen([sys.executable, "-c", STORM])
        yield
    finally:
        if storm is not None:
            storm.kill()
            storm.wait()
        signal.signal(signal.SIGUSR1, previous)


@pytest.mark.parametrize("opener", [
    lambda sock: monitor_socket(sock, MONITOR_EVENTS),
    open_monitor,
], ids=["daemon", "client"])
def test_a_monitor_opens_however_many_signals_arrive(
        signal_storm: None, opener: Callable[[zmq.Socket], zmq.Socket],
        monkeypatch: pytest.MonkeyPatch) -> None:
    interrupted = 0
    monitor = zmq.Socket.monitor

    def counted(self: zmq.Socket, *args: object) -> None:
        """pyzmq's own call (it still runs), counting the times a signal interrupted it."""
        nonlocal interrupted
        try:
            return monitor(self, *args)
        except zmq.error.InterruptedSystemCall:
            interrupted += 1
            raise

    monkeypatch.setattr(zmq.Socket, "monitor", counted)
    opened = 0
    deadline = time.monotonic() + 30
    while interrupted < 5 and time.monotonic() < deadline:
        # A context of its own for 100 sockets: its end waits for their file descriptors to be
        # given back (a closed socket's are, later, by libzmq's reaper thread).
        with zmq.Context() as ctx:
            for _ in range(100):
                sock = ctx.socket(zmq.DEALER)
                try:
                    opener(sock).close(linger=0)
                    opened += 1
                    sock.disable_monitor()
                finally:
                    sock.close(linger=0)
    if interrupted < 5:
        pytest.skip(f"signals interrupted zmq_socket_monitor {interrupted} times in 30 s "
                    f"({opened} monitors opened): does pyzmq retry it now?")
    # Every interrupted call was tried again: each socket got its monitor.
    assert opened >= 5
