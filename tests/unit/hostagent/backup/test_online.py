"""Online backups read at a recorded checkpoint snapshot (``hostagent.backup.online``).

The real owned snapshot paths take and drop the checkpoints (``online_bed.OnlineBed``: the fake
hypervisor's merges commit the data as QEMU does) over real qcow2 files, ledgers, journal
and repository. Every data check restores the backup and compares it with the guest view
of the live chain, with a control showing the comparison sees a missing write.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hostagent.backup import online
from hostagent.backup import repo as bk
from hostagent.backup.online import recover_backup
from hostagent.hypervisor import Located
from hostagent.journal.model import (
    OperationKind,
    OperationRecord,
    OperationState,
    Step,
    StepName,
    StepState,
)
from hostagent.journal.store import Journal
from qcow2 import Ledger, write_ledger
from tests.unit.hostagent.fakes import (
    DOM,
    VOL,
    Crash,
    MiB,
    crash_at,
    make_image,
    no_crash,
)
from tests.unit.hostagent.online_bed import OnlineBed

A = f"volume-{VOL}"


def cp(sid: str) -> str:
    """The file of snapshot ``sid`` (Cinder's naming)."""
    return f"{A}.{sid}"


@pytest.fixture
def bed(tmp_path: Path) -> Iterator[OnlineBed]:
    b = OnlineBed(tmp_path)
    yield b
    b.close()


def write(bed: OnlineBed, name: str, pattern: int, at_mib: int) -> None:
    """The guest writes 1 MiB of ``pattern`` at ``at_mib`` MiB into layer ``name``."""
    cmd = f"write -P {pattern} {at_mib}M 1M"
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", cmd, str(bed.dir / name)],
        check=True,
        stdout=subprocess.DEVNULL,
    )


def matches_guest(bed: OnlineBed, backup_id: str) -> bool:
    """Whether the backup, restored, equals the guest view of the live chain now."""
    dest = bed.dir.parent / f"restored-{backup_id}.raw"
    bk.restore(bed.repo, backup_id, dest, durable=False)
    top = str(bed.dir / bed.hv.chain[0])
    argv = ["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", str(dest), top]
    rc = subprocess.run(argv, check=False).returncode
    dest.unlink()
    assert rc in (0, 1), f"qemu-img compare failed ({rc})"
    return rc == 0


def steps(bed: OnlineBed, op_id: str) -> dict[str, Step]:
    return {s.name: s for s in bed.journal.steps(uuid.UUID(op_id))}


def ops_of(bed: OnlineBed, kind: OperationKind) -> list[Any]:
    return bed.journal.list_operations(kind=kind)


def test_full_then_incremental_reads_the_changes_and_keeps_one_checkpoint(
    bed: OnlineBed,
) -> None:
    r1 = bed.backup(True)
    assert r1.result.manifest.kind == "full" and r1.result.bytes_read == MiB
    assert r1.result.fallback_reason == "no previous backup of this volume"
    s1 = r1.checkpoint
    assert s1 is not None and r1.checkpoint_file == cp(s1) and r1.dropped == ()
    assert bed.hv.chain == [cp(s1), A] and r1.chain_after == (cp(s1), A)
    assert bed.ledger() == Ledger(cp(s1), {s1: cp(s1)})
    assert r1.result.manifest.checkpoint == bk.Checkpoint(cp(s1), A, s1)
    assert list(steps(bed, r1.operation_id)) == ["checkpoint", "read"]  # nothing to drop
    write(bed, cp(s1), 0x22, 2)  # the guest writes into the live top, the checkpoint file

    r2 = bed.backup(True)
    s2 = r2.checkpoint
    assert s2 is not None and r2.incremental and r2.result.fallback_reason is None
    assert r2.result.manifest.parent_id == r1.result.manifest.backup_id
    assert r2.result.bytes_read == MiB  # the changed MiB only (the full read 1 of 2 MiB)
    assert r2.dropped == (s1,) and bed.hv.chain == [cp(s2), A]
    assert bed.ledger() == Ledger(cp(s2), {s2: cp(s2)})
    assert not (bed.dir / cp(s1)).exists()
    read = steps(bed, r2.operation_id)["read"].data
    assert read["frozen"] == cp(s1) and read["boundary"] == A
    assert steps(bed, r2.operation_id)["drop_checkpoints"].data["dropped"] == [s1]
    taken = [o.request["snapshot_id"] for o in ops_of(bed, OperationKind.INSTANCE_SNAPSHOT)]
    dropped = [o.request["snapshot_id"] for o in ops_of(bed, OperationKind.OWNED_DELETE)]
    assert taken == [s1, s2] and dropped == [s1]
    assert matches_guest(bed, r2.result.manifest.backup_id)
    assert not matches_guest(bed, r1.result.manifest.backup_id)  # control: misses 0x22


def test_plain_backup_drops_its_own_checkpoint_and_the_older_one(bed: OnlineBed) -> None:
    r1 = bed.backup(True)
    write(bed, bed.hv.chain[0], 0x22, 2)
    r2 = bed.backup(False)
    (op2,) = [o for o in ops_of(bed, OperationKind.BACKUP) if str(o.id) == r2.operation_id]
    own = op2.request["checkpoint"]["snapshot_id"]
    assert r2.checkpoint is None and r2.checkpoint_file is None
    assert r2.result.manifest.checkpoint is None and r2.result.manifest.kind == "full"
    assert r2.dropped == (r1.checkpoint, own)
    assert bed.hv.chain == [A] and bed.ledger() == Ledger(A, {})
    assert sorted(p.name for p in bed.dir.iterdir()) == sorted([A, f"{A}.info"])
    assert matches_guest(bed, r2.result.manifest.backup_id)
    r3 = bed.backup(True)  # a plain backup leaves nothing to build on
    assert r3.result.manifest.kind == "full"
    assert r3.result.fallback_reason == (
        f"previous backup {r2.result.manifest.backup_id} left no checkpoint"
    )


@pytest.mark.parametrize("deleted", [True, False])
def test_a_deleted_checkpoint_makes_a_full_backup_that_names_it(
    bed: OnlineBed, deleted: bool
) -> None:
    """Cinder deleted the checkpoint (a pull of the base into the active file, as remotefs
    does for the oldest snapshot): its writes are no longer above any tracked layer."""
    r1 = bed.backup(True)
    s1 = r1.checkpoint
    assert s1 is not None
    write(bed, cp(s1), 0x22, 2)
    if deleted:
        argv = ["qemu-img", "rebase", "-q", "-f", "qcow2", "-b", "", cp(s1)]
        subprocess.run(argv, check=True, cwd=bed.dir)
        (bed.dir / A).unlink()
        bed.hv.chain[:] = [cp(s1)]
        write_ledger(str(bed.dir), VOL, Ledger(cp(s1), {}))
    r2 = bed.backup(True)
    if deleted:
        bid = r1.result.manifest.backup_id
        assert r2.result.manifest.kind == "full" and r2.result.bytes_read == 2 * MiB
        assert r2.result.fallback_reason == (
            f"checkpoint snapshot {s1} of backup {bid} was deleted (not in the volume's ledger)"
        )
        assert r2.result.manifest.parent_id == bid and r2.dropped == ()
    else:  # the control: the same writes, the checkpoint kept: incremental
        assert r2.incremental and r2.result.bytes_read == MiB and r2.dropped == (s1,)
    assert matches_guest(bed, r2.result.manifest.backup_id)
    assert not matches_guest(bed, r1.result.manifest.backup_id)


@pytest.mark.parametrize("change", ["pull_remaps_the_id", "commit_below"])
def test_incremental_boundary_is_the_checkpoint_files_current_backing(
    bed: OnlineBed, change: str
) -> None:
    """Cinder's deletes between two backups: a pull re-points the checkpoint's id at the
    active file; a commit below it changes its backing file. Both stay incremental."""
    e, d = str(uuid.uuid4()), str(uuid.uuid4())
    if change == "commit_below":  # a Cinder snapshot taken before the first backup
        make_image(bed.dir / cp(e), A, size=None)
        bed.hv.chain.insert(0, cp(e))
        write_ledger(str(bed.dir), VOL, Ledger(cp(e), {e: cp(e)}))
        write(bed, cp(e), 0x33, 4)
    r1 = bed.backup(True)
    s1 = r1.checkpoint
    assert s1 is not None
    write(bed, cp(s1), 0x22, 2)
    if change == "pull_remaps_the_id":  # snapshot d taken, written to, deleted by a pull
        make_image(bed.dir / cp(d), cp(s1), size=None)
        bed.hv.chain.insert(0, cp(d))
        write(bed, cp(d), 0x33, 4)
        argv = ["qemu-img", "rebase", "-q", "-f", "qcow2", "-b", A, "-F", "qcow2", cp(d)]
        subprocess.run(argv, check=True, cwd=bed.dir)  # safe: s1's data pulled into d's file
        (bed.dir / cp(s1)).unlink()
        bed.hv.chain[:] = [cp(d), A]
        write_ledger(str(bed.dir), VOL, Ledger(cp(d), {s1: cp(d)}))
        frozen, changed = cp(d), 2 * MiB
    else:  # snapshot e deleted: its file committed into the base below the checkpoint
        assert r1.result.manifest.checkpoint == bk.Checkpoint(cp(s1), cp(e), s1)
        bed.hv.merge_owned(bed.hv.locate(VOL), cp(e), lambda _c, _e: None)
        write_ledger(str(bed.dir), VOL, Ledger(cp(s1), {s1: cp(s1)}))
        frozen, changed = cp(s1), MiB
    r2 = bed.backup(True)
    assert r2.incremental and r2.result.fallback_reason is None
    assert r2.result.bytes_read == changed
    read = steps(bed, r2.operation_id)["read"].data
    assert read["frozen"] == frozen and read["boundary"] == A
    assert r2.dropped == (s1,) and bed.hv.chain == [cp(str(r2.checkpoint)), A]
    assert matches_guest(bed, r2.result.manifest.backup_id)
    assert not matches_guest(bed, r1.result.manifest.backup_id)


def test_error_mid_read_drops_only_its_checkpoint_and_the_next_stays_incremental(
    bed: OnlineBed,
) -> None:
    r1 = bed.backup(True)
    s1 = r1.checkpoint
    assert s1 is not None
    write(bed, cp(s1), 0x22, 2)

    def full_disk(_done: int, _total: int) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full") as info:
        bed.backup(True, progress=full_disk)
    failed = ops_of(bed, OperationKind.BACKUP)[-1]
    s2 = failed.request["checkpoint"]["snapshot_id"]
    assert failed.state is OperationState.FAILED
    assert f"checkpoint: {s2} dropped" in info.value.__notes__
    assert [h.backup_id for h in bed.repo.headers(VOL)] == [r1.result.manifest.backup_id]
    assert bed.hv.chain == [cp(s1), A] and bed.ledger() == Ledger(cp(s1), {s1: cp(s1)})
    r3 = bed.backup(True)
    assert r3.incremental and r3.result.manifest.parent_id == r1.result.manifest.backup_id
    assert r3.result.bytes_read == MiB and r3.dropped == (s1,)
    assert matches_guest(bed, r3.result.manifest.backup_id)


def test_a_killed_backups_orphan_checkpoint_is_dropped_by_the_next_backup(
    bed: OnlineBed, monkeypatch: pytest.MonkeyPatch
) -> None:
    r1 = bed.backup(True)
    s1 = r1.checkpoint
    assert s1 is not None
    write(bed, cp(s1), 0x22, 2)
    crash_at(monkeypatch, "read:planned")
    with pytest.raises(Crash):
        bed.backup(True)
    no_crash(monkeypatch)
    (rec,) = bed.journal.unfinished()
    orphan = rec.operation.request["checkpoint"]["snapshot_id"]
    assert bed.hv.chain == [cp(orphan), cp(s1), A]
    write(bed, cp(orphan), 0x33, 4)  # the guest went on writing into the orphan
    chain, ledger = list(bed.hv.chain), bed.ledger()
    assert "not published" in recover_backup(bed.journal, rec)
    assert bed.journal.get(rec.operation.id).state is OperationState.FAILED
    assert bed.hv.chain == chain and bed.ledger() == ledger  # recovery touches no chain
    r3 = bed.backup(True)
    assert r3.incremental and r3.result.bytes_read == 2 * MiB  # the orphan's writes too
    assert r3.dropped == (s1, orphan) and bed.hv.chain == [cp(str(r3.checkpoint)), A]
    assert matches_guest(bed, r3.result.manifest.backup_id)
    assert not matches_guest(bed, r1.result.manifest.backup_id)


def test_killed_after_the_publish_succeeds_and_the_next_backup_drops_what_it_left(
    bed: OnlineBed, monkeypatch: pytest.MonkeyPatch
) -> None:
    s1 = bed.backup(True).checkpoint
    crash_at(monkeypatch, "drop_checkpoints:planned")
    with pytest.raises(Crash):
        bed.backup(True)
    no_crash(monkeypatch)
    (rec,) = bed.journal.unfinished()
    s2 = rec.operation.request["checkpoint"]["snapshot_id"]
    bid = bed.repo.headers(VOL)[-1].backup_id
    assert recover_backup(bed.journal, rec).startswith(f"published as {bid}")
    done = bed.journal.get(rec.operation.id)
    assert done.state is OperationState.SUCCEEDED and done.result["backup_id"] == bid
    assert {s.state for s in bed.journal.steps(rec.operation.id)} == {
        StepState.DONE,
        StepState.UNDONE,
    }
    assert s1 is not None and bed.hv.chain == [cp(s2), cp(s1), A]
    r3 = bed.backup(True)
    assert r3.incremental and r3.result.manifest.parent_id == bid
    assert r3.dropped == (s1, s2) and bed.hv.chain == [cp(str(r3.checkpoint)), A]


class DropRefused:
    """The real checkpoints, but deleting ``refused`` fails (e.g. Cinder said no)."""

    def __init__(self, real: online.CheckpointOps, refused: str) -> None:
        self.real, self.refused = real, refused

    def take(self, where: Located, snapshot_id: str, label: str, why: str) -> str:
        return self.real.take(where, snapshot_id, label, why)

    def drop(self, volume_id: str, snapshot_id: str, why: str) -> None:
        if snapshot_id == self.refused:
            raise online.CheckpointFailed(f"delete of checkpoint {snapshot_id} refused")
        self.real.drop(volume_id, snapshot_id, why)


def test_a_checkpoint_not_dropped_stays_recorded_and_is_dropped_next_time(
    bed: OnlineBed,
) -> None:
    s1 = bed.backup(True).checkpoint
    assert s1 is not None
    r2 = bed.backup(True, checkpoints=DropRefused(bed.checkpoints, s1))
    s2 = r2.checkpoint
    assert s2 is not None and r2.incremental and r2.dropped == ()
    drop = steps(bed, r2.operation_id)["drop_checkpoints"]
    assert drop.state is StepState.DONE and s1 in drop.data["left"]
    assert bed.ledger() == Ledger(cp(s2), {s1: cp(s1), s2: cp(s2)})  # coherent, recorded
    r3 = bed.backup(True)
    assert r3.incremental and r3.dropped == (s1, s2)
    assert bed.hv.chain == [cp(str(r3.checkpoint)), A]


def test_refusals_take_no_checkpoint(bed: OnlineBed) -> None:
    other = bed.journal.begin(
        OperationKind.OWNED_DELETE, {"x": 1}, locks=[f"volume:{VOL}"]
    ).operation
    with pytest.raises(online.VolumeBusy, match=str(other.id)):
        bed.backup(True)
    req = online.BackupRequest(str(uuid.uuid4()), VOL, bed.repo.path)
    with pytest.raises(online.ChainChanged, match=DOM):
        online.backup_volume(bed.hv, bed.journal, req, bed.checkpoints, roots=bed.roots)
    assert [o.id for o in bed.journal.list_operations()] == [other.id]
    assert bed.hv.chain == [A] and bed.hv.calls == [] and bed.ledger() is None
    r = bed.backup(False, not_busy=lambda op: op.id == other.id)  # the control
    assert r.result.manifest.kind == "full" and bed.hv.chain == [A]


def test_a_refused_checkpoint_fails_the_backup_and_publishes_nothing(bed: OnlineBed) -> None:
    bed.hv.fail = RuntimeError("QEMU said no")
    with pytest.raises(online.CheckpointFailed, match="QEMU said no") as info:
        bed.backup(True)
    (op,) = ops_of(bed, OperationKind.BACKUP)
    sid = op.request["checkpoint"]["snapshot_id"]
    assert op.state is OperationState.FAILED
    assert f"checkpoint: {sid} was not recorded" in info.value.__notes__
    assert bed.repo.headers(VOL) == [] and bed.hv.chain == [A] and bed.ledger() is None
    assert sorted(p.name for p in bed.dir.iterdir()) == [A]


# -- recover_backup from journaled steps alone --------------------------------------------
P, D = StepState.PLANNED, StepState.DONE


def _killed(j: Journal, done: list[tuple[str, StepState]]) -> OperationRecord:
    req = {"domain": DOM, "volume_id": VOL, "checkpoint": {"snapshot_id": str(uuid.uuid4())}}
    op = j.begin(OperationKind.BACKUP, req, locks=[f"volume:{VOL}"]).operation
    for name, state in done:
        st = j.plan_step(op.id, name, {})
        if state is D:
            j.step_done(op.id, st.seq, {"backup_id": "b1"} if name == StepName.READ else {})
    (rec,) = [r for r in j.unfinished() if r.operation.id == op.id]
    return rec


@pytest.mark.parametrize(
    ("done", "state"),
    [
        ([], OperationState.FAILED),
        ([("checkpoint", P)], OperationState.FAILED),
        ([("checkpoint", D), ("read", P)], OperationState.FAILED),
        ([("checkpoint", D), ("read", D)], OperationState.SUCCEEDED),
        ([("checkpoint", D), ("read", D), ("drop_checkpoints", P)], OperationState.SUCCEEDED),
    ],
)
def test_recover_backup_decides_by_the_read_step(
    tmp_path: Path, done: list[tuple[str, StepState]], state: OperationState
) -> None:
    j = Journal(str(tmp_path / "j.sqlite"))
    try:
        rec = _killed(j, done)
        recover_backup(j, rec)
        op = j.get(rec.operation.id)
        assert op.state is state
        if state is OperationState.SUCCEEDED:
            assert op.result["backup_id"] == "b1"
        assert P not in {s.state for s in j.steps(op.id)}  # every PLANNED step judged
    finally:
        j.close()


def test_recovery_killed_midway_finishes_on_the_next_start(tmp_path: Path) -> None:
    """A kill after it marked a step UNDONE, before it finished the op: run again."""
    j = Journal(str(tmp_path / "j.sqlite"))
    try:
        rec = _killed(j, [("checkpoint", D), ("read", P)])
        j.step_undone(rec.operation.id, rec.steps[-1].seq, {"recovery": "first try"})
        (again,) = j.unfinished()
        assert "not published" in recover_backup(j, again)
        assert j.get(rec.operation.id).state is OperationState.FAILED
        assert j.steps(rec.operation.id)[-1].data["recovery"] == "first try"
        other = j.begin(OperationKind.OWNED_DELETE, {"x": 1}).operation
        (orec,) = [r for r in j.unfinished() if r.operation.id == other.id]
        with pytest.raises(ValueError, match="not a backup"):
            recover_backup(j, orec)
    finally:
        j.close()
