"""The journal's operation model on the wire: one mapping, byte-identical wire values."""

from __future__ import annotations

import uuid

from hostagent.journal import model as ops
from hostagent.rpc import contract as api

OP_ID = uuid.UUID("12345678-1234-4234-8234-123456789abc")
VOL = "0b1c2d3e-4f50-4a6b-8c7d-8e9fa0b1c2d3"
SNAP = "aaaaaaaa-1111-4222-8333-444444444444"


def test_every_journal_kind_and_state_has_its_wire_value() -> None:
    assert {k.value: api.OperationKind.of(k).value for k in ops.OperationKind} == {
        "assisted_create": "create_assisted_snapshot",
        "assisted_delete": "delete_assisted_snapshot",
        "instance_snapshot": "snapshot_instance",
        "owned_delete": "delete_snapshot",
        "backup": "backup",
        "restore": "restore",
    }
    assert {s.value: api.OperationState.of(s).value for s in ops.OperationState} == {
        "pending": "queued",
        "running": "running",
        "succeeded": "succeeded",
        "failed": "failed",
        "cancelled": "cancelled",
    }
    for kind in api.OperationKind:  # a listing's filter goes back to the journal
        assert api.OperationKind.of(kind.journal_kind()) is kind
    assert api.OperationState.QUEUED.journal_states() == [ops.OperationState.PENDING]


def test_operation_of_a_journaled_one() -> None:
    op = ops.Operation(
        id=OP_ID,
        kind=ops.OperationKind.ASSISTED_CREATE,
        state=ops.OperationState.FAILED,
        request={"volume_id": VOL, "snapshot_id": SNAP},
        idempotency_key=SNAP,
        locks=(f"volume:{VOL}", "disk:vda"),
        host="hostA",
        created_at=0.0,
        updated_at=1.5,
        progress=ops.Progress(1, 2),
        result={"steps": "overwritten", "file": "f"},
        error=ops.ErrorInfo("DiskBusy", "job"),
    )
    step = ops.Step(OP_ID, 1, "snapshot", ops.StepState.FAILED, {"n": 1}, 0.0, 1.0)
    assert api.Operation.of(op, [step]).to_wire() == {
        "id": str(OP_ID),
        "kind": "create_assisted_snapshot",
        "state": "failed",
        "host": "hostA",
        "volume_ids": [VOL],
        "snapshot_id": SNAP,
        "instance_uuid": None,
        "created_at": "1970-01-01T00:00:00+00:00",
        "updated_at": "1970-01-01T00:00:01.500000+00:00",
        "error": {"code": "DiskBusy", "message": "job"},
        "result": {
            "steps": [{"name": "snapshot", "state": "failed", "data": {"n": 1}}],
            "file": "f",
            "progress": {"cur": 1, "end": 2},
        },
    }
    assert list(api.Operation.of(op, [step]).result) == ["steps", "file", "progress"]
