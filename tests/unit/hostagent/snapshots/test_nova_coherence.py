"""Nova guests: chain changes the agent makes by itself end with Nova's BDM refreshed and
compared, are refused up front when Nova's side is not there, and assisted requests for a
Nova guest come through Nova (reporter NOVA: the agent posts nothing to Cinder).

The hypervisor and Nova's side are fakes; Nova's side answers what Cinder's records (the
FakeMeta) imply, or a stale name when told to (the negative control of the comparison).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hostagent.cinder.records import ActiveFile
from hostagent.nova_records import NovaRecords, RecordsStale
from hostagent.rpc import contract as api
from hostagent.rpc.nova_side import BdmState, NovaSideError
from tests.unit.hostagent.fakes import CTX, DOM, VOL, VOLS, Agent, Bed, FakeHypervisor, FakeMeta


class FakeNovaSide:
    """Nova's side: ``bdm`` maps volume -> what a refresh makes the BDM name."""

    def __init__(self, hv: FakeHypervisor) -> None:
        self.hv = hv
        self.down = False
        self.stale: set[str] = set()  # volumes whose refresh keeps the old name
        self.calls: list[tuple[str, ...]] = []

    def ping(self, timeout: float | None = None) -> dict[str, Any]:
        self.calls.append(("ping",))
        if self.down:
            raise NovaSideError("no answer in 5 s")
        return {"host": "h", "driver": "fake"}

    def refresh_volume(self, instance_uuid: str, volume_id: str) -> BdmState:
        self.calls.append(("refresh", instance_uuid, volume_id))
        if self.down:
            raise NovaSideError("no answer")
        if volume_id in self.stale:
            return BdmState(f"volume-{volume_id}", "raw")
        return BdmState(self.hv.chains[volume_id][0], "qcow2")  # the fake's disks: qcow2


@pytest.fixture
def hv(tmp_path: Path) -> FakeHypervisor:
    h = FakeHypervisor(tmp_path / "share", VOLS)
    h.nova = True
    return h


@pytest.fixture
def side(hv: FakeHypervisor) -> FakeNovaSide:
    return FakeNovaSide(hv)


@pytest.fixture
def meta() -> FakeMeta:
    return FakeMeta()


@pytest.fixture
def agent(
    tmp_path: Path, hv: FakeHypervisor, meta: FakeMeta, side: FakeNovaSide
) -> Iterator[Agent]:
    a = Agent(tmp_path, hv, meta=meta, nova=NovaRecords(side, ping_timeout=1.0))
    yield a
    a.close()


def _snap(agent: Agent, vols: list[str] | None) -> api.Operation:
    req = api.InstanceSnapshotRequest.from_wire(DOM, vols, "preferred")
    return agent.wait(agent.svc.snapshot_instance(CTX, req))


def _files(hv: FakeHypervisor) -> set[str]:
    return set(os.listdir(hv.dir))


def test_instance_snapshot_ends_with_every_bdm_refreshed(
    agent: Agent, hv: FakeHypervisor, side: FakeNovaSide
) -> None:
    op = _snap(agent, VOLS[:2])
    assert op.state is api.OperationState.SUCCEEDED, op.error
    names = [s["name"] for s in op.result["steps"]]
    assert names[-2:] == ["cinder_finalize", "nova_refresh"]
    refreshed = sorted(c[2] for c in side.calls if c[0] == "refresh")
    assert refreshed == sorted(VOLS[:2]) and all(
        c[1] == DOM for c in side.calls if c[0] == "refresh"
    )
    bdm = op.result["steps"][-1]["data"]["bdm"]
    for vid in VOLS[:2]:
        assert bdm[vid] == {"name": hv.chains[vid][0], "format": "qcow2"}


def test_bdm_left_stale_fails_the_operation_and_keeps_the_snapshot(
    agent: Agent, hv: FakeHypervisor, side: FakeNovaSide, meta: FakeMeta
) -> None:
    """Negative control of the comparison: a refresh that keeps the old name is caught."""
    side.stale.add(VOLS[0])
    op = _snap(agent, [VOLS[0]])
    assert op.state is api.OperationState.FAILED
    assert op.error is not None and "names" in op.error["message"]
    assert op.error["code"] == "RecordsStale"
    sid = hv.chains[VOLS[0]][0].rsplit(".", 1)[1]
    assert meta.records[sid] == "available"  # the snapshot exists: not marked error


def test_nova_side_down_refuses_before_anything_is_touched(
    agent: Agent, hv: FakeHypervisor, side: FakeNovaSide, meta: FakeMeta
) -> None:
    side.down = True
    before = _files(hv)
    with pytest.raises(api.NovaUnavailable, match="cannot be reached"):
        agent.svc.snapshot_instance(CTX, api.InstanceSnapshotRequest.from_wire(DOM, None, "none"))
    assert agent.journal.list_operations() == [] and meta.calls == [] and _files(hv) == before
    assert hv.calls == [] and not hv.frozen


def test_nova_guest_on_an_agent_without_nova_is_refused(tmp_path: Path, hv: FakeHypervisor) -> None:
    a = Agent(tmp_path, hv, meta=FakeMeta())  # [nova] enabled = false
    try:
        with pytest.raises(api.NovaUnavailable, match=r"\[nova\] enabled"):
            a.svc.snapshot_instance(CTX, api.InstanceSnapshotRequest.from_wire(DOM, None, "none"))
        assert a.journal.list_operations() == []
        hv.nova = False  # a guest Nova does not manage: no Nova needed (the control)
        op = a.wait(
            a.svc.snapshot_instance(CTX, api.InstanceSnapshotRequest.from_wire(DOM, None, "none"))
        )
        assert op.state is api.OperationState.SUCCEEDED, op.error
        assert "nova_refresh" not in [s["name"] for s in op.result["steps"]]
    finally:
        a.close()


def test_owned_delete_of_the_newest_refreshes_to_the_new_top(
    agent: Agent, hv: FakeHypervisor, side: FakeNovaSide, meta: FakeMeta
) -> None:
    vid = VOLS[0]
    sid = _snap(agent, [vid]).result["snapshots"][0]["snapshot_id"]
    side.calls.clear()
    req = api.DeleteOwnedSnapshotRequest.from_wire(vid, sid)
    op = agent.wait(agent.svc.delete_snapshot(CTX, req))
    assert op.state is api.OperationState.SUCCEEDED, op.error
    assert [s["name"] for s in op.result["steps"]][-1] == "nova_refresh"
    assert hv.chains[vid] == [f"volume-{vid}"]
    assert side.calls == [("ping",), ("ping",), ("refresh", DOM, vid)]  # accept, run, after
    # the fake's disks are qcow2 whatever their name; the BDM must say the live format
    want = op.result["steps"][-1]["data"]["expected"][vid]
    assert want == {"name": f"volume-{vid}", "format": "qcow2"}
    # Cinder heard the same active file with the record's deletion (its attachment follows)
    assert meta.active[sid] == ActiveFile(f"volume-{vid}", "qcow2")


def test_owned_delete_with_a_stale_bdm_fails(
    agent: Agent, hv: FakeHypervisor, side: FakeNovaSide
) -> None:
    vid = VOLS[0]
    sid = _snap(agent, [vid]).result["snapshots"][0]["snapshot_id"]
    side.stale.add(vid)  # answers volume-<vid> raw; the live top is volume-<vid> qcow2 here
    op = agent.wait(
        agent.svc.delete_snapshot(CTX, api.DeleteOwnedSnapshotRequest.from_wire(vid, sid))
    )
    assert op.state is api.OperationState.FAILED and op.error is not None
    assert op.error["code"] == "RecordsStale"


def test_a_refresh_nova_did_not_answer_is_retried(hv: FakeHypervisor, side: FakeNovaSide) -> None:
    slept: list[float] = []
    records = NovaRecords(side, attempts=3, sleep=slept.append)
    real = side.refresh_volume
    fails = [NovaSideError("blip")]

    def flaky(instance_uuid: str, volume_id: str) -> BdmState:
        if fails:
            raise fails.pop()
        return real(instance_uuid, volume_id)

    side.refresh_volume = flaky  # type: ignore[method-assign]
    want = BdmState(hv.chains[VOLS[0]][0], "qcow2")
    assert records.refresh(DOM, {VOLS[0]: want}) == {VOLS[0]: want.to_wire()} and slept == [1.0]
    side.down = True  # never answers: three tries, then stale (the op is not reported done)
    side.refresh_volume = real  # type: ignore[method-assign]
    with pytest.raises(RecordsStale, match="no answer"):
        records.refresh(DOM, {VOLS[0]: want})
    assert slept == [1.0, 1.0, 2.0]


def test_records_refresh_without_nova_side_is_stale() -> None:
    with pytest.raises(RecordsStale):
        NovaRecords().refresh(DOM, {VOL: BdmState("volume-x", "raw")})
    assert NovaRecords().guard(DOM, nova_managed=False) is False


# -- assisted requests for a Nova guest --------------------------------------------------
@pytest.fixture
def bed(tmp_path: Path) -> Bed:
    b = Bed(tmp_path)
    b.hv.nova = True
    return b


def _create(agent: Agent, snap: str, new_file: str, reporter: str) -> api.Operation:
    info = {"snapshot_id": snap, "type": "qcow2", "new_file": new_file}
    req = api.CreateSnapshotRequest.from_wire(VOL, info, reporter)
    return agent.svc.create_assisted_snapshot(CTX, req)


def test_assisted_create_through_qsnap_api_for_a_nova_guest_is_refused(bed: Bed) -> None:
    agent = bed.agent()
    try:
        snap = str(uuid.uuid4())
        name = bed.precreate(snap)
        with pytest.raises(api.InvalidRequest, match="Nova manages"):
            _create(agent, snap, name, "cinder")
        assert agent.journal.list_operations() == [] and bed.hv.chain == [bed.base]
        op = agent.wait(_create(agent, snap, name, "nova"))  # through Nova's driver
        assert op.state is api.OperationState.SUCCEEDED, op.error
        assert bed.hv.chain == [name, bed.base]
        assert bed.notifier.sent == []  # Nova reports to Cinder, not the agent
        notify = [s for s in op.result["steps"] if s["name"] == "notify"]
        assert notify[0]["data"]["delivered"] == "by nova"
    finally:
        agent.close()


def test_reporter_is_checked_on_the_wire() -> None:
    sid = str(uuid.uuid4())
    info = {"snapshot_id": sid, "type": "qcow2", "new_file": f"volume-{VOL}.{sid}"}
    with pytest.raises(api.InvalidRequest, match="reporter"):
        api.CreateSnapshotRequest.from_wire(VOL, info, "glance")
    delete_info = {"type": "qcow2", "file_to_merge": None, "merge_target_file": None}
    req = api.DeleteSnapshotRequest.from_wire(VOL, str(uuid.uuid4()), delete_info, "nova")
    assert req.reporter is api.Reporter.NOVA
