"""The journal's sqlite file: threads and processes sharing it, WAL, schema migrations."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import uuid
from pathlib import Path

import pytest

from hostagent.journal import schema as _journal_schema
from hostagent.journal.model import OperationKind, OperationState, StepState
from hostagent.journal.store import Journal, SchemaError
from tests.unit.hostagent.journal.helpers import CREATE, SNAP

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
    assert _journal_schema.schema_version(conn) == _journal_schema.LATEST
    columns = [r[1] for r in conn.execute("PRAGMA table_info(operations)")]
    assert "half_done" not in columns

    def added(c: sqlite3.Connection) -> None:
        calls.append(1)
        c.execute("ALTER TABLE operations ADD COLUMN owner TEXT")

    migrations = [*_journal_schema.MIGRATIONS, added]
    assert _journal_schema.migrate(conn, migrations) == _journal_schema.LATEST + 1
    assert _journal_schema.migrate(conn, migrations) == _journal_schema.LATEST + 1
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
