"""Recovery of a kill -9 during a checkpoint release (or any merge) that left a block job.

The agent dies with an ACTIVE COMMIT running in libvirt: the fake hypervisor then reports a
READY job forever (as libvirt does until somebody pivots), which a poll-only recovery could
only time out on; ``settle_job`` pivots it. Real qcow2 files and a real journal; the crash
is a ``BaseException`` raised inside the release, like kill -9 right after the job started.
"""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from hostagent.backup.checkpoints import recover_release, settle_of
from hostagent.cinder.status import Report
from hostagent.journal.model import OperationKind, OperationState, StepState
from hostagent.journal.store import Journal
from hostagent.recovery import reconcile
from hostagent.rpc import contract as api
from hostagent.service import AssistedService, Located
from tests.unit.hostagent.snapshots import test_owned as owned_t
from tests.unit.hostagent.test_recovery import Agent, Bed, RecHv, _Crash
from tests.unit.hostagent.test_service import VOL, _img

CTX = api.CallContext()


class JobHv(RecHv):
    """RecHv plus a job a dead agent left: ``left`` is 'active' (READY forever) or 'merge'
    (a commit that ends when settled); ``settle_job`` finishes it as libvirt_ops would."""

    def __init__(self, directory: Path, chain: list[str]) -> None:
        super().__init__(directory, chain)
        self.left: str | None = None
        self.pending_merge: tuple[str | None, str | None] | None = None
        self.settles: list[dict[str, Any]] = []
        self.died = threading.Event()

    def block_job(self, where: Located) -> dict[str, int]:
        if self.left == "active":
            return {"type": 4, "cur": 5, "end": 5}  # READY: never ends without a pivot
        return super().block_job(where)

    def settle_job(self, where: Located, timeout: float) -> dict[str, Any]:
        found: dict[str, Any] = {"found": None, "pivoted": False}
        if self.left == "active":
            self.chain.pop(0)  # pivot onto the commit base
            found = {"found": "ACTIVE_COMMIT", "pivoted": True}
        elif self.left == "merge" and self.pending_merge is not None:
            self.apply_merge(*self.pending_merge)
            found = {"found": "COMMIT", "pivoted": False}
        self.left = None
        self.settles.append(found)
        return found


class KilledRelease:
    """A backup engine whose release dies right after starting the active commit."""

    def __init__(self, hv: JobHv, started: bool) -> None:
        self.hv, self.started = hv, started

    def release(self, where: Located) -> str | None:
        if self.started:
            self.hv.left = "active"
        self.hv.died.set()
        raise _Crash("release_checkpoint:job" if self.started else "release_checkpoint:planned")


def _bed(tmp_path: Path) -> tuple[Bed, JobHv, str]:
    bed = Bed(tmp_path)
    hv = JobHv(bed.dir, [bed.base])
    bed.hv = hv
    overlay = f"volume-{VOL}.qsnap-bk-{uuid.uuid4()}"
    _img(bed.dir / overlay, bed.base)
    hv.chain.insert(0, overlay)
    return bed, hv, overlay


def _killed_create(bed: Bed, hv: JobHv, started: bool) -> tuple[str, str, uuid.UUID]:
    snap = str(uuid.uuid4())
    name = f"volume-{VOL}.{snap}"
    _img(bed.dir / name, bed.base)  # Cinder backs new_file on ITS active file
    first = Agent(bed.tmp, hv, bed.notifier)
    first.svc = AssistedService(
        first.journal, hv, first.queue, first.pool, roots=[str(bed.dir)],
        backup_engine=KilledRelease(hv, started),  # type: ignore[arg-type]
    )  # fmt: skip
    op = first.svc.create_assisted_snapshot(CTX, api.CreateSnapshotRequest(VOL, snap, name))
    assert hv.died.wait(30)
    first.pool.shutdown(wait=True)
    first.journal.close()
    return snap, name, uuid.UUID(op.id)


def test_create_killed_mid_release_is_settled_then_reported_error(tmp_path: Path) -> None:
    bed, hv, overlay = _bed(tmp_path)
    snap, name, op_id = _killed_create(bed, hv, started=True)
    assert hv.chain == [overlay, bed.base] and hv.left == "active"
    agent = Agent(bed.tmp, hv, bed.notifier)
    try:
        (out,) = agent.restart()
        assert f"released {overlay}" in out.decision and "error" in out.decision
        assert hv.settles == [{"found": "ACTIVE_COMMIT", "pivoted": True}]
        assert hv.chain == [bed.base] and not (bed.dir / overlay).exists()
        steps = agent.journal.steps(op_id)
        rel = next(s for s in steps if s.name == "release_checkpoint")
        assert rel.state is StepState.DONE and rel.data["recovered"] is True
        assert rel.data["removed"] is True and rel.data["chain"] == [bed.base]
        assert agent.journal.get(op_id).state is OperationState.FAILED
        assert bed.notifier.sent == [(snap, Report.CREATE_FAILED)]  # snapshot never taken
        assert agent.journal.unfinished() == []
        assert (bed.dir / name).exists()  # Cinder's overlay: never ours to remove
        # Cinder's retry (a new snapshot) works on the clean chain
        snap2 = str(uuid.uuid4())
        name2 = f"volume-{VOL}.{snap2}"
        _img(bed.dir / name2, bed.base)
        op2 = agent.svc.create_assisted_snapshot(CTX, api.CreateSnapshotRequest(VOL, snap2, name2))
        assert agent.pool.wait_idle(30)
        assert agent.svc.get_operation(CTX, op2.id).state is api.OperationState.SUCCEEDED
        assert hv.chain == [name2, bed.base]
    finally:
        agent.close()


def test_release_that_never_started_keeps_the_checkpoint(tmp_path: Path) -> None:
    bed, hv, overlay = _bed(tmp_path)
    snap, _name, op_id = _killed_create(bed, hv, started=False)
    agent = Agent(bed.tmp, hv, bed.notifier)
    try:
        (out,) = agent.restart()
        assert "release never took effect" in out.decision
        assert hv.settles == [{"found": None, "pivoted": False}]
        assert hv.chain == [overlay, bed.base] and (bed.dir / overlay).exists()
        rel = next(s for s in agent.journal.steps(op_id) if s.name == "release_checkpoint")
        assert rel.state is StepState.UNDONE
        assert bed.notifier.sent == [(snap, Report.CREATE_FAILED)]
        assert agent.journal.unfinished() == []
    finally:
        agent.close()


def test_delete_merge_left_running_is_settled_not_polled(tmp_path: Path) -> None:
    bed = Bed(tmp_path)
    hv = JobHv(bed.dir, [bed.base])
    bed.hv = hv
    s1 = str(uuid.uuid4())
    f1, f2 = bed.snapshot_now(s1), bed.snapshot_now(str(uuid.uuid4()))
    req = api.DeleteSnapshotRequest(VOL, s1, f1, bed.base)
    first = Agent(bed.tmp, hv, bed.notifier)

    def killed(where: Located, to_merge: Any, target: Any, progress: Any) -> dict[str, Any]:
        hv.left, hv.pending_merge = "merge", (to_merge, target)
        hv.job_polls = 10**9  # a poll-only recovery would wait for its whole timeout
        hv.died.set()
        raise _Crash("merge:job")

    hv.merge = killed  # type: ignore[method-assign]
    first.svc.delete_assisted_snapshot(CTX, req)
    assert hv.died.wait(30)
    first.pool.shutdown(wait=True)
    first.journal.close()
    del hv.merge
    agent = Agent(bed.tmp, hv, bed.notifier)
    try:
        agent.restart()
        assert hv.settles == [{"found": "COMMIT", "pivoted": False}]
        assert hv.chain == [f2, bed.base]
        assert bed.notifier.sent == [(s1, Report.DELETE_DONE)]
        assert not [c for c in hv.calls if c[0] == "merge"], "merged twice"
        assert agent.journal.unfinished() == []
    finally:
        agent.close()


def test_recover_release_refuses_what_it_cannot_judge(tmp_path: Path) -> None:
    j = Journal(str(tmp_path / "j.sqlite"), host="h")
    share = tmp_path / "share"
    share.mkdir()
    base = f"volume-{VOL}"
    _img(share / base)
    overlay = f"volume-{VOL}.qsnap-bk-{uuid.uuid4()}"
    _img(share / overlay, base)
    hv = JobHv(share, [base])  # the overlay left the chain, but the volume is elsewhere
    try:
        op = j.begin(OperationKind.ASSISTED_CREATE, {"volume_id": VOL}).operation
        bad = j.plan_step(op.id, "release_checkpoint", {"overlay": "volume-x.info"})
        gone = j.plan_step(op.id, "release_checkpoint", {"overlay": overlay})

        def nowhere(vid: str) -> Located:
            raise api.VolumeNotFound(vid)

        out = recover_release(j, op.id, [bad, gone], nowhere, hv.settle_job, [str(share)], 5)
        assert "not a checkpoint name" in out[0] and "not attached here" in out[1]
        assert [s.state for s in j.steps(op.id)] == [StepState.UNDONE, StepState.UNDONE]
        assert (share / overlay).exists(), "nothing is removed without the live chain"
        assert hv.settles == []
    finally:
        j.close()


def test_settle_of_prefers_settle_job_and_else_waits_bounded(tmp_path: Path) -> None:
    hv = JobHv(tmp_path, [])
    assert settle_of(hv) == hv.settle_job

    class Seer:
        def __init__(self, polls: int) -> None:
            self.polls = polls

        def block_job(self, where: Located) -> dict[str, int]:
            self.polls -= 1
            return {"type": 3, "cur": 1, "end": 2} if self.polls >= 0 else {}

    where = Located("d", _disk())
    assert settle_of(Seer(2))(where, 30) == {"found": 3, "pivoted": False}
    with pytest.raises(TimeoutError):
        settle_of(Seer(10**9))(where, 0.3)


def _disk() -> Any:
    from libvirt_ops import ChainLayer, Disk

    return Disk("vdb", VOL, "virtio", (ChainLayer(f"/x/volume-{VOL}", "qcow2", None),))


def test_owned_delete_killed_mid_release_then_runs_the_delete(tmp_path: Path) -> None:
    d = tmp_path / "share"
    d.mkdir()
    hv = owned_t.MultiHv(d)
    meta = owned_t.FakeMeta()
    vid = owned_t.VOLS[0]
    first = owned_t.Agent(tmp_path, hv, meta)
    sid = owned_t._snap(first, [vid]).result["snapshots"][0]["snapshot_id"]
    snap_file = hv.chains[vid][0]
    overlay = f"volume-{vid}.qsnap-bk-{uuid.uuid4()}"
    _img(d / overlay, snap_file)
    hv.chains[vid].insert(0, overlay)
    settles: list[str] = []

    def settle_job(where: Located, timeout: float) -> dict[str, Any]:
        if hv.chains[vid][0] == overlay:
            hv.chains[vid].pop(0)  # the pivot the dead agent never did
            settles.append("pivoted")
        return {"found": "ACTIVE_COMMIT", "pivoted": True}

    died = threading.Event()

    def killed(where: Located) -> str | None:
        died.set()
        raise _Crash("release_checkpoint:job")

    hv.settle_job = settle_job  # type: ignore[attr-defined]
    first.svc.owned.deletes.release = killed
    op = first.svc.delete_snapshot(CTX, api.DeleteOwnedSnapshotRequest(vid, sid))
    assert died.wait(30)
    first.close()
    again = owned_t.Agent(tmp_path, hv, meta)
    try:
        again.restart()
        final = again.svc.get_operation(CTX, op.id)
        assert final.state is api.OperationState.SUCCEEDED, final.error
        assert settles == ["pivoted"] and not (d / overlay).exists()
        assert hv.chains[vid] == [f"volume-{vid}"]
        names = [(s["name"], s["state"]) for s in final.result["steps"]]
        assert names[0] == ("release_checkpoint", "done") and ("merge", "done") in names
        assert sid not in meta.records
    finally:
        again.close()


def test_owned_delete_of_the_newest_killed_mid_active_commit_is_pivoted(tmp_path: Path) -> None:
    d = tmp_path / "share"
    d.mkdir()
    hv = owned_t.MultiHv(d)
    meta = owned_t.FakeMeta()
    vid = owned_t.VOLS[0]
    first = owned_t.Agent(tmp_path, hv, meta)
    sid = owned_t._snap(first, [vid]).result["snapshots"][0]["snapshot_id"]
    died, pivots = threading.Event(), []
    real_merge = hv.merge_owned

    def killed(where: Located, file: str, progress: Any) -> dict[str, Any]:
        hv.job_polls = 10**9  # READY forever: a poll-only resume would wait its whole timeout
        died.set()
        raise _Crash("merge:job")

    def settle_job(where: Located, timeout: float) -> dict[str, Any]:
        hv.job_polls = 0
        pivots.append(hv.chains[vid].pop(0))  # the pivot onto the base
        return {"found": "ACTIVE_COMMIT", "pivoted": True}

    hv.merge_owned = killed  # type: ignore[method-assign]
    op = first.svc.delete_snapshot(CTX, api.DeleteOwnedSnapshotRequest(vid, sid))
    assert died.wait(30)
    first.close()
    hv.merge_owned = real_merge  # type: ignore[method-assign]
    hv.settle_job = settle_job  # type: ignore[attr-defined]
    again = owned_t.Agent(tmp_path, hv, meta)
    try:
        again.restart()
        final = again.svc.get_operation(CTX, op.id)
        assert final.state is api.OperationState.SUCCEEDED, final.error
        assert pivots == [f"volume-{vid}.{sid}"] and hv.chains[vid] == [f"volume-{vid}"]
        assert not (d / f"volume-{vid}.{sid}").exists()  # removed once out of the chain
        assert not [c for c in hv.calls if c[0] == "merge"], "merged again"
    finally:
        again.close()


def test_delete_killed_before_its_release_releases_then_merges(tmp_path: Path) -> None:
    """Killed at release_checkpoint:planned: the checkpoint is still the top after the
    restart, so recovery must release it (with the engine's release) before the merge Cinder
    asked for can be judged; without ``release`` that delete could only fail."""
    bed = Bed(tmp_path)
    hv = JobHv(bed.dir, [bed.base])
    bed.hv = hv
    s1 = str(uuid.uuid4())
    f1, f2 = bed.snapshot_now(s1), bed.snapshot_now(str(uuid.uuid4()))
    overlay = f"volume-{VOL}.qsnap-bk-{uuid.uuid4()}"
    _img(bed.dir / overlay, f2)
    hv.chain.insert(0, overlay)
    first = Agent(bed.tmp, hv, bed.notifier)
    first.svc = AssistedService(
        first.journal, hv, first.queue, first.pool, roots=[str(bed.dir)],
        backup_engine=KilledRelease(hv, started=False),  # type: ignore[arg-type]
    )  # fmt: skip
    first.svc.delete_assisted_snapshot(CTX, api.DeleteSnapshotRequest(VOL, s1, f1, bed.base))
    assert hv.died.wait(30)
    first.pool.shutdown(wait=True)
    first.journal.close()
    assert hv.chain == [overlay, f2, f1, bed.base]
    released: list[str] = []

    def release(where: Located) -> str | None:
        top = hv.chain.pop(0)  # active commit + pivot of the checkpoint, file removed
        (bed.dir / top).unlink()
        released.append(top)
        return top

    agent = Agent(bed.tmp, hv, bed.notifier)
    try:
        reconcile(
            agent.journal, hv, agent.queue, submit=agent.pool.submit, roots=[str(bed.tmp)],
            release=release,
        )  # fmt: skip
        assert agent.pool.wait_idle(30)
        agent.queue.flush(due_only=False)
        assert released == [overlay]
        assert hv.chain == [f2, bed.base]  # f1 committed into the base as Cinder asked
        assert bed.notifier.sent == [(s1, Report.DELETE_DONE)]
        assert agent.journal.unfinished() == []
    finally:
        agent.close()
