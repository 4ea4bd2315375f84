"""systemd units for lorad: a system service and a user service (``lorad install-unit``).

The files in the repository's ``systemd/`` folder are these templates rendered with
``python = /opt/lorad/.venv/bin/python`` (a test keeps them in step).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

EXAMPLE_PYTHON = "/opt/lorad/.venv/bin/python"

SYSTEM_UNIT = """# lorad as a system service (systemctl). `lorad install-unit` writes this file with the paths of
# the current install; by hand: copy to /etc/systemd/system/lorad.service, create the user
# (`useradd --system --home-dir /var/lib/lorad lorad`), adjust ExecStart, then
# `systemctl daemon-reload && systemctl enable --now lorad`.
#
# Clients in the group `lorad` reach it at ipc:///run/lorad/lorad.sock (socket mode 0660).
[Unit]
Description=lorad local LLM runtime daemon
Documentation=https://example.invalid/lorad/README.md
After=network.target

[Service]
Type=notify
NotifyAccess=main
User=lorad
Group=lorad
ExecStart={python} -m lorad.daemon --endpoint ipc:///run/lorad/lorad.sock --group lorad --allow-dir /var/lib/lorad/models --adapter-dir /var/lib/lorad/adapters --log-format json
Environment=LORAD_MODEL_DIR=/var/lib/lorad/models LORAD_ADAPTER_DIR=/var/lib/lorad/adapters XDG_CACHE_HOME=/var/cache/lorad
RuntimeDirectory=lorad
RuntimeDirectoryMode=0750
StateDirectory=lorad lorad/models lorad/adapters
CacheDirectory=lorad
# The daemon pings from its own event loop at half this period: a wedged loop is restarted.
WatchdogSec=30
Restart=on-failure
RestartSec=2
KillSignal=SIGTERM
TimeoutStartSec=600
TimeoutStopSec=60
# Weights are mmapped and shared; size this for the models plus n_ctx per context (see README).
MemoryMax=8G

# Hardening
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=read-only
PrivateTmp=yes
# GPU offload needs the device nodes: override with `systemctl edit lorad`:
#   [Service]
#   PrivateDevices=no
#   DeviceAllow=/dev/nvidia0 rw
#   DeviceAllow=/dev/nvidiactl rw
#   DeviceAllow=/dev/nvidia-uvm rw
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
RestrictNamespaces=yes
LockPersonality=yes
RestrictRealtime=yes
SystemCallArchitectures=native
UMask=0027

[Install]
WantedBy=multi-user.target
"""

USER_UNIT = """# lorad as a user service (systemctl --user). `lorad install-unit --user` writes this file with
# the paths of the current install to ~/.config/systemd/user/lorad.service; then
# `systemctl --user daemon-reload && systemctl --user enable --now lorad`.
#
# Clients of the same user reach it at the default endpoint, ipc://$XDG_RUNTIME_DIR/lorad/lorad.sock
# (socket mode 0600).
[Unit]
Description=lorad local LLM runtime daemon (per user)

[Service]
Type=notify
NotifyAccess=main
ExecStart={python} -m lorad.daemon --log-format json
# The daemon pings from its own event loop at half this period: a wedged loop is restarted.
WatchdogSec=30
Restart=on-failure
RestartSec=2
KillSignal=SIGTERM
TimeoutStartSec=600
TimeoutStopSec=60
NoNewPrivileges=yes
PrivateTmp=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6

[Install]
WantedBy=default.target
"""


def render_unit(*, user: bool, python: str | None = None) -> str:
    """The unit text, with ``ExecStart`` running ``python -m lorad.daemon``."""
    template = USER_UNIT if user else SYSTEM_UNIT
    return template.replace("{python}", python or sys.executable)


def default_unit_path(*, user: bool) -> Path:
    if user:
        base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"),
                                                                 ".config")
        return Path(base) / "systemd" / "user" / "lorad.service"
    return Path("/etc/systemd/system/lorad.service")
