"""A prune and a GC stop between manifests / chunk files when cancelled: what was deleted
stays deleted, nothing is half deleted, and the progress they report is what they did."""

from __future__ import annotations

import os
from pathlib import Path

from hostagent.backup.repo import Repository
from hostagent.backup.repo.retention import RetentionPolicy, prune
from tests.unit.hostagent.backup.helpers import VOL, publish_backup


def _repo(tmp_path: Path, n: int) -> tuple[Repository, list[str]]:
    repo = Repository.create(tmp_path / "repo")
    ids = [
        publish_backup(repo, VOL, f"2026-11-0{i + 1}T00:00:00+00:00", bytes([i]) * 4096).backup_id
        for i in range(n)
    ]
    return repo, ids


def _chunk_count(repo: Repository) -> int:
    return sum(len(files) for _, _, files in os.walk(os.path.join(repo.path, "chunks")))


def test_cancel_between_manifests_keeps_what_it_did_and_skips_gc(tmp_path: Path) -> None:
    repo, ids = _repo(tmp_path, 4)
    seen: list[tuple[str, int, int]] = []
    res = prune(
        repo,
        RetentionPolicy(keep_last=1),
        grace=0.0,
        progress=lambda phase, done, total: seen.append((phase, done, total)),
        cancel=lambda: len(seen) >= 2,  # two manifests judged, then cancelled
    )
    assert res.cancelled and res.gc is None
    # manifests are judged oldest first as listed; at most the two judged could be deleted
    assert len(res.deleted) + len(res.kept) + len(res.pinned) == 2
    left = {m.backup_id for m in repo.manifests(VOL)}
    assert left == set(ids) - set(res.deleted)
    assert ids[-1] in left  # the newest is never deleted
    assert seen == [("retention", 1, 4), ("retention", 2, 4)]
    assert _chunk_count(repo) == 4  # no GC ran: the deleted backups' chunks wait


def test_gc_progress_then_cancel_stops_between_chunks(tmp_path: Path) -> None:
    repo, ids = _repo(tmp_path, 3)
    for bid in ids[:2]:
        repo.delete(VOL, bid)
    calls = [0]

    def cancel() -> bool:
        calls[0] += 1
        return calls[0] > 1  # the first chunk file is judged, then cancelled

    res = repo.gc(grace=0.0, cancel=cancel)
    assert res.cancelled and res.removed <= 1
    assert _chunk_count(repo) == 3 - res.removed
    seen: list[tuple[int, int]] = []
    full = repo.gc(grace=0.0, progress=lambda d, t: seen.append((d, t)))
    assert not full.cancelled and full.removed + res.removed == 2
    assert seen[0] == (0, 3 - res.removed) and seen[-1] == (3 - res.removed,) * 2
    assert _chunk_count(repo) == 1
    assert repo.verify(ids[2]).chunks == 1  # the kept backup is whole


def test_uncancelled_prune_reports_both_phases(tmp_path: Path) -> None:
    repo, ids = _repo(tmp_path, 3)
    phases: list[str] = []
    res = prune(
        repo,
        RetentionPolicy(keep_last=1),
        grace=0.0,
        progress=lambda phase, done, total: phases.append(phase),
        cancel=lambda: False,
    )
    assert not res.cancelled and sorted(res.deleted) == sorted(ids[:2])
    assert res.gc is not None and res.gc.removed == 2
    assert phases[:3] == ["retention"] * 3 and phases[3:] and set(phases[3:]) == {"gc"}
