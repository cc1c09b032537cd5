"""Block-job waiting and merge verification against a fake libvirt (events and state).

The fake keeps blockJobInfo state per disk and lets each test decide which events arrive,
when the connection "reconnects", and what the live XML says afterwards. No daemon needed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import libvirt
import pytest

import libvirt_ops as lo
from libvirt_ops import _merge
from libvirt_ops._domain import parse_disks

UUID = "11111111-2222-3333-4444-555555555555"
V = "/share/d/volume-aaaaaaaa-0000-0000-0000-000000000000"
S1 = V + ".bbbbbbbb-0000-0000-0000-000000000001"
S2 = V + ".bbbbbbbb-0000-0000-0000-000000000002"
S3 = V + ".bbbbbbbb-0000-0000-0000-000000000003"
BLOCK_JOB_2 = libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2


def disk_xml(chain: list[str], first_index: int = 7) -> str:
    """A domain XML whose vda has ``chain`` (top first), libvirt-style decreasing indexes."""
    inner = "<backingStore/>"
    for n, path in enumerate(reversed(chain[1:])):
        inner = (
            f"<backingStore type='file' index='{first_index - len(chain) + 2 + n}'>"
            f"<format type='qcow2'/><source file='{path}'/>{inner}</backingStore>"
        )
    return (
        "<domain><devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file='{chain[0]}'/>{inner}<target dev='vda' bus='virtio'/>"
        "<serial>vol-1</serial></disk></devices></domain>"
    )


class FakeDom:
    def __init__(self, conn: FakeConn, chain: list[str]) -> None:
        self.conn = conn
        self.xml = disk_xml(chain)
        self.jobs: dict[str, dict[str, int]] = {}
        self.calls: list[tuple[Any, ...]] = []
        self.refuse: str | None = None
        self.on_start: Callable[[], object] | None = None
        self.on_abort: Callable[[int], object] | None = None

    def UUIDString(self) -> str:
        return UUID

    def name(self) -> str:
        return "fake"

    def XMLDesc(self, _flags: int = 0) -> str:
        return self.xml

    def blockJobInfo(self, disk: str, _flags: int) -> dict[str, int]:
        return dict(self.jobs.get(disk, {}))

    def _start(self, kind: int, *call: Any) -> int:
        self.calls.append(call)
        if self.refuse:
            raise libvirt.libvirtError(self.refuse)
        self.jobs["vda"] = {"type": kind, "bandwidth": 0, "cur": 0, "end": 100}
        if self.on_start is not None:
            self.on_start()
        return 0

    def blockCommit(self, *args: Any) -> int:
        kind = 4 if args[4] & libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE else 3
        return self._start(kind, "commit", *args)

    def blockRebase(self, *args: Any) -> int:
        return self._start(1, "rebase", *args)

    def blockJobAbort(self, disk: str, flags: int = 0) -> int:
        self.calls.append(("abort", disk, flags))
        if self.on_abort is not None:
            self.on_abort(flags)
        return 0

    def blockJobSetSpeed(self, disk: str, bw: int, flags: int) -> int:
        self.calls.append(("speed", disk, bw, flags))
        return 0

    def finish(self, status: int, *, event: bool = True, chain: list[str] | None = None) -> None:
        """End the job in the fake: drop its info, optionally change the XML, send the event."""
        job = self.jobs.pop("vda", None)
        if chain is not None:
            self.xml = disk_xml(chain)
        if event and job is not None:
            self.conn.emit(self, "vda", job["type"], status)


class FakeConn:
    """Stands in for libvirt_ops.Connection: subscriptions, reconnect listeners, get()."""

    uri = "fake:///"

    def __init__(self) -> None:
        self.subs: list[tuple[int, Callable[..., None]]] = []
        self.listeners: list[Callable[[], None]] = []
        self.dom: FakeDom | None = None
        self.generation = 1

    def subscribe(self, event_id: int, cb: Callable[..., None]) -> int:
        self.subs.append((event_id, cb))
        return len(self.subs)

    def on_reconnect(self, listener: Callable[[], None]) -> None:
        self.listeners.append(listener)

    def get(self) -> FakeConn:
        return self

    def lookupByUUIDString(self, _uuid: str) -> FakeDom:
        assert self.dom is not None
        return self.dom

    def emit(self, dom: FakeDom, disk: str, job_type: int, status: int) -> None:
        for event_id, cb in self.subs:
            if event_id == BLOCK_JOB_2:
                cb(self, dom, disk, job_type, status, None)

    def reconnect(self) -> None:
        self.generation += 1
        for listener in self.listeners:
            listener()


@pytest.fixture
def fake() -> FakeDom:
    conn = FakeConn()
    conn.dom = FakeDom(conn, [S2, S1, V])
    return conn.dom


def job(dom: FakeDom, kind: lo.JobType = lo.JobType.COMMIT, **opts: Any) -> lo.BlockJob:
    return lo.BlockJob(dom.conn, dom, "vda", kind, lo.JobOptions(**opts))  # type: ignore[arg-type]


def later(fn: Callable[[], None], delay: float = 0.05) -> threading.Timer:
    t = threading.Timer(delay, fn)
    t.start()
    return t


# -- waiting -----------------------------------------------------------------------------


def test_completed_event_ends_the_wait(fake: FakeDom) -> None:
    with job(fake) as j:
        j.start(lambda d: d.blockCommit("vda", "vda[5]", "vda[6]", 0, 0))
        later(lambda: fake.finish(libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED))
        assert j.wait(frozenset({lo.JobEnd.COMPLETED})) is lo.JobEnd.COMPLETED
    assert not j.event_lost
    assert ("abort", "vda", 0) not in fake.calls  # a finished job is not aborted on exit


def test_events_of_other_disks_types_and_before_start_are_ignored(fake: FakeDom) -> None:
    with job(fake) as j:
        fake.conn.emit(fake, "vda", 3, libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED)  # before start
        j.start(lambda d: d.blockCommit("vda", "vda[5]", "vda[6]", 0, 0))
        fake.conn.emit(fake, "vdb", 3, libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED)
        fake.conn.emit(fake, "vda", 1, libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED)  # a pull
        later(lambda: fake.finish(libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED))
        assert j.wait(frozenset({lo.JobEnd.COMPLETED})) is lo.JobEnd.COMPLETED


def test_failed_event_is_terminal_even_when_waiting_for_ready(fake: FakeDom) -> None:
    with job(fake, lo.JobType.ACTIVE_COMMIT) as j:
        j.start(lambda d: d.blockCommit("vda", "vda[6]", None, 0, 4))
        later(lambda: fake.finish(libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED))
        assert j.wait(frozenset({lo.JobEnd.READY})) is lo.JobEnd.FAILED


def test_deadline_raises_timeout_and_aborts_the_job(fake: FakeDom) -> None:
    with job(fake, timeout=0.2) as j:
        j.start(lambda d: d.blockCommit("vda", "vda[5]", "vda[6]", 0, 0))
        with pytest.raises(lo.Timeout):
            j.wait(frozenset({lo.JobEnd.COMPLETED}))
    assert ("abort", "vda", 0) in fake.calls


def test_progress_callback_gets_cur_and_end(fake: FakeDom) -> None:
    seen: list[tuple[int, int]] = []

    def progress(cur: int, end: int) -> None:
        seen.append((cur, end))
        fake.jobs["vda"]["cur"] = min(100, cur + 50)
        if len(seen) == 3:
            later(lambda: fake.finish(libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED), 0)

    with job(fake, progress=progress, progress_interval=0.01) as j:
        j.start(lambda d: d.blockCommit("vda", "vda[5]", "vda[6]", 0, 0))
        assert j.wait(frozenset({lo.JobEnd.COMPLETED})) is lo.JobEnd.COMPLETED
    assert seen[:3] == [(0, 100), (50, 100), (100, 100)]
    assert j.last_end == 100


def test_cancel_token_aborts_and_waits_for_canceled(fake: FakeDom) -> None:
    token = lo.CancelToken()
    fake.on_abort = lambda flags: later(
        lambda: fake.finish(libvirt.VIR_DOMAIN_BLOCK_JOB_CANCELED), 0.02
    )
    with job(fake, cancel=token) as j:
        j.start(lambda d: d.blockCommit("vda", "vda[5]", "vda[6]", 0, 0))
        later(token.cancel)
        assert j.wait(frozenset({lo.JobEnd.COMPLETED})) is lo.JobEnd.CANCELED
    assert ("abort", "vda", libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_ASYNC) in fake.calls


# -- one job per disk --------------------------------------------------------------------


def test_second_job_on_the_same_disk_is_busy_at_once(fake: FakeDom) -> None:
    with job(fake) as j:
        j.start(lambda d: d.blockCommit("vda", "vda[5]", "vda[6]", 0, 0))
        with pytest.raises(lo.DiskBusy):
            job(fake).__enter__()
        fake.finish(libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED)
        j.wait(frozenset({lo.JobEnd.COMPLETED}))
    with job(fake):  # released again
        pass


def test_a_job_started_by_someone_else_makes_the_disk_busy(fake: FakeDom) -> None:
    fake.jobs["vda"] = {"type": 2, "bandwidth": 0, "cur": 1, "end": 9}
    with pytest.raises(lo.DiskBusy):
        job(fake).__enter__()
    fake.jobs.clear()
    with job(fake):  # the failed claim did not keep the lock
        pass


def test_refused_start_is_block_job_failed_and_releases_the_disk(fake: FakeDom) -> None:
    fake.refuse = "Permission denied"
    with pytest.raises(lo.BlockJobFailed, match="Permission denied"):
        with job(fake) as j:
            j.start(lambda d: d.blockCommit("vda", "vda[5]", "vda[6]", 0, 0))
    fake.refuse = None
    with job(fake):
        pass


# -- libvirtd restarts -------------------------------------------------------------------


def test_job_still_running_after_reconnect_is_awaited_further(fake: FakeDom) -> None:
    with job(fake) as j:
        j.start(lambda d: d.blockCommit("vda", "vda[5]", "vda[6]", 0, 0))
        later(fake.conn.reconnect, 0.02)
        later(lambda: fake.finish(libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED), 0.2)
        assert j.wait(frozenset({lo.JobEnd.COMPLETED})) is lo.JobEnd.COMPLETED
    assert not j.event_lost


def test_job_gone_after_reconnect_without_event_is_vanished(fake: FakeDom) -> None:
    with job(fake) as j:
        j.start(lambda d: d.blockCommit("vda", "vda[5]", "vda[6]", 0, 0))

        def lost() -> None:
            fake.finish(libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED, event=False)
            fake.conn.reconnect()

        later(lost)
        assert j.wait(frozenset({lo.JobEnd.COMPLETED})) is lo.JobEnd.VANISHED
    assert j.event_lost


def test_ready_seen_after_reconnect_from_job_info(fake: FakeDom) -> None:
    with job(fake, lo.JobType.ACTIVE_COMMIT) as j:
        j.start(lambda d: d.blockCommit("vda", "vda[6]", None, 0, 4))

        def ready_while_away() -> None:
            fake.jobs["vda"]["cur"] = 100  # libvirt shows cur == end only once READY
            fake.conn.reconnect()

        later(ready_while_away)
        assert j.wait(frozenset({lo.JobEnd.READY})) is lo.JobEnd.READY
    assert ("abort", "vda", 0) in fake.calls  # not pivoted: leaving aborts it


# -- merge planning and verification -----------------------------------------------------


def test_plans_name_explicit_addresses_and_expected_chains() -> None:
    (disk,) = parse_disks(disk_xml([S3, S2, S1, V]))
    opts = lo.JobOptions()
    ac = _merge.plan_active_commit(disk, None, opts)
    assert ac.expected == (S2, S1, V) and ac.merged_away == (S3,)
    cm = _merge.plan_commit(disk, S2.rsplit("/", 1)[1], None, opts)
    assert cm.expected == (S3, S1, V) and cm.merged_away == (S2,)
    pl = _merge.plan_pull(disk, S1, opts)
    assert pl.expected == (S3, S1, V) and pl.merged_away == (S2,)
    fl = _merge.plan_pull(disk, None, opts)
    assert fl.expected == (S3,) and fl.merged_away == (S2, S1, V)
    assert fl.kind is lo.MergeKind.FLATTEN

    calls: list[tuple[Any, ...]] = []

    class Rec:
        def blockCommit(self, *a: Any) -> None:
            calls.append(("commit", *a))

        def blockRebase(self, *a: Any) -> None:
            calls.append(("rebase", *a))

    for plan in (ac, cm, pl):
        plan.start(Rec())
    s2_idx = disk.address(disk.layer(S2))
    s1_idx = disk.address(disk.layer(S1))
    # base=None would mean the BOTTOM of the chain to libvirt: the base is always named.
    assert calls[0][:4] == ("commit", "vda", s2_idx, None)
    assert calls[0][5] & libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE
    assert calls[1][:4] == ("commit", "vda", s1_idx, s2_idx)
    assert calls[1][5] & libvirt.VIR_DOMAIN_BLOCK_COMMIT_RELATIVE
    assert calls[2][:3] == ("rebase", "vda", s1_idx)
    assert calls[2][4] & libvirt.VIR_DOMAIN_BLOCK_REBASE_RELATIVE


def test_plans_reject_names_not_in_the_chain_and_wrong_directions() -> None:
    (disk,) = parse_disks(disk_xml([S3, S2, S1, V]))
    opts = lo.JobOptions()
    with pytest.raises(lo.DiskNotFound):
        _merge.plan_commit(disk, "volume-aaaaaaaa-0000-0000-0000-000000000000.evil", None, opts)
    with pytest.raises(lo.DiskNotFound):
        _merge.plan_commit(disk, "/elsewhere/" + S2.rsplit("/", 1)[1], None, opts)
    with pytest.raises(ValueError):
        _merge.plan_commit(disk, S3, None, opts)  # the active layer
    with pytest.raises(ValueError):
        _merge.plan_commit(disk, S1, S2, opts)  # base above top
    with pytest.raises(ValueError):
        _merge.plan_pull(disk, S2, opts)  # the active layer's own backing: nothing to pull
    with pytest.raises(lo.DiskNotFound):
        _merge.plan_commit(disk, V, None, opts)  # the bottom has no backing file


def _merge_env(monkeypatch: pytest.MonkeyPatch, fake: FakeDom) -> None:
    """Headers agree with whatever the live XML says (inspection is qcow2's, tested there)."""
    monkeypatch.setattr(_merge, "_inspect", lambda disk, roots, naming: _merge._paths(disk.chain))


def test_commit_succeeds_only_with_the_expected_chain(
    monkeypatch: pytest.MonkeyPatch, fake: FakeDom
) -> None:
    _merge_env(monkeypatch, fake)
    fake.on_start = lambda: later(
        lambda: fake.finish(libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED, chain=[S2, V])
    )
    res = lo.commit(fake.conn, fake, "vol-1", top=S1, roots=["/share"])  # type: ignore[arg-type]
    assert res.chain_after == (S2, V) and res.merged_away == (S1,)
    assert res.chain_before == (S2, S1, V) and not res.event_lost


def test_completed_job_that_left_another_chain_is_failed(
    monkeypatch: pytest.MonkeyPatch, fake: FakeDom
) -> None:
    _merge_env(monkeypatch, fake)
    fake.on_start = lambda: later(
        lambda: fake.finish(libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED, chain=[S2, S1])
    )
    with pytest.raises(lo.BlockJobFailed, match="left chain"):
        lo.commit(fake.conn, fake, "vda", top=S1, roots=["/share"])  # type: ignore[arg-type]


def test_vanished_job_is_decided_by_the_chain(
    monkeypatch: pytest.MonkeyPatch, fake: FakeDom
) -> None:
    _merge_env(monkeypatch, fake)

    def vanish(chain: list[str] | None) -> None:
        fake.finish(libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED, event=False, chain=chain)
        fake.conn.reconnect()

    fake.on_start = lambda: later(lambda: vanish(None))  # nothing happened: failure
    with pytest.raises(lo.BlockJobFailed):
        lo.commit(fake.conn, fake, "vda", top=S1, roots=["/share"])  # type: ignore[arg-type]

    fake.on_start = lambda: later(lambda: vanish([S2, V]))  # it did finish: success
    res = lo.commit(fake.conn, fake, "vda", top=S1, roots=["/share"])  # type: ignore[arg-type]
    assert res.event_lost and res.chain_after == (S2, V)


def test_failed_event_is_block_job_failed(monkeypatch: pytest.MonkeyPatch, fake: FakeDom) -> None:
    _merge_env(monkeypatch, fake)
    fake.on_start = lambda: later(lambda: fake.finish(libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED))
    with pytest.raises(lo.BlockJobFailed, match="FAILED"):
        lo.pull(fake.conn, fake, "vda", base=V, roots=["/share"])  # type: ignore[arg-type]


def test_active_commit_pivots_after_ready(monkeypatch: pytest.MonkeyPatch, fake: FakeDom) -> None:
    _merge_env(monkeypatch, fake)

    def ready() -> None:
        fake.jobs["vda"]["cur"] = fake.jobs["vda"]["end"] = 4096
        fake.conn.emit(fake, "vda", 4, libvirt.VIR_DOMAIN_BLOCK_JOB_READY)

    def on_abort(flags: int) -> None:
        if flags & libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT:
            later(lambda: fake.finish(libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED, chain=[S1, V]))

    fake.on_start = lambda: later(ready)
    fake.on_abort = on_abort
    res = lo.active_commit(fake.conn, fake, "vol-1", roots=["/share"])  # type: ignore[arg-type]
    assert res.chain_after == (S1, V) and res.merged_away == (S2,)
    assert res.job_bytes == 4096
    assert ("abort", "vda", libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT) in fake.calls
