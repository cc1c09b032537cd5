"""Listings newest first with the caller's limit: the journal (sqlite ``ORDER BY ... DESC
LIMIT`` on an index), the schema v2 migration that adds the indexes, and the agent service's
``list_operations`` verb (RPC 1.4) on top of it."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostagent.journal import schema
from hostagent.journal.model import Operation, OperationKind, OperationState
from hostagent.journal.store import Journal
from hostagent.rpc import contract as api
from tests.unit.hostagent.fakes import CTX, Agent, Bed
from tests.unit.hostagent.journal.helpers import FakeClock

FINISHED = 2000


def _fill(journal: Journal, clock: FakeClock, n: int, *, running_at: int) -> uuid.UUID:
    """``n`` finished operations one second apart; a RUNNING one is begun as number
    ``running_at`` (so ``n - running_at`` finished ones are newer). Returns its id."""
    running: uuid.UUID | None = None
    for i in range(n):
        if i == running_at:
            op = journal.begin(OperationKind.BACKUP, {"running": True}, locks=["volume:v"])
            running = journal.start(op.operation.id).id
            clock.now += 1
        done = journal.begin(OperationKind.RESTORE, {"i": i}).operation
        journal.finish(done.id, OperationState.SUCCEEDED)
        clock.now += 1
    assert running is not None
    return running


def _ids(ops: list[Operation]) -> list[uuid.UUID]:
    return [o.id for o in ops]


def test_newest_first_limit_and_a_running_op_among_2000_finished(
    journal: Journal, clock: FakeClock
) -> None:
    running = _fill(journal, clock, FINISHED, running_at=FINISHED - 500)  # 500 newer than it
    everything = journal.list_operations()  # recovery's order: oldest first, unlimited
    assert len(everything) == FINISHED + 1
    newest = journal.list_operations(limit=1, newest_first=True)
    assert _ids(newest) == [everything[-1].id]
    top = journal.list_operations(limit=1000, newest_first=True)
    assert _ids(top) == _ids(everything[::-1][:1000])
    assert [o.created_at for o in top] == sorted((o.created_at for o in top), reverse=True)
    assert running in _ids(top)  # unfiltered, and the limit covers it: listed
    assert running not in _ids(journal.list_operations(limit=1000))  # the old oldest-first bug
    assert running not in _ids(journal.list_operations(limit=500, newest_first=True))
    # asked for by state it is never hidden by finished ones, whatever the limit
    for states in ([OperationState.RUNNING], [OperationState.PENDING, OperationState.RUNNING]):
        assert _ids(journal.list_operations(states=states, limit=1, newest_first=True)) == [running]
    assert _ids(journal.list_operations(lock="volume:v", limit=1, newest_first=True)) == [running]
    by_kind = journal.list_operations(kind=OperationKind.BACKUP, limit=1, newest_first=True)
    assert _ids(by_kind) == [running]


def test_same_instant_ties_newest_journaled_first(journal: Journal) -> None:
    a = journal.begin(OperationKind.BACKUP, {"n": 1}).operation
    b = journal.begin(OperationKind.BACKUP, {"n": 2}).operation  # the clock did not move
    assert _ids(journal.list_operations(newest_first=True)) == [b.id, a.id]
    assert _ids(journal.list_operations(newest_first=True, limit=1)) == [b.id]


@pytest.mark.parametrize(
    "filters",
    [
        {},
        {"states": [OperationState.RUNNING]},
        {"states": [OperationState.PENDING]},
        {"kind": OperationKind.BACKUP},
    ],
)
def test_newest_first_walks_an_index_without_sorting(
    journal: Journal, filters: dict[str, object]
) -> None:
    issued: list[str] = []
    journal._conn.set_trace_callback(issued.append)  # the SQL as run, values bound
    journal.list_operations(limit=1, newest_first=True, **filters)  # type: ignore[arg-type]
    journal._conn.set_trace_callback(None)
    (sql,) = issued
    plan = " | ".join(r[3] for r in journal._conn.execute("EXPLAIN QUERY PLAN " + sql))
    assert "DESC LIMIT 1" in sql and "USING INDEX" in plan and "TEMP B-TREE" not in plan, plan


def test_steps_of_many_operations_in_one_read(journal: Journal) -> None:
    ops = [journal.begin(OperationKind.BACKUP, {"n": i}).operation for i in range(520)]
    for op in ops[:510]:  # more than one 500-id chunk
        journal.plan_step(op.id, "first")
        journal.plan_step(op.id, "second")
    got = journal.steps_of(o.id for o in ops)
    assert len(got) == 510 and ops[515].id not in got
    assert [(s.seq, s.name) for s in got[ops[509].id]] == [(1, "first"), (2, "second")]
    assert got[ops[0].id] == journal.steps(ops[0].id)
    assert journal.steps_of([]) == {}


# -- schema v2: the listing indexes ------------------------------------------------------


def test_v1_journal_migrates_to_v2_keeping_its_operations(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path, isolation_level=None)
    assert schema.migrate(conn, schema.MIGRATIONS[:1]) == 1  # what a v1 agent left
    conn.execute(
        "INSERT INTO operations (id, kind, state, request, locks, host, created_at, updated_at)"
        " VALUES (?, 'backup', 'succeeded', '{}', '[]', 'h', 5.0, 6.0)",
        (str(uuid.UUID(int=7)),),
    )
    conn.close()
    with Journal(str(path), host="h") as j:
        assert j.schema_version == schema.LATEST == 2
        assert _ids(j.list_operations(newest_first=True, limit=1)) == [uuid.UUID(int=7)]
        names = {r[0] for r in j._conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        assert {"operations_created", "operations_kind", "operations_state"} <= names
    with Journal(str(path), host="h") as j:  # reopening migrates nothing more
        assert j.schema_version == 2


# -- the service verb (RPC 1.4) ----------------------------------------------------------


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    a = Bed(tmp_path).agent()
    yield a
    a.close()


def test_service_lists_newest_first_with_the_callers_limit_and_steps(agent: Agent) -> None:
    j = agent.journal
    old = j.begin(OperationKind.BACKUP, {"action": "verify"}, locks=["volume:x"]).operation
    j.start(old.id)
    j.plan_step(old.id, "verify")
    done = []
    for i in range(30):
        op = j.begin(OperationKind.RESTORE, {"i": i}).operation
        j.plan_step(op.id, "restore")
        done.append(j.finish(op.id, OperationState.SUCCEEDED))
    seen: list[int | None] = []
    real = j.list_operations

    def spy(**kw: object) -> list[Operation]:
        seen.append(kw.get("limit"))  # type: ignore[arg-type]
        assert kw.get("newest_first") is True
        return real(**kw)  # type: ignore[arg-type]

    j.list_operations = spy  # type: ignore[method-assign]
    one = agent.svc.list_operations(CTX, api.OperationFilters(limit=1))
    assert [o.id for o in one] == [str(done[-1].id)] and seen == [1]
    assert [s["name"] for s in one[0].result["steps"]] == ["restore"]
    ten = agent.svc.list_operations(CTX, api.OperationFilters(limit=10))
    assert [o.id for o in ten] == [str(o.id) for o in done[::-1][:10]]
    running = agent.svc.list_operations(
        CTX, api.OperationFilters(state=api.OperationState.RUNNING, limit=1)
    )
    assert [o.id for o in running] == [str(old.id)]
    assert running[0].result["steps"][0]["name"] == "verify"
    assert len(agent.svc.list_operations(CTX, api.OperationFilters())) == 31  # default 100
