"""Default locations, and the allowed-directories check for every file the daemon opens."""

from __future__ import annotations

import os
from pathlib import Path

from lorad.protocol import ErrorCode, ProtocolError


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/lorad`` (default ``~/.cache/lorad``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lorad"


def model_dir() -> Path:
    """The user's model cache: ``$LORAD_MODEL_DIR`` or ``<cache_dir>/models``."""
    env = os.environ.get("LORAD_MODEL_DIR")
    return Path(env) if env else cache_dir() / "models"


def adapter_dir() -> Path:
    """The user's adapter directory: ``$LORAD_ADAPTER_DIR`` or ``<cache_dir>/adapters``."""
    env = os.environ.get("LORAD_ADAPTER_DIR")
    return Path(env) if env else cache_dir() / "adapters"


def runtime_dir() -> Path:
    """``$XDG_RUNTIME_DIR/lorad``, or ``/tmp/lorad-<uid>`` where there is no runtime dir."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return Path(xdg) / "lorad"
    return Path(f"/tmp/lorad-{os.getuid()}")


def default_endpoint() -> str:
    """``$LORAD_ENDPOINT`` or ``ipc://<runtime_dir>/lorad.sock``."""
    return os.environ.get("LORAD_ENDPOINT") or f"ipc://{runtime_dir() / 'lorad.sock'}"


class AllowedDirs:
    """The directories files may be loaded from; symlinks are resolved before the check."""

    def __init__(self, dirs: list[str | Path]) -> None:
        self.dirs = [Path(d).expanduser().resolve() for d in dirs]

    def check(self, path: str | Path, what: str = "file", *, directory: bool = False) -> Path:
        """Return the resolved path, or raise ``forbidden_path`` / ``not_found`` (a regular
        file is expected, or a directory with ``directory=True``)."""
        resolved = Path(path).expanduser().resolve()
        if not any(resolved == d or resolved.is_relative_to(d) for d in self.dirs):
            raise ProtocolError(
                ErrorCode.FORBIDDEN_PATH,
                f"{what} {str(path)!r} is outside the allowed directories",
                path=str(path),
                resolved=str(resolved),
                allowed=[str(d) for d in self.dirs],
            )
        if not (resolved.is_dir() if directory else resolved.is_file()):
            raise ProtocolError(
                ErrorCode.NOT_FOUND,
                f"{what} {str(path)!r} does not exist or is not a regular file",
                path=str(path),
                resolved=str(resolved),
            )
        return resolved
