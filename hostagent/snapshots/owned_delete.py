"""Deleting a snapshot the agent owns (one of its instance snapshots), found in the ledger.

Unlike Cinder's assisted delete (Cinder owns the ledger and removes the merged file), here
the agent does it all: the newest snapshot by ACTIVE COMMIT + pivot into its backing file
(copies only the overlay), an inner one by commit into its backing file; then the ledger
(``active`` moves back when the newest went), the merged-away file, and Cinder's record
(snapshot-delete-metadata; the extension also points the attachment and the volume's format
at the new top), and on a Nova guest Nova's BDM (re-read from that attachment; it must name
the live top). Steps: validate, merge, ledger, remove, cinder_delete, nova_refresh; the merge
reports progress. :meth:`resume` settles a job still on the disk after a crash.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from dataclasses import asdict
from typing import Any

from hostagent.cinder.records import ActiveFile, MetaAction
from hostagent.hypervisor import Located, chain_names
from hostagent.journal import model as ops
from hostagent.journal import store as jn
from hostagent.journal.model import StepName
from hostagent.nova_records import RecordsStale
from hostagent.rpc import contract as api
from hostagent.rpc.nova_side import BdmState
from hostagent.rpc.wire_errors import REUSED_ID, wire_errors
from hostagent.snapshots.owned_base import OwnedBase, checked_ledger
from qcow2 import Ledger, read_ledger, write_ledger

LOG = logging.getLogger(__name__)


class OwnedDeletes(OwnedBase):
    """Accepts, runs and resumes deletes of agent-owned snapshots."""

    def _validate_delete(
        self, req: api.DeleteOwnedSnapshotRequest
    ) -> tuple[Located, dict[str, Any]]:
        where = self._hv.locate(req.volume_id)
        names = self._checked(where)
        directory = os.path.dirname(where.disk.source)
        ledger = checked_ledger(directory, req.volume_id)
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
        nova = self._nova_guard(where.domain_uuid)  # a Nova guest needs Nova's side answering
        return where, {
            "domain": where.domain_uuid,
            "nova": nova,
            "disk": where.key,
            "dir": directory,
            "file": file,
            "base": names[pos + 1],
            "mode": "active-commit" if pos == 0 else "commit",
            "chain": names,
            "expected": names[:pos] + names[pos + 1 :],
        }

    def delete_snapshot(self, req: api.DeleteOwnedSnapshotRequest) -> ops.Operation:
        kind = ops.OperationKind.OWNED_DELETE
        request = {"kind": kind.value, **asdict(req)}
        with wire_errors(REUSED_ID):
            if self._j.find(kind, req.snapshot_id) is None:
                where, _ = self._validate_delete(req)  # raises: nothing journaled or touched
            else:
                where = None  # a retry: answer with the first operation
            begun = self._j.begin(kind, request, req.snapshot_id, [f"volume:{req.volume_id}"])
        if begun.created:
            assert where is not None
            op_id, key = begun.operation.id, where.key
            self._pool.submit(key, lambda: self._locked([key], self._run_delete, op_id, req))
        return begun.operation

    def delete_held(self, req: api.DeleteOwnedSnapshotRequest, why: str) -> ops.Operation:
        """Delete ``req``'s snapshot NOW in the caller's thread, which already holds the
        disk's lock (a backup dropping an older checkpoint). Its own journaled operation,
        resumed after a crash like any other; returns it finished."""
        self._validate_delete(req)  # raises: nothing journaled, nothing touched
        kind = ops.OperationKind.OWNED_DELETE
        request = {"kind": kind.value, **asdict(req), "why": why}
        op_id = self._j.begin(kind, request, None, [f"volume:{req.volume_id}"]).operation.id
        self._run_delete(op_id, req)
        return self._j.get(op_id)

    # -- owned delete -----------------------------------------------------------------------
    def _run_delete(self, op_id: uuid.UUID, req: api.DeleteOwnedSnapshotRequest) -> None:
        try:
            with self._step(op_id, StepName.VALIDATE, None) as st:
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
            with self._step(
                op_id, StepName.MERGE, {"file": plan["file"], "mode": plan["mode"]}
            ) as st:
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
                with self._step(op_id, StepName.LEDGER, {"drop": req.snapshot_id}) as st:
                    st.data["active"] = self._ledger_drop(req, plan)
            if "remove" not in done:
                with self._step(op_id, StepName.REMOVE, {"file": path}) as st:
                    st.data["removed"] = self._remove_merged(req.volume_id, path)
            if "cinder_delete" not in done:
                with self._step(op_id, StepName.CINDER_DELETE, None) as st:
                    if self._q.meta is None:
                        st.data["cinder"] = "skipped: [cinder] enabled is false"
                    else:  # the live top goes along: Cinder's attachment must name it
                        top = self._live_top(req.volume_id)
                        st.data["active"] = asdict(top)
                        st.data["delivered"] = self._q.send_meta(
                            req.snapshot_id, MetaAction.DELETE, op_id, top
                        )
                delivered = st.data.get("delivered", False)
            else:
                delivered = True
            if plan.get("nova") and "nova_refresh" not in done:
                if not delivered:  # Nova copies Cinder's attachment: it must be new first
                    raise RecordsStale(
                        f"Cinder's record of {req.snapshot_id} is not updated yet (resent "
                        "later): Nova's block-device mapping was not refreshed"
                    )
                top = self._live_top(req.volume_id)
                expected = {req.volume_id: BdmState(top.name, top.format)}
                self._nova_refresh(op_id, plan["domain"], expected)
        except Exception as exc:
            LOG.error("owned delete %s merged but not recorded: %s", req.snapshot_id, exc)
            self._j.finish(op_id, ops.OperationState.FAILED, error=exc)
            return
        result = {"volume_id": req.volume_id, "snapshot_id": req.snapshot_id,
                  "merged": path, "kind": plan["mode"]}  # fmt: skip
        self._j.finish(op_id, ops.OperationState.SUCCEEDED, result=result)

    def _live_top(self, volume_id: str) -> ActiveFile:
        """The disk's active file and format as QEMU has them open (the live XML)."""
        live = self._hv.locate(volume_id).disk
        return ActiveFile(os.path.basename(live.source), live.fmt)

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

    def resume(self, op: ops.Operation, last: dict[str, ops.Step], job_timeout: float) -> str:
        req = api.DeleteOwnedSnapshotRequest(
            str(op.request["volume_id"]), str(op.request["snapshot_id"])
        )
        validate, merge = last.get(StepName.VALIDATE), last.get(StepName.MERGE)
        failed = next((s for s in last.values() if s.state is ops.StepState.FAILED), None)
        if failed is not None and failed.name in (StepName.VALIDATE, StepName.MERGE):
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
            names = self._await_job(req.volume_id, job_timeout)
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

    def _await_job(self, volume_id: str, timeout: float) -> list[str]:
        """No BlockJob object survives a crash: the job is adopted and settled, bounded (an
        interrupted active commit of the newest snapshot is READY forever: it is pivoted)."""
        self._hv.settle_job(self._hv.locate(volume_id), timeout)
        return chain_names(self._hv.locate(volume_id), self._roots)
