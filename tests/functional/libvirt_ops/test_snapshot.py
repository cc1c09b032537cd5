"""Quiesced external snapshots on a real guest, both share kinds, record writers running.

What must hold: only the snapshotted disks' filesystems freeze, once (one stall in their
writers, none in the others', which keep writing through the window); the frozen layers
(old tops, now backing files) pass e2fsck with no journal replay and hold a clean prefix of
the live record log; ``require`` without an agent changes nothing; ``prefer`` says it fell
back; a guest frozen by a process that dies or hangs is thawed by the watchdog.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import libvirt_ops as lo
from testbed.disks import fsck_clean, read_guest_file
from testbed.records import parse_records
from tests.functional.libvirt_ops.snapshot_helpers import hold_inside_freeze, spec, stalls

pytestmark = [pytest.mark.functional, pytest.mark.timeout(240)]

HOLD_S = 0.8
STALL_NS = 600_000_000  # far above the writers' noise (<= ~200 ms seen), below HOLD_S


def _roots(g: Any) -> list[str]:
    return [str(g.dir)]


def _check_frozen_layer(g: Any, old_top: str, mount: str) -> None:
    """The layer frozen by the snapshot is a clean filesystem holding a prefix of the log."""
    fsck = fsck_clean(Path(old_top), "qcow2")
    assert fsck.ok, fsck.output
    assert not fsck.needs_recovery, "journal needs replay: the freeze did not flush"
    frozen_log = parse_records(read_guest_file(Path(old_top), "qcow2", "/records"))
    assert frozen_log.clean, frozen_log.problems
    assert frozen_log.count > 0
    live = g.records(mount)
    assert frozen_log.is_prefix_of(live)
    assert live.count > frozen_log.count, "the live disk did not keep running"


def _snap_phase(g: Any, monkeypatch: pytest.MonkeyPatch, indexes: list[int]) -> lo.SnapshotResult:
    before = {d.target: lo.find_disk(g.dom, volume_id=d.volume_id).source for d in g.disks}
    t0 = g.guest_time_ns()
    req = lo.SnapshotRequest(g.uuid, tuple(spec(g, i) for i in indexes), lo.QuiescePolicy.REQUIRE)
    with hold_inside_freeze(monkeypatch, HOLD_S):
        res = take_snapshot(g, req)
    time.sleep(0.5)  # let every writer write after the thaw
    assert res.quiesced and res.method is lo.FreezeMethod.FREEZE_LIST
    snapped = {g.disks[i].mountpoint for i in indexes}
    assert set(res.frozen_mountpoints) == snapped
    logs = {d.mountpoint: g.records(d.mountpoint) for d in g.disks}
    windows = []
    for mount in sorted(snapped):
        got = stalls(logs[mount], t0, STALL_NS)
        assert len(got) == 1, f"{mount}: {len(got)} stalls over 0.6 s, expected one freeze"
        windows.append(got[0])
    lo_ns, hi_ns = max(a for a, _ in windows), min(b for _, b in windows)
    assert lo_ns < hi_ns, "the stalls do not overlap: more than one freeze"
    for d in g.disks:
        if d.mountpoint in snapped:
            continue
        assert stalls(logs[d.mountpoint], t0, STALL_NS) == [], f"{d.mountpoint} froze too"
        inside = logs[d.mountpoint].count_between(lo_ns + 100_000_000, hi_ns - 100_000_000)
        assert inside > 0, f"{d.mountpoint} did not write while the others were frozen"
    by_target = {r.target: r for r in res.disks}
    for i in indexes:
        d = g.disks[i]
        r = by_target[d.target]
        assert r.chain[1].path == before[d.target]
        assert os.path.basename(r.new_file) in os.listdir(g.dir)
        _check_frozen_layer(g, before[d.target], d.mountpoint)
    return res


def take_snapshot(g: Any, req: lo.SnapshotRequest) -> lo.SnapshotResult:
    return lo.take_snapshot(g.conn, req, roots=_roots(g))


def test_quiesced_snapshot_of_one_some_all_disks(
    guest_factory: Any, share: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    g = guest_factory(ndisks=3, share=share)
    g.start_writers(interval_ms=10, sync_every=1)
    time.sleep(0.5)
    _snap_phase(g, monkeypatch, [0])  # 1 of 3: /data2 and /data3 must not stall
    _snap_phase(g, monkeypatch, [1, 2])  # 2 of 3
    res = _snap_phase(g, monkeypatch, [0, 1, 2])  # all, vda for the second time
    assert len(res.disks[0].chain) == 3
    _concurrent_snapshots_of_two_disks(g)


def _concurrent_snapshots_of_two_disks(g: Any) -> None:
    """Two snapshots of different disks of one domain at once both succeed: each sees the
    other's disk change underneath it, which must not turn a taken snapshot into an error."""
    reqs = [lo.SnapshotRequest(g.uuid, (spec(g, i),), lo.QuiescePolicy.OFF) for i in (1, 2)]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda r: take_snapshot(g, r), reqs))
    for i, res in zip((1, 2), results, strict=True):
        live = lo.find_disk(g.dom, volume_id=g.disks[i].volume_id)
        assert live.source == res.disks[0].new_file
        assert len(live.chain) == 4


def test_require_without_agent_changes_nothing_prefer_falls_back(guest: Any) -> None:
    g = guest
    g.start_writers()
    g.run(["/bin/sh", "-c", "(sleep 1; kill $(pidof qemu-ga)) >/dev/null 2>&1 &"])
    lo.wait_agent_state(g.conn, g.dom, connected=False, timeout=30)
    before = lo.domain_disks(g.dom)
    files_before = sorted(os.listdir(g.dir))
    fast = lo.Deadlines(agent=2.0, max_frozen=5.0)
    req = lo.SnapshotRequest(g.uuid, (spec(g, 0), spec(g, 1)), lo.QuiescePolicy.REQUIRE, fast)
    with pytest.raises(lo.QuiesceFailed):
        take_snapshot(g, req)
    assert sorted(os.listdir(g.dir)) == files_before, "an overlay was left behind"
    assert lo.domain_disks(g.dom) == before

    pref = lo.SnapshotRequest(g.uuid, (spec(g, 1),), lo.QuiescePolicy.PREFER, fast)
    res = take_snapshot(g, pref)
    assert not res.quiesced
    assert res.method is lo.FreezeMethod.NONE
    assert res.fallback_reason and "agent" in res.fallback_reason
    assert res.disks[0].chain[1].path == before[1].source
    assert lo.find_disk(g.dom, volume_id=g.disks[0].volume_id).source == before[0].source


def _freeze_status(g: Any) -> str:
    return str(g.agent("guest-fsfreeze-status"))


def _wait_thawed(g: Any, timeout: float) -> None:
    stop = time.monotonic() + timeout
    while _freeze_status(g) != "thawed":
        assert time.monotonic() < stop, "guest still frozen"
        time.sleep(0.2)


def _freezer(g: Any, max_frozen: float) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.functional.libvirt_ops.snapshot_helpers",
            g.conn.uri,
            g.uuid,
            str(max_frozen),
            "/data",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[3],
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "frozen"
    assert _freeze_status(g) == "frozen"
    return proc


def test_watchdog_thaws_when_the_freezer_dies_or_hangs(guest: Any) -> None:
    g = guest
    g.start_writers()
    # 1. our process is killed while the guest is frozen: EOF on the pipe -> thaw at once
    count_before = g.records("/data2").count  # /data2 is not frozen; /data is
    proc = _freezer(g, max_frozen=3600)
    proc.kill()
    proc.wait()
    _wait_thawed(g, timeout=30)
    t_thawed = g.guest_time_ns()
    time.sleep(0.5)
    assert g.records("/data").count_between(t_thawed, 2**63) > 0, "/data writer did not resume"
    assert g.records("/data2").count > count_before

    # 2. our process hangs (SIGSTOP, pipe still open): thaw at the deadline
    proc = _freezer(g, max_frozen=2.0)
    try:
        os.kill(proc.pid, signal.SIGSTOP)
        _wait_thawed(g, timeout=30)
        t_thawed = g.guest_time_ns()
        time.sleep(0.5)
        assert g.records("/data").count_between(t_thawed, 2**63) > 0
        assert proc.poll() is None, "the freezer should still be (stopped) alive"
    finally:
        proc.kill()
        proc.wait()
