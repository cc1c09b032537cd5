"""The steps table: each state-changing action of an operation, journaled before it acts.

Recovery can only finish or undo what it knows was attempted, so a step is written
PLANNED (and committed) before it acts and marked DONE/FAILED/UNDONE after; see
:data:`~hostagent.journal.model.STEP_TRANSITIONS`.
"""

# S608: SQL text is built only from column-list constants and "?" placeholders; every value
# is bound as a parameter.
# ruff: noqa: S608

from __future__ import annotations

import contextlib
import sqlite3
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from hostagent.journal import rows
from hostagent.journal.errors import InvalidTransition, UnknownOperation
from hostagent.journal.model import (
    STEP_TRANSITIONS,
    ErrorInfo,
    JsonDict,
    OperationState,
    Step,
    StepState,
)
from hostagent.journal.sqlite import SqliteStore

__all__ = ["StepHandle", "StepLog"]


@dataclass
class StepHandle:
    """The step being run inside :meth:`Journal.step`; add results to ``data``."""

    op_id: uuid.UUID
    seq: int
    name: str
    data: JsonDict = field(default_factory=dict)


class StepLog(SqliteStore):
    """The step methods of :class:`~hostagent.journal.store.Journal`."""

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
                (str(op_id), seq, name, StepState.PLANNED.value, rows.dumps(data or {}), now, now),
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
        return self._move_step(op_id, seq, StepState.FAILED, data, rows.error_info(error))

    def step_undone(self, op_id: uuid.UUID, seq: int, data: JsonDict | None = None) -> Step:
        """The step's effect was reverted (or found never to have happened)."""
        return self._move_step(op_id, seq, StepState.UNDONE, data, None)

    def steps(self, op_id: uuid.UUID) -> list[Step]:
        found = self._read(
            f"SELECT {rows.STEP_COLUMNS} FROM steps WHERE op_id = ? ORDER BY seq", (str(op_id),)
        )
        return [rows.step(row) for row in found]

    def steps_of(self, op_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, list[Step]]:
        """The steps of many operations in one read per 500 ids (a listing), each in order.

        An operation without steps (or unknown) has no entry.
        """
        ids = [str(i) for i in op_ids]
        out: dict[uuid.UUID, list[Step]] = {}
        for at in range(0, len(ids), 500):
            chunk = ids[at : at + 500]
            found = self._read(
                f"SELECT {rows.STEP_COLUMNS} FROM steps WHERE op_id IN"
                f" ({','.join('?' * len(chunk))}) ORDER BY op_id, seq",
                chunk,
            )
            for row in found:
                step = rows.step(row)
                out.setdefault(step.op_id, []).append(step)
        return out

    @staticmethod
    def _step_row(conn: sqlite3.Connection, op_id: uuid.UUID, seq: int) -> Step:
        row = conn.execute(
            f"SELECT {rows.STEP_COLUMNS} FROM steps WHERE op_id = ? AND seq = ?",
            (str(op_id), seq),
        ).fetchone()
        if row is None:
            raise UnknownOperation(f"operation {op_id} has no step {seq}")
        assert isinstance(row, sqlite3.Row)
        return rows.step(row)

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
                    rows.dumps(merged),
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
