"""The systemd notify protocol in a few lines: one datagram to ``$NOTIFY_SOCKET``.

Does nothing when ``$NOTIFY_SOCKET`` is unset (not started by systemd with ``Type=notify``).
"""

from __future__ import annotations

import os
import socket


def notify(*lines: str) -> bool:
    """Send ``READY=1``, ``STATUS=...``, ``STOPPING=1``...; True if a socket was there."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(lines).encode())
    except OSError:
        return False  # the manager went away; nothing to tell
    return True


def watchdog_interval() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings: half of systemd's ``WatchdogSec``
    (``$WATCHDOG_USEC``), or None when no watchdog is asked for (or it is for another pid)."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None
