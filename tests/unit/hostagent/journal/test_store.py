"""The operation journal: idempotency, durability across kills, threads, schema, notices."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import uuid
from pathlib import Path

import pytest

from hostagent.journal import schema as _journal_schema
from hostagent.journal.model import (
    ErrorInfo,
    NotificationState,
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
    SchemaError,
    UnknownOperation,
    backoff,
)

SNAP = "aaaaaaaa-1111-4222-8333-444444444444"
VOL = "0b1c2d3e-4f50-4a6b-8c7d-8e9fa0b1c2d3"
CREATE = {"volume_id": VOL, "snapshot_id": SNAP, "new_file": f"volume-{VOL}.{SNAP}"}


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def journal(tmp_path: Path, clock: FakeClock) -> Journal:
    return Journal(str(tmp_path / "journal.db"), host="hostA", clock=clock)


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


# -- steps ---------------------------------------------------------------------------------


def test_steps_numbered_and_merged(journal: Journal) -> None:
    op = journal.begin(OperationKind.ASSISTED_CREATE, CREATE, SNAP).operation
    s1 = journal.plan_step(op.id, "create_overlay", {"path": "/s/x"})
    assert journal.get(op.id).state is OperationState.RUNNING  # planning starts it
    s2 = journal.plan_step(op.id, "snapshot")
    assert (s1.seq, s2.seq) == (1, 2)
    assert s1.state is StepState.PLANNED
    done = journal.step_done(op.id, 1, {"size": 42})
    assert done.state is StepState.DONE
    assert done.data == {"path": "/s/x", "size": 42}
    failed = journal.step_failed(op.id, 2, ValueError("no guest agent"))
    assert failed.error == ErrorInfo("ValueError", "no guest agent")
    undone = journal.step_undone(op.id, 1, {"removed": True})
    assert undone.state is StepState.UNDONE
    assert [s.state for s in journal.steps(op.id)] == [StepState.UNDONE, StepState.FAILED]


def test_invalid_step_transitions(journal: Journal) -> None:
    op = journal.begin(OperationKind.BACKUP, {}).operation
    journal.plan_step(op.id, "a")
    journal.step_done(op.id, 1)
    with pytest.raises(InvalidTransition):
        journal.step_done(op.id, 1)
    with pytest.raises(InvalidTransition):
        journal.step_failed(op.id, 1, RuntimeError("x"))
    journal.step_undone(op.id, 1)
    with pytest.raises(InvalidTransition):
        journal.step_undone(op.id, 1)
    with pytest.raises(UnknownOperation):
        journal.step_done(op.id, 7)


def test_step_context_manager_success(journal: Journal) -> None:
    op = journal.begin(OperationKind.ASSISTED_CREATE, CREATE, SNAP).operation
    with journal.step(op.id, "create_overlay", {"path": "/s/x"}) as s:
        # Written before the body runs: a crash here leaves a PLANNED trace.
        assert journal.steps(op.id)[0].state is StepState.PLANNED
        s.data["created"] = True
    (step,) = journal.steps(op.id)
    assert step.state is StepState.DONE
    assert step.data == {"path": "/s/x", "created": True}


def test_step_context_manager_failure(journal: Journal) -> None:
    op = journal.begin(OperationKind.ASSISTED_CREATE, CREATE, SNAP).operation
    with pytest.raises(OSError, match="disk full"), journal.step(op.id, "create_overlay"):
        raise OSError("disk full")
    (step,) = journal.steps(op.id)
    assert step.state is StepState.FAILED
    assert step.error == ErrorInfo("OSError", "disk full")


def test_step_context_manager_base_exception_leaves_planned(journal: Journal) -> None:
    op = journal.begin(OperationKind.BACKUP, {}).operation
    with pytest.raises(KeyboardInterrupt), journal.step(op.id, "copy"):
        raise KeyboardInterrupt
    assert journal.steps(op.id)[0].state is StepState.PLANNED


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
    assert journal.prune(older_than=clock.now - 50) == 1
    assert {o.id for o in journal.list_operations()} == {stuck.id, recent.id}
    with pytest.raises(UnknownOperation):
        journal.get(old.id)
    assert journal.steps(old.id) == []
    assert [n.id for n in journal.pending_notifications()] == [owed.id]
    with pytest.raises(UnknownOperation):
        journal.notification(sent.id)


# -- notifications -------------------------------------------------------------------------


def test_notification_retry_bookkeeping(journal: Journal, clock: FakeClock) -> None:
    op = journal.begin(OperationKind.ASSISTED_CREATE, CREATE, SNAP).operation
    note = journal.enqueue(SNAP, "creating", "90%", op_id=op.id)
    assert note.state is NotificationState.PENDING
    assert note.attempts == 0 and note.op_id == op.id
    assert journal.pending_notifications() == [note]

    failed = journal.mark_failed(note.id, ConnectionError("cinder down"))
    assert failed.attempts == 1
    assert failed.last_error == "ConnectionError: cinder down"
    assert failed.next_attempt_at == clock.now + backoff(1)
    assert journal.pending_notifications() == []  # not due yet
    assert journal.pending_notifications(due_only=False) == [failed]

    clock.now += backoff(1)
    assert [n.id for n in journal.pending_notifications()] == [note.id]
    second = journal.mark_failed(note.id, "HTTP 503", retry_in=7.0)
    assert second.attempts == 2 and second.next_attempt_at == clock.now + 7.0

    clock.now += 7.0
    sent = journal.mark_sent(note.id)
    assert sent.state is NotificationState.SENT
    assert sent.attempts == 3 and sent.sent_at == clock.now
    assert sent.last_error == "HTTP 503"  # history kept
    assert journal.pending_notifications(due_only=False) == []
    with pytest.raises(InvalidTransition):
        journal.mark_sent(note.id)
    with pytest.raises(InvalidTransition):
        journal.mark_failed(note.id, "late")


def test_enqueue_deduplicates_pending_only(journal: Journal) -> None:
    a = journal.enqueue(SNAP, "creating", "90%")
    assert journal.enqueue(SNAP, "creating", "90%").id == a.id
    other = journal.enqueue(SNAP, "error")  # NULL progress compares with IS
    assert journal.enqueue(SNAP, "error").id == other.id
    journal.mark_sent(a.id)
    assert journal.enqueue(SNAP, "creating", "90%").id != a.id
    order = [(n.status, n.progress) for n in journal.pending_notifications()]
    assert order == [("error", None), ("creating", "90%")]


def test_backoff_doubles_and_caps() -> None:
    assert [backoff(n) for n in (1, 2, 3, 4)] == [2.0, 4.0, 8.0, 16.0]
    assert backoff(30) == 300.0


# -- durability across process death -------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import os, signal, sys, time
    from hostagent.journal.store import Journal
    from hostagent.journal.model import OperationKind

    path, how = sys.argv[1], sys.argv[2]
    j = Journal(path, host="child")
    op = j.begin(OperationKind.ASSISTED_CREATE, {"snapshot_id": "s"}, "s", locks=["v"]).operation
    with j.step(op.id, "create_overlay", {"path": "/share/x"}):
        pass
    j.plan_step(op.id, "snapshot", {"disk": "vda"})
    j.enqueue("s", "creating", "90%", op_id=op.id)
    print(op.id, flush=True)
    if how == "exit":
        os._exit(0)
    if how == "self-kill":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(600)  # "parent-kill": wait to be SIGKILLed mid-operation
    """
)


@pytest.mark.parametrize("how", ["exit", "self-kill", "parent-kill"])
def test_planned_step_survives_process_death(tmp_path: Path, how: str) -> None:
    path = str(tmp_path / "journal.db")
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, path, how],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    line = child.stdout.readline()
    if how == "parent-kill":
        child.send_signal(signal.SIGKILL)
    rc = child.wait(timeout=60)
    assert rc == (0 if how == "exit" else -signal.SIGKILL)
    op_id = uuid.UUID(line.strip())

    journal = Journal(path, host="restarted")
    (record,) = journal.unfinished()
    assert record.operation.id == op_id
    assert record.operation.state is OperationState.RUNNING
    assert record.operation.host == "child"
    assert [(s.name, s.state) for s in record.steps] == [
        ("create_overlay", StepState.DONE),
        ("snapshot", StepState.PLANNED),
    ]
    assert record.steps[1].data == {"disk": "vda"}
    (note,) = journal.pending_notifications()
    assert (note.snapshot_id, note.status, note.progress) == ("s", "creating", "90%")
    # The restarted agent finishes the job where the dead one stopped.
    journal.step_done(op_id, 2)
    journal.finish(op_id, OperationState.SUCCEEDED)
    assert journal.unfinished() == []


# -- concurrency ---------------------------------------------------------------------------


def test_threads_share_one_journal(journal: Journal) -> None:
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(15):
                op = journal.begin(OperationKind.BACKUP, {"w": n, "i": i}, f"{n}-{i}").operation
                with journal.step(op.id, "copy") as s:
                    s.data["n"] = n
                journal.plan_step(op.id, "verify")
                journal.step_done(op.id, 2)
                journal.finish(op.id, OperationState.SUCCEEDED)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    ops = journal.list_operations()
    assert len(ops) == 90
    assert all(o.state is OperationState.SUCCEEDED for o in ops)
    for o in ops:
        assert [(s.seq, s.state) for s in journal.steps(o.id)] == [
            (1, StepState.DONE),
            (2, StepState.DONE),
        ]


def test_racing_begins_on_separate_connections_create_one(tmp_path: Path) -> None:
    path = str(tmp_path / "journal.db")
    journals = [Journal(path) for _ in range(6)]
    barrier = threading.Barrier(len(journals))
    results: list[tuple[uuid.UUID, bool]] = []
    lock = threading.Lock()

    def race(j: Journal) -> None:
        barrier.wait()
        begun = j.begin(OperationKind.ASSISTED_CREATE, CREATE, SNAP)
        with lock:
            results.append((begun.operation.id, begun.created))

    threads = [threading.Thread(target=race, args=(j,)) for j in journals]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 6
    assert len({op_id for op_id, _ in results}) == 1
    assert sum(created for _, created in results) == 1


# -- schema --------------------------------------------------------------------------------


def test_wal_full_and_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    with Journal(str(path)) as j:
        assert j.schema_version == _journal_schema.LATEST
        op = j.begin(OperationKind.BACKUP, {"x": 1}).operation
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == _journal_schema.LATEST
    conn.close()
    with Journal(str(path)) as j:  # reopening migrates nothing and keeps data
        assert j.get(op.id).request == {"x": 1}


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    Journal(str(path)).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {_journal_schema.LATEST + 1}")
    conn.close()
    with pytest.raises(SchemaError, match="newer"):
        Journal(str(path))


def test_migration_hook_runs_once_and_rolls_back_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    Journal(str(path)).close()
    conn = sqlite3.connect(path, isolation_level=None)
    calls: list[int] = []

    def broken(c: sqlite3.Connection) -> None:
        c.execute("ALTER TABLE operations ADD COLUMN half_done TEXT")
        raise RuntimeError("migration bug")

    with pytest.raises(RuntimeError):
        _journal_schema.migrate(conn, [*_journal_schema.MIGRATIONS, broken])
    assert _journal_schema.schema_version(conn) == 1
    columns = [r[1] for r in conn.execute("PRAGMA table_info(operations)")]
    assert "half_done" not in columns

    def v2(c: sqlite3.Connection) -> None:
        calls.append(1)
        c.execute("ALTER TABLE operations ADD COLUMN owner TEXT")

    migrations = [*_journal_schema.MIGRATIONS, v2]
    assert _journal_schema.migrate(conn, migrations) == 2
    assert _journal_schema.migrate(conn, migrations) == 2
    assert calls == [1]
    columns = [r[1] for r in conn.execute("PRAGMA table_info(operations)")]
    assert "owner" in columns
    conn.close()


def test_journal_file_in_missing_directory_fails(tmp_path: Path) -> None:
    with pytest.raises(sqlite3.OperationalError):
        Journal(os.path.join(str(tmp_path), "nope", "journal.db"))


_WRITER = textwrap.dedent(
    """
    import sys
    from hostagent.journal.store import Journal
    from hostagent.journal.model import OperationKind, OperationState

    path, n = sys.argv[1], sys.argv[2]
    j = Journal(path, host=f"proc{n}")
    for i in range(20):
        j.begin(OperationKind.ASSISTED_CREATE, {"i": i}, f"shared-{i}")
        op = j.begin(OperationKind.BACKUP, {"n": n, "i": i}, f"{n}-{i}").operation
        with j.step(op.id, "copy"):
            pass
        j.finish(op.id, OperationState.SUCCEEDED)
        j.enqueue(f"snap-{i}", "creating", "90%")
    """
)


def test_processes_write_one_file_concurrently(tmp_path: Path) -> None:
    path = str(tmp_path / "journal.db")
    Journal(path).close()
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, path, str(n)]) for n in range(3)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    j = Journal(path)
    backups = j.list_operations(kind=OperationKind.BACKUP)
    assert len(backups) == 60
    assert {o.host for o in backups} == {"proc0", "proc1", "proc2"}
    assert all(o.state is OperationState.SUCCEEDED for o in backups)
    # The shared keys were claimed exactly once across the three processes.
    assert len(j.list_operations(kind=OperationKind.ASSISTED_CREATE)) == 20
    # Identical pending notices were not duplicated either.
    assert len(j.pending_notifications(due_only=False)) == 20


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
