"""hostagent.backup.repo: the pure backup repository and engine (no libvirt, no journal).

Public face: the repository (on-disk format v1 in :mod:`.format`), full and incremental
backups of a frozen layer's guest view (:mod:`.engine`), restore (:mod:`.restore`), retention
(:func:`prune`) and the errors, rooted at :class:`BackupError`. Everything here reads qcow2
files and writes the repository only, so it can be used (and tested) without a hypervisor.
"""

from hostagent.backup.repo.engine import BackupResult, backup_full, backup_incremental
from hostagent.backup.repo.format import (
    BackupCancelled,
    BackupError,
    BackupNotFound,
    Checkpoint,
    CorruptChunk,
    FormatError,
    Manifest,
    ManifestExtent,
    MissingChunk,
    RepoConfig,
    RepositoryBusy,
    RepositoryFull,
    SourceLayer,
)
from hostagent.backup.repo.manifest_stream import ManifestHeader
from hostagent.backup.repo.repository import BackupSession, GcResult, Repository, VerifyReport
from hostagent.backup.repo.restore import RestoreResult, restore
from hostagent.backup.repo.retention import PruneResult, RetentionPolicy, prune

__all__ = [
    "BackupCancelled",
    "BackupError",
    "BackupNotFound",
    "BackupResult",
    "BackupSession",
    "Checkpoint",
    "CorruptChunk",
    "FormatError",
    "GcResult",
    "Manifest",
    "ManifestExtent",
    "ManifestHeader",
    "MissingChunk",
    "PruneResult",
    "RepoConfig",
    "Repository",
    "RepositoryBusy",
    "RepositoryFull",
    "RestoreResult",
    "RetentionPolicy",
    "SourceLayer",
    "VerifyReport",
    "backup_full",
    "backup_incremental",
    "prune",
    "restore",
]
