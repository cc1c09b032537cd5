"""Issue 14: an assisted request's ids and names are exactly what Cinder's ledger implies.

Cinder's remotefs driver computes ``new_file`` and ``delete_info`` from its ``.info`` ledger
(cinder 29 ``_get_new_snap_path``, ``_delete_snapshot``, ``_delete_snapshot_online``); a
request that is not exactly that is refused at once, before anything is touched, journaled
or reported, and again by the worker if the ledger moved while the request was queued.
Each refusal has a negative control: the request Cinder would send instead is accepted.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hostagent.cinder.status import Report
from hostagent.rpc import contract as api
from hostagent.snapshots.assisted_rules import cinder_delete_info
from qcow2 import Ledger
from tests.unit.hostagent.fakes import CTX, VOL, Agent, Bed

State = tuple[dict[str, tuple[int, int]], bytes | None]


@pytest.fixture
def bed(tmp_path: Path) -> Bed:
    return Bed(tmp_path)


@pytest.fixture
def agent(bed: Bed) -> Iterator[Agent]:
    a = bed.agent(workers=2)
    yield a
    a.close()


def _state(bed: Bed) -> State:
    """Every file of the share (size, mtime) and the ledger's bytes."""
    files = {n: (os.stat(bed.dir / n).st_size, os.stat(bed.dir / n).st_mtime_ns)
             for n in os.listdir(bed.dir)}  # fmt: skip
    info = bed.dir / f"volume-{VOL}.info"
    return files, (info.read_bytes() if info.exists() else None)


def _create(agent: Agent, snap: str, new_file: str) -> api.Operation:
    return agent.svc.create_assisted_snapshot(CTX, api.CreateSnapshotRequest(VOL, snap, new_file))


def _delete(agent: Agent, snap: str, to_merge: str | None, target: str | None) -> api.Operation:
    req = api.DeleteSnapshotRequest(VOL, snap, to_merge, target)
    return agent.svc.delete_assisted_snapshot(CTX, req)


def _refused(bed: Bed, agent: Agent, call: Callable[[], object], want: type[Exception]) -> None:
    """``call`` raises ``want`` and leaves files, ledger, chain, journal and Cinder alone."""
    before, chain, calls = _state(bed), list(bed.hv.chain), list(bed.hv.calls)
    sent, ops = list(bed.notifier.sent), agent.svc.list_operations(CTX, api.OperationFilters())
    with pytest.raises(want):
        call()
    assert _state(bed) == before
    assert bed.hv.chain == chain and bed.hv.calls == calls
    assert bed.notifier.sent == sent
    assert agent.svc.list_operations(CTX, api.OperationFilters()) == ops


def _write_ledger(bed: Bed, ledger: dict[str, str]) -> None:
    (bed.dir / f"volume-{VOL}.info").write_text(json.dumps(ledger, indent=1, sort_keys=True))


# -- create ---------------------------------------------------------------------------------
def test_first_create_without_a_ledger_is_accepted(bed: Bed, agent: Agent) -> None:
    assert not (bed.dir / f"volume-{VOL}.info").exists()
    snap = str(uuid.uuid4())
    op = agent.wait(_create(agent, snap, bed.precreate(snap)))
    assert op.state is api.OperationState.SUCCEEDED, op.error
    assert bed.ledger() == Ledger(f"{bed.base}.{snap}", {snap: f"{bed.base}.{snap}"})  # Cinder's


def test_create_new_file_must_be_cinders_name_for_the_id(bed: Bed, agent: Agent) -> None:
    snap, other = str(uuid.uuid4()), str(uuid.uuid4())
    wrong = bed.precreate(other)  # a file of this volume, pre-created on the top, wrong id
    _refused(bed, agent, lambda: _create(agent, snap, wrong), api.InvalidRequest)
    # control: the same file for its own id is accepted
    assert agent.wait(_create(agent, other, wrong)).state is api.OperationState.SUCCEEDED


def test_create_of_an_id_already_in_the_ledger_is_refused(bed: Bed, agent: Agent) -> None:
    s1 = str(uuid.uuid4())
    f1 = bed.snapshot_now(s1)
    old = str(uuid.uuid4())  # after a pull Cinder maps an older id to the active file
    _write_ledger(bed, {"active": f1, s1: f1, old: f1})
    new_file = bed.precreate(old)  # Cinder's name, pre-created on the live top
    _refused(bed, agent, lambda: _create(agent, old, new_file), api.InvalidRequest)
    os.unlink(bed.dir / new_file)
    fresh = str(uuid.uuid4())  # control: a new id on the same chain and ledger
    op = agent.wait(_create(agent, fresh, bed.precreate(fresh)))
    assert op.state is api.OperationState.SUCCEEDED, op.error


@pytest.mark.parametrize("ledger", ["", "{not json", '{"volume-x": 1}'])
def test_create_with_an_unusable_ledger_is_refused(bed: Bed, agent: Agent, ledger: str) -> None:
    (bed.dir / f"volume-{VOL}.info").write_text(ledger)
    snap = str(uuid.uuid4())
    name = bed.precreate(snap)
    _refused(bed, agent, lambda: _create(agent, snap, name), api.InvalidRequest)


def test_create_when_the_ledger_names_another_active_file_is_refused(
    bed: Bed, agent: Agent
) -> None:
    s1 = str(uuid.uuid4())
    f1 = bed.snapshot_now(s1)
    _write_ledger(bed, {"active": bed.base, s1: f1})  # Cinder's view: not the live top
    snap = str(uuid.uuid4())
    name = bed.precreate(snap)
    _refused(bed, agent, lambda: _create(agent, snap, name), api.InvalidRequest)
    _write_ledger(bed, {"active": f1, s1: f1})  # control: consistent again
    assert agent.wait(_create(agent, snap, name)).state is api.OperationState.SUCCEEDED


# -- delete ---------------------------------------------------------------------------------
def test_delete_of_an_unknown_id_with_a_valid_commit_is_404_and_merges_nothing(
    bed: Bed, agent: Agent
) -> None:
    """The probe of issue 14: a random id, delete_info = a valid commit of a real s1."""
    s1, s2 = str(uuid.uuid4()), str(uuid.uuid4())
    f1, _f2 = bed.snapshot_now(s1), bed.snapshot_now(s2)
    rogue = str(uuid.uuid4())
    _refused(bed, agent, lambda: _delete(agent, rogue, f1, bed.base), api.SnapshotNotFound)
    # control: the same merge for the snapshot the ledger maps to f1 is Cinder's delete
    op = agent.wait(_delete(agent, s1, f1, bed.base))
    assert op.state is api.OperationState.SUCCEEDED, op.error
    assert bed.notifier.sent == [(s1, Report.DELETE_DONE)]


def test_delete_without_any_ledger_is_404(bed: Bed, agent: Agent) -> None:
    s1 = str(uuid.uuid4())
    f1 = bed.snapshot_now(s1)
    os.unlink(bed.dir / f"volume-{VOL}.info")
    _refused(bed, agent, lambda: _delete(agent, s1, None, None), api.SnapshotNotFound)
    assert f1 in bed.hv.chain


def _three(bed: Bed) -> tuple[list[str], list[str]]:
    sids = [str(uuid.uuid4()) for _ in range(3)]
    files = [bed.snapshot_now(s) for s in sids]
    return sids, files


# (snapshot index, what Cinder sends, a structurally valid request it never sends)
CASES = {
    # s1 (oldest, not active): commit f1 into base
    "commit_as_flatten": (0, ("f1", "base"), (None, None)),
    # s2: commit f2 into f1, not past it
    "commit_past_its_base": (1, ("f2", "f1"), ("f2", "base")),
    # s2's id with s1's merge
    "merge_of_another_snapshot": (1, ("f2", "f1"), ("f1", "base")),
    # s3 (active, its base f2 is s2's file): pull f2 into f3 keeping f1, not a flatten
    "pull_as_flatten": (2, ("f1", None), (None, None)),
    "pull_of_too_much": (2, ("f1", None), ("base", None)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_delete_info_must_be_the_merge_the_ledger_implies(
    bed: Bed, agent: Agent, case: str
) -> None:
    sids, files = _three(bed)
    names = {"f1": files[0], "f2": files[1], "f3": files[2], "base": bed.base, None: None}
    at, good, bad = CASES[case]
    sid = sids[at]
    assert cinder_delete_info(bed.ledger(), bed.hv.chain, VOL, sid) == (
        names[good[0]], names[good[1]]
    )  # fmt: skip
    call = lambda: _delete(agent, sid, names[bad[0]], names[bad[1]])  # noqa: E731
    _refused(bed, agent, call, api.InvalidRequest)
    op = agent.wait(_delete(agent, sid, names[good[0]], names[good[1]]))  # control
    assert op.state is api.OperationState.SUCCEEDED, op.error


def test_cinder_delete_info_of_the_oldest_active_snapshot_is_a_flatten(bed: Bed) -> None:
    """remotefs: the active file's backing is no snapshot's file (base_id None): pull all."""
    s1 = str(uuid.uuid4())
    f1 = bed.snapshot_now(s1)
    assert cinder_delete_info(bed.ledger(), [f1, bed.base], VOL, s1) == (None, None)
    with pytest.raises(api.InvalidRequest):  # no backing file: Cinder deletes it itself
        cinder_delete_info(Ledger(f1, {s1: f1}), [f1], VOL, s1)


def test_the_worker_checks_the_ledger_again(bed: Bed, agent: Agent) -> None:
    """Accepted while the disk is busy, refused by the worker once the ledger moved: no
    merge, no snapshot; the caller (still waiting) hears the failure."""
    sids, files = _three(bed)
    busy = threading.Event()
    agent.cinder_pool.submit(bed.hv.locate(VOL).key, lambda: busy.wait(30))  # the disk's queue
    late_delete = _delete(agent, sids[1], files[1], files[0])  # valid now
    fresh = str(uuid.uuid4())
    late_create = _create(agent, fresh, bed.precreate(fresh))  # valid now
    _write_ledger(bed, {"active": files[2], sids[0]: files[0], sids[2]: files[2], fresh: files[2]})
    busy.set()
    for op, want in ((late_delete, "SnapshotNotFound"), (late_create, "InvalidRequest")):
        done = agent.wait(op)
        assert done.state is api.OperationState.FAILED
        assert done.error is not None and done.error["code"] == want, done.error
    assert bed.hv.calls == [] and bed.hv.chain == [*reversed(files), bed.base]
    assert bed.notifier.sent == [(sids[1], Report.DELETE_FAILED), (fresh, Report.CREATE_FAILED)]
