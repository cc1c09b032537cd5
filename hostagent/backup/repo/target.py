"""Where a restore writes: only through file descriptors of what the request validated.

A restore creates a NEW file in a directory of a share that other parties (guests' owners,
Cinder, other hosts) can write. Paths are never trusted after validation:

- the target directory is opened component by component with ``O_NOFOLLOW`` (a symlink
  anywhere on the way is refused) and must be the directory the request validated (same
  device and inode: a directory swapped in while the restore was queued is refused);
- the data is written inside a private ``0700`` directory made in it (``.<name>.restore-<hex>``,
  created with ``mkdir``, which never follows a planted symlink, then opened ``O_NOFOLLOW`` and
  checked to be ours), so nobody else can plant or rename anything inside;
- the result is linked into place from its open descriptor (``linkat`` of
  ``/proc/self/fd/N``), so the inode written is the inode published, whatever happens to names;
  the link fails rather than replace a file that appeared meanwhile.

:func:`remove_partial` cleans up what a restore killed mid-write left (crash recovery).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from hostagent.backup.repo.format import BackupError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class TargetChanged(BackupError):
    """The restore's target directory is not what the request validated (moved, swapped for
    another directory or a symlink, or reached through a link): nothing was written."""


def partial_prefix(name: str) -> str:
    """Private directories of restores to ``name`` are ``.<name>.restore-<random>``."""
    return f".{name}.restore-"


def check_name(name: str) -> str:
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        raise ValueError(f"bad restore file name {name!r}")
    return name


def open_dir(path: str) -> int:
    """Open the absolute directory ``path`` without following a symlink at any component."""
    if not os.path.isabs(path):
        raise ValueError(f"{path!r} is not absolute")
    fd = os.open("/", _DIR_FLAGS)
    try:
        for part in [p for p in path.split("/") if p]:
            if part in (".", ".."):
                raise TargetChanged(f"{path!r} has a {part!r} component")
            try:
                nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:  # ELOOP: a symlink; ENOTDIR: not a directory
                raise TargetChanged(f"{path}: {part!r} is not a plain directory: {exc}") from exc
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


def dir_identity(path: str) -> tuple[int, int]:
    """``(st_dev, st_ino)`` of the directory ``path`` as :func:`open_dir` reaches it."""
    fd = open_dir(path)
    try:
        st = os.fstat(fd)
        return st.st_dev, st.st_ino
    finally:
        os.close(fd)


@dataclass
class Workspace:
    """The target directory and the private directory inside it, both open."""

    dir_fd: int
    priv_fd: int
    priv_name: str
    name: str

    def create(self, leaf: str) -> int:
        """A new file in the private directory, open read-write."""
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        return os.open(leaf, flags, 0o600, dir_fd=self.priv_fd)

    def open_made(self, leaf: str) -> int:
        """A file a tool made in the private directory: must be a regular file."""
        fd = os.open(leaf, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.priv_fd)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise TargetChanged(f"{leaf} in the restore's private directory is not a file")
        return fd

    def publish(self, fd: int, mode: int) -> None:
        """Link the open file ``fd`` into the target directory as ``name`` (never replaces)."""
        os.fchmod(fd, mode)
        try:
            os.link(f"/proc/self/fd/{fd}", self.name, dst_dir_fd=self.dir_fd, follow_symlinks=True)
        except FileNotFoundError as exc:  # Linux links no inode whose last name is gone
            raise TargetChanged(
                f"the restored file of {self.name} lost its name while written (replaced "
                "or removed in the private directory): nothing published"
            ) from exc
        os.fsync(self.dir_fd)


@contextlib.contextmanager
def workspace(dest: str, expect: tuple[int, int] | None) -> Iterator[Workspace]:
    """The private directory of one restore to the absolute path ``dest``; removed on exit.

    ``expect`` is the target directory's identity taken when the request was validated.
    """
    d, name = os.path.split(dest)
    check_name(name)
    dfd = open_dir(d)
    try:
        st = os.fstat(dfd)
        if expect is not None and (st.st_dev, st.st_ino) != tuple(expect):
            raise TargetChanged(f"{d} is not the directory the restore request validated")
        if _lexists(name, dfd):
            raise FileExistsError(dest)
        priv = partial_prefix(name) + secrets.token_hex(8)
        os.mkdir(priv, 0o700, dir_fd=dfd)  # EEXIST on anything planted there, links included
        try:
            pfd = os.open(priv, _DIR_FLAGS, dir_fd=dfd)
        except OSError:
            _remove_tree(dfd, priv)
            raise
        try:
            pst = os.fstat(pfd)
            if pst.st_uid != os.geteuid() or stat.S_IMODE(pst.st_mode) & 0o077:
                raise TargetChanged(f"{priv} in {d} is not the private directory made here")
            yield Workspace(dfd, pfd, priv, name)
        finally:
            os.close(pfd)
            _remove_tree(dfd, priv)
    finally:
        os.close(dfd)


def _lexists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _remove_tree(dir_fd: int, name: str) -> None:
    """Remove the private directory ``name`` (one level of files) without following links."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):  # a link or file where ours was: remove it, not its target
        os.unlink(name, dir_fd=dir_fd)
        return
    pfd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    try:
        for leaf in os.listdir(pfd):
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                os.unlink(leaf, dir_fd=pfd)
    finally:
        os.close(pfd)
    with contextlib.suppress(FileNotFoundError, OSError):
        os.rmdir(name, dir_fd=dir_fd)


def remove_partial(dest_path: str) -> list[str]:
    """Remove what a restore to ``dest_path`` killed mid-write left beside it; their names.

    The target itself never appears half written (it is linked only when complete), so
    after a restart only the private directories (or, from older versions, temporary files)
    are left. Nothing is followed: a planted link is removed, not its target.
    """
    d, name = os.path.split(dest_path)
    if not name:
        return []
    try:
        dfd = open_dir(d)
    except (OSError, ValueError, TargetChanged):
        return []
    removed: list[str] = []
    try:
        for leaf in os.listdir(dfd):
            if leaf.startswith(partial_prefix(name)):
                _remove_tree(dfd, leaf)
                removed.append(leaf)
    finally:
        os.close(dfd)
    return removed
