"""Cinder-assisted snapshots (Nova's ``os-assisted-volume-snapshots``): run AND resume.

Cinder drives and owns the ``.info`` ledger and the files; the agent only changes the live
chain and reports the status Cinder's remotefs driver polls for.

A request is validated against the disk's REAL chain (live XML + qcow2 inspection of every
file) AND the volume's ``.info`` ledger (the snapshot id and every name exactly as Cinder's
remotefs driver computes them: :mod:`.assisted_rules`) while the caller waits, so a bad
request fails with a typed error (400, or 404 for a snapshot id the ledger does not have)
and nothing is touched, journaled or reported. Accepted requests are journaled (idempotency
key = snapshot id) and answered at once; they run in the Cinder pool (apart from backups),
where a worker holding the disk's lock re-validates (the chain may have moved while queued)
and journals every step before taking it. Merged files are never deleted here: Cinder
deletes them itself.

A job not started before Cinder stops waiting (:class:`.assisted_rules.Deadlines`) fails
without touching the chain and reports nothing. A snapshot or merge call that raised is
judged from the live chain (:mod:`.assisted_chain`), as recovery judges it: a snapshot that
is the live top nevertheless is reported done, never ``error``.

After a restart, :meth:`AssistedSnapshots.resume` judges each unfinished operation from its
journaled steps AND the live chain, because a PLANNED step may or may not have taken effect:

- create, snapshot taken (live top is ``new_file``) -> done, ``creating``/``90%`` owed.
- create, snapshot not taken (or never planned) -> ``error``. Not retried: the snapshot's
  point in time is when Cinder asked, and a restart may come much later. The overlay was
  pre-created by Cinder (we never create one in assisted create), so it is left to Cinder.
- delete, block job still running -> settled (an interrupted ACTIVE commit stays READY in
  libvirt forever, so it is pivoted: its intent), then the chain is verified.
- delete, live chain already the expected post-merge chain -> done, ``deleting``/``90%``.
- delete, chain unchanged (or merge never planned) -> the merge is run again. A merge has
  no point in time, ``libvirt_ops`` re-checks the chain before starting, and Cinder waits
  up to 7200 s; ``error_deleting`` would strand the snapshot for an operator instead.
- delete, chain neither before nor after -> ``error_deleting`` (nothing is guessed).
- a notify step PLANNED -> its report is owed again (``Journal.enqueue`` de-duplicates a
  pending one; one already delivered may be sent twice, which Cinder accepts while it waits).
Guests of unfinished creates are thawed if ``guest-fsfreeze-status`` says frozen.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from hostagent.cinder.outbox import NotifyQueue
from hostagent.cinder.status import Report
from hostagent.hypervisor import DiskLocks, Hypervisor, Located, chain_names
from hostagent.journal import model as ops
from hostagent.journal import store as jn
from hostagent.journal.crash import StepFn
from hostagent.journal.model import StepName
from hostagent.pool import KeyedPool
from hostagent.rpc import contract as api
from hostagent.rpc.wire_errors import REUSED_ID, Rule, wire_errors
from hostagent.snapshots.assisted_chain import (
    expected_after,
    judge_create,
    judge_delete,
    live_names,
)
from hostagent.snapshots.assisted_rules import (
    DeadlineExpired,
    Deadlines,
    check_create,
    check_delete,
    cinder_ledger,
)
from qcow2 import CINDER, Qcow2Error, inspect_chain

LOG = logging.getLogger(__name__)

Request = api.CreateSnapshotRequest | api.DeleteSnapshotRequest


class AssistedSnapshots:
    """Assisted create/delete over the service's journal, pool, locks and hypervisor."""

    #: The operation kinds this class runs and resumes (recovery's registry keys).
    KINDS = (ops.OperationKind.ASSISTED_CREATE, ops.OperationKind.ASSISTED_DELETE)

    def __init__(
        self,
        journal: jn.Journal,
        hv: Hypervisor,
        notify: NotifyQueue,
        pool: KeyedPool,
        locks: DiskLocks,
        *,
        roots: list[str],
        step: StepFn,
        deadlines: Deadlines | None = None,
    ) -> None:
        self._j, self._hv, self._notify, self._pool = journal, hv, notify, pool
        self._locks, self._roots, self._step = locks, roots, step
        #: When Cinder stops waiting: a job not started by then is not started.
        self.deadlines = deadlines or Deadlines()

    # -- validation (touches nothing) -----------------------------------------------------
    def _chain_names(self, where: Located) -> list[str]:
        """The live chain, whole chain inspected (every layer must be Cinder's)."""
        return chain_names(where, self._roots)

    def _check_reporter(self, where: Located, req: Request) -> None:
        """A Nova guest's snapshots go through Nova (whose driver calls us with reporter
        NOVA and then refreshes its BDM); through qsnap-api its BDM would go stale."""
        if req.reporter is api.Reporter.CINDER and self._hv.nova_managed(where.domain_uuid):
            raise api.InvalidRequest(
                f"volume {req.volume_id} belongs to a guest Nova manages: Cinder's [nova] must "
                "point at Nova (qsnap's driver in nova-compute hands the work to this agent), "
                "not at qsnap-api, or Nova's block-device mapping goes stale; refused"
            )

    def _validate_create(self, req: api.CreateSnapshotRequest) -> tuple[Located, dict[str, Any]]:
        where = self._hv.locate(req.volume_id)
        self._check_reporter(where, req)
        names = self._chain_names(where)
        ledger = cinder_ledger(os.path.dirname(where.disk.source), req.volume_id)
        check_create(ledger, names, req)  # Cinder's name for a NEW snapshot id
        if req.new_file in names:
            raise api.InvalidRequest(f"new_file {req.new_file!r} is already in the chain")
        path = os.path.join(os.path.dirname(where.disk.source), req.new_file)
        if os.path.islink(path) or not os.path.isfile(path):
            raise api.InvalidRequest(f"{path} was not pre-created as a regular file")
        refused = Rule(
            Qcow2Error, api.InvalidRequest, lambda e: f"new_file {req.new_file!r} refused: {e}"
        )
        with (
            wire_errors(refused),
            inspect_chain(path, roots=self._roots, naming=CINDER, fmt="qcow2") as c,
        ):
            top = c.layers[0]
        if top.backing_name != names[0] or top.backing_fmt != where.disk.fmt:
            raise api.InvalidRequest(
                f"new_file backs onto {top.backing_name!r}, not the active file {names[0]!r}"
            )
        return where, {"disk": where.key, "active": where.disk.source, "new_path": path}

    def _validate_delete(self, req: api.DeleteSnapshotRequest) -> tuple[Located, dict[str, Any]]:
        where = self._hv.locate(req.volume_id)
        self._check_reporter(where, req)
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
        # the id is Cinder's and delete_info exactly the merge its ledger implies for it
        check_delete(cinder_ledger(os.path.dirname(where.disk.source), req.volume_id), names, req)
        return where, {"disk": where.key, "mode": mode, "chain": names}

    # -- accept -----------------------------------------------------------------------------
    def _accept(
        self,
        kind: ops.OperationKind,
        req: Request,
        key: str,
        validate: Callable[[Any], tuple[Located, dict[str, Any]]],
        run: Callable[[uuid.UUID, Any, float], None],
    ) -> ops.Operation:
        request = {"kind": kind.value, **asdict(req)}
        locks = [f"volume:{req.volume_id}"]
        with wire_errors(REUSED_ID):
            if self._j.find(kind, key) is None:
                where, _plan = validate(req)  # raises: nothing journaled, nothing touched
            else:
                where = None  # a retry: answer with the first operation, whatever its state
            begun = self._j.begin(kind, request, key, locks)
        if begun.created:
            assert where is not None
            op_id, disk, accepted = begun.operation.id, where.key, begun.operation.created_at

            def job() -> None:
                with self._locks.hold([disk]):  # instance snapshots hold several disks
                    run(op_id, req, accepted)

            self._pool.submit(disk, job)
        return begun.operation

    def create(self, req: api.CreateSnapshotRequest) -> ops.Operation:
        kind = ops.OperationKind.ASSISTED_CREATE
        return self._accept(kind, req, req.snapshot_id, self._validate_create, self._run_create)

    def delete(self, req: api.DeleteSnapshotRequest) -> ops.Operation:
        kind, key = ops.OperationKind.ASSISTED_DELETE, req.snapshot_id + ":delete"
        return self._accept(kind, req, key, self._validate_delete, self._run_delete)

    # -- run ------------------------------------------------------------------------------
    def _report(self, op_id: uuid.UUID, req: Request, report: Report) -> None:
        """The decided outcome is journaled either way; Cinder hears it from us only when we
        are its compute service (with Nova, Nova's driver reports once the op has ended)."""
        with self._step(op_id, StepName.NOTIFY, {"report": report.name}) as step:
            if req.reporter is api.Reporter.NOVA:
                step.data["delivered"] = "by nova"
            else:
                step.data["delivered"] = self._notify.send(req.snapshot_id, report, op_id)

    def _expired(self, op_id: uuid.UUID, req: Request, exc: DeadlineExpired) -> None:
        """Cinder stopped waiting before the job could start: fail it, report nothing."""
        LOG.warning("%s of volume %s: %s", req.snapshot_id, req.volume_id, exc)
        self._j.finish(op_id, ops.OperationState.FAILED, error=exc)

    def _run_create(
        self, op_id: uuid.UUID, req: api.CreateSnapshotRequest, accepted: float
    ) -> None:
        late = self.deadlines.check
        try:
            late("create", accepted)
            with self._step(op_id, StepName.VALIDATE, None) as step:
                where, plan = self._validate_create(req)
                step.data.update(plan)
            late("create", accepted)  # validation may have waited: never start late
            with self._step(op_id, StepName.SNAPSHOT, {"new_file": req.new_file}) as step:
                try:
                    step.data.update(self._hv.snapshot(where, req.new_file))
                except Exception as exc:  # judged from the live chain, as recovery does
                    taken = judge_create(self._hv, self._roots, req, exc)
                    if taken is None:
                        raise
                    step.data.update(taken)
        except DeadlineExpired as exc:
            self._expired(op_id, req, exc)
            return
        except Exception as exc:
            LOG.warning("create %s of volume %s failed: %s", req.snapshot_id, req.volume_id, exc)
            self._report(op_id, req, Report.CREATE_FAILED)
            self._j.finish(op_id, ops.OperationState.FAILED, error=exc)
            return
        self._report(op_id, req, Report.CREATE_DONE)
        self._j.finish(op_id, ops.OperationState.SUCCEEDED, result={"active": plan["new_path"]})

    def _run_delete(
        self, op_id: uuid.UUID, req: api.DeleteSnapshotRequest, accepted: float
    ) -> None:
        j = self._j

        def progress(cur: int, end: int) -> None:
            try:
                j.set_progress(op_id, cur, end)
            except jn.JournalError:  # progress is advisory; never fail the merge for it
                LOG.debug("progress of %s not journaled", op_id, exc_info=True)

        late = self.deadlines.check
        try:
            late("delete", accepted)
            with self._step(op_id, StepName.VALIDATE, None) as step:
                where, plan = self._validate_delete(req)
                step.data.update(plan)
            late("delete", accepted)  # a merge started in time is never interrupted
            data = {"file_to_merge": req.file_to_merge, "target": req.merge_target_file}
            with self._step(op_id, StepName.MERGE, data) as step:
                try:
                    result = self._hv.merge(
                        where, req.file_to_merge, req.merge_target_file, progress
                    )
                except Exception as exc:  # judged from the live chain, as recovery does
                    merged = judge_delete(self._hv, self._roots, req, plan["chain"], exc)
                    if merged is None:
                        raise
                    result = merged
                step.data.update(result)
        except DeadlineExpired as exc:
            self._expired(op_id, req, exc)
            return
        except Exception as exc:
            LOG.warning("delete %s of volume %s failed: %s", req.snapshot_id, req.volume_id, exc)
            self._report(op_id, req, Report.DELETE_FAILED)
            j.finish(op_id, ops.OperationState.FAILED, error=exc)
            return
        self._report(op_id, req, Report.DELETE_DONE)
        j.finish(op_id, ops.OperationState.SUCCEEDED, result=result)

    # -- resume after a crash ---------------------------------------------------------------
    def resume(self, rec: ops.OperationRecord, job_timeout: float) -> str:
        """Decide ``rec`` at start (before serving); merges go to the pool. The decision."""
        return _Resume(self, job_timeout).resume(rec)


class _Resume:
    """One start's judgement of unfinished assisted operations (journals without crash points:
    a restarted agent must not die again at the same step)."""

    def __init__(self, owner: AssistedSnapshots, job_timeout: float) -> None:
        self.o, self.j, self.hv = owner, owner._j, owner._hv
        self.roots, self.job_timeout = owner._roots, job_timeout
        #: Operations whose outcome Nova's driver reports (filled before any job is queued).
        self.by_nova: set[uuid.UUID] = set()

    def submit(self, key: str, fn: Callable[[], None]) -> None:
        """In the Cinder pool, holding the disk as a fresh job does (other pools' jobs)."""
        locks = self.o._locks

        def job() -> None:
            with locks.hold([key]):
                fn()

        self.o._pool.submit(key, job)

    # -- shared -------------------------------------------------------------------------
    def owe(self, op_id: uuid.UUID, snapshot_id: str, report: Report) -> None:
        """Journal a notify step and the notice; the queue's start() delivers it (none when
        Nova's driver reports: it reads the outcome from the operation)."""
        with self.j.step(op_id, StepName.NOTIFY, {"report": report.name, "recovered": True}):
            if op_id in self.by_nova:
                return
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
        return live_names(where, self.roots)

    def j_steps(self, op_id: uuid.UUID) -> tuple[ops.Step, ...]:
        return tuple(self.j.steps(op_id))

    # -- one operation --------------------------------------------------------------------
    def resume(self, rec: ops.OperationRecord) -> str:
        op, steps = rec.operation, rec.steps
        if op.request.get("reporter") == api.Reporter.NOVA.value:
            self.by_nova.add(op.id)
        return self.judge(op, steps)

    def judge(self, op: ops.Operation, steps: tuple[ops.Step, ...]) -> str:
        sid = str(op.request.get("snapshot_id"))
        notify = [s for s in steps if s.name == StepName.NOTIFY]
        if notify:  # the outcome was decided; only its report/finish may be missing
            last = notify[-1]
            report = Report[str(last.data["report"])]
            if last.state is ops.StepState.PLANNED:
                self.j.step_undone(op.id, last.seq, {"recovery": "report owed again"})
                self.owe(op.id, sid, report)
            self.close(op.id, report, result_of(steps), "failed before the restart")
            return f"finished after notify ({report.name})"
        if op.kind is ops.OperationKind.ASSISTED_CREATE:
            return self.create(op, steps, sid)
        return self.delete(op, steps, sid)

    def create(self, op: ops.Operation, steps: tuple[ops.Step, ...], sid: str) -> str:
        snap = [s for s in steps if s.name == StepName.SNAPSHOT]
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
            self.close(op.id, Report.CREATE_DONE, result_of(self.j_steps(op.id)), "")
            return "snapshot found in the live chain: done"
        why = f"agent restarted; {new_file} is not the live top: snapshot not taken"
        self.undo_planned(op.id, steps, why)
        self.owe(op.id, sid, Report.CREATE_FAILED)
        self.close(op.id, Report.CREATE_FAILED, {}, why)
        return "snapshot not in the live chain: error"

    def delete(self, op: ops.Operation, steps: tuple[ops.Step, ...], sid: str) -> str:
        req = api.DeleteSnapshotRequest(
            volume_id=str(op.request["volume_id"]),
            snapshot_id=sid,
            file_to_merge=op.request.get("file_to_merge"),
            merge_target_file=op.request.get("merge_target_file"),
            reporter=api.Reporter.of(op.request.get("reporter", "cinder")),
        )
        failed = next((s for s in steps if s.state is ops.StepState.FAILED), None)
        if failed is not None:
            self.owe(op.id, sid, Report.DELETE_FAILED)
            self.close(op.id, Report.DELETE_FAILED, {}, f"step {failed.name} failed")
            return "delete failed before the restart: error_deleting"
        merge = [s for s in steps if s.name == StepName.MERGE]
        if merge and merge[-1].state is ops.StepState.DONE:
            self.owe(op.id, sid, Report.DELETE_DONE)
            self.close(op.id, Report.DELETE_DONE, result_of(steps), "")
            return "merge done before the restart: done"
        validated = [
            s for s in steps if s.name == StepName.VALIDATE and s.state is ops.StepState.DONE
        ]
        try:
            where = self.hv.locate(req.volume_id)
        except api.AgentRpcError as exc:
            self.undo_planned(op.id, steps, f"volume not found: {exc}")
            self.owe(op.id, sid, Report.DELETE_FAILED)
            self.close(op.id, Report.DELETE_FAILED, {}, f"after restart: {exc}")
            return "volume gone: error_deleting"
        if not merge or not validated:  # nothing touched yet: simply run it again
            self.undo_planned(op.id, steps, "restart before the merge: run again")
            at = op.created_at
            self.submit(where.key, lambda: self.run_merge(op.id, req, where, None, at))
            return "merge never started: run again"
        before = [str(n) for n in validated[-1].data["chain"]]
        self.submit(where.key, lambda: self.finish_merge(op, req, merge[-1], before))
        return "merge PLANNED: judged from the live chain in the pool"

    # -- delete workers (run in the pool: a job may take long) -----------------------------
    def finish_merge(
        self, op: ops.Operation, req: api.DeleteSnapshotRequest, step: ops.Step, before: list[str]
    ) -> None:
        op_id = op.id
        try:
            expected = expected_after(before, req)
            # no BlockJob object survives us: the job is adopted and settled, bounded
            self.hv.settle_job(self.hv.locate(req.volume_id), self.job_timeout)
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
            self.run_merge(op_id, req, where, before, op.created_at)
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
        accepted: float,
    ) -> None:
        """The merge again, as a fresh run does it (libvirt_ops re-checks the chain); not
        once Cinder stopped waiting (then it fails, nothing reported, as a fresh run)."""
        late = self.o.deadlines.check
        try:
            late("delete", accepted)
            if before is None:
                with self.j.step(op_id, StepName.VALIDATE) as vstep:
                    before = self.live_names(where)
                    vstep.data.update({"disk": where.key, "chain": before, "recovered": True})
            late("delete", accepted)
            data = {"file_to_merge": req.file_to_merge, "target": req.merge_target_file}
            with self.j.step(op_id, StepName.MERGE, {**data, "recovered": True}) as mstep:
                done = self.hv.merge(where, req.file_to_merge, req.merge_target_file, _noop)
                mstep.data.update(done)
        except DeadlineExpired as exc:
            LOG.warning("recovered delete %s: %s", req.snapshot_id, exc)
            self.j.finish(op_id, ops.OperationState.FAILED, error=exc)
            return
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
        data = {"report": report.name, "recovered": True}
        with self.j.step(op_id, StepName.NOTIFY, data) as step:
            if req.reporter is api.Reporter.NOVA:
                step.data["delivered"] = "by nova"
            else:
                step.data["delivered"] = self.o._notify.send(req.snapshot_id, report, op_id)
        keys = ("kind", "chain_after", "merged_away")
        self.close(op_id, report, {k: result[k] for k in keys if k in result}, why)


def result_of(steps: tuple[ops.Step, ...]) -> dict[str, Any]:
    """The operation's result as a fresh run records it, from its DONE steps."""
    for s in reversed(steps):
        done = s.state is ops.StepState.DONE
        if done and s.name == StepName.VALIDATE and "new_path" in s.data:
            return {"active": s.data["new_path"]}
        if done and s.name == StepName.MERGE:
            keys = ("kind", "chain_after", "merged_away")
            return {k: s.data[k] for k in keys if k in s.data}
    return {}


def _noop(cur: int, end: int) -> None:
    """Progress of a recovered merge is not journaled (it is advisory)."""
