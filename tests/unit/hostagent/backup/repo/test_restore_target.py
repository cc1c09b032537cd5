"""A restore writes only through what it validated: the attacks of issue 15 change nothing.

Real qcow2 files, a real repository, real qemu-img. Each attack comes with a negative
control showing the same plant WOULD have redirected a path-based write.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostagent.backup.repo import Repository, backup_full, restore
from hostagent.backup.repo import target as target_mod
from hostagent.backup.repo.target import TargetChanged, dir_identity, remove_partial
from tests.unit.hostagent.backup.helpers import VOL, MiB, guest_sha, make_base

VICTIM = b"root-owned system file\n" * 100


@pytest.fixture
def bed(tmp_path: Path) -> Iterator[tuple[Repository, str, str, Path, Path]]:
    share = tmp_path / "share"
    share.mkdir()
    base = make_base(share, size=8 * MiB)
    repo = Repository.create(tmp_path / "repo")
    res = backup_full(base, "qcow2", [share], repo, VOL)
    victim = tmp_path / "etc" / "victim"
    victim.parent.mkdir()
    victim.write_bytes(VICTIM)
    yield repo, res.manifest.backup_id, guest_sha(base, tmp_path), share, victim


def _fixed_token(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(target_mod.secrets, "token_hex", lambda n: "f" * (2 * n))
    return "f" * 16


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_symlink_planted_at_the_temporary_name_is_refused(
    bed: tuple[Repository, str, str, Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fmt: str,
) -> None:
    repo, bid, _sha, share, victim = bed
    token = _fixed_token(monkeypatch)
    dest = share / "restored"
    planted = share / f".restored.restore-{token}"
    # the only temporary name in the shared directory; the names inside it live in a 0700
    # directory made by this restore, so they cannot be planted beforehand
    os.symlink(victim, planted)
    with pytest.raises(FileExistsError):
        restore(repo, bid, dest, fmt=fmt)
    assert victim.read_bytes() == VICTIM
    assert not dest.exists() and planted.is_symlink()  # left for an operator to see
    # negative control: a path-based write at that name lands in the victim
    with open(planted, "ab") as f:
        f.write(b"x")
    assert victim.read_bytes() == VICTIM + b"x"


def test_a_file_renamed_over_the_temporary_file_is_not_published(
    bed: tuple[Repository, str, str, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo, bid, _sha, share, _victim = bed
    token = _fixed_token(monkeypatch)
    dest = share / "restored"
    evil = share / "evil"
    evil.write_bytes(b"attacker data")
    swapped: list[bool] = []

    def progress(done: int, total: int) -> None:
        if not swapped:  # mid-restore, someone able to write there renames a file over ours
            os.rename(evil, share / f".restored.restore-{token}" / "data.raw")
            swapped.append(True)

    with pytest.raises(TargetChanged, match="lost its name"):
        restore(repo, bid, dest, progress=progress)
    # the inode written is the only one that could be published, and it lost its name:
    # nothing appears, the attacker's file is not published, the workspace is gone
    assert swapped and not dest.exists()
    assert sorted(os.listdir(share)) == sorted(n for n in os.listdir(share) if n[0] != ".")
    # negative control: linking by NAME would have published the attacker's file
    (share / "again").write_bytes(b"attacker data")
    os.link(share / "again", dest)
    assert dest.read_bytes() == b"attacker data"


def test_target_directory_swapped_while_queued_is_refused(
    bed: tuple[Repository, str, str, Path, Path], tmp_path: Path
) -> None:
    repo, bid, _sha, share, victim = bed
    target = share / "restores"
    target.mkdir()
    ident = dir_identity(str(target))  # what the request validated
    os.rename(target, share / "moved")
    os.symlink(victim.parent, target)  # swapped for a link into another directory
    with pytest.raises(TargetChanged):
        restore(repo, bid, target / "restored", expect_dir=ident)
    assert sorted(os.listdir(victim.parent)) == ["victim"] and victim.read_bytes() == VICTIM
    os.unlink(target)
    (share / "other").mkdir()
    os.rename(share / "other", target)  # swapped for another real directory
    with pytest.raises(TargetChanged):
        restore(repo, bid, target / "restored", expect_dir=ident)
    assert os.listdir(target) == []
    # negative control: the swapped path resolves into the victim's directory
    os.rmdir(target)
    os.symlink(victim.parent, target)
    assert (target / "victim").read_bytes() == VICTIM


def test_a_link_anywhere_on_the_path_is_refused(
    bed: tuple[Repository, str, str, Path, Path], tmp_path: Path
) -> None:
    repo, bid, _sha, share, victim = bed
    (share / "via").symlink_to(victim.parent)
    with pytest.raises(TargetChanged):
        restore(repo, bid, share / "via" / "restored")
    assert sorted(os.listdir(victim.parent)) == ["victim"]


def test_restore_result_and_crash_leftovers(
    bed: tuple[Repository, str, str, Path, Path], tmp_path: Path
) -> None:
    repo, bid, sha, share, victim = bed
    for fmt in ("raw", "qcow2"):
        out = share / f"r.{fmt}"
        restore(repo, bid, out, fmt=fmt, expect_dir=dir_identity(str(share)))
        assert guest_sha(out, tmp_path, fmt) == sha
        assert [n for n in os.listdir(share) if n.startswith(".")] == []
    # what a kill -9 leaves: a private directory with a partial file, an old-style temp
    # file, and a planted link; recovery removes them all and follows nothing
    leftover = share / ".x.restore-0123"
    leftover.mkdir(mode=0o700)
    (leftover / "data.raw").write_bytes(b"partial")
    (share / ".x.restore-abcd").write_bytes(b"old")
    (share / ".x.restore-link").symlink_to(victim)
    removed = remove_partial(str(share / "x"))
    assert sorted(removed) == [".x.restore-0123", ".x.restore-abcd", ".x.restore-link"]
    assert victim.read_bytes() == VICTIM
    assert not any(n.startswith(".x.") for n in os.listdir(share))
