"""The typed model of journaled operations, their steps and pending volume-service notices.

Everything the journal returns is one of these frozen dataclasses, so code above it never
handles sqlite rows or loose dicts. Requests and results are stored as JSON-able dicts
(produced by the typed request's ``to_dict()``) because the journal must outlive any one
version of the request classes: recovery reads what an older agent wrote.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass, field
from typing import Any

#: A JSON object as stored in the journal (``json.dumps`` must accept it).
JsonDict = dict[str, Any]


class OperationKind(enum.StrEnum):
    """What an operation does; the idempotency key is unique per kind."""

    ASSISTED_CREATE = "assisted_create"
    ASSISTED_DELETE = "assisted_delete"
    INSTANCE_SNAPSHOT = "instance_snapshot"
    #: Delete of a snapshot the agent took itself (ledger and Cinder record are ours).
    OWNED_DELETE = "owned_delete"
    BACKUP = "backup"
    RESTORE = "restore"


class OperationState(enum.StrEnum):
    """Life cycle: PENDING -> RUNNING -> one of the final states (never left again)."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        """Final operations are never resumed by crash recovery and may be pruned."""
        return self in _FINAL_OPERATION_STATES


_FINAL_OPERATION_STATES = frozenset(
    {OperationState.SUCCEEDED, OperationState.FAILED, OperationState.CANCELLED}
)


class StepState(enum.StrEnum):
    """PLANNED is written before the step acts, so a crash leaves an honest trace.

    PLANNED -> DONE | FAILED | UNDONE;  DONE -> UNDONE;  FAILED -> UNDONE. A PLANNED step
    found after a restart may or may not have taken effect: recovery must look at the
    real world (the share, the domain) to decide.
    """

    PLANNED = "planned"
    DONE = "done"
    UNDONE = "undone"
    FAILED = "failed"


class StepName(enum.StrEnum):
    """Every step name the agent journals; recovery matches on them, so values never change.

    A StrEnum, so the journal stores (and returns) the same plain strings as before.
    """

    #: Check the request against the live chain (and, for a delete, pick the merge).
    VALIDATE = "validate"
    #: Legacy (journals of qsnap before issue 15): a checkpoint overlay merged down first.
    RELEASE_CHECKPOINT = "release_checkpoint"
    #: A backup's checkpoint: a snapshot recorded like an instance snapshot (its own op).
    CHECKPOINT = "checkpoint"
    #: A backup deletes the volume's older checkpoints (owned deletes) after its publish.
    DROP_CHECKPOINTS = "drop_checkpoints"
    #: Take an external disk-only snapshot (assisted create, instance, online backup).
    SNAPSHOT = "snapshot"
    #: A block commit/pull that merges a layer away (deletes; a legacy overlay's release).
    MERGE = "merge"
    #: Tell Cinder how an assisted operation went (status and progress).
    NOTIFY = "notify"
    #: Journal an instance snapshot's disks, file names and quiesce mode before it acts.
    PLAN = "plan"
    #: Create the Cinder snapshot records of an instance snapshot.
    CINDER_CREATE = "cinder_create"
    #: Pre-create the overlay files an instance snapshot pivots to.
    OVERLAYS = "overlays"
    #: Record (or drop) agent-owned snapshots in the volume's ``.info`` ledger.
    LEDGER = "ledger"
    #: Mark an instance snapshot's Cinder records available (or error).
    CINDER_FINALIZE = "cinder_finalize"
    #: Remove the overlays of a failed instance snapshot that no disk uses.
    CLEANUP = "cleanup"
    #: Delete a file merged away (owned delete, a legacy overlay's release).
    REMOVE = "remove"
    #: Delete the Cinder record of an agent-owned snapshot.
    CINDER_DELETE = "cinder_delete"
    #: Have Nova re-read the changed volumes' connection_info into its BDM (and compare).
    NOVA_REFRESH = "nova_refresh"
    #: Read a frozen layer's guest view into the repository (publishes the backup).
    READ = "read"
    #: One volume's online backup inside a backup request.
    VOLUME = "volume"
    #: Read and hash every chunk of a stored backup.
    VERIFY = "verify"
    #: Write a backup out to a new file.
    RESTORE = "restore"
    #: Apply retention to the repository and collect its unused chunks.
    PRUNE = "prune"


#: Allowed step transitions (from -> set of to).
STEP_TRANSITIONS: dict[StepState, frozenset[StepState]] = {
    StepState.PLANNED: frozenset({StepState.DONE, StepState.FAILED, StepState.UNDONE}),
    StepState.DONE: frozenset({StepState.UNDONE}),
    StepState.FAILED: frozenset({StepState.UNDONE}),
    StepState.UNDONE: frozenset(),
}


class NotificationState(enum.StrEnum):
    """A notice to the volume service is PENDING until delivered; never silently dropped."""

    PENDING = "pending"
    SENT = "sent"


@dataclass(frozen=True)
class ErrorInfo:
    """Why something failed: the exception's class name and message, enough for an operator."""

    type: str
    message: str

    @classmethod
    def from_exception(cls, exc: BaseException) -> ErrorInfo:
        return cls(type=type(exc).__name__, message=str(exc))


@dataclass(frozen=True)
class Progress:
    """``cur`` of ``end`` units done (bytes for copies, steps otherwise)."""

    cur: int = 0
    end: int = 0


@dataclass(frozen=True)
class Operation:
    """One request the agent accepted, as last journaled."""

    id: uuid.UUID
    kind: OperationKind
    state: OperationState
    request: JsonDict
    idempotency_key: str | None
    locks: tuple[str, ...]
    host: str
    created_at: float
    updated_at: float
    progress: Progress = field(default_factory=Progress)
    result: JsonDict | None = None
    error: ErrorInfo | None = None


@dataclass(frozen=True)
class Step:
    """One state-changing action of an operation, numbered from 1 in the order planned."""

    op_id: uuid.UUID
    seq: int
    name: str
    state: StepState
    data: JsonDict
    created_at: float
    updated_at: float
    error: ErrorInfo | None = None


@dataclass(frozen=True)
class OperationRecord:
    """An operation with its steps in order: what crash recovery needs to resume or undo."""

    operation: Operation
    steps: tuple[Step, ...]


@dataclass(frozen=True)
class Begun:
    """Answer of ``Journal.begin``: ``created`` is False when the key was already known."""

    operation: Operation
    created: bool


@dataclass(frozen=True)
class Notification:
    """A status update owed to the volume service (e.g. Cinder ``creating`` + ``90%``)."""

    id: int
    snapshot_id: str
    status: str
    progress: str | None
    op_id: uuid.UUID | None
    state: NotificationState
    attempts: int
    last_error: str | None
    next_attempt_at: float
    created_at: float
    sent_at: float | None


@dataclass(frozen=True)
class Pruned:
    """What one :meth:`Journal.prune <hostagent.journal.store.Journal.prune>` deleted.

    ``kept_owed``: final operations old enough to go that were kept because a notice naming
    them is still undelivered.
    """

    operations: int = 0
    steps: int = 0
    notices: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    kept_owed: int = 0
