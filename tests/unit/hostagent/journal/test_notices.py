"""The journal's notices owed to the volume service: retry bookkeeping, dedup, backoff."""

from __future__ import annotations

import pytest

from hostagent.journal.model import NotificationState, OperationKind
from hostagent.journal.store import InvalidTransition, Journal, backoff
from tests.unit.hostagent.journal.helpers import CREATE, SNAP, FakeClock

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
