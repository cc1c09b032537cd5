"""Small file-level helpers shared by overlay creation and offline operations."""

from __future__ import annotations

import os
from collections.abc import Sequence

from qcow2._chain import LayerInfo
from qcow2._inspect import inspect_chain
from qcow2.naming import CINDER, Naming


def inspect_layers(
    path: str, *, roots: Sequence[str], naming: Naming = CINDER, fmt: str = "qcow2"
) -> tuple[LayerInfo, ...]:
    """The inspected chain's layers (top first); the readers are closed at once.

    Why: these operations only need the metadata; holding fds across a qemu-img run that
    rewrites or deletes the files would pin stale inodes.
    """
    chain = inspect_chain(path, roots=roots, naming=naming, fmt=fmt)
    try:
        return tuple(chain.layers)
    finally:
        chain.close()


def fsync_dir(path: str) -> None:
    """Make a directory entry change (create, rename, unlink) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink_durable(path: str) -> None:
    """Remove ``path`` and make the removal durable."""
    os.unlink(path)
    fsync_dir(os.path.dirname(path))
