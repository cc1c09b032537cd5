"""The journal purge: ``Journal.prune`` removes only old final operations (with their steps
and locks), never unfinished ones nor ones a notice is still owed for; the purge thread
(:class:`JournalPurger`) and its wiring in the agent ([journal] options)."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from pathlib import Path

import pytest

from hostagent import agent as agent_mod
from hostagent.config import make_conf
from hostagent.journal.model import ErrorInfo, OperationKind, OperationState
from hostagent.journal.purge import DAY, JournalPurger
from hostagent.journal.store import Journal, UnknownOperation
from tests.unit.hostagent.journal.helpers import SNAP, VOL, FakeClock

AGE = 30 * DAY


class Ops:
    """The cast: old and young, finished and not, with and without owed notices."""

    def __init__(self, j: Journal, clock: FakeClock) -> None:
        def finished(state: OperationState, **kw: object) -> uuid.UUID:
            op = j.begin(OperationKind.BACKUP, {"n": str(uuid.uuid4())}, locks=[VOL]).operation
            j.plan_step(op.id, "read")
            j.step_done(op.id, 1)
            return j.finish(op.id, state, **kw).id  # type: ignore[arg-type]

        self.old_ok = finished(OperationState.SUCCEEDED)
        self.old_failed = finished(OperationState.FAILED, error=ErrorInfo("E", "m"))
        self.old_cancelled = finished(OperationState.CANCELLED)
        self.old_running = j.start(j.begin(OperationKind.RESTORE, {"r": 1}).operation.id).id
        j.plan_step(self.old_running, "restore")
        self.old_pending = j.begin(OperationKind.RESTORE, {"r": 2}).operation.id
        self.old_owed = finished(OperationState.SUCCEEDED)
        self.owed = j.enqueue(SNAP, "creating", "90%", op_id=self.old_owed)
        self.old_delivered = finished(OperationState.SUCCEEDED)
        self.sent = j.enqueue(SNAP, "deleting", "90%", op_id=self.old_delivered)
        j.mark_sent(self.sent.id)
        clock.now += AGE + 3600  # all of the above are now 30 days and an hour old
        self.young = finished(OperationState.SUCCEEDED)
        self.old = {self.old_ok, self.old_failed, self.old_cancelled, self.old_delivered}
        self.kept = {self.old_running, self.old_pending, self.old_owed, self.young}


def test_prune_removes_only_old_final_operations(journal: Journal, clock: FakeClock) -> None:
    c = Ops(journal, clock)
    pruned = journal.prune(clock.now - AGE)
    assert (pruned.operations, pruned.steps, pruned.notices) == (4, 4, 1)
    assert pruned.by_kind == {"backup": 4} and pruned.kept_owed == 1
    assert {o.id for o in journal.list_operations()} == c.kept
    for op_id in c.old:
        with pytest.raises(UnknownOperation):
            journal.get(op_id)
        assert journal.steps(op_id) == []
    # negative controls: unfinished and owed ones survive whole, steps and all
    assert journal.get(c.old_running).state is OperationState.RUNNING
    assert [s.name for s in journal.steps(c.old_running)] == ["restore"]
    assert journal.get(c.old_pending).state is OperationState.PENDING
    assert [s.name for s in journal.steps(c.old_owed)] == ["read"]
    assert [n.id for n in journal.pending_notifications(due_only=False)] == [c.owed.id]
    with pytest.raises(UnknownOperation):
        journal.notification(c.sent.id)
    # the locks of purged operations went with them; the owed one still holds its own
    assert {o.id for o in journal.list_operations(lock=VOL)} == {c.old_owed, c.young}
    assert journal.prune(clock.now - AGE).operations == 0  # idempotent
    # once its notice is delivered, the owed operation goes at the next pass
    journal.mark_sent(c.owed.id)
    assert journal.prune(clock.now - AGE).operations == 1
    assert {o.id for o in journal.list_operations()} == c.kept - {c.old_owed}


def test_prune_works_in_batches(journal: Journal, clock: FakeClock) -> None:
    for i in range(25):
        op = journal.begin(OperationKind.RESTORE, {"i": i}).operation
        journal.plan_step(op.id, "restore")
        journal.finish(op.id, OperationState.SUCCEEDED)
    keep = journal.start(journal.begin(OperationKind.BACKUP, {}).operation.id)
    clock.now += 100
    writes: list[int] = []
    real = journal._write

    def counted():  # type: ignore[no-untyped-def]
        writes.append(1)
        return real()

    journal._write = counted  # type: ignore[method-assign]
    pruned = journal.prune(clock.now - 50, batch=10)
    assert (pruned.operations, pruned.steps, len(writes)) == (25, 25, 3)
    assert [o.id for o in journal.list_operations()] == [keep.id]


def test_prune_stops_between_batches_when_asked(journal: Journal, clock: FakeClock) -> None:
    for i in range(25):
        journal.finish(journal.begin(OperationKind.RESTORE, {"i": i}).operation.id,
                       OperationState.SUCCEEDED)  # fmt: skip
    clock.now += 100
    assert journal.prune(clock.now - 50, batch=10, stop=lambda: True).operations == 10
    assert len(journal.list_operations()) == 15


def test_purger_logs_and_uses_its_age(
    journal: Journal, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    c = Ops(journal, clock)
    caplog.set_level(logging.DEBUG, "hostagent.journal.purge")
    purger = JournalPurger(journal, age=AGE + 7200, interval=60, clock=clock)
    assert purger.purge_once().operations == 0  # nothing is that old yet
    assert "nothing last touched before" in caplog.text
    purger.age = AGE
    assert purger.purge_once().operations == 4
    assert "removed 4 final operations (backup: 4) with 4 steps and 1 delivered notices" in (
        caplog.text
    )
    assert "kept 1 old final operations whose notices are undelivered" in caplog.text
    assert {o.id for o in journal.list_operations()} == c.kept


def test_purger_thread_runs_at_start_and_every_interval(tmp_path: Path) -> None:
    j = Journal(str(tmp_path / "j.sqlite"), host="h")
    try:
        old = j.begin(OperationKind.BACKUP, {}).operation
        j.finish(old.id, OperationState.SUCCEEDED)
        purger = JournalPurger(j, age=0.2, interval=0.1)
        time.sleep(0.3)
        purger.start()
        _until(lambda: not j.list_operations())  # the first pass, at start
        later = j.begin(OperationKind.BACKUP, {}).operation
        j.finish(later.id, OperationState.FAILED, error=ErrorInfo("E", "m"))
        running = j.begin(OperationKind.BACKUP, {"r": 1}).operation
        _until(lambda: [o.id for o in j.list_operations()] == [running.id])  # a later pass
        time.sleep(0.5)  # passes go on; the unfinished one stays
        assert [o.id for o in j.list_operations()] == [running.id]
        purger.stop()
        assert not any(t.name == "qsnap-journal-purge" for t in _threads())
    finally:
        j.close()


def test_purge_age_zero_disables_the_thread(journal: Journal) -> None:
    purger = JournalPurger(journal, age=0, interval=1)
    purger.start()
    assert not purger.enabled and not any(t.name == "qsnap-journal-purge" for t in _threads())
    purger.stop()  # harmless


def test_agent_starts_and_stops_the_purge_thread(tmp_path: Path) -> None:
    conf = make_conf(
        overrides={
            "host": "unit-host",
            "state_path": str(tmp_path / "state"),
            "transport_url": "fake://",
            "libvirt.uri": "test:///default",
            "cinder.enabled": False,
            "shares.allowed_roots": [str(tmp_path)],
            "journal.purge_age_days": 1.0,
            "journal.purge_interval": 5.0,
        }
    )
    assert (conf.journal.purge_age_days, conf.journal.purge_interval) == (1.0, 5.0)
    (tmp_path / "state").mkdir()
    # an earlier run's journal: one op finished two days ago, one finished just now
    clock = FakeClock(time.time() - 2 * DAY)
    with Journal(str(tmp_path / "state" / "journal.sqlite"), clock=clock) as j:
        stale = j.begin(OperationKind.BACKUP, {"n": 1}).operation
        j.finish(stale.id, OperationState.SUCCEEDED)
        clock.now = time.time()
        fresh = j.begin(OperationKind.BACKUP, {"n": 2}).operation
        j.finish(fresh.id, OperationState.SUCCEEDED)
    agent = agent_mod.Agent(conf)
    assert (agent.purger.age, agent.purger.interval) == (DAY, 5.0)
    with agent:
        assert any(t.name == "qsnap-journal-purge" for t in _threads())
        _until(lambda: [o.id for o in agent.journal.list_operations()] == [fresh.id])
    assert not any(t.name == "qsnap-journal-purge" for t in _threads())
    defaults = make_conf()
    assert (defaults.journal.purge_age_days, defaults.journal.purge_interval) == (30.0, 3600.0)


def _threads() -> list[threading.Thread]:
    return threading.enumerate()


def _until(cond: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)
