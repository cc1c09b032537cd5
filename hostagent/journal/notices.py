"""The notifications table: status updates owed to the volume service, never dropped.

A notice is PENDING until delivered; each failed delivery is counted and rescheduled by
:func:`backoff`, so a Cinder outage delays reports instead of losing them. The sender is
:class:`hostagent.cinder.outbox.NotifyQueue`; this is only its durable queue.
"""

# S608: SQL text is built only from column-list constants and "?" placeholders; every value
# is bound as a parameter.
# ruff: noqa: S608

from __future__ import annotations

import sqlite3
import uuid
from typing import Any

from hostagent.journal import rows
from hostagent.journal.errors import InvalidTransition, UnknownOperation
from hostagent.journal.model import Notification, NotificationState
from hostagent.journal.sqlite import SqliteStore

__all__ = ["NoticeTable", "backoff"]


def backoff(attempts: int, *, base: float = 2.0, cap: float = 300.0) -> float:
    """Seconds to wait before retry number ``attempts`` (1, 2, ...): doubling, capped."""
    return float(min(cap, base * 2 ** max(0, attempts - 1)))


class NoticeTable(SqliteStore):
    """The notification methods of :class:`~hostagent.journal.store.Journal`."""

    def enqueue(
        self,
        snapshot_id: str,
        status: str,
        progress: str | None = None,
        op_id: uuid.UUID | None = None,
    ) -> Notification:
        """Owe the volume service ``status``/``progress`` for ``snapshot_id``.

        An identical notice still pending is returned instead of a duplicate, so recovery
        may enqueue again whatever it is unsure was enqueued.
        """
        with self._write() as conn:
            row = conn.execute(
                f"SELECT {rows.NOTE_COLUMNS} FROM notifications WHERE snapshot_id = ?"
                " AND status = ? AND progress IS ? AND state = ? ORDER BY id LIMIT 1",
                (snapshot_id, status, progress, NotificationState.PENDING.value),
            ).fetchone()
            if row is not None:
                return rows.notification(row)
            now = self._clock()
            cur = conn.execute(
                "INSERT INTO notifications (snapshot_id, status, progress, op_id, state,"
                " next_attempt_at, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    snapshot_id,
                    status,
                    progress,
                    None if op_id is None else str(op_id),
                    NotificationState.PENDING.value,
                    now,
                    now,
                ),
            )
            assert cur.lastrowid is not None
            return self._note_row(conn, cur.lastrowid)

    def pending_notifications(
        self, *, due_only: bool = True, limit: int | None = None
    ) -> list[Notification]:
        """Undelivered notices in the order they were enqueued (only those due, by default)."""
        sql = f"SELECT {rows.NOTE_COLUMNS} FROM notifications WHERE state = ?"
        args: list[Any] = [NotificationState.PENDING.value]
        if due_only:
            sql += " AND next_attempt_at <= ?"
            args.append(self._clock())
        sql += " ORDER BY id"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        return [rows.notification(row) for row in self._read(sql, args)]

    def notification(self, note_id: int) -> Notification:
        with self._lock:
            return self._note_row(self._conn, note_id)

    def mark_sent(self, note_id: int) -> Notification:
        with self._write() as conn:
            self._pending_note(conn, note_id)
            conn.execute(
                "UPDATE notifications SET state = ?, sent_at = ?, attempts = attempts + 1"
                " WHERE id = ?",
                (NotificationState.SENT.value, self._clock(), note_id),
            )
            return self._note_row(conn, note_id)

    def mark_failed(
        self, note_id: int, error: BaseException | str, *, retry_in: float | None = None
    ) -> Notification:
        """Count a failed delivery and schedule the next one (``backoff`` unless given)."""
        message = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        with self._write() as conn:
            note = self._pending_note(conn, note_id)
            attempts = note.attempts + 1
            delay = backoff(attempts) if retry_in is None else retry_in
            conn.execute(
                "UPDATE notifications SET attempts = ?, last_error = ?, next_attempt_at = ?"
                " WHERE id = ?",
                (attempts, message, self._clock() + delay, note_id),
            )
            return self._note_row(conn, note_id)

    @staticmethod
    def _note_row(conn: sqlite3.Connection, note_id: int) -> Notification:
        row = conn.execute(
            f"SELECT {rows.NOTE_COLUMNS} FROM notifications WHERE id = ?", (note_id,)
        ).fetchone()
        if row is None:
            raise UnknownOperation(f"no notification {note_id}")
        assert isinstance(row, sqlite3.Row)
        return rows.notification(row)

    def _pending_note(self, conn: sqlite3.Connection, note_id: int) -> Notification:
        note = self._note_row(conn, note_id)
        if note.state is not NotificationState.PENDING:
            raise InvalidTransition(f"notification {note_id} is already {note.state}")
        return note
