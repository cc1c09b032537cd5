"""A backup ended by ``BackupCancelled`` finishes its journal operation CANCELLED, not FAILED.

Any other error mid-read still finishes FAILED. Either way nothing is published and the
checkpoint snapshot taken for the backup is dropped again (``_Run.abandon``, an owned
delete): the volume's chain and ledger are what they were, only coherently rewritten.
Real owned snapshot paths over real files (``online_bed.OnlineBed``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hostagent.backup.repo.format import BackupCancelled
from hostagent.journal.model import OperationKind, OperationState, StepState
from qcow2 import Ledger
from tests.unit.hostagent.fakes import VOL
from tests.unit.hostagent.online_bed import OnlineBed


def _cancelled() -> dict[str, Any]:
    return {"cancel": lambda: True}


def _disk_full() -> dict[str, Any]:
    def progress(_done: int, _total: int) -> None:
        raise OSError("disk full")

    return {"progress": progress}


@pytest.mark.parametrize(
    ("how", "exc", "state", "message"),
    [(_cancelled, BackupCancelled, OperationState.CANCELLED, "cancel"),
     (_disk_full, OSError, OperationState.FAILED, "disk full")],
)  # fmt: skip
def test_cancelled_backup_is_cancelled_and_its_checkpoint_dropped(
    tmp_path: Path,
    how: Callable[[], dict[str, Any]],
    exc: type[Exception],
    state: OperationState,
    message: str,
) -> None:
    bed = OnlineBed(tmp_path)
    try:
        with pytest.raises(exc) as info:
            bed.backup(True, **how())
        (op,) = bed.journal.list_operations(kind=OperationKind.BACKUP)
        sid = op.request["checkpoint"]["snapshot_id"]
        assert op.state is state
        assert op.error is not None and message in op.error.message.lower()
        assert f"checkpoint: {sid} dropped" in info.value.__notes__
        steps = {s.name: s.state for s in bed.journal.steps(op.id)}
        assert steps == {"checkpoint": StepState.DONE, "read": StepState.FAILED}
        assert bed.repo.headers(VOL) == []  # nothing published
        (taken,) = bed.journal.list_operations(kind=OperationKind.INSTANCE_SNAPSHOT)
        (dropped,) = bed.journal.list_operations(kind=OperationKind.OWNED_DELETE)
        assert taken.request["snapshot_id"] == dropped.request["snapshot_id"] == sid
        assert taken.state is dropped.state is OperationState.SUCCEEDED
        assert dropped.request["why"] == f"backup {op.id} failed"
        base = f"volume-{VOL}"
        assert bed.hv.chain == [base] and bed.ledger() == Ledger(base, {})
        assert sorted(p.name for p in bed.dir.iterdir()) == [base, f"{base}.info"]
    finally:
        bed.close()
