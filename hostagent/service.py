"""The agent's :class:`hostagent.rpc.agent_service.AgentService`: the RPC verbs, by concept.

Each verb delegates to the concept that runs it and resumes it after a crash:
assisted snapshots (:mod:`hostagent.snapshots.assisted`), instance snapshots and owned
deletes (:mod:`hostagent.snapshots.owned`), backups (:mod:`hostagent.backup.service`).
:meth:`AssistedService.resumers` hands recovery each kind's resume.
"""

from __future__ import annotations

import functools
import logging
import uuid
from typing import Any

from hostagent.backup import service as backup_service
from hostagent.backup.service import BackupEngine, BackupService, BackupSettings, RecoverVolume
from hostagent.cinder.outbox import NotifyQueue
from hostagent.hypervisor import DiskLocks, Hypervisor, Located
from hostagent.journal import model as ops
from hostagent.journal import store as jn
from hostagent.journal.crash import crash_pointed
from hostagent.nova_records import NovaRecords
from hostagent.pool import KeyedPool
from hostagent.recovery import Resume
from hostagent.rpc import contract as api
from hostagent.rpc.wire_errors import Rule, wire_errors
from hostagent.snapshots.assisted import AssistedSnapshots
from hostagent.snapshots.assisted_rules import Deadlines
from hostagent.snapshots.backup_checkpoints import OwnedCheckpoints
from hostagent.snapshots.owned import OwnedOps

__all__ = ["AssistedService", "Hypervisor", "Located"]

LOG = logging.getLogger(__name__)


def _unknown(op_id: str) -> Rule:
    """An id that is no uuid, or no operation of this agent's journal."""
    return Rule(
        (ValueError, jn.UnknownOperation), api.OperationNotFound, lambda _: f"no operation {op_id}"
    )


class AssistedService:
    """:class:`hostagent.rpc.agent_service.AgentService` over a journal, a pool and a hypervisor."""

    def __init__(
        self,
        journal: jn.Journal,
        hypervisor: Hypervisor,
        notify: NotifyQueue,
        pool: KeyedPool,
        *,
        roots: list[str],
        backup_engine: BackupEngine | None = None,
        backup_settings: BackupSettings | None = None,
        cinder_pool: KeyedPool | None = None,
        deadlines: Deadlines | None = None,
        nova: NovaRecords | None = None,
    ) -> None:
        """``cinder_pool``: the capacity of Cinder-driven creates and deletes, apart from
        ``pool`` (backups, verifies, restores, prunes, instance snapshots, owned deletes) so
        a queue there cannot hold them past Cinder's wait (None: they share ``pool``).
        ``deadlines``: when Cinder stops waiting for them. ``nova``: Nova's side, checked
        before and refreshed after the chain changes the agent makes by itself."""
        self._journal = journal
        self._hv = hypervisor
        self._pool = pool
        locks = DiskLocks()  # one set for every operation: an instance snapshot spans disks
        #: RPC 1.2 backups; None (no engine) refuses them.
        self.backups: BackupService | None = None
        if backup_engine is not None and backup_settings is not None:
            self.backups = BackupService(
                journal, hypervisor, pool, locks, backup_engine, backup_settings, roots=roots
            )
        step = crash_pointed(journal)
        args = (journal, hypervisor, notify, pool, locks)
        #: Cinder-assisted create/delete (Nova's os-assisted-volume-snapshots).
        self.assisted = AssistedSnapshots(
            journal, hypervisor, notify, cinder_pool or pool, locks,
            roots=roots, step=step, deadlines=deadlines,
        )  # fmt: skip
        #: Instance snapshots and owned deletes.
        self.owned = OwnedOps(*args, roots=roots, step=step, nova=nova)
        if backup_engine is not None:  # a backup's checkpoints are owned snapshots
            backup_engine.bind(OwnedCheckpoints(self.owned), step)

    def resumers(
        self, *, job_timeout: float, recover_volume: RecoverVolume | None = None
    ) -> dict[ops.OperationKind, Resume]:
        """Each operation kind's resume, for :func:`hostagent.recovery.reconcile`.

        ``job_timeout`` bounds settling a block job a dead agent left; ``recover_volume``
        puts one volume's interrupted online backup back (without it such backups stay
        unfinished for the next start).
        """
        out: dict[ops.OperationKind, Resume] = {}
        for kind in AssistedSnapshots.KINDS:
            out[kind] = functools.partial(self.assisted.resume, job_timeout=job_timeout)
        for kind in OwnedOps.KINDS:
            out[kind] = functools.partial(self.owned.resume_later, job_timeout=job_timeout)
        for kind in BackupService.KINDS:
            out[kind] = functools.partial(
                backup_service.resume, self._journal, recover_volume=recover_volume
            )
        return out

    # -- AgentService ---------------------------------------------------------------------
    def create_assisted_snapshot(
        self, ctxt: api.CallContext, req: api.CreateSnapshotRequest
    ) -> api.Operation:
        return self._to_api(self.assisted.create(req))

    def delete_assisted_snapshot(
        self, ctxt: api.CallContext, req: api.DeleteSnapshotRequest
    ) -> api.Operation:
        return self._to_api(self.assisted.delete(req))

    def snapshot_instance(
        self, ctxt: api.CallContext, req: api.InstanceSnapshotRequest
    ) -> api.Operation:
        return self._to_api(self.owned.snapshot_instance(req))

    def delete_snapshot(
        self, ctxt: api.CallContext, req: api.DeleteOwnedSnapshotRequest
    ) -> api.Operation:
        return self._to_api(self.owned.delete_snapshot(req))

    def get_operation(self, ctxt: api.CallContext, op_id: str) -> api.Operation:
        with wire_errors(_unknown(op_id), chain=False):
            return self._to_api(self._journal.get(uuid.UUID(str(op_id))))

    def list_operations(
        self, ctxt: api.CallContext, filters: api.OperationFilters
    ) -> list[api.Operation]:
        found = self._journal.list_operations(
            kind=filters.kind.journal_kind() if filters.kind else None,
            states=filters.state.journal_states() if filters.state is not None else None,
            lock=f"volume:{filters.volume_id}" if filters.volume_id else None,
            limit=filters.limit,
            newest_first=True,  # RPC 1.4: the newest ``limit`` matches, newest first
        )
        steps = self._journal.steps_of(op.id for op in found)  # one read, not one per op
        return [api.Operation.of(op, steps.get(op.id, ())) for op in found]

    def get_inventory(self, ctxt: api.CallContext) -> api.Inventory:
        return self._hv.inventory()

    # -- RPC 1.2: backups -------------------------------------------------------------------
    def _bk(self) -> BackupService:
        if self.backups is None:
            raise api.InvalidRequest("backups are not configured on this agent")
        return self.backups

    def create_backup(self, ctxt: api.CallContext, req: api.CreateBackupRequest) -> api.Operation:
        return self._to_api(self._bk().create_backup(req))

    def list_backups(self, ctxt: api.CallContext, volume_id: str | None) -> list[dict[str, Any]]:
        return self._bk().list_backups(volume_id)

    def get_backup(self, ctxt: api.CallContext, backup_id: str) -> dict[str, Any]:
        return self._bk().get_backup(backup_id)

    def verify_backup(self, ctxt: api.CallContext, backup_id: str) -> api.Operation:
        return self._to_api(self._bk().verify_backup(backup_id))

    def delete_backup(self, ctxt: api.CallContext, backup_id: str) -> None:
        self._bk().delete_backup(backup_id)

    def restore_backup(self, ctxt: api.CallContext, req: api.RestoreBackupRequest) -> api.Operation:
        return self._to_api(self._bk().restore_backup(req))

    def prune_backups(self, ctxt: api.CallContext, req: api.PruneBackupsRequest) -> dict[str, Any]:
        return self._bk().prune_backups(req)

    # -- RPC 1.3 --------------------------------------------------------------------------
    def cancel_operation(self, ctxt: api.CallContext, op_id: str) -> api.Operation:
        with wire_errors(_unknown(op_id), chain=False):
            oid = uuid.UUID(str(op_id))
            op = self._journal.get(oid)
            wire_kind = api.OperationKind.of(op.kind)
            if wire_kind not in (api.OperationKind.BACKUP, api.OperationKind.RESTORE):
                raise api.NotCancellable(
                    f"operation {op_id} is a {wire_kind.value} operation: snapshot "
                    "operations run to completion or roll back; they are not cancellable"
                )
            if self.backups is None:
                raise api.NotCancellable(
                    f"operation {op_id} is a {op.kind.value} operation: only backup "
                    "operations are cancellable and backups are not configured here"
                )
            return self._to_api(self.backups.cancel_operation(oid))

    def start_prune(self, ctxt: api.CallContext, req: api.PruneBackupsRequest) -> api.Operation:
        return self._to_api(self._bk().start_prune(req))

    # -- model mapping ----------------------------------------------------------------------
    def _to_api(self, op: ops.Operation) -> api.Operation:
        return api.Operation.of(op, self._journal.steps(op.id))
