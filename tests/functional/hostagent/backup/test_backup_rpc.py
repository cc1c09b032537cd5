"""RPC 1.2/1.3 backups end to end: a real ``qsnap-agent`` process over the private RabbitMQ.

One TCG guest with two volume disks writing records on a plain-directory share; the agent
runs with ``[cinder] enabled = false`` and its repository in the test's directory. One test
walks every step through ``AgentAPI`` (what ``/v1/backups`` calls): an instance backup
(both volumes at once), an incremental after a known change, list/get, verify, restore to a
path (e2fsck clean, a prefix of the writer's records), prune (RPC 1.3's operation and 1.2's
call), delete, a backup cancelled mid-read (RPC 1.3; the agent runs with ``[backup]
bandwidth_mib`` low so the read lasts seconds) and an assisted create on a disk whose live
top is a backup checkpoint (not cancellable).

Every backup reads at a checkpoint, an owned snapshot recorded in the volume's ledger like
any other (``volume-<vid>.<snapshot id>``), so after each one: the live top is the ledger's
``active``, every layer is the base or a ledger value, the previous checkpoint was dropped
(file gone, id gone from the ledger) and no ``*.qsnap-bk-*`` file exists. An assisted create
on a disk whose top is a checkpoint is then an ordinary snapshot: Cinder computes
``new_file``'s backing from the ledger's active (the checkpoint file), nothing is released,
and the next incremental still builds on the checkpoint below Cinder's snapshot.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from hostagent.journal.store import Journal
from hostagent.rpc import contract as api
from qcow2 import Ledger, write_ledger
from testbed.disks import fsck_clean, read_guest_file
from testbed.guest import GuestFactory
from testbed.layers import allocated
from testbed.records import parse_records
from testbed.shares import DirShare
from tests.functional.hostagent.backup.backup_agent import BackupAgent
from tests.functional.hostagent.backup.chains import assert_coherent, ledger

pytestmark = [pytest.mark.functional, pytest.mark.timeout(900)]
MiB = 1 << 20
CTX: dict[str, Any] = {"request_id": "req-backup-rpc"}
BANDWIDTH_MIB = 4


def test_backup_rpc_lifecycle(
    dir_guests: GuestFactory, dir_share: DirShare, rabbitmq: Any, bed_dir: Path
) -> None:
    g = dir_guests(ndisks=2, size_mib=256)
    v1, v2 = (d.volume_id for d in g.disks[:2])
    base = {v: g.chain(v) for v in (v1, v2)}
    agent = BackupAgent(
        dir_share.root, rabbitmq, bed_dir, workers=4, max_parallel=2,
        backup={"bandwidth_mib": BANDWIDTH_MIB},
    )  # fmt: skip
    agent.start()
    try:
        _walk(agent, g, v1, v2, base, bed_dir)
    finally:
        agent.close()


def _walk(
    agent: BackupAgent, g: Any, v1: str, v2: str, base: dict[str, list[str]], d: Path
) -> None:
    a = agent.api
    # 1. the whole instance while the guest writes: both volumes, in parallel, checkpointed
    g.start_writers(interval_ms=10)
    g.check(["sh", "-c", "sleep 1"])
    op = agent.wait(a.create_backup(CTX, volume_ids=None, instance_uuid=g.uuid, incremental=True))
    assert op.state is api.OperationState.SUCCEEDED, op.error
    assert op.kind is api.OperationKind.BACKUP and set(op.volume_ids) == {v1, v2}
    first = {b["volume_id"]: b for b in op.result["backups"]}
    assert set(first) == {v1, v2}
    assert all("no previous backup" in (b["fallback_reason"] or "") for b in first.values())
    assert op.result["progress"]["end"] >= sum(b["bytes_read"] for b in first.values()) > 0
    with Journal(str(agent.state / "journal.sqlite")) as j:  # the two volumes overlapped
        vols = [s for s in j.steps(uuid.UUID(op.id)) if s.name == "volume"]
    assert len(vols) == 2 and max(s.created_at for s in vols) < min(s.updated_at for s in vols)
    for v in (v1, v2):  # each kept checkpoint is a recorded snapshot, the live top
        b = first[v]
        assert b["checkpoint_file"] == f"volume-{v}.{b['checkpoint']}" and b["dropped"] == []
        assert g.chain(v) == [b["checkpoint_file"], *base[v]]
        snaps = assert_coherent(Path(g.dir), v, g.chain(v), base[v][0])
        assert snaps == {b["checkpoint"]: b["checkpoint_file"]}

    # 2. a known change on v1, then an incremental: reads about what changed
    g.stop_writers()
    k1 = Path(g.dir) / first[v1]["checkpoint_file"]  # the parent's checkpoint: the live top
    mnt = g.disks[0].mountpoint
    g.check(["sh", "-c", f"dd if=/dev/urandom of={mnt}/blob bs=1M count=16 conv=fsync 2>&1"])
    g.check(["sync"])
    changed = allocated(k1)
    op = agent.wait(a.create_backup(CTX, volume_ids=[v1], instance_uuid=None, incremental=True))
    assert op.state is api.OperationState.SUCCEEDED, op.error
    (inc,) = op.result["backups"]
    print(f"incremental read {inc['bytes_read'] / MiB:.2f} MiB of {changed / MiB:.2f} MiB changed")
    assert inc["incremental"] and inc["fallback_reason"] is None
    assert 16 * MiB <= inc["bytes_read"] <= 1.1 * changed
    assert inc["dropped"] == [first[v1]["checkpoint"]] and not k1.exists()
    assert g.chain(v1) == [inc["checkpoint_file"], *base[v1]]
    snaps = assert_coherent(Path(g.dir), v1, g.chain(v1), base[v1][0])
    assert snaps == {inc["checkpoint"]: inc["checkpoint_file"]}

    # 3. list / get
    listed = a.list_backups(CTX, v1)
    assert [b["id"] for b in listed] == [inc["backup_id"], first[v1]["backup_id"]]
    assert listed[0]["incremental"] and listed[0]["parent"] == first[v1]["backup_id"]
    assert listed[0]["checkpoint"] == inc["checkpoint_file"]
    got = a.get_backup(CTX, first[v1]["backup_id"])
    assert got["volume_id"] == v1 and got["source_chain"][0]["name"] == base[v1][0]
    assert got["checkpoint_snapshot_id"] == first[v1]["checkpoint"]
    with pytest.raises(api.BackupNotFound):
        a.get_backup(CTX, str(uuid.uuid4()))

    # 4. verify
    ver = agent.wait(a.verify_backup(CTX, inc["backup_id"]))
    assert ver.state is api.OperationState.SUCCEEDED and ver.result["ok"] is True

    # 5. restore the backup taken while writing to a path: clean fs, prefix of the records
    out = Path(g.dir) / f"restored-{uuid.uuid4().hex[:6]}.raw"
    with pytest.raises(api.InvalidRequest):
        a.restore_backup(CTX, first[v1]["backup_id"], to_path="/etc/x", volume_id=None, fmt="raw")
    rop = agent.wait(
        a.restore_backup(CTX, first[v1]["backup_id"], to_path=str(out), volume_id=None, fmt="raw")
    )
    assert rop.state is api.OperationState.SUCCEEDED, rop.error
    assert rop.kind is api.OperationKind.RESTORE and rop.result["path"] == str(out)
    fsck = fsck_clean(out, "raw")
    assert fsck.ok and not fsck.needs_recovery, fsck.output
    log = parse_records(read_guest_file(out, "raw", "/records"))
    assert log.clean and log.count > 0 and log.is_prefix_of(g.records(mnt))
    out.unlink()

    # 6. prune keep_last=1: 1.2's call (a dry run), then 1.3's operation; then delete
    dry = a.prune_backups(CTX, keep_last=1, keep_daily=None, volume_id=v1, dry_run=True)
    assert dry["deleted"] == [first[v1]["backup_id"]] and dry["kept"] == [inc["backup_id"]]
    pop = agent.wait(a.start_prune(CTX, keep_last=1, keep_daily=None, volume_id=v1, dry_run=False))
    assert pop.state is api.OperationState.SUCCEEDED, pop.error
    assert pop.kind is api.OperationKind.BACKUP and [s["name"] for s in pop.result["steps"]] == [
        "prune"
    ]
    pr = pop.result
    assert pr["deleted"] == [first[v1]["backup_id"]] and pr["kept"] == [inc["backup_id"]]
    assert pop.result["progress"]["end"] > 0  # chunk files scanned by the GC
    with pytest.raises(api.NotCancellable, match="already ended: succeeded"):
        a.cancel_operation(CTX, pop.id)
    a.delete_backup(CTX, inc["backup_id"])
    assert a.list_backups(CTX, v1) == []
    with pytest.raises(api.BackupNotFound):
        a.delete_backup(CTX, inc["backup_id"])

    # 6b. cancel a backup mid-read (throttled), the guest writing: nothing published, the
    # chain and the ledger exactly as before (its checkpoint dropped again); then the same
    # backup uncancelled succeeds and drops the checkpoint the deleted backups left
    _cancel_mid_read(agent, g, v1, base[v1][0], inc["checkpoint"])

    # 7. an assisted create on v2, whose top is its recorded checkpoint: an ordinary snapshot
    _assisted_over_checkpoint(agent, g, v2, base[v2][0], first[v2])


def _assisted_over_checkpoint(
    agent: BackupAgent, g: Any, vid: str, base: str, first: dict[str, Any]
) -> None:
    """Cinder computes ``new_file``'s backing from the ledger's active (the checkpoint file),
    the agent snapshots as for any create, Cinder records it; the next incremental reads
    from the checkpoint below Cinder's snapshot and drops it, Cinder's snapshot untouched."""
    a, d, cp = agent.api, Path(g.dir), first["checkpoint_file"]
    found = ledger(d, vid)
    assert found is not None and found[0] == cp
    snap = str(uuid.uuid4())
    new_file = f"volume-{vid}.{snap}"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", found[0], "-F", "qcow2",
         str(d / new_file)],
        check=True,
    )  # fmt: skip
    os.chmod(d / new_file, 0o666)
    info = {"snapshot_id": snap, "type": "qcow2", "new_file": new_file}
    cop = agent.wait(a.create_assisted_snapshot(CTX, vid, info))
    assert cop.state is api.OperationState.SUCCEEDED, cop.error
    names = [s["name"] for s in cop.result["steps"]]
    assert names[:2] == ["validate", "snapshot"] and "release_checkpoint" not in names
    assert g.chain(vid) == [new_file, cp, base]
    # Cinder's ledger write once it heard of the success (no Cinder here: the test's part)
    write_ledger(str(d), vid, Ledger(new_file, {**found[1], snap: new_file}))
    assert_coherent(d, vid, g.chain(vid), base)
    with pytest.raises(api.NotCancellable, match="create_assisted_snapshot operation"):
        a.cancel_operation(CTX, cop.id)
    with pytest.raises(api.OperationNotFound):
        a.cancel_operation(CTX, str(uuid.uuid4()))
    mnt = g.disks[1].mountpoint
    g.check(["sh", "-c", f"dd if=/dev/urandom of={mnt}/after bs=1M count=4 conv=fsync 2>&1"])
    op = agent.wait(a.create_backup(CTX, volume_ids=[vid], instance_uuid=None, incremental=True))
    assert op.state is api.OperationState.SUCCEEDED, op.error
    (nxt,) = op.result["backups"]
    assert nxt["incremental"] and nxt["fallback_reason"] is None, nxt
    assert nxt["bytes_read"] >= 4 * MiB and nxt["dropped"] == [first["checkpoint"]]
    assert g.chain(vid) == [nxt["checkpoint_file"], new_file, base] and not (d / cp).exists()
    snaps = assert_coherent(d, vid, g.chain(vid), base)
    assert snaps == {snap: new_file, nxt["checkpoint"]: nxt["checkpoint_file"]}


def _cancel_mid_read(agent: BackupAgent, g: Any, vid: str, base: str, kept: str) -> None:
    a, mnt = agent.api, g.disks[0].mountpoint
    before, led = g.chain(vid), ledger(Path(g.dir), vid)
    files = sorted(os.listdir(g.dir))
    g.check(["sh", "-c", f"dd if=/dev/urandom of={mnt}/big bs=1M count=16 conv=fsync 2>&1"])
    g.start_writers(interval_ms=10, mounts=[mnt])
    op = a.create_backup(CTX, volume_ids=[vid], instance_uuid=None, incremental=True)
    deadline = time.monotonic() + 120
    while op.result.get("progress", {}).get("cur", 0) == 0:  # reading (at 4 MiB/s)
        assert op.state is api.OperationState.RUNNING or op.state is api.OperationState.QUEUED
        assert time.monotonic() < deadline
        time.sleep(0.1)
        op = a.get_operation(CTX, op.id)
    asked = a.cancel_operation(CTX, op.id)
    assert asked.id == op.id and a.cancel_operation(CTX, op.id).id == op.id  # idempotent
    done = agent.wait(asked)
    assert done.state is api.OperationState.CANCELLED, (done.state, done.error)
    assert done.result["backups"] == [] and done.result["cancelled"] == [vid]
    assert 0 < done.result["progress"]["cur"] < 16 * MiB
    assert a.list_backups(CTX, vid) == []
    assert os.listdir(agent.repo / "inprogress") == []  # no running/partial marker
    temps = [f for _, _, fs in os.walk(agent.repo / "chunks") for f in fs if f.startswith(".")]
    assert temps == []
    assert g.chain(vid) == before  # the cancelled backup's checkpoint was dropped again
    assert sorted(os.listdir(g.dir)) == files and ledger(Path(g.dir), vid) == led
    assert_coherent(Path(g.dir), vid, before, base)
    listed = a.list_operations(CTX, api.OperationFilters(state=api.OperationState.CANCELLED))
    assert op.id in [o.id for o in listed]  # (its volume's own op may show cancelled too)
    with pytest.raises(api.NotCancellable, match="already ended: cancelled"):
        a.cancel_operation(CTX, op.id)
    g.check(["sh", "-c", "sleep 0.5"])
    g.stop_writers()
    log = g.records(mnt)
    assert log.clean and log.count > 0  # the guest kept writing throughout
    ok = agent.wait(a.create_backup(CTX, volume_ids=[vid], instance_uuid=None, incremental=True))
    assert ok.state is api.OperationState.SUCCEEDED, ok.error
    (res,) = ok.result["backups"]
    assert res["bytes_read"] >= 16 * MiB and res["dropped"] == [kept]
    assert g.chain(vid) == [res["checkpoint_file"], base]
    snaps = assert_coherent(Path(g.dir), vid, g.chain(vid), base)
    assert snaps == {res["checkpoint"]: res["checkpoint_file"]}
    assert [b["id"] for b in a.list_backups(CTX, vid)] == [ok.result["backups"][0]["backup_id"]]
    a.delete_backup(CTX, ok.result["backups"][0]["backup_id"])
