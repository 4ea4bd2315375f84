"""Running lorad as a service: systemd units, the notify protocol and the watchdog."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from lorad.daemon.units import EXAMPLE_PYTHON, render_unit

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(("user", "name"), [(False, "lorad.service"),
                                            (True, "lorad-user.service")])
def test_shipped_units_are_the_rendered_templates(user: bool, name: str) -> None:
    assert (REPO / "systemd" / name).read_text() == render_unit(user=user, python=EXAMPLE_PYTHON)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed (package systemd)")
@pytest.mark.parametrize("user", [False, True])
def test_units_pass_systemd_analyze_verify(tmp_path: Path, user: bool) -> None:
    # The user unit is checked by the system manager's rules too: `systemd-analyze --user`
    # needs a running user manager, which containers and CI do not have. The rules for every
    # key used here are the same in both modes.
    path = tmp_path / "lorad.service"
    out = subprocess.run([sys.executable, "-m", "lorad.client.cli", "install-unit",
                          *(["--user"] if user else []), "--output", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    text = path.read_text()
    assert f"ExecStart={sys.executable} -m lorad.daemon" in text
    assert "Type=notify" in text and "WatchdogSec=" in text
    verify = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True,
                            text=True, timeout=60)
    assert verify.returncode == 0
    assert verify.stdout + verify.stderr == "", verify.stdout + verify.stderr
    # The check can fail: a unit with a typo is reported.
    path.write_text(text.replace("Type=notify", "Type=notfy"))
    bad = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True,
                         text=True, timeout=60)
    assert "notfy" in bad.stdout + bad.stderr


def test_system_unit_hardening() -> None:
    text = render_unit(user=False)
    for line in ("NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=read-only",
                 "PrivateTmp=yes", "PrivateDevices=yes",
                 "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6", "Restart=on-failure",
                 "RuntimeDirectory=lorad", "StateDirectory=lorad", "CacheDirectory=lorad",
                 "User=lorad", "--group lorad", "MemoryMax="):
        assert line in text, line


def notify_messages(tmp_path: Path, model: Path, env: dict[str, str], want: int,
                    timeout: float = 30) -> list[str]:
    """Start a daemon with a notify socket of ours; collect datagrams until ``want`` arrived
    after READY=1 (or the timeout), then stop it with SIGTERM and collect the rest."""
    notify_dir = tempfile.mkdtemp(prefix="lorad-w-")
    path = os.path.join(notify_dir, "notify")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(path)
    listener.settimeout(0.5)
    cmd = [sys.executable, "-m", "lorad.daemon", "--endpoint", f"ipc://{tmp_path}/d.sock",
           "--allow-dir", str(model.parent), "--model", str(model), "--n-ctx", "128"]
    proc = subprocess.Popen(cmd, env={**os.environ, "NOTIFY_SOCKET": path, **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    messages: list[str] = []
    try:
        deadline = time.monotonic() + timeout
        ready_at = None
        while time.monotonic() < deadline:
            try:
                messages.append(listener.recv(4096).decode())
            except TimeoutError:
                if proc.poll() is not None:
                    break
                continue
            if ready_at is None and "READY=1" in messages[-1].split("\n"):
                ready_at = len(messages)
            if ready_at is not None and len(messages) - ready_at >= want:
                break
        proc.terminate()
        assert proc.wait(30) == 0
        while True:
            try:
                messages.append(listener.recv(4096).decode())
            except TimeoutError:
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        listener.close()
        os.unlink(path)
        os.rmdir(notify_dir)
    return messages


def test_notify_protocol_and_watchdog(tmp_path: Path, tiny_model: Path) -> None:
    messages = notify_messages(tmp_path, tiny_model, {"WATCHDOG_USEC": "200000"}, want=4)
    lines = [line for m in messages for line in m.split("\n")]
    assert lines.index("STATUS=loading models") < lines.index("READY=1")
    assert any(line.startswith("STATUS=serving on ipc://") for line in lines)
    ready = lines.index("READY=1")
    assert lines[ready:].count("WATCHDOG=1") >= 4  # pinged every 0.1 s from the event loop
    assert "STOPPING=1" in lines[ready:]


def test_no_watchdog_pings_for_another_pid(tmp_path: Path, tiny_model: Path) -> None:
    env = {"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}
    messages = notify_messages(tmp_path, tiny_model, env, want=1, timeout=2)
    lines = [line for m in messages for line in m.split("\n")]
    assert "READY=1" in lines and "STOPPING=1" in lines
    assert "WATCHDOG=1" not in lines
