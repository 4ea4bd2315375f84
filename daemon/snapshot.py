"""Private snapshots of adapter files: what lorad parses is never a file a client can change.

A client may truncate, rewrite or replace a file while the daemon reads it. Through a memory
map, a file that shrinks is a SIGBUS (the whole daemon dies); read twice (once to check, once to
load), it may be two different files. So an adapter file is read once, with ordinary reads,
into memory of the daemon's own, and everything after works on that copy:

* :func:`snapshot` copies it into a ``memfd`` that is then sealed (no one, the daemon included,
  can write, shrink or grow it): its header is parsed from there and llama.cpp loads it from
  there (``/proc/self/fd/N``), so what was checked is what is loaded;
* :func:`read_private` reads a small file (a PEFT config, PEFT weights) into ``bytes``.

Both refuse a file over ``max_bytes`` with ``too_large`` before reading it, and check that they
got exactly the bytes ``fstat`` announced and that the file's identity (device, inode, size,
mtime) did not change while they read: a file that did gets ``lora_load_failed`` ("changed
while it was being read; retry"). A file that is not there or not readable is
``lora_file_not_found``; one that is not a regular file (a FIFO swapped in) too, without
blocking on it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from lorad.protocol import ErrorCode, ProtocolError

SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
FILE_LIMIT = "limits.max_adapter_file_bytes"
"""What a file over its bound is told it exceeds, unless the caller names another bound."""
_CHUNK = 1 << 30
"""Bytes per read or sendfile call (Linux moves at most 2 GiB - 4 KiB in one)."""


@dataclass(frozen=True)
class FileIdentity:
    """What says a file is still the one that was loaded: device, inode, size, mtime."""

    dev: int
    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> FileIdentity:
        return cls.from_stat(path.stat())

    @classmethod
    def from_stat(cls, st: os.stat_result) -> FileIdentity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def identity_of(path: Path) -> FileIdentity:
    """``path``'s identity now; ``lora_file_not_found`` where it cannot be read."""
    try:
        return FileIdentity.of(path)
    except OSError as exc:
        raise ProtocolError(ErrorCode.LORA_FILE_NOT_FOUND,
                            f"cannot read {str(path)!r}: {exc.strerror}", path=str(path)) from None


class Snapshot:
    """A sealed in-memory copy of one version of a file (close it, or use it in ``with``)."""

    def __init__(self, fd: int, origin: Path, identity: FileIdentity) -> None:
        self.fd = fd
        self.origin = origin
        """The file it is a copy of (what errors and reports name)."""
        self.identity = identity
        """The identity of the copied version (its size is the copy's)."""

    @property
    def size(self) -> int:
        return self.identity.size

    @property
    def path(self) -> str:
        """A path that opens the copy (for llama.cpp), while it is open."""
        return f"/proc/self/fd/{self.fd}"

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def changed(path: Path) -> ProtocolError:
    return ProtocolError(ErrorCode.LORA_LOAD_FAILED,
                         f"{path.name} changed while it was being read; retry", path=str(path))


def _open(path: Path, max_bytes: int, limit: str) -> tuple[int, FileIdentity]:
    """An fd of ``path`` (a regular file of at most ``max_bytes``, the bound named ``limit``)
    and its identity."""
    try:  # O_NONBLOCK: a FIFO put in the file's place does not block the open
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise ProtocolError(ErrorCode.LORA_FILE_NOT_FOUND,
                            f"cannot read {str(path)!r}: {exc.strerror}", path=str(path)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ProtocolError(ErrorCode.LORA_FILE_NOT_FOUND,
                                f"{str(path)!r} is not a regular file", path=str(path))
        if st.st_size > max_bytes:
            raise ProtocolError(ErrorCode.TOO_LARGE,
                                f"{path.name} has {st.st_size} bytes, more than {limit} "
                                f"({max_bytes})", path=str(path), size=st.st_size,
                                limit=limit.removeprefix("limits."), value=max_bytes)
        return fd, FileIdentity.from_stat(st)
    except BaseException:
        os.close(fd)
        raise


def _check_unchanged(fd: int, path: Path, identity: FileIdentity, copied: int) -> None:
    """Raise ``changed`` unless exactly ``identity.size`` bytes were copied of a file that
    still has that identity and nothing past its end."""
    if copied != identity.size or os.pread(fd, 1, identity.size):
        raise changed(path)
    if FileIdentity.from_stat(os.fstat(fd)) != identity:
        raise changed(path)


def _read_failed(path: Path, exc: OSError) -> ProtocolError:
    return ProtocolError(ErrorCode.LORA_LOAD_FAILED,
                         f"could not read {path.name}: {exc.strerror or exc}", path=str(path))


def _copy(src: int, dst: int, size: int) -> int:
    """Copy up to ``size`` bytes of ``src`` from its start to ``dst``; how many were."""
    done = 0
    use_sendfile = True
    while done < size:
        n = min(size - done, _CHUNK)
        if use_sendfile:
            try:
                sent = os.sendfile(dst, src, done, n)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOSYS) or done:
                    raise
                use_sendfile = False
                continue
        else:
            block = os.pread(src, min(n, 1 << 20), done)
            sent = len(block)
            view = memoryview(block)
            while view:
                view = view[os.write(dst, view):]
        if not sent:
            break
        done += sent
    return done


def snapshot(path: Path, max_bytes: int, limit: str = FILE_LIMIT) -> Snapshot:
    """A sealed memfd copy of the regular file ``path`` (at most ``max_bytes``, the bound named
    ``limit`` in errors), checked to be one whole version of it."""
    fd, identity = _open(path, max_bytes, limit)
    memfd = -1
    try:
        memfd = os.memfd_create(f"lorad:{path.name}"[:249],
                                os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        copied = _copy(fd, memfd, identity.size)
        _check_unchanged(fd, path, identity, copied)
        fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, SEALS)
        return Snapshot(memfd, path, identity)
    except OSError as exc:
        if memfd >= 0:
            os.close(memfd)
        raise _read_failed(path, exc) from None
    except BaseException:
        if memfd >= 0:
            os.close(memfd)
        raise
    finally:
        os.close(fd)


def read_private(path: Path, max_bytes: int, limit: str = FILE_LIMIT
                 ) -> tuple[bytes, FileIdentity]:
    """The bytes of the regular file ``path`` (at most ``max_bytes``, the bound named ``limit``
    in errors), checked to be one whole version of it, and that version's identity."""
    fd, identity = _open(path, max_bytes, limit)
    try:
        parts: list[bytes] = []
        done = 0
        while done < identity.size and (part := os.pread(fd, min(identity.size - done, _CHUNK),
                                                         done)):
            parts.append(part)
            done += len(part)
        _check_unchanged(fd, path, identity, done)
    except OSError as exc:
        raise _read_failed(path, exc) from None
    finally:
        os.close(fd)
    return parts[0] if len(parts) == 1 else b"".join(parts), identity
