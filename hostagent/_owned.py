"""Snapshots the agent takes and deletes ITSELF: instance snapshots and their deletion.

Unlike the assisted path (Cinder drives, Cinder owns the ``.info`` ledger and its files),
here the agent owns everything: it picks the snapshot uuids, creates the overlays, takes
ONE atomic snapshot of all the listed disks, writes the ledger exactly as Cinder's remotefs
driver would (so Cinder can later delete these snapshots the normal way) and keeps Cinder's
records through qsnap's Cinder extension. Every step is journaled before it is taken, and
:meth:`OwnedOps.resume` continues or undoes an operation from its journaled steps and the
live chain after a crash, so a fresh run and a recovered one share the same step code.

Instance snapshot steps: plan, cinder_create, overlays, snapshot, ledger, cinder_finalize
(failure: cleanup, cinder_finalize error). Owned delete steps: validate, merge, ledger,
remove, cinder_delete.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from hostagent import journal as jn
from hostagent import operations as ops
from hostagent import service_api as api
from hostagent._located import DiskLocks, Hypervisor, Located, chain_names
from hostagent._notify_queue import NotifyQueue
from hostagent._pool import KeyedPool
from hostagent.cinder_meta import MetaAction
from qcow2 import CINDER, Ledger, Qcow2Error, create_overlay, read_ledger, write_ledger
from qcow2.naming import snapshot_file_name

LOG = logging.getLogger(__name__)

StepFn = Callable[[uuid.UUID, str, "dict[str, Any] | None"], AbstractContextManager[jn.StepHandle]]
INSTANCE_STEPS = ("plan", "cinder_create", "overlays", "snapshot", "ledger", "cinder_finalize")


class Observer(Protocol):
    """What resuming after a crash must observe beyond the service's hypervisor."""

    def block_job(self, where: Located) -> dict[str, int]: ...
    def thaw_if_frozen(self, domain_uuid: str) -> bool: ...


@dataclass(frozen=True)
class VolPlan:
    """One disk of an instance snapshot, as journaled by the plan step."""

    volume_id: str
    snapshot_id: str
    file: str  # the new overlay's basename: volume-<vid>.<snapid>
    dir: str
    top: str  # the active file's basename when planned (the overlay's backing file)
    fmt: str
    key: str

    @property
    def path(self) -> str:
        return os.path.join(self.dir, self.file)


def _read_ledger(directory: str, volume_id: str) -> Ledger | None:
    try:
        return read_ledger(directory, volume_id)
    except Qcow2Error as exc:
        raise api.InvalidRequest(f"ledger of volume {volume_id} refused: {exc}") from exc


class OwnedOps:
    """Instance snapshots and owned deletes over the service's journal, pool and hypervisor."""

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
    ) -> None:
        self._j, self._hv, self._q, self._pool = journal, hv, queue, pool
        self._locks, self._roots, self._step = locks, roots, step

    # -- validation (touches nothing) -----------------------------------------------------
    def _checked(self, where: Located) -> list[str]:
        """The chain names; the ledger, if any, must agree that the top is active."""
        names = chain_names(where, self._roots)
        vid = str(where.disk.serial).lower()
        ledger = _read_ledger(os.path.dirname(where.disk.source), vid)
        if ledger is not None and ledger.active != names[0]:
            raise api.InvalidRequest(
                f"ledger of {vid} says {ledger.active!r} is active, the chain's top is {names[0]!r}"
            )
        return names

    def _validate_instance(self, req: api.InstanceSnapshotRequest) -> list[Located]:
        found = self._hv.instance_volumes(req.instance_uuid)
        by_vol = {str(w.disk.serial).lower(): w for w in found}
        if req.volume_ids is None:
            chosen = found
        else:
            missing = [v for v in req.volume_ids if v not in by_vol]
            if missing:
                raise api.VolumeNotFound(
                    f"volumes {missing} are not attached to instance {req.instance_uuid}"
                )
            chosen = [by_vol[v] for v in req.volume_ids]
        if not chosen:
            raise api.InvalidRequest(f"instance {req.instance_uuid} has no volume disks")
        for where in chosen:
            self._checked(where)
        return chosen

    def _validate_delete(
        self, req: api.DeleteOwnedSnapshotRequest
    ) -> tuple[Located, dict[str, Any]]:
        where = self._hv.locate(req.volume_id)
        names = self._checked(where)
        directory = os.path.dirname(where.disk.source)
        ledger = _read_ledger(directory, req.volume_id)
        if ledger is None or req.snapshot_id not in ledger.snapshots:
            raise api.SnapshotNotFound(
                f"snapshot {req.snapshot_id} is not in the ledger of volume {req.volume_id}"
            )
        file = ledger.snapshots[req.snapshot_id]
        if list(ledger.snapshots.values()).count(file) != 1:
            raise api.InvalidRequest(f"ledger maps several snapshots to {file!r}")
        if file not in names or names.index(file) + 1 >= len(names):
            raise api.InvalidRequest(f"{file!r} is not a layer with a backing file in {names}")
        pos = names.index(file)
        return where, {
            "disk": where.key,
            "dir": directory,
            "file": file,
            "base": names[pos + 1],
            "mode": "active-commit" if pos == 0 else "commit",
            "chain": names,
            "expected": names[:pos] + names[pos + 1 :],
        }

    # -- accept ---------------------------------------------------------------------------
    def snapshot_instance(self, req: api.InstanceSnapshotRequest) -> ops.Operation:
        chosen = self._validate_instance(req)  # raises: nothing journaled, nothing touched
        request = {"kind": ops.OperationKind.INSTANCE_SNAPSHOT.value, **asdict(req)}
        request["quiesce"] = req.quiesce.value
        locks = [f"instance:{req.instance_uuid}"]
        locks += [f"volume:{str(w.disk.serial).lower()}" for w in chosen]
        begun = self._j.begin(ops.OperationKind.INSTANCE_SNAPSHOT, request, None, locks)
        op_id, keys = begun.operation.id, [w.key for w in chosen]
        self._pool.submit(
            f"instance:{req.instance_uuid}", lambda: self._run_instance(op_id, req, keys)
        )
        return begun.operation

    def delete_snapshot(self, req: api.DeleteOwnedSnapshotRequest) -> ops.Operation:
        kind = ops.OperationKind.OWNED_DELETE
        request = {"kind": kind.value, **asdict(req)}
        try:
            if self._j.find(kind, req.snapshot_id) is None:
                where, _ = self._validate_delete(req)  # raises: nothing journaled or touched
            else:
                where = None  # a retry: answer with the first operation
            begun = self._j.begin(kind, request, req.snapshot_id, [f"volume:{req.volume_id}"])
        except jn.IdempotencyConflict as exc:
            raise api.InvalidRequest(f"snapshot id reused with another request: {exc}") from exc
        if begun.created:
            assert where is not None
            op_id, key = begun.operation.id, where.key
            self._pool.submit(key, lambda: self._locked([key], self._run_delete, op_id, req))
        return begun.operation

    def _locked(self, keys: list[str], fn: Callable[..., None], *args: Any) -> None:
        with self._locks.hold(keys):
            fn(*args)

    # -- instance snapshot ----------------------------------------------------------------
    def _progress(self, op_id: uuid.UUID, step: str) -> None:
        with contextlib.suppress(jn.JournalError):  # advisory
            self._j.set_progress(op_id, INSTANCE_STEPS.index(step) + 1, len(INSTANCE_STEPS))

    def _run_instance(
        self, op_id: uuid.UUID, req: api.InstanceSnapshotRequest, keys: list[str]
    ) -> None:
        with self._locks.hold(keys):
            try:
                with self._step(op_id, "plan", None) as st:
                    st.data["volumes"] = [asdict(v) for v in self._plan(req, keys)]
                    st.data["quiesce"] = req.quiesce.value
                    st.data["domain"] = self._hv.instance_volumes(req.instance_uuid)[0].domain_uuid
            except Exception as exc:
                LOG.warning("instance snapshot %s refused at plan: %s", op_id, exc)
                self._j.finish(op_id, ops.OperationState.FAILED, error=exc)
                return
            self._progress(op_id, "plan")
            self._take(op_id, st.data)

    def _plan(self, req: api.InstanceSnapshotRequest, keys: list[str]) -> list[VolPlan]:
        out: list[VolPlan] = []
        for where in self._validate_instance(req):  # again: the chain may have moved
            if where.key not in keys:
                raise api.InvalidRequest(f"disk {where.key} appeared after the request")
            vid, sid = str(where.disk.serial).lower(), str(uuid.uuid4())
            name = snapshot_file_name(vid, sid)
            directory = os.path.dirname(where.disk.source)
            if not CINDER.is_image_name(name) or os.path.lexists(os.path.join(directory, name)):
                raise api.InvalidRequest(f"overlay {name} is not a fresh Cinder file name")
            top = os.path.basename(where.disk.source)
            out.append(VolPlan(vid, sid, name, directory, top, where.disk.fmt, where.key))
        return out

    @staticmethod
    def _vols(plan: dict[str, Any]) -> list[VolPlan]:
        return [VolPlan(**v) for v in plan["volumes"]]

    def _take(self, op_id: uuid.UUID, plan: dict[str, Any]) -> None:
        vols, recorded = self._vols(plan), False
        try:
            with self._step(
                op_id, "cinder_create", {"snapshots": [v.snapshot_id for v in vols]}
            ) as st:
                recorded = True
                st.data["cinder"] = self._create_records(vols)
            self._progress(op_id, "cinder_create")
            with self._step(op_id, "overlays", {"files": [v.path for v in vols]}):
                for v in vols:
                    top = os.path.join(v.dir, v.top)
                    create_overlay(v.path, top, backing_fmt=v.fmt, roots=self._roots)
            self._progress(op_id, "overlays")
            with self._step(op_id, "snapshot", None) as st:
                files = [(v.volume_id, v.file) for v in vols]
                st.data.update(
                    self._hv.snapshot_disks(plan["domain"], files, api.Quiesce(plan["quiesce"]))
                )
            self._progress(op_id, "snapshot")
        except Exception as exc:
            LOG.warning("instance snapshot %s failed: %s", op_id, exc)
            self._fail(op_id, plan, ops.ErrorInfo.from_exception(exc), recorded)
            return
        self._record(op_id, plan, bool(st.data.get("quiesced")))

    def _create_records(self, vols: list[VolPlan]) -> str:
        meta = self._q.meta
        if meta is None:
            return "skipped: [cinder] enabled is false"
        for v in vols:
            meta.create(v.snapshot_id, v.volume_id, f"qsnap instance snapshot ({v.file})")
        return "created"

    def _record(self, op_id: uuid.UUID, plan: dict[str, Any], quiesced: bool) -> None:
        vols = self._vols(plan)
        try:
            with self._step(op_id, "ledger", {"volumes": [v.volume_id for v in vols]}):
                for v in vols:
                    self._ledger_add(v)
            self._progress(op_id, "ledger")
            self._finalize(op_id, vols, MetaAction.FINALIZE_AVAILABLE)
        except Exception as exc:  # the snapshot exists: the op fails, the overlays stay live
            LOG.error("instance snapshot %s taken but not recorded: %s", op_id, exc)
            if self._q.meta is not None:  # never leave Cinder's records in 'creating'
                with contextlib.suppress(Exception):
                    self._finalize(op_id, vols, MetaAction.FINALIZE_ERROR)
            self._j.finish(op_id, ops.OperationState.FAILED, error=exc)
            return
        self._progress(op_id, "cinder_finalize")
        snaps = [
            {"volume_id": v.volume_id, "snapshot_id": v.snapshot_id, "file": v.path} for v in vols
        ]
        result = {"snapshots": snaps, "quiesced": quiesced}
        self._j.finish(op_id, ops.OperationState.SUCCEEDED, result=result)

    @staticmethod
    def _ledger_add(v: VolPlan) -> None:
        """``active`` + ``snapid -> file``, as remotefs writes it; a repeat changes nothing."""
        old = read_ledger(v.dir, v.volume_id)
        snaps = dict(old.snapshots) if old is not None else {}
        snaps[v.snapshot_id] = v.file
        new = Ledger(active=v.file, snapshots=snaps)
        if new != old:
            write_ledger(v.dir, v.volume_id, new)

    def _finalize(self, op_id: uuid.UUID, vols: list[VolPlan], action: MetaAction) -> None:
        with self._step(op_id, "cinder_finalize", {"action": action.value}) as st:
            if self._q.meta is None:
                st.data["cinder"] = "skipped: [cinder] enabled is false"
            else:  # journaled notices: a failed one is resent, never dropped
                sent = {
                    v.snapshot_id: self._q.send_meta(v.snapshot_id, action, op_id) for v in vols
                }
                st.data["delivered"] = sent

    def _in_use(self, domain_uuid: str, vols: list[VolPlan]) -> set[str] | None:
        """Real paths in the domain's live chains (None when the domain cannot be read)."""
        try:
            where = [self._hv.locate(v.volume_id) for v in vols]
        except Exception:  # any doubt: touch nothing
            LOG.warning("cannot read the live chains of %s: overlays left in place", domain_uuid)
            return None
        return {os.path.realpath(lay.path) for w in where for lay in w.disk.chain}

    def _fail(
        self, op_id: uuid.UUID, plan: dict[str, Any], err: ops.ErrorInfo, recorded: bool
    ) -> None:
        """Remove our overlays that no disk uses, fail Cinder's records, fail the op."""
        vols = self._vols(plan)
        try:
            with self._step(op_id, "cleanup", {"files": [v.path for v in vols]}) as st:
                used = self._in_use(plan["domain"], vols)
                removed = []
                for v in vols:
                    if used is None or os.path.realpath(v.path) in used:
                        continue
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(v.path)
                        removed.append(v.path)
                st.data["removed"] = removed
            if recorded:
                self._finalize(op_id, vols, MetaAction.FINALIZE_ERROR)
        finally:
            self._j.finish(op_id, ops.OperationState.FAILED, error=err)

    # -- owned delete -----------------------------------------------------------------------
    def _run_delete(self, op_id: uuid.UUID, req: api.DeleteOwnedSnapshotRequest) -> None:
        try:
            with self._step(op_id, "validate", None) as st:
                where, plan = self._validate_delete(req)
                st.data.update(plan)
        except Exception as exc:
            self._j.finish(op_id, ops.OperationState.FAILED, error=exc)
            return
        self._merge(op_id, req, where, st.data)

    def _merge(
        self,
        op_id: uuid.UUID,
        req: api.DeleteOwnedSnapshotRequest,
        where: Located,
        plan: dict[str, Any],
    ) -> None:
        def progress(cur: int, end: int) -> None:
            with contextlib.suppress(jn.JournalError):
                self._j.set_progress(op_id, cur, end)

        try:
            with self._step(op_id, "merge", {"file": plan["file"], "mode": plan["mode"]}) as st:
                st.data.update(self._hv.merge_owned(where, plan["file"], progress))
        except Exception as exc:
            LOG.warning("owned delete %s of %s failed: %s", req.snapshot_id, req.volume_id, exc)
            self._j.finish(op_id, ops.OperationState.FAILED, error=exc)
            return
        self._after_merge(op_id, req, plan, set())

    def _after_merge(
        self,
        op_id: uuid.UUID,
        req: api.DeleteOwnedSnapshotRequest,
        plan: dict[str, Any],
        done: set[str],
    ) -> None:
        """Ledger, file removal and Cinder's record: each idempotent, DONE ones skipped."""
        path = os.path.join(plan["dir"], plan["file"])
        try:
            if "ledger" not in done:
                with self._step(op_id, "ledger", {"drop": req.snapshot_id}) as st:
                    st.data["active"] = self._ledger_drop(req, plan)
            if "remove" not in done:
                with self._step(op_id, "remove", {"file": path}) as st:
                    st.data["removed"] = self._remove_merged(req.volume_id, path)
            if "cinder_delete" not in done:
                with self._step(op_id, "cinder_delete", None) as st:
                    if self._q.meta is None:
                        st.data["cinder"] = "skipped: [cinder] enabled is false"
                    else:
                        st.data["delivered"] = self._q.send_meta(
                            req.snapshot_id, MetaAction.DELETE, op_id
                        )
        except Exception as exc:
            LOG.error("owned delete %s merged but not recorded: %s", req.snapshot_id, exc)
            self._j.finish(op_id, ops.OperationState.FAILED, error=exc)
            return
        result = {"volume_id": req.volume_id, "snapshot_id": req.snapshot_id,
                  "merged": path, "kind": plan["mode"]}  # fmt: skip
        self._j.finish(op_id, ops.OperationState.SUCCEEDED, result=result)

    @staticmethod
    def _ledger_drop(req: api.DeleteOwnedSnapshotRequest, plan: dict[str, Any]) -> str:
        """Drop the snapshot; the active entry moves to the base when the top was merged."""
        old = read_ledger(plan["dir"], req.volume_id)
        if old is None:
            raise api.InvalidRequest(f"ledger of volume {req.volume_id} vanished")
        snaps = {k: v for k, v in old.snapshots.items() if k != req.snapshot_id}
        active = plan["base"] if old.active == plan["file"] else old.active
        new = Ledger(active=active, snapshots=snaps)
        if new != old:
            write_ledger(plan["dir"], req.volume_id, new)
        return active

    def _remove_merged(self, volume_id: str, path: str) -> bool:
        """Unlink the merged-away file, never one the live chain still uses."""
        live = {os.path.realpath(lay.path) for lay in self._hv.locate(volume_id).disk.chain}
        if os.path.realpath(path) in live:
            raise api.InvalidRequest(f"{path} is still in the live chain: not removed")
        if os.path.islink(path):
            raise api.InvalidRequest(f"{path} is a symlink: not removed")
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        return True

    # -- resume after a crash -------------------------------------------------------------
    def resume(self, rec: ops.OperationRecord, obs: Observer, job_timeout: float) -> str:
        """Continue or undo ``rec`` (called in the pool by recovery); returns the decision."""
        op = rec.operation
        keys = [
            str(v["key"]) for s in rec.steps if s.name == "plan" for v in s.data.get("volumes", ())
        ]
        keys += [
            str(s.data["disk"]) for s in rec.steps if s.name == "validate" and "disk" in s.data
        ]
        with self._locks.hold(keys):
            decision = self._resume(rec, obs, job_timeout)
        LOG.warning("resumed %s %s: %s", op.kind, op.id, decision)
        return decision

    def _resume(self, rec: ops.OperationRecord, obs: Observer, job_timeout: float) -> str:
        op = rec.operation
        last = {s.name: s for s in rec.steps}
        for s in rec.steps:  # a PLANNED step may or may not have acted: judged below
            if s.state is ops.StepState.PLANNED and s.name not in ("snapshot", "merge"):
                self._j.step_undone(op.id, s.seq, {"recovery": "re-judged after restart"})
        if op.kind is ops.OperationKind.INSTANCE_SNAPSHOT:
            return self._resume_instance(op, last, obs)
        return self._resume_delete(op, last, obs, job_timeout)

    def _resume_instance(self, op: ops.Operation, last: dict[str, ops.Step], obs: Observer) -> str:
        plan_step = last.get("plan")
        if plan_step is None or plan_step.state is not ops.StepState.DONE:
            err = ops.ErrorInfo("RecoveredFailure", "restart before the plan: nothing touched")
            self._j.finish(op.id, ops.OperationState.FAILED, error=err)
            return "not planned: failed, nothing touched"
        plan, vols = plan_step.data, self._vols(plan_step.data)
        recorded = "cinder_create" in last
        with contextlib.suppress(Exception):
            if obs.thaw_if_frozen(plan["domain"]):
                LOG.warning("recovery thawed %s (instance snapshot %s)", plan["domain"], op.id)
        fin = last.get("cinder_finalize")
        failed = next((s for s in last.values() if s.state is ops.StepState.FAILED), None)
        if fin is not None and fin.data.get("action") == MetaAction.FINALIZE_ERROR.value:
            why = ops.ErrorInfo("RecoveredFailure", "failed before the restart")
            self._fail(op.id, plan, why, recorded)
            return "failed before the restart: cleanup + finalize error again"
        if failed is not None or "cleanup" in last:
            name = failed.name if failed else "cleanup"
            self._fail(
                op.id, plan, ops.ErrorInfo("RecoveredFailure", f"step {name} failed"), recorded
            )
            return f"step {name} failed: cleanup + finalize error"
        snap = last.get("snapshot")
        taken = snap is not None and snap.state is ops.StepState.DONE
        if snap is not None and snap.state is ops.StepState.PLANNED:
            tops = self._live_tops(vols)
            taken = all(tops.get(v.volume_id) == v.file for v in vols)
            if taken:
                self._j.step_done(op.id, snap.seq, {"recovered": True, "chains": tops})
            else:
                self._j.step_undone(op.id, snap.seq, {"recovery": f"live tops {tops}"})
        if taken:
            quiesced = bool(self._j_step(op.id, "snapshot").get("quiesced"))
            self._record(op.id, plan, quiesced)
            return "snapshot taken: ledger + finalize available"
        err = ops.ErrorInfo("RecoveredFailure", "agent restarted before the snapshot was taken")
        self._fail(op.id, plan, err, recorded)
        return "snapshot not taken: overlays removed, finalize error"

    def _j_step(self, op_id: uuid.UUID, name: str) -> dict[str, Any]:
        steps = [s for s in self._j.steps(op_id) if s.name == name]
        return steps[-1].data if steps else {}

    def _live_tops(self, vols: list[VolPlan]) -> dict[str, str]:
        tops: dict[str, str] = {}
        for v in vols:
            with contextlib.suppress(api.AgentRpcError):
                where = self._hv.locate(v.volume_id)
                tops[v.volume_id] = chain_names(where, self._roots)[0]
        return tops

    def _resume_delete(
        self, op: ops.Operation, last: dict[str, ops.Step], obs: Observer, job_timeout: float
    ) -> str:
        req = api.DeleteOwnedSnapshotRequest(
            str(op.request["volume_id"]), str(op.request["snapshot_id"])
        )
        validate, merge = last.get("validate"), last.get("merge")
        failed = next((s for s in last.values() if s.state is ops.StepState.FAILED), None)
        if failed is not None and failed.name in ("validate", "merge"):
            err = ops.ErrorInfo("RecoveredFailure", f"step {failed.name} failed before the restart")
            self._j.finish(op.id, ops.OperationState.FAILED, error=err)
            return f"{failed.name} failed: failed"
        if validate is None or validate.state is not ops.StepState.DONE:
            self._run_delete(op.id, req)
            return "restart before validation: run again"
        plan = validate.data
        if merge is None:
            where = self._hv.locate(req.volume_id)
            self._merge(op.id, req, where, plan)
            return "merge never started: run it"
        if merge.state is ops.StepState.PLANNED:
            names = self._await_job(req.volume_id, obs, job_timeout)
            if names == plan["expected"]:
                self._j.step_done(op.id, merge.seq, {"recovered": True, "chain_after": names})
            elif names == plan["chain"]:
                self._j.step_undone(op.id, merge.seq, {"recovery": "chain unchanged: merge again"})
                self._merge(op.id, req, self._hv.locate(req.volume_id), plan)
                return "merge had not happened: merged again"
            else:
                why = f"after restart the chain is {names}: neither {plan['chain']} nor expected"
                self._j.step_failed(op.id, merge.seq, ops.ErrorInfo("RecoveredFailure", why))
                self._j.finish(
                    op.id, ops.OperationState.FAILED, error=ops.ErrorInfo("RecoveredFailure", why)
                )
                return "unexplained chain: failed"
        done = {n for n, s in last.items() if s.state is ops.StepState.DONE}
        self._after_merge(op.id, req, plan, done)
        return "merge done: ledger, removal and Cinder record completed"

    def _await_job(self, volume_id: str, obs: Observer, timeout: float) -> list[str]:
        """No BlockJob object survives a crash: poll until the disk has no job (bounded)."""
        deadline = time.monotonic() + timeout
        where = self._hv.locate(volume_id)
        while obs.block_job(where):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"block job on {where.key} still running after restart")
            time.sleep(0.2)
            where = self._hv.locate(volume_id)
        return chain_names(where, self._roots)
