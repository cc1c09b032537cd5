"""Create a qcow2 overlay the way Cinder and libvirt expect to find it.

Why so strict: the overlay's header is what every later tool trusts. Its backing name is the
plain basename of a file in the same directory (so the share can be mounted anywhere and no
absolute host path is ever recorded), the backing format is pinned (nothing probes), and the
file appears under its final name only once complete (temp file + ``link``, which fails
instead of overwriting).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Sequence

from qcow2 import _qemu_img
from qcow2._chain import LayerInfo
from qcow2._volume_files import fsync_dir, inspect_layers
from qcow2.errors import ImageExists, UnsafeImage
from qcow2.naming import CINDER, Naming

CLUSTER_SIZE = 65536


def create_overlay(
    new_path: str,
    backing_path: str,
    *,
    backing_fmt: str,
    roots: Sequence[str],
    naming: Naming = CINDER,
    mode: int = 0o660,
    owner_like_backing: bool = True,
) -> LayerInfo:
    """Create ``new_path`` as an empty qcow2 overlay of ``backing_path``; return its layer.

    The backing chain is inspected first; the new file has the backing's virtual size, 64 KiB
    clusters, the backing's basename and ``backing_fmt`` in its header, mode ``mode`` and (as
    root, like Cinder's ``chown --reference``) the backing's owner. Raises
    :class:`ImageExists` if ``new_path`` exists, :class:`UnsafeImage` for a bad name,
    directory or chain; on any failure nothing is left behind.
    """
    new_path = os.path.abspath(new_path)
    backing_path = os.path.abspath(backing_path)
    directory, name = os.path.split(new_path)
    backing_name = os.path.basename(backing_path)
    if os.path.dirname(backing_path) != directory:
        raise UnsafeImage(
            new_path, "backing-dir", f"backing {backing_path} is in another directory"
        )
    if not naming.is_image_name(name):
        raise UnsafeImage(new_path, "name", f"{name!r} does not match the naming convention")
    if not naming.is_image_name(backing_name):
        raise UnsafeImage(backing_path, "name", f"{backing_name!r} does not match the convention")
    if os.path.lexists(new_path):
        raise ImageExists(f"{new_path}: already exists")

    top = inspect_layers(backing_path, roots=roots, naming=naming, fmt=backing_fmt)[0]
    tmp = os.path.join(directory, f".{name}.{secrets.token_hex(6)}.tmp")
    linked = False
    try:
        _qemu_img.create_overlay(
            tmp, backing_name=backing_name, backing_fmt=backing_fmt, size=top.virtual_size
        )
        fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchmod(fd, mode)
            if owner_like_backing and os.geteuid() == 0:
                st = os.stat(backing_path)
                os.fchown(fd, st.st_uid, st.st_gid)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, new_path)
        except FileExistsError as exc:
            raise ImageExists(f"{new_path}: created concurrently by someone else") from exc
        linked = True
        os.unlink(tmp)
        fsync_dir(directory)
        made = inspect_layers(new_path, roots=roots, naming=naming, fmt="qcow2")[0]
        if (made.backing_name, made.backing_fmt, made.virtual_size) != (
            backing_name,
            backing_fmt,
            top.virtual_size,
        ):
            raise UnsafeImage(new_path, "overlay", f"header does not say what we wrote: {made}")
        return made
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if linked:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(new_path)
        raise


def merge_overlay(path: str, *, roots: Sequence[str], naming: Naming = CINDER) -> str:
    """Commit qcow2 overlay ``path`` into its backing file, offline; return the backing's path.

    For overlays no running guest uses (a stopped domain's leftover). The whole chain is
    inspected first; both formats are pinned on the command line (nothing probed). ``path``
    is left in place: the caller unlinks it once every reference to it is gone. qemu-img
    takes QEMU's image locks, so a file a running QEMU holds is refused, never written.
    """
    top = inspect_layers(path, roots=roots, naming=naming, fmt="qcow2")
    if len(top) < 2 or top[0].backing_fmt is None:
        raise UnsafeImage(path, "merge", "has no backing file to merge into")
    backing = top[1]
    _qemu_img.commit(top[0].path, backing_path=backing.path, backing_fmt=backing.fmt)
    return backing.path
