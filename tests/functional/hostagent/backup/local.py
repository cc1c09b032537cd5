"""The agent's backup pieces assembled in the test's own process, as ``hostagent/agent.py``
and ``hostagent/service.py`` assemble them (no RPC, no Cinder: ``NoCinder``).

An online backup's checkpoint is an owned snapshot (an instance snapshot operation) and its
drops are owned deletes, so calling :func:`hostagent.backup.online.backup_volume` needs the
hypervisor, the journal, the pool, the per-disk locks and :class:`OwnedOps` wired exactly
as the agent wires them; building that here keeps the functional modules (and the kill -9
runner process) from growing their own diverging copies.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence

import libvirt_ops as lo
from hostagent.backup.online import (
    BackupRequest,
    OnlineBackupResult,
    backup_volume,
    recover_backup,
)
from hostagent.backup.repo.format import Progress
from hostagent.cinder.outbox import NoCinder, NotifyQueue
from hostagent.hypervisor import DiskLocks
from hostagent.journal import model as ops
from hostagent.journal.store import Journal
from hostagent.libvirt_hypervisor import LibvirtHypervisor
from hostagent.pool import KeyedPool
from hostagent.rpc import contract as api
from hostagent.snapshots.backup_checkpoints import OwnedCheckpoints
from hostagent.snapshots.owned import OwnedOps

#: Bounds one block job of an owned delete (the agent's ``merge_timeout``).
JOB_TIMEOUT = 120.0


class LocalBackups:
    """One agent's backup path over ``conn`` and the journal at ``journal_path``."""

    def __init__(self, conn: lo.Connection, journal_path: str, roots: Sequence[str]) -> None:
        self.roots = [str(r) for r in roots]
        self.journal = Journal(journal_path)
        self.hv = LibvirtHypervisor(
            conn, "bk-local", roots=self.roots, freeze=10.0, merge=JOB_TIMEOUT
        )
        self.pool = KeyedPool(1)
        self.locks = DiskLocks()
        queue = NotifyQueue(self.journal, NoCinder())
        self.owned = OwnedOps(
            self.journal, self.hv, queue, self.pool, self.locks,
            roots=self.roots, step=self.journal.step,
        )  # fmt: skip
        self.checkpoints = OwnedCheckpoints(self.owned)

    def backup(self, req: BackupRequest, progress: Progress | None = None) -> OnlineBackupResult:
        """One volume's backup under its disk lock, as the agent's pool runs it."""
        key = self.hv.locate(req.volume_id).key
        with self.locks.hold([key]):
            return backup_volume(
                self.hv, self.journal, req, self.checkpoints, roots=self.roots, progress=progress
            )

    def delete(self, volume_id: str, snapshot_id: str) -> ops.Operation:
        """A user's delete of an owned snapshot (RPC ``delete_snapshot``), run to its end."""
        op = self.owned.delete_snapshot(api.DeleteOwnedSnapshotRequest(volume_id, snapshot_id))
        return self.wait(op.id)

    def wait(self, op_id: uuid.UUID, timeout: float = 300.0) -> ops.Operation:
        """The operation once final (the pool runs it); bounded, not a timing assertion."""
        deadline = time.monotonic() + timeout
        op = self.journal.get(op_id)
        while not op.state.is_final:
            if time.monotonic() > deadline:
                raise TimeoutError(f"operation {op_id} still {op.state}")
            time.sleep(0.2)
            op = self.journal.get(op_id)
        return op

    def recover(self) -> list[str]:
        """What the agent's start does for these kinds: a volume's backup is decided by
        :func:`recover_backup` (never touching a chain); the owned operations (checkpoint
        take, drops) resume themselves with their own step code."""
        decisions = []
        for rec in self.journal.unfinished():
            kind = rec.operation.kind
            if kind is ops.OperationKind.BACKUP:
                decisions.append(recover_backup(self.journal, rec))
            elif kind in OwnedOps.KINDS:
                decisions.append(self.owned.resume(rec, JOB_TIMEOUT))
        return decisions

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.journal.close()
