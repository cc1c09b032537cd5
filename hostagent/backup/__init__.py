"""hostagent.backup: the chunked backup repository and the offline engine core.

Public face: the repository (on-disk format in :mod:`hostagent.backup.format`), full and
incremental backups of a frozen layer's guest view, restore, and the error types. The
online orchestration (quiesced snapshot, checkpoint overlay, merge back) calls these.
"""

from hostagent.backup._restore import RestoreResult, restore
from hostagent.backup.engine import BackupResult, backup_full, backup_incremental
from hostagent.backup.format import (
    BackupCancelled,
    BackupError,
    BackupNotFound,
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
from hostagent.backup.repository import BackupSession, GcResult, Repository, VerifyReport

__all__ = [
    "BackupCancelled",
    "BackupError",
    "BackupNotFound",
    "BackupResult",
    "BackupSession",
    "CorruptChunk",
    "FormatError",
    "GcResult",
    "Manifest",
    "ManifestExtent",
    "MissingChunk",
    "RepoConfig",
    "Repository",
    "RepositoryBusy",
    "RepositoryFull",
    "RestoreResult",
    "SourceLayer",
    "VerifyReport",
    "backup_full",
    "backup_incremental",
    "restore",
]
