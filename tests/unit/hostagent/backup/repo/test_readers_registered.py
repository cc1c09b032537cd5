"""A restore or verify registers like a running backup: GC waits, prune keeps its manifest.

Before, only backups held the repository's shared lock and an in-progress marker, so a
prune's GC racing a restore could remove the chunks the restore was about to read.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hostagent.backup.repo import (
    MissingChunk,
    Repository,
    RepositoryBusy,
    RetentionPolicy,
    backup_full,
    prune,
    restore,
)
from tests.unit.hostagent.backup.helpers import VOL, MiB, file_sha, guest_sha, make_base


def _bed(tmp_path: Path) -> tuple[Repository, str, str]:
    """Two full backups of one volume; the OLDER one is the one read."""
    share = tmp_path / "share"
    share.mkdir()
    base = make_base(share, size=8 * MiB)
    repo = Repository.create(tmp_path / "repo")
    bid = backup_full(base, "qcow2", [share], repo, VOL).manifest.backup_id
    backup_full(base, "qcow2", [share], repo, VOL)
    return repo, bid, guest_sha(base, tmp_path)


def test_gc_waits_for_a_restore_and_prune_keeps_what_it_reads(tmp_path: Path) -> None:
    repo, bid, sha = _bed(tmp_path)
    seen: list[str] = []

    def progress(done: int, total: int) -> None:
        if seen:
            return
        seen.append("mid-restore")
        assert any(d.get("parent_id") == bid for d in repo.running())  # registered
        kept = prune(repo, RetentionPolicy(keep_last=1), volume_id=VOL, gc=False)
        assert bid in kept.pinned and bid not in kept.deleted  # keep_last=1 would drop it
        repo.delete(VOL, bid)  # an explicit delete races the restore anyway...
        with pytest.raises(RepositoryBusy):  # ...but GC cannot run while it reads
            repo.gc(grace=0.0)

    out = tmp_path / "out.raw"
    restore(repo, bid, out, progress=progress)
    assert seen and file_sha(out) == sha
    assert os.listdir(Path(repo.path) / "inprogress") == []  # released at the end
    # negative control: with no reader registered, GC removes chunks no manifest names
    for other in repo.manifests():  # the second backup shares every chunk (dedup)
        repo.delete(VOL, other.backup_id)
    assert repo.gc(grace=0.0).removed > 0


def test_verify_registers_too(tmp_path: Path) -> None:
    repo, bid, _sha = _bed(tmp_path)
    real = repo.read_chunk_into
    calls: list[int] = []

    def reading(cid: str, out: bytearray) -> int:
        if not calls:
            with pytest.raises(RepositoryBusy):
                repo.gc(grace=0.0)
        calls.append(1)
        return real(cid, out)

    repo.read_chunk_into = reading  # type: ignore[method-assign]
    assert repo.verify(bid).chunks == len(calls) > 0
    repo.read_chunk_into = real  # type: ignore[method-assign]
    m = repo.find(bid)
    for other in repo.manifests():
        repo.delete(VOL, other.backup_id)
    assert repo.gc(grace=0.0).removed > 0  # negative control: nobody reads, the chunks go
    with pytest.raises(MissingChunk):
        repo.verify(m)
