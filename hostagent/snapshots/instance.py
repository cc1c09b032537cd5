"""Instance snapshots: ONE atomic, quiesced snapshot of several volume disks of a domain.

The agent picks each snapshot's uuid, so the overlay (``volume-<vid>.<snapid>``, Cinder's
naming) is known before Cinder is asked to record it. Steps, each journaled before it acts:
plan, cinder_create (records in ``creating``), overlays (made here, so a failure removes
exactly ours), snapshot (one libvirt call, the request's quiesce policy), ledger (``active``
+ ``snapid -> file`` per volume, as remotefs writes it), cinder_finalize (``available``; the
extension also points the attachment and the volume's format at the overlay), and on a Nova
guest nova_refresh (Nova re-reads the attachments into its BDM; they must name the overlays).
Failure: cleanup (our unused overlays), cinder_finalize ``error``. :meth:`resume` judges a
crashed one from its steps and the live chains, sharing this step code.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from hostagent.cinder.records import MetaAction
from hostagent.hypervisor import Located, chain_names
from hostagent.journal import model as ops
from hostagent.journal import store as jn
from hostagent.journal.model import StepName
from hostagent.nova_records import RecordsStale
from hostagent.rpc import contract as api
from hostagent.rpc.nova_side import BdmState
from hostagent.snapshots.owned_base import OwnedBase
from qcow2 import CINDER, Ledger, create_overlay, read_ledger, write_ledger
from qcow2.naming import snapshot_file_name

LOG = logging.getLogger(__name__)

INSTANCE_STEPS = ("plan", "cinder_create", "overlays", "snapshot", "ledger", "cinder_finalize")


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
    label: str = ""  # Cinder's description ("": the instance snapshot's default)
    checkpoint: bool = False  # a backup's checkpoint (Cinder marks it as one)

    @property
    def path(self) -> str:
        return os.path.join(self.dir, self.file)


class InstanceSnapshots(OwnedBase):
    """Accepts, runs and resumes instance snapshots."""

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

    def snapshot_instance(self, req: api.InstanceSnapshotRequest) -> ops.Operation:
        chosen = self._validate_instance(req)  # raises: nothing journaled, nothing touched
        self._nova_guard(chosen[0].domain_uuid)  # a Nova guest needs Nova's side answering
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

    # -- instance snapshot ----------------------------------------------------------------
    def _progress(self, op_id: uuid.UUID, step: str) -> None:
        with contextlib.suppress(jn.JournalError):  # advisory
            self._j.set_progress(op_id, INSTANCE_STEPS.index(step) + 1, len(INSTANCE_STEPS))

    def _run_instance(
        self, op_id: uuid.UUID, req: api.InstanceSnapshotRequest, keys: list[str]
    ) -> None:
        with self._locks.hold(keys):
            self._run_held(op_id, req, keys, {})

    def take_held(self, where: Located, snapshot_id: str, label: str, why: str) -> ops.Operation:
        """A backup's checkpoint: one volume's snapshot ``snapshot_id`` (``label``: Cinder's
        description), taken NOW by the caller's thread, which already holds ``where``'s disk
        lock. Its own journaled operation (resumed after a crash like any other); returns it
        finished."""
        vid = str(where.disk.serial).lower()
        req = api.InstanceSnapshotRequest(where.domain_uuid, (vid,), api.Quiesce.PREFERRED)
        self._validate_instance(req)  # raises: nothing journaled, nothing touched
        self._nova_guard(where.domain_uuid)
        request = {"kind": ops.OperationKind.INSTANCE_SNAPSHOT.value, **asdict(req)}
        request.update(quiesce=req.quiesce.value, snapshot_id=snapshot_id, why=why)
        locks = [f"instance:{where.domain_uuid}", f"volume:{vid}"]
        op_id = self._j.begin(
            ops.OperationKind.INSTANCE_SNAPSHOT, request, None, locks
        ).operation.id
        self._run_held(op_id, req, [where.key], {vid: (snapshot_id, label)})
        return self._j.get(op_id)

    def _run_held(
        self,
        op_id: uuid.UUID,
        req: api.InstanceSnapshotRequest,
        keys: list[str],
        fixed: dict[str, tuple[str, str]],
    ) -> None:
        """Plan and take; ``fixed``: volume id -> (snapshot id, label) chosen by the caller."""
        try:
            with self._step(op_id, StepName.PLAN, None) as st:
                st.data["volumes"] = [asdict(v) for v in self._plan(req, keys, fixed)]
                st.data["quiesce"] = req.quiesce.value
                domain = self._hv.instance_volumes(req.instance_uuid)[0].domain_uuid
                st.data["domain"] = domain
                st.data["nova"] = self._nova_guard(domain)  # again: last check before acting
        except Exception as exc:
            LOG.warning("instance snapshot %s refused at plan: %s", op_id, exc)
            self._j.finish(op_id, ops.OperationState.FAILED, error=exc)
            return
        self._progress(op_id, "plan")
        self._take(op_id, st.data)

    def _plan(
        self,
        req: api.InstanceSnapshotRequest,
        keys: list[str],
        fixed: dict[str, tuple[str, str]],
    ) -> list[VolPlan]:
        out: list[VolPlan] = []
        for where in self._validate_instance(req):  # again: the chain may have moved
            if where.key not in keys:
                raise api.InvalidRequest(f"disk {where.key} appeared after the request")
            vid = str(where.disk.serial).lower()
            sid, label = fixed.get(vid, (str(uuid.uuid4()), ""))
            name = snapshot_file_name(vid, sid)
            directory = os.path.dirname(where.disk.source)
            if not CINDER.is_image_name(name) or os.path.lexists(os.path.join(directory, name)):
                raise api.InvalidRequest(f"overlay {name} is not a fresh Cinder file name")
            ledger = read_ledger(directory, vid)
            if ledger is not None and sid in ledger.snapshots:
                raise api.InvalidRequest(f"snapshot id {sid} is already in the ledger of {vid}")
            top = os.path.basename(where.disk.source)
            fmt, key = where.disk.fmt, where.key
            out.append(VolPlan(vid, sid, name, directory, top, fmt, key, label, bool(label)))
        return out

    @staticmethod
    def _vols(plan: dict[str, Any]) -> list[VolPlan]:
        return [VolPlan(**v) for v in plan["volumes"]]

    def _take(self, op_id: uuid.UUID, plan: dict[str, Any]) -> None:
        vols, recorded = self._vols(plan), False
        try:
            with self._step(
                op_id, StepName.CINDER_CREATE, {"snapshots": [v.snapshot_id for v in vols]}
            ) as st:
                recorded = True
                st.data["cinder"] = self._create_records(vols)
            self._progress(op_id, "cinder_create")
            with self._step(op_id, StepName.OVERLAYS, {"files": [v.path for v in vols]}):
                for v in vols:
                    top = os.path.join(v.dir, v.top)
                    create_overlay(v.path, top, backing_fmt=v.fmt, roots=self._roots)
            self._progress(op_id, "overlays")
            with self._step(op_id, StepName.SNAPSHOT, None) as st:
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
            what = v.label or f"qsnap instance snapshot ({v.file})"
            meta.create(v.snapshot_id, v.volume_id, what, checkpoint=v.checkpoint)
        return "created"

    def _record(self, op_id: uuid.UUID, plan: dict[str, Any], quiesced: bool) -> None:
        vols = self._vols(plan)
        try:
            with self._step(op_id, StepName.LEDGER, {"volumes": [v.volume_id for v in vols]}):
                for v in vols:
                    self._ledger_add(v)
            self._progress(op_id, "ledger")
            sent = self._finalize(op_id, vols, MetaAction.FINALIZE_AVAILABLE)
        except Exception as exc:  # the snapshot exists: the op fails, the overlays stay live
            LOG.error("instance snapshot %s taken but not recorded: %s", op_id, exc)
            if self._q.meta is not None:  # never leave Cinder's records in 'creating'
                with contextlib.suppress(Exception):
                    self._finalize(op_id, vols, MetaAction.FINALIZE_ERROR)
            self._j.finish(op_id, ops.OperationState.FAILED, error=exc)
            return
        self._progress(op_id, "cinder_finalize")
        if plan.get("nova"):
            try:  # the snapshot exists and Cinder has it: only Nova may still be stale
                self._sync_nova(op_id, plan["domain"], vols, sent)
            except Exception as exc:
                LOG.error("instance snapshot %s: Nova not refreshed: %s", op_id, exc)
                self._j.finish(op_id, ops.OperationState.FAILED, error=exc)
                return
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

    def _finalize(
        self, op_id: uuid.UUID, vols: list[VolPlan], action: MetaAction
    ) -> dict[str, bool]:
        """Each record's change, journaled and tried once (a failed one is resent later);
        whether it landed now, by snapshot id (empty without Cinder)."""
        sent: dict[str, bool] = {}
        with self._step(op_id, StepName.CINDER_FINALIZE, {"action": action.value}) as st:
            if self._q.meta is None:
                st.data["cinder"] = "skipped: [cinder] enabled is false"
            else:  # journaled notices: a failed one is resent, never dropped
                sent = {
                    v.snapshot_id: self._q.send_meta(v.snapshot_id, action, op_id) for v in vols
                }
                st.data["delivered"] = sent
        return sent

    def _sync_nova(
        self, op_id: uuid.UUID, domain: str, vols: list[VolPlan], sent: dict[str, bool]
    ) -> None:
        """Nova reads the new top from Cinder's attachments, which finalize rewrote: every
        finalize must have landed first, else Nova would copy the old name."""
        late = sorted(sid for sid in (v.snapshot_id for v in vols) if not sent.get(sid))
        if late:
            raise RecordsStale(
                f"Cinder's records of snapshots {late} are not updated yet (resent later): "
                "Nova's block-device mapping was not refreshed"
            )
        self._nova_refresh(op_id, domain, {v.volume_id: BdmState(v.file, "qcow2") for v in vols})

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
            with self._step(op_id, StepName.CLEANUP, {"files": [v.path for v in vols]}) as st:
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

    def resume(self, op: ops.Operation, last: dict[str, ops.Step]) -> str:
        plan_step = last.get(StepName.PLAN)
        if plan_step is None or plan_step.state is not ops.StepState.DONE:
            err = ops.ErrorInfo("RecoveredFailure", "restart before the plan: no snapshot taken")
            self._j.finish(op.id, ops.OperationState.FAILED, error=err)
            return "not planned: failed, no snapshot taken"
        plan, vols = plan_step.data, self._vols(plan_step.data)
        recorded = "cinder_create" in last
        with contextlib.suppress(Exception):
            if self._hv.thaw_if_frozen(plan["domain"]):
                LOG.warning("recovery thawed %s (instance snapshot %s)", plan["domain"], op.id)
        fin = last.get(StepName.CINDER_FINALIZE)
        failed = next((s for s in last.values() if s.state is ops.StepState.FAILED), None)
        if fin is not None and fin.data.get("action") == MetaAction.FINALIZE_ERROR.value:
            why = ops.ErrorInfo("RecoveredFailure", "failed before the restart")
            self._fail(op.id, plan, why, recorded)
            return "failed before the restart: cleanup + finalize error again"
        if failed is not None or "cleanup" in last:
            name = failed.name if failed else StepName.CLEANUP
            self._fail(
                op.id, plan, ops.ErrorInfo("RecoveredFailure", f"step {name} failed"), recorded
            )
            return f"step {name} failed: cleanup + finalize error"
        snap = last.get(StepName.SNAPSHOT)
        taken = snap is not None and snap.state is ops.StepState.DONE
        if snap is not None and snap.state is ops.StepState.PLANNED:
            tops = self._live_tops(vols)
            taken = all(tops.get(v.volume_id) == v.file for v in vols)
            if taken:
                self._j.step_done(op.id, snap.seq, {"recovered": True, "chains": tops})
            else:
                self._j.step_undone(op.id, snap.seq, {"recovery": f"live tops {tops}"})
        if taken:
            quiesced = bool(self._j_step(op.id, StepName.SNAPSHOT).get("quiesced"))
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
