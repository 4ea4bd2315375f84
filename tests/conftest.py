"""Shared fixtures: tiny GGUF models written at test time, and real daemon subprocesses.

A daemon is ready when it sends ``READY=1`` on the notify socket the fixture gives it (the
systemd protocol), so no test waits by sleeping.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import tinymodels

REPO = Path(__file__).resolve().parent.parent
collect_ignore = ["conformance"]
"""LangChain's standard tests (asyncio's): run in a pytest of their own by test_langchain.py."""


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def gemma() -> Path:
    """The default model (gemma 3 270M Q4_K_M), assembled into the model cache (slow tests)."""
    out = subprocess.run([sys.executable, "-m", "lorad.client.cli", "default-model"],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


@pytest.fixture(scope="session")
def tiny_model(models_dir: Path) -> Path:
    return tinymodels.write_tiny_llama(models_dir / "tiny.gguf", seed=0)


@pytest.fixture(scope="session")
def tiny_model_b(models_dir: Path) -> Path:
    return tinymodels.write_tiny_llama(models_dir / "tiny-b.gguf", seed=7)


@dataclass
class DaemonProcess:
    """A ``lorad serve`` subprocess on a private ipc endpoint."""

    endpoint: str
    proc: subprocess.Popen
    log_path: Path
    workdir: Path
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, **kwargs):
        from lorad.client import Client

        return Client(self.endpoint, **kwargs)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


def start_daemon(workdir: Path, allow: list[Path], *args: str, env: dict[str, str] | None = None,
                 ready_timeout: float = 60, endpoint: str | None = None,
                 signal_on_ready: int | None = None) -> DaemonProcess:
    """Start ``python -m lorad.daemon`` and wait for its READY=1 notification (and send it
    ``signal_on_ready`` the instant that notification arrives)."""
    endpoint = endpoint or f"ipc://{workdir}/lorad.sock"
    # AF_UNIX paths are limited to 108 bytes: keep the notify socket in a short temp dir.
    notify_dir = tempfile.mkdtemp(prefix="lorad-n-")
    notify_path = os.path.join(notify_dir, "notify")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(notify_path)
    listener.settimeout(0.2)
    log_path = workdir / "daemon.log"
    cmd = [sys.executable, "-m", "lorad.daemon", "--endpoint", endpoint, "--log-format", "json"]
    for d in allow:
        cmd += ["--allow-dir", str(d)]
    cmd += list(args)
    full_env = {**os.environ, "NOTIFY_SOCKET": notify_path, **(env or {})}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env,
                                cwd=workdir)
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            try:
                message = listener.recv(4096).decode()
            except TimeoutError:  # the recv timeout only lets us notice a daemon that died
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    raise RuntimeError(f"daemon not ready: {log_path.read_text()}") from None
                continue
            if "READY=1" in message.split("\n"):
                if signal_on_ready is not None:
                    proc.send_signal(signal_on_ready)
                break
    finally:
        listener.close()
        os.unlink(notify_path)
        os.rmdir(notify_dir)
    return DaemonProcess(endpoint, proc, log_path, workdir, env or {})


def rss_kib(pid: int) -> int:
    """A process's resident memory in KiB (``/proc/PID/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def rss_anon_kib(pid: int) -> int:
    """A process's resident anonymous memory in KiB (``/proc/PID/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    raise AssertionError("no RssAnon")


def fd_count(pid: int) -> int:
    """A process's open file descriptors."""
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, models_dir: Path, tiny_model: Path,
           tiny_model_b: Path) -> Iterator[DaemonProcess]:
    """One daemon for a whole test module (tests must clean up their contexts)."""
    workdir = tmp_path_factory.mktemp("daemon")
    d = start_daemon(workdir, [models_dir])
    yield d
    code = d.stop()
    assert code == 0, d.log()
    assert '"level": "error"' not in d.log(), d.log()


@pytest.fixture
def fresh_daemon(tmp_path: Path, models_dir: Path, tiny_model: Path) -> Iterator[DaemonProcess]:
    """A daemon of the test's own, for tests that stop or break it."""
    d = start_daemon(tmp_path, [models_dir])
    yield d
    if d.proc.poll() is None:
        d.proc.kill()
        d.proc.wait()


@pytest.fixture
def client(daemon: DaemonProcess):
    with daemon.client() as c:
        yield c
