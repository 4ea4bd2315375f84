"""Where a daemon listens by default: one rule for the daemon and its clients."""

from __future__ import annotations

import os
from pathlib import Path


def runtime_dir() -> Path:
    """``$XDG_RUNTIME_DIR/lorad``, or ``/tmp/lorad-<uid>`` where there is no runtime dir."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return Path(xdg) / "lorad"
    return Path(f"/tmp/lorad-{os.getuid()}")


def default_endpoint() -> str:
    """``$LORAD_ENDPOINT`` or ``ipc://<runtime_dir>/lorad.sock``."""
    return os.environ.get("LORAD_ENDPOINT") or f"ipc://{runtime_dir() / 'lorad.sock'}"
