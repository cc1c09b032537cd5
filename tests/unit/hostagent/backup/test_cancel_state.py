"""A backup ended by ``BackupCancelled`` finishes its journal operation CANCELLED, not FAILED.

The offline libvirt_ops fakes of ``tests/unit/hostagent/fakes.py`` (no libvirt); the chain is
still put back first, and any other error still finishes FAILED.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import libvirt_ops as lo
from hostagent.backup import online
from hostagent.backup.repo.format import BackupCancelled
from hostagent.backup.repo.repository import Repository
from hostagent.journal.model import OperationKind, OperationState
from hostagent.journal.store import Journal
from tests.unit.hostagent.fakes import VOL, FakeConn, FakeDom, no_left_job

A = f"volume-{VOL}"


@pytest.mark.parametrize(
    ("exc", "state"),
    [(BackupCancelled("cancelled by the operator"), OperationState.CANCELLED),
     (OSError("disk full"), OperationState.FAILED)],
)  # fmt: skip
def test_cancelled_backup_is_cancelled_and_put_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc: Exception, state: OperationState
) -> None:
    share = tmp_path / "share"
    share.mkdir()
    (share / A).write_bytes(b"x")
    dom = FakeDom(share, [A])
    monkeypatch.setattr(lo, "find_disk", lambda _d, **_kw: dom.disk())
    monkeypatch.setattr(lo, "resolve_disk", lambda _d, _t: dom.disk())
    monkeypatch.setattr(lo, "settle_block_job", no_left_job)

    def run(*_a: Any) -> Any:
        raise exc

    monkeypatch.setattr(online, "_run", run)
    j = Journal(str(tmp_path / "j.sqlite"))
    try:
        repo = Repository.create(tmp_path / "repo")
        req = online.BackupRequest("d", VOL, repo.path, incremental=True)
        with pytest.raises(type(exc)) as info:
            online.backup_volume(FakeConn(dom), j, req)  # type: ignore[arg-type]
        assert any("chain already consistent" in n for n in info.value.__notes__)
        (op,) = j.list_operations(kind=OperationKind.BACKUP)
        assert op.state is state
        assert op.error is not None and str(exc) in op.error.message
        assert dom.chain == [A]
    finally:
        j.close()
