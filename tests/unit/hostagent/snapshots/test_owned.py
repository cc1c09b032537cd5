"""Instance snapshots and agent-owned deletes over real qcow2 files, ledgers and a journal.

The hypervisor is faked (chains kept in memory, but merges rewrite the real headers so the
service's whole-chain inspection sees what libvirt would); Cinder's record client is a
recorder that can fail (both from ..fakes). A crash (``fakes.crash_at``) raises a
``BaseException`` right after the named journal write, then a fresh agent reconciles.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hostagent.cinder.records import MetaAction
from hostagent.journal.model import OperationState, StepState
from hostagent.rpc import contract as api
from qcow2 import Ledger, read_ledger, write_ledger
from tests.unit.hostagent.fakes import (
    CTX,
    DOM,
    VOLS,
    Agent,
    FakeHypervisor,
    FakeMeta,
    crash_at,
    make_image,
    no_crash,
)

OTHER = "4d000000-0000-4000-8000-000000000004"  # attached to no instance here


@pytest.fixture
def hv(tmp_path: Path) -> FakeHypervisor:
    return FakeHypervisor(tmp_path / "share", VOLS)


@pytest.fixture
def meta() -> FakeMeta:
    return FakeMeta()


@pytest.fixture
def agent(tmp_path: Path, hv: FakeHypervisor, meta: FakeMeta) -> Iterator[Agent]:
    a = Agent(tmp_path, hv, meta=meta)
    yield a
    a.close()


def _files(hv: FakeHypervisor) -> set[str]:
    """Image files on the share (ledgers excluded)."""
    return {n for n in os.listdir(hv.dir) if n.startswith("volume-") and not n.endswith(".info")}


def _ledger_matches_chain(hv: FakeHypervisor, vid: str) -> Ledger | None:
    led = read_ledger(str(hv.dir), vid)
    if led is not None:
        assert led.active == hv.chains[vid][0]
        for f in led.snapshots.values():
            assert f in hv.chains[vid][:-1], f"ledger file {f} has no backing in the chain"
    return led


def _snap(agent: Agent, vols: list[str] | None, q: str = "preferred") -> api.Operation:
    req = api.InstanceSnapshotRequest.from_wire(DOM, vols, q)
    return agent.wait(agent.svc.snapshot_instance(CTX, req))


def test_instance_snapshot_of_all_disks(agent: Agent, hv: FakeHypervisor, meta: FakeMeta) -> None:
    op = _snap(agent, None, "required")
    assert op.state is api.OperationState.SUCCEEDED, op.error
    assert op.kind is api.OperationKind.INSTANCE_SNAPSHOT
    assert op.instance_uuid == DOM and sorted(op.volume_ids) == VOLS
    snaps = op.result["snapshots"]
    assert [s["volume_id"] for s in snaps] == VOLS and op.result["quiesced"] is True
    assert [c[0] for c in hv.calls] == ["snapshot"]  # ONE atomic call for the three disks
    assert len(hv.calls[0][1]) == 3
    names = [s["name"] for s in op.result["steps"]]
    assert names == ["plan", "cinder_create", "overlays", "snapshot", "ledger", "cinder_finalize"]
    assert op.result["progress"] == {"cur": 6, "end": 6}
    for s in snaps:
        vid, sid = s["volume_id"], s["snapshot_id"]
        name = f"volume-{vid}.{sid}"
        assert s["file"] == str(hv.dir / name) and hv.chains[vid] == [name, f"volume-{vid}"]
        raw = (hv.dir / f"volume-{vid}.info").read_bytes()  # byte-exact as remotefs writes
        assert raw == json.dumps({"active": name, sid: name}, indent=1, sort_keys=True).encode()
        assert meta.records[sid] == "available"
    creates = [c for c in meta.calls if c[0] == "create"]
    assert meta.calls.index(creates[-1]) < meta.calls.index(
        ("FINALIZE_AVAILABLE", snaps[0]["snapshot_id"])
    )


def test_subset_then_second_snapshot_extends_the_ledger(agent: Agent, hv: FakeHypervisor) -> None:
    first = _snap(agent, [VOLS[1]])
    second = _snap(agent, [VOLS[1], VOLS[2]])
    assert first.state is second.state is api.OperationState.SUCCEEDED
    assert hv.chains[VOLS[0]] == [f"volume-{VOLS[0]}"]  # not listed: untouched
    assert len(hv.chains[VOLS[1]]) == 3 and len(hv.chains[VOLS[2]]) == 2
    led = _ledger_matches_chain(hv, VOLS[1])
    assert led is not None and len(led.snapshots) == 2
    assert read_ledger(str(hv.dir), VOLS[0]) is None


@pytest.mark.parametrize(
    ("instance", "vols", "err"),
    [
        (DOM, [OTHER], api.VolumeNotFound),
        (DOM, [VOLS[0], OTHER], api.VolumeNotFound),
        (OTHER, None, api.InstanceNotFound),
    ],
)
def test_volumes_not_on_the_instance_touch_nothing(
    agent: Agent, hv: FakeHypervisor, meta: FakeMeta, instance: str, vols: Any, err: type
) -> None:
    before = _files(hv)
    with pytest.raises(err):
        agent.svc.snapshot_instance(
            CTX, api.InstanceSnapshotRequest.from_wire(instance, vols, "none")
        )
    assert agent.journal.list_operations() == [] and meta.calls == [] and _files(hv) == before


def test_ledger_disagreeing_with_the_chain_is_refused(agent: Agent, hv: FakeHypervisor) -> None:
    write_ledger(str(hv.dir), VOLS[0], Ledger(active=f"volume-{VOLS[0]}.{uuid.uuid4()}"))
    with pytest.raises(api.InvalidRequest, match="active"):
        agent.svc.snapshot_instance(CTX, api.InstanceSnapshotRequest.from_wire(DOM, None, "none"))
    assert agent.journal.list_operations() == []


def test_failed_snapshot_removes_overlays_and_finalizes_error(
    agent: Agent, hv: FakeHypervisor, meta: FakeMeta
) -> None:
    before = _files(hv)
    hv.fail = RuntimeError("QEMU said no")
    op = _snap(agent, None)
    assert op.state is api.OperationState.FAILED and "QEMU said no" in str(op.error)
    assert _files(hv) == before and all(len(c) == 1 for c in hv.chains.values())
    assert sorted(meta.records.values()) == ["error"] * 3
    assert all(read_ledger(str(hv.dir), v) is None for v in VOLS)


def test_create_record_refused_fails_before_any_file(
    agent: Agent, hv: FakeHypervisor, meta: FakeMeta
) -> None:
    before = _files(hv)
    meta.fail_create = True
    op = _snap(agent, [VOLS[0]])
    assert op.state is api.OperationState.FAILED
    assert _files(hv) == before and hv.calls == []
    assert [c[0] for c in meta.calls] == ["create", "FINALIZE_ERROR"]


def test_cinder_disabled_keeps_ledgers_and_journals_the_skip(
    tmp_path: Path, hv: FakeHypervisor
) -> None:
    a = Agent(tmp_path, hv)
    try:
        op = _snap(a, None)
        assert op.state is api.OperationState.SUCCEEDED, op.error
        steps = {s["name"]: s["data"] for s in op.result["steps"]}
        assert steps["cinder_create"]["cinder"].startswith("skipped")
        assert steps["cinder_finalize"]["cinder"].startswith("skipped")
        for v in VOLS:
            _ledger_matches_chain(hv, v)
        sid = op.result["snapshots"][0]["snapshot_id"]
        d = a.wait(a.svc.delete_snapshot(CTX, api.DeleteOwnedSnapshotRequest(VOLS[0], sid)))
        assert d.state is api.OperationState.SUCCEEDED, d.error
        assert {s["name"]: s["data"] for s in d.result["steps"]}["cinder_delete"][
            "cinder"
        ].startswith("skipped")
        assert a.journal.pending_notifications(due_only=False) == []
    finally:
        a.close()


def test_finalize_unreachable_is_journaled_and_resent(
    agent: Agent, hv: FakeHypervisor, meta: FakeMeta
) -> None:
    meta.unreachable = 1
    op = _snap(agent, [VOLS[0]])
    assert op.state is api.OperationState.SUCCEEDED
    sid = op.result["snapshots"][0]["snapshot_id"]
    pending = agent.journal.pending_notifications(due_only=False)
    assert [(n.snapshot_id, n.status) for n in pending] == [
        (sid, MetaAction.FINALIZE_AVAILABLE.value)
    ]
    assert meta.records[sid] == "creating"
    assert agent.queue.flush(due_only=False) == 1
    assert meta.records[sid] == "available"


def _owned_delete(agent: Agent, vid: str, sid: str) -> api.Operation:
    return agent.wait(agent.svc.delete_snapshot(CTX, api.DeleteOwnedSnapshotRequest(vid, sid)))


def test_delete_newest_by_active_commit_then_inner_by_commit(
    agent: Agent, hv: FakeHypervisor, meta: FakeMeta
) -> None:
    vid = VOLS[0]
    s1 = _snap(agent, [vid]).result["snapshots"][0]["snapshot_id"]
    s2 = _snap(agent, [vid]).result["snapshots"][0]["snapshot_id"]
    s3 = _snap(agent, [vid]).result["snapshots"][0]["snapshot_id"]
    f1, f2, f3 = (f"volume-{vid}.{s}" for s in (s1, s2, s3))
    assert hv.chains[vid] == [f3, f2, f1, f"volume-{vid}"]

    op = _owned_delete(agent, vid, s3)  # newest: its file is the active one
    assert op.state is api.OperationState.SUCCEEDED, op.error
    assert op.kind is api.OperationKind.DELETE_OWNED and op.volume_ids == (vid,)
    assert hv.calls[-1] == ("merge", vid, f3, "active-commit")
    assert hv.chains[vid] == [f2, f1, f"volume-{vid}"] and not (hv.dir / f3).exists()
    assert read_ledger(str(hv.dir), vid) == Ledger(active=f2, snapshots={s1: f1, s2: f2})
    assert s3 not in meta.records and meta.records[s1] == "available"
    names = [s["name"] for s in op.result["steps"]]
    assert names == ["validate", "merge", "ledger", "remove", "cinder_delete"]

    op = _owned_delete(agent, vid, s1)  # inner: committed into its backing file
    assert op.state is api.OperationState.SUCCEEDED, op.error
    assert hv.calls[-1] == ("merge", vid, f1, "commit")
    assert hv.chains[vid] == [f2, f"volume-{vid}"] and not (hv.dir / f1).exists()
    assert read_ledger(str(hv.dir), vid) == Ledger(active=f2, snapshots={s2: f2})
    _ledger_matches_chain(hv, vid)


def test_delete_of_a_snapshot_not_in_the_ledger_touches_nothing(
    agent: Agent, hv: FakeHypervisor, meta: FakeMeta
) -> None:
    _snap(agent, [VOLS[0]])
    before, led = _files(hv), read_ledger(str(hv.dir), VOLS[0])
    n_ops, n_calls = len(agent.journal.list_operations()), len(meta.calls)
    with pytest.raises(api.SnapshotNotFound):
        agent.svc.delete_snapshot(CTX, api.DeleteOwnedSnapshotRequest(VOLS[0], str(uuid.uuid4())))
    with pytest.raises(api.SnapshotNotFound):  # no ledger at all
        agent.svc.delete_snapshot(CTX, api.DeleteOwnedSnapshotRequest(VOLS[1], str(uuid.uuid4())))
    assert _files(hv) == before and read_ledger(str(hv.dir), VOLS[0]) == led
    assert len(agent.journal.list_operations()) == n_ops and len(meta.calls) == n_calls


# -- crash after every journaled step, then a restart converges ---------------------------
INSTANCE_STEPS = ["plan", "cinder_create", "overlays", "snapshot", "ledger", "cinder_finalize"]
INSTANCE = [(f"{s}:{p}", s) for s in INSTANCE_STEPS for p in ("planned", "done")]


@pytest.mark.parametrize(("at", "step"), INSTANCE)
def test_instance_snapshot_crash_converges(
    tmp_path: Path,
    hv: FakeHypervisor,
    meta: FakeMeta,
    monkeypatch: pytest.MonkeyPatch,
    at: str,
    step: str,
) -> None:
    before = _files(hv)
    first = Agent(tmp_path, hv, meta=meta)
    died = crash_at(monkeypatch, at)
    hv.frozen = step == "snapshot"
    op = first.svc.snapshot_instance(
        CTX, api.InstanceSnapshotRequest.from_wire(DOM, VOLS[:2], "preferred")
    )
    assert died.wait(30)
    first.close()
    no_crash(monkeypatch)
    again = Agent(tmp_path, hv, meta=meta)
    try:
        again.restart()
        final = again.svc.get_operation(CTX, op.id)
        # snapshot:planned dies before the libvirt call: not taken, like every earlier step
        taken = INSTANCE_STEPS.index(step) > 3 or at == "snapshot:done"
        assert not hv.frozen
        plan = [s for s in again.journal.steps(uuid.UUID(op.id)) if s.name == "plan"]
        sids = [v["snapshot_id"] for v in plan[0].data.get("volumes", [])] if plan else []
        if taken:
            assert final.state is api.OperationState.SUCCEEDED, final.error
            assert [meta.records[s] for s in sids] == ["available", "available"]
            for v in VOLS[:2]:
                led = _ledger_matches_chain(hv, v)
                assert led is not None and len(led.snapshots) == 1
            assert _files(hv) == before | {
                f"volume-{v}.{s}" for v, s in zip(VOLS, sids, strict=False)
            }
        else:
            assert final.state is api.OperationState.FAILED
            assert _files(hv) == before, "orphan overlay left"
            assert all(len(c) == 1 for c in hv.chains.values())
            assert all(meta.records.get(s, "error") == "error" for s in sids)
        assert again.journal.pending_notifications(due_only=False) == []
        assert all(s.state is not StepState.PLANNED for s in again.journal.steps(uuid.UUID(op.id)))
    finally:
        again.close()


DELETE_STEPS = ["validate", "merge", "ledger", "remove", "cinder_delete"]


@pytest.mark.parametrize("at", [f"{s}:{p}" for s in DELETE_STEPS for p in ("planned", "done")])
@pytest.mark.parametrize("newest", [True, False])
def test_owned_delete_crash_converges(
    tmp_path: Path,
    hv: FakeHypervisor,
    meta: FakeMeta,
    monkeypatch: pytest.MonkeyPatch,
    at: str,
    newest: bool,
) -> None:
    vid = VOLS[0]
    first = Agent(tmp_path, hv, meta=meta)
    s1 = _snap(first, [vid]).result["snapshots"][0]["snapshot_id"]
    s2 = _snap(first, [vid]).result["snapshots"][0]["snapshot_id"]
    gone, kept = (s2, s1) if newest else (s1, s2)
    died = crash_at(monkeypatch, at)
    if at == "merge:planned":
        hv.job_polls = 3  # recovery finds the job still running first
    op = first.svc.delete_snapshot(CTX, api.DeleteOwnedSnapshotRequest(vid, gone))
    assert died.wait(30)
    first.close()
    no_crash(monkeypatch)
    again = Agent(tmp_path, hv, meta=meta)
    try:
        again.restart()
        final = again.svc.get_operation(CTX, op.id)
        assert final.state is api.OperationState.SUCCEEDED, final.error
        f_kept = f"volume-{vid}.{kept}"
        assert hv.chains[vid] == [f_kept, f"volume-{vid}"]
        assert read_ledger(str(hv.dir), vid) == Ledger(active=f_kept, snapshots={kept: f_kept})
        assert _files(hv) == {f"volume-{v}" for v in VOLS} | {f_kept}
        assert gone not in meta.records and meta.records[kept] == "available"
        merges = [c for c in hv.calls if c[0] == "merge"]
        assert len(merges) == 1, "merged twice"
        assert all(s.state is not StepState.PLANNED for s in again.journal.steps(uuid.UUID(op.id)))
        assert again.journal.get(uuid.UUID(op.id)).state is OperationState.SUCCEEDED
    finally:
        again.close()


def test_snapshot_taken_but_not_journaled_is_recorded_available(
    tmp_path: Path, hv: FakeHypervisor, meta: FakeMeta
) -> None:
    first = Agent(tmp_path, hv, meta=meta)
    hv.crash_after_snapshot = hv.frozen = True
    op = first.svc.snapshot_instance(CTX, api.InstanceSnapshotRequest.from_wire(DOM, None, "none"))
    assert hv.died.wait(30)
    first.close()
    hv.crash_after_snapshot = False
    again = Agent(tmp_path, hv, meta=meta)
    try:
        again.restart()
        final = again.svc.get_operation(CTX, op.id)
        assert final.state is api.OperationState.SUCCEEDED, final.error
        snap = next(s for s in final.result["steps"] if s["name"] == "snapshot")
        assert snap["state"] == "done" and snap["data"]["recovered"] is True
        assert sorted(meta.records.values()) == ["available"] * 3 and not hv.frozen
        for v in VOLS:
            led = _ledger_matches_chain(hv, v)
            assert led is not None and len(hv.chains[v]) == 2
    finally:
        again.close()


def _legacy_top(hv: FakeHypervisor, vid: str) -> str:
    """An earlier qsnap's checkpoint overlay left as the live top (its journal's record gone)."""
    k = f"volume-{vid}.qsnap-bk-{uuid.uuid4()}"
    make_image(hv.dir / k, f"volume-{vid}")
    hv.chains[vid] = [k, f"volume-{vid}"]
    return k


def test_instance_snapshot_refuses_a_legacy_checkpoint_top(
    agent: Agent, hv: FakeHypervisor, meta: FakeMeta
) -> None:
    """Released once at start (backup.legacy), never by a snapshot any more: with Cinder's
    ledger (which never named the overlay) the request is refused and touches nothing."""
    vid = VOLS[0]
    write_ledger(str(hv.dir), vid, Ledger(active=f"volume-{vid}"))
    k = _legacy_top(hv, vid)
    before = _files(hv)
    with pytest.raises(api.InvalidRequest, match=f"live top {k!r} .* not a file name"):
        agent.svc.snapshot_instance(CTX, api.InstanceSnapshotRequest.from_wire(DOM, None, "none"))
    assert agent.journal.list_operations() == [] and meta.calls == [] and hv.calls == []
    assert _files(hv) == before and hv.chains[vid] == [k, f"volume-{vid}"]
    op = _snap(agent, [VOLS[1]])  # the control: the instance's other disks are fine
    assert op.state is api.OperationState.SUCCEEDED, op.error


def test_instance_snapshot_without_a_ledger_refuses_a_legacy_checkpoint_top(
    agent: Agent, hv: FakeHypervisor, meta: FakeMeta
) -> None:
    _legacy_top(hv, VOLS[0])
    before = _files(hv)
    try:
        with pytest.raises(api.InvalidRequest, match="qsnap-bk"):
            agent.svc.snapshot_instance(
                CTX, api.InstanceSnapshotRequest.from_wire(DOM, [VOLS[0]], "none")
            )
    finally:
        assert agent.idle(60)
    assert agent.journal.list_operations() == [] and meta.calls == []
    assert _files(hv) == before
