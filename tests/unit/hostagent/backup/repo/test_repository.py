"""The repository on its own: layout, modes, strict parsing, chunk store and the GC rule."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import time
from pathlib import Path

import pytest
import zstandard

from hostagent.backup.repo import (
    BackupNotFound,
    FormatError,
    Manifest,
    RepoConfig,
    Repository,
    RepositoryBusy,
    backup_full,
)
from tests.unit.hostagent.backup.helpers import VOL, make_base

OLD = time.time() - 10 * 86400


def _chunk(repo: Repository, data: bytes) -> str:
    cid = hashlib.sha256(data).hexdigest()
    repo.put_chunk(cid, zstandard.ZstdCompressor().compress(data))
    return cid


def _age(path: str) -> None:
    os.utime(path, (OLD, OLD))


def test_create_lays_out_config_with_group_modes(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        repo = Repository.create(tmp_path / "repo")
        cid = _chunk(repo, b"hello")
    finally:
        os.umask(old)
    cfg = json.loads((tmp_path / "repo" / "config.json").read_text())
    assert cfg == {
        "format": "qsnap-repo",
        "version": 1,
        "chunk_size": 4 << 20,
        "hash": "sha256",
        "compression": "zstd",
        "zstd_level": 1,
    }
    assert stat.S_IMODE(os.stat(repo.path).st_mode) == 0o770
    assert stat.S_IMODE(os.stat(repo.path + "/config.json").st_mode) == 0o660
    path = repo.chunk_path(cid)
    assert path.endswith(f"chunks/{cid[:2]}/{cid[2:4]}/{cid}")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o770
    assert Repository.open(repo.path).config == RepoConfig()
    with pytest.raises(FormatError):
        Repository.create(repo.path, RepoConfig(chunk_size=1 << 20))


def test_open_rejects_non_repositories_and_unknown_versions(tmp_path: Path) -> None:
    with pytest.raises(FormatError):
        Repository.open(tmp_path)
    repo = Repository.create(tmp_path / "r")
    doc = RepoConfig().to_json() | {"version": 2}
    (Path(repo.path) / "config.json").write_text(json.dumps(doc))
    with pytest.raises(FormatError, match="version"):
        Repository.open(repo.path)


def test_chunks_roundtrip_and_existing_chunk_is_not_rewritten(tmp_path: Path) -> None:
    repo = Repository.create(tmp_path / "repo")
    cid = _chunk(repo, b"x" * 100000)
    assert repo.read_chunk(cid) == b"x" * 100000
    ino = os.stat(repo.chunk_path(cid)).st_ino
    _age(repo.chunk_path(cid))
    assert repo.reuse_chunk(cid) is True  # a backup reusing it bumps its mtime
    st = os.stat(repo.chunk_path(cid))
    assert st.st_ino == ino and st.st_mtime > OLD + 86400
    assert repo.reuse_chunk("0" * 64) is False
    with pytest.raises(FormatError):
        repo.chunk_path("../../etc/passwd")


def test_sync_chunk_dirs_syncs_only_dirs_written_since_the_last_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hostagent.backup.repo import repository as repo_mod

    synced: list[str] = []
    monkeypatch.setattr(repo_mod, "fsync_dir", synced.append)
    repo = Repository.create(tmp_path / "repo")
    a = _chunk(repo, b"a" * 1000)
    synced.clear()  # mkdir syncs parents itself
    repo.sync_chunk_dirs()
    assert synced == [os.path.dirname(repo.chunk_path(a))]
    synced.clear()
    repo.sync_chunk_dirs()
    assert synced == []  # a long-lived handle does not re-sync what it already made durable
    b = _chunk(repo, b"b" * 1000)
    synced.clear()
    repo.sync_chunk_dirs()
    assert synced == [os.path.dirname(repo.chunk_path(b))]


def _manifest_doc(**over: object) -> bytes:
    doc: dict[str, object] = {
        "format": "qsnap-manifest",
        "version": 1,
        "backup_id": "11111111-2222-4333-8444-555555555555",
        "volume_id": VOL,
        "virtual_size": 8 << 20,
        "created_at": "2024-01-01T00:00:00+00:00",
        "parent_id": None,
        "kind": "full",
        "source_chain": [{"name": f"volume-{VOL}", "format": "qcow2"}],
        "read_bytes": 1 << 20,
        "fallback_reason": None,
        "extents": [[0, 1 << 20, "data", "a" * 64, 0], [1 << 20, 7 << 20, "zero"]],
    }
    doc.update(over)
    return json.dumps(doc).encode()


def test_manifest_roundtrip_and_strict_parsing() -> None:
    m = Manifest.loads(_manifest_doc())
    assert Manifest.loads(m.dumps()) == m
    assert m.chunk_ids() == {"a" * 64} and m.data_bytes() == 1 << 20
    bad: list[dict[str, object]] = [
        {"backup_id": "../../x"},
        {"volume_id": "VOL"},
        {"extents": [[0, 2 << 20, "zero"], [1 << 20, 1 << 20, "zero"]]},  # overlap
        {"extents": [[0, 9 << 20, "zero"]]},  # past the end
        {"extents": [[0, 1 << 20, "data", "../x", 0]]},
        {"version": 2},
        {"kind": "differential"},
    ]
    for over in bad:
        with pytest.raises(FormatError):
            Manifest.loads(_manifest_doc(**over))


def test_find_list_delete(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    base = make_base(share, size=16 << 20)
    repo = Repository.create(tmp_path / "repo")
    a = backup_full(base, "qcow2", [share], repo, VOL).manifest
    b = backup_full(base, "qcow2", [share], repo, VOL).manifest
    assert [m.backup_id for m in repo.manifests(VOL)] == [a.backup_id, b.backup_id]
    assert repo.find(b.backup_id) == b
    repo.delete(VOL, a.backup_id)
    with pytest.raises(BackupNotFound):
        repo.find(a.backup_id)
    assert [m.backup_id for m in repo.manifests()] == [b.backup_id]


def test_gc_removes_only_unreferenced_chunks(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    base = make_base(share, size=16 << 20)
    repo = Repository.create(tmp_path / "repo")
    m = backup_full(base, "qcow2", [share], repo, VOL).manifest
    orphan = _chunk(repo, b"orphan")
    young = _chunk(repo, b"young orphan")
    for cid in [*m.chunk_ids(), orphan]:
        _age(repo.chunk_path(cid))
    res = repo.gc(grace=3600)
    assert res.removed == 1 and res.kept_recent == 1
    assert not os.path.exists(repo.chunk_path(orphan))
    assert os.path.exists(repo.chunk_path(young))
    repo.verify(m)  # every referenced chunk still there and intact
    repo.delete(VOL, m.backup_id)
    assert repo.gc(grace=0).removed == len(m.chunk_ids()) + 1


def test_gc_is_refused_while_a_backup_session_holds_the_lock(tmp_path: Path) -> None:
    repo = Repository.create(tmp_path / "repo")
    with repo.session("11111111-2222-4333-8444-555555555555", VOL):
        cid = _chunk(repo, b"being written")
        _age(repo.chunk_path(cid))
        with pytest.raises(RepositoryBusy):
            repo.gc(grace=0)
        assert os.path.exists(repo.chunk_path(cid))
    assert repo.gc(grace=0).removed == 1


def test_gc_spares_chunks_newer_than_a_live_marker_from_another_host(tmp_path: Path) -> None:
    """Without a shared lock (NFSv3 across hosts) the in-progress marker protects chunks."""
    repo = Repository.create(tmp_path / "repo")
    started = time.time() - 7200
    marker = Path(repo.path) / "inprogress" / "11111111-2222-4333-8444-555555555555.json"
    doc = {"started_at": started, "host": "other-" + socket.gethostname(), "pid": 1}
    marker.write_text(json.dumps(doc))
    during = _chunk(repo, b"written by the other host's backup")
    os.utime(repo.chunk_path(during), (started + 60, started + 60))
    before = _chunk(repo, b"orphaned long before")
    _age(repo.chunk_path(before))
    res = repo.gc(grace=0)
    assert os.path.exists(repo.chunk_path(during))
    assert not os.path.exists(repo.chunk_path(before))
    assert res.removed == 1 and marker.exists()
    # a marker older than stale_after is dead: then the chunk goes too
    repo.gc(grace=0, stale_after=3600)
    assert not marker.exists() and not os.path.exists(repo.chunk_path(during))


def test_gc_ignores_marker_of_a_dead_local_process(tmp_path: Path) -> None:
    repo = Repository.create(tmp_path / "repo")
    marker = Path(repo.path) / "inprogress" / "11111111-2222-4333-8444-555555555555.json"
    dead = 2**22 + 12345  # above pid_max's default: never a live pid
    doc = {"started_at": time.time(), "host": socket.gethostname(), "pid": dead}
    marker.write_text(json.dumps(doc))
    cid = _chunk(repo, b"left by a killed backup")
    _age(repo.chunk_path(cid))
    os.utime(repo.chunk_path(cid))  # fresh, but its writer is dead
    assert repo.gc(grace=0).removed == 1
    assert not marker.exists()
