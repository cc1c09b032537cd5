"""The operation journal's operations: idempotency, life cycle, listing, prune, listener."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import pytest

from hostagent.journal.model import (
    ErrorInfo,
    Operation,
    OperationKind,
    OperationState,
    Progress,
    StepState,
)
from hostagent.journal.store import (
    IdempotencyConflict,
    InvalidTransition,
    Journal,
    UnknownOperation,
)
from tests.unit.hostagent.journal.helpers import CREATE, SNAP, VOL, FakeClock

# -- basics and idempotency ----------------------------------------------------------------


def test_begin_records_everything(journal: Journal, clock: FakeClock) -> None:
    begun = journal.begin(OperationKind.ASSISTED_CREATE, CREATE, SNAP, locks=[VOL, VOL, "vda"])
    op = begun.operation
    assert begun.created
    assert op.state is OperationState.PENDING
    assert op.request == CREATE
    assert op.idempotency_key == SNAP
    assert op.locks == (VOL, "vda")  # deduplicated, sorted: a stable lock order
    assert op.host == "hostA"
    assert op.created_at == op.updated_at == clock.now
    assert op.progress == Progress(0, 0)
    assert journal.get(op.id) == op


def test_same_key_returns_existing_operation(journal: Journal) -> None:
    first = journal.begin(OperationKind.ASSISTED_CREATE, CREATE, SNAP).operation
    journal.finish(first.id, OperationState.SUCCEEDED, result={"file": "x"})
    again = journal.begin(OperationKind.ASSISTED_CREATE, dict(CREATE), SNAP)
    assert not again.created
    assert again.operation.id == first.id
    assert again.operation.state is OperationState.SUCCEEDED
    assert again.operation.result == {"file": "x"}
    assert len(journal.list_operations()) == 1


def test_same_key_other_kind_is_another_operation(journal: Journal) -> None:
    create = journal.begin(OperationKind.ASSISTED_CREATE, CREATE, SNAP)
    delete = journal.begin(OperationKind.ASSISTED_DELETE, {"snapshot_id": SNAP}, SNAP)
    assert delete.created
    assert delete.operation.id != create.operation.id


def test_same_key_different_request_conflicts(journal: Journal) -> None:
    first = journal.begin(OperationKind.ASSISTED_CREATE, CREATE, SNAP).operation
    other = {**CREATE, "new_file": f"volume-{VOL}.other"}
    with pytest.raises(IdempotencyConflict) as info:
        journal.begin(OperationKind.ASSISTED_CREATE, other, SNAP)
    assert info.value.existing.id == first.id
    assert len(journal.list_operations()) == 1


def test_no_key_never_deduplicates(journal: Journal) -> None:
    a = journal.begin(OperationKind.BACKUP, {"volume_id": VOL})
    b = journal.begin(OperationKind.BACKUP, {"volume_id": VOL})
    assert a.created and b.created and a.operation.id != b.operation.id


def test_unknown_operation(journal: Journal) -> None:
    with pytest.raises(UnknownOperation):
        journal.get(uuid.uuid4())
    with pytest.raises(UnknownOperation):
        journal.plan_step(uuid.uuid4(), "x")


# -- operation life cycle ------------------------------------------------------------------


def test_life_cycle_and_progress(journal: Journal, clock: FakeClock) -> None:
    op = journal.begin(OperationKind.ASSISTED_DELETE, {"snapshot_id": SNAP}, SNAP).operation
    clock.now += 1
    assert journal.start(op.id).state is OperationState.RUNNING
    clock.now += 1
    journal.set_progress(op.id, 64, 128)
    got = journal.get(op.id)
    assert got.progress == Progress(64, 128)
    assert got.updated_at == clock.now
    err = RuntimeError("block job vanished")
    done = journal.finish(op.id, OperationState.FAILED, error=err)
    assert done.state is OperationState.FAILED
    assert done.error == ErrorInfo("RuntimeError", "block job vanished")
    with pytest.raises(InvalidTransition):
        journal.finish(op.id, OperationState.SUCCEEDED)
    with pytest.raises(InvalidTransition):
        journal.plan_step(op.id, "too_late")
    with pytest.raises(InvalidTransition):
        journal.set_progress(op.id, 1, 1)


@pytest.mark.parametrize(
    ("state", "error"),
    [
        (OperationState.RUNNING, None),
        (OperationState.FAILED, None),
        (OperationState.SUCCEEDED, ErrorInfo("X", "y")),
    ],
)
def test_finish_rejects_inconsistent_outcomes(
    journal: Journal, state: OperationState, error: ErrorInfo | None
) -> None:
    op = journal.begin(OperationKind.BACKUP, {}).operation
    with pytest.raises(InvalidTransition):
        journal.finish(op.id, state, error=error)
    assert journal.get(op.id).state is OperationState.PENDING


# -- listing and recovery view -------------------------------------------------------------


def test_list_filters(journal: Journal, clock: FakeClock) -> None:
    a = journal.begin(OperationKind.ASSISTED_CREATE, CREATE, SNAP, locks=[VOL]).operation
    clock.now += 10
    b = journal.begin(OperationKind.BACKUP, {"v": 1}, locks=[VOL, "other"]).operation
    clock.now += 10
    c = journal.begin(OperationKind.BACKUP, {"v": 2}, locks=["other"]).operation
    journal.finish(c.id, OperationState.CANCELLED)

    def ids(ops: list[Operation]) -> list[uuid.UUID]:
        return [o.id for o in ops]

    assert ids(journal.list_operations()) == [a.id, b.id, c.id]
    assert ids(journal.list_operations(kind=OperationKind.BACKUP)) == [b.id, c.id]
    assert ids(journal.list_operations(lock=VOL)) == [a.id, b.id]
    assert ids(journal.list_operations(lock="other", states=[OperationState.PENDING])) == [b.id]
    assert ids(journal.list_operations(since=1010.0)) == [b.id, c.id]
    assert ids(journal.list_operations(limit=1)) == [a.id]
    assert ids(journal.list_operations(limit=2, newest_first=True)) == [c.id, b.id]
    assert ids(journal.list_operations(host="hostB")) == []
    assert ids(journal.list_operations(host="hostA")) == [a.id, b.id, c.id]
    assert journal.find(OperationKind.ASSISTED_CREATE, SNAP) == journal.get(a.id)
    assert journal.find(OperationKind.ASSISTED_DELETE, SNAP) is None


def test_unfinished_has_steps_in_order(journal: Journal) -> None:
    done = journal.begin(OperationKind.BACKUP, {}).operation
    journal.finish(done.id, OperationState.SUCCEEDED)
    op = journal.begin(OperationKind.ASSISTED_CREATE, CREATE, SNAP).operation
    for name in ("create_overlay", "snapshot", "ledger"):
        journal.plan_step(op.id, name)
    journal.step_done(op.id, 1)
    pending = journal.begin(OperationKind.RESTORE, {}).operation
    records = journal.unfinished()
    assert [r.operation.id for r in records] == [op.id, pending.id]
    assert [(s.seq, s.name) for s in records[0].steps] == [
        (1, "create_overlay"),
        (2, "snapshot"),
        (3, "ledger"),
    ]
    assert records[0].steps[0].state is StepState.DONE
    assert records[1].steps == ()


def test_prune_keeps_unfinished_and_recent(journal: Journal, clock: FakeClock) -> None:
    old = journal.begin(OperationKind.BACKUP, {"n": 1}).operation
    journal.plan_step(old.id, "copy")
    journal.finish(old.id, OperationState.SUCCEEDED)
    stuck = journal.begin(OperationKind.BACKUP, {"n": 2}, locks=[VOL]).operation
    sent = journal.enqueue(SNAP, "creating", "90%")
    journal.mark_sent(sent.id)
    owed = journal.enqueue(SNAP, "error")
    clock.now += 100
    recent = journal.begin(OperationKind.BACKUP, {"n": 3}).operation
    journal.finish(recent.id, OperationState.FAILED, error=ErrorInfo("E", "m"))
    assert journal.prune(older_than=clock.now - 50).operations == 1
    assert {o.id for o in journal.list_operations()} == {stuck.id, recent.id}
    with pytest.raises(UnknownOperation):
        journal.get(old.id)
    assert journal.steps(old.id) == []
    assert [n.id for n in journal.pending_notifications()] == [owed.id]
    with pytest.raises(UnknownOperation):
        journal.notification(sent.id)


# -- the operation listener (notifications hook in here) -----------------------------------


class Recorder:
    def __init__(self, fail: bool = False) -> None:
        self.events: list[tuple[str, Operation]] = []
        self.fail = fail

    def operation_begun(self, op: Operation) -> None:
        self.events.append(("begun", op))
        if self.fail:
            raise RuntimeError("bus down")

    def operation_finished(self, op: Operation) -> None:
        self.events.append(("finished", op))
        if self.fail:
            raise RuntimeError("bus down")


def test_listener_hears_new_operations_and_final_states(tmp_path: Path) -> None:
    rec = Recorder()
    j = Journal(str(tmp_path / "j.db"), host="hostA", listener=rec)
    op = j.begin(OperationKind.ASSISTED_CREATE, CREATE, SNAP).operation
    j.begin(OperationKind.ASSISTED_CREATE, CREATE, SNAP)  # a retry: not a new operation
    j.plan_step(op.id, "snapshot")
    j.set_progress(op.id, 1, 2)
    assert [e for e, _ in rec.events] == ["begun"]
    assert rec.events[0][1].state is OperationState.PENDING
    j.finish(op.id, OperationState.FAILED, error=ErrorInfo("X", "boom"))
    assert [e for e, _ in rec.events] == ["begun", "finished"]
    final = rec.events[1][1]
    assert final.state is OperationState.FAILED and final.error == ErrorInfo("X", "boom")
    assert j.get(op.id) == final  # the listener saw what was committed


def test_listener_failure_never_fails_the_journal(tmp_path: Path) -> None:
    rec = Recorder(fail=True)
    j = Journal(str(tmp_path / "j.db"), host="hostA", listener=rec)
    op = j.begin(OperationKind.ASSISTED_CREATE, CREATE, SNAP).operation
    done = j.finish(op.id, OperationState.SUCCEEDED, result={"active": "f"})
    assert done.state is OperationState.SUCCEEDED
    assert j.get(op.id).state is OperationState.SUCCEEDED
    assert len(rec.events) == 2


def test_listener_called_after_commit_outside_the_lock(tmp_path: Path) -> None:
    """A listener reading the journal from another thread must not deadlock or see old data."""
    seen: list[OperationState] = []
    path = str(tmp_path / "j.db")

    class Reader:
        def operation_begun(self, op: Operation) -> None:
            pass

        def operation_finished(self, op: Operation) -> None:
            t = threading.Thread(target=lambda: seen.append(j.get(op.id).state))
            t.start()
            t.join(5)

    j = Journal(path, host="hostA", listener=Reader())
    op = j.begin(OperationKind.ASSISTED_DELETE, {"snapshot_id": SNAP}, SNAP).operation
    j.finish(op.id, OperationState.CANCELLED)
    assert seen == [OperationState.CANCELLED]
