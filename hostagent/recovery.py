"""Crash recovery: finish or honestly fail every operation an earlier agent left unfinished.

:func:`reconcile` runs at agent start BEFORE the RPC server accepts requests, so a retry by
Cinder (same snapshot id) finds the reconciled operation, never a stuck RUNNING one. Each
operation is judged from its journaled steps AND the real world (live chain, block jobs,
files), because a PLANNED step may or may not have taken effect. Decisions:

- create, snapshot taken (live top is ``new_file``) -> done, ``creating``/``90%`` owed.
- create, snapshot not taken (or never planned) -> ``error``. Not retried: the snapshot's
  point in time is when Cinder asked, and a restart may come much later. The overlay was
  pre-created by Cinder (we never create one in assisted create), so it is left to Cinder.
- delete, block job still running -> awaited again, then the chain is verified.
- delete, live chain already the expected post-merge chain -> done, ``deleting``/``90%``.
- delete, chain unchanged (or merge never planned) -> the merge is run again. A merge has
  no point in time, ``libvirt_ops`` re-checks the chain before starting, and Cinder waits
  up to 7200 s; ``error_deleting`` would strand the snapshot for an operator instead.
- delete, chain neither before nor after -> ``error_deleting`` (nothing is guessed).
- a notify step PLANNED -> its report is owed again (``Journal.enqueue`` de-duplicates a
  pending one; one already delivered may be sent twice, which Cinder accepts while it waits).
Guests of unfinished creates are thawed if ``guest-fsfreeze-status`` says frozen.
- a ``release_checkpoint`` step PLANNED (killed while merging a backup checkpoint down) ->
  the disk's job is settled (the active commit pivoted), the overlay removed once out of the
  live chain (:func:`hostagent.backup.checkpoints.recover_release`), then the decisions above.
- a merge awaited after a restart is settled, not only polled: an interrupted ACTIVE commit
  stays READY in libvirt forever, so it is pivoted (its intent) instead of timing out.

Operations the agent owns end to end (instance snapshots, owned deletes) are resumed in the
pool by :meth:`hostagent.snapshots.owned.OwnedOps.resume`, which shares the step code of a
fresh run:
overlays made but no snapshot -> overlays removed + Cinder record ``error``; snapshot taken
-> ledger + record ``available``; delete: a running job is awaited, a finished merge gets
its ledger, file removal and delete-metadata, an unchanged chain is merged again.

Backups (RPC 1.2): an online backup of one volume is put back by ``backup_recover`` (the
agent passes :func:`hostagent.backup.recover_backup`: chain restored, FAILED, or SUCCEEDED if
its manifest was published); a request-level backup/verify/restore operation is failed as
interrupted (its volumes' own operations say what happened to each), and an interrupted
restore's temporary file is removed (the target never appears half written).

Also here: :func:`crash_point`, a TEST-ONLY kill switch read by the service's step wrapper.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import uuid
from collections.abc import Callable
from typing import Any, Protocol

from hostagent.backup.checkpoints import (
    Release,
    has_planned_release,
    recover_release,
    release_step,
    settle_of,
)
from hostagent.cinder.outbox import NotifyQueue
from hostagent.cinder.status import Report
from hostagent.journal import model as ops
from hostagent.journal import store as jn
from hostagent.journal.crash import CRASH_ENV as CRASH_ENV  # re-exported for tests and tools
from hostagent.journal.crash import crash_point as crash_point
from hostagent.rpc import contract as api
from hostagent.service import Hypervisor, Located
from hostagent.snapshots.owned import OwnedOps
from qcow2 import CINDER, Qcow2Error, inspect_chain

LOG = logging.getLogger(__name__)


class RecoveryHypervisor(Hypervisor, Protocol):
    """The service's hypervisor plus what recovery must observe directly."""

    def block_job(self, where: Located) -> dict[str, int]:
        """``blockJobInfo`` of the disk; empty when it has no job."""
        ...

    def thaw_if_frozen(self, domain_uuid: str) -> bool:
        """Thaw the guest if qemu-ga says frozen; True if a thaw was needed."""
        ...

    def settle_job(self, where: Located, timeout: float) -> dict[str, Any]:
        """Bring a job a dead agent left to its end (active commit: pivot); what it did."""
        ...


Submit = Callable[[str, Callable[[], None]], None]
#: Recovers one unfinished online backup of a volume; returns the decision.
BackupRecover = Callable[[ops.OperationRecord], str]


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What recovery decided for one operation (logged, and asserted by unit tests)."""

    op_id: uuid.UUID
    kind: ops.OperationKind
    decision: str


class _Recovery:
    def __init__(
        self,
        journal: jn.Journal,
        hv: RecoveryHypervisor,
        queue: NotifyQueue,
        submit: Submit,
        roots: list[str],
        job_timeout: float,
        owned: OwnedOps | None = None,
        backup_recover: BackupRecover | None = None,
        release: Release | None = None,
    ) -> None:
        self.release = release
        self.backup_recover = backup_recover
        self.owned = owned
        self.j = journal
        self.hv = hv
        self.queue = queue
        self.submit = submit
        self.roots = roots
        self.job_timeout = job_timeout

    # -- shared -------------------------------------------------------------------------
    def owe(self, op_id: uuid.UUID, snapshot_id: str, report: Report) -> None:
        """Journal a notify step and the notice; the queue's start() delivers it."""
        with self.j.step(op_id, "notify", {"report": report.name, "recovered": True}):
            status, progress = report.value
            self.j.enqueue(snapshot_id, status, progress, op_id)

    def close(self, op_id: uuid.UUID, report: Report, result: dict[str, Any], why: str) -> None:
        if report in (Report.CREATE_DONE, Report.DELETE_DONE):
            self.j.finish(op_id, ops.OperationState.SUCCEEDED, result=result)
        else:
            err = ops.ErrorInfo("RecoveredFailure", why)
            self.j.finish(op_id, ops.OperationState.FAILED, error=err)

    def undo_planned(self, op_id: uuid.UUID, steps: tuple[ops.Step, ...], why: str) -> None:
        for s in steps:
            if s.state is ops.StepState.PLANNED:
                self.j.step_undone(op_id, s.seq, {"recovery": why})

    def live_names(self, where: Located) -> list[str]:
        """The disk's chain, top first, from libvirt AND the file headers (must agree)."""
        disk = where.disk
        live = [os.path.realpath(layer.path) for layer in disk.chain]
        with inspect_chain(disk.source, roots=self.roots, naming=CINDER, fmt=disk.fmt) as c:
            on_disk = [os.path.realpath(info.path) for info in c.layers]
        if live != on_disk:
            raise Qcow2Error(f"libvirt's chain {live} differs from the files {on_disk}")
        return [os.path.basename(p) for p in live]

    # -- one operation --------------------------------------------------------------------
    def recover(self, rec: ops.OperationRecord) -> str:
        op, steps = rec.operation, rec.steps
        if op.kind in _OWNED and self.owned is not None:
            owned, hv, timeout = self.owned, self.hv, self.job_timeout
            self.submit(f"recover:{op.id}", lambda: _resume(owned, rec, hv, timeout))
            return "agent-owned: resumed in the pool"
        if op.kind in (ops.OperationKind.BACKUP, ops.OperationKind.RESTORE):
            return self.recover_backup(rec)
        released: list[str] = []
        if has_planned_release(steps):  # before anything judges the chain
            settle = settle_of(self.hv)
            args = (self.hv.locate, settle, self.roots, self.job_timeout)
            released = recover_release(self.j, op.id, steps, *args)
            steps = self.j_steps(op.id)
        decision = self.recover_assisted(op, steps)
        return "; ".join([*released, decision])

    def recover_assisted(self, op: ops.Operation, steps: tuple[ops.Step, ...]) -> str:
        sid = str(op.request.get("snapshot_id"))
        notify = [s for s in steps if s.name == "notify"]
        if notify:  # the outcome was decided; only its report/finish may be missing
            last = notify[-1]
            report = Report[str(last.data["report"])]
            if last.state is ops.StepState.PLANNED:
                self.j.step_undone(op.id, last.seq, {"recovery": "report owed again"})
                self.owe(op.id, sid, report)
            self.close(op.id, report, self.result_of(op, steps), "failed before the restart")
            return f"finished after notify ({report.name})"
        if op.kind is ops.OperationKind.ASSISTED_CREATE:
            return self.recover_create(op, steps, sid)
        if op.kind is ops.OperationKind.ASSISTED_DELETE:
            return self.recover_delete(op, steps, sid)
        self.undo_planned(op.id, steps, "kind not recoverable")
        err = ops.ErrorInfo("RecoveredFailure", f"{op.kind} cannot be resumed after a restart")
        self.j.finish(op.id, ops.OperationState.FAILED, error=err)
        return "failed: kind not recoverable"

    def recover_backup(self, rec: ops.OperationRecord) -> str:
        op, steps = rec.operation, rec.steps
        if "action" not in op.request:  # one volume's online backup: put its chain back
            if self.backup_recover is None:
                raise RuntimeError("no backup recovery configured; left for the next start")
            return self.backup_recover(rec)
        self.undo_planned(op.id, steps, "interrupted by a restart")
        if op.request.get("action") == "restore":
            path = str(op.request.get("path", ""))
            d, name = os.path.split(path)
            if name and os.path.isdir(d):
                for tmp in os.listdir(d):
                    if tmp.startswith(f".{name}.restore-"):
                        os.unlink(os.path.join(d, tmp))
        done = [s.data for s in steps if s.name == "volume" and s.state is ops.StepState.DONE]
        why = f"{op.request.get('action')} interrupted by a restart"
        result = {"backups": done} if done else None
        self.j.finish(op.id, ops.OperationState.FAILED, result=result, error=RuntimeError(why))
        return f"failed: {why}"

    @staticmethod
    def result_of(op: ops.Operation, steps: tuple[ops.Step, ...]) -> dict[str, Any]:
        for s in reversed(steps):
            if s.state is ops.StepState.DONE and s.name == "validate" and "new_path" in s.data:
                return {"active": s.data["new_path"]}
            if s.state is ops.StepState.DONE and s.name == "merge":
                keys = ("kind", "chain_after", "merged_away")
                return {k: s.data[k] for k in keys if k in s.data}
        return {}

    def recover_create(self, op: ops.Operation, steps: tuple[ops.Step, ...], sid: str) -> str:
        snap = [s for s in steps if s.name == "snapshot"]
        failed = next((s for s in steps if s.state is ops.StepState.FAILED), None)
        if failed is not None:  # crashed between the failure and its report
            self.owe(op.id, sid, Report.CREATE_FAILED)
            self.close(op.id, Report.CREATE_FAILED, {}, f"step {failed.name} failed")
            return "create failed before the restart: error"
        if not snap:
            why = "agent restarted before the snapshot was taken"
            self.undo_planned(op.id, steps, why)
            self.owe(op.id, sid, Report.CREATE_FAILED)
            self.close(op.id, Report.CREATE_FAILED, {}, why)
            return "snapshot never planned: error"
        step = snap[-1]
        new_file = str(op.request["new_file"])
        taken = False
        if step.state is ops.StepState.DONE:
            taken = True
        else:
            try:
                where = self.hv.locate(str(op.request["volume_id"]))
                if self.hv.thaw_if_frozen(where.domain_uuid):
                    LOG.warning("recovery thawed domain %s (create %s)", where.domain_uuid, sid)
                names = self.live_names(where)
                taken = names[0] == new_file
                if taken:
                    self.j.step_done(op.id, step.seq, {"recovered": True, "chain": names})
            except (api.AgentRpcError, Qcow2Error) as exc:
                LOG.warning("create %s: real state unknown after restart: %s", sid, exc)
        if taken:
            self.owe(op.id, sid, Report.CREATE_DONE)
            self.close(op.id, Report.CREATE_DONE, self.result_of(op, self.j_steps(op.id)), "")
            return "snapshot found in the live chain: done"
        why = f"agent restarted; {new_file} is not the live top: snapshot not taken"
        self.undo_planned(op.id, steps, why)
        self.owe(op.id, sid, Report.CREATE_FAILED)
        self.close(op.id, Report.CREATE_FAILED, {}, why)
        return "snapshot not in the live chain: error"

    def j_steps(self, op_id: uuid.UUID) -> tuple[ops.Step, ...]:
        return tuple(self.j.steps(op_id))

    def recover_delete(self, op: ops.Operation, steps: tuple[ops.Step, ...], sid: str) -> str:
        req = api.DeleteSnapshotRequest(
            volume_id=str(op.request["volume_id"]),
            snapshot_id=sid,
            file_to_merge=op.request.get("file_to_merge"),
            merge_target_file=op.request.get("merge_target_file"),
        )
        failed = next((s for s in steps if s.state is ops.StepState.FAILED), None)
        if failed is not None:
            self.owe(op.id, sid, Report.DELETE_FAILED)
            self.close(op.id, Report.DELETE_FAILED, {}, f"step {failed.name} failed")
            return "delete failed before the restart: error_deleting"
        merge = [s for s in steps if s.name == "merge"]
        if merge and merge[-1].state is ops.StepState.DONE:
            self.owe(op.id, sid, Report.DELETE_DONE)
            self.close(op.id, Report.DELETE_DONE, self.result_of(op, steps), "")
            return "merge done before the restart: done"
        validated = [s for s in steps if s.name == "validate" and s.state is ops.StepState.DONE]
        try:
            where = self.hv.locate(req.volume_id)
        except api.AgentRpcError as exc:
            self.undo_planned(op.id, steps, f"volume not found: {exc}")
            self.owe(op.id, sid, Report.DELETE_FAILED)
            self.close(op.id, Report.DELETE_FAILED, {}, f"after restart: {exc}")
            return "volume gone: error_deleting"
        if not merge or not validated:  # nothing touched yet: simply run it again
            self.undo_planned(op.id, steps, "restart before the merge: run again")
            self.submit(where.key, lambda: self.run_merge(op.id, req, where, None))
            return "merge never started: run again"
        before = [str(n) for n in validated[-1].data["chain"]]
        self.submit(where.key, lambda: self.finish_merge(op.id, req, merge[-1], before))
        return "merge PLANNED: judged from the live chain in the pool"

    # -- delete workers (run in the pool: a job may take long) -----------------------------
    def finish_merge(
        self, op_id: uuid.UUID, req: api.DeleteSnapshotRequest, step: ops.Step, before: list[str]
    ) -> None:
        try:
            expected = expected_after(before, req)
            # no BlockJob object survives us: the job is adopted and settled, bounded
            settle_of(self.hv)(self.hv.locate(req.volume_id), self.job_timeout)
            where = self.hv.locate(req.volume_id)
            names = self.live_names(where)
        except Exception as exc:
            self.j.step_failed(op_id, step.seq, exc)
            self.report_delete(op_id, req, Report.DELETE_FAILED, {}, str(exc))
            return
        if names == expected:
            chain = [os.path.join(os.path.dirname(where.disk.source), n) for n in names]
            gone = [n for n in before if n not in names]
            data = {"recovered": True, "chain_after": chain, "merged_away": gone}
            self.j.step_done(op_id, step.seq, data)
            self.report_delete(op_id, req, Report.DELETE_DONE, data, "")
        elif names == before:
            self.j.step_undone(op_id, step.seq, {"recovery": "chain unchanged: merge again"})
            self.run_merge(op_id, req, where, before)
        else:
            why = f"after restart the chain is {names}: neither {before} nor {expected}"
            self.j.step_failed(op_id, step.seq, ops.ErrorInfo("RecoveredFailure", why))
            self.report_delete(op_id, req, Report.DELETE_FAILED, {}, why)

    def run_merge(
        self,
        op_id: uuid.UUID,
        req: api.DeleteSnapshotRequest,
        where: Located,
        before: list[str] | None,
    ) -> None:
        """The merge again, as the service runs it (libvirt_ops re-checks the chain)."""
        try:
            if before is None:
                # a checkpoint the kill left on top hides Cinder's chain: merge it down first
                if release_step(self.j.step, op_id, where, self.release) is None:
                    where = self.hv.locate(req.volume_id)
                with self.j.step(op_id, "validate") as vstep:
                    before = self.live_names(where)
                    vstep.data.update({"disk": where.key, "chain": before, "recovered": True})
            data = {"file_to_merge": req.file_to_merge, "target": req.merge_target_file}
            with self.j.step(op_id, "merge", {**data, "recovered": True}) as mstep:
                done = self.hv.merge(where, req.file_to_merge, req.merge_target_file, _noop)
                mstep.data.update(done)
        except Exception as exc:
            LOG.warning("recovered delete %s failed: %s", req.snapshot_id, exc)
            self.report_delete(op_id, req, Report.DELETE_FAILED, {}, str(exc))
            return
        self.report_delete(op_id, req, Report.DELETE_DONE, done, "")

    def report_delete(
        self,
        op_id: uuid.UUID,
        req: api.DeleteSnapshotRequest,
        report: Report,
        result: dict[str, Any],
        why: str,
    ) -> None:
        with self.j.step(op_id, "notify", {"report": report.name, "recovered": True}) as step:
            step.data["delivered"] = self.queue.send(req.snapshot_id, report, op_id)
        keys = ("kind", "chain_after", "merged_away")
        self.close(op_id, report, {k: result[k] for k in keys if k in result}, why)


_OWNED = (ops.OperationKind.INSTANCE_SNAPSHOT, ops.OperationKind.OWNED_DELETE)


def _resume(owned: OwnedOps, rec: ops.OperationRecord, hv: RecoveryHypervisor, t: float) -> None:
    """Pool job: one owned operation; an error leaves it unfinished for the next start."""
    try:
        owned.resume(rec, hv, t)
    except Exception:
        LOG.exception("resuming %s %s failed", rec.operation.kind, rec.operation.id)


def _noop(cur: int, end: int) -> None:
    """Progress of a recovered merge is not journaled (it is advisory)."""


def expected_after(before: list[str], req: api.DeleteSnapshotRequest) -> list[str]:
    """The chain (basenames, top first) a successful merge of ``req`` leaves."""
    if req.merge_target_file is not None:
        assert req.file_to_merge is not None
        top, base = before.index(req.file_to_merge), before.index(req.merge_target_file)
        return before[:top] + before[base:]
    if req.file_to_merge is None:
        return before[:1]
    return before[:1] + before[before.index(req.file_to_merge) :]


def reconcile(
    journal: jn.Journal,
    hypervisor: RecoveryHypervisor,
    notifier_queue: NotifyQueue,
    *,
    submit: Submit,
    roots: list[str],
    job_timeout: float = 3600.0,
    owned: OwnedOps | None = None,
    backup_recover: BackupRecover | None = None,
    release: Release | None = None,
) -> list[Outcome]:
    """Decide every unfinished operation; long work (merges) goes to ``submit``.

    Call before the RPC server starts and before ``notifier_queue.start()`` (which then
    delivers every report owed here). One operation's error never stops the others.
    ``owned`` (the service's :class:`OwnedOps`) resumes instance snapshots and owned
    deletes; without it they are failed as not recoverable. ``backup_recover`` puts the
    chain of an interrupted online backup back; without it such backups stay unfinished.
    ``release`` (the backup engine's) merges a checkpoint overlay down before an assisted
    delete is run again; without it such a delete fails against the checkpointed chain.
    Request-level backup operations are failed after the volumes' own (journal order).
    """
    rec = _Recovery(
        journal,
        hypervisor,
        notifier_queue,
        submit,
        roots,
        job_timeout,
        owned,
        backup_recover,
        release,
    )
    out: list[Outcome] = []
    for record in journal.unfinished():
        op = record.operation
        try:
            decision = rec.recover(record)
        except Exception as exc:  # keep going; the op stays unfinished for the next start
            LOG.exception("recovery of %s %s failed", op.kind, op.id)
            decision = f"recovery raised {type(exc).__name__}: {exc}"
        LOG.warning("recovered %s %s: %s", op.kind, op.id, decision)
        out.append(Outcome(op.id, op.kind, decision))
    return out
