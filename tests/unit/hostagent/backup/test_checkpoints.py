"""Recovery of a kill -9 during a checkpoint release (or any merge) that left a block job.

The agent dies with an ACTIVE COMMIT running in libvirt: the fake hypervisor then reports a
READY job forever (as libvirt does until somebody pivots), which a poll-only recovery could
only time out on; ``settle_job`` pivots it. Real qcow2 files and a real journal; the crash
is a ``BaseException`` raised inside the release, like kill -9 right after the job started.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from hostagent.backup.checkpoints import recover_release
from hostagent.cinder.status import Report
from hostagent.journal.model import OperationKind, OperationState, StepState
from hostagent.journal.store import Journal
from hostagent.recovery import reconcile
from hostagent.rpc import contract as api
from hostagent.service import Located
from tests.unit.hostagent.fakes import (
    CTX,
    DOM,
    VOL,
    VOLS,
    Agent,
    Bed,
    Crash,
    FakeHypervisor,
    FakeMeta,
    make_image,
)


class KilledRelease:
    """A backup engine whose release dies right after starting the active commit."""

    def __init__(self, hv: FakeHypervisor, started: bool) -> None:
        self.hv, self.started = hv, started

    def release(self, where: Located) -> str | None:
        if self.started:
            self.hv.left = "active"
        self.hv.died.set()
        raise Crash("release_checkpoint:job" if self.started else "release_checkpoint:planned")


def _bed(tmp_path: Path) -> tuple[Bed, FakeHypervisor, str]:
    bed = Bed(tmp_path)
    overlay = f"volume-{VOL}.qsnap-bk-{uuid.uuid4()}"
    make_image(bed.dir / overlay, bed.base)
    bed.hv.chain.insert(0, overlay)
    return bed, bed.hv, overlay


def _killed_create(bed: Bed, hv: FakeHypervisor, started: bool) -> tuple[str, str, uuid.UUID]:
    snap = str(uuid.uuid4())
    name = f"volume-{VOL}.{snap}"
    make_image(bed.dir / name, bed.base)  # Cinder backs new_file on ITS active file
    first = bed.agent(engine=KilledRelease(hv, started))  # type: ignore[arg-type]
    op = first.svc.create_assisted_snapshot(CTX, api.CreateSnapshotRequest(VOL, snap, name))
    assert hv.died.wait(30)
    first.close()
    return snap, name, uuid.UUID(op.id)


def test_create_killed_mid_release_is_settled_then_reported_error(tmp_path: Path) -> None:
    bed, hv, overlay = _bed(tmp_path)
    snap, name, op_id = _killed_create(bed, hv, started=True)
    assert hv.chain == [overlay, bed.base] and hv.left == "active"
    agent = bed.agent()
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
        make_image(bed.dir / name2, bed.base)
        op2 = agent.svc.create_assisted_snapshot(CTX, api.CreateSnapshotRequest(VOL, snap2, name2))
        assert agent.idle(30)
        assert agent.svc.get_operation(CTX, op2.id).state is api.OperationState.SUCCEEDED
        assert hv.chain == [name2, bed.base]
    finally:
        agent.close()


def test_release_that_never_started_keeps_the_checkpoint(tmp_path: Path) -> None:
    bed, hv, overlay = _bed(tmp_path)
    snap, _name, op_id = _killed_create(bed, hv, started=False)
    agent = bed.agent()
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
    hv = bed.hv
    s1 = str(uuid.uuid4())
    f1, f2 = bed.snapshot_now(s1), bed.snapshot_now(str(uuid.uuid4()))
    req = api.DeleteSnapshotRequest(VOL, s1, f1, bed.base)
    first = bed.agent()

    def killed(where: Located, to_merge: Any, target: Any, progress: Any) -> dict[str, Any]:
        hv.left, hv.pending_merge = "commit", (to_merge, target)
        hv.job_polls = 10**9  # a poll-only recovery would wait for its whole timeout
        hv.died.set()
        raise Crash("merge:job")

    hv.merge = killed  # type: ignore[method-assign]
    first.svc.delete_assisted_snapshot(CTX, req)
    assert hv.died.wait(30)
    first.close()
    del hv.merge
    agent = bed.agent()
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
    hv = FakeHypervisor(share)  # the overlay left the chain, but the volume is elsewhere
    overlay = f"volume-{VOL}.qsnap-bk-{uuid.uuid4()}"
    make_image(share / overlay, f"volume-{VOL}")
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


def _owned(tmp_path: Path) -> tuple[FakeHypervisor, FakeMeta, Agent, str, str]:
    """Three volumes of an instance; the first has one snapshot: (.., its volume, its id)."""
    hv, meta, vid = FakeHypervisor(tmp_path / "share", VOLS), FakeMeta(), VOLS[0]
    first = Agent(tmp_path, hv, meta=meta)
    req = api.InstanceSnapshotRequest.from_wire(DOM, [vid], "preferred")
    op = first.wait(first.svc.snapshot_instance(CTX, req))
    return hv, meta, first, vid, op.result["snapshots"][0]["snapshot_id"]


def test_owned_delete_killed_mid_release_then_runs_the_delete(tmp_path: Path) -> None:
    hv, meta, first, vid, sid = _owned(tmp_path)
    d = hv.dir
    snap_file = hv.chains[vid][0]
    overlay = f"volume-{vid}.qsnap-bk-{uuid.uuid4()}"
    make_image(d / overlay, snap_file)
    hv.chains[vid].insert(0, overlay)

    def killed(where: Located) -> str | None:
        hv.left = "active"  # the active commit the dead agent never pivoted
        hv.died.set()
        raise Crash("release_checkpoint:job")

    first.svc.owned.deletes.release = killed
    op = first.svc.delete_snapshot(CTX, api.DeleteOwnedSnapshotRequest(vid, sid))
    assert hv.died.wait(30)
    first.close()
    again = Agent(tmp_path, hv, meta=meta)
    try:
        again.restart()
        final = again.svc.get_operation(CTX, op.id)
        assert final.state is api.OperationState.SUCCEEDED, final.error
        assert hv.pivoted == [overlay] and not (d / overlay).exists()
        assert hv.chains[vid] == [f"volume-{vid}"]
        names = [(s["name"], s["state"]) for s in final.result["steps"]]
        assert names[0] == ("release_checkpoint", "done") and ("merge", "done") in names
        assert sid not in meta.records
    finally:
        again.close()


def test_owned_delete_of_the_newest_killed_mid_active_commit_is_pivoted(tmp_path: Path) -> None:
    hv, meta, first, vid, sid = _owned(tmp_path)

    def killed(where: Located, file: str, progress: Any) -> dict[str, Any]:
        hv.left = "active"  # READY forever: a poll-only resume would wait its whole timeout
        hv.died.set()
        raise Crash("merge:job")

    hv.merge_owned = killed  # type: ignore[method-assign]
    op = first.svc.delete_snapshot(CTX, api.DeleteOwnedSnapshotRequest(vid, sid))
    assert hv.died.wait(30)
    first.close()
    del hv.merge_owned
    again = Agent(tmp_path, hv, meta=meta)
    try:
        again.restart()
        final = again.svc.get_operation(CTX, op.id)
        assert final.state is api.OperationState.SUCCEEDED, final.error
        assert hv.pivoted == [f"volume-{vid}.{sid}"] and hv.chains[vid] == [f"volume-{vid}"]
        assert not (hv.dir / f"volume-{vid}.{sid}").exists()  # removed once out of the chain
        assert not [c for c in hv.calls if c[0] == "merge"], "merged again"
    finally:
        again.close()


def test_delete_killed_before_its_release_releases_then_merges(tmp_path: Path) -> None:
    """Killed at release_checkpoint:planned: the checkpoint is still the top after the
    restart, so recovery must release it (with the engine's release) before the merge Cinder
    asked for can be judged; without ``release`` that delete could only fail."""
    bed = Bed(tmp_path)
    hv = bed.hv
    s1 = str(uuid.uuid4())
    f1, f2 = bed.snapshot_now(s1), bed.snapshot_now(str(uuid.uuid4()))
    overlay = f"volume-{VOL}.qsnap-bk-{uuid.uuid4()}"
    make_image(bed.dir / overlay, f2)
    hv.chain.insert(0, overlay)
    first = bed.agent(engine=KilledRelease(hv, started=False))  # type: ignore[arg-type]
    first.svc.delete_assisted_snapshot(CTX, api.DeleteSnapshotRequest(VOL, s1, f1, bed.base))
    assert hv.died.wait(30)
    first.close()
    assert hv.chain == [overlay, f2, f1, bed.base]
    released: list[str] = []

    def release(where: Located) -> str | None:
        top = hv.chain.pop(0)  # active commit + pivot of the checkpoint, file removed
        (bed.dir / top).unlink()
        released.append(top)
        return top

    agent = bed.agent()
    try:
        agent.svc.assisted.release = release
        reconcile(agent.journal, agent.svc.resumers(job_timeout=3600.0))
        assert agent.idle(30)
        agent.queue.flush(due_only=False)
        assert released == [overlay]
        assert hv.chain == [f2, bed.base]  # f1 committed into the base as Cinder asked
        assert bed.notifier.sent == [(s1, Report.DELETE_DONE)]
        assert agent.journal.unfinished() == []
    finally:
        agent.close()
