"""Issue 14: Cinder-driven work is never started after Cinder stopped waiting, has its own
capacity, and a failure is judged from the live chain as recovery judges it.

The disk is held busy by a backup (FakeEngine gated inside the disk lock), as a queue of
backups would hold it; each rule has a negative control (a generous deadline, a shared pool,
a failure that really left the chain alone).
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hostagent.backup.service import BackupSettings
from hostagent.cinder.status import Report
from hostagent.hypervisor import Located
from hostagent.rpc import contract as api
from hostagent.snapshots.assisted_rules import DeadlineExpired, Deadlines
from tests.unit.hostagent.fakes import CTX, VOL, VOL2, Agent, BackupBed, crash_at, no_crash

TIGHT = Deadlines(create=0.5, delete=0.5, create_reserve=0.0)


class Busy:
    """A :class:`BackupBed` whose agent has ``workers`` general workers; ``hold(vid)`` starts
    a backup of ``vid`` that keeps its disk (and one worker) until ``release()``."""

    def __init__(self, tmp: Path, *, workers: int = 1, **agent: Any) -> None:
        self.bed = BackupBed(tmp)
        self.bed.a.close()  # the same share, journal and Cinder; another agent
        settings = BackupSettings(
            str(tmp / "repo"), max_parallel=2, keep_last=2, create_repository=True
        )
        self.a = self.bed.agent(workers=workers, engine=self.bed.engine, settings=settings, **agent)
        self.gate = self.bed.engine.gate = threading.Event()
        self.backups: list[api.Operation] = []

    def hold(self, vid: str) -> None:
        self.bed.engine.inside.clear()
        req = api.CreateBackupRequest.from_wire([vid], None, False)
        self.backups.append(self.a.svc.create_backup(CTX, req))

    def held(self) -> None:
        assert self.bed.engine.inside.wait(30)

    def release(self) -> None:
        self.gate.set()
        for op in self.backups:
            assert self.a.wait(op).state is api.OperationState.SUCCEEDED

    def create(self, snap: str | None = None) -> tuple[str, str, api.Operation]:
        snap = snap or str(uuid.uuid4())
        name = self.bed.precreate(snap)
        req = api.CreateSnapshotRequest(VOL, snap, name)
        return snap, name, self.a.svc.create_assisted_snapshot(CTX, req)

    def close(self) -> None:
        self.gate.set()
        self.a.close()


@pytest.fixture
def busy(tmp_path: Path) -> Iterator[Busy]:
    """Cinder's real waits (600 s / 7200 s)."""
    b = Busy(tmp_path)
    yield b
    b.close()


@pytest.fixture
def tight(tmp_path: Path) -> Iterator[Busy]:
    """Cinder stops waiting 0.5 s after acceptance."""
    b = Busy(tmp_path, deadlines=TIGHT)
    yield b
    b.close()


def _stat(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def _state(a: Agent, op: api.Operation) -> api.OperationState:
    return a.svc.get_operation(CTX, op.id).state


# -- deadlines --------------------------------------------------------------------------------
def test_create_queued_past_its_deadline_fails_untouched_and_unreported(tight: Busy) -> None:
    busy = tight
    bed, a = busy.bed, busy.a
    busy.hold(VOL)
    busy.held()
    _snap, name, op = busy.create()  # accepted at once, queued behind the backup's disk
    chain, overlay = list(bed.hv.chain), _stat(bed.dir / name)
    time.sleep(0.7)  # Cinder stopped waiting meanwhile
    busy.release()
    done = a.wait(op)
    assert done.state is api.OperationState.FAILED
    assert done.error is not None and done.error["code"] == "DeadlineExpired", done.error
    assert done.result["steps"] == []  # nothing journaled as done: no snapshot, no notify
    assert bed.hv.chain == chain and not [c for c in bed.hv.calls if c[0] == "snapshot"]
    assert _stat(bed.dir / name) == overlay  # Cinder's overlay: untouched, left to Cinder
    assert bed.notifier.sent == [] and a.journal.pending_notifications(due_only=False) == []
    assert not (bed.dir / f"volume-{VOL}.info").exists()


def test_create_queued_within_its_deadline_runs_after_the_backup(busy: Busy) -> None:
    """Negative control: the same queue with Cinder's real wait."""
    busy.hold(VOL)
    busy.held()
    snap, name, op = busy.create()
    time.sleep(0.7)
    busy.release()
    assert busy.a.wait(op).state is api.OperationState.SUCCEEDED
    assert busy.bed.hv.chain[0] == name
    assert busy.bed.notifier.sent == [(snap, Report.CREATE_DONE)]


def test_delete_queued_past_its_deadline_is_not_merged(tight: Busy) -> None:
    busy = tight
    bed, a = busy.bed, busy.a
    s1 = str(uuid.uuid4())
    f1 = bed.snapshot_now(s1)
    busy.hold(VOL)
    busy.held()
    op = a.svc.delete_assisted_snapshot(CTX, api.DeleteSnapshotRequest(VOL, s1, None, None))
    time.sleep(0.7)
    busy.release()
    done = a.wait(op)
    assert done.state is api.OperationState.FAILED and done.error is not None
    assert done.error["code"] == "DeadlineExpired"
    assert bed.hv.chain == [f1, bed.base] and not [c for c in bed.hv.calls if c[0] == "merge"]
    assert bed.notifier.sent == []


def test_a_merge_started_in_time_is_not_interrupted_by_the_deadline(tmp_path: Path) -> None:
    busy = Busy(tmp_path, deadlines=Deadlines(create=600.0, delete=3.0))
    try:
        bed, a = busy.bed, busy.a
        s1 = str(uuid.uuid4())
        f1 = bed.snapshot_now(s1)
        bed.hv.gate = threading.Event()  # the merge runs past the deadline
        req = api.DeleteSnapshotRequest(VOL, s1, None, None)
        t0, op = time.monotonic(), a.svc.delete_assisted_snapshot(CTX, req)
        for _ in range(3000):
            if bed.hv.running:
                break
            time.sleep(0.01)
        assert bed.hv.running == 1 and time.monotonic() - t0 < 3.0  # started in time
        time.sleep(max(0.0, t0 + 3.5 - time.monotonic()))
        bed.hv.gate.set()
        assert a.wait(op).state is api.OperationState.SUCCEEDED
        assert bed.hv.chain == [f1] and bed.notifier.sent == [(s1, Report.DELETE_DONE)]
    finally:
        busy.close()


def test_a_delete_resumed_after_its_deadline_is_not_merged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    busy = Busy(tmp_path, deadlines=TIGHT)
    bed = busy.bed
    s1 = str(uuid.uuid4())
    f1 = bed.snapshot_now(s1)
    died = crash_at(monkeypatch, "validate:planned")
    req = api.DeleteSnapshotRequest(VOL, s1, None, None)
    op = busy.a.svc.delete_assisted_snapshot(CTX, req)
    assert died.wait(30)
    busy.close()
    no_crash(monkeypatch)
    time.sleep(0.7)  # the agent was down past Cinder's wait
    again = bed.agent(deadlines=TIGHT)
    try:
        again.restart()
        done = again.svc.get_operation(CTX, op.id)
        assert done.state is api.OperationState.FAILED and done.error is not None
        assert done.error["code"] == "DeadlineExpired"
        assert bed.hv.chain == [f1, bed.base] and not [c for c in bed.hv.calls if c[0] == "merge"]
        assert bed.notifier.sent == []
    finally:
        again.close()


# -- capacity ---------------------------------------------------------------------------------
@pytest.mark.parametrize("own_pool", [True, False])
def test_create_proceeds_while_the_backup_pool_is_saturated(tmp_path: Path, own_pool: bool) -> None:
    busy = Busy(tmp_path, workers=1, cinder_workers=2 if own_pool else None)
    try:
        busy.hold(VOL2)  # the only general worker, blocked inside another disk's backup
        busy.held()
        busy.hold(VOL2)  # and a queue behind it
        snap, name, op = busy.create()
        if own_pool:
            assert busy.a.cinder_pool.wait_idle(30)
            assert _state(busy.a, op) is api.OperationState.SUCCEEDED
            assert busy.bed.hv.chain[0] == name
            assert busy.bed.notifier.sent == [(snap, Report.CREATE_DONE)]
        else:  # negative control: one shared pool starves it behind the backups
            time.sleep(0.5)
            assert _state(busy.a, op) is api.OperationState.QUEUED
        busy.release()
        assert busy.a.wait(op).state is api.OperationState.SUCCEEDED
    finally:
        busy.close()


def test_the_disk_stays_serialized_across_the_two_pools(busy: Busy) -> None:
    busy.hold(VOL)  # the backup holds VOL's disk in the general pool
    busy.held()
    _snap, name, op = busy.create()
    time.sleep(0.2)  # a Cinder worker is free: the job waits for the disk, not for a worker
    assert _state(busy.a, op) is api.OperationState.QUEUED
    assert not [c for c in busy.bed.hv.calls if c[0] == "snapshot"]
    assert busy.bed.engine.running == 1
    busy.release()
    assert busy.a.wait(op).state is api.OperationState.SUCCEEDED
    assert busy.bed.hv.chain[0] == name and busy.bed.engine.max_running == 1


# -- failures judged from the live chain ------------------------------------------------------
def test_a_snapshot_that_raised_after_qemu_switched_is_reported_done(
    busy: Busy, monkeypatch: pytest.MonkeyPatch
) -> None:
    hv, a = busy.bed.hv, busy.a
    real = hv.snapshot

    def switched_then_raised(where: Located, new_file: str) -> dict[str, Any]:
        real(where, new_file)
        raise RuntimeError("libvirt: connection lost while waiting for the reply")

    monkeypatch.setattr(hv, "snapshot", switched_then_raised)
    snap, name, op = busy.create()
    done = a.wait(op)
    assert hv.chain[0] == name
    assert done.state is api.OperationState.SUCCEEDED, done.error
    assert busy.bed.notifier.sent == [(snap, Report.CREATE_DONE)]  # never `error`
    step = next(s for s in done.result["steps"] if s["name"] == "snapshot")
    assert step["state"] == "done" and step["data"]["judged_from_live_chain"] is True


def test_a_snapshot_that_raised_before_switching_is_reported_error(busy: Busy) -> None:
    """Negative control: the live top is still the old file, so `error` is the truth."""
    busy.bed.hv.fail = RuntimeError("qemu said no")
    snap, name, op = busy.create()
    done = busy.a.wait(op)
    assert done.state is api.OperationState.FAILED
    assert busy.bed.hv.chain[0] != name
    assert busy.bed.notifier.sent == [(snap, Report.CREATE_FAILED)]


@pytest.mark.parametrize("merged", [True, False])
def test_a_merge_that_raised_is_judged_from_the_live_chain(
    busy: Busy, monkeypatch: pytest.MonkeyPatch, merged: bool
) -> None:
    hv, bed = busy.bed.hv, busy.bed
    s1, s2 = str(uuid.uuid4()), str(uuid.uuid4())
    f1, f2 = bed.snapshot_now(s1), bed.snapshot_now(s2)
    real = hv.merge

    def raised(where: Located, to_merge: Any, target: Any, progress: Any) -> dict[str, Any]:
        if merged:  # the job ended, its waiter failed
            real(where, to_merge, target, progress)
        raise TimeoutError("block job event never came")

    monkeypatch.setattr(hv, "merge", raised)
    op = busy.a.svc.delete_assisted_snapshot(CTX, api.DeleteSnapshotRequest(VOL, s1, f1, bed.base))
    done = busy.a.wait(op)
    if merged:
        assert hv.chain == [f2, bed.base]
        assert done.state is api.OperationState.SUCCEEDED, done.error
        assert bed.notifier.sent == [(s1, Report.DELETE_DONE)]
    else:
        assert hv.chain == [f2, f1, bed.base]
        assert done.state is api.OperationState.FAILED
        assert bed.notifier.sent == [(s1, Report.DELETE_FAILED)]


def test_deadline_arithmetic_from_cinders_waits() -> None:
    d = Deadlines()  # Cinder 29: 600 s / 7200 s; a create keeps 15 s for the snapshot
    d.check("create", 1000.0, now=1000.0 + 584.9)
    with pytest.raises(DeadlineExpired):
        d.check("create", 1000.0, now=1000.0 + 585.0)
    d.check("delete", 1000.0, now=1000.0 + 7199.9)
    with pytest.raises(DeadlineExpired):
        d.check("delete", 1000.0, now=1000.0 + 7200.0)
    with pytest.raises(ValueError, match="create_deadline"):
        Deadlines(create=10.0, create_reserve=15.0)
