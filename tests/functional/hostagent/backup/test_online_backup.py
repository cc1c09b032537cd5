"""Online backups of a running guest's volume, one guest per share kind (plain directory and
GlusterFS FUSE mount) through every step.

What must hold: a full backup taken while the guest writes restores to a clean filesystem
holding a prefix of the writer's records, and leaves the live chain as before; a
checkpointed incremental reads about what changed and restores the volume as it was; the
repository alone restores on "another site"; a flipped byte fails verify/restore naming
the chunk; kill -9 mid-backup publishes nothing and recovery puts the chain back; a full
repository filesystem is a clear error that loses nothing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

import libvirt_ops as lo
from hostagent.backup.online import (
    BackupRequest,
    backup_volume,
    is_backup_overlay,
    recover_backup,
    release_checkpoint,
)
from hostagent.backup.repo import CorruptChunk, Repository, RepositoryFull, restore
from hostagent.journal.model import OperationKind, OperationState
from hostagent.journal.store import Journal
from testbed.disks import fsck_clean, image_sha256, read_guest_file
from testbed.guest import GuestFactory
from testbed.layers import allocated
from testbed.records import parse_records
from testbed.service import REPO

pytestmark = [pytest.mark.functional, pytest.mark.timeout(900)]
MiB = 1 << 20


def _restore_raw(repo: Repository, backup_id: str, d: Path) -> Path:
    out = d / f"restored-{uuid.uuid4().hex[:8]}.raw"
    restore(repo, backup_id, out)
    return out


def test_online_backup_lifecycle(
    guest_factory: GuestFactory, share: Any, libvirt_host: Any, bed_dir: Path
) -> None:
    g = guest_factory(ndisks=1, size_mib=256, share=share)  # on each share kind
    conn: lo.Connection = libvirt_host.connection
    vol = g.disks[0].volume_id
    repo = Repository.create(bed_dir / "repo")
    journal = Journal(str(bed_dir / "journal.sqlite"))
    req = BackupRequest(g.uuid, vol, repo.path, incremental=True)
    base = g.chain()
    assert len(base) == 1

    # 1. full backup while the guest writes; no checkpoint: the chain is exactly as before
    g.start_writers(interval_ms=10)
    g.check(["sh", "-c", "sleep 1"])
    r1 = backup_volume(conn, journal, BackupRequest(g.uuid, vol, repo.path))
    assert g.chain() == base and r1.checkpoint is None
    assert not [n for n in os.listdir(g.dir) if is_backup_overlay(n, vol)]
    assert r1.result.manifest.kind == "full" and r1.quiesced
    op1 = journal.get(uuid.UUID(r1.operation_id))
    assert op1.state is OperationState.SUCCEEDED
    assert op1.progress.end == op1.progress.cur == r1.result.bytes_read > 0
    assert [s.name for s in journal.steps(op1.id)] == ["snapshot", "read", "merge", "remove"]
    out1 = _restore_raw(repo, r1.result.manifest.backup_id, bed_dir)
    fsck = fsck_clean(out1, "raw")
    assert fsck.ok and not fsck.needs_recovery, fsck.output
    log = parse_records(read_guest_file(out1, "raw", "/records"))
    assert log.clean and log.count > 0
    assert log.is_prefix_of(g.records("/data"))
    out1.unlink()

    # 2. checkpointed backup: full read (says why), checkpoint overlay left on top
    r2 = backup_volume(conn, journal, req)
    assert r2.result.manifest.kind == "full"
    assert "left no checkpoint" in (r2.result.fallback_reason or "")
    assert r2.checkpoint is not None and g.chain() == [r2.checkpoint, *base]
    info = Path(g.dir) / f"volume-{vol}.info"
    assert not info.exists() or "qsnap-bk" not in info.read_text()

    # 3. a known change, then an incremental: reads ~ only that
    g.stop_writers()
    g.check(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"])
    k_before = Path(g.dir) / r2.checkpoint
    g.check(["sh", "-c", "dd if=/dev/urandom of=/data/blob bs=1M count=16 conv=fsync 2>/dev/null"])
    g.check(["sync"])
    changed = allocated(k_before)  # everything written since the checkpoint, in clusters
    assert changed >= 16 * MiB
    r3 = backup_volume(conn, journal, req)
    m3 = r3.result.manifest
    assert m3.kind == "incremental" and r3.result.fallback_reason is None
    assert not k_before.exists()  # the old checkpoint was merged down and removed
    read = r3.result.bytes_read
    print(
        f"incremental: read {read / MiB:.2f} MiB; changed since the checkpoint "
        f"{changed / MiB:.2f} MiB -> {read / changed:.3f}x; the guest wrote 16 MiB -> "
        f"{read / (16 * MiB):.3f}x"
    )
    assert 16 * MiB <= read <= 1.1 * changed
    assert r3.checkpoint is not None and g.chain() == [r3.checkpoint, *base]
    # the boundary (now a read-only backing file) holds the volume as of the backup
    frozen_sha = image_sha256(Path(g.dir) / base[0], "qcow2")
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

    # 6. kill -9 mid-backup: nothing published, recovery puts the chain back
    g.check(["sh", "-c", "dd if=/dev/urandom of=/data/blob2 bs=1M count=8 conv=fsync 2>/dev/null"])
    before_kill = g.chain()
    n_before = len(repo.manifests(vol))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.functional.hostagent.backup.runner",
            libvirt_host.uri,
            g.uuid,
            vol,
            repo.path,
            str(bed_dir / "journal.sqlite"),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
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
    assert len(mid) == len(before_kill) + 1 and is_backup_overlay(mid[0], vol)
    unfinished = [r for r in journal.unfinished() if r.operation.kind is OperationKind.BACKUP]
    assert len(unfinished) == 1
    decision = recover_backup(journal, conn, unfinished[0])
    assert g.chain() == before_kill, decision
    assert not (Path(g.dir) / mid[0]).exists()
    assert journal.get(unfinished[0].operation.id).state is OperationState.FAILED
    r6 = backup_volume(conn, journal, req)
    assert r6.result.manifest.kind == "incremental"
    assert r6.result.bytes_read >= 8 * MiB

    # 7. repository filesystem full: clear error, chain and earlier backups untouched
    small = bed_dir / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], check=True)
    try:
        tiny = Repository.create(small / "repo")
        chain_before = g.chain()
        with pytest.raises(RepositoryFull):
            backup_volume(conn, journal, BackupRequest(g.uuid, vol, tiny.path, incremental=True))
        assert g.chain() == chain_before
        assert tiny.manifests() == []
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)
    assert repo.verify(r6.result.manifest).chunks > 0

    # 8. releasing the checkpoint gives Cinder its chain back; the next backup says why
    assert release_checkpoint(conn, g.uuid, vol) == r6.checkpoint
    assert g.chain() == base
    r8 = backup_volume(
        conn,
        journal,
        BackupRequest(g.uuid, vol, repo.path, incremental=True, keep_checkpoint=False),
    )
    assert r8.result.manifest.kind == "full" and "no longer the live top" in (
        r8.result.fallback_reason or ""
    )
    assert r8.result.chunks_reused > 0 and g.chain() == base


def _file_sha(p: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(p, "rb") as f:
        while b := f.read(4 * MiB):
            h.update(b)
    return h.hexdigest()
