"""Retention: which backups to keep (``keep_last``, ``keep_daily``), prune, then GC.

Every manifest is logically full, so deleting any backup never breaks another's restore;
only chunks no remaining manifest references become garbage. Two backups are never
deleted: a volume's newest (its checkpoint drives the next incremental) and any backup a
running incremental names as its parent in its in-progress marker. Chunk removal is
:meth:`Repository.gc`'s job and follows its concurrency rule (repository lock, markers,
mtimes): a prune can run while backups run.
"""

from __future__ import annotations

import datetime
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hostagent.backup.repo.format import Manifest
from hostagent.backup.repo.manifest_stream import ManifestHeader
from hostagent.backup.repo.repository import GcResult, Repository

#: What retention judges a backup by (its header; a whole manifest has the same fields).
Judged = Manifest | ManifestHeader


@dataclass(frozen=True)
class RetentionPolicy:
    """``keep_last``: the N newest backups; ``keep_daily``: the newest backup of each of
    the D most recent days (UTC) that have backups. A backup kept by either rule stays."""

    keep_last: int = 0
    keep_daily: int = 0

    def __post_init__(self) -> None:
        if self.keep_last < 0 or self.keep_daily < 0:
            raise ValueError("retention counts cannot be negative")
        if self.keep_last == 0 and self.keep_daily == 0:
            raise ValueError("a retention policy must keep something (keep_last or keep_daily)")


@dataclass(frozen=True)
class PruneResult:
    kept: tuple[str, ...]
    deleted: tuple[str, ...]
    pinned: tuple[str, ...]  # kept only because a running backup builds on them
    gc: GcResult | None
    #: stopped by ``cancel``: ``deleted`` are gone, the manifests not reached were not judged.
    cancelled: bool = False


def _day(m: Judged) -> datetime.date:
    t = datetime.datetime.fromisoformat(m.created_at)
    if t.tzinfo is None:
        t = t.replace(tzinfo=datetime.UTC)
    return t.astimezone(datetime.UTC).date()


def select(manifests: Sequence[Judged], policy: RetentionPolicy) -> set[str]:
    """Backup ids to keep among one volume's ``manifests`` (any order)."""
    newest_first = sorted(manifests, key=lambda m: (m.created_at, m.backup_id), reverse=True)
    keep = {m.backup_id for m in newest_first[: max(1, policy.keep_last)]}
    days: list[datetime.date] = []
    for m in newest_first:
        d = _day(m)
        if d in days:
            continue
        if len(days) >= policy.keep_daily:
            break
        days.append(d)
        keep.add(m.backup_id)
    return keep


def prune(
    repo: Repository,
    policy: RetentionPolicy,
    *,
    volume_id: str | None = None,
    dry_run: bool = False,
    gc: bool = True,
    grace: float = 3600.0,
    wait: float = 0.0,
    progress: Callable[[str, int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> PruneResult:
    """Delete the backups ``policy`` does not keep (per volume), then collect garbage.

    ``dry_run`` only reports. GC raises :class:`RepositoryBusy` after ``wait`` seconds if a
    backup holds the repository lock; the deletions stand and the next GC frees the chunks.
    ``progress(phase, done, total)`` reports manifests judged (phase ``retention``), then
    chunk files scanned (``gc``). ``cancel`` is checked before each manifest and each chunk:
    a cancelled prune stops between them (what it deleted stays deleted, nothing is half
    deleted) and says so in ``cancelled``.
    """
    pinned_ids = {str(doc.get("parent_id")) for doc in repo.running() if doc.get("parent_id")}
    by_volume: dict[str, list[ManifestHeader]] = defaultdict(list)
    for m in repo.headers(volume_id):  # headers only: never every extent at once
        by_volume[m.volume_id].append(m)
    kept: list[str] = []
    deleted: list[str] = []
    pinned: list[str] = []
    total = sum(len(ms) for ms in by_volume.values())
    judged = 0
    for vol, ms in sorted(by_volume.items()):
        keep = select(ms, policy)
        for m in ms:
            if cancel is not None and cancel():
                return PruneResult(tuple(kept), tuple(deleted), tuple(pinned), None, True)
            judged += 1
            if progress is not None:
                progress("retention", judged, total)
            if m.backup_id in keep:
                kept.append(m.backup_id)
            elif m.backup_id in pinned_ids:
                pinned.append(m.backup_id)
            else:
                if not dry_run:
                    repo.delete(vol, m.backup_id)
                deleted.append(m.backup_id)
    collected = None
    if gc and not dry_run:

        def scanned(done: int, total: int) -> None:
            if progress is not None:
                progress("gc", done, total)

        collected = repo.gc(grace=grace, wait=wait, progress=scanned, cancel=cancel)
    stopped = collected is not None and collected.cancelled
    return PruneResult(tuple(kept), tuple(deleted), tuple(pinned), collected, stopped)
