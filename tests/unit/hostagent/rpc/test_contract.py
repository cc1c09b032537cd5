"""The RPC edge without a bus: wire validation, error mapping, client-side RemoteError map."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from hostagent.rpc import contract as api
from hostagent.rpc.client import AgentAPI
from hostagent.rpc.messaging import messaging
from hostagent.rpc.server import AgentEndpoint, to_rpc_error
from libvirt_ops import DiskBusy, DiskNotFound, DomainNotFound
from qcow2.errors import UnsafeImage
from tests.unit.hostagent.fakes import expected

om = messaging()
VOL = "11111111-1111-4111-8111-111111111111"
SNAP = "55555555-5555-4555-8555-555555555555"
GOOD = {"snapshot_id": SNAP, "type": "qcow2", "new_file": f"volume-{VOL}.{SNAP}"}


class RaisingService:
    """Every call raises ``exc`` (or returns a fixed operation when ``exc`` is None)."""

    def __init__(self, exc: BaseException | None = None) -> None:
        self.exc = exc
        self.seen: list[Any] = []

    def create_assisted_snapshot(self, ctxt: Any, req: Any) -> api.Operation:
        self.seen.append((ctxt, req))
        if self.exc:
            raise self.exc
        return api.Operation(
            "op1", api.OperationKind.CREATE_ASSISTED, api.OperationState.QUEUED, "h"
        )


@pytest.mark.parametrize(
    ("lower", "typed"),
    [
        (DiskBusy("job"), api.DiskBusy),
        (DiskNotFound("x"), api.VolumeNotFound),
        (DomainNotFound("x"), api.InstanceNotFound),
        (UnsafeImage("/p", "rule", "detail"), api.InvalidRequest),
        (KeyError("boom"), api.AgentInternalError),
        (api.OperationNotFound("op"), api.OperationNotFound),
    ],
)
def test_service_errors_become_typed_expected_exceptions(lower: Exception, typed: type) -> None:
    ep = AgentEndpoint(RaisingService(lower))  # type: ignore[arg-type]
    exc = expected(lambda: ep.create_assisted_snapshot({}, VOL, GOOD))
    assert type(exc) is typed
    assert to_rpc_error(lower).__class__ is typed


@pytest.mark.parametrize(
    "create_info",
    [
        {**GOOD, "type": "raw"},
        {**GOOD, "new_file": "sub/" + GOOD["new_file"]},
        {**GOOD, "new_file": "evil.qcow2"},
        {**GOOD, "snapshot_id": "1"},
        {**GOOD, "snapshot_id": "AAAAAAAA-5555-4555-8555-55555555555A"},
        {k: v for k, v in GOOD.items() if k != "new_file"},
        {**GOOD, "backing": "x"},
        "not-a-dict",
    ],
)
def test_bad_create_info_never_reaches_the_service(create_info: Any) -> None:
    service = RaisingService()
    ep = AgentEndpoint(service)  # type: ignore[arg-type]
    exc = expected(lambda: ep.create_assisted_snapshot({}, VOL, create_info))
    assert type(exc) is api.InvalidRequest
    assert service.seen == []


def test_good_create_reaches_service_typed() -> None:
    service = RaisingService()
    ep = AgentEndpoint(service)  # type: ignore[arg-type]
    out = ep.create_assisted_snapshot({"request_id": "r1"}, VOL, {**GOOD, "id": "x"})
    assert out["id"] == "op1" and out["state"] == "queued"
    ctxt, req = service.seen[0]
    assert ctxt.request_id == "r1"
    assert req == api.CreateSnapshotRequest(VOL, SNAP, GOOD["new_file"])


@pytest.mark.parametrize(
    ("info", "ok"),
    [
        ({"type": "qcow2", "file_to_merge": None, "merge_target_file": None}, True),
        (
            {
                "type": "qcow2",
                "file_to_merge": f"volume-{VOL}.{SNAP}",
                "merge_target_file": f"volume-{VOL}",
            },
            True,
        ),
        ({"type": "qcow2", "file_to_merge": None, "merge_target_file": f"volume-{VOL}"}, False),
        ({"type": "qcow2", "file_to_merge": "../x", "merge_target_file": None}, False),
        (
            {
                "volume_id": str(uuid.uuid4()),
                "type": "qcow2",
                "file_to_merge": None,
                "merge_target_file": None,
            },
            False,
        ),
    ],
)
def test_delete_info_validation(info: dict[str, Any], ok: bool) -> None:
    if ok:
        req = api.DeleteSnapshotRequest.from_wire(VOL, SNAP, info)
        assert req.merge_target_file == info["merge_target_file"]
    else:
        with pytest.raises(api.InvalidRequest):
            api.DeleteSnapshotRequest.from_wire(VOL, SNAP, info)


def test_instance_request_and_filters_validation() -> None:
    req = api.InstanceSnapshotRequest.from_wire(SNAP, [VOL], "preferred")
    assert req.volume_ids == (VOL,) and req.quiesce is api.Quiesce.PREFERRED
    assert api.InstanceSnapshotRequest.from_wire(SNAP, None, False).quiesce is api.Quiesce.NONE
    for bad in ([VOL, VOL], [], "x"):
        with pytest.raises(api.InvalidRequest):
            api.InstanceSnapshotRequest.from_wire(SNAP, bad, True)
    with pytest.raises(api.InvalidRequest):
        api.InstanceSnapshotRequest.from_wire(SNAP, None, "sometimes")
    for bad_filter in ({"state": "bogus"}, {"limit": 0}, {"limit": True}, {"colour": 1}):
        with pytest.raises(api.InvalidRequest):
            api.OperationFilters.from_wire(bad_filter)


def test_operation_and_inventory_round_trip_the_wire() -> None:
    op = api.Operation(
        "o",
        api.OperationKind.INSTANCE_SNAPSHOT,
        api.OperationState.FAILED,
        "h",
        volume_ids=(VOL,),
        error={"code": "disk_busy", "message": "m"},
    )
    assert api.Operation.from_wire(op.to_wire()) == op
    inv = api.Inventory("h", (api.VolumeAttachment(VOL, SNAP, "d", "vda", "/s/f"),), 3)
    assert api.Inventory.from_wire(inv.to_wire()) == inv


def test_client_maps_remote_error_to_typed() -> None:
    class FakeCctxt:
        def call(self, ctxt: Any, method: str, **kw: Any) -> Any:
            raise om.RemoteError("DiskBusy", "disk vda busy", None)

    class FakeClient:
        def prepare(self, **kw: Any) -> FakeCctxt:
            assert kw["server"] == "h1"
            return FakeCctxt()

    client = AgentAPI.__new__(AgentAPI)
    client.host = "h1"
    client._client = FakeClient()
    with pytest.raises(api.DiskBusy, match="disk vda busy"):
        client.get_operation({}, "x")


def test_delete_snapshot_is_rpc_1_1_and_validated() -> None:
    seen: list[Any] = []

    class Svc:
        def delete_snapshot(self, ctxt: Any, req: api.DeleteOwnedSnapshotRequest) -> api.Operation:
            seen.append(req)
            raise api.SnapshotNotFound(f"{req.snapshot_id} not in the ledger")

    ep = AgentEndpoint(Svc())  # type: ignore[arg-type]
    assert ep.target.version == "1.5" and AgentAPI.VERSION_CAP == "1.5"
    assert isinstance(expected(lambda: ep.delete_snapshot({}, VOL, "../x")), api.InvalidRequest)
    assert seen == []
    exc = expected(lambda: ep.delete_snapshot({}, VOL.upper(), SNAP))
    assert isinstance(exc, api.SnapshotNotFound) and seen == [
        api.DeleteOwnedSnapshotRequest(VOL, SNAP)
    ]

    class Cctxt:
        def call(self, ctxt: Any, method: str, **kw: Any) -> Any:
            raise om.RemoteError("SnapshotNotFound", "not in the ledger", None)

    class Client:
        def prepare(self, **kw: Any) -> Cctxt:
            assert kw["version"] == "1.1"  # an older agent refuses instead of misreading
            return Cctxt()

    client = AgentAPI.__new__(AgentAPI)
    client.host = "h1"
    client._client = Client()
    with pytest.raises(api.SnapshotNotFound):
        client.delete_snapshot({}, VOL, SNAP)


def test_backup_methods_are_rpc_1_2_validated_and_typed() -> None:
    seen: list[Any] = []
    bid = "77777777-7777-4777-8777-777777777777"

    class Svc:
        def create_backup(self, ctxt: Any, req: api.CreateBackupRequest) -> api.Operation:
            seen.append(req)
            return api.Operation("op", api.OperationKind.BACKUP, api.OperationState.QUEUED, "h")

        def get_backup(self, ctxt: Any, backup_id: str) -> dict[str, Any]:
            raise api.BackupNotFound(f"no backup {backup_id}")

        def restore_backup(self, ctxt: Any, req: api.RestoreBackupRequest) -> api.Operation:
            seen.append(req)
            return api.Operation("op", api.OperationKind.RESTORE, api.OperationState.QUEUED, "h")

        def prune_backups(self, ctxt: Any, req: api.PruneBackupsRequest) -> dict[str, Any]:
            seen.append(req)
            return {"deleted": []}

    ep = AgentEndpoint(Svc())  # type: ignore[arg-type]
    bad_creates: list[tuple[Any, Any, Any]] = [
        (None, None, False),
        ([VOL], VOL, False),
        ([], None, False),
        ([VOL, VOL], None, False),
        (["../x"], None, False),
        ([VOL], None, "yes"),
    ]
    for vols, inst, inc in bad_creates:
        exc = expected(lambda v=vols, i=inst, n=inc: ep.create_backup({}, v, i, n))
        assert isinstance(exc, api.InvalidRequest)
    bad_restores: list[tuple[Any, Any, Any]] = [
        ("rel/path", None, "raw"),
        ("/a/../etc/x", None, "raw"),
        ("/a/x", VOL, "raw"),
        (None, None, "raw"),
        ("/a/x", None, "vmdk"),
    ]
    for to, vol, fmt in bad_restores:
        exc = expected(lambda t=to, v=vol, f=fmt: ep.restore_backup({}, bid, t, v, f))
        assert isinstance(exc, api.InvalidRequest)
    assert isinstance(expected(lambda: ep.prune_backups({}, 0, 0, None, False)), api.InvalidRequest)
    assert isinstance(expected(lambda: ep.get_backup({}, "x")), api.InvalidRequest)
    assert seen == []
    assert ep.create_backup({}, None, VOL.upper(), True)["kind"] == "backup"
    assert ep.restore_backup({}, bid, "/a/x", None, "qcow2")["kind"] == "restore"
    assert ep.prune_backups({}, 2, None, None, True) == {"deleted": []}
    assert seen == [
        api.CreateBackupRequest(None, VOL, True),
        api.RestoreBackupRequest(bid, "/a/x", None, "qcow2"),
        api.PruneBackupsRequest(2, None, None, True),
    ]
    assert isinstance(expected(lambda: ep.get_backup({}, bid)), api.BackupNotFound)

    calls: list[tuple[str, dict[str, Any]]] = []

    class Cctxt:
        def call(self, ctxt: Any, method: str, **kw: Any) -> Any:
            calls.append((method, kw))
            if method == "get_backup":
                raise om.RemoteError("BackupNotFound", "no backup", None)
            return {"deleted": []}

    class Client:
        def prepare(self, **kw: Any) -> Cctxt:
            assert kw["version"] == "1.2"
            return Cctxt()

    client = AgentAPI.__new__(AgentAPI)
    client.host = "h"
    client._client = Client()
    with pytest.raises(api.BackupNotFound):
        client.get_backup({}, bid)
    client.prune_backups({}, keep_last=1, keep_daily=None, volume_id=None, dry_run=True)
    assert calls[-1] == (
        "prune_backups",
        {"keep_last": 1, "keep_daily": None, "volume_id": None, "dry_run": True},
    )
