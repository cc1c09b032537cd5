"""AssistedService with a fake hypervisor and notifier over real qcow2 files and journal."""

from __future__ import annotations

import functools
import os
import subprocess
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hostagent.cinder.outbox import NotifyQueue
from hostagent.cinder.status import NotifyUnreachable, Report, Reported
from hostagent.journal.model import NotificationState
from hostagent.journal.store import Journal
from hostagent.pool import KeyedPool
from hostagent.rpc import contract as api
from hostagent.service import AssistedService, Located
from libvirt_ops import ChainLayer, Disk

VOL = "0b5e0a52-1c1b-4a7e-9d43-7f0c6f0e2a11"
CTX = api.CallContext()
DOM = "6a1c8b0e-5d2f-4c1e-8f4a-2b3c4d5e6f70"


def _img(path: Path, backing: str | None = None) -> None:
    argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing:
        argv += ["-b", backing, "-F", "qcow2"]
    subprocess.run([*argv, str(path), "1M"], check=True)


class FakeHv:
    """Chain kept in memory (top first); snapshot/merge record calls and may block."""

    def __init__(self, directory: Path, chain: list[str]) -> None:
        self.dir = directory
        self.chain = chain
        self.calls: list[tuple[Any, ...]] = []
        self.gate: threading.Event | None = None
        self.running = 0
        self.max_running = 0
        self.fail: Exception | None = None
        self._lock = threading.Lock()

    def locate(self, volume_id: str) -> Located:
        if volume_id != VOL:
            raise api.VolumeNotFound(volume_id)
        layers = tuple(
            ChainLayer(str(self.dir / n), "qcow2", None if i == 0 else i)
            for i, n in enumerate(self.chain)
        )
        return Located(DOM, Disk("vdb", VOL, "virtio", layers))

    def _act(self, call: tuple[Any, ...]) -> None:
        with self._lock:
            self.calls.append(call)
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        try:
            if self.gate is not None:
                assert self.gate.wait(30)
            if self.fail is not None:
                raise self.fail
        finally:
            with self._lock:
                self.running -= 1

    def snapshot(self, where: Located, new_file: str) -> dict[str, Any]:
        self._act(("snapshot", new_file))
        self.chain.insert(0, new_file)
        return {"chain": list(self.chain)}

    def merge(self, where: Located, to_merge: Any, target: Any, progress: Any) -> dict[str, Any]:
        self._act(("merge", to_merge, target))
        progress(5, 10)
        return {"kind": "commit" if target else "pull"}

    def inventory(self) -> api.Inventory:
        return api.Inventory("h", ())


class FakeNotifier:
    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.sent: list[tuple[str, Report]] = []

    def _r(self, sid: str, report: Report) -> Reported:
        if self.failures > 0:
            self.failures -= 1
            raise NotifyUnreachable(sid, report, 1, "connection refused")
        self.sent.append((sid, report))
        return Reported(sid, report, 1)

    def report_create_done(self, sid: str) -> Reported:
        return self._r(sid, Report.CREATE_DONE)

    def report_create_failed(self, sid: str) -> Reported:
        return self._r(sid, Report.CREATE_FAILED)

    def report_delete_done(self, sid: str) -> Reported:
        return self._r(sid, Report.DELETE_DONE)

    def report_delete_failed(self, sid: str) -> Reported:
        return self._r(sid, Report.DELETE_FAILED)


class Bed:
    def __init__(self, tmp: Path, failures: int = 0) -> None:
        self.dir = tmp / "share"
        self.dir.mkdir()
        base = f"volume-{VOL}"
        _img(self.dir / base)
        self.hv = FakeHv(self.dir, [base])
        self.journal = Journal(str(tmp / "j.sqlite"), host="h")
        self.notifier = FakeNotifier(failures)
        self.queue = NotifyQueue(self.journal, self.notifier)
        self.pool = KeyedPool(4)
        self.svc = AssistedService(self.journal, self.hv, self.queue, self.pool, roots=[str(tmp)])

    def precreate(self, snap: str) -> str:
        """An overlay made as Cinder makes it: relative backing = the current top."""
        name = f"volume-{VOL}.{snap}"
        _img(self.dir / name, self.hv.chain[0])
        return name

    def create(self, snap: str, new_file: str) -> api.Operation:
        req = api.CreateSnapshotRequest.from_wire(
            VOL, {"snapshot_id": snap, "type": "qcow2", "new_file": new_file}
        )
        return self.svc.create_assisted_snapshot(CTX, req)

    def delete(self, snap: str, to_merge: str | None, target: str | None) -> api.Operation:
        info = {"type": "qcow2", "file_to_merge": to_merge, "merge_target_file": target}
        req = api.DeleteSnapshotRequest.from_wire(VOL, snap, info)
        return self.svc.delete_assisted_snapshot(CTX, req)

    def final(self, op: api.Operation) -> api.Operation:
        assert self.pool.wait_idle(30)
        return self.svc.get_operation(CTX, op.id)

    def close(self) -> None:
        self.pool.shutdown()
        self.journal.close()


@pytest.fixture
def bed(tmp_path: Path) -> Any:
    b = Bed(tmp_path)
    yield b
    b.close()


def _steps(op: api.Operation) -> list[tuple[str, str]]:
    return [(s["name"], s["state"]) for s in op.result["steps"]]


def test_create_runs_journaled_steps_and_reports_creating_90(bed: Bed) -> None:
    snap = str(uuid.uuid4())
    op = bed.final(bed.create(snap, bed.precreate(snap)))
    assert op.state is api.OperationState.SUCCEEDED
    assert _steps(op) == [("validate", "done"), ("snapshot", "done"), ("notify", "done")]
    assert bed.notifier.sent == [(snap, Report.CREATE_DONE)]
    assert op.volume_ids == (VOL,) and op.snapshot_id == snap


def test_same_snapshot_id_twice_is_one_operation_and_one_snapshot(bed: Bed) -> None:
    snap = str(uuid.uuid4())
    name = bed.precreate(snap)
    first = bed.create(snap, name)
    bed.final(first)
    again = bed.create(snap, name)  # the file is now in the chain: still answered, not redone
    assert again.id == first.id
    assert [c for c in bed.hv.calls if c[0] == "snapshot"] == [("snapshot", name)]
    assert len(bed.svc.list_operations(CTX, api.OperationFilters())) == 1


@pytest.mark.parametrize(
    "case",
    ["unknown_volume", "missing_file", "wrong_backing", "other_volume", "merge_not_in_chain",
     "target_above"],
)  # fmt: skip
def test_bad_requests_touch_nothing(bed: Bed, case: str) -> None:
    snap = str(uuid.uuid4())
    top = bed.hv.chain[0]
    if case == "wrong_backing":
        _img(bed.dir / "volume-x-elsewhere")  # not a volume file: a hostile backing name
        name = f"volume-{VOL}.{snap}"
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-b", top, "-F", "raw",
             str(bed.dir / name), "1M"],
            check=True,
        )  # fmt: skip
    before = sorted(os.listdir(bed.dir))
    expected: type[Exception] = api.InvalidRequest
    call: Callable[[], object]
    if case == "unknown_volume":
        expected = api.VolumeNotFound
        req = api.CreateSnapshotRequest(str(uuid.uuid4()), snap, f"volume-{VOL}.{snap}")
        call = lambda: bed.svc.create_assisted_snapshot(CTX, req)  # noqa: E731
    elif case in ("missing_file", "wrong_backing"):
        call = lambda: bed.create(snap, f"volume-{VOL}.{snap}")  # noqa: E731
    elif case == "other_volume":
        other = f"volume-{uuid.uuid4()}.{snap}"
        call = lambda: bed.create(snap, other)  # noqa: E731
    elif case == "merge_not_in_chain":
        call = lambda: bed.delete(snap, f"volume-{VOL}.{uuid.uuid4()}", top)  # noqa: E731
    else:
        call = lambda: bed.delete(snap, top, top)  # noqa: E731
    with pytest.raises(expected):
        call()
    assert sorted(os.listdir(bed.dir)) == before
    assert bed.hv.calls == []
    assert bed.svc.list_operations(CTX, api.OperationFilters()) == []
    assert bed.notifier.sent == []


def test_commit_delete_journals_merge_and_progress(bed: Bed) -> None:
    s1, s2 = str(uuid.uuid4()), str(uuid.uuid4())
    bed.final(bed.create(s1, bed.precreate(s1)))
    bed.final(bed.create(s2, bed.precreate(s2)))
    middle, base = bed.hv.chain[1], bed.hv.chain[2]
    op = bed.final(bed.delete(s1, middle, base))
    assert op.state is api.OperationState.SUCCEEDED
    assert _steps(op) == [("validate", "done"), ("merge", "done"), ("notify", "done")]
    assert op.result["progress"] == {"cur": 5, "end": 10}
    assert bed.hv.calls[-1] == ("merge", middle, base)
    assert bed.notifier.sent[-1] == (s1, Report.DELETE_DONE)


def test_failed_snapshot_reports_error_and_fails_operation(bed: Bed) -> None:
    snap = str(uuid.uuid4())
    bed.hv.fail = RuntimeError("qemu said no")
    op = bed.final(bed.create(snap, bed.precreate(snap)))
    assert op.state is api.OperationState.FAILED
    assert op.error is not None and "qemu said no" in op.error["message"]
    assert _steps(op) == [("validate", "done"), ("snapshot", "failed"), ("notify", "done")]
    assert bed.notifier.sent == [(snap, Report.CREATE_FAILED)]


def test_operations_on_one_disk_never_overlap(bed: Bed) -> None:
    s1, s2 = str(uuid.uuid4()), str(uuid.uuid4())
    bed.final(bed.create(s1, bed.precreate(s1)))
    bed.final(bed.create(s2, bed.precreate(s2)))
    chain = list(bed.hv.chain)
    bed.hv.gate = threading.Event()
    a = bed.delete(s1, chain[1], chain[2])
    b = bed.delete(s2, chain[1], chain[2])  # same disk: queued behind a
    assert bed.svc.get_operation(CTX, b.id).state is api.OperationState.QUEUED
    bed.hv.gate.set()
    assert bed.final(a).state is api.OperationState.SUCCEEDED
    assert bed.final(b).state is api.OperationState.SUCCEEDED
    assert bed.hv.max_running == 1


def test_pool_runs_different_keys_in_parallel() -> None:
    pool = KeyedPool(2)
    barrier = threading.Barrier(2, timeout=30)
    done: list[str] = []

    def job(key: str) -> None:
        barrier.wait()
        done.append(key)

    for key in ("d1", "d2"):
        pool.submit(key, functools.partial(job, key))
    assert pool.wait_idle(30)
    assert sorted(done) == ["d1", "d2"]  # a serialized pool would break the barrier
    pool.shutdown()


def test_failed_notification_is_journaled_and_resent(tmp_path: Path) -> None:
    bed = Bed(tmp_path, failures=1)
    try:
        snap = str(uuid.uuid4())
        op = bed.final(bed.create(snap, bed.precreate(snap)))
        assert op.state is api.OperationState.SUCCEEDED
        assert op.result["steps"][-1]["data"]["delivered"] is False
        (note,) = bed.journal.pending_notifications(due_only=False)
        assert (note.status, note.progress, note.attempts) == ("creating", "90%", 1)
        assert bed.notifier.sent == []
        # a fresh queue (agent restart) resends everything pending at start
        again = NotifyQueue(bed.journal, bed.notifier, poll_interval=0.05)
        again.start()
        try:
            for _ in range(600):
                if bed.notifier.sent:
                    break
                threading.Event().wait(0.05)
        finally:
            again.stop()
        assert bed.notifier.sent == [(snap, Report.CREATE_DONE)]
        assert bed.journal.notification(note.id).state is NotificationState.SENT
    finally:
        bed.close()
