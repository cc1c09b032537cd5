"""RPC 1.2 backups in AssistedService: a fake hypervisor and engine over a REAL repository.

The fake engine backs up the volume's qcow2 file offline with the real engine
(``backup_full``), so list/get/verify/restore/prune run against real manifests and chunks;
what is faked is only libvirt (where the disks are, the online snapshot dance).
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from hostagent.backup import repo as bk
from hostagent.journal import model as ops
from hostagent.recovery import reconcile
from hostagent.rpc import contract as api
from hostagent.snapshots.backup_checkpoints import OwnedCheckpoints
from qcow2 import Ledger, write_ledger
from tests.unit.hostagent.fakes import CTX, DOM, VOL, VOL2, BackupBed, MiB, make_image


@pytest.fixture
def bed(tmp_path: Path) -> BackupBed:
    return BackupBed(tmp_path)


def test_instance_backup_runs_volumes_in_parallel_and_gathers_results(bed: BackupBed) -> None:
    bed.engine.gate = threading.Event()
    op = bed.svc.create_backup(CTX, api.CreateBackupRequest(None, DOM, True))
    assert op.kind is api.OperationKind.BACKUP and set(op.volume_ids) == {VOL, VOL2}
    deadline = time.monotonic() + 30
    while bed.engine.running < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert bed.engine.running == 2  # both volumes at once (max_parallel 2)
    bed.engine.gate.set()
    done = bed.wait(op)
    assert done.state is api.OperationState.SUCCEEDED
    backups = done.result["backups"]
    assert [b["volume_id"] for b in backups] == [VOL, VOL2]
    assert all(b["bytes_read"] == MiB and b["fallback_reason"] for b in backups)
    assert [s["name"] for s in done.result["steps"]] == ["volume", "volume"]
    assert done.result["progress"]["end"] > 0
    assert len(bed.svc.list_backups(CTX, None)) == 2


def test_max_parallel_bounds_the_volumes(tmp_path: Path) -> None:
    bed = BackupBed(tmp_path, parallel=1)
    op = bed.create([VOL, VOL2])
    assert op.state is api.OperationState.SUCCEEDED and bed.engine.max_running == 1


def test_one_failed_volume_fails_the_request_and_keeps_the_other(bed: BackupBed) -> None:
    bed.engine.fail = {VOL2}
    op = bed.create([VOL, VOL2])
    assert op.state is api.OperationState.FAILED
    assert (
        op.error is not None and VOL2 in op.error["message"] and "disk full" in op.error["message"]
    )
    assert [b["volume_id"] for b in op.result["backups"]] == [VOL]
    assert op.result["failed"][0]["volume_id"] == VOL2


def test_refusals_journal_nothing(bed: BackupBed) -> None:
    with pytest.raises(api.VolumeNotFound):
        bed.svc.create_backup(CTX, api.CreateBackupRequest((VOL, str(uuid.uuid4())), None, False))
    with pytest.raises(api.InstanceNotFound):
        bed.svc.create_backup(CTX, api.CreateBackupRequest(None, str(uuid.uuid4()), False))
    # a chain that fails inspection (a backing file outside the naming) is refused up front
    make_image(bed.dir / "evil.qcow2", size="8M")
    make_image(bed.dir / f"volume-{VOL}.bad", "evil.qcow2", "8M")
    bed.hv.chains[VOL] = [f"volume-{VOL}.bad", "evil.qcow2"]
    with pytest.raises(api.InvalidRequest):
        bed.svc.create_backup(CTX, api.CreateBackupRequest((VOL,), None, False))
    assert bed.journal.list_operations() == []
    with pytest.raises(api.BackupNotFound):
        bed.svc.get_backup(CTX, str(uuid.uuid4()))
    with pytest.raises(api.BackupNotFound):
        bed.svc.verify_backup(CTX, str(uuid.uuid4()))


def test_a_nova_guests_incremental_backup_is_accepted(bed: BackupBed) -> None:
    """Its checkpoint is a recorded snapshot whose file Nova's BDM names (issue 15): an
    incremental backup of a Nova guest is no longer refused."""
    bed.hv.nova = True
    op = bed.wait(bed.svc.create_backup(CTX, api.CreateBackupRequest((VOL,), None, True)))
    assert op.state is api.OperationState.SUCCEEDED, op.error
    (done,) = op.result["backups"]
    assert done["volume_id"] == VOL and done["fallback_reason"] == "no checkpoint"  # asked
    assert isinstance(bed.engine.checkpoints, OwnedCheckpoints)  # the service bound its own


def test_a_ledger_that_disagrees_with_the_chain_top_is_refused_up_front(bed: BackupBed) -> None:
    """The checkpoint (an owned snapshot) would be refused later: refused now, whole."""
    write_ledger(str(bed.dir), VOL, Ledger(f"volume-{VOL}.{uuid.uuid4()}", {}))
    with pytest.raises(api.InvalidRequest, match="active"):
        bed.svc.create_backup(CTX, api.CreateBackupRequest(None, DOM, True))
    assert bed.journal.list_operations() == [] and bed.engine.started == []
    write_ledger(str(bed.dir), VOL, Ledger(f"volume-{VOL}", {}))  # the control: it agrees
    op = bed.wait(bed.svc.create_backup(CTX, api.CreateBackupRequest(None, DOM, True)))
    assert op.state is api.OperationState.SUCCEEDED, op.error
    assert sorted(bed.engine.started) == sorted([VOL, VOL2])


def test_list_get_verify_detects_a_flipped_byte(bed: BackupBed) -> None:
    bed.create([VOL])
    bed.create([VOL])
    listed = bed.svc.list_backups(CTX, VOL)
    assert len(listed) == 2 and listed[0]["created_at"] >= listed[1]["created_at"]
    assert bed.svc.list_backups(CTX, VOL2) == []
    first = listed[0]
    assert first["size"] == 8 * MiB and first["data_bytes"] == MiB
    assert "stored_bytes" not in first  # a listing never stats chunk files
    got = bed.svc.get_backup(CTX, first["id"])
    assert got["stored_bytes"] > 0
    assert got["volume_id"] == VOL and got["source_chain"][0]["name"] == f"volume-{VOL}"
    assert got["chunks"] >= 1 and got["data_bytes"] == MiB
    ok = bed.wait(bed.svc.verify_backup(CTX, first["id"]))
    assert ok.state is api.OperationState.SUCCEEDED and ok.result["ok"] is True
    repo = bk.Repository.open(str(bed.tmp / "repo"))
    cid = sorted(repo.find(first["id"]).chunk_ids())[0]
    path = repo.chunk_path(cid)
    raw = bytearray(Path(path).read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    os.chmod(path, 0o660)
    Path(path).write_bytes(bytes(raw))
    bad = bed.wait(bed.svc.verify_backup(CTX, first["id"]))
    assert bad.result["ok"] is False and bad.result["bad_chunks"] == [cid]


def test_restore_validates_the_target_then_writes_the_volume(
    bed: BackupBed, tmp_path: Path
) -> None:
    bed.create([VOL])
    bid = bed.svc.list_backups(CTX, VOL)[0]["id"]

    def restore(to: str | None, vol: str | None = None, fmt: str = "raw") -> api.Operation:
        req = api.RestoreBackupRequest.from_wire(bid, to, vol, fmt)
        return bed.svc.restore_backup(CTX, req)

    outside = tmp_path.parent / f"outside-{uuid.uuid4().hex}"
    outside.mkdir()
    (bed.dir / "link").symlink_to(outside)
    for to in (f"{outside}/x.raw", f"{bed.dir}/link/x.raw", f"{bed.dir}/volume-{VOL}", "/etc/x"):
        with pytest.raises(api.InvalidRequest):
            restore(to)
    with pytest.raises(api.InvalidRequest):
        api.RestoreBackupRequest.from_wire(bid, f"{bed.dir}/../x", None, "raw")
    assert bed.journal.list_operations(kind=ops.OperationKind.RESTORE) == []
    done = bed.wait(restore(f"{bed.dir}/copy.raw"))
    assert done.state is api.OperationState.SUCCEEDED and done.kind is api.OperationKind.RESTORE
    cmp = ["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2"]
    subprocess.run([*cmp, str(bed.dir / "copy.raw"), str(bed.dir / f"volume-{VOL}")], check=True)
    new = str(uuid.uuid4())
    done = bed.wait(restore(None, new, "qcow2"))  # next to the attached source volume
    assert done.result["path"] == str(bed.dir / f"volume-{new}")
    with pytest.raises(api.InvalidRequest, match="exists"):
        restore(None, new, "qcow2")


def test_prune_and_delete(bed: BackupBed) -> None:
    for _ in range(3):
        bed.create([VOL])
    ids = [b["id"] for b in bed.svc.list_backups(CTX, VOL)]  # newest first
    dry = bed.svc.prune_backups(CTX, api.PruneBackupsRequest(1, None, VOL, True))
    assert sorted(dry["deleted"]) == sorted(ids[1:])
    assert len(bed.svc.list_backups(CTX, VOL)) == 3
    default = bed.svc.prune_backups(CTX, api.PruneBackupsRequest(None, None, None, False))
    assert sorted(default["kept"]) == sorted(ids[:2])  # [backup] keep_last = 2
    out = bed.svc.prune_backups(CTX, api.PruneBackupsRequest(1, None, VOL, False))
    assert out["kept"] == [ids[0]] and out["deleted"] == [ids[1]]
    bed.svc.delete_backup(CTX, ids[0])
    assert bed.svc.list_backups(CTX, VOL) == []
    with pytest.raises(api.BackupNotFound):
        bed.svc.delete_backup(CTX, ids[0])
    gc = bed.svc.prune_backups(CTX, api.PruneBackupsRequest(1, None, None, False))
    assert gc["deleted"] == []


def test_a_legacy_checkpoint_top_is_refused_and_touched_by_nothing(bed: BackupBed) -> None:
    """An earlier qsnap's checkpoint overlay is released once at start (backup.legacy); no
    request merges it any more, even with a backup engine: each is refused, untouched."""
    k = f"volume-{VOL}.qsnap-bk-{uuid.uuid4()}"
    make_image(bed.dir / k, f"volume-{VOL}", "8M")
    bed.hv.chains[VOL] = [k, f"volume-{VOL}"]
    snap = str(uuid.uuid4())
    new_file = f"volume-{VOL}.{snap}"
    make_image(bed.dir / new_file, f"volume-{VOL}", "8M")  # Cinder backs it on ITS active file
    files = sorted(os.listdir(bed.dir))
    req = api.CreateSnapshotRequest.from_wire(
        VOL, {"snapshot_id": snap, "type": "qcow2", "new_file": new_file}
    )
    with pytest.raises(api.InvalidRequest, match=f"live top '{k}' .* not a file name"):
        bed.svc.create_assisted_snapshot(CTX, req)
    assert sorted(os.listdir(bed.dir)) == files and bed.journal.list_operations() == []
    bed.sync_ledger(VOL)  # Cinder's ledger, which never named the overlay
    assert bed.ledger(VOL) == Ledger(f"volume-{VOL}", {})
    files = sorted(os.listdir(bed.dir))
    for refused in (
        lambda: bed.svc.create_assisted_snapshot(CTX, req),
        lambda: bed.svc.create_backup(CTX, api.CreateBackupRequest((VOL,), None, True)),
    ):
        with pytest.raises(api.InvalidRequest, match="not a file name"):
            refused()
    assert bed.journal.list_operations() == [] and bed.hv.calls == []
    assert bed.engine.started == [] and bed.notifier.sent == []
    assert bed.hv.chains[VOL] == [k, f"volume-{VOL}"] and sorted(os.listdir(bed.dir)) == files


def test_without_an_engine_a_checkpoint_is_refused_and_backups_too(tmp_path: Path) -> None:
    bed = BackupBed(tmp_path, engine=False)
    k = f"volume-{VOL}.qsnap-bk-{uuid.uuid4()}"
    make_image(bed.dir / k, f"volume-{VOL}", "8M")
    bed.hv.chains[VOL] = [k, f"volume-{VOL}"]
    snap = str(uuid.uuid4())
    new_file = f"volume-{VOL}.{snap}"
    make_image(bed.dir / new_file, f"volume-{VOL}", "8M")
    req = api.CreateSnapshotRequest.from_wire(
        VOL, {"snapshot_id": snap, "type": "qcow2", "new_file": new_file}
    )
    with pytest.raises(api.InvalidRequest):
        bed.svc.create_assisted_snapshot(CTX, req)
    with pytest.raises(api.InvalidRequest, match="not configured"):
        bed.svc.list_backups(CTX, None)


def test_recovery_fails_request_ops_and_hands_volume_backups_over(bed: BackupBed) -> None:
    j = bed.journal
    parent = j.begin(
        ops.OperationKind.BACKUP,
        {"action": "create", "volume_ids": [VOL], "instance_uuid": None, "incremental": False},
        locks=[f"volume:{VOL}"],
    ).operation
    child = j.begin(ops.OperationKind.BACKUP, {"volume_id": VOL}, locks=[f"volume:{VOL}"]).operation
    path = str(bed.dir / "r.raw")
    restore = j.begin(
        ops.OperationKind.RESTORE,
        {"action": "restore", "backup_id": str(uuid.uuid4()), "path": path, "fmt": "raw"},
    ).operation
    tmp = bed.dir / ".r.raw.restore-abcd"
    tmp.write_bytes(b"x")
    seen: list[uuid.UUID] = []

    def recover(rec: ops.OperationRecord) -> str:
        seen.append(rec.operation.id)
        j.finish(rec.operation.id, ops.OperationState.FAILED, error=RuntimeError("put back"))
        return "put back"

    out = reconcile(j, bed.svc.resumers(job_timeout=30.0, recover_volume=recover))
    assert {o.op_id for o in out} == {parent.id, child.id, restore.id}
    assert seen == [child.id]
    assert j.get(parent.id).state is ops.OperationState.FAILED
    assert j.get(restore.id).state is ops.OperationState.FAILED
    assert not tmp.exists()


def test_restore_target_swapped_while_queued_writes_nothing(bed: BackupBed, tmp_path: Path) -> None:
    bed.create([VOL])
    bid = bed.svc.list_backups(CTX, VOL)[0]["id"]
    target = bed.dir / "restores"
    target.mkdir()
    elsewhere = tmp_path.parent / f"elsewhere-{uuid.uuid4().hex}"
    elsewhere.mkdir()
    gate = threading.Event()
    bed.pool.submit(f"restore:{target}/x.raw", lambda: gate.wait(30) and None)
    req = api.RestoreBackupRequest.from_wire(bid, f"{target}/x.raw", None, "raw")
    op = bed.svc.restore_backup(CTX, req)  # validated now, queued behind the gate
    os.rename(target, bed.dir / "moved")
    target.symlink_to(elsewhere)  # the directory becomes a link into another tree
    gate.set()
    done = bed.wait(op)
    assert done.state is api.OperationState.FAILED and "TargetChanged" in str(done.error)
    assert os.listdir(elsewhere) == [] and os.listdir(bed.dir / "moved") == []


def test_a_missing_or_unmounted_repository_refuses_backups(tmp_path: Path) -> None:
    """No silent new repository on the local disk: the configured directory must hold one
    unless [backup] create_repository is set."""
    bed = BackupBed(tmp_path, create_repository=False)
    repo = tmp_path / "repo"
    with pytest.raises(api.InvalidRequest, match="does not exist: is its share mounted"):
        bed.create([VOL])
    repo.mkdir()  # an empty mount point: the share is not mounted
    with pytest.raises(api.InvalidRequest, match="holds no repository"):
        bed.create([VOL])
    assert os.listdir(repo) == [] and bed.journal.list_operations() == []
    assert bed.svc.list_backups(CTX, None) == []  # reads find nothing, create nothing
    bk.Repository.create(repo)  # the share mounted again: its repository is there
    done = bed.wait(bed.create([VOL]))
    assert done.state is api.OperationState.SUCCEEDED
