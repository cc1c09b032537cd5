"""A scripted fake agent for the /v1 API and CLI tests (several hosts, progressing operations)."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

from hostagent import service_api as api

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
        self._lock = threading.Lock()

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
        return [
            o
            for o in self.ops
            if (f.state is None or o.state is f.state)
            and (f.kind is None or o.kind is f.kind)
            and (f.volume_id is None or f.volume_id in o.volume_ids)
        ][: f.limit]
