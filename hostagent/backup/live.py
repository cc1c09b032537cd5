"""The libvirt-facing half of the agent's backups and the ``[backup]`` settings.

Apart from :mod:`hostagent.backup.service` so the service can be unit-tested with a fake
engine: :class:`BackupEngine` is all it needs, :class:`LiveEngine` is the real one on
the hypervisor via :mod:`hostagent.backup.online`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from hostagent.backup import online
from hostagent.backup import repo as bk
from hostagent.backup.repo.format import Cancel as Cancel  # re-exported: service, create
from hostagent.backup.repo.format import Progress as Progress
from hostagent.hypervisor import Hypervisor, Located
from hostagent.journal import model as ops
from hostagent.journal import store as jn
from hostagent.journal.crash import StepFn


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

    def bind(self, checkpoints: online.CheckpointOps, step: StepFn) -> None:
        """How checkpoints are taken and dropped, and the journal's step wrapper (the
        service binds its owned snapshot paths once it has built them)."""
        ...

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


class LiveEngine:
    """:class:`BackupEngine` on the hypervisor via :mod:`hostagent.backup.online`."""

    def __init__(self, hv: Hypervisor, journal: jn.Journal, roots: list[str]) -> None:
        self._hv, self._journal, self._roots = hv, journal, roots
        self._cps: online.CheckpointOps | None = None
        self._step: StepFn = journal.step

    def bind(self, checkpoints: online.CheckpointOps, step: StepFn) -> None:
        self._cps, self._step = checkpoints, step

    def backup(
        self,
        where: Located,
        incremental: bool,
        repository: str,
        progress: Progress,
        cancel: Cancel,
    ) -> dict[str, Any]:
        if self._cps is None:
            raise RuntimeError("backup engine used before the service bound its checkpoints")
        vid = str(where.disk.serial).lower()
        req = online.BackupRequest(where.domain_uuid, vid, repository, incremental=incremental)
        res = online.backup_volume(
            self._hv,
            self._journal,
            req,
            self._cps,
            roots=self._roots,
            step=self._step,
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
            "checkpoint_file": res.checkpoint_file,
            "dropped": list(res.dropped),
            "operation_id": res.operation_id,
        }
