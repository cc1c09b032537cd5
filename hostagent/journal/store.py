"""The operation journal: every operation and every step, durable before it happens.

The agent may be killed at any instant (kill -9, host crash). Recovery can only finish or
undo what it knows was attempted, so a step is written (PLANNED) and committed with
``synchronous=FULL`` before it acts, and marked DONE/FAILED after. sqlite in WAL mode keeps
readers (status queries) from blocking the workers' writes. Every public call is one
transaction; one connection guarded by a lock makes the object safe to share between
threads, and ``BEGIN IMMEDIATE`` makes it safe to share the file between processes.
Nothing is deleted except by :meth:`Journal.prune`.

An optional :class:`OperationListener` hears every new operation and every final state after
the transaction committed (this is where operation notifications hook in, so no service code
has to remember to send them); a listener that raises is logged and never fails the journal.
"""

# S608: SQL text is built only from this module's column-list constants and "?" placeholders;
# every value is bound as a parameter.
# ruff: noqa: S608

from __future__ import annotations

import contextlib
import json
import logging
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from hostagent.journal.model import (
    STEP_TRANSITIONS,
    Begun,
    ErrorInfo,
    JsonDict,
    Notification,
    NotificationState,
    Operation,
    OperationKind,
    OperationRecord,
    OperationState,
    Progress,
    Step,
    StepState,
)
from hostagent.journal.schema import SchemaError, migrate, schema_version

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


class JournalError(Exception):
    """Base of the journal's errors."""


class UnknownOperation(JournalError):
    """No operation (or step, or notification) with that id is journaled."""


class InvalidTransition(JournalError):
    """The requested state change is not allowed from the current state."""


class IdempotencyConflict(JournalError):
    """The idempotency key is already used by an operation with a different request."""

    def __init__(self, existing: Operation, request: JsonDict) -> None:
        self.existing = existing
        self.request = request
        super().__init__(
            f"{existing.kind} key {existing.idempotency_key!r} already names operation "
            f"{existing.id} with a different request"
        )


def backoff(attempts: int, *, base: float = 2.0, cap: float = 300.0) -> float:
    """Seconds to wait before retry number ``attempts`` (1, 2, ...): doubling, capped."""
    return float(min(cap, base * 2 ** max(0, attempts - 1)))


def _dumps(value: JsonDict) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _error(exc_or_info: BaseException | ErrorInfo) -> ErrorInfo:
    if isinstance(exc_or_info, ErrorInfo):
        return exc_or_info
    return ErrorInfo.from_exception(exc_or_info)


_OP_COLUMNS = (
    "id, kind, state, request, idem_key, locks, host, created_at, updated_at, "
    "progress_cur, progress_end, result, error_type, error_message"
)
_STEP_COLUMNS = "op_id, seq, name, state, data, created_at, updated_at, error_type, error_message"
_NOTE_COLUMNS = (
    "id, snapshot_id, status, progress, op_id, state, attempts, last_error, "
    "next_attempt_at, created_at, sent_at"
)


def _operation(row: sqlite3.Row) -> Operation:
    return Operation(
        id=uuid.UUID(row["id"]),
        kind=OperationKind(row["kind"]),
        state=OperationState(row["state"]),
        request=json.loads(row["request"]),
        idempotency_key=row["idem_key"],
        locks=tuple(json.loads(row["locks"])),
        host=row["host"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        progress=Progress(row["progress_cur"], row["progress_end"]),
        result=None if row["result"] is None else json.loads(row["result"]),
        error=None
        if row["error_type"] is None
        else ErrorInfo(row["error_type"], row["error_message"]),
    )


def _step(row: sqlite3.Row) -> Step:
    return Step(
        op_id=uuid.UUID(row["op_id"]),
        seq=row["seq"],
        name=row["name"],
        state=StepState(row["state"]),
        data=json.loads(row["data"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        error=None
        if row["error_type"] is None
        else ErrorInfo(row["error_type"], row["error_message"]),
    )


def _notification(row: sqlite3.Row) -> Notification:
    return Notification(
        id=row["id"],
        snapshot_id=row["snapshot_id"],
        status=row["status"],
        progress=row["progress"],
        op_id=None if row["op_id"] is None else uuid.UUID(row["op_id"]),
        state=NotificationState(row["state"]),
        attempts=row["attempts"],
        last_error=row["last_error"],
        next_attempt_at=row["next_attempt_at"],
        created_at=row["created_at"],
        sent_at=row["sent_at"],
    )


@dataclass
class StepHandle:
    """The step being run inside :meth:`Journal.step`; add results to ``data``."""

    op_id: uuid.UUID
    seq: int
    name: str
    data: JsonDict = field(default_factory=dict)


class Journal:
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
        self.path = path
        self._listener = listener
        self.host = host or socket.gethostname()
        self._clock = clock
        self._lock = threading.RLock()
        conn = sqlite3.connect(
            path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
        )
        conn.row_factory = sqlite3.Row
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise JournalError(f"{path}: sqlite refused WAL mode (got {mode!r})")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            migrate(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    # -- plumbing ---------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _tell(self, event: str, op: Operation) -> None:
        """Call the listener outside every lock; its failure is logged, never raised."""
        if self._listener is None:
            return
        try:
            getattr(self._listener, event)(op)
        except Exception:
            LOG.exception("operation listener failed on %s of %s", event, op.id)

    @property
    def schema_version(self) -> int:
        with self._lock:
            return schema_version(self._conn)

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One durable write transaction; IMMEDIATE so check-then-write is race free."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _read(self, sql: str, args: Iterable[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, tuple(args)).fetchall()

    @staticmethod
    def _op_row(conn: sqlite3.Connection, op_id: uuid.UUID) -> sqlite3.Row:
        row = conn.execute(
            f"SELECT {_OP_COLUMNS} FROM operations WHERE id = ?", (str(op_id),)
        ).fetchone()
        if row is None:
            raise UnknownOperation(f"no operation {op_id}")
        assert isinstance(row, sqlite3.Row)
        return row

    def _running_op(self, conn: sqlite3.Connection, op_id: uuid.UUID) -> Operation:
        op = _operation(self._op_row(conn, op_id))
        if op.state.is_final:
            raise InvalidTransition(f"operation {op_id} is already {op.state}")
        return op

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
        request_json = _dumps(request)
        with self._write() as conn:
            if idempotency_key is not None:
                row = conn.execute(
                    f"SELECT {_OP_COLUMNS} FROM operations WHERE kind = ? AND idem_key = ?",
                    (kind.value, idempotency_key),
                ).fetchone()
                if row is not None:
                    existing = _operation(row)
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
            begun = Begun(_operation(self._op_row(conn, op_id)), created=True)
        self._tell("operation_begun", begun.operation)
        return begun

    def start(self, op_id: uuid.UUID) -> Operation:
        """PENDING -> RUNNING (a no-op if already RUNNING)."""
        with self._write() as conn:
            op = self._running_op(conn, op_id)
            if op.state is OperationState.PENDING:
                self._set_state(conn, op_id, OperationState.RUNNING)
            return _operation(self._op_row(conn, op_id))

    def _set_state(self, conn: sqlite3.Connection, op_id: uuid.UUID, st: OperationState) -> None:
        conn.execute(
            "UPDATE operations SET state = ?, updated_at = ? WHERE id = ?",
            (st.value, self._clock(), str(op_id)),
        )

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
        info = None if error is None else _error(error)
        with self._write() as conn:
            self._running_op(conn, op_id)
            conn.execute(
                "UPDATE operations SET state = ?, updated_at = ?, result = ?, error_type = ?,"
                " error_message = ? WHERE id = ?",
                (
                    state.value,
                    self._clock(),
                    None if result is None else _dumps(result),
                    None if info is None else info.type,
                    None if info is None else info.message,
                    str(op_id),
                ),
            )
            final = _operation(self._op_row(conn, op_id))
        self._tell("operation_finished", final)
        return final

    def get(self, op_id: uuid.UUID) -> Operation:
        with self._lock:
            return _operation(self._op_row(self._conn, op_id))

    def find(self, kind: OperationKind, idempotency_key: str) -> Operation | None:
        rows = self._read(
            f"SELECT {_OP_COLUMNS} FROM operations WHERE kind = ? AND idem_key = ?",
            (kind.value, idempotency_key),
        )
        return _operation(rows[0]) if rows else None

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
        wants; recovery walks them oldest first.
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
        sql = f"SELECT {_OP_COLUMNS} FROM operations"
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
        return [_operation(row) for row in self._read(sql, args)]

    def unfinished(self) -> list[OperationRecord]:
        """Operations not in a final state, oldest first, each with its steps in order."""
        with self._lock:
            self._conn.execute("BEGIN")  # one read snapshot: steps match their operations
            try:
                ops = self.list_operations(states=(OperationState.PENDING, OperationState.RUNNING))
                return [OperationRecord(op, tuple(self.steps(op.id))) for op in ops]
            finally:
                self._conn.execute("COMMIT")

    # -- steps ------------------------------------------------------------------------------

    def plan_step(self, op_id: uuid.UUID, name: str, data: JsonDict | None = None) -> Step:
        """Journal a step as PLANNED; call this BEFORE the step acts. Starts a PENDING op."""
        with self._write() as conn:
            op = self._running_op(conn, op_id)
            if op.state is OperationState.PENDING:
                self._set_state(conn, op_id, OperationState.RUNNING)
            (last,) = conn.execute(
                "SELECT COALESCE(MAX(seq), 0) FROM steps WHERE op_id = ?", (str(op_id),)
            ).fetchone()
            now = self._clock()
            seq = int(last) + 1
            conn.execute(
                "INSERT INTO steps (op_id, seq, name, state, data, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (str(op_id), seq, name, StepState.PLANNED.value, _dumps(data or {}), now, now),
            )
            return self._step_row(conn, op_id, seq)

    def step_done(self, op_id: uuid.UUID, seq: int, data: JsonDict | None = None) -> Step:
        """PLANNED -> DONE; ``data`` is merged into what was planned (e.g. a job's result)."""
        return self._move_step(op_id, seq, StepState.DONE, data, None)

    def step_failed(
        self,
        op_id: uuid.UUID,
        seq: int,
        error: BaseException | ErrorInfo,
        data: JsonDict | None = None,
    ) -> Step:
        return self._move_step(op_id, seq, StepState.FAILED, data, _error(error))

    def step_undone(self, op_id: uuid.UUID, seq: int, data: JsonDict | None = None) -> Step:
        """The step's effect was reverted (or found never to have happened)."""
        return self._move_step(op_id, seq, StepState.UNDONE, data, None)

    def steps(self, op_id: uuid.UUID) -> list[Step]:
        rows = self._read(
            f"SELECT {_STEP_COLUMNS} FROM steps WHERE op_id = ? ORDER BY seq", (str(op_id),)
        )
        return [_step(row) for row in rows]

    @staticmethod
    def _step_row(conn: sqlite3.Connection, op_id: uuid.UUID, seq: int) -> Step:
        row = conn.execute(
            f"SELECT {_STEP_COLUMNS} FROM steps WHERE op_id = ? AND seq = ?", (str(op_id), seq)
        ).fetchone()
        if row is None:
            raise UnknownOperation(f"operation {op_id} has no step {seq}")
        assert isinstance(row, sqlite3.Row)
        return _step(row)

    def _move_step(
        self,
        op_id: uuid.UUID,
        seq: int,
        to: StepState,
        data: JsonDict | None,
        error: ErrorInfo | None,
    ) -> Step:
        with self._write() as conn:
            step = self._step_row(conn, op_id, seq)
            if to not in STEP_TRANSITIONS[step.state]:
                raise InvalidTransition(
                    f"step {seq} of {op_id} ({step.name}): {step.state} -> {to}"
                )
            merged = {**step.data, **(data or {})}
            conn.execute(
                "UPDATE steps SET state = ?, data = ?, updated_at = ?,"
                " error_type = COALESCE(?, error_type), error_message = COALESCE(?, error_message)"
                " WHERE op_id = ? AND seq = ?",
                (
                    to.value,
                    _dumps(merged),
                    self._clock(),
                    None if error is None else error.type,
                    None if error is None else error.message,
                    str(op_id),
                    seq,
                ),
            )
            return self._step_row(conn, op_id, seq)

    @contextlib.contextmanager
    def step(
        self, op_id: uuid.UUID, name: str, data: JsonDict | None = None
    ) -> Iterator[StepHandle]:
        """Plan ``name``, run the body, then mark it DONE (with ``handle.data``) or FAILED.

        Only ``Exception`` marks the step FAILED; a ``BaseException`` (interpreter exit,
        KeyboardInterrupt) leaves it PLANNED like a kill would, for recovery to judge.
        """
        planned = self.plan_step(op_id, name, data)
        handle = StepHandle(op_id, planned.seq, name, dict(planned.data))
        try:
            yield handle
        except Exception as exc:
            self.step_failed(op_id, planned.seq, exc, handle.data)
            raise
        self.step_done(op_id, planned.seq, handle.data)

    # -- notifications to the volume service ------------------------------------------------

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
                f"SELECT {_NOTE_COLUMNS} FROM notifications WHERE snapshot_id = ? AND status = ?"
                " AND progress IS ? AND state = ? ORDER BY id LIMIT 1",
                (snapshot_id, status, progress, NotificationState.PENDING.value),
            ).fetchone()
            if row is not None:
                return _notification(row)
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
        sql = f"SELECT {_NOTE_COLUMNS} FROM notifications WHERE state = ?"
        args: list[Any] = [NotificationState.PENDING.value]
        if due_only:
            sql += " AND next_attempt_at <= ?"
            args.append(self._clock())
        sql += " ORDER BY id"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        return [_notification(row) for row in self._read(sql, args)]

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
            f"SELECT {_NOTE_COLUMNS} FROM notifications WHERE id = ?", (note_id,)
        ).fetchone()
        if row is None:
            raise UnknownOperation(f"no notification {note_id}")
        assert isinstance(row, sqlite3.Row)
        return _notification(row)

    def _pending_note(self, conn: sqlite3.Connection, note_id: int) -> Notification:
        note = self._note_row(conn, note_id)
        if note.state is not NotificationState.PENDING:
            raise InvalidTransition(f"notification {note_id} is already {note.state}")
        return note

    # -- housekeeping -----------------------------------------------------------------------

    def prune(self, older_than: float) -> int:
        """Delete final operations and delivered notices last touched before ``older_than``.

        Returns how many operations were deleted. Unfinished operations and undelivered
        notices are kept whatever their age: they are still owed work.
        """
        finals = [s.value for s in OperationState if s.is_final]
        marks = ",".join("?" * len(finals))
        old_ops = f"SELECT id FROM operations WHERE state IN ({marks}) AND updated_at < ?"
        with self._write() as conn:
            args = (*finals, older_than)
            conn.execute(f"DELETE FROM steps WHERE op_id IN ({old_ops})", args)
            conn.execute(f"DELETE FROM operation_locks WHERE op_id IN ({old_ops})", args)
            deleted = conn.execute(f"DELETE FROM operations WHERE id IN ({old_ops})", args)
            conn.execute(
                "DELETE FROM notifications WHERE state = ? AND sent_at < ?",
                (NotificationState.SENT.value, older_than),
            )
            return deleted.rowcount
