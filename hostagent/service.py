"""The agent's :class:`AgentService`: assisted create/delete, journaled and run per disk.

A request is validated against the disk's REAL chain (live XML + qcow2 inspection of every
file) while the caller waits, so a bad name fails with a typed error and nothing is touched
or journaled. Accepted requests are journaled (idempotency key = snapshot id) and answered
at once; a worker re-validates (the chain may have moved while queued) and journals every
step before taking it. Merged files are never deleted here: Cinder deletes them itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from hostagent.backup.checkpoints import Release, cinder_chain, release_step
from hostagent.backup.service import BackupEngine, BackupService, BackupSettings
from hostagent.cinder.outbox import NotifyQueue
from hostagent.cinder.status import Report
from hostagent.hypervisor import DiskLocks, Hypervisor, Located
from hostagent.journal import model as ops
from hostagent.journal import store as jn
from hostagent.journal.crash import crash_point
from hostagent.pool import KeyedPool
from hostagent.rpc import contract as api
from hostagent.snapshots.owned import OwnedOps
from qcow2 import CINDER, Qcow2Error, inspect_chain
from qcow2.naming import volume_base_name

__all__ = ["AssistedService", "Hypervisor", "Located"]

LOG = logging.getLogger(__name__)


_KINDS = {
    ops.OperationKind.ASSISTED_CREATE: api.OperationKind.CREATE_ASSISTED,
    ops.OperationKind.ASSISTED_DELETE: api.OperationKind.DELETE_ASSISTED,
    ops.OperationKind.INSTANCE_SNAPSHOT: api.OperationKind.INSTANCE_SNAPSHOT,
    ops.OperationKind.OWNED_DELETE: api.OperationKind.DELETE_OWNED,
    ops.OperationKind.BACKUP: api.OperationKind.BACKUP,
    ops.OperationKind.RESTORE: api.OperationKind.RESTORE,
}
_STATES = {
    ops.OperationState.PENDING: api.OperationState.QUEUED,
    ops.OperationState.RUNNING: api.OperationState.RUNNING,
    ops.OperationState.SUCCEEDED: api.OperationState.SUCCEEDED,
    ops.OperationState.FAILED: api.OperationState.FAILED,
    ops.OperationState.CANCELLED: api.OperationState.CANCELLED,
}


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


class AssistedService:
    """:class:`hostagent.rpc.contract.AgentService` over a journal, a pool and a hypervisor."""

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
    ) -> None:
        self._journal = journal
        self._hv = hypervisor
        self._notify = notify
        self._pool = pool
        self._roots = roots
        self._locks = DiskLocks()
        #: RPC 1.2 backups; None (no engine) refuses them.
        self.backups: BackupService | None = None
        if backup_engine is not None and backup_settings is not None:
            self.backups = BackupService(
                journal, hypervisor, pool, self._locks, backup_engine, backup_settings, roots=roots
            )
        self._release = backup_engine.release if backup_engine is not None else None
        #: Instance snapshots and owned deletes (also resumed by recovery after a crash).
        self.owned = OwnedOps(
            journal, hypervisor, notify, pool, self._locks, roots=roots, step=self._step
        )
        self.owned.instances.release = self.owned.deletes.release = self._release

    @property
    def checkpoint_release(self) -> Release | None:
        """Merges a backup checkpoint down (recovery re-runs deletes after it); None without
        a backup engine."""
        return self._release

    # -- validation (touches nothing) -----------------------------------------------------
    def _chain_names(self, where: Located) -> list[str]:
        """The chain as Cinder knows it: a backup checkpoint on top (released first) left out."""
        return cinder_chain(where, self._roots, releasable=self._release is not None)

    def _validate_create(self, req: api.CreateSnapshotRequest) -> tuple[Located, dict[str, Any]]:
        where = self._hv.locate(req.volume_id)
        names = self._chain_names(where)
        if not req.new_file.startswith(volume_base_name(req.volume_id) + "."):
            raise api.InvalidRequest(f"new_file {req.new_file!r} is not a file of this volume")
        if req.new_file in names:
            raise api.InvalidRequest(f"new_file {req.new_file!r} is already in the chain")
        path = os.path.join(os.path.dirname(where.disk.source), req.new_file)
        if os.path.islink(path) or not os.path.isfile(path):
            raise api.InvalidRequest(f"{path} was not pre-created as a regular file")
        try:
            with inspect_chain(path, roots=self._roots, naming=CINDER, fmt="qcow2") as c:
                top = c.layers[0]
        except Qcow2Error as exc:
            raise api.InvalidRequest(f"new_file {req.new_file!r} refused: {exc}") from exc
        if top.backing_name != names[0] or top.backing_fmt != where.disk.fmt:
            raise api.InvalidRequest(
                f"new_file backs onto {top.backing_name!r}, not the active file {names[0]!r}"
            )
        return where, {"disk": where.key, "active": where.disk.source, "new_path": path}

    def _validate_delete(self, req: api.DeleteSnapshotRequest) -> tuple[Located, dict[str, Any]]:
        where = self._hv.locate(req.volume_id)
        names = self._chain_names(where)

        def pos(name: str) -> int:
            if name not in names:
                raise api.InvalidRequest(f"{name!r} is not in the chain {names}")
            return names.index(name)

        if req.merge_target_file is None:  # pull into the active file (Cinder's data stays)
            if req.file_to_merge is None:
                if len(names) < 2:
                    raise api.InvalidRequest("nothing to flatten: the disk has one file")
                mode = "flatten"
            else:
                if pos(req.file_to_merge) < 2:
                    raise api.InvalidRequest(f"nothing to pull above {req.file_to_merge!r}")
                mode = "pull"
        else:
            assert req.file_to_merge is not None
            top = pos(req.file_to_merge)
            if top < 1:
                raise api.InvalidRequest(f"{req.file_to_merge!r} is the active file")
            if pos(req.merge_target_file) <= top:
                raise api.InvalidRequest("merge_target_file is not below file_to_merge")
            mode = "commit"
        return where, {"disk": where.key, "mode": mode, "chain": names}

    # -- AgentService ---------------------------------------------------------------------
    def _accept(
        self,
        kind: ops.OperationKind,
        req: api.CreateSnapshotRequest | api.DeleteSnapshotRequest,
        key: str,
        validate: Any,
        run: Any,
    ) -> api.Operation:
        request = {"kind": kind.value, **asdict(req)}
        locks = [f"volume:{req.volume_id}"]
        try:
            if self._journal.find(kind, key) is None:
                where, _plan = validate(req)  # raises: nothing journaled, nothing touched
            else:
                where = None  # a retry: answer with the first operation, whatever its state
            begun = self._journal.begin(kind, request, key, locks)
        except jn.IdempotencyConflict as exc:
            raise api.InvalidRequest(f"snapshot id reused with another request: {exc}") from exc
        if begun.created:
            assert where is not None
            op_id, key = begun.operation.id, where.key

            def job() -> None:
                with self._locks.hold([key]):  # instance snapshots hold several disks
                    run(op_id, req)

            self._pool.submit(key, job)
        return self._to_api(begun.operation)

    def create_assisted_snapshot(
        self, ctxt: api.CallContext, req: api.CreateSnapshotRequest
    ) -> api.Operation:
        return self._accept(
            ops.OperationKind.ASSISTED_CREATE,
            req,
            req.snapshot_id,
            self._validate_create,
            self._run_create,
        )

    def delete_assisted_snapshot(
        self, ctxt: api.CallContext, req: api.DeleteSnapshotRequest
    ) -> api.Operation:
        return self._accept(
            ops.OperationKind.ASSISTED_DELETE,
            req,
            req.snapshot_id + ":delete",
            self._validate_delete,
            self._run_delete,
        )

    def snapshot_instance(
        self, ctxt: api.CallContext, req: api.InstanceSnapshotRequest
    ) -> api.Operation:
        return self._to_api(self.owned.snapshot_instance(req))

    def delete_snapshot(
        self, ctxt: api.CallContext, req: api.DeleteOwnedSnapshotRequest
    ) -> api.Operation:
        return self._to_api(self.owned.delete_snapshot(req))

    def get_operation(self, ctxt: api.CallContext, op_id: str) -> api.Operation:
        try:
            return self._to_api(self._journal.get(uuid.UUID(str(op_id))))
        except (ValueError, jn.UnknownOperation):
            raise api.OperationNotFound(f"no operation {op_id}") from None

    def list_operations(
        self, ctxt: api.CallContext, filters: api.OperationFilters
    ) -> list[api.Operation]:
        kinds = {v: k for k, v in _KINDS.items()}
        states = None
        if filters.state is not None:
            states = [s for s, w in _STATES.items() if w is filters.state]
        found = self._journal.list_operations(
            kind=kinds[filters.kind] if filters.kind else None,
            states=states,
            lock=f"volume:{filters.volume_id}" if filters.volume_id else None,
            limit=filters.limit,
        )
        return [self._to_api(op) for op in found]

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
        try:
            oid = uuid.UUID(str(op_id))
            op = self._journal.get(oid)
            if _KINDS[op.kind] not in (api.OperationKind.BACKUP, api.OperationKind.RESTORE):
                raise api.NotCancellable(
                    f"operation {op_id} is a {_KINDS[op.kind].value} operation: snapshot "
                    "operations run to completion or roll back; they are not cancellable"
                )
            if self.backups is None:
                raise api.NotCancellable(
                    f"operation {op_id} is a {op.kind.value} operation: only backup "
                    "operations are cancellable and backups are not configured here"
                )
            return self._to_api(self.backups.cancel_operation(oid))
        except (ValueError, jn.UnknownOperation):
            raise api.OperationNotFound(f"no operation {op_id}") from None

    def start_prune(self, ctxt: api.CallContext, req: api.PruneBackupsRequest) -> api.Operation:
        return self._to_api(self._bk().start_prune(req))

    # -- workers --------------------------------------------------------------------------
    @contextlib.contextmanager
    def _step(
        self, op_id: uuid.UUID, name: str, data: dict[str, Any] | None = None
    ) -> Iterator[jn.StepHandle]:
        """``Journal.step`` plus the test-only crash points right after each journal write."""
        with self._journal.step(op_id, name, data) as handle:
            crash_point(name, "planned")
            yield handle
        crash_point(name, "done")

    def _release_checkpoint(self, op_id: uuid.UUID, volume_id: str) -> None:
        """A backup checkpoint above Cinder's active file is merged down first (journaled),
        so the new_file/delete_info Cinder computed from its ledger holds again."""
        release_step(self._step, op_id, self._hv.locate(volume_id), self._release)

    def _report(self, op_id: uuid.UUID, snapshot_id: str, report: Report) -> None:
        with self._step(op_id, "notify", {"report": report.name}) as step:
            step.data["delivered"] = self._notify.send(snapshot_id, report, op_id)

    def _run_create(self, op_id: uuid.UUID, req: api.CreateSnapshotRequest) -> None:
        j = self._journal
        try:
            self._release_checkpoint(op_id, req.volume_id)
            with self._step(op_id, "validate") as step:
                where, plan = self._validate_create(req)
                step.data.update(plan)
            with self._step(op_id, "snapshot", {"new_file": req.new_file}) as step:
                step.data.update(self._hv.snapshot(where, req.new_file))
        except Exception as exc:
            LOG.warning("create %s of volume %s failed: %s", req.snapshot_id, req.volume_id, exc)
            self._report(op_id, req.snapshot_id, Report.CREATE_FAILED)
            j.finish(op_id, ops.OperationState.FAILED, error=exc)
            return
        self._report(op_id, req.snapshot_id, Report.CREATE_DONE)
        j.finish(op_id, ops.OperationState.SUCCEEDED, result={"active": plan["new_path"]})

    def _run_delete(self, op_id: uuid.UUID, req: api.DeleteSnapshotRequest) -> None:
        j = self._journal

        def progress(cur: int, end: int) -> None:
            try:
                j.set_progress(op_id, cur, end)
            except jn.JournalError:  # progress is advisory; never fail the merge for it
                LOG.debug("progress of %s not journaled", op_id, exc_info=True)

        try:
            self._release_checkpoint(op_id, req.volume_id)
            with self._step(op_id, "validate") as step:
                where, plan = self._validate_delete(req)
                step.data.update(plan)
            data = {"file_to_merge": req.file_to_merge, "target": req.merge_target_file}
            with self._step(op_id, "merge", data) as step:
                result = self._hv.merge(where, req.file_to_merge, req.merge_target_file, progress)
                step.data.update(result)
        except Exception as exc:
            LOG.warning("delete %s of volume %s failed: %s", req.snapshot_id, req.volume_id, exc)
            self._report(op_id, req.snapshot_id, Report.DELETE_FAILED)
            j.finish(op_id, ops.OperationState.FAILED, error=exc)
            return
        self._report(op_id, req.snapshot_id, Report.DELETE_DONE)
        j.finish(op_id, ops.OperationState.SUCCEEDED, result=result)

    # -- model mapping ----------------------------------------------------------------------
    def _to_api(self, op: ops.Operation) -> api.Operation:
        steps = [
            {"name": s.name, "state": s.state.value, "data": s.data}
            for s in self._journal.steps(op.id)
        ]
        result: dict[str, Any] = dict(op.result or {})
        result["steps"] = steps
        result["progress"] = {"cur": op.progress.cur, "end": op.progress.end}
        vols = tuple(k.split(":", 1)[1] for k in op.locks if k.startswith("volume:"))
        return api.Operation(
            id=str(op.id),
            kind=_KINDS[op.kind],
            state=_STATES[op.state],
            host=op.host,
            volume_ids=vols,
            snapshot_id=op.request.get("snapshot_id"),
            instance_uuid=op.request.get("instance_uuid"),
            created_at=_iso(op.created_at),
            updated_at=_iso(op.updated_at),
            error=None
            if op.error is None
            else {"code": op.error.type, "message": op.error.message},
            result=result,
        )
