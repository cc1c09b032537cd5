"""The operation journal: every operation and every step, durable before it happens.

The agent may be killed at any instant (kill -9, host crash). Recovery can only finish or
undo what it knows was attempted, so a step is written (PLANNED) and committed with
``synchronous=FULL`` before it acts, and marked DONE/FAILED after. Every public call is one
transaction (:mod:`.sqlite`), safe to share between threads and processes. Nothing is
deleted except by :meth:`Journal.prune` (old final operations; run periodically by
:class:`hostagent.journal.purge.JournalPurger`).

:class:`Journal` is one object over three tables: operations (here), their steps
(:mod:`.steps`) and the notices owed to the volume service (:mod:`.notices`). Its errors
(:mod:`.errors`) and :func:`backoff` are re-exported here, where callers import them.

An optional :class:`OperationListener` hears every new operation and every final state after
the transaction committed (this is where operation notifications hook in, so no service code
has to remember to send them); a listener that raises is logged and never fails the journal.
"""

# S608: SQL text is built only from column-list constants and "?" placeholders; every value
# is bound as a parameter.
# ruff: noqa: S608

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from hostagent.journal import rows
from hostagent.journal.errors import (
    IdempotencyConflict,
    InvalidTransition,
    JournalError,
    UnknownOperation,
)
from hostagent.journal.model import (
    Begun,
    ErrorInfo,
    JsonDict,
    NotificationState,
    Operation,
    OperationKind,
    OperationRecord,
    OperationState,
    Pruned,
)
from hostagent.journal.notices import NoticeTable, backoff
from hostagent.journal.schema import SchemaError
from hostagent.journal.steps import StepHandle, StepLog

__all__ = [
    "IdempotencyConflict",
    "InvalidTransition",
    "Journal",
    "JournalError",
    "OperationListener",
    "SchemaError",
    "StepHandle",
    "UnknownOperation",
    "backoff",
]

LOG = logging.getLogger(__name__)


class OperationListener(Protocol):
    """Told of each operation journaled anew and of each final state, after commit."""

    def operation_begun(self, op: Operation) -> None: ...

    def operation_finished(self, op: Operation) -> None: ...


class Journal(StepLog, NoticeTable):
    """A durable, thread-safe journal in one sqlite file (WAL, ``synchronous=FULL``)."""

    def __init__(
        self,
        path: str,
        *,
        host: str | None = None,
        clock: Callable[[], float] = time.time,
        busy_timeout: float = 30.0,
        listener: OperationListener | None = None,
    ) -> None:
        self._listener = listener
        super().__init__(path, host=host, clock=clock, busy_timeout=busy_timeout)

    def _tell(self, event: str, op: Operation) -> None:
        """Call the listener outside every lock; its failure is logged, never raised."""
        if self._listener is None:
            return
        try:
            getattr(self._listener, event)(op)
        except Exception:
            LOG.exception("operation listener failed on %s of %s", event, op.id)

    # -- operations -------------------------------------------------------------------------

    def begin(
        self,
        kind: OperationKind,
        request: JsonDict,
        idempotency_key: str | None = None,
        locks: Iterable[str] = (),
    ) -> Begun:
        """Journal a new PENDING operation, or return the one already holding the key.

        A retried request (same kind and key, same request) gets the first operation back,
        whatever its state, so it is never carried out twice. The same key with a different
        request raises :class:`IdempotencyConflict`.
        """
        lock_keys = tuple(sorted(set(locks)))
        request_json = rows.dumps(request)
        with self._write() as conn:
            if idempotency_key is not None:
                row = conn.execute(
                    f"SELECT {rows.OP_COLUMNS} FROM operations WHERE kind = ? AND idem_key = ?",
                    (kind.value, idempotency_key),
                ).fetchone()
                if row is not None:
                    existing = rows.operation(row)
                    if row["request"] != request_json:
                        raise IdempotencyConflict(existing, request)
                    return Begun(existing, created=False)
            now = self._clock()
            op_id = uuid.uuid4()
            conn.execute(
                "INSERT INTO operations (id, kind, state, request, idem_key, locks, host,"
                " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    str(op_id),
                    kind.value,
                    OperationState.PENDING.value,
                    request_json,
                    idempotency_key,
                    json.dumps(lock_keys),
                    self.host,
                    now,
                    now,
                ),
            )
            conn.executemany(
                "INSERT INTO operation_locks (op_id, lock_key) VALUES (?, ?)",
                [(str(op_id), key) for key in lock_keys],
            )
            begun = Begun(rows.operation(self._op_row(conn, op_id)), created=True)
        self._tell("operation_begun", begun.operation)
        return begun

    def start(self, op_id: uuid.UUID) -> Operation:
        """PENDING -> RUNNING (a no-op if already RUNNING)."""
        with self._write() as conn:
            op = self._running_op(conn, op_id)
            if op.state is OperationState.PENDING:
                self._set_state(conn, op_id, OperationState.RUNNING)
            return rows.operation(self._op_row(conn, op_id))

    def set_progress(self, op_id: uuid.UUID, cur: int, end: int) -> None:
        with self._write() as conn:
            self._running_op(conn, op_id)
            conn.execute(
                "UPDATE operations SET progress_cur = ?, progress_end = ?, updated_at = ?"
                " WHERE id = ?",
                (cur, end, self._clock(), str(op_id)),
            )

    def finish(
        self,
        op_id: uuid.UUID,
        state: OperationState,
        *,
        result: JsonDict | None = None,
        error: BaseException | ErrorInfo | None = None,
    ) -> Operation:
        """Move to a final state; FAILED needs an ``error``, SUCCEEDED must not have one."""
        if not state.is_final:
            raise InvalidTransition(f"{state} is not a final state")
        if state is OperationState.FAILED and error is None:
            raise InvalidTransition("a FAILED operation needs an error")
        if state is OperationState.SUCCEEDED and error is not None:
            raise InvalidTransition("a SUCCEEDED operation cannot carry an error")
        info = None if error is None else rows.error_info(error)
        with self._write() as conn:
            self._running_op(conn, op_id)
            conn.execute(
                "UPDATE operations SET state = ?, updated_at = ?, result = ?, error_type = ?,"
                " error_message = ? WHERE id = ?",
                (
                    state.value,
                    self._clock(),
                    None if result is None else rows.dumps(result),
                    None if info is None else info.type,
                    None if info is None else info.message,
                    str(op_id),
                ),
            )
            final = rows.operation(self._op_row(conn, op_id))
        self._tell("operation_finished", final)
        return final

    def get(self, op_id: uuid.UUID) -> Operation:
        with self._lock:
            return rows.operation(self._op_row(self._conn, op_id))

    def find(self, kind: OperationKind, idempotency_key: str) -> Operation | None:
        found = self._read(
            f"SELECT {rows.OP_COLUMNS} FROM operations WHERE kind = ? AND idem_key = ?",
            (kind.value, idempotency_key),
        )
        return rows.operation(found[0]) if found else None

    def list_operations(
        self,
        *,
        kind: OperationKind | None = None,
        states: Iterable[OperationState] | None = None,
        lock: str | None = None,
        host: str | None = None,
        since: float | None = None,
        limit: int | None = None,
        newest_first: bool = False,
    ) -> list[Operation]:
        """Operations matching every given filter, oldest first unless ``newest_first``.

        ``newest_first`` with ``limit`` gives the newest matches, which is what a listing
        wants (``ORDER BY created_at DESC LIMIT``, walking an index backwards: schema v2);
        recovery walks them oldest first. Filters apply before the limit, so asking for
        unfinished states lists them however many finished operations are newer.
        """
        where: list[str] = []
        args: list[Any] = []
        if kind is not None:
            where.append("kind = ?")
            args.append(kind.value)
        if states is not None:
            values = [s.value for s in states]
            where.append(f"state IN ({','.join('?' * len(values))})")
            args.extend(values)
        if lock is not None:
            where.append("id IN (SELECT op_id FROM operation_locks WHERE lock_key = ?)")
            args.append(lock)
        if host is not None:
            where.append("host = ?")
            args.append(host)
        if since is not None:
            where.append("created_at >= ?")
            args.append(since)
        sql = f"SELECT {rows.OP_COLUMNS} FROM operations"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += (
            " ORDER BY created_at DESC, rowid DESC"
            if newest_first
            else " ORDER BY created_at, rowid"
        )
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        return [rows.operation(row) for row in self._read(sql, args)]

    def unfinished(self) -> list[OperationRecord]:
        """Operations not in a final state, oldest first, each with its steps in order."""
        with self._lock:
            self._conn.execute("BEGIN")  # one read snapshot: steps match their operations
            try:
                ops = self.list_operations(states=(OperationState.PENDING, OperationState.RUNNING))
                return [OperationRecord(op, tuple(self.steps(op.id))) for op in ops]
            finally:
                self._conn.execute("COMMIT")

    # -- housekeeping -----------------------------------------------------------------------

    def prune(
        self,
        older_than: float,
        *,
        batch: int = 500,
        stop: Callable[[], bool] = lambda: False,
    ) -> Pruned:
        """Delete final operations last touched before ``older_than``, with their steps.

        Kept whatever their age, because they are still owed work: unfinished operations
        (pending, running: recovery resumes them) and operations named by an undelivered
        notice. Delivered notices sent before ``older_than`` go too. Works in transactions of
        at most ``batch`` operations, so a large backlog never holds the journal for long;
        ``stop()`` true between two of them ends the pass early (the agent is stopping).
        """
        finals = [s.value for s in OperationState if s.is_final]
        owed = NotificationState.PENDING.value
        old = (
            f"state IN ({','.join('?' * len(finals))}) AND updated_at < ?"
            " AND id NOT IN (SELECT op_id FROM notifications WHERE state = ? AND op_id IS NOT NULL)"
        )
        args = (*finals, older_than, owed)
        n_ops = n_steps = 0
        by_kind: dict[str, int] = {}
        while True:
            with self._write() as conn:
                found = conn.execute(
                    f"SELECT id, kind FROM operations WHERE {old} ORDER BY updated_at LIMIT ?",
                    (*args, batch),
                ).fetchall()
                ids = [row["id"] for row in found]
                marks = ",".join("?" * len(ids))
                if ids:
                    n_steps += conn.execute(
                        f"DELETE FROM steps WHERE op_id IN ({marks})", ids
                    ).rowcount
                    conn.execute(f"DELETE FROM operation_locks WHERE op_id IN ({marks})", ids)
                    n_ops += conn.execute(
                        f"DELETE FROM operations WHERE id IN ({marks})", ids
                    ).rowcount
                for row in found:
                    by_kind[row["kind"]] = by_kind.get(row["kind"], 0) + 1
                if len(ids) < batch or stop():
                    notices = conn.execute(
                        "DELETE FROM notifications WHERE state = ? AND sent_at < ?",
                        (NotificationState.SENT.value, older_than),
                    ).rowcount
                    (kept,) = conn.execute(
                        f"SELECT COUNT(*) FROM operations WHERE state IN"
                        f" ({','.join('?' * len(finals))}) AND updated_at < ?",
                        (*finals, older_than),
                    ).fetchone()
                    return Pruned(n_ops, n_steps, notices, by_kind, int(kept))
