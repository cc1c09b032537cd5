"""The agent's RPC contract: typed requests/results and typed errors (the service behind the
endpoint: :mod:`.agent_service`).

The RPC edge (``rpc_server``) turns wire dicts into these dataclasses once, so the service
behind it never sees ``create_info`` dicts. Errors raised across RPC must be importable by
the client (``allowed_remote_exmods``) and rebuildable from ``args`` alone, so they live
here, carry only a message, and are re-created as the same class on the client side; their
root :class:`AgentRpcError` is a ``hostagent.errors.QsnapAgentError``. The journal's operation
model becomes the wire's here only (:data:`KIND_OF`, :data:`STATE_OF`, :meth:`Operation.of`).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from hostagent.errors import QsnapAgentError
from hostagent.journal import model as ops
from qcow2.naming import CINDER, is_uuid

RPC_TOPIC = "qsnap-agent"
RPC_VERSION = "1.5"
#: Module the client must allow for typed errors to come back as themselves.
ERRORS_MODULE = __name__


# -- errors that cross the wire ---------------------------------------------------------
class AgentRpcError(QsnapAgentError):
    """Base of every error the agent sends back; ``code`` is stable for API mapping."""

    code = "agent_error"

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(AgentRpcError):
    code = "invalid_request"


class VolumeNotFound(AgentRpcError):
    """The volume is not attached to any domain on this host."""

    code = "volume_not_found"


class InstanceNotFound(AgentRpcError):
    code = "instance_not_found"


class OperationNotFound(AgentRpcError):
    code = "operation_not_found"


class DiskBusy(AgentRpcError):
    """Another operation or block job holds the disk; retry later."""

    code = "disk_busy"


class SnapshotNotFound(AgentRpcError):
    """The snapshot is not in the volume's ``.info`` ledger (so the agent does not own it)."""

    code = "snapshot_not_found"


class BackupNotFound(AgentRpcError):
    """No backup with that id in the repository (RPC 1.2)."""

    code = "backup_not_found"


class NotCancellable(AgentRpcError):
    """RPC 1.3: the operation already ended, or its kind runs to completion (snapshots)."""

    code = "not_cancellable"


class NovaUnavailable(AgentRpcError):
    """The guest is Nova's and qsnap's side in nova-compute cannot be reached (or the agent
    is not configured for it): a chain change Nova would not learn of is refused."""

    code = "nova_unavailable"


class AgentInternalError(AgentRpcError):
    """An unexpected failure in the agent (logged there with its traceback)."""

    code = "internal_error"


RPC_ERRORS: tuple[type[AgentRpcError], ...] = (
    InvalidRequest,
    VolumeNotFound,
    InstanceNotFound,
    OperationNotFound,
    DiskBusy,
    SnapshotNotFound,
    BackupNotFound,
    NotCancellable,
    NovaUnavailable,
    AgentInternalError,
)


# -- validation helpers -----------------------------------------------------------------
def _uuid(value: object, what: str) -> str:
    if not isinstance(value, str) or not is_uuid(value):
        raise InvalidRequest(f"{what} must be a UUID, got {value!r}")
    return value.lower()


def _file_name(value: object, what: str, *, optional: bool = False) -> str | None:
    """A plain basename following Cinder's naming; checked against the chain later."""
    if value is None and optional:
        return None
    if not isinstance(value, str) or "/" in value or "\x00" in value:
        raise InvalidRequest(f"{what} must be a plain file name, got {value!r}")
    if not CINDER.is_image_name(value):
        raise InvalidRequest(f"{what} {value!r} does not follow the volume naming convention")
    return value


def _exact_keys(data: object, what: str, required: set[str], optional: set[str]) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise InvalidRequest(f"{what} must be an object")
    keys = set(data)
    if missing := required - keys:
        raise InvalidRequest(f"{what} lacks {sorted(missing)}")
    if extra := keys - required - optional:
        raise InvalidRequest(f"{what} has unknown fields {sorted(extra)}")
    return dict(data)


# -- requests ---------------------------------------------------------------------------
@dataclass(frozen=True)
class CallContext:
    """What the agent keeps of an RPC context: for logs, journal and notifications."""

    request_id: str | None = None
    user_id: str | None = None
    project_id: str | None = None

    @classmethod
    def from_wire(cls, ctxt: object) -> CallContext:
        if not isinstance(ctxt, Mapping):
            return cls()

        def get(key: str) -> str | None:
            value = ctxt.get(key)
            return value if isinstance(value, str) else None

        return cls(get("request_id"), get("user_id") or get("user"), get("project_id"))


class Reporter(enum.StrEnum):
    """Who tells Cinder the outcome of an assisted create/delete (RPC 1.5).

    CINDER: the agent posts the status updates itself (Cinder's ``[nova]`` points at
    qsnap-api, a cloud without Nova). NOVA: the caller is Nova's compute driver
    (``api_ext.nova_driver``), which reports to Cinder and refreshes its block-device
    mapping as stock Nova does once the operation ends; the agent posts nothing.
    """

    CINDER = "cinder"
    NOVA = "nova"

    @classmethod
    def of(cls, value: object) -> Reporter:
        for member in cls:
            if value == member.value:
                return member
        raise InvalidRequest(f"reporter must be 'cinder' or 'nova', got {value!r}")


@dataclass(frozen=True)
class CreateSnapshotRequest:
    """Nova's assisted create: ``create_info = {snapshot_id, type: qcow2, new_file[, id]}``."""

    volume_id: str
    snapshot_id: str
    new_file: str
    reporter: Reporter = Reporter.CINDER

    @classmethod
    def from_wire(
        cls, volume_id: object, create_info: object, reporter: object = "cinder"
    ) -> CreateSnapshotRequest:
        info = _exact_keys(create_info, "create_info", {"snapshot_id", "type", "new_file"}, {"id"})
        if info["type"] != "qcow2":
            raise InvalidRequest(f"create_info.type must be 'qcow2', got {info['type']!r}")
        new_file = _file_name(info["new_file"], "new_file")
        assert new_file is not None
        return cls(
            _uuid(volume_id, "volume_id"),
            _uuid(info["snapshot_id"], "snapshot_id"),
            new_file,
            Reporter.of(reporter),
        )


@dataclass(frozen=True)
class DeleteSnapshotRequest:
    """Nova's assisted delete. ``merge_target_file`` None means a pull into the active file."""

    volume_id: str
    snapshot_id: str
    file_to_merge: str | None
    merge_target_file: str | None
    reporter: Reporter = Reporter.CINDER

    @classmethod
    def from_wire(
        cls,
        volume_id: object,
        snapshot_id: object,
        delete_info: object,
        reporter: object = "cinder",
    ) -> DeleteSnapshotRequest:
        info = _exact_keys(
            delete_info,
            "delete_info",
            {"type", "file_to_merge", "merge_target_file"},
            {"volume_id"},
        )
        vol = _uuid(volume_id, "volume_id")
        if info.get("volume_id") is not None and _uuid(info["volume_id"], "volume_id") != vol:
            raise InvalidRequest("delete_info.volume_id differs from volume_id")
        if info["type"] != "qcow2":
            raise InvalidRequest(f"delete_info.type must be 'qcow2', got {info['type']!r}")
        to_merge = _file_name(info["file_to_merge"], "file_to_merge", optional=True)
        target = _file_name(info["merge_target_file"], "merge_target_file", optional=True)
        if target is not None and to_merge is None:
            raise InvalidRequest("merge_target_file given without file_to_merge")
        return cls(vol, _uuid(snapshot_id, "snapshot_id"), to_merge, target, Reporter.of(reporter))


@dataclass(frozen=True)
class DeleteOwnedSnapshotRequest:
    """Delete a snapshot the agent took itself (instance snapshot), found in the ledger."""

    volume_id: str
    snapshot_id: str

    @classmethod
    def from_wire(cls, volume_id: object, snapshot_id: object) -> DeleteOwnedSnapshotRequest:
        return cls(_uuid(volume_id, "volume_id"), _uuid(snapshot_id, "snapshot_id"))


class Quiesce(enum.Enum):
    """REQUIRED fails without a frozen guest; PREFERRED falls back to a crash-consistent one."""

    REQUIRED = "required"
    PREFERRED = "preferred"
    NONE = "none"

    @classmethod
    def from_wire(cls, value: object) -> Quiesce:
        if isinstance(value, bool):
            return cls.REQUIRED if value else cls.NONE
        try:
            return cls(value)
        except ValueError:
            raise InvalidRequest(
                "quiesce must be one of required|preferred|none or a bool"
            ) from None


@dataclass(frozen=True)
class InstanceSnapshotRequest:
    """Snapshot all (``volume_ids`` None) or some volume disks of an instance at once."""

    instance_uuid: str
    volume_ids: tuple[str, ...] | None
    quiesce: Quiesce

    @classmethod
    def from_wire(
        cls, instance_uuid: object, volume_ids: object, quiesce: object
    ) -> InstanceSnapshotRequest:
        vols: tuple[str, ...] | None = None
        if volume_ids is not None:
            if not isinstance(volume_ids, list | tuple) or not volume_ids:
                raise InvalidRequest("volume_ids must be a non-empty list or null")
            vols = tuple(_uuid(v, "volume_ids[]") for v in volume_ids)
            if len(set(vols)) != len(vols):
                raise InvalidRequest("volume_ids has duplicates")
        return cls(_uuid(instance_uuid, "instance_uuid"), vols, Quiesce.from_wire(quiesce))


def _flag(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidRequest(f"{what} must be a boolean, got {value!r}")
    return value


def _count(value: object, what: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 100000:
        raise InvalidRequest(f"{what} must be an integer in 0..100000 or null")
    return value


@dataclass(frozen=True)
class CreateBackupRequest:
    """RPC 1.2: back up some volumes, or every volume of an instance (exactly one given)."""

    volume_ids: tuple[str, ...] | None
    instance_uuid: str | None
    incremental: bool

    @classmethod
    def from_wire(
        cls, volume_ids: object, instance_uuid: object, incremental: object
    ) -> CreateBackupRequest:
        if (volume_ids is None) == (instance_uuid is None):
            raise InvalidRequest("give exactly one of volume_ids and instance_uuid")
        vols: tuple[str, ...] | None = None
        if volume_ids is not None:
            if not isinstance(volume_ids, list | tuple) or not volume_ids:
                raise InvalidRequest("volume_ids must be a non-empty list")
            vols = tuple(_uuid(v, "volume_ids[]") for v in volume_ids)
            if len(set(vols)) != len(vols):
                raise InvalidRequest("volume_ids has duplicates")
        inst = _uuid(instance_uuid, "instance_uuid") if instance_uuid is not None else None
        return cls(vols, inst, _flag(incremental, "incremental"))


@dataclass(frozen=True)
class RestoreBackupRequest:
    """RPC 1.2: restore to a new file ``to_path`` or a new ``volume-<volume_id>`` file."""

    backup_id: str
    to_path: str | None
    volume_id: str | None
    fmt: str

    @classmethod
    def from_wire(
        cls, backup_id: object, to_path: object, volume_id: object, fmt: object
    ) -> RestoreBackupRequest:
        if (to_path is None) == (volume_id is None):
            raise InvalidRequest("give exactly one of to_path and volume_id")
        if to_path is not None:
            if (
                not isinstance(to_path, str)
                or not to_path.startswith("/")
                or "\x00" in to_path
                or len(to_path) > 4096
            ):
                raise InvalidRequest(f"to_path must be an absolute path, got {to_path!r}")
            if any(part in (".", "..") for part in to_path.split("/")):
                raise InvalidRequest("to_path must not contain . or .. components")
        vol = _uuid(volume_id, "volume_id") if volume_id is not None else None
        if fmt not in ("qcow2", "raw"):
            raise InvalidRequest(f"fmt must be qcow2 or raw, got {fmt!r}")
        return cls(_uuid(backup_id, "backup_id"), to_path, vol, str(fmt))


@dataclass(frozen=True)
class PruneBackupsRequest:
    """RPC 1.2: retention per volume; None for both counts means the agent's default."""

    keep_last: int | None
    keep_daily: int | None
    volume_id: str | None
    dry_run: bool

    @classmethod
    def from_wire(
        cls, keep_last: object, keep_daily: object, volume_id: object, dry_run: object
    ) -> PruneBackupsRequest:
        vol = _uuid(volume_id, "volume_id") if volume_id is not None else None
        last, daily = _count(keep_last, "keep_last"), _count(keep_daily, "keep_daily")
        if not (last or daily) and (last, daily) != (None, None):
            raise InvalidRequest("a retention rule must keep something")
        return cls(last, daily, vol, _flag(dry_run, "dry_run"))


class OperationState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    #: RPC 1.3: a backup/verify/prune/restore stopped by ``cancel_operation``.
    CANCELLED = "cancelled"

    @classmethod
    def of(cls, state: ops.OperationState) -> OperationState:
        """The wire state of a journaled one (the journal's ``pending`` is ``queued``)."""
        return STATE_OF[state]

    def journal_states(self) -> list[ops.OperationState]:
        """The journal states reported as this one: what a listing filters on."""
        return [s for s, wire in STATE_OF.items() if wire is self]


class OperationKind(enum.Enum):
    CREATE_ASSISTED = "create_assisted_snapshot"
    DELETE_ASSISTED = "delete_assisted_snapshot"
    INSTANCE_SNAPSHOT = "snapshot_instance"
    DELETE_OWNED = "delete_snapshot"
    #: RPC 1.2: create and verify of backups; 1.3: prune (the request's ``action``).
    BACKUP = "backup"
    RESTORE = "restore"

    @classmethod
    def of(cls, kind: ops.OperationKind) -> OperationKind:
        """The wire kind of a journaled one (the wire names the RPC verb)."""
        return KIND_OF[kind]

    def journal_kind(self) -> ops.OperationKind:
        """The journal kind reported as this one: what a listing filters on."""
        return {wire: k for k, wire in KIND_OF.items()}[self]


# The journal's operation model on the wire, in one place: the journal's values are stored
# in its file and the wire's are the API's, so neither may change; only this mapping joins them.
#: Journal kind -> wire kind (one to one).
KIND_OF: Mapping[ops.OperationKind, OperationKind] = {
    ops.OperationKind.ASSISTED_CREATE: OperationKind.CREATE_ASSISTED,
    ops.OperationKind.ASSISTED_DELETE: OperationKind.DELETE_ASSISTED,
    ops.OperationKind.INSTANCE_SNAPSHOT: OperationKind.INSTANCE_SNAPSHOT,
    ops.OperationKind.OWNED_DELETE: OperationKind.DELETE_OWNED,
    ops.OperationKind.BACKUP: OperationKind.BACKUP,
    ops.OperationKind.RESTORE: OperationKind.RESTORE,
}
#: Journal state -> wire state.
STATE_OF: Mapping[ops.OperationState, OperationState] = {
    ops.OperationState.PENDING: OperationState.QUEUED,
    ops.OperationState.RUNNING: OperationState.RUNNING,
    ops.OperationState.SUCCEEDED: OperationState.SUCCEEDED,
    ops.OperationState.FAILED: OperationState.FAILED,
    ops.OperationState.CANCELLED: OperationState.CANCELLED,
}


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


@dataclass(frozen=True)
class OperationFilters:
    """``list_operations``' filters. RPC 1.4: the agent answers the NEWEST ``limit`` matches,
    newest first (a 1.3 agent answered the oldest, oldest first); filters apply before the
    limit, so ``state=running`` lists every running operation up to ``limit``."""

    state: OperationState | None = None
    kind: OperationKind | None = None
    volume_id: str | None = None
    limit: int = 100

    @classmethod
    def from_wire(cls, filters: object) -> OperationFilters:
        if filters is None:
            return cls()
        data = _exact_keys(filters, "filters", set(), {"state", "kind", "volume_id", "limit"})
        try:
            state = OperationState(data["state"]) if data.get("state") is not None else None
            kind = OperationKind(data["kind"]) if data.get("kind") is not None else None
        except ValueError as exc:
            raise InvalidRequest(f"bad filter: {exc}") from None
        vol = _uuid(data["volume_id"], "volume_id") if data.get("volume_id") is not None else None
        limit = data.get("limit", 100)
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 1000:
            raise InvalidRequest("limit must be an integer in 1..1000")
        return cls(state, kind, vol, limit)

    def to_wire(self) -> dict[str, Any]:
        return {
            "state": self.state.value if self.state else None,
            "kind": self.kind.value if self.kind else None,
            "volume_id": self.volume_id,
            "limit": self.limit,
        }


# -- results ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Operation:
    """A long-running request as the agent reports it; ``error`` is ``{code, message}``."""

    id: str
    kind: OperationKind
    state: OperationState
    host: str
    volume_ids: tuple[str, ...] = ()
    snapshot_id: str | None = None
    instance_uuid: str | None = None
    created_at: str | None = None
    updated_at: str | None = None
    error: dict[str, str] | None = None
    result: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, op: ops.Operation, steps: Iterable[ops.Step]) -> Operation:
        """The journaled ``op`` as the agent reports it; ``result`` gains its steps and progress.

        Volumes come from the operation's ``volume:`` locks, the error is the journaled
        exception's class name (``code``) and message.
        """
        result: dict[str, Any] = dict(op.result or {})
        result["steps"] = [{"name": s.name, "state": s.state.value, "data": s.data} for s in steps]
        result["progress"] = {"cur": op.progress.cur, "end": op.progress.end}
        vols = tuple(k.split(":", 1)[1] for k in op.locks if k.startswith("volume:"))
        return cls(
            id=str(op.id),
            kind=OperationKind.of(op.kind),
            state=OperationState.of(op.state),
            host=op.host,
            volume_ids=vols,
            snapshot_id=op.request.get("snapshot_id"),
            instance_uuid=op.request.get("instance_uuid"),
            created_at=_iso(op.created_at),
            updated_at=_iso(op.updated_at),
            error=None
            if op.error is None
            else {"code": op.error.type, "message": op.error.message},
            result=result,
        )

    def to_wire(self) -> dict[str, Any]:
        data = asdict(self)
        data["kind"] = self.kind.value
        data["state"] = self.state.value
        data["volume_ids"] = list(self.volume_ids)
        return data

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> Operation:
        values = dict(data)
        values["kind"] = OperationKind(values["kind"])
        values["state"] = OperationState(values["state"])
        values["volume_ids"] = tuple(values.get("volume_ids") or ())
        return cls(**values)


@dataclass(frozen=True)
class VolumeAttachment:
    """One volume disk of a running domain on this host, as the inventory publishes it."""

    volume_id: str
    instance_uuid: str
    domain_name: str
    target: str
    source: str


@dataclass(frozen=True)
class Inventory:
    host: str
    volumes: tuple[VolumeAttachment, ...]
    generation: int = 0

    def to_wire(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "generation": self.generation,
            "volumes": [asdict(v) for v in self.volumes],
        }

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> Inventory:
        vols = tuple(VolumeAttachment(**v) for v in data.get("volumes", ()))
        return cls(str(data["host"]), vols, int(data.get("generation", 0)))
