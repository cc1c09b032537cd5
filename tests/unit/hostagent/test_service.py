"""AssistedService with a fake hypervisor and notifier over real qcow2 files and journal."""

from __future__ import annotations

import functools
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hostagent.cinder.outbox import NotifyQueue
from hostagent.cinder.status import Report
from hostagent.journal.model import NotificationState
from hostagent.pool import KeyedPool
from hostagent.rpc import contract as api
from tests.unit.hostagent.fakes import CTX, VOL, Agent, Bed, make_image


@pytest.fixture
def bed(tmp_path: Path) -> Bed:
    return Bed(tmp_path)


@pytest.fixture
def agent(bed: Bed) -> Iterator[Agent]:
    a = bed.agent(workers=4)
    yield a
    a.close()


def _create(agent: Agent, snap: str, new_file: str) -> api.Operation:
    req = api.CreateSnapshotRequest.from_wire(
        VOL, {"snapshot_id": snap, "type": "qcow2", "new_file": new_file}
    )
    return agent.svc.create_assisted_snapshot(CTX, req)


def _delete(agent: Agent, snap: str, to_merge: str | None, target: str | None) -> api.Operation:
    info = {"type": "qcow2", "file_to_merge": to_merge, "merge_target_file": target}
    req = api.DeleteSnapshotRequest.from_wire(VOL, snap, info)
    return agent.svc.delete_assisted_snapshot(CTX, req)


def _steps(op: api.Operation) -> list[tuple[str, str]]:
    return [(s["name"], s["state"]) for s in op.result["steps"]]


def test_create_runs_journaled_steps_and_reports_creating_90(bed: Bed, agent: Agent) -> None:
    snap = str(uuid.uuid4())
    op = agent.wait(_create(agent, snap, bed.precreate(snap)))
    assert op.state is api.OperationState.SUCCEEDED
    assert _steps(op) == [("validate", "done"), ("snapshot", "done"), ("notify", "done")]
    assert bed.notifier.sent == [(snap, Report.CREATE_DONE)]
    assert op.volume_ids == (VOL,) and op.snapshot_id == snap


def test_same_snapshot_id_twice_is_one_operation_and_one_snapshot(bed: Bed, agent: Agent) -> None:
    snap = str(uuid.uuid4())
    name = bed.precreate(snap)
    first = _create(agent, snap, name)
    agent.wait(first)
    again = _create(agent, snap, name)  # the file is now in the chain: still answered, not redone
    assert again.id == first.id
    assert [c for c in bed.hv.calls if c[0] == "snapshot"] == [("snapshot", name)]
    assert len(agent.svc.list_operations(CTX, api.OperationFilters())) == 1


@pytest.mark.parametrize(
    "case",
    ["unknown_volume", "missing_file", "wrong_backing", "other_volume", "merge_not_in_chain",
     "target_above"],
)  # fmt: skip
def test_bad_requests_touch_nothing(bed: Bed, agent: Agent, case: str) -> None:
    snap = str(uuid.uuid4())
    top = bed.hv.chain[0]
    if case == "wrong_backing":
        make_image(bed.dir / "volume-x-elsewhere")  # not a volume file: a hostile backing name
        make_image(bed.dir / f"volume-{VOL}.{snap}", top, backing_fmt="raw")
    before = sorted(os.listdir(bed.dir))
    expected: type[Exception] = api.InvalidRequest
    call: Callable[[], object]
    if case == "unknown_volume":
        expected = api.VolumeNotFound
        req = api.CreateSnapshotRequest(str(uuid.uuid4()), snap, f"volume-{VOL}.{snap}")
        call = lambda: agent.svc.create_assisted_snapshot(CTX, req)  # noqa: E731
    elif case in ("missing_file", "wrong_backing"):
        call = lambda: _create(agent, snap, f"volume-{VOL}.{snap}")  # noqa: E731
    elif case == "other_volume":
        other = f"volume-{uuid.uuid4()}.{snap}"
        call = lambda: _create(agent, snap, other)  # noqa: E731
    elif case == "merge_not_in_chain":
        call = lambda: _delete(agent, snap, f"volume-{VOL}.{uuid.uuid4()}", top)  # noqa: E731
    else:
        call = lambda: _delete(agent, snap, top, top)  # noqa: E731
    with pytest.raises(expected):
        call()
    assert sorted(os.listdir(bed.dir)) == before
    assert bed.hv.calls == []
    assert agent.svc.list_operations(CTX, api.OperationFilters()) == []
    assert bed.notifier.sent == []


def test_commit_delete_journals_merge_and_progress(bed: Bed, agent: Agent) -> None:
    s1, s2 = str(uuid.uuid4()), str(uuid.uuid4())
    agent.wait(_create(agent, s1, bed.precreate(s1)))
    agent.wait(_create(agent, s2, bed.precreate(s2)))
    middle, base = bed.hv.chain[1], bed.hv.chain[2]
    op = agent.wait(_delete(agent, s1, middle, base))
    assert op.state is api.OperationState.SUCCEEDED
    assert _steps(op) == [("validate", "done"), ("merge", "done"), ("notify", "done")]
    assert op.result["progress"] == {"cur": 5, "end": 10}
    assert bed.hv.calls[-1] == ("merge", middle, base)
    assert bed.notifier.sent[-1] == (s1, Report.DELETE_DONE)


def test_failed_snapshot_reports_error_and_fails_operation(bed: Bed, agent: Agent) -> None:
    snap = str(uuid.uuid4())
    bed.hv.fail = RuntimeError("qemu said no")
    op = agent.wait(_create(agent, snap, bed.precreate(snap)))
    assert op.state is api.OperationState.FAILED
    assert op.error is not None and "qemu said no" in op.error["message"]
    assert _steps(op) == [("validate", "done"), ("snapshot", "failed"), ("notify", "done")]
    assert bed.notifier.sent == [(snap, Report.CREATE_FAILED)]


def test_operations_on_one_disk_never_overlap(bed: Bed, agent: Agent) -> None:
    s1, s2, s3 = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())
    for s in (s1, s2, s3):
        agent.wait(_create(agent, s, bed.precreate(s)))
    _f3, _f2, f1, base = bed.hv.chain
    bed.hv.gate = threading.Event()
    a = _delete(agent, s1, f1, base)
    s4 = str(uuid.uuid4())  # same disk: queued behind a (valid before and after it, as
    b = _create(agent, s4, bed.precreate(s4))  # Cinder never queues a 2nd delete of a volume)
    assert agent.svc.get_operation(CTX, b.id).state is api.OperationState.QUEUED
    bed.hv.gate.set()
    assert agent.wait(a).state is api.OperationState.SUCCEEDED
    assert agent.wait(b).state is api.OperationState.SUCCEEDED
    assert bed.hv.max_running == 1


def test_pool_runs_different_keys_in_parallel() -> None:
    pool = KeyedPool(2)
    barrier = threading.Barrier(2, timeout=30)
    done: list[str] = []

    def job(key: str) -> None:
        barrier.wait()
        done.append(key)

    for key in ("d1", "d2"):
        pool.submit(key, functools.partial(job, key))
    assert pool.wait_idle(30)
    assert sorted(done) == ["d1", "d2"]  # a serialized pool would break the barrier
    pool.shutdown()


def test_failed_notification_is_journaled_and_resent(tmp_path: Path) -> None:
    bed = Bed(tmp_path)
    bed.notifier.failures = 1
    agent = bed.agent(workers=4)
    try:
        snap = str(uuid.uuid4())
        op = agent.wait(_create(agent, snap, bed.precreate(snap)))
        assert op.state is api.OperationState.SUCCEEDED
        assert op.result["steps"][-1]["data"]["delivered"] is False
        (note,) = agent.journal.pending_notifications(due_only=False)
        assert (note.status, note.progress, note.attempts) == ("creating", "90%", 1)
        assert bed.notifier.sent == []
        # a fresh queue (agent restart) resends everything pending at start
        again = NotifyQueue(agent.journal, bed.notifier, poll_interval=0.05)
        again.start()
        try:
            for _ in range(600):
                if bed.notifier.sent:
                    break
                threading.Event().wait(0.05)
        finally:
            again.stop()
        assert bed.notifier.sent == [(snap, Report.CREATE_DONE)]
        assert agent.journal.notification(note.id).state is NotificationState.SENT
    finally:
        agent.close()
