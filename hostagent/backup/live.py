"""The libvirt-facing half of the agent's backups and the ``[backup]`` settings.

Apart from :mod:`hostagent.backup.service` so the service can be unit-tested with a fake
engine: :class:`BackupEngine` is all it needs, :class:`LiveEngine` is the real one on
libvirt via :mod:`hostagent.backup.online`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import libvirt_ops as lo
from hostagent.backup import online
from hostagent.backup import repo as bk
from hostagent.backup.repo.format import Cancel as Cancel  # re-exported: service, create
from hostagent.backup.repo.format import Progress as Progress
from hostagent.hypervisor import Located
from hostagent.journal import model as ops
from hostagent.journal import store as jn


def request_level(op: ops.Operation) -> bool:
    """A request-level backup/restore/verify operation (never touches a chain itself)."""
    return "action" in op.request


@dataclass(frozen=True)
class BackupSettings:
    """The ``[backup]`` group, resolved (``repository`` absolute)."""

    repository: str
    zstd_level: int = 1
    chunk_size: int = 4 * bk.format.MiB
    max_parallel: int = 2
    keep_last: int = 7
    restore_dir: str | None = None
    #: MiB/s per volume read stream; 0 = unlimited.
    bandwidth_mib: int = 0
    #: A NEW repository (and its directory) may be made at ``repository``; otherwise a
    #: backup there is refused until one exists (a missing or unmounted share).
    create_repository: bool = False


class BackupEngine(Protocol):
    """The libvirt-facing half (faked in unit tests)."""

    def backup(
        self,
        where: Located,
        incremental: bool,
        repository: str,
        progress: Progress,
        cancel: Cancel,
    ) -> dict[str, Any]:
        """One volume's online backup; the create result's per-volume entry."""
        ...

    def release(self, where: Located) -> str | None:
        """Merge the volume's checkpoint overlay down; its name, or None if none."""
        ...


class LiveEngine:
    """:class:`BackupEngine` on libvirt via :mod:`hostagent.backup.online`."""

    def __init__(self, conn: lo.Connection, journal: jn.Journal, roots: list[str]) -> None:
        self._conn, self._journal, self._roots = conn, journal, roots

    def backup(
        self,
        where: Located,
        incremental: bool,
        repository: str,
        progress: Progress,
        cancel: Cancel,
    ) -> dict[str, Any]:
        vid = str(where.disk.serial).lower()
        req = online.BackupRequest(where.domain_uuid, vid, repository, incremental=incremental)
        res = online.backup_volume(
            self._conn,
            self._journal,
            req,
            roots=self._roots,
            progress=progress,
            cancel=cancel,
            not_busy=request_level,
        )
        return {
            "volume_id": vid,
            "backup_id": res.result.manifest.backup_id,
            "incremental": res.incremental,
            "bytes_read": res.result.bytes_read,
            "bytes_stored": res.result.bytes_stored,
            "fallback_reason": res.result.fallback_reason,
            "checkpoint": res.checkpoint,
            "operation_id": res.operation_id,
        }

    def release(self, where: Located) -> str | None:
        vid = str(where.disk.serial).lower()
        return online.release_checkpoint(self._conn, where.domain_uuid, vid, roots=self._roots)
