"""The ONE hypervisor interface every operation uses, where a volume disk is, per-disk locks.

:class:`Hypervisor` is implemented by :class:`hostagent.libvirt_hypervisor.LibvirtHypervisor`
and, for unit tests, by one complete fake (``tests/unit/hostagent/fakes.py``).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from hostagent.rpc import contract as api
from hostagent.rpc.wire_errors import Rule, wire_errors
from libvirt_ops import Disk
from qcow2 import CINDER, Naming, Qcow2Error, inspect_chain


@dataclass(frozen=True)
class Located:
    """Where a volume is attached: the domain (by UUID) and its disk as the live XML says."""

    domain_uuid: str
    disk: Disk

    @property
    def key(self) -> str:
        """The per-disk serialization key."""
        return f"{self.domain_uuid}/{self.disk.target}"


class Hypervisor(Protocol):
    """The libvirt side, narrowed to what the operations and their recovery need."""

    def locate(self, volume_id: str) -> Located: ...

    def snapshot(self, where: Located, new_file: str) -> dict[str, Any]: ...

    def nova_managed(self, domain_uuid: str) -> bool:
        """Whether Nova built the domain (and so rebuilds its disks from its own records)."""
        ...

    def merge(
        self,
        where: Located,
        file_to_merge: str | None,
        merge_target_file: str | None,
        progress: Any,
    ) -> dict[str, Any]: ...

    def inventory(self) -> api.Inventory: ...

    def instance_volumes(self, instance_uuid: str) -> list[Located]:
        """Every volume disk of a running instance (InstanceNotFound otherwise)."""
        ...

    def snapshot_disks(
        self, domain_uuid: str, files: list[tuple[str, str]], quiesce: api.Quiesce
    ) -> dict[str, Any]:
        """One atomic snapshot of ``(volume_id, new_file)`` disks onto pre-made overlays."""
        ...

    def merge_owned(self, where: Located, file: str, progress: Any) -> dict[str, Any]:
        """Merge ``file`` into its backing file (active commit + pivot if it is the top)."""
        ...

    # -- what recovery observes after a restart ------------------------------------------
    def block_job(self, where: Located) -> dict[str, int]:
        """``blockJobInfo`` of the disk; empty when it has no job."""
        ...

    def thaw_if_frozen(self, domain_uuid: str) -> bool:
        """Thaw the guest if qemu-ga says frozen; True if a thaw was needed."""
        ...

    def settle_job(self, where: Located, timeout: float) -> dict[str, Any]:
        """Bring a job a dead agent left to its end (active commit: pivot); what it did."""
        ...


def chain_names(where: Located, roots: list[str], *, naming: Naming = CINDER) -> list[str]:
    """Basenames of the disk's chain, top first, after qcow2 agreed with libvirt.

    Every file is inspected (whole chain) before any tool touches it, and libvirt's view
    must match the headers', so names from callers are checked against the REAL chain.
    """
    disk = where.disk
    if not disk.snapshot_capable:
        raise api.InvalidRequest(f"disk {disk.target} is read-only or shareable")
    refused = Rule(Qcow2Error, api.InvalidRequest, lambda e: f"chain of {disk.target} refused: {e}")
    with (
        wire_errors(refused),
        inspect_chain(disk.source, roots=roots, naming=naming, fmt=disk.fmt) as c,
    ):
        on_disk = [os.path.realpath(info.path) for info in c.layers]
    live = [os.path.realpath(layer.path) for layer in disk.chain]
    if on_disk != live:
        raise api.InvalidRequest(f"libvirt's chain {live} differs from the files {on_disk}")
    names = [os.path.basename(p) for p in live]
    if not naming.is_image_name(names[0]):  # inspect_chain judges only backing names
        raise api.InvalidRequest(f"the live top {names[0]!r} of {disk.target} is not a file "
                                 "name of the volume's (Cinder's naming)")  # fmt: skip
    if len(set(names)) != len(names):
        raise api.InvalidRequest(f"chain of {disk.target} repeats a file name: {names}")
    return names


class DiskLocks:
    """Per-disk mutual exclusion for operations spanning several disks.

    The pool serializes one key per job; an instance snapshot spans several disks, so every
    operation also holds the locks of its disks here, taken in sorted order (no deadlock).
    A waiter blocks only behind a job that is running, so it always makes progress.
    """

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}

    @contextlib.contextmanager
    def hold(self, keys: Iterable[str]) -> Iterator[None]:
        with self._guard:
            locks = [self._locks.setdefault(k, threading.Lock()) for k in sorted(set(keys))]
        taken: list[threading.Lock] = []
        try:
            for lock in locks:
                lock.acquire()
                taken.append(lock)
            yield
        finally:
            for lock in reversed(taken):
                lock.release()
