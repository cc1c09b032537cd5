"""``settle_block_job`` on a real writing guest: jobs a dead process left behind.

A job is started with the raw libvirt API and never awaited (exactly what a kill -9 of the
agent leaves: libvirt keeps the job, nobody will pivot it). Then settle must: pivot an
active commit (found before or after READY), await a plain commit still running, do nothing
on an idle disk; afterwards no job, the live chain as expected, headers with plain relative
backing names, ``qemu-img check`` clean, and the guest's record log still clean.
One guest on a plain-directory share (the share kind does not matter to libvirt's job API).
"""

from __future__ import annotations

import os
import time
from typing import Any

import libvirt
import pytest

import libvirt_ops as lo
from testbed.guest import GuestFactory
from testbed.layers import backing_name, live_paths, qemu_img_check, real, snapshot_disk
from testbed.shares import DirShare

pytestmark = pytest.mark.functional
MiB = 1 << 20


def _dirty(g: Any, mib: int) -> None:
    """Data in the current top layer (random, so the commit has something to copy)."""
    g.check(["sh", "-c", f"dd if=/dev/urandom of=/data/blob bs=1M count={mib} 2>&1; sync"], 60)


def test_settle_jobs_a_dead_process_left(dir_guests: GuestFactory, dir_share: DirShare) -> None:
    g, share = dir_guests(ndisks=1), dir_share
    conn, dom, vol = g.conn, g.dom, g.disks[0].volume_id
    roots = [str(share.root)]
    base = g.disks[0].path
    g.start_writers(interval_ms=10)

    # 1. an idle disk: nothing found, nothing done
    idle = lo.settle_block_job(conn, dom, vol, timeout=30, roots=roots)
    assert idle.found is None and idle.end is None and not idle.pivoted
    assert idle.chain_after == idle.chain_before == real(base)

    # 2. an active commit started and abandoned at once (not READY yet, or just READY)
    s1 = snapshot_disk(dom, "vda", vol)
    _dirty(g, 8)
    flags = libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE | libvirt.VIR_DOMAIN_BLOCK_COMMIT_RELATIVE
    disk = lo.find_disk(dom, volume_id=vol)
    dom.blockCommit("vda", disk.address(disk.chain[1]), None, 0, flags)
    assert dom.blockJobInfo("vda", 0), "the abandoned job must be there"
    res = lo.settle_block_job(conn, dom, "vda", timeout=120, roots=roots)
    assert res.found is lo.JobType.ACTIVE_COMMIT and res.pivoted
    assert res.end is lo.JobEnd.COMPLETED
    assert res.chain_before == real(s1, base) and res.chain_after == real(base)
    assert live_paths(g) == real(base) and not dom.blockJobInfo("vda", 0)
    qemu_img_check(base)

    # 3. an active commit abandoned long after READY (libvirt mirrors forever): pivoted
    s2 = snapshot_disk(dom, "vda", vol)
    _dirty(g, 4)
    disk = lo.find_disk(dom, volume_id=vol)
    dom.blockCommit("vda", disk.address(disk.chain[1]), None, 0, flags)
    deadline = time.monotonic() + 60
    while True:  # cur == end (> 0) is libvirt's READY in blockJobInfo
        info = dom.blockJobInfo("vda", 0)
        if info and info["end"] > 0 and info["cur"] == info["end"]:
            break
        assert time.monotonic() < deadline, f"job never READY: {info}"
        time.sleep(0.1)
    time.sleep(1.0)  # stays READY: an active commit never ends by itself
    assert dom.blockJobInfo("vda", 0), "a READY active commit must still be there"
    res = lo.settle_block_job(conn, dom, vol, timeout=120, roots=roots)
    assert res.found is lo.JobType.ACTIVE_COMMIT and res.pivoted
    assert res.chain_before == real(s2, base) and live_paths(g) == real(base)
    assert os.path.exists(s2), "settle never deletes files"

    # 4. a plain commit of an inner layer, throttled so it is still running when settled
    s3 = snapshot_disk(dom, "vda", vol)
    _dirty(g, 3)
    s4 = snapshot_disk(dom, "vda", vol)
    disk = lo.find_disk(dom, volume_id=vol)
    top, below = disk.address(disk.chain[1]), disk.address(disk.chain[2])
    cflags = (
        libvirt.VIR_DOMAIN_BLOCK_COMMIT_RELATIVE | libvirt.VIR_DOMAIN_BLOCK_COMMIT_BANDWIDTH_BYTES
    )
    dom.blockCommit("vda", below, top, 2 * MiB, cflags)
    assert dom.blockJobInfo("vda", 0), "the throttled commit must still run"
    res = lo.settle_block_job(conn, dom, vol, timeout=120, roots=roots)
    assert res.found is lo.JobType.COMMIT and not res.pivoted
    assert res.end in (lo.JobEnd.COMPLETED, lo.JobEnd.VANISHED)
    assert res.chain_before == real(s4, s3, base)
    assert res.chain_after == real(s4, base) == live_paths(g)
    assert backing_name(s4) == base.name, "backing name must stay a plain relative basename"
    qemu_img_check(s4)
    qemu_img_check(base)

    # 5. the disk takes new jobs again, and the guest never noticed
    merged = lo.active_commit(conn, dom, vol, roots=roots)
    assert merged.chain_after == real(base)
    g.stop_writers()
    log = g.records("/data")
    assert log.clean and log.count > 100, log.problems
