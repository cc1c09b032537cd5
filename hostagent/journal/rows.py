"""sqlite rows to the journal's model, and the JSON text the journal stores.

Every table's code reads through these, so a column list and its row reader cannot drift
apart; nothing here touches a connection.
"""

from __future__ import annotations

import json
import sqlite3
import uuid

from hostagent.journal.model import (
    ErrorInfo,
    JsonDict,
    Notification,
    NotificationState,
    Operation,
    OperationKind,
    OperationState,
    Progress,
    Step,
    StepState,
)

OP_COLUMNS = (
    "id, kind, state, request, idem_key, locks, host, created_at, updated_at, "
    "progress_cur, progress_end, result, error_type, error_message"
)
STEP_COLUMNS = "op_id, seq, name, state, data, created_at, updated_at, error_type, error_message"
NOTE_COLUMNS = (
    "id, snapshot_id, status, progress, op_id, state, attempts, last_error, "
    "next_attempt_at, created_at, sent_at"
)


def dumps(value: JsonDict) -> str:
    """Canonical JSON: idempotency compares stored requests as text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def error_info(exc_or_info: BaseException | ErrorInfo) -> ErrorInfo:
    if isinstance(exc_or_info, ErrorInfo):
        return exc_or_info
    return ErrorInfo.from_exception(exc_or_info)


def operation(row: sqlite3.Row) -> Operation:
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


def step(row: sqlite3.Row) -> Step:
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


def notification(row: sqlite3.Row) -> Notification:
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
