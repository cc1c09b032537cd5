"""The agent's error root: every exception class defined in :mod:`hostagent` derives from it.

One root lets a caller (a CLI, a test, a supervisor) tell "the agent refused or failed" from
a bug in a library below it, with one ``except``. Specific errors live beside the code that
raises them; this module stays stdlib-only so the pure layers (the journal model, the backup
repository, the wire contract ``api_ext`` imports) can derive from it without loading more.

The hierarchy::

    QsnapAgentError
     +-- AgentRpcError                 hostagent.rpc.contract: sent on the wire (message only)
     |    +-- InvalidRequest, VolumeNotFound, InstanceNotFound, OperationNotFound,
     |    |   DiskBusy, SnapshotNotFound, BackupNotFound, NotCancellable
     |    +-- AgentInternalError       anything unexpected, as the endpoint reports it
     +-- JournalError                  hostagent.journal.errors
     |    +-- UnknownOperation, InvalidTransition, IdempotencyConflict
     +-- SchemaError                   hostagent.journal.schema: a journal this agent cannot use
     +-- NotifyError                   hostagent.cinder.status: a status report that did not land
     |    +-- NotifyRejected, NotifyUnreachable
     +-- CallRejected, CallUnreachable hostagent.cinder.status: one Cinder call, after retries
     +-- MetaError                     hostagent.cinder.records: a snapshot record call
     +-- BackupError                   hostagent.backup.repo.format
     |    +-- FormatError, CorruptChunk (+ MissingChunk), RepositoryFull, RepositoryBusy,
     |    |   BackupNotFound, BackupCancelled
     |    +-- ChainChanged, VolumeBusy, CheckpointFailed  hostagent.backup.online

Lower layers keep their own roots (``libvirt_ops.LibvirtOpsError``, ``qcow2.Qcow2Error``);
:mod:`hostagent.rpc.wire_errors` is the one place where they become wire errors.
"""

from __future__ import annotations

__all__ = ["QsnapAgentError"]


class QsnapAgentError(Exception):
    """Base of every error the agent defines (wire errors included)."""
