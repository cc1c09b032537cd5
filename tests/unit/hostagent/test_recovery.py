"""Crash recovery over a real journal and real qcow2 files, with a fake hypervisor.

A crash is simulated by making the service's crash point raise a ``BaseException`` (the
journal then leaves the step exactly as a kill -9 would), then a fresh journal/pool/queue
on the same file runs :func:`reconcile`, like a restarted agent.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from hostagent import recovery
from hostagent.cinder.status import Report
from hostagent.rpc import contract as api
from hostagent.snapshots.assisted import expected_after
from tests.unit.hostagent.fakes import CTX, VOL, Agent, Bed


@pytest.fixture
def bed(tmp_path: Path) -> Bed:
    return Bed(tmp_path)


def _create_req(snap: str, name: str) -> api.CreateSnapshotRequest:
    return api.CreateSnapshotRequest(VOL, snap, name)


CREATE = [
    ("validate:planned", Report.CREATE_FAILED),
    ("validate:done", Report.CREATE_FAILED),
    ("snapshot:planned", Report.CREATE_FAILED),
    ("snapshot:done", Report.CREATE_DONE),
    ("notify:planned", Report.CREATE_DONE),
    ("notify:done", Report.CREATE_DONE),
]


@pytest.mark.parametrize(("at", "final"), CREATE)
def test_create_crash_converges(
    bed: Bed, monkeypatch: pytest.MonkeyPatch, at: str, final: Report
) -> None:
    snap = str(uuid.uuid4())
    name = bed.precreate(snap)
    first, died = bed.crashing(at, monkeypatch)
    op = first.svc.create_assisted_snapshot(CTX, _create_req(snap, name))
    agent = bed.after_crash(first, died, monkeypatch)
    try:
        (outcome,) = agent.restart()
        assert str(outcome.op_id) == op.id
        again = agent.svc.create_assisted_snapshot(CTX, _create_req(snap, name))  # a retry
        assert again.id == op.id
        done = final is Report.CREATE_DONE
        want = api.OperationState.SUCCEEDED if done else api.OperationState.FAILED
        assert again.state is want
        assert bed.notifier.sent == [(snap, final)]  # exactly once, even after notify:done
        assert bed.hv.chain == ([name, bed.base] if done else [bed.base])
        assert (bed.dir / name).exists()  # Cinder's overlay: never ours to remove
        assert agent.journal.unfinished() == []
        assert all(s["state"] != "planned" for s in again.result["steps"])
    finally:
        agent.close()


def test_create_snapshot_taken_but_not_journaled_is_done_and_guest_thawed(
    bed: Bed, monkeypatch: pytest.MonkeyPatch
) -> None:
    snap = str(uuid.uuid4())
    name = bed.precreate(snap)
    first, died = bed.crashing("snapshot:planned", monkeypatch)
    first.svc.create_assisted_snapshot(CTX, _create_req(snap, name))
    agent = bed.after_crash(first, died, monkeypatch)
    bed.hv.chain.insert(0, name)  # QEMU switched, the agent died before journaling it
    bed.hv.frozen = True
    try:
        (outcome,) = agent.restart()
        assert "done" in outcome.decision
        assert bed.hv.thawed == 1
        assert bed.notifier.sent == [(snap, Report.CREATE_DONE)]
        op = agent.svc.get_operation(CTX, str(outcome.op_id))
        assert op.state is api.OperationState.SUCCEEDED
        assert ("snapshot", "done") in [(s["name"], s["state"]) for s in op.result["steps"]]
    finally:
        agent.close()


DELETE = [
    "validate:planned",
    "validate:done",
    "merge:planned",
    "merge:done",
    "notify:planned",
    "notify:done",
]


def _two_snapshots(bed: Bed) -> tuple[str, str, str, str]:
    s1, s2 = str(uuid.uuid4()), str(uuid.uuid4())
    return s1, bed.snapshot_now(s1), s2, bed.snapshot_now(s2)


@pytest.mark.parametrize("at", DELETE)
def test_delete_crash_converges_to_deleting_90(
    bed: Bed, monkeypatch: pytest.MonkeyPatch, at: str
) -> None:
    s1, f1, _s2, f2 = _two_snapshots(bed)
    req = api.DeleteSnapshotRequest(VOL, s1, f1, bed.base)
    first, died = bed.crashing(at, monkeypatch)
    op = first.svc.delete_assisted_snapshot(CTX, req)
    agent = bed.after_crash(first, died, monkeypatch)
    try:
        agent.restart()
        again = agent.svc.delete_assisted_snapshot(CTX, req)
        assert again.id == op.id and again.state is api.OperationState.SUCCEEDED, again.error
        assert bed.hv.chain == [f2, bed.base]
        assert bed.hv.calls.count(("merge", f1, bed.base)) == 1  # never merged twice
        assert bed.notifier.sent == [(s1, Report.DELETE_DONE)]
        assert agent.journal.unfinished() == []
    finally:
        agent.close()


def _crash_in_merge(bed: Bed, mp: pytest.MonkeyPatch, req: api.DeleteSnapshotRequest) -> Agent:
    first, died = bed.crashing("merge:planned", mp)
    first.svc.delete_assisted_snapshot(CTX, req)
    return bed.after_crash(first, died, mp)


def test_delete_merge_finished_unjournaled_after_a_running_job_is_not_merged_again(
    bed: Bed, monkeypatch: pytest.MonkeyPatch
) -> None:
    s1, f1, _s2, f2 = _two_snapshots(bed)
    req = api.DeleteSnapshotRequest(VOL, s1, f1, bed.base)
    agent = _crash_in_merge(bed, monkeypatch, req)
    bed.hv.apply_merge(f1, bed.base)  # QEMU finished the job on its own
    bed.hv.job_polls = 3  # ... after the restart saw it still running
    try:
        agent.restart()
        assert bed.hv.job_polls == 0  # awaited
        assert bed.hv.chain == [f2, bed.base]
        assert not [c for c in bed.hv.calls if c[0] == "merge"]
        assert bed.notifier.sent == [(s1, Report.DELETE_DONE)]
        op = agent.journal.list_operations()[-1]
        assert op.result is not None and op.result["merged_away"] == [f1]
    finally:
        agent.close()


def test_delete_with_an_unexplained_chain_fails_with_error_deleting(
    bed: Bed, monkeypatch: pytest.MonkeyPatch
) -> None:
    s1, f1, _s2, _f2 = _two_snapshots(bed)
    req = api.DeleteSnapshotRequest(VOL, s1, f1, bed.base)
    agent = _crash_in_merge(bed, monkeypatch, req)
    bed.hv.apply_merge(None, None)  # someone flattened the disk meanwhile
    try:
        agent.restart()
        assert bed.notifier.sent == [(s1, Report.DELETE_FAILED)]
        op = agent.svc.delete_assisted_snapshot(CTX, req)
        assert op.state is api.OperationState.FAILED
        assert not [c for c in bed.hv.calls if c[0] == "merge"]
    finally:
        agent.close()


def test_expected_after_each_merge_kind() -> None:
    chain = ["c", "b", "a", "base"]
    assert expected_after(chain, api.DeleteSnapshotRequest(VOL, "s", "b", "base")) == ["c", "base"]
    assert expected_after(chain, api.DeleteSnapshotRequest(VOL, "s", "a", None)) == [
        "c",
        "a",
        "base",
    ]
    assert expected_after(chain, api.DeleteSnapshotRequest(VOL, "s", None, None)) == ["c"]


@pytest.mark.parametrize("env", [None, "validate:done", "snapshot:planned"])
def test_crash_point_exits_137_only_when_named(env: str | None) -> None:
    code = "from hostagent.recovery import crash_point; crash_point('snapshot', 'planned')"
    extra = {} if env is None else {recovery.CRASH_ENV: env}
    environ = {k: v for k, v in os.environ.items() if k != recovery.CRASH_ENV}
    rc = subprocess.run([sys.executable, "-c", code], env={**environ, **extra}).returncode
    assert rc == (137 if env == "snapshot:planned" else 0)
