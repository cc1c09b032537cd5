"""A stub agent process for RPC tests: the real RPC server over a stub AgentService.

Run: ``python -m tests.functional.hostagent.stub_agent --transport-url URL --host H``.
Prints ``READY`` once it consumes. The stub keeps operations in memory and raises the
errors the tests expect for special volume ids (see the constants).
"""

from __future__ import annotations

import sys
import threading
import uuid

from hostagent import service_api as api
from hostagent.config import make_conf
from hostagent.rpc_server import parse_args, serve
from libvirt_ops import DiskBusy

VOL_OK = "11111111-1111-4111-8111-111111111111"
VOL_BUSY = "22222222-2222-4222-8222-222222222222"  # raises libvirt_ops.DiskBusy (mapped)
VOL_CRASH = "33333333-3333-4333-8333-333333333333"  # raises RuntimeError (internal)
INSTANCE = "44444444-4444-4444-8444-444444444444"


class StubService:
    def __init__(self, host: str) -> None:
        self.host = host
        self._ops: dict[str, api.Operation] = {}
        self._lock = threading.Lock()

    def _check_volume(self, volume_id: str) -> None:
        if volume_id == VOL_BUSY:
            raise DiskBusy(f"disk of volume {volume_id} has a block job")
        if volume_id == VOL_CRASH:
            raise RuntimeError("stub exploded")
        if volume_id != VOL_OK:
            raise api.VolumeNotFound(f"volume {volume_id} is not attached on {self.host}")

    def _new(self, ctxt: api.CallContext, kind: api.OperationKind, **kw: object) -> api.Operation:
        op = api.Operation(
            id=uuid.uuid4().hex,
            kind=kind,
            state=api.OperationState.QUEUED,
            host=self.host,
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
        return self._new(
            ctxt,
            api.OperationKind.INSTANCE_SNAPSHOT,
            volume_ids=req.volume_ids or (VOL_OK,),
            instance_uuid=req.instance_uuid,
        )

    def get_operation(self, ctxt: api.CallContext, op_id: str) -> api.Operation:
        with self._lock:
            op = self._ops.get(op_id)
        if op is None:
            raise api.OperationNotFound(f"no operation {op_id}")
        return op

    def list_operations(
        self, ctxt: api.CallContext, filters: api.OperationFilters
    ) -> list[api.Operation]:
        with self._lock:
            ops = list(self._ops.values())
        return [
            op
            for op in ops
            if (filters.kind is None or op.kind == filters.kind)
            and (filters.volume_id is None or filters.volume_id in op.volume_ids)
            and (filters.state is None or op.state == filters.state)
        ][: filters.limit]

    def get_inventory(self, ctxt: api.CallContext) -> api.Inventory:
        vol = api.VolumeAttachment(VOL_OK, INSTANCE, "instance-0001", "vdb", "/x/volume-" + VOL_OK)
        return api.Inventory(self.host, (vol,), generation=1)


def main() -> int:
    ns, rest = parse_args(sys.argv[1:])
    conf = make_conf(rest, overrides={"transport_url": ns.transport_url, "host": ns.host})
    serve(conf, StubService(conf.host), ready=lambda: print("READY", flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
