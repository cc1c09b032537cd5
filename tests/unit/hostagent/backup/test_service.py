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
from typing import Any

import pytest

from hostagent.backup import repo as bk
from hostagent.backup.service import BackupSettings
from hostagent.cinder.outbox import NotifyQueue
from hostagent.journal import model as ops
from hostagent.journal.store import Journal
from hostagent.pool import KeyedPool
from hostagent.recovery import reconcile
from hostagent.rpc import contract as api
from hostagent.service import AssistedService, Located
from libvirt_ops import ChainLayer, Disk

V1 = "0b5e0a52-1c1b-4a7e-9d43-7f0c6f0e2a11"
V2 = "1c6f1b63-2d2c-4b8f-8e54-8a1d7a1f3b22"
INST = "6a1c8b0e-5d2f-4c1e-8f4a-2b3c4d5e6f70"
CTX = api.CallContext()
MiB = 1 << 20


def _img(path: Path, backing: str | None = None, data: bytes = b"") -> None:
    argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing:
        argv += ["-b", backing, "-F", "qcow2"]
    subprocess.run([*argv, str(path), "8M"], check=True)
    if data:
        cmd = f"write -P {data[0]} 0 1M"
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", cmd, str(path)], check=True, stdout=-3)


class FakeHv:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.chains: dict[str, list[str]] = {}

    def locate(self, volume_id: str) -> Located:
        if volume_id not in self.chains:
            raise api.VolumeNotFound(volume_id)
        layers = tuple(
            ChainLayer(str(self.dir / n), "qcow2", None if i == 0 else i)
            for i, n in enumerate(self.chains[volume_id])
        )
        target = "vdb" if volume_id == V1 else "vdc"
        return Located(INST, Disk(target, volume_id, "virtio", layers))

    def instance_volumes(self, instance_uuid: str) -> list[Located]:
        if instance_uuid != INST:
            raise api.InstanceNotFound(instance_uuid)
        return [self.locate(v) for v in sorted(self.chains)]

    def snapshot(self, where: Located, new_file: str) -> dict[str, Any]:
        self.chains[str(where.disk.serial)].insert(0, new_file)
        return {}

    def inventory(self) -> api.Inventory:
        return api.Inventory("h", ())


class FakeEngine:
    """Offline backups with the real engine; counts concurrency; may block or fail."""

    def __init__(self, hv: FakeHv, roots: list[str]) -> None:
        self.hv, self.roots = hv, roots
        self.gate: threading.Event | None = None
        self.fail: set[str] = set()
        self.running = self.max_running = 0
        self.released: list[str] = []
        self._lock = threading.Lock()

    def backup(
        self, where: Located, incremental: bool, repository: str, progress: Any, cancel: Any
    ) -> dict[str, Any]:
        vid = str(where.disk.serial)
        with self._lock:
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        try:
            if self.gate is not None:
                assert self.gate.wait(30)
            if vid in self.fail:
                raise bk.RepositoryFull("disk full")
            repo = bk.Repository.open(repository)
            res = bk.backup_full(
                where.disk.source, "qcow2", self.roots, repo, vid, progress=progress
            )
            return {
                "volume_id": vid,
                "backup_id": res.manifest.backup_id,
                "incremental": False,
                "bytes_read": res.bytes_read,
                "bytes_stored": res.bytes_stored,
                "fallback_reason": "no checkpoint" if incremental else None,
            }
        finally:
            with self._lock:
                self.running -= 1

    def release(self, where: Located) -> str | None:
        vid = str(where.disk.serial)
        top = self.hv.chains[vid].pop(0)
        self.released.append(top)
        return top


class Bed:
    def __init__(self, tmp: Path, *, parallel: int = 2, engine: bool = True) -> None:
        self.tmp = tmp
        self.dir = tmp / "share"
        self.dir.mkdir()
        self.hv = FakeHv(self.dir)
        for i, vid in enumerate((V1, V2)):
            _img(self.dir / f"volume-{vid}", data=bytes([0x11 * (i + 1)]))
            self.hv.chains[vid] = [f"volume-{vid}"]
        self.roots = [str(tmp)]
        self.engine = FakeEngine(self.hv, self.roots)
        self.journal = Journal(str(tmp / "j.sqlite"), host="h")
        self.pool = KeyedPool(4)
        settings = BackupSettings(str(tmp / "repo"), max_parallel=parallel, keep_last=2)
        self.svc = AssistedService(
            self.journal,
            self.hv,  # type: ignore[arg-type]
            NotifyQueue(self.journal, None),  # type: ignore[arg-type]
            self.pool,
            roots=self.roots,
            backup_engine=self.engine if engine else None,
            backup_settings=settings,
        )

    def wait(self, op: api.Operation) -> api.Operation:
        assert self.pool.wait_idle(60)
        return self.svc.get_operation(CTX, op.id)

    def create(self, vols: list[str] | None = None, inst: str | None = None) -> api.Operation:
        req = api.CreateBackupRequest.from_wire(vols, inst, False)
        return self.wait(self.svc.create_backup(CTX, req))


@pytest.fixture
def bed(tmp_path: Path) -> Bed:
    return Bed(tmp_path)


def test_instance_backup_runs_volumes_in_parallel_and_gathers_results(bed: Bed) -> None:
    bed.engine.gate = threading.Event()
    op = bed.svc.create_backup(CTX, api.CreateBackupRequest(None, INST, True))
    assert op.kind is api.OperationKind.BACKUP and set(op.volume_ids) == {V1, V2}
    deadline = time.monotonic() + 30
    while bed.engine.running < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert bed.engine.running == 2  # both volumes at once (max_parallel 2)
    bed.engine.gate.set()
    done = bed.wait(op)
    assert done.state is api.OperationState.SUCCEEDED
    backups = done.result["backups"]
    assert [b["volume_id"] for b in backups] == [V1, V2]
    assert all(b["bytes_read"] == MiB and b["fallback_reason"] for b in backups)
    assert [s["name"] for s in done.result["steps"]] == ["volume", "volume"]
    assert done.result["progress"]["end"] > 0
    assert len(bed.svc.list_backups(CTX, None)) == 2


def test_max_parallel_bounds_the_volumes(tmp_path: Path) -> None:
    bed = Bed(tmp_path, parallel=1)
    op = bed.create([V1, V2])
    assert op.state is api.OperationState.SUCCEEDED and bed.engine.max_running == 1


def test_one_failed_volume_fails_the_request_and_keeps_the_other(bed: Bed) -> None:
    bed.engine.fail = {V2}
    op = bed.create([V1, V2])
    assert op.state is api.OperationState.FAILED
    assert op.error is not None and V2 in op.error["message"] and "disk full" in op.error["message"]
    assert [b["volume_id"] for b in op.result["backups"]] == [V1]
    assert op.result["failed"][0]["volume_id"] == V2


def test_refusals_journal_nothing(bed: Bed) -> None:
    with pytest.raises(api.VolumeNotFound):
        bed.svc.create_backup(CTX, api.CreateBackupRequest((V1, str(uuid.uuid4())), None, False))
    with pytest.raises(api.InstanceNotFound):
        bed.svc.create_backup(CTX, api.CreateBackupRequest(None, str(uuid.uuid4()), False))
    # a chain that fails inspection (a backing file outside the naming) is refused up front
    _img(bed.dir / "evil.qcow2")
    _img(bed.dir / f"volume-{V1}.bad", backing="evil.qcow2")
    bed.hv.chains[V1] = [f"volume-{V1}.bad", "evil.qcow2"]
    with pytest.raises(api.InvalidRequest):
        bed.svc.create_backup(CTX, api.CreateBackupRequest((V1,), None, False))
    assert bed.journal.list_operations() == []
    with pytest.raises(api.BackupNotFound):
        bed.svc.get_backup(CTX, str(uuid.uuid4()))
    with pytest.raises(api.BackupNotFound):
        bed.svc.verify_backup(CTX, str(uuid.uuid4()))


def test_list_get_verify_detects_a_flipped_byte(bed: Bed) -> None:
    bed.create([V1])
    bed.create([V1])
    listed = bed.svc.list_backups(CTX, V1)
    assert len(listed) == 2 and listed[0]["created_at"] >= listed[1]["created_at"]
    assert bed.svc.list_backups(CTX, V2) == []
    first = listed[0]
    assert first["size"] == 8 * MiB and first["stored_bytes"] > 0
    got = bed.svc.get_backup(CTX, first["id"])
    assert got["volume_id"] == V1 and got["source_chain"][0]["name"] == f"volume-{V1}"
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


def test_restore_validates_the_target_then_writes_the_volume(bed: Bed, tmp_path: Path) -> None:
    bed.create([V1])
    bid = bed.svc.list_backups(CTX, V1)[0]["id"]

    def restore(to: str | None, vol: str | None = None, fmt: str = "raw") -> api.Operation:
        req = api.RestoreBackupRequest.from_wire(bid, to, vol, fmt)
        return bed.svc.restore_backup(CTX, req)

    outside = tmp_path.parent / f"outside-{uuid.uuid4().hex}"
    outside.mkdir()
    (bed.dir / "link").symlink_to(outside)
    for to in (f"{outside}/x.raw", f"{bed.dir}/link/x.raw", f"{bed.dir}/volume-{V1}", "/etc/x"):
        with pytest.raises(api.InvalidRequest):
            restore(to)
    with pytest.raises(api.InvalidRequest):
        api.RestoreBackupRequest.from_wire(bid, f"{bed.dir}/../x", None, "raw")
    assert bed.journal.list_operations(kind=ops.OperationKind.RESTORE) == []
    done = bed.wait(restore(f"{bed.dir}/copy.raw"))
    assert done.state is api.OperationState.SUCCEEDED and done.kind is api.OperationKind.RESTORE
    cmp = ["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2"]
    subprocess.run([*cmp, str(bed.dir / "copy.raw"), str(bed.dir / f"volume-{V1}")], check=True)
    new = str(uuid.uuid4())
    done = bed.wait(restore(None, new, "qcow2"))  # next to the attached source volume
    assert done.result["path"] == str(bed.dir / f"volume-{new}")
    with pytest.raises(api.InvalidRequest, match="exists"):
        restore(None, new, "qcow2")


def test_prune_and_delete(bed: Bed) -> None:
    for _ in range(3):
        bed.create([V1])
    ids = [b["id"] for b in bed.svc.list_backups(CTX, V1)]  # newest first
    dry = bed.svc.prune_backups(CTX, api.PruneBackupsRequest(1, None, V1, True))
    assert sorted(dry["deleted"]) == sorted(ids[1:])
    assert len(bed.svc.list_backups(CTX, V1)) == 3
    default = bed.svc.prune_backups(CTX, api.PruneBackupsRequest(None, None, None, False))
    assert sorted(default["kept"]) == sorted(ids[:2])  # [backup] keep_last = 2
    out = bed.svc.prune_backups(CTX, api.PruneBackupsRequest(1, None, V1, False))
    assert out["kept"] == [ids[0]] and out["deleted"] == [ids[1]]
    bed.svc.delete_backup(CTX, ids[0])
    assert bed.svc.list_backups(CTX, V1) == []
    with pytest.raises(api.BackupNotFound):
        bed.svc.delete_backup(CTX, ids[0])
    gc = bed.svc.prune_backups(CTX, api.PruneBackupsRequest(1, None, None, False))
    assert gc["deleted"] == []


def test_assisted_create_releases_a_checkpoint_first(bed: Bed) -> None:
    k = f"volume-{V1}.qsnap-bk-{uuid.uuid4()}"
    _img(bed.dir / k, backing=f"volume-{V1}")
    bed.hv.chains[V1] = [k, f"volume-{V1}"]
    snap = str(uuid.uuid4())
    new_file = f"volume-{V1}.{snap}"
    _img(bed.dir / new_file, backing=f"volume-{V1}")  # Cinder backs it on ITS active file
    req = api.CreateSnapshotRequest.from_wire(
        V1, {"snapshot_id": snap, "type": "qcow2", "new_file": new_file}
    )
    op = bed.wait(bed.svc.create_assisted_snapshot(CTX, req))
    assert op.state is api.OperationState.SUCCEEDED, op.error
    steps = [s["name"] for s in op.result["steps"]]
    assert steps[:3] == ["release_checkpoint", "validate", "snapshot"]
    assert bed.engine.released == [k]
    assert bed.hv.chains[V1] == [new_file, f"volume-{V1}"]


def test_without_an_engine_a_checkpoint_is_refused_and_backups_too(tmp_path: Path) -> None:
    bed = Bed(tmp_path, engine=False)
    k = f"volume-{V1}.qsnap-bk-{uuid.uuid4()}"
    _img(bed.dir / k, backing=f"volume-{V1}")
    bed.hv.chains[V1] = [k, f"volume-{V1}"]
    snap = str(uuid.uuid4())
    new_file = f"volume-{V1}.{snap}"
    _img(bed.dir / new_file, backing=f"volume-{V1}")
    req = api.CreateSnapshotRequest.from_wire(
        V1, {"snapshot_id": snap, "type": "qcow2", "new_file": new_file}
    )
    with pytest.raises(api.InvalidRequest):
        bed.svc.create_assisted_snapshot(CTX, req)
    with pytest.raises(api.InvalidRequest, match="not configured"):
        bed.svc.list_backups(CTX, None)


def test_recovery_fails_request_ops_and_hands_volume_backups_over(bed: Bed) -> None:
    j = bed.journal
    parent = j.begin(
        ops.OperationKind.BACKUP,
        {"action": "create", "volume_ids": [V1], "instance_uuid": None, "incremental": False},
        locks=[f"volume:{V1}"],
    ).operation
    child = j.begin(ops.OperationKind.BACKUP, {"volume_id": V1}, locks=[f"volume:{V1}"]).operation
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

    out = reconcile(
        j,
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        submit=bed.pool.submit,
        roots=bed.roots,
        backup_recover=recover,
    )
    assert {o.op_id for o in out} == {parent.id, child.id, restore.id}
    assert seen == [child.id]
    assert j.get(parent.id).state is ops.OperationState.FAILED
    assert j.get(restore.id).state is ops.OperationState.FAILED
    assert not tmp.exists()
