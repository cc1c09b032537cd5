"""Journal schema and its migrations, versioned by sqlite's ``PRAGMA user_version``.

The journal survives agent upgrades: a newer agent must read what an older one wrote
(crash recovery runs right after an upgrade restart). Each migration moves the schema
from version N-1 to N inside one transaction; an agent refuses a journal newer than it
knows rather than guessing.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from hostagent.errors import QsnapAgentError


class SchemaError(QsnapAgentError):
    """The journal file's schema cannot be used by this agent."""


def _v1(conn: sqlite3.Connection) -> None:
    conn.execute(
        """CREATE TABLE operations (
            id TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            state TEXT NOT NULL,
            request TEXT NOT NULL,
            idem_key TEXT,
            locks TEXT NOT NULL,
            host TEXT NOT NULL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            progress_cur INTEGER NOT NULL DEFAULT 0,
            progress_end INTEGER NOT NULL DEFAULT 0,
            result TEXT,
            error_type TEXT,
            error_message TEXT,
            UNIQUE (kind, idem_key)
        )"""
    )
    conn.execute("CREATE INDEX operations_state ON operations (state, created_at)")
    conn.execute(
        """CREATE TABLE operation_locks (
            op_id TEXT NOT NULL REFERENCES operations (id),
            lock_key TEXT NOT NULL,
            PRIMARY KEY (op_id, lock_key)
        )"""
    )
    conn.execute("CREATE INDEX operation_locks_key ON operation_locks (lock_key)")
    conn.execute(
        """CREATE TABLE steps (
            op_id TEXT NOT NULL REFERENCES operations (id),
            seq INTEGER NOT NULL,
            name TEXT NOT NULL,
            state TEXT NOT NULL,
            data TEXT NOT NULL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            error_type TEXT,
            error_message TEXT,
            PRIMARY KEY (op_id, seq)
        )"""
    )
    conn.execute(
        """CREATE TABLE notifications (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            snapshot_id TEXT NOT NULL,
            status TEXT NOT NULL,
            progress TEXT,
            op_id TEXT,
            state TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            last_error TEXT,
            next_attempt_at REAL NOT NULL,
            created_at REAL NOT NULL,
            sent_at REAL
        )"""
    )
    conn.execute("CREATE INDEX notifications_due ON notifications (state, next_attempt_at)")


def _v2(conn: sqlite3.Connection) -> None:
    """Listings are newest first with a limit: walk an index backwards instead of sorting
    the whole table (unfiltered, or by kind); the state filter has ``operations_state``."""
    conn.execute("CREATE INDEX operations_created ON operations (created_at)")
    conn.execute("CREATE INDEX operations_kind ON operations (kind, created_at)")


#: MIGRATIONS[n-1] brings the schema from version n-1 to n. Append, never edit.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_v1, _v2]
LATEST = len(MIGRATIONS)


def schema_version(conn: sqlite3.Connection) -> int:
    row = conn.execute("PRAGMA user_version").fetchone()
    return int(row[0])


def migrate(
    conn: sqlite3.Connection,
    migrations: list[Callable[[sqlite3.Connection], None]] | None = None,
) -> int:
    """Bring ``conn``'s database to the latest version; return that version.

    ``conn`` must be in autocommit mode (``isolation_level=None``): each migration runs
    in its own ``BEGIN IMMEDIATE`` transaction together with its version bump, so a crash
    mid-migration leaves the previous version intact. ``migrations`` is for tests.
    """
    steps = MIGRATIONS if migrations is None else migrations
    latest = len(steps)
    while True:
        conn.execute("BEGIN IMMEDIATE")
        try:
            current = schema_version(conn)
            if current > latest:
                raise SchemaError(
                    f"journal schema version {current} is newer than this agent's {latest}"
                )
            if current == latest:
                conn.execute("COMMIT")
                return current
            steps[current](conn)
            # PRAGMA takes no parameters; the value is an int we computed.
            conn.execute(f"PRAGMA user_version = {current + 1:d}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
