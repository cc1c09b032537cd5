"""Durable file writes of the repository: temp + fsync + rename, 0770 directories, and
ENOSPC/EDQUOT turned into :class:`RepositoryFull` (nothing half-written stays visible)."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Sequence

from hostagent.backup.repo.codec import Buffer
from hostagent.backup.repo.format import BackupError, RepositoryFull
from qcow2 import fsync_dir

FILE_MODE = 0o660
DIR_MODE = 0o770
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def full_error(exc: OSError, what: str) -> BackupError:
    if exc.errno in _FULL_ERRNOS:
        return RepositoryFull(f"repository full while writing {what}: {exc.strerror}")
    raise exc


def mkdir_synced(path: str) -> bool:
    """Create one directory 0770 (fsyncing its parent); False when it already existed."""
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        return False
    except OSError as exc:
        raise full_error(exc, path) from exc
    os.chmod(path, DIR_MODE)
    fsync_dir(os.path.dirname(path))
    return True


def write_all(fd: int, parts: Sequence[Buffer]) -> None:
    """writev every buffer (one syscall in the common case; no join copy)."""
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    while views:
        k = os.writev(fd, views)
        while views and k >= len(views[0]):
            k -= len(views[0])
            views.pop(0)
        if views and k:
            views[0] = views[0][k:]


def atomic_write(path: str, data: Buffer | Sequence[Buffer], *, sync_dir: bool = True) -> None:
    """temp + fsync + rename (+ fsync dir). ENOSPC leaves nothing behind."""
    d, name = os.path.split(path)
    tmp = os.path.join(d, f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    except OSError as exc:
        raise full_error(exc, path) from exc
    try:
        try:
            os.fchmod(fd, FILE_MODE)
            if isinstance(data, bytes | bytearray | memoryview):
                write_all(fd, [data])
            else:
                write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise full_error(exc, path) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if sync_dir:
        fsync_dir(d)
