"""A backup's checkpoints as owned snapshots: ``InstanceSnapshots.take_held``,
``OwnedDeletes.delete_held`` and ``OwnedCheckpoints`` over them.

Each is its own journaled operation run in the caller's thread (a backup's, which holds the
disk's lock), recorded exactly as an instance snapshot is: the ledger maps the caller's id
to ``volume-<vid>.<id>``, Cinder's record carries the label and the checkpoint mark. Real
qcow2 files and ledgers; the hypervisor and Cinder's record client are fakes.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostagent.backup.online import CheckpointFailed
from hostagent.journal.model import OperationKind, OperationState
from hostagent.rpc import contract as api
from hostagent.snapshots.backup_checkpoints import OwnedCheckpoints
from qcow2 import Ledger, read_ledger, write_ledger
from tests.unit.hostagent.fakes import CTX, DOM, VOLS, Agent, FakeHypervisor, FakeMeta

VID = VOLS[0]
BASE = f"volume-{VID}"
LABEL = "qsnap backup checkpoint (operation 1)"


class LabelMeta(FakeMeta):
    """Also keeps what each create said: (volume id, description, checkpoint mark)."""

    def __init__(self) -> None:
        super().__init__()
        self.created: dict[str, tuple[str, str, bool]] = {}

    def create(
        self, snapshot_id: str, volume_id: str, description: str, *, checkpoint: bool = False
    ) -> None:
        self.created[snapshot_id] = (volume_id, description, checkpoint)
        super().create(snapshot_id, volume_id, description, checkpoint=checkpoint)


@pytest.fixture
def hv(tmp_path: Path) -> FakeHypervisor:
    return FakeHypervisor(tmp_path / "share", VOLS)


@pytest.fixture
def meta() -> LabelMeta:
    return LabelMeta()


@pytest.fixture
def agent(tmp_path: Path, hv: FakeHypervisor, meta: LabelMeta) -> Iterator[Agent]:
    a = Agent(tmp_path, hv, meta=meta)
    yield a
    a.close()


def _files(hv: FakeHypervisor) -> set[str]:
    return set(os.listdir(hv.dir))


def _take(agent: Agent, hv: FakeHypervisor, sid: str) -> str:
    return OwnedCheckpoints(agent.svc.owned).take(hv.locate(VID), sid, LABEL, "backup 1")


def test_take_held_records_the_callers_id_and_label_as_a_checkpoint(
    agent: Agent, hv: FakeHypervisor, meta: LabelMeta
) -> None:
    sid = str(uuid.uuid4())
    op = agent.svc.owned.instances.take_held(hv.locate(VID), sid, LABEL, "backup 1")
    name = f"{BASE}.{sid}"
    assert op.state is OperationState.SUCCEEDED, op.error
    assert op.kind is OperationKind.INSTANCE_SNAPSHOT
    assert op.request["snapshot_id"] == sid and op.request["why"] == "backup 1"
    assert op.request["volume_ids"] == [VID]
    assert op.result["snapshots"] == [
        {"volume_id": VID, "snapshot_id": sid, "file": str(hv.dir / name)}
    ]
    assert meta.created[sid] == (VID, LABEL, True) and meta.records[sid] == "available"
    assert hv.chains[VID] == [name, BASE]
    assert read_ledger(str(hv.dir), VID) == Ledger(name, {sid: name})
    assert all(hv.chains[v] == [f"volume-{v}"] for v in VOLS[1:])  # one disk only
    # the control: an instance snapshot is no checkpoint and keeps its own description
    snap = agent.wait(
        agent.svc.snapshot_instance(CTX, api.InstanceSnapshotRequest.from_wire(DOM, [VID], "none"))
    )
    other = snap.result["snapshots"][0]["snapshot_id"]
    assert meta.created[other][2] is False and meta.created[other][1] != LABEL


def test_an_id_already_in_the_ledger_is_refused_at_plan_touching_nothing(
    agent: Agent, hv: FakeHypervisor, meta: LabelMeta
) -> None:
    """A pull re-points an id at another file (remotefs): ``volume-<vid>.<id>`` does not
    exist, yet the id is taken; reusing it would make two snapshots one ledger key."""
    first = str(uuid.uuid4())
    _take(agent, hv, first)
    top = f"{BASE}.{first}"
    taken = str(uuid.uuid4())
    write_ledger(str(hv.dir), VID, Ledger(top, {first: top, taken: top}))
    before, calls, hv_calls = _files(hv), list(meta.calls), list(hv.calls)
    with pytest.raises(CheckpointFailed) as info:
        _take(agent, hv, taken)
    op = agent.journal.list_operations(kind=OperationKind.INSTANCE_SNAPSHOT)[-1]
    assert op.request["snapshot_id"] == taken and op.state is OperationState.FAILED
    assert str(op.id) in str(info.value) and "already in the ledger" in str(info.value)
    assert [s.name for s in agent.journal.steps(op.id)] == ["plan"]
    assert _files(hv) == before and meta.calls == calls and hv.calls == hv_calls
    assert read_ledger(str(hv.dir), VID) == Ledger(top, {first: top, taken: top})


def test_delete_held_merges_and_drops_the_id(
    agent: Agent, hv: FakeHypervisor, meta: LabelMeta
) -> None:
    s1, s2 = str(uuid.uuid4()), str(uuid.uuid4())
    f1, f2 = _take(agent, hv, s1), _take(agent, hv, s2)
    assert (f1, f2) == (f"{BASE}.{s1}", f"{BASE}.{s2}") and hv.chains[VID] == [f2, f1, BASE]
    req = api.DeleteOwnedSnapshotRequest(VID, s1)
    op = agent.svc.owned.deletes.delete_held(req, "backup 2")
    assert op.state is OperationState.SUCCEEDED, op.error
    assert op.kind is OperationKind.OWNED_DELETE and op.request["why"] == "backup 2"
    assert hv.calls[-1] == ("merge", VID, f1, "commit")
    assert hv.chains[VID] == [f2, BASE] and not (hv.dir / f1).exists()
    assert read_ledger(str(hv.dir), VID) == Ledger(f2, {s2: f2})
    assert s1 not in meta.records and meta.records[s2] == "available"
    OwnedCheckpoints(agent.svc.owned).drop(VID, s2, "backup 3")  # the top: active commit
    assert hv.calls[-1] == ("merge", VID, f2, "active-commit")
    assert hv.chains[VID] == [BASE] and read_ledger(str(hv.dir), VID) == Ledger(BASE, {})
    assert meta.records == {}


def test_owned_checkpoints_raise_naming_the_failed_operation(
    agent: Agent, hv: FakeHypervisor, meta: LabelMeta
) -> None:
    cps = OwnedCheckpoints(agent.svc.owned)
    hv.fail = RuntimeError("QEMU said no")
    sid = str(uuid.uuid4())
    with pytest.raises(CheckpointFailed, match="QEMU said no") as info:
        cps.take(hv.locate(VID), sid, LABEL, "backup 1")
    (op,) = agent.journal.list_operations(kind=OperationKind.INSTANCE_SNAPSHOT)
    assert op.state is OperationState.FAILED and str(op.id) in str(info.value)
    assert hv.chains[VID] == [BASE] and meta.records[sid] == "error"
    assert read_ledger(str(hv.dir), VID) is None
    hv.fail = None
    cps.take(hv.locate(VID), sid, LABEL, "backup 1")  # the control: the same call succeeds
    hv.fail = RuntimeError("merge refused")
    with pytest.raises(CheckpointFailed, match="merge refused") as info:
        cps.drop(VID, sid, "backup 2")
    (op,) = agent.journal.list_operations(kind=OperationKind.OWNED_DELETE)
    assert op.state is OperationState.FAILED and str(op.id) in str(info.value)
    name = f"{BASE}.{sid}"  # still recorded: coherent, retried by the next backup
    assert hv.chains[VID] == [name, BASE]
    assert read_ledger(str(hv.dir), VID) == Ledger(name, {sid: name})
    with pytest.raises(api.SnapshotNotFound):  # not in the ledger: refused, not journaled
        cps.drop(VID, str(uuid.uuid4()), "backup 2")
    assert len(agent.journal.list_operations(kind=OperationKind.OWNED_DELETE)) == 1
