"""A stub agent process for RPC tests: the real RPC server over a stub AgentService.

Run: ``python -m testbed.stub_agent --transport-url URL --host H``.
Prints ``READY`` once it consumes. The stub keeps operations in memory and raises the
errors the tests expect for special volume ids (see the constants). Instance snapshots and
agent-owned deletes advance one stage per ``get_operation`` (steps and progress as the real
agent reports them), so a waiting client sees them run and finish; an instance snapshot with
quiesce ``required`` fails (the stub's guest cannot freeze). Assisted operations stay queued.

Backups (RPC 1.2) live in an in-memory "repository" with deterministic results: backup ids
are uuid5 of a counter, a full backup reads 64 MiB and an incremental (with a parent) 4 MiB;
verify finds nothing bad; a restore refuses a path or volume it already restored to.
The backup methods read their arguments by name from whatever the endpoint passes (one
typed request or plain values), so the stub does not depend on the request classes' names.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from hostagent.config import make_conf
from hostagent.rpc import contract as api
from hostagent.rpc.server import parse_args, serve
from libvirt_ops import DiskBusy
from testbed.service import Service

VOL_OK = "11111111-1111-4111-8111-111111111111"
VOL_BUSY = "22222222-2222-4222-8222-222222222222"  # raises libvirt_ops.DiskBusy (mapped)
VOL_CRASH = "33333333-3333-4333-8333-333333333333"  # raises RuntimeError (internal)
VOL_LEAK = "66666666-6666-4666-8666-666666666666"  # raises OSError naming LEAK_PATH (internal)
#: A path an internal error names: it must reach the agent's log, never a caller.
LEAK_PATH = f"/srv/qsnap-private/share-a/volume-{VOL_LEAK}.secret-layer"
INSTANCE = "44444444-4444-4444-8444-444444444444"
MiB = 1024 * 1024
BACKUP_NS = uuid.UUID("99999999-9999-4999-8999-999999999999")
_BackupNotFound: type[api.AgentRpcError] = getattr(api, "BackupNotFound", api.InvalidRequest)


def _kind(name: str) -> api.OperationKind:
    kind: api.OperationKind = getattr(api.OperationKind, name, api.OperationKind.INSTANCE_SNAPSHOT)
    return kind


def _fields(args: Sequence[Any], names: Sequence[str]) -> dict[str, Any]:
    """``names`` from one typed request (attributes) or from plain positional values."""
    typed = len(args) == 1 and not isinstance(args[0], str | int | bool | list | tuple)
    if typed and any(hasattr(args[0], n) for n in names):
        out = {n: getattr(args[0], n, None) for n in names}
    else:
        out = dict(zip(names, args, strict=False))
    return {k: getattr(v, "value", v) for k, v in out.items()}  # enums -> their values


class StubService:
    def __init__(self, host: str) -> None:
        self.host = host
        self._ops: dict[str, api.Operation] = {}
        self._stages: dict[str, list[api.Operation]] = {}
        self._owned: set[tuple[str, str]] = set()  # (volume, snapshot) the stub "took"
        self._backups: list[dict[str, Any]] = []  # oldest first
        self._restored: set[str] = set()
        self._backup_seq = 0  # never reused, unlike len(self._backups)
        self._lock = threading.Lock()

    def _check_volume(self, volume_id: str) -> None:
        if volume_id == VOL_BUSY:
            raise DiskBusy(f"disk of volume {volume_id} has a block job")
        if volume_id == VOL_CRASH:
            raise RuntimeError("stub exploded")
        if volume_id == VOL_LEAK:
            raise PermissionError(13, "Permission denied", LEAK_PATH)
        if volume_id != VOL_OK:
            raise api.VolumeNotFound(f"volume {volume_id} is not attached on {self.host}")

    def _new(self, ctxt: api.CallContext, kind: api.OperationKind, **kw: object) -> api.Operation:
        op = api.Operation(
            id=uuid.uuid4().hex,
            kind=kind,
            state=api.OperationState.QUEUED,
            host=self.host,
            created_at=datetime.now(UTC).isoformat(),
            result={"request_id": ctxt.request_id},
            **kw,  # type: ignore[arg-type]
        )
        with self._lock:
            self._ops[op.id] = op
        return op

    def create_assisted_snapshot(
        self, ctxt: api.CallContext, req: api.CreateSnapshotRequest
    ) -> api.Operation:
        self._check_volume(req.volume_id)
        return self._new(
            ctxt,
            api.OperationKind.CREATE_ASSISTED,
            volume_ids=(req.volume_id,),
            snapshot_id=req.snapshot_id,
        )

    def delete_assisted_snapshot(
        self, ctxt: api.CallContext, req: api.DeleteSnapshotRequest
    ) -> api.Operation:
        self._check_volume(req.volume_id)
        op = self._new(
            ctxt,
            api.OperationKind.DELETE_ASSISTED,
            volume_ids=(req.volume_id,),
            snapshot_id=req.snapshot_id,
        )
        return op

    def snapshot_instance(
        self, ctxt: api.CallContext, req: api.InstanceSnapshotRequest
    ) -> api.Operation:
        if req.instance_uuid != INSTANCE:
            raise api.InstanceNotFound(f"no domain {req.instance_uuid} on {self.host}")
        for vol in req.volume_ids or (VOL_OK,):
            self._check_volume(vol)
        op = self._new(
            ctxt,
            api.OperationKind.INSTANCE_SNAPSHOT,
            volume_ids=req.volume_ids or (VOL_OK,),
            instance_uuid=req.instance_uuid,
        )
        snaps = [
            {"volume_id": v, "snapshot_id": str(uuid.uuid4()), "file": ""} for v in op.volume_ids
        ]
        for snap in snaps:
            snap["file"] = f"volume-{snap['volume_id']}.{snap['snapshot_id']}"
        plan, shot = _step("plan"), _step("snapshot")
        stages = [
            _stage(op, "running", [plan]),
            _stage(op, "running", [_done(plan), shot], (1, 2)),
        ]
        if req.quiesce is api.Quiesce.REQUIRED:
            error = {"code": "QuiesceFailed", "message": "the stub guest cannot freeze"}
            shot_failed = {**shot, "state": "failed"}
            stages.append(_stage(op, "failed", [_done(plan), shot_failed], (1, 2), error=error))
        else:
            steps = [_done(plan), _done(shot), _done(_step("ledger"))]
            final = {"snapshots": snaps, "quiesced": req.quiesce is not api.Quiesce.NONE}
            stages.append(_stage(op, "succeeded", steps, (2, 2), final=final))
            with self._lock:
                self._owned.update((s["volume_id"], s["snapshot_id"]) for s in snaps)
        with self._lock:
            self._stages[op.id] = stages
        return op

    def delete_snapshot(
        self, ctxt: api.CallContext, req: api.DeleteOwnedSnapshotRequest
    ) -> api.Operation:
        self._check_volume(req.volume_id)
        with self._lock:
            if (req.volume_id, req.snapshot_id) not in self._owned:
                raise api.SnapshotNotFound(
                    f"snapshot {req.snapshot_id} is not in the ledger of volume {req.volume_id}"
                )
            self._owned.discard((req.volume_id, req.snapshot_id))
        op = self._new(
            ctxt,
            api.OperationKind.DELETE_OWNED,
            volume_ids=(req.volume_id,),
            snapshot_id=req.snapshot_id,
        )
        merge = _step("merge")
        stages = [
            _stage(op, "running", [merge], (1, 4)),
            _stage(op, "running", [merge], (3, 4)),
            _stage(op, "succeeded", [_done(merge), _done(_step("ledger"))], (4, 4)),
        ]
        with self._lock:
            self._stages[op.id] = stages
        return op

    def get_operation(self, ctxt: api.CallContext, op_id: str) -> api.Operation:
        with self._lock:
            stages = self._stages.get(op_id)
            if stages:  # one stage further per look
                self._ops[op_id] = stages.pop(0)
            op = self._ops.get(op_id)
        if op is None:
            raise api.OperationNotFound(f"no operation {op_id}")
        return op

    def list_operations(
        self, ctxt: api.CallContext, filters: api.OperationFilters
    ) -> list[api.Operation]:
        with self._lock:
            ops = list(self._ops.values())
        ops.sort(key=lambda op: (op.created_at or "", op.id), reverse=True)  # RPC 1.4
        return [
            op
            for op in ops
            if (filters.kind is None or op.kind == filters.kind)
            and (filters.volume_id is None or filters.volume_id in op.volume_ids)
            and (filters.state is None or op.state == filters.state)
        ][: filters.limit]

    # -- backups (RPC 1.2) ----------------------------------------------------------------
    def _staged(self, op: api.Operation, stages: list[api.Operation]) -> api.Operation:
        with self._lock:
            self._stages[op.id] = stages
        return op

    def _find_backup(self, backup_id: object) -> dict[str, Any]:
        with self._lock:
            for b in self._backups:
                if b["id"] == backup_id:
                    return b
        raise _BackupNotFound(f"no backup {backup_id}")

    def create_backup(self, ctxt: api.CallContext, *args: Any, **kw: Any) -> api.Operation:
        f = {**_fields(args, ("volume_ids", "instance_uuid", "incremental")), **kw}
        if f.get("instance_uuid") is not None and f["instance_uuid"] != INSTANCE:
            raise api.InstanceNotFound(f"no domain {f['instance_uuid']} on {self.host}")
        volumes = tuple(f.get("volume_ids") or (VOL_OK,))
        for vol in volumes:
            self._check_volume(vol)
        op = self._new(
            ctxt, _kind("BACKUP"), volume_ids=volumes, instance_uuid=f.get("instance_uuid")
        )
        results = []
        with self._lock:
            for vol in volumes:
                parents = [b for b in self._backups if b["volume_id"] == vol]
                parent = parents[-1]["id"] if parents and f.get("incremental") else None
                self._backup_seq += 1
                bid = str(uuid.uuid5(BACKUP_NS, str(self._backup_seq)))
                created = datetime(2025, 1, 1, tzinfo=UTC) + timedelta(hours=self._backup_seq)
                read = 4 * MiB if parent else 64 * MiB
                self._backups.append(
                    {
                        "id": bid,
                        "volume_id": vol,
                        "created_at": created.isoformat(),
                        "parent": parent,
                        "incremental": parent is not None,
                        "size": 1024 * MiB,
                        "data_bytes": read // 2,
                        "checkpoint": None,
                    }
                )
                results.append(
                    {
                        "volume_id": vol,
                        "backup_id": bid,
                        "incremental": parent is not None,
                        "bytes_read": read,
                        "bytes_stored": read // 2,
                        "fallback_reason": (
                            "no previous backup" if f.get("incremental") and not parent else None
                        ),
                    }
                )
        step = _step("read")
        final = {"backups": results}
        return self._staged(
            op,
            [
                _stage(op, "running", [step], (1, 4)),
                _stage(op, "running", [step], (3, 4)),
                _stage(op, "succeeded", [_done(step)], (4, 4), final=final),
            ],
        )

    def list_backups(self, ctxt: api.CallContext, *args: Any, **kw: Any) -> list[dict[str, Any]]:
        vol = {**_fields(args, ("volume_id",)), **kw}.get("volume_id")
        with self._lock:
            found = [dict(b) for b in self._backups if vol is None or b["volume_id"] == vol]
        return found[::-1]  # newest first

    def get_backup(self, ctxt: api.CallContext, backup_id: Any) -> dict[str, Any]:
        b = self._find_backup(getattr(backup_id, "backup_id", backup_id))
        return {**b, "source_chain": [f"volume-{b['volume_id']}"], "chunks": 8}

    def verify_backup(self, ctxt: api.CallContext, backup_id: Any) -> api.Operation:
        b = self._find_backup(getattr(backup_id, "backup_id", backup_id))
        op = self._new(ctxt, _kind("BACKUP"), volume_ids=(b["volume_id"],))
        step = _step("verify")
        final = {"ok": True, "bad_chunks": []}
        return self._staged(
            op,
            [
                _stage(op, "running", [step], (1, 2)),
                _stage(op, "succeeded", [_done(step)], (2, 2), final=final),
            ],
        )

    def delete_backup(self, ctxt: api.CallContext, backup_id: Any) -> None:
        b = self._find_backup(getattr(backup_id, "backup_id", backup_id))
        with self._lock:
            self._backups.remove(b)

    def restore_backup(self, ctxt: api.CallContext, *args: Any, **kw: Any) -> api.Operation:
        f = {**_fields(args, ("backup_id", "to_path", "volume_id", "fmt", "format")), **kw}
        b = self._find_backup(f["backup_id"])
        target = f.get("to_path") or f"/x/volume-{f.get('volume_id')}"
        with self._lock:
            if target in self._restored:
                raise api.InvalidRequest(f"restore target {target} exists")
            self._restored.add(target)
        op = self._new(ctxt, _kind("RESTORE"), volume_ids=(b["volume_id"],))
        step = _step("restore")
        final = {"path": target, "format": f.get("fmt") or f.get("format")}
        return self._staged(
            op,
            [
                _stage(op, "running", [step], (1, 2)),
                _stage(op, "succeeded", [_done(step)], (2, 2), final=final),
            ],
        )

    def prune_backups(self, ctxt: api.CallContext, *args: Any, **kw: Any) -> dict[str, Any]:
        names = ("keep_last", "keep_daily", "volume_id", "dry_run")
        f = {**_fields(args, names), **kw}
        keep_last = f.get("keep_last") or 1  # keep_daily is "keep the newest" here
        with self._lock:
            kept: list[str] = []
            deleted: list[str] = []
            for vol in sorted({b["volume_id"] for b in self._backups}):
                if f.get("volume_id") not in (None, vol):
                    kept += [b["id"] for b in self._backups if b["volume_id"] == vol]
                    continue
                mine = [b["id"] for b in self._backups if b["volume_id"] == vol][::-1]
                kept += mine[:keep_last]
                deleted += mine[keep_last:]
            if not f.get("dry_run"):
                self._backups = [b for b in self._backups if b["id"] not in deleted]
        freed = 0 if f.get("dry_run") else 8 * MiB * len(deleted)
        return {
            "deleted": deleted,
            "kept": kept,
            "chunks_removed": 0 if f.get("dry_run") else 2 * len(deleted),
            "bytes_freed": freed,
        }

    # -- RPC 1.3 --------------------------------------------------------------------------
    def start_prune(self, ctxt: api.CallContext, *args: Any, **kw: Any) -> api.Operation:
        """The prune as an operation: judged, then GC'd, then its result (prune_backups')."""
        final = self.prune_backups(ctxt, *args, **kw)
        op = self._new(ctxt, _kind("BACKUP"))
        step = _step("prune")
        return self._staged(
            op,
            [
                _stage(op, "running", [step], (1, 2)),
                _stage(op, "succeeded", [_done(step)], (2, 2), final=final),
            ],
        )

    def cancel_operation(self, ctxt: api.CallContext, op_id: str) -> api.Operation:
        """Refuses like the agent; a running backup/restore's next look is ``cancelled``."""
        op = self.get_operation(ctxt, op_id)
        if op.kind not in (_kind("BACKUP"), _kind("RESTORE")):
            raise api.NotCancellable(
                f"operation {op_id} is a {op.kind.value} operation: snapshot operations run "
                "to completion or roll back; they are not cancellable"
            )
        if op.state not in (api.OperationState.QUEUED, api.OperationState.RUNNING):
            raise api.NotCancellable(f"operation {op_id} already ended: {op.state.value}")
        err = {"code": "OperationCancelled", "message": "cancelled on request"}
        ended = dataclasses.replace(op, state=api.OperationState.CANCELLED, error=err)
        with self._lock:
            self._stages[op_id] = [ended]
        return op

    #: The volumes ``get_inventory`` names (``--volumes``), all attached to ``INSTANCE``.
    inventory_volumes: tuple[str, ...] = (VOL_OK,)
    #: ``--volumes-file``: re-read at every call (a test "attaches" a volume by writing it),
    #: so what the stub publishes and what it answers when asked always agree, as in an agent.
    volumes_file: str | None = None

    def get_inventory(self, ctxt: api.CallContext) -> api.Inventory:
        names = self.inventory_volumes
        if self.volumes_file is not None:
            with open(self.volumes_file) as f:
                names = tuple(v for v in f.read().replace("\n", ",").split(",") if v)
        vols = tuple(
            api.VolumeAttachment(v, INSTANCE, "instance-0001", "vdb", "/x/volume-" + v)
            for v in names
        )
        return api.Inventory(self.host, vols, generation=1)


def _step(name: str) -> dict[str, Any]:
    return {"name": name, "state": "planned", "data": {}}


def _done(step: dict[str, Any]) -> dict[str, Any]:
    return {**step, "state": "done"}


def _stage(
    op: api.Operation,
    state: str,
    steps: list[dict[str, Any]],
    progress: tuple[int, int] = (0, 0),
    error: dict[str, str] | None = None,
    final: dict[str, Any] | None = None,
) -> api.Operation:
    """``op`` as the real agent reports it at some point: steps, progress, final result."""
    body = {**op.result, "steps": steps, "progress": {"cur": progress[0], "end": progress[1]}}
    return dataclasses.replace(
        op, state=api.OperationState(state), error=error, result={**body, **(final or {})}
    )


def start_stub_agent(
    logdir: Path,
    transport_url: str,
    host: str,
    *,
    name: str = "stub-agent",
    timeout: float = 60.0,
    extra: Sequence[str] = (),
) -> Service:
    """This module as a child process serving ``host``; returned once it printed READY.
    ``extra``: ``--volumes V1,V2`` (what get_inventory names), ``--volumes-file F``,
    ``--publish-every S``."""
    svc = Service(name, logdir / f"{name}.log")
    argv = [sys.executable, "-m", "testbed.stub_agent", "--transport-url", transport_url]
    svc.start([*argv, "--host", host, *extra], timeout=timeout)
    return svc


def _publish_every(conf: Any, service: StubService, interval: float) -> None:
    """Cast the stub's inventory on the fanout every ``interval`` s, as an agent does."""
    from hostagent.rpc.client import InventoryFanout, get_transport

    fanout = InventoryFanout(get_transport(conf))

    def run() -> None:
        while True:
            try:
                fanout(service.get_inventory(api.CallContext()))
            except Exception as exc:  # the bus may be down: the next period republishes
                print(f"publishing inventory failed: {exc}", file=sys.stderr, flush=True)
            time.sleep(interval)

    threading.Thread(target=run, name="inventory", daemon=True).start()


def main() -> int:
    ns, rest = parse_args(sys.argv[1:])
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--volumes", help="comma-separated volumes get_inventory names")
    extra.add_argument("--publish-every", type=float, default=0.0, help="seconds; 0: never")
    extra.add_argument("--volumes-file", help="file naming the volumes, re-read every call")
    more, rest = extra.parse_known_args(rest)
    conf = make_conf(rest, overrides={"transport_url": ns.transport_url, "host": ns.host})
    service = StubService(conf.host)
    if more.volumes is not None:
        service.inventory_volumes = tuple(v for v in more.volumes.split(",") if v)
    service.volumes_file = more.volumes_file
    if more.publish_every > 0:
        _publish_every(conf, service, more.publish_every)
    serve(conf, service, ready=lambda: print("READY", flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
