"""A backup's checkpoints as the agent's own snapshots: :class:`OwnedCheckpoints`.

A checkpoint is taken by the instance snapshot path and deleted by the owned delete path,
so it reaches the ledger, Cinder's record, attachment and format, and Nova's BDM exactly as
an instance snapshot does; each is its own journaled operation, resumed after a crash by
:class:`hostagent.snapshots.owned.OwnedOps`. Run in the backup's thread, which already
holds the disk's lock (the pool and the locks are not taken again).
"""

from __future__ import annotations

from hostagent.backup.online import CheckpointFailed
from hostagent.hypervisor import Located
from hostagent.journal import model as ops
from hostagent.rpc import contract as api
from hostagent.snapshots.owned import OwnedOps
from qcow2.naming import snapshot_file_name


def _failed(what: str, op: ops.Operation) -> CheckpointFailed:
    err = op.error.message if op.error is not None else op.state.value
    return CheckpointFailed(f"{what} (operation {op.id}) {op.state.value}: {err}")


class OwnedCheckpoints:
    """:class:`hostagent.backup.online.CheckpointOps` over the owned snapshot paths."""

    def __init__(self, owned: OwnedOps) -> None:
        self._owned = owned

    def take(self, where: Located, snapshot_id: str, label: str, why: str) -> str:
        op = self._owned.instances.take_held(where, snapshot_id, label, why)
        if op.state is not ops.OperationState.SUCCEEDED:
            raise _failed(f"checkpoint {snapshot_id}", op)
        return snapshot_file_name(str(where.disk.serial).lower(), snapshot_id)

    def drop(self, volume_id: str, snapshot_id: str, why: str) -> None:
        req = api.DeleteOwnedSnapshotRequest(volume_id, snapshot_id)
        op = self._owned.deletes.delete_held(req, why)
        if op.state is not ops.OperationState.SUCCEEDED:
            raise _failed(f"delete of checkpoint {snapshot_id}", op)
