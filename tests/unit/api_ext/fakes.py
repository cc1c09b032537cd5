"""A scripted fake agent for the /v1 API and CLI tests (several hosts, progressing operations)."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from api_ext import auth
from api_ext.app import ApiApp
from api_ext.config import make_conf
from api_ext.router import Router
from hostagent.rpc import contract as api

VOL = "11111111-1111-4111-8111-111111111111"
VOL2 = "22222222-2222-4222-8222-222222222222"
SNAP = "55555555-5555-4555-8555-555555555555"
INST = "44444444-4444-4444-8444-444444444444"
ADMIN = {"X-Auth-Token": "admin:adminproject", "X-Roles": "admin"}
SERVICE = {"X-Auth-Token": "cinder:svcproject", "X-Roles": "service"}


def op(
    op_id: str,
    host: str,
    state: str = "queued",
    *,
    kind: api.OperationKind = api.OperationKind.INSTANCE_SNAPSHOT,
    created: str = "2025-01-01T00:00:00+00:00",
    steps: Sequence[tuple[str, str]] = (),
    progress: tuple[int, int] = (0, 0),
    error: dict[str, str] | None = None,
    volumes: tuple[str, ...] = (VOL,),
    **result: Any,
) -> api.Operation:
    return api.Operation(
        id=op_id,
        kind=kind,
        state=api.OperationState(state),
        host=host,
        volume_ids=volumes,
        created_at=created,
        error=error,
        result={
            "steps": [{"name": n, "state": s, "data": {}} for n, s in steps],
            "progress": {"cur": progress[0], "end": progress[1]},
            **result,
        },
    )


class FakeAgent:
    """One host's agent. ``script[op_id]`` are the successive states ``get_operation`` shows."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.calls: list[tuple[str, Any]] = []
        self.ops: list[api.Operation] = []
        self.script: dict[str, list[api.Operation]] = {}
        self.raise_: BaseException | None = None
        self.next_op: api.Operation | None = None
        self.backups: list[dict[str, Any]] = []
        #: Per-call bounds the API asked for (``AgentAPI.with_timeout``), in order.
        self.bounds: list[float] = []
        self._lock = threading.Lock()

    def with_timeout(self, timeout: float) -> FakeAgent:
        """The same agent; records that the caller bounded its next call to ``timeout``."""
        with self._lock:
            self.bounds.append(timeout)
        return self

    def _record(self, name: str, args: Any) -> None:
        with self._lock:
            self.calls.append((name, args))
        if self.raise_ is not None:
            raise self.raise_

    def _accepted(self, kind: api.OperationKind) -> api.Operation:
        new = self.next_op or op("op-new", self.host, kind=kind)
        self.ops.append(new)
        return new

    def create_assisted_snapshot(
        self, ctxt: Mapping[str, Any], volume_id: str, create_info: Mapping[str, Any]
    ) -> api.Operation:
        self._record("create", (volume_id, dict(create_info)))
        return self._accepted(api.OperationKind.CREATE_ASSISTED)

    def delete_assisted_snapshot(
        self,
        ctxt: Mapping[str, Any],
        volume_id: str,
        snapshot_id: str,
        delete_info: Mapping[str, Any],
    ) -> api.Operation:
        self._record("delete_assisted", (volume_id, snapshot_id))
        return self._accepted(api.OperationKind.DELETE_ASSISTED)

    def snapshot_instance(
        self,
        ctxt: Mapping[str, Any],
        instance_uuid: str,
        volume_ids: Sequence[str] | None,
        quiesce: api.Quiesce | bool = api.Quiesce.PREFERRED,
    ) -> api.Operation:
        self._record("instance", (instance_uuid, volume_ids, quiesce))
        return self._accepted(api.OperationKind.INSTANCE_SNAPSHOT)

    def delete_snapshot(
        self, ctxt: Mapping[str, Any], volume_id: str, snapshot_id: str
    ) -> api.Operation:
        self._record("delete_snapshot", (volume_id, snapshot_id))
        return self._accepted(api.OperationKind.DELETE_ASSISTED)

    def get_operation(self, ctxt: Mapping[str, Any], op_id: str) -> api.Operation:
        self._record("get", op_id)
        with self._lock:
            script = self.script.get(op_id)
            if script:
                return script.pop(0) if len(script) > 1 else script[0]
        for known in self.ops:
            if known.id == op_id:
                return known
        raise api.OperationNotFound(f"no operation {op_id}")

    def list_operations(
        self, ctxt: Mapping[str, Any], filters: api.OperationFilters | None = None
    ) -> list[api.Operation]:
        self._record("list", filters)
        f = filters or api.OperationFilters()
        newest_first = sorted(self.ops, key=lambda o: (o.created_at or "", o.id), reverse=True)
        return [  # RPC 1.4: the newest ``limit`` matches
            o
            for o in newest_first
            if (f.state is None or o.state is f.state)
            and (f.kind is None or o.kind is f.kind)
            and (f.volume_id is None or f.volume_id in o.volume_ids)
        ][: f.limit]

    # -- backups (RPC 1.2) ----------------------------------------------------------------
    def create_backup(
        self,
        ctxt: Mapping[str, Any],
        *,
        volume_ids: list[str] | None,
        instance_uuid: str | None,
        incremental: bool,
    ) -> api.Operation:
        self._record("create_backup", (volume_ids, instance_uuid, incremental))
        return self._accepted(kind_of("BACKUP"))

    def list_backups(self, ctxt: Mapping[str, Any], volume_id: str | None) -> list[dict[str, Any]]:
        self._record("list_backups", volume_id)
        return [b for b in self.backups if volume_id is None or b["volume_id"] == volume_id]

    def get_backup(self, ctxt: Mapping[str, Any], backup_id: str) -> dict[str, Any]:
        self._record("get_backup", backup_id)
        return {**self._find_backup(backup_id), "source_chain": ["volume-x"], "chunks": 3}

    def verify_backup(self, ctxt: Mapping[str, Any], backup_id: str) -> api.Operation:
        self._record("verify_backup", backup_id)
        self._find_backup(backup_id)
        return self._accepted(kind_of("BACKUP"))

    def delete_backup(self, ctxt: Mapping[str, Any], backup_id: str) -> None:
        self._record("delete_backup", backup_id)
        self.backups.remove(self._find_backup(backup_id))

    def restore_backup(
        self,
        ctxt: Mapping[str, Any],
        backup_id: str,
        *,
        to_path: str | None,
        volume_id: str | None,
        fmt: str,
    ) -> api.Operation:
        self._record("restore_backup", (backup_id, to_path, volume_id, fmt))
        self._find_backup(backup_id)
        return self._accepted(kind_of("RESTORE"))

    def prune_backups(
        self,
        ctxt: Mapping[str, Any],
        *,
        keep_last: int | None,
        keep_daily: int | None,
        volume_id: str | None,
        dry_run: bool,
    ) -> dict[str, Any]:
        self._record("prune_backups", (keep_last, keep_daily, volume_id, dry_run))
        newest = sorted(self.backups, key=lambda b: b["created_at"], reverse=True)
        kept, gone = newest[: keep_last or 1], newest[keep_last or 1 :]
        if not dry_run:
            self.backups = kept
        return {
            "deleted": [b["id"] for b in gone],
            "kept": [b["id"] for b in kept],
            "chunks_removed": 0 if dry_run else 2 * len(gone),
            "bytes_freed": 0 if dry_run else 8388608 * len(gone),
        }

    def start_prune(
        self,
        ctxt: Mapping[str, Any],
        *,
        keep_last: int | None,
        keep_daily: int | None,
        volume_id: str | None,
        dry_run: bool,
    ) -> api.Operation:
        """RPC 1.3: the prune runs at once here; the operation shows its result."""
        result = self.prune_backups(
            ctxt, keep_last=keep_last, keep_daily=keep_daily, volume_id=volume_id, dry_run=dry_run
        )
        self.calls[-1] = ("start_prune", self.calls[-1][1])
        done = op(
            f"prune-{len(self.ops)}",
            self.host,
            "succeeded",
            kind=api.OperationKind.BACKUP,
            steps=[("prune", "done")],
            progress=(3, 3),
            volumes=(),
            **result,
        )
        self.ops.append(done)
        return done

    def cancel_operation(self, ctxt: Mapping[str, Any], operation_id: str) -> api.Operation:
        """RPC 1.3: refuses like the agent; a running op's next state is ``cancelled``."""
        self._record("cancel", operation_id)
        known = next((o for o in self.ops if o.id == operation_id), None)
        if known is None:
            raise api.OperationNotFound(f"no operation {operation_id}")
        if known.kind not in (api.OperationKind.BACKUP, api.OperationKind.RESTORE):
            raise api.NotCancellable(
                f"operation {operation_id} is a {known.kind.value} operation: snapshot "
                "operations run to completion or roll back; they are not cancellable"
            )
        with self._lock:
            shown = (self.script.get(operation_id) or [known])[-1]
        if shown.state not in (api.OperationState.QUEUED, api.OperationState.RUNNING):
            raise api.NotCancellable(f"operation {operation_id} already ended: {shown.state.value}")
        ended = dataclasses.replace(
            known,
            state=api.OperationState.CANCELLED,
            error={"code": "OperationCancelled", "message": "cancelled on request"},
        )
        with self._lock:
            self.script[operation_id] = [ended]
        return known

    def _find_backup(self, backup_id: str) -> dict[str, Any]:
        for b in self.backups:
            if b["id"] == backup_id:
                return b
        raise BackupNotFound(f"no backup {backup_id}")


class _BackupNotFound(api.AgentRpcError):
    """Stands in for RPC 1.2's api.BackupNotFound until it exists (the API maps it by name)."""


_BackupNotFound.__name__ = "BackupNotFound"
BackupNotFound: type[api.AgentRpcError] = getattr(api, "BackupNotFound", _BackupNotFound)

BK1 = "66666666-6666-4666-8666-666666666661"
BK2 = "66666666-6666-4666-8666-666666666662"
BK3 = "66666666-6666-4666-8666-666666666663"


def kind_of(name: str) -> api.OperationKind:
    """RPC 1.2's kind ``name`` once service_api has it (a stand-in kind before)."""
    kind: api.OperationKind = getattr(api.OperationKind, name, api.OperationKind.INSTANCE_SNAPSHOT)
    return kind


def backup(backup_id: str, volume_id: str, created: str, **over: Any) -> dict[str, Any]:
    """A summary as ``list_backups`` returns it."""
    return {
        "id": backup_id,
        "volume_id": volume_id,
        "created_at": created,
        "parent": None,
        "incremental": False,
        "size": 1073741824,
        "data_bytes": 12582912,
        "checkpoint": None,
        **over,
    }


def wrapped_app(
    agents: Callable[[str], Any],
    tmp: Path,
    routes: Mapping[str, tuple[str, str]],
    *,
    roles: list[str] | None = None,
    max_body: int = 65536,
    generation: int = 1,
) -> Any:
    """The real ApiApp behind ``auth.wrap`` (noauth, no policy file, ``roles`` as the noauth
    roles when given); its router knows ``routes``: host -> (volume id, instance uuid)."""
    overrides: dict[str, Any] = {
        "api.auth_strategy": "noauth",
        "api.policy_file": str(tmp / "none.yaml"),
    }
    if roles is not None:
        overrides["api.noauth_roles"] = roles
    conf = make_conf(overrides=overrides)
    router = Router()
    for host, (volume, instance) in routes.items():
        router.update(host, [{"volume_id": volume, "instance_uuid": instance}], generation)
    inner = ApiApp(router, agents, auth.make_enforcer(conf), max_body=max_body)
    return auth.wrap(inner, conf)
