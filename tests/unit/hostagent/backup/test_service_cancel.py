"""RPC 1.3 in AssistedService: cancel_operation's semantics and start_prune, over the
fakes' BackupBed (fake hypervisor, real repository; the engine honours cancel)."""

from __future__ import annotations

import os
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from hostagent.rpc import contract as api
from tests.unit.hostagent.fakes import CTX, DOM, VOL, VOL2, BackupBed, MiB, make_image


def _repo_clean(bed: BackupBed) -> None:
    """No in-progress marker and no temporary chunk left in the repository."""
    repo = bed.tmp / "repo"
    assert os.listdir(repo / "inprogress") == []
    for _, _, files in os.walk(repo / "chunks"):
        assert not [f for f in files if f.startswith(".")]


def test_cancel_refusals(tmp_path: Path) -> None:
    bed = BackupBed(tmp_path, parallel=1)
    with pytest.raises(api.OperationNotFound):
        bed.svc.cancel_operation(CTX, str(uuid.uuid4()))
    with pytest.raises(api.OperationNotFound):
        bed.svc.cancel_operation(CTX, "not-a-uuid")
    done = bed.create([VOL])
    assert done.state is api.OperationState.SUCCEEDED
    with pytest.raises(api.NotCancellable, match=f"{done.id}.*succeeded"):
        bed.svc.cancel_operation(CTX, done.id)
    snap = str(uuid.uuid4())
    new_file = f"volume-{VOL}.{snap}"
    make_image(bed.dir / new_file, f"volume-{VOL}", "8M")
    req = api.CreateSnapshotRequest.from_wire(
        VOL, {"snapshot_id": snap, "type": "qcow2", "new_file": new_file}
    )
    sop = bed.wait(bed.svc.create_assisted_snapshot(CTX, req))
    why = r"create_assisted_snapshot operation: snapshot.*not cancellable"
    with pytest.raises(api.NotCancellable, match=why):
        bed.svc.cancel_operation(CTX, sop.id)
    assert bed.svc.get_operation(CTX, sop.id).state is api.OperationState.SUCCEEDED


def test_cancel_create_keeps_published_and_never_starts_queued(tmp_path: Path) -> None:
    bed = BackupBed(tmp_path, parallel=1)
    gate = threading.Event()
    bed.engine.hold = {VOL: gate}
    op = bed.svc.create_backup(CTX, api.CreateBackupRequest((VOL, VOL2), None, False))
    deadline = time.monotonic() + 30
    while not bed.svc.list_backups(CTX, VOL):  # VOL published, its volume job not yet ended
        assert time.monotonic() < deadline
        time.sleep(0.01)
    first = bed.svc.cancel_operation(CTX, op.id)
    again = bed.svc.cancel_operation(CTX, op.id)  # idempotent while it runs
    assert first.id == again.id == op.id
    assert again.state in (api.OperationState.QUEUED, api.OperationState.RUNNING)
    gate.set()
    done = bed.wait(op)
    assert done.state is api.OperationState.CANCELLED
    assert [b["volume_id"] for b in done.result["backups"]] == [VOL]
    assert done.result["cancelled"] == [VOL2] and "failed" not in done.result
    assert done.error is not None and "stay published" in done.error["message"]
    assert bed.engine.started == [VOL]
    assert [s["name"] for s in done.result["steps"]] == ["volume"]  # VOL2 never began
    assert [b["volume_id"] for b in bed.svc.list_backups(CTX, None)] == [VOL]
    listed = bed.svc.list_operations(CTX, api.OperationFilters(state=api.OperationState.CANCELLED))
    assert [o.id for o in listed] == [op.id]
    with pytest.raises(api.NotCancellable, match="cancelled"):
        bed.svc.cancel_operation(CTX, op.id)
    _repo_clean(bed)
    again_ok = bed.create([VOL2])  # the flag is gone: a later backup runs normally
    assert again_ok.state is api.OperationState.SUCCEEDED


def test_cancel_during_a_throttled_read_publishes_nothing(tmp_path: Path) -> None:
    bed = BackupBed(tmp_path, parallel=1, chunk_size=MiB, bandwidth_mib=1)
    src = bed.dir / f"volume-{VOL}"
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 7 0 6M", str(src)], check=True, stdout=-3
    )
    op = bed.svc.create_backup(CTX, api.CreateBackupRequest((VOL,), None, False))
    assert bed.engine.inside.wait(30)
    deadline = time.monotonic() + 30
    while bed.svc.get_operation(CTX, op.id).result["progress"]["cur"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    bed.svc.cancel_operation(CTX, op.id)  # 1 MiB/s: 5 chunks still to read
    done = bed.wait(op)
    assert done.state is api.OperationState.CANCELLED, done.error
    assert done.result["backups"] == [] and done.result["cancelled"] == [VOL]
    assert 0 < done.result["progress"]["cur"] < 6 * MiB
    assert bed.svc.list_backups(CTX, None) == []
    _repo_clean(bed)


def test_start_prune_is_an_operation_and_cancellable_while_queued(tmp_path: Path) -> None:
    bed = BackupBed(tmp_path, parallel=1)
    for _ in range(3):
        bed.create([VOL])
    ids = [b["id"] for b in bed.svc.list_backups(CTX, VOL)]
    with pytest.raises(api.InvalidRequest):
        bed.svc.start_prune(CTX, api.PruneBackupsRequest(0, 0, None, False))
    # queued behind another prune: cancelled before it judged anything
    gate = threading.Event()
    bed.pool.submit("backup:prune", lambda: gate.wait(30) and None)
    op = bed.svc.start_prune(CTX, api.PruneBackupsRequest(1, None, VOL, False))
    assert op.kind is api.OperationKind.BACKUP and op.state is api.OperationState.QUEUED
    assert bed.svc.cancel_operation(CTX, op.id).id == op.id
    gate.set()
    done = bed.wait(op)
    assert done.state is api.OperationState.CANCELLED
    assert done.result["deleted"] == [] and len(bed.svc.list_backups(CTX, VOL)) == 3
    # uncancelled: the result is what the synchronous prune returns
    op = bed.wait(bed.svc.start_prune(CTX, api.PruneBackupsRequest(1, None, VOL, False)))
    assert op.state is api.OperationState.SUCCEEDED, op.error
    assert sorted(op.result["deleted"]) == sorted(ids[1:]) and op.result["kept"] == [ids[0]]
    assert op.result["chunks_removed"] == 0  # chunks shared with the kept backup / in grace
    assert [s["name"] for s in op.result["steps"]] == ["prune"]
    assert op.result["progress"]["end"] > 0
    assert [b["id"] for b in bed.svc.list_backups(CTX, VOL)] == [ids[0]]
    row = bed.journal.get(uuid.UUID(op.id))
    assert row.request["action"] == "prune" and row.request["keep_last"] == 1
    # the 1.2 call still works and agrees
    sync = bed.svc.prune_backups(CTX, api.PruneBackupsRequest(1, None, VOL, True))
    assert sync["deleted"] == [] and sync["kept"] == [ids[0]]


def test_instance_of_nothing_to_prune(tmp_path: Path) -> None:
    bed = BackupBed(tmp_path, parallel=1)
    op = bed.wait(bed.svc.start_prune(CTX, api.PruneBackupsRequest(None, None, None, False)))
    assert op.state is api.OperationState.SUCCEEDED and op.result["deleted"] == []
    assert DOM  # the bed's instance is untouched by prunes


def test_cancelled_verify_and_restore_end_cancelled_and_write_nothing(tmp_path: Path) -> None:
    bed = BackupBed(tmp_path, parallel=1)
    bed.create([VOL])
    bid = bed.svc.list_backups(CTX, VOL)[0]["id"]
    target = bed.dir / "copy.raw"
    gates = {key: threading.Event() for key in (f"backup:{bid}", f"restore:{target}")}
    for key, gate in gates.items():  # each queued behind a job of its pool key
        bed.pool.submit(key, lambda g=gate: g.wait(30) and None)
    ver = bed.svc.verify_backup(CTX, bid)
    res = bed.svc.restore_backup(CTX, api.RestoreBackupRequest(bid, str(target), None, "raw"))
    for op in (ver, res):
        assert bed.svc.cancel_operation(CTX, op.id).state is api.OperationState.QUEUED
    for gate in gates.values():
        gate.set()
    ver, res = bed.wait(ver), bed.wait(res)
    assert ver.state is res.state is api.OperationState.CANCELLED
    assert ver.result["backup_id"] == bid and ver.result["bad_chunks"] == []
    assert res.result["path"] is None and res.error is not None
    assert "nothing was written" in res.error["message"]
    assert not target.exists() and not [p for p in bed.dir.iterdir() if ".restore-" in p.name]


def test_a_prune_interrupted_by_a_restart_is_failed_by_recovery(tmp_path: Path) -> None:
    from hostagent.journal import model as ops
    from hostagent.recovery import reconcile

    bed = BackupBed(tmp_path, parallel=1)
    gate = threading.Event()
    bed.pool.submit("backup:prune", lambda: gate.wait(30) and None)
    op = bed.svc.start_prune(CTX, api.PruneBackupsRequest(1, None, None, False))
    # "restart": the journal still says queued; recovery fails it (action prune != create)
    out = reconcile(
        bed.journal, bed.svc.resumers(job_timeout=30.0, recover_volume=lambda r: "unused")
    )
    assert uuid.UUID(op.id) in {o.op_id for o in out}
    row = bed.journal.get(uuid.UUID(op.id))
    assert row.state is ops.OperationState.FAILED and row.error is not None
    assert "prune interrupted by a restart" in row.error.message
    gate.set()
    assert bed.pool.wait_idle(30)  # the queued job finds its operation ended: no prune
    assert bed.journal.get(uuid.UUID(op.id)).state is ops.OperationState.FAILED
    assert bed.journal.steps(uuid.UUID(op.id)) == []
