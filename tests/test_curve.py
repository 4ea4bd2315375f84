"""CURVE: encrypted, key-authenticated TCP; unknown client keys are refused (ZAP)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import zmq

from conftest import start_daemon
from lorad.client import AsyncClient, Client, CurveKeys, DaemonUnavailable

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="libzmq built without CURVE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keys(directory: Path, name: str) -> None:
    out = subprocess.run([sys.executable, "-m", "lorad.client.cli", "keys", "generate",
                          "--dir", str(directory), "--name", name],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert (directory / f"{name}.key").exists()
    assert (directory / f"{name}.key_secret").stat().st_mode & 0o077 == 0


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    (tmp_path / "authorized").mkdir()
    (tmp_path / "other").mkdir()
    keys(tmp_path, "server")
    keys(tmp_path / "authorized", "alice")
    keys(tmp_path / "other", "mallory")
    return tmp_path


async def test_only_authorized_keys_get_in(pki: Path, models_dir: Path, tiny_model: Path
                                           ) -> None:
    workdir = pki / "daemon"
    workdir.mkdir()
    # Not loopback: allowed only because CURVE is on.
    endpoint = f"tcp://0.0.0.0:{free_port()}"
    d = start_daemon(workdir, [models_dir], "--curve-secret-key",
                     str(pki / "server.key_secret"), "--curve-authorized-keys",
                     str(pki / "authorized"), endpoint=endpoint)
    connect = endpoint.replace("0.0.0.0", "127.0.0.1")
    try:
        alice = CurveKeys.from_files(pki / "server.key", pki / "authorized" / "alice.key_secret")
        with Client(connect, curve=alice, connect_timeout=5) as c:
            assert c.ping()["pong"]
            with c.create_context(tiny_model, n_ctx=128) as ctx:
                assert ctx.generate("Hello", max_tokens=2, temperature=0).collect() is not None
        async with AsyncClient(connect, curve=alice, connect_timeout=5) as ac:
            assert (await ac.ping())["pong"]
        mallory = CurveKeys.from_files(pki / "server.key", pki / "other" / "mallory.key_secret")
        for curve in (mallory, None):  # an unknown key, and no encryption at all
            with Client(connect, curve=curve, connect_timeout=1) as c:
                with pytest.raises(DaemonUnavailable):
                    c.ping()
    finally:
        assert d.stop() == 0, d.log()
    assert '"event": "curve"' in d.log()


def test_non_loopback_tcp_needs_curve(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "lorad.daemon", "--endpoint",
                          f"tcp://0.0.0.0:{free_port()}"], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)
    assert out.returncode == 1 and "without CURVE" in out.stderr
