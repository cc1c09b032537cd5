"""The journal's sqlite file: one connection, its pragmas, migrations and transactions.

The agent may be killed at any instant, so every write is one ``BEGIN IMMEDIATE``
transaction committed with ``synchronous=FULL``; WAL mode keeps readers (status queries)
from blocking the workers' writes. One connection guarded by a lock makes a store safe to
share between threads; ``BEGIN IMMEDIATE`` makes the file safe to share between processes.
The tables' code (:mod:`.store`, :mod:`.steps`, :mod:`.notices`) builds on
:class:`SqliteStore`; the operation-row helpers live here because steps need them too.
"""

# S608: SQL text is built only from column-list constants and "?" placeholders; every value
# is bound as a parameter.
# ruff: noqa: S608

from __future__ import annotations

import contextlib
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Self

from hostagent.journal import rows
from hostagent.journal.errors import InvalidTransition, JournalError, UnknownOperation
from hostagent.journal.model import Operation, OperationState
from hostagent.journal.schema import migrate, schema_version

__all__ = ["SqliteStore"]


class SqliteStore:
    """A durable, thread-safe sqlite file (WAL, ``synchronous=FULL``), migrated on open."""

    def __init__(
        self,
        path: str,
        *,
        host: str | None = None,
        clock: Callable[[], float] = time.time,
        busy_timeout: float = 30.0,
    ) -> None:
        self.path = path
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

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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

    # -- operation rows (steps check and start their operation too) -------------------------

    @staticmethod
    def _op_row(conn: sqlite3.Connection, op_id: uuid.UUID) -> sqlite3.Row:
        row = conn.execute(
            f"SELECT {rows.OP_COLUMNS} FROM operations WHERE id = ?", (str(op_id),)
        ).fetchone()
        if row is None:
            raise UnknownOperation(f"no operation {op_id}")
        assert isinstance(row, sqlite3.Row)
        return row

    def _running_op(self, conn: sqlite3.Connection, op_id: uuid.UUID) -> Operation:
        op = rows.operation(self._op_row(conn, op_id))
        if op.state.is_final:
            raise InvalidTransition(f"operation {op_id} is already {op.state}")
        return op

    def _set_state(self, conn: sqlite3.Connection, op_id: uuid.UUID, st: OperationState) -> None:
        conn.execute(
            "UPDATE operations SET state = ?, updated_at = ? WHERE id = ?",
            (st.value, self._clock(), str(op_id)),
        )
