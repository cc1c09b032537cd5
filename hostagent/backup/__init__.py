"""hostagent.backup: the chunked backup repository, the engine, online orchestration.

Public face: the repository (on-disk format in :mod:`hostagent.backup.format`), full and
incremental backups of a frozen layer's guest view, restore, online backups of attached
volumes (:func:`backup_volume`: quiesced snapshot, checkpoint overlay, merge back, all
journaled; :func:`recover_backup` for crash recovery), retention (:func:`prune`), errors.
"""

from hostagent.backup._restore import RestoreResult, restore
from hostagent.backup.engine import BackupResult, backup_full, backup_incremental
from hostagent.backup.format import (
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
from hostagent.backup.online import (
    BACKUP_NAMING,
    BackupRequest,
    ChainChanged,
    OnlineBackupResult,
    VolumeBusy,
    backup_volume,
    recover_backup,
    release_checkpoint,
    release_checkpoint_offline,
)
from hostagent.backup.repository import BackupSession, GcResult, Repository, VerifyReport
from hostagent.backup.retention import PruneResult, RetentionPolicy, prune

__all__ = [
    "BACKUP_NAMING",
    "BackupCancelled",
    "BackupError",
    "BackupNotFound",
    "BackupRequest",
    "BackupResult",
    "BackupSession",
    "ChainChanged",
    "Checkpoint",
    "CorruptChunk",
    "FormatError",
    "GcResult",
    "Manifest",
    "ManifestExtent",
    "MissingChunk",
    "OnlineBackupResult",
    "PruneResult",
    "RepoConfig",
    "Repository",
    "RepositoryBusy",
    "RepositoryFull",
    "RestoreResult",
    "RetentionPolicy",
    "SourceLayer",
    "VerifyReport",
    "VolumeBusy",
    "backup_full",
    "backup_incremental",
    "backup_volume",
    "prune",
    "recover_backup",
    "release_checkpoint",
    "release_checkpoint_offline",
    "restore",
]
