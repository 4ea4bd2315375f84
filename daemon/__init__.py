"""The lorad daemon (needs the ``lorad[daemon]`` extra): trio, llama.cpp, ZeroMQ.

Start it with ``lorad serve`` or :func:`run_daemon`.
"""

from .config import ContextSpec, DaemonConfig, ModelSpec, load_config
from .server import Daemon, run_daemon

__all__ = ["ContextSpec", "Daemon", "DaemonConfig", "ModelSpec", "load_config", "run_daemon"]
