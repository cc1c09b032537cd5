"""Online backups of a running guest's volume, one guest per share kind (plain directory and
GlusterFS FUSE mount) through every step, with the agent's backup path in this process.

Every backup reads at a checkpoint: an owned snapshot recorded in the volume's ledger
(``volume-<vid>.<snapshot id>``), taken before and, unless the backup keeps it for the next
incremental, deleted after the read by an owned delete. What must hold: a full backup taken
while the guest writes restores to a clean filesystem holding a prefix of the writer's
records and leaves the chain as before (its checkpoint dropped); a kept checkpoint is a
ledger entry, never an unrecorded layer; an incremental reads about what changed since the
parent's checkpoint (whose file holds exactly those writes) and restores the volume as it
was; the repository alone restores on "another site"; a flipped byte fails verify/restore
naming the chunk; kill -9 mid-read publishes nothing, recovery never touches the chain and
leaves no layer outside the ledger, and the next backup drops what the kill left; a full
repository filesystem is a clear error that loses nothing; a user's delete of the kept
checkpoint makes the next incremental a full read that names the deleted snapshot.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hostagent.backup.online import BackupRequest
from hostagent.backup.repo import CorruptChunk, Repository, RepositoryFull, restore
from hostagent.journal.model import OperationKind, OperationState
from testbed.disks import fsck_clean, image_sha256, read_guest_file
from testbed.guest import GuestFactory
from testbed.layers import allocated
from testbed.records import parse_records
from testbed.service import REPO
from tests.functional.hostagent.backup.chains import assert_coherent, check_layers, ledger
from tests.functional.hostagent.backup.local import LocalBackups

pytestmark = [pytest.mark.functional, pytest.mark.timeout(900)]
MiB = 1 << 20


def _restore_raw(repo: Repository, backup_id: str, d: Path) -> Path:
    out = d / f"restored-{uuid.uuid4().hex[:8]}.raw"
    restore(repo, backup_id, out)
    return out


def _file_sha(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while b := f.read(4 * MiB):
            h.update(b)
    return h.hexdigest()


@pytest.fixture
def local(libvirt_host: Any, share: Any, bed_dir: Path) -> Iterator[LocalBackups]:
    lb = LocalBackups(libvirt_host.connection, str(bed_dir / "journal.sqlite"), [share.root])
    try:
        yield lb
    finally:
        lb.close()


def test_online_backup_lifecycle(
    guest_factory: GuestFactory, share: Any, libvirt_host: Any, bed_dir: Path, local: LocalBackups
) -> None:
    g = guest_factory(ndisks=1, size_mib=256, share=share)  # on each share kind
    vol, d = g.disks[0].volume_id, Path(g.dir)
    journal = local.journal
    repo = Repository.create(bed_dir / "repo")
    req = BackupRequest(g.uuid, vol, repo.path, incremental=True)
    base = g.chain()
    assert len(base) == 1

    # 1. plain full backup while the guest writes: read at a quiesced checkpoint, which is
    # dropped once published (active commit): the chain is exactly as before
    g.start_writers(interval_ms=10)
    g.check(["sh", "-c", "sleep 1"])
    r1 = local.backup(BackupRequest(g.uuid, vol, repo.path))
    assert r1.checkpoint is None and r1.checkpoint_file is None and len(r1.dropped) == 1
    assert g.chain() == base and list(r1.chain_after) == base
    assert assert_coherent(d, vol, g.chain(), base[0]) == {}
    assert r1.result.manifest.kind == "full"
    op1 = journal.get(uuid.UUID(r1.operation_id))
    assert op1.state is OperationState.SUCCEEDED
    assert op1.progress.end == op1.progress.cur == r1.result.bytes_read > 0
    steps = journal.steps(op1.id)
    assert [s.name for s in steps] == ["checkpoint", "read", "drop_checkpoints"]
    sid1 = steps[0].data["snapshot_id"]
    assert r1.dropped == (sid1,) and steps[0].data["file"] == f"volume-{vol}.{sid1}"
    take = _owned_op(local, OperationKind.INSTANCE_SNAPSHOT, sid1)
    assert take.state is OperationState.SUCCEEDED and take.result["quiesced"] is True
    drop = _owned_op(local, OperationKind.OWNED_DELETE, sid1)
    assert drop.state is OperationState.SUCCEEDED and drop.result["kind"] == "active-commit"
    out1 = _restore_raw(repo, r1.result.manifest.backup_id, bed_dir)
    fsck = fsck_clean(out1, "raw")
    assert fsck.ok and not fsck.needs_recovery, fsck.output
    log = parse_records(read_guest_file(out1, "raw", "/records"))
    assert log.clean and log.count > 0
    assert log.is_prefix_of(g.records("/data"))
    out1.unlink()

    # 2. incremental request, no usable parent checkpoint: full read (says why); its
    # checkpoint is kept as a RECORDED snapshot, the live top and the ledger's active
    r2 = local.backup(req)
    assert r2.result.manifest.kind == "full" and r2.dropped == ()
    assert "left no checkpoint" in (r2.result.fallback_reason or "")
    assert r2.checkpoint is not None and r2.checkpoint_file == f"volume-{vol}.{r2.checkpoint}"
    assert g.chain() == [r2.checkpoint_file, *base]
    assert assert_coherent(d, vol, g.chain(), base[0]) == {r2.checkpoint: r2.checkpoint_file}

    # 3. a known change, then an incremental: it reads ~ only what the parent's checkpoint
    # file (the live top since) allocated
    g.stop_writers()
    g.check(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"])
    k_before = d / r2.checkpoint_file
    g.check(["sh", "-c", "dd if=/dev/urandom of=/data/blob bs=1M count=16 conv=fsync 2>/dev/null"])
    g.check(["sync"])
    changed = allocated(k_before)  # everything written since the checkpoint, in clusters
    assert changed >= 16 * MiB
    r3 = local.backup(req)
    m3 = r3.result.manifest
    assert m3.kind == "incremental" and r3.result.fallback_reason is None
    assert m3.parent_id == r2.result.manifest.backup_id
    read = r3.result.bytes_read
    print(
        f"incremental: read {read / MiB:.2f} MiB; changed since the checkpoint "
        f"{changed / MiB:.2f} MiB -> {read / changed:.3f}x; the guest wrote 16 MiB -> "
        f"{read / (16 * MiB):.3f}x"
    )
    assert 16 * MiB <= read <= 1.1 * changed
    assert r3.dropped == (r2.checkpoint,) and not k_before.exists()  # committed into base
    assert r3.checkpoint is not None and g.chain() == [r3.checkpoint_file, *base]
    assert assert_coherent(d, vol, g.chain(), base[0]) == {r3.checkpoint: r3.checkpoint_file}
    # the frozen layer was committed into the base, now r3's checkpoint's read-only backing
    # file: it holds the volume exactly as of the backup
    frozen_sha = image_sha256(d / base[0], "qcow2")
    out3 = _restore_raw(repo, m3.backup_id, bed_dir)
    assert _file_sha(out3) == frozen_sha

    # 4. another site: only a copy of the repository
    site = bed_dir / "site-b"
    shutil.copytree(repo.path, site / "repo")
    other = Repository.open(site / "repo")
    out_b = site / "restored.raw"
    restore(other, m3.backup_id, out_b)
    assert _file_sha(out_b) == frozen_sha
    # 5. a flipped byte in one chunk: verify and restore name it; no file left
    cid = sorted(m3.chunk_ids())[0]
    p = Path(other.chunk_path(cid))
    raw = bytearray(p.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    p.write_bytes(bytes(raw))
    with pytest.raises(CorruptChunk) as ei:
        other.verify(m3.backup_id)
    assert ei.value.chunk_id == cid
    with pytest.raises(CorruptChunk, match=cid):
        restore(other, m3.backup_id, site / "bad.raw")
    assert not (site / "bad.raw").exists()
    out3.unlink()
    shutil.rmtree(site)

    r6 = _kill_mid_read(g, local, repo, libvirt_host.uri, share.root, bed_dir, base, r3.checkpoint)

    # 7. repository filesystem full: clear error; the checkpoint it took is dropped again,
    # so the chain, the ledger and the earlier backups are untouched
    small = bed_dir / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], check=True)
    try:
        tiny = Repository.create(small / "repo")
        chain_before, ledger_before = g.chain(), ledger(d, vol)
        with pytest.raises(RepositoryFull) as full:
            local.backup(BackupRequest(g.uuid, vol, tiny.path, incremental=True))
        assert any("dropped" in n for n in getattr(full.value, "__notes__", [])), full.value
        assert g.chain() == chain_before and ledger(d, vol) == ledger_before
        assert_coherent(d, vol, g.chain(), base[0])
        assert tiny.manifests() == []
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)
    assert repo.verify(r6.result.manifest).chunks > 0

    # 8. a user deletes the kept checkpoint (owned delete: Cinder's chain back, the ledger
    # forgets it); the next incremental is a full read that names the deleted snapshot
    assert r6.checkpoint is not None
    gone = local.delete(vol, r6.checkpoint)
    assert gone.state is OperationState.SUCCEEDED and gone.result is not None, gone.error
    assert gone.result["kind"] == "active-commit" and g.chain() == base
    assert assert_coherent(d, vol, g.chain(), base[0]) == {}
    r8 = local.backup(req)
    assert r8.result.manifest.kind == "full" and r8.dropped == ()
    reason = r8.result.fallback_reason or ""
    assert r6.checkpoint in reason and "deleted" in reason, reason
    assert r8.result.chunks_reused > 0 and g.chain() == [r8.checkpoint_file, *base]
    assert_coherent(d, vol, g.chain(), base[0])


def _owned_op(local: LocalBackups, kind: OperationKind, snapshot_id: str) -> Any:
    """The owned operation (a checkpoint's take or delete) of ``snapshot_id``."""
    found = [
        o for o in local.journal.list_operations(kind=kind)
        if o.request.get("snapshot_id") == snapshot_id
    ]  # fmt: skip
    assert len(found) == 1, found
    return found[0]


def _kill_mid_read(
    g: Any,
    local: LocalBackups,
    repo: Repository,
    uri: str,
    root: Path,
    bed_dir: Path,
    base: list[str],
    kept: str | None,
) -> Any:
    """6. kill -9 mid-read: nothing published; the checkpoint the killed backup took is a
    recorded snapshot (the live top), never an unrecorded layer; recovery decides the
    operation without touching the chain; the next backup is incremental from the kept
    checkpoint and drops both older ones."""
    d, vol = Path(g.dir), g.disks[0].volume_id
    g.check(["sh", "-c", "dd if=/dev/urandom of=/data/blob2 bs=1M count=8 conv=fsync 2>/dev/null"])
    before_kill = g.chain()
    n_before = len(repo.manifests(vol))
    argv = [sys.executable, "-m", "tests.functional.hostagent.backup.runner", uri, g.uuid, vol,
            repo.path, str(bed_dir / "journal.sqlite"), str(root)]  # fmt: skip
    proc = subprocess.Popen(
        argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "reading", proc.stderr.read() if proc.stderr else line
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
    assert len(repo.manifests(vol)) == n_before
    mid = g.chain()
    assert mid[1:] == before_kill
    snaps = assert_coherent(d, vol, mid, base[0])
    killed = next(s for s, f in snaps.items() if f == mid[0])  # recorded, as any snapshot
    unfinished = [r for r in local.journal.unfinished() if r.operation.kind is OperationKind.BACKUP]
    assert len(unfinished) == 1
    decisions = local.recover()
    assert local.journal.get(unfinished[0].operation.id).state is OperationState.FAILED, decisions
    assert local.journal.unfinished() == []
    assert g.chain() == mid  # recovery never touches the chain
    assert_coherent(d, vol, mid, base[0])
    check_layers(d, mid, g)
    r6 = local.backup(BackupRequest(g.uuid, vol, repo.path, incremental=True))
    assert r6.result.manifest.kind == "incremental", r6.result.fallback_reason
    assert r6.result.bytes_read >= 8 * MiB
    assert set(r6.dropped) == {kept, killed}
    assert g.chain() == [r6.checkpoint_file, *base]
    assert assert_coherent(d, vol, g.chain(), base[0]) == {r6.checkpoint: r6.checkpoint_file}
    return r6
