"""An earlier qsnap's checkpoint overlays (``volume-<vid>.qsnap-bk-<key>``), released once.

Found from the journal's old backup operations; merged down only while they are the live
top of a running guest (their data is the newest), never offline and never from below the
top (a guest restarted on the file below wrote there since). libvirt is the offline fake
of ``fakes`` (a domain object and ``libvirt_ops``' verbs patched), files are real.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import libvirt
import pytest

import libvirt_ops as lo
from hostagent.backup import legacy
from hostagent.journal.model import OperationKind, OperationState
from hostagent.journal.store import Journal
from tests.unit.hostagent.fake_libvirt import FakeConn, FakeDom, no_left_job
from tests.unit.hostagent.fakes import DOM, VOL, VOL2

A = f"volume-{VOL}"


def bk(vid: str = VOL) -> str:
    return f"volume-{vid}.qsnap-bk-{uuid.uuid4()}"


def old_backup(j: Journal, overlay: Any, old: Any = None, vid: str = VOL, **kw: Any) -> None:
    """A backup operation as an earlier qsnap journaled it (finished or not)."""
    req = {"domain": DOM, "volume_id": vid, "target": "vdb", "overlay": overlay}
    req.update(old_checkpoint=old, keep_checkpoint=True, incremental=True, **kw)
    j.begin(OperationKind.BACKUP, req, locks=[f"volume:{vid}"])


class Stopped(FakeDom):
    def isActive(self) -> bool:
        return False


class Gone:
    """A connection on which the domain no longer exists (undefined, migrated away)."""

    def lookup(self, name: str) -> Any:
        raise libvirt.libvirtError(f"Domain not found: {name}")


@pytest.fixture
def j(tmp_path: Path) -> Any:
    journal = Journal(str(tmp_path / "j.sqlite"))
    yield journal
    journal.close()


@pytest.fixture
def share(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    def active_commit(_c: Any, dom: FakeDom, _t: str, **_kw: Any) -> None:
        dom.jobs.append(("active_commit", dom.chain.pop(0)))

    monkeypatch.setattr(lo, "find_disk", lambda dom, **_kw: dom.disk())
    monkeypatch.setattr(lo, "resolve_disk", lambda dom, _t: dom.disk())
    monkeypatch.setattr(lo, "settle_block_job", no_left_job)
    monkeypatch.setattr(lo, "active_commit", active_commit)
    d = tmp_path / "share"
    d.mkdir()
    (d / A).write_bytes(b"base")
    return d


def _dom(share: Path, chain: list[str], cls: type[FakeDom] = FakeDom) -> FakeDom:
    for n in chain:
        (share / n).write_bytes(b"x")
    return cls(share, list(chain))


def _markers(j: Journal) -> list[Any]:
    return j.list_operations(kind=OperationKind.BACKUP, lock=legacy.ACTION)


def test_legacy_overlays_are_the_old_operations_overlays_of_their_volume(j: Journal) -> None:
    k1, k2 = bk(), bk()
    old_backup(j, k1)
    old_backup(j, k2, k1)
    old_backup(j, bk(VOL), vid=VOL2)  # another volume's name: not this volume's overlay
    old_backup(j, f"volume-{VOL2}.qsnap-bk-not-a-key", vid=VOL2)
    old_backup(j, f"volume-{VOL2}.{uuid.uuid4()}", vid=VOL2)  # a Cinder name: not legacy
    new = {"domain": DOM, "volume_id": VOL2, "checkpoint": {"snapshot_id": str(uuid.uuid4())}}
    j.begin(OperationKind.BACKUP, new)  # this version's backup
    j.begin(OperationKind.BACKUP, {"action": "create", "overlay": bk()})  # request-level
    assert legacy.legacy_overlays(j) == {(DOM, VOL): {k1, k2}}


def test_without_legacy_overlays_nothing_is_journaled_or_touched(j: Journal) -> None:
    j.begin(OperationKind.BACKUP, {"domain": DOM, "volume_id": VOL, "checkpoint": None})
    before = j.list_operations()
    assert legacy.release_legacy(j, object(), []) is None  # type: ignore[arg-type]
    assert j.list_operations() == before and _markers(j) == []


def test_a_running_guests_legacy_top_is_merged_down_once(j: Journal, share: Path) -> None:
    k = bk()
    old_backup(j, k)
    dom = _dom(share, [k, A])
    out = legacy.release_legacy(j, FakeConn(dom), [str(share)])  # type: ignore[arg-type]
    assert out == {"released": [k], "left": {}}
    assert dom.chain == [A] and dom.jobs == [("active_commit", k)] and not (share / k).exists()
    (marker,) = _markers(j)
    assert marker.state is OperationState.SUCCEEDED and marker.result == out
    assert legacy.release_legacy(j, FakeConn(dom), [str(share)]) is None  # type: ignore[arg-type]
    assert len(_markers(j)) == 1 and dom.jobs == [("active_commit", k)]


def test_a_stopped_guests_overlay_is_never_merged_offline(j: Journal, share: Path) -> None:
    k = bk()
    old_backup(j, k)
    dom = _dom(share, [k, A], Stopped)
    out = legacy.release_legacy(j, FakeConn(dom), [str(share)])  # type: ignore[arg-type]
    assert out is not None and out["released"] == []
    assert "never merged offline" in out["left"][k]
    assert dom.jobs == [] and (share / k).exists()


def test_an_overlay_below_the_live_top_is_reported_not_merged(j: Journal, share: Path) -> None:
    """The guest was restarted on the file below and wrote there: merging the overlay down
    would overwrite those writes with older data (what the old reaper did)."""
    k = bk()
    old_backup(j, k)
    (share / k).write_bytes(b"stale")
    dom = _dom(share, [A])
    out = legacy.release_legacy(j, FakeConn(dom), [str(share)])  # type: ignore[arg-type]
    assert out is not None and out["released"] == [] and "not the live top" in out["left"][k]
    assert dom.jobs == [] and (share / k).read_bytes() == b"stale"


def test_a_domain_gone_is_left_alone(j: Journal, share: Path) -> None:
    k = bk()
    old_backup(j, k)
    (share / k).write_bytes(b"x")
    out = legacy.release_legacy(j, Gone(), [str(share)])  # type: ignore[arg-type]
    assert out is not None and out["released"] == [] and (share / k).exists()
    assert [m.state for m in _markers(j)] == [OperationState.SUCCEEDED]


def test_stacked_legacy_overlays_of_a_running_guest_are_all_merged(j: Journal, share: Path) -> None:
    """A kill between an old backup's publish and its merge of the old checkpoint left two."""
    k_old, k_new = bk(), bk()
    old_backup(j, k_new, k_old)
    dom = _dom(share, [k_new, k_old, A])
    out = legacy.release_legacy(j, FakeConn(dom), [str(share)])  # type: ignore[arg-type]
    assert out is not None and out["left"] == {}
    assert dom.chain == [A]


def test_a_release_killed_midway_is_resumed_at_the_next_start(j: Journal, share: Path) -> None:
    k = bk()
    old_backup(j, k)
    j.begin(OperationKind.BACKUP, {"action": legacy.ACTION}, locks=[legacy.ACTION])  # killed
    dom = _dom(share, [k, A])
    out = legacy.release_legacy(j, FakeConn(dom), [str(share)])  # type: ignore[arg-type]
    assert out is not None and out["released"] == [k] and dom.chain == [A]
