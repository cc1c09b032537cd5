"""Retention rules, prune and GC together: what stays restorable, what is freed, what is
pinned by a running backup."""

from __future__ import annotations

import json
import os
import threading
import uuid
from pathlib import Path

import pytest

from hostagent.backup.repo import Manifest, Repository, RepositoryBusy
from hostagent.backup.repo.retention import RetentionPolicy, prune, select
from tests.unit.hostagent.backup.helpers import VOL, publish_backup

VOL2 = "1b1e5a1c-7d2f-4e3a-9c1b-2f4d6a8b0c12"


def _m(when: str) -> Manifest:
    return Manifest(str(uuid.uuid4()), VOL, 1, when, None, "full", (), 0, ())


def test_select_keep_last_and_daily_union() -> None:
    ms = [
        _m("2026-11-01T01:00:00+00:00"),
        _m("2026-11-01T23:00:00+00:00"),  # newest of Nov 1
        _m("2026-11-02T05:00:00+00:00"),
        _m("2026-11-02T06:00:00+00:00"),  # newest of Nov 2
        _m("2026-11-03T07:00:00+00:00"),
        _m("2026-11-03T08:00:00+00:00"),  # newest overall
    ]
    ids = [m.backup_id for m in ms]
    assert select(ms, RetentionPolicy(keep_last=2)) == {ids[4], ids[5]}
    assert select(ms, RetentionPolicy(keep_daily=2)) == {ids[3], ids[5]}
    assert select(ms, RetentionPolicy(keep_last=1, keep_daily=3)) == {ids[1], ids[3], ids[5]}
    # the newest is always kept; a day in another time zone counts in UTC
    assert ids[5] in select(ms, RetentionPolicy(keep_daily=1))
    tz = _m("2026-11-04T01:00:00+05:00")  # = Nov 3, 20:00 UTC
    assert select([*ms, tz], RetentionPolicy(keep_daily=1)) == {tz.backup_id}
    with pytest.raises(ValueError):
        RetentionPolicy()
    with pytest.raises(ValueError):
        RetentionPolicy(keep_last=-1, keep_daily=2)


def test_prune_deletes_per_volume_and_gc_frees_only_their_chunks(tmp_path: Path) -> None:
    repo = Repository.create(tmp_path / "repo")
    shared = b"shared by every backup " * 100
    a = [
        publish_backup(repo, VOL, f"2026-11-0{i}T10:00:00+00:00", shared + bytes([i]))
        for i in (1, 2, 3)
    ]
    b = [publish_backup(repo, VOL2, f"2026-11-0{i}T10:00:00+00:00", b"v2 %d" % i) for i in (1, 2)]
    dry = prune(repo, RetentionPolicy(keep_last=1), dry_run=True)
    assert set(dry.deleted) == {a[0].backup_id, a[1].backup_id, b[0].backup_id}
    assert len(repo.manifests()) == 5 and dry.gc is None
    res = prune(repo, RetentionPolicy(keep_last=1), volume_id=VOL, grace=0)
    assert set(res.deleted) == {a[0].backup_id, a[1].backup_id}
    assert res.gc is not None and res.gc.removed == 2
    assert [m.backup_id for m in repo.manifests(VOL)] == [a[2].backup_id]
    assert len(repo.manifests(VOL2)) == 2  # other volume untouched
    for m in (a[2], *b):
        repo.verify(m)
    for m in a[:2]:
        assert not os.path.exists(repo.chunk_path(next(iter(m.chunk_ids()))))


def test_prune_spares_the_parent_of_a_running_backup_and_gc_waits_for_it(tmp_path: Path) -> None:
    repo = Repository.create(tmp_path / "repo")
    old = publish_backup(repo, VOL, "2026-11-01T10:00:00+00:00", b"old")
    new = publish_backup(repo, VOL, "2026-11-02T10:00:00+00:00", b"new")
    started = threading.Event()
    release = threading.Event()

    def running_incremental() -> None:
        with repo.session(str(uuid.uuid4()), VOL, parent_id=old.backup_id):
            started.set()
            release.wait(10)

    t = threading.Thread(target=running_incremental)
    t.start()
    try:
        assert started.wait(10)
        marker = next((Path(repo.path) / "inprogress").iterdir())
        assert json.loads(marker.read_text())["parent_id"] == old.backup_id
        with pytest.raises(RepositoryBusy):
            prune(repo, RetentionPolicy(keep_last=1), grace=0)
        assert [m.backup_id for m in repo.manifests(VOL)] == [old.backup_id, new.backup_id]
    finally:
        release.set()
        t.join()
    res = prune(repo, RetentionPolicy(keep_last=1), grace=0)
    assert res.deleted == (old.backup_id,) and res.gc is not None and res.gc.removed == 1
