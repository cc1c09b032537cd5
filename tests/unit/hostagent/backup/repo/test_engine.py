"""Backup engine against real qcow2 chains: restores compared with ``qemu-img convert``."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hostagent.backup.repo import (
    BackupCancelled,
    CorruptChunk,
    Repository,
    RepositoryFull,
    backup_full,
    backup_incremental,
    restore,
)
from tests.unit.hostagent.backup.helpers import (
    VOL,
    MiB,
    file_sha,
    guest_sha,
    make_base,
    make_overlay,
    run,
    write_random,
    write_zero,
)

CHANGES = [3 * MiB, 10 * MiB + 4096 * 16, 17 * MiB, 30 * MiB, 41 * MiB, 55 * MiB, 62 * MiB]


@pytest.fixture
def src(tmp_path: Path) -> Path:
    d = tmp_path / "share"
    d.mkdir()
    return d


def _full(base: Path, repo: Repository):  # type: ignore[no-untyped-def]
    return backup_full(base, "qcow2", [base.parent], repo, VOL)


def test_full_restore_equals_qemu_img_and_is_sparse(src: Path, tmp_path: Path) -> None:
    base = make_base(src)
    repo = Repository.create(tmp_path / "repo")
    seen: list[tuple[int, int]] = []
    res = backup_full(base, "qcow2", [src], repo, VOL, progress=lambda d, t: seen.append((d, t)))
    data = res.manifest.data_bytes()
    assert data == 22 * MiB  # 1 MiB every 3 MiB of 64
    assert res.bytes_read == data
    assert seen[-1] == (data, data)
    assert res.manifest.kind == "full" and res.manifest.parent_id is None
    assert res.manifest.source_chain[0].name == base.name
    assert res.chunks_new == 22 and res.chunks_reused == 0
    out = tmp_path / "restored.raw"
    rr = restore(repo, res.manifest.backup_id, out)
    assert file_sha(out) == guest_sha(base, tmp_path)
    assert out.stat().st_size == 64 * MiB
    assert out.stat().st_blocks * 512 <= data + MiB  # holes never written
    assert rr.bytes_written == data
    q = tmp_path / "restored.qcow2"
    restore(repo, res.manifest.backup_id, q, fmt="qcow2")
    assert guest_sha(q, tmp_path) == guest_sha(base, tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left


def test_second_full_backup_dedups_everything(src: Path, tmp_path: Path) -> None:
    base = make_base(src)
    repo = Repository.create(tmp_path / "repo")
    first = _full(base, repo)
    second = _full(base, repo)
    assert second.chunks_new == 0 and second.chunks_reused == first.chunks_new
    assert second.manifest.extents == first.manifest.extents


def test_incremental_reads_only_changes_and_restores_the_overlay_view(
    src: Path, tmp_path: Path
) -> None:
    base = make_base(src)
    repo = Repository.create(tmp_path / "repo")
    parent = _full(base, repo).manifest
    ov = make_overlay(base, "ov1")
    for i, off in enumerate(CHANGES):
        write_random(ov, off, MiB, seed=100 + i)
    write_zero(ov, 6 * MiB, MiB)  # zeroes a data extent of the base
    changed = (len(CHANGES) + 1) * MiB
    res = backup_incremental(ov, "qcow2", [src], repo, VOL, parent, base.name)
    assert res.fallback_reason is None
    assert res.manifest.kind == "incremental" and res.manifest.parent_id == parent.backup_id
    assert 0 < res.bytes_read <= 1.1 * changed
    assert res.manifest.read_bytes == res.bytes_read
    out = tmp_path / "inc.raw"
    restore(repo, res.manifest.backup_id, out)
    assert file_sha(out) == guest_sha(ov, tmp_path)
    # the parent still restores to the old view
    old = tmp_path / "old.raw"
    restore(repo, parent.backup_id, old)
    assert file_sha(old) == guest_sha(base, tmp_path)
    # by depth, a second incremental on a checkpoint above: reads only the new change
    ov2 = make_overlay(ov, "ov2")
    write_random(ov2, 20 * MiB, MiB, seed=9)
    res2 = backup_incremental(ov2, "qcow2", [src], repo, VOL, res.manifest, 1)
    assert res2.bytes_read == MiB
    out2 = tmp_path / "inc2.raw"
    restore(repo, res2.manifest.backup_id, out2)
    assert file_sha(out2) == guest_sha(ov2, tmp_path)


def test_incremental_falls_back_to_full_read_when_boundary_is_gone(
    src: Path, tmp_path: Path
) -> None:
    base = make_base(src)
    repo = Repository.create(tmp_path / "repo")
    parent = _full(base, repo).manifest
    ov = make_overlay(base, "ov1")
    write_random(ov, 5 * MiB, MiB, seed=5)
    run("qemu-img", "commit", "-q", "-f", "qcow2", str(ov))  # merged across the boundary
    res = backup_incremental(base, "qcow2", [src], repo, VOL, parent, ov.name)
    assert res.fallback_reason is not None and ov.name in res.fallback_reason
    assert res.manifest.kind == "full" and res.manifest.parent_id == parent.backup_id
    assert res.bytes_read == res.manifest.data_bytes()
    assert res.chunks_new >= 1 and res.chunks_reused >= 20  # dedup against the parent
    out = tmp_path / "fb.raw"
    restore(repo, res.manifest.backup_id, out)
    assert file_sha(out) == guest_sha(base, tmp_path)


def test_incremental_refuses_a_boundary_the_parent_did_not_read(src: Path, tmp_path: Path) -> None:
    base = make_base(src)
    repo = Repository.create(tmp_path / "repo")
    ov = make_overlay(base, "ov1")
    parent = backup_full(ov, "qcow2", [src], repo, VOL).manifest  # parent read ov, not base
    write_random(ov, 5 * MiB, MiB, seed=5)
    res = backup_incremental(ov, "qcow2", [src], repo, VOL, parent, base.name)
    assert res.fallback_reason is not None
    out = tmp_path / "x.raw"
    restore(repo, res.manifest.backup_id, out)
    assert file_sha(out) == guest_sha(ov, tmp_path)


def test_restore_from_a_copy_of_the_repository_at_another_site(src: Path, tmp_path: Path) -> None:
    base = make_base(src)
    repo = Repository.create(tmp_path / "repo")
    parent = _full(base, repo).manifest
    ov = make_overlay(base, "ov1")
    write_random(ov, 8 * MiB, 2 * MiB, seed=8)
    inc = backup_incremental(ov, "qcow2", [src], repo, VOL, parent, 1).manifest
    site = tmp_path / "site2"
    site.mkdir()
    shutil.copytree(repo.path, site / "repo")
    shutil.rmtree(repo.path)
    other = Repository.open(site / "repo")
    out = site / "restored.qcow2"
    restore(other, inc.backup_id, out, fmt="qcow2")
    assert guest_sha(out, tmp_path) == guest_sha(ov, tmp_path)


def test_flipped_byte_in_a_chunk_fails_verify_and_restore_naming_it(
    src: Path, tmp_path: Path
) -> None:
    base = make_base(src)
    repo = Repository.create(tmp_path / "repo")
    m = _full(base, repo).manifest
    assert repo.verify(m.backup_id).chunks == 22
    victim = m.extents[[e.kind for e in m.extents].index("data", 0) + 4 * 0].chunk
    assert victim is not None
    path = Path(repo.chunk_path(victim))
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptChunk) as err:
        repo.verify(m)
    assert err.value.chunk_id == victim and err.value.path == str(path)
    assert victim in str(err.value)
    out = tmp_path / "r.raw"
    with pytest.raises(CorruptChunk, match=victim):
        restore(repo, m.backup_id, out)
    assert not out.exists()


def test_cancel_publishes_nothing(src: Path, tmp_path: Path) -> None:
    base = make_base(src)
    repo = Repository.create(tmp_path / "repo")
    calls = {"n": 0}

    def cancel() -> bool:
        calls["n"] += 1
        return calls["n"] > 3

    with pytest.raises(BackupCancelled):
        backup_full(base, "qcow2", [src], repo, VOL, cancel=cancel)
    assert repo.manifests() == []
    assert os.listdir(Path(repo.path) / "inprogress") == []


_KILLED = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from hostagent.backup.repo import Repository, backup_full
    repo = Repository.open(sys.argv[1])
    flag = Path(sys.argv[3])
    def progress(done, total):
        if done >= 4 * (1 << 20):
            flag.write_text("x")
            time.sleep(60)
    backup_full(sys.argv[2], "qcow2", [str(Path(sys.argv[2]).parent)], repo, sys.argv[4],
                progress=progress)
    """
)


def test_backup_killed_midway_leaves_no_manifest_and_next_backup_works(
    src: Path, tmp_path: Path
) -> None:
    base = make_base(src)
    repo = Repository.create(tmp_path / "repo")
    flag = tmp_path / "flag"
    root = Path(__file__).resolve().parents[5]
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED, repo.path, str(base), str(flag), VOL], cwd=root
    )
    try:
        for _ in range(600):
            if flag.exists() or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert flag.exists(), "child never reached the middle of the backup"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert repo.manifests() == []
    assert len(os.listdir(Path(repo.path) / "inprogress")) == 1  # dead marker left
    res = _full(base, repo)
    assert [m.backup_id for m in repo.manifests()] == [res.manifest.backup_id]
    out = tmp_path / "r.raw"
    restore(repo, res.manifest.backup_id, out)
    assert file_sha(out) == guest_sha(base, tmp_path)
    gc = repo.gc(grace=0)  # the dead marker no longer protects anything
    assert gc.removed == 0  # every chunk the killed run wrote is reused by the new backup
    assert os.listdir(Path(repo.path) / "inprogress") == []


@pytest.fixture
def small_fs(tmp_path: Path):  # type: ignore[no-untyped-def]
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True
    )
    if r.returncode:
        pytest.skip(f"cannot mount tmpfs: {r.stderr!r}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_disk_full_raises_repository_full_and_publishes_nothing(
    src: Path, tmp_path: Path, small_fs: Path
) -> None:
    base = make_base(src, every=1, seed=3)  # 64 MiB of data, half random: cannot fit 8 MiB
    before = file_sha(base)
    repo = Repository.create(small_fs / "repo")
    with pytest.raises(RepositoryFull):
        _full(base, repo)
    assert repo.manifests() == []
    assert os.listdir(Path(repo.path) / "inprogress") == []
    assert file_sha(base) == before
    leftovers = [n for _, _, names in os.walk(repo.path) for n in names if n.startswith(".")]
    assert leftovers == []
    assert repo.gc(grace=0).removed > 0  # space comes back
