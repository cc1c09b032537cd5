"""recover_backup against a simulated live chain: what a restart does after a kill at each
point of an online backup (the functional test kills one for real, in the read phase)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import pytest

import libvirt_ops as lo
from hostagent.backup import online
from hostagent.backup.online import overlay_name, recover_backup
from hostagent.backup.repo import Repository
from hostagent.journal.model import OperationKind, OperationState, StepState
from hostagent.journal.store import Journal
from tests.unit.hostagent.fakes import VOL, FakeConn, FakeDom, no_left_job

A = f"volume-{VOL}"


@pytest.fixture
def fake_lo(monkeypatch: pytest.MonkeyPatch) -> None:
    def resolve_disk(dom: FakeDom, _target: str) -> lo.Disk:
        return dom.disk()

    def active_commit(_c: Any, dom: FakeDom, _t: str, **_kw: Any) -> None:
        dom.jobs.append(("active_commit", dom.chain[0]))
        dom.chain.pop(0)

    def commit(_c: Any, dom: FakeDom, _t: str, *, top: str, **_kw: Any) -> None:
        dom.jobs.append(("commit", top))
        dom.chain.remove(top)

    monkeypatch.setattr(lo, "settle_block_job", no_left_job)
    monkeypatch.setattr(lo, "resolve_disk", resolve_disk)  # online calls lo.<verb>
    monkeypatch.setattr(lo, "active_commit", active_commit)
    monkeypatch.setattr(lo, "commit", commit)


def _killed_backup(
    tmp_path: Path,
    chain: list[str],
    k_old: str | None,
    steps: list[tuple[str, StepState]],
    keep: bool = True,
) -> tuple[Journal, FakeDom, str, Any]:
    share = tmp_path / "share"
    share.mkdir()
    k_new = overlay_name(VOL, str(uuid.uuid4()))
    chain = [k_new if n == "K_NEW" else n for n in chain]
    for n in {*chain, k_new, *([k_old] if k_old else [])}:
        (share / n).write_bytes(b"x")
    j = Journal(str(tmp_path / "j.sqlite"))
    req = {
        "domain": "d",
        "volume_id": VOL,
        "target": "vdb",
        "overlay": k_new,
        "old_checkpoint": k_old,
        "keep_checkpoint": keep,
        "incremental": True,
    }
    op = j.begin(OperationKind.BACKUP, req).operation
    for name, state in steps:
        st = j.plan_step(op.id, name, {})
        if state is StepState.DONE:
            j.step_done(op.id, st.seq, {"backup_id": str(uuid.uuid4())} if name == "read" else {})
    dom = FakeDom(share, chain)
    (rec,) = j.unfinished()
    return j, dom, k_new, rec


P, D = StepState.PLANNED, StepState.DONE


def test_killed_while_reading_puts_the_old_checkpoint_back(tmp_path: Path, fake_lo: None) -> None:
    k_old = overlay_name(VOL, str(uuid.uuid4()))
    j, dom, k_new, rec = _killed_backup(
        tmp_path, ["K_NEW", k_old, A], k_old, [("snapshot", D), ("read", P)]
    )
    recover_backup(j, FakeConn(dom), rec)  # type: ignore[arg-type]
    assert dom.chain == [k_old, A] and dom.jobs == [("active_commit", k_new)]
    assert not (dom.share / k_new).exists() and (dom.share / k_old).exists()
    assert j.get(rec.operation.id).state is OperationState.FAILED
    assert [s.state for s in j.steps(rec.operation.id)][:2] == [D, StepState.UNDONE]


def test_killed_during_the_merge_after_publish_keeps_the_new_checkpoint(
    tmp_path: Path, fake_lo: None
) -> None:
    k_old = overlay_name(VOL, str(uuid.uuid4()))
    j, dom, k_new, rec = _killed_backup(
        tmp_path, ["K_NEW", k_old, A], k_old, [("snapshot", D), ("read", D), ("merge", P)]
    )
    recover_backup(j, FakeConn(dom), rec)  # type: ignore[arg-type]
    assert dom.chain == [k_new, A] and dom.jobs == [("commit", k_old)]
    assert not (dom.share / k_old).exists() and (dom.share / k_new).exists()
    assert j.get(rec.operation.id).state is OperationState.SUCCEEDED


def test_killed_after_merge_before_remove_only_removes(tmp_path: Path, fake_lo: None) -> None:
    k_old = overlay_name(VOL, str(uuid.uuid4()))
    j, dom, k_new, rec = _killed_backup(
        tmp_path, ["K_NEW", A], k_old, [("snapshot", D), ("read", D), ("merge", D), ("remove", P)]
    )
    recover_backup(j, FakeConn(dom), rec)  # type: ignore[arg-type]
    assert dom.chain == [k_new, A] and dom.jobs == []
    assert not (dom.share / k_old).exists()


def test_killed_before_the_snapshot_took_effect_removes_the_overlay(
    tmp_path: Path, fake_lo: None
) -> None:
    j, dom, k_new, rec = _killed_backup(tmp_path, [A], None, [("snapshot", P)])
    assert (dom.share / k_new).exists()
    recover_backup(j, FakeConn(dom), rec)  # type: ignore[arg-type]
    assert dom.chain == [A] and dom.jobs == [] and not (dom.share / k_new).exists()
    # recovering again (a crash during recovery) changes nothing more
    assert online._put_back(FakeConn(dom), j, rec.operation.id, dict(rec.operation.request), ())  # type: ignore[arg-type]
    assert dom.chain == [A]


def test_plain_backup_published_then_killed_merges_its_overlay(
    tmp_path: Path, fake_lo: None
) -> None:
    j, dom, k_new, rec = _killed_backup(
        tmp_path, ["K_NEW", A], None, [("snapshot", D), ("read", D)], keep=False
    )
    recover_backup(j, FakeConn(dom), rec)  # type: ignore[arg-type]
    assert dom.chain == [A] and dom.jobs == [("active_commit", k_new)]
    assert not (dom.share / k_new).exists()
    assert os.listdir(dom.share) == [A]


def test_backup_refused_while_the_volume_has_an_unfinished_operation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    share = tmp_path / "share"
    share.mkdir()
    (share / A).write_bytes(b"x")
    dom = FakeDom(share, [A])
    monkeypatch.setattr(lo, "find_disk", lambda _d, **_kw: dom.disk())
    j = Journal(str(tmp_path / "j.sqlite"))
    other = j.begin(OperationKind.ASSISTED_DELETE, {"x": 1}, locks=[f"volume:{VOL}"]).operation
    repo = Repository.create(tmp_path / "repo")
    req = online.BackupRequest("d", VOL, repo.path)
    with pytest.raises(online.VolumeBusy, match=str(other.id)):
        online.backup_volume(FakeConn(dom), j, req)  # type: ignore[arg-type]
    assert dom.chain == [A] and os.listdir(share) == [A]
    assert [o.id for o in j.list_operations(kind=OperationKind.BACKUP)] == []
