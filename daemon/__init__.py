"""The lorad daemon (needs the ``lorad[daemon]`` extra): trio, llama.cpp, ZeroMQ.

Start it with ``lorad serve`` or :func:`run_daemon`. Names are imported on first use, so that
``lorad.daemon.cli`` (the ``serve`` options) loads without the daemon's dependencies.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ContextSpec", "Daemon", "DaemonConfig", "ModelSpec", "load_config", "run_daemon"]


def __getattr__(name: str) -> Any:
    if name in ("ContextSpec", "DaemonConfig", "ModelSpec", "load_config"):
        from . import config

        return getattr(config, name)
    if name in ("Daemon", "run_daemon"):
        from . import server

        return getattr(server, name)
    raise AttributeError(f"module 'lorad.daemon' has no attribute {name!r}")
