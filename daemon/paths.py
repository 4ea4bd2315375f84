"""Default locations, and the allowed-directories check for every file the daemon opens."""

from __future__ import annotations

import os
from pathlib import Path

from lorad.protocol import ErrorCode, ProtocolError
from lorad.protocol.endpoint import default_endpoint, runtime_dir
from lorad.protocol.errors import echo

__all__ = ["adapter_dir", "cache_dir", "default_endpoint", "model_dir", "runtime_dir"]


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


PATH_MAX, NAME_MAX = 4096, 255
"""Linux's limits on a path and on one of its names, in bytes."""


def check_path_text(ref: str, field: str = "path") -> None:
    """``bad_request`` for a reference no file can have: a NUL byte, text that is no file name
    (a lone surrogate), a path longer than ``PATH_MAX`` or a name longer than ``NAME_MAX`` (the
    file system would raise instead), or a leading ``~user`` that names no home directory."""
    problem = None
    try:
        raw = os.fsencode(ref)
    except UnicodeEncodeError:
        raw = b""
        problem = "is not valid text for a file name"
    if "\x00" in ref:
        problem = "contains a NUL byte"
    elif len(raw) > PATH_MAX:
        problem = f"is longer than {PATH_MAX} bytes"
    elif any(len(part) > NAME_MAX - len(".gguf") for part in raw.split(b"/")):
        problem = f"has a name longer than {NAME_MAX - len('.gguf')} bytes"
    if problem is not None:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"{field}: {echo(ref)!r} {problem}",
                            field=field)
    expand_user(ref, field)


def expand_user(ref: str | Path, field: str = "path") -> Path:
    """``ref`` with a leading ``~`` or ``~user`` expanded (``Path.expanduser``, which raises
    ``RuntimeError`` where there is no such home directory): ``bad_request`` for a user the
    system does not know, or a ``~`` with no home directory."""
    path = Path(ref)
    if not str(ref).startswith("~"):
        return path
    try:
        return path.expanduser()
    except (RuntimeError, KeyError, ValueError) as exc:
        head = str(ref).split("/", 1)[0]
        raise ProtocolError(
            ErrorCode.BAD_REQUEST,
            f"{field}: {echo(str(ref))!r} starts with {echo(head)!r}, which names no home "
            f"directory ({'no such user' if head != '~' else 'no home directory'})",
            field=field, path=str(ref),
        ) from exc


class AllowedDirs:
    """The directories files may be loaded from; symlinks are resolved before the check."""

    def __init__(self, dirs: list[str | Path]) -> None:
        self.dirs = [expand_user(d, "allowed_dirs").resolve() for d in dirs]

    def check(self, path: str | Path, what: str = "file", *, directory: bool = False) -> Path:
        """Return the resolved path, or raise ``forbidden_path`` / ``not_found`` (a regular
        file is expected, or a directory with ``directory=True``)."""
        check_path_text(str(path))
        resolved = expand_user(path).resolve()
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
