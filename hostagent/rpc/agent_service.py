"""What the agent does behind its RPC endpoint: the :class:`AgentService` protocol.

Apart from :mod:`.contract` (the wire types) so the contract stays readable; the endpoint
(:mod:`.server`) validates with the contract and delegates to an implementation of this.
"""

from __future__ import annotations

from typing import Any, Protocol

from hostagent.rpc.contract import (
    CallContext,
    CreateBackupRequest,
    CreateSnapshotRequest,
    DeleteOwnedSnapshotRequest,
    DeleteSnapshotRequest,
    InstanceSnapshotRequest,
    Inventory,
    Operation,
    OperationFilters,
    PruneBackupsRequest,
    RestoreBackupRequest,
)


class AgentService(Protocol):
    """What the agent does; the RPC endpoint validates and delegates to it.

    Long operations return their ``Operation`` at once (state queued/running) and run in the
    worker pool. Implementations raise ``AgentRpcError`` subclasses (or libvirt_ops/qcow2
    errors, which the endpoint maps) for requests that must touch nothing.
    """

    def create_assisted_snapshot(
        self, ctxt: CallContext, req: CreateSnapshotRequest
    ) -> Operation: ...

    def delete_assisted_snapshot(
        self, ctxt: CallContext, req: DeleteSnapshotRequest
    ) -> Operation: ...

    def snapshot_instance(self, ctxt: CallContext, req: InstanceSnapshotRequest) -> Operation: ...

    def delete_snapshot(self, ctxt: CallContext, req: DeleteOwnedSnapshotRequest) -> Operation:
        """RPC 1.1: merge away a snapshot the agent owns (ledger + Cinder record follow)."""
        ...

    def get_operation(self, ctxt: CallContext, op_id: str) -> Operation: ...

    def list_operations(self, ctxt: CallContext, filters: OperationFilters) -> list[Operation]: ...

    def get_inventory(self, ctxt: CallContext) -> Inventory: ...

    # -- RPC 1.2: backups -----------------------------------------------------------------
    def create_backup(self, ctxt: CallContext, req: CreateBackupRequest) -> Operation: ...

    def list_backups(self, ctxt: CallContext, volume_id: str | None) -> list[dict[str, Any]]: ...

    def get_backup(self, ctxt: CallContext, backup_id: str) -> dict[str, Any]: ...

    def verify_backup(self, ctxt: CallContext, backup_id: str) -> Operation: ...

    def delete_backup(self, ctxt: CallContext, backup_id: str) -> None: ...

    def restore_backup(self, ctxt: CallContext, req: RestoreBackupRequest) -> Operation: ...

    def prune_backups(self, ctxt: CallContext, req: PruneBackupsRequest) -> dict[str, Any]: ...

    # -- RPC 1.3: cancel, prune as an operation -------------------------------------------
    def cancel_operation(self, ctxt: CallContext, op_id: str) -> Operation:
        """Ask a running backup/verify/prune/restore to stop; the operation as it is now.

        Raises OperationNotFound, or NotCancellable for a finished operation or one of a
        kind that is never cancelled (snapshots). Cancelling twice is harmless.
        """
        ...

    def start_prune(self, ctxt: CallContext, req: PruneBackupsRequest) -> Operation: ...
