"""Snapshots the agent takes and deletes ITSELF: instance snapshots and their deletion.

Unlike the assisted path (Cinder drives, Cinder owns the ``.info`` ledger and its files),
here the agent owns everything: it picks the snapshot uuids, creates the overlays, takes
ONE atomic snapshot of all the listed disks, writes the ledger exactly as Cinder's remotefs
driver would (so Cinder can later delete these snapshots the normal way) and keeps Cinder's
records through qsnap's Cinder extension. Every step is journaled before it is taken, and
:meth:`OwnedOps.resume` continues or undoes an operation from its journaled steps and the
live chain after a crash, so a fresh run and a recovered one share the same step code.

Instance snapshot steps: plan, cinder_create, overlays, snapshot, ledger, cinder_finalize
(failure: cleanup, cinder_finalize error), then nova_refresh on a Nova guest. Owned delete
steps: validate, merge, ledger, remove, cinder_delete, nova_refresh on a Nova guest.
"""

from __future__ import annotations

import logging

from hostagent.cinder.outbox import NotifyQueue
from hostagent.hypervisor import DiskLocks, Hypervisor
from hostagent.journal import model as ops
from hostagent.journal import store as jn
from hostagent.journal.crash import StepFn
from hostagent.journal.model import StepName
from hostagent.nova_records import NovaRecords
from hostagent.pool import KeyedPool
from hostagent.rpc import contract as api
from hostagent.snapshots.instance import InstanceSnapshots
from hostagent.snapshots.owned_delete import OwnedDeletes

LOG = logging.getLogger(__name__)


class OwnedOps:
    """Instance snapshots and owned deletes over the service's journal, pool and hypervisor."""

    #: The operation kinds this class runs and resumes (recovery's registry keys).
    KINDS = (ops.OperationKind.INSTANCE_SNAPSHOT, ops.OperationKind.OWNED_DELETE)

    def __init__(
        self,
        journal: jn.Journal,
        hv: Hypervisor,
        queue: NotifyQueue,
        pool: KeyedPool,
        locks: DiskLocks,
        *,
        roots: list[str],
        step: StepFn,
        nova: NovaRecords | None = None,
    ) -> None:
        self._j, self._locks, self._hv, self._roots = journal, locks, hv, roots
        self._pool = pool
        parts = (journal, hv, queue, pool, locks)
        self.instances = InstanceSnapshots(*parts, roots=roots, step=step, nova=nova)
        self.deletes = OwnedDeletes(*parts, roots=roots, step=step, nova=nova)

    def snapshot_instance(self, req: api.InstanceSnapshotRequest) -> ops.Operation:
        return self.instances.snapshot_instance(req)

    def delete_snapshot(self, req: api.DeleteOwnedSnapshotRequest) -> ops.Operation:
        return self.deletes.delete_snapshot(req)

    # -- resume after a crash -------------------------------------------------------------
    def resume_later(self, rec: ops.OperationRecord, job_timeout: float) -> str:
        """Recovery's entry: ``rec`` is resumed in the pool (it may merge for long)."""

        def job() -> None:  # an error leaves the operation unfinished for the next start
            try:
                self.resume(rec, job_timeout)
            except Exception:
                LOG.exception("resuming %s %s failed", rec.operation.kind, rec.operation.id)

        self._pool.submit(f"recover:{rec.operation.id}", job)
        return "agent-owned: resumed in the pool"

    def resume(self, rec: ops.OperationRecord, job_timeout: float) -> str:
        """Continue or undo ``rec`` (called in the pool); returns the decision."""
        op = rec.operation
        keys = [
            str(v["key"])
            for s in rec.steps
            if s.name == StepName.PLAN
            for v in s.data.get("volumes", ())
        ]
        keys += [
            str(s.data["disk"])
            for s in rec.steps
            if s.name == StepName.VALIDATE and "disk" in s.data
        ]
        with self._locks.hold(keys):
            decision = self._resume(rec, job_timeout)
        LOG.warning("resumed %s %s: %s", op.kind, op.id, decision)
        return decision

    def _resume(self, rec: ops.OperationRecord, job_timeout: float) -> str:
        return self._judge(rec.operation, rec.steps, job_timeout)

    def _judge(self, op: ops.Operation, steps: tuple[ops.Step, ...], job_timeout: float) -> str:
        last = {s.name: s for s in steps}
        for s in steps:  # a PLANNED step may or may not have acted: judged below
            if s.state is ops.StepState.PLANNED and s.name not in (
                StepName.SNAPSHOT,
                StepName.MERGE,
            ):
                self._j.step_undone(op.id, s.seq, {"recovery": "re-judged after restart"})
        if op.kind is ops.OperationKind.INSTANCE_SNAPSHOT:
            return self.instances.resume(op, last)
        return self.deletes.resume(op, last, job_timeout)
