"""Checkpoint overlays without a guest: naming, and the offline release a detach needs."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from hostagent.backup.online import (
    BACKUP_NAMING,
    ChainChanged,
    is_backup_overlay,
    overlay_name,
    release_checkpoint_offline,
)
from qcow2 import CINDER
from tests.unit.hostagent.backup.helpers import VOL, MiB, guest_sha, make_base, write_random
from tests.unit.hostagent.fakes import make_image


def test_backup_naming_accepts_cinder_names_and_only_our_overlays() -> None:
    k = overlay_name(VOL, str(uuid.uuid4()))
    assert BACKUP_NAMING.is_image_name(k) and not CINDER.is_image_name(k)
    assert is_backup_overlay(k, VOL)
    assert not is_backup_overlay(k, "1" + VOL[1:])
    for name in (f"volume-{VOL}", f"volume-{VOL}.{uuid.uuid4()}"):
        assert BACKUP_NAMING.is_image_name(name) and not is_backup_overlay(name, VOL)
    for bad in (f"volume-{VOL}.qsnap-bk-x", f"volume-{VOL}.qsnap-bk-{uuid.uuid4()}/..", "k"):
        assert not BACKUP_NAMING.is_image_name(bad)


def _overlay(below: Path, name: str) -> Path:
    make_image(below.parent / name, below.name, size=None)
    return below.parent / name


def test_offline_release_commits_the_checkpoint_into_cinders_active_file(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    base = make_base(share, size=16 * MiB)
    k = _overlay(base, overlay_name(VOL, str(uuid.uuid4())))
    write_random(k, 2 * MiB, MiB, seed=5)
    want = guest_sha(k, tmp_path)
    assert release_checkpoint_offline(str(share), VOL) == [k.name]
    assert not k.exists()
    assert guest_sha(base, tmp_path) == want
    assert release_checkpoint_offline(str(share), VOL) == []


def test_offline_release_refuses_an_overlay_something_backs_onto(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    base = make_base(share, size=16 * MiB)
    k = _overlay(base, overlay_name(VOL, str(uuid.uuid4())))
    snap = _overlay(k, f"volume-{VOL}.{uuid.uuid4()}")
    with pytest.raises(ChainChanged, match=snap.name):
        release_checkpoint_offline(str(share), VOL)
    assert k.exists() and snap.exists()
