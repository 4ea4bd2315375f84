"""What the benchmarks that run llama-server beside lorad share: where its binary is cached,
a free local port for it, and its version line for the results."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

DEFAULT_LLAMA_SERVER = Path("~/.cache/lorad/llama-server/llama-server").expanduser()
"""Built from the llama.cpp inside the llama-cpp-python 0.3.36 sdist (bench/README.md)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llama_server_version(binary: Path) -> str | None:
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = [ln.strip() for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
    return " | ".join(ln for ln in lines if "version" in ln or "built with" in ln) or None
