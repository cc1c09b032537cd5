"""Merges on a real guest (both share kinds) with the guest's record writers running.

What must hold after every merge: the live chain is the expected one, backing names in the
headers are plain basenames, merged-away files still exist (Cinder deletes them), the data
the guest sees is unchanged (files read in the guest with caches dropped; host-side
checksums of layers the guest does not write; a frozen before/after checksum of the whole
disk, and again after power-off), and ``qemu-img check`` passes.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path
from typing import Any

import libvirt
import pytest

import libvirt_ops as lo
from testbed.disks import fsck_clean, image_sha256, read_guest_file
from testbed.layers import backing_name, live_paths, qemu_img_check, real, snapshot_disk

pytestmark = pytest.mark.functional


def _drop_caches(g: Any) -> None:
    g.check(["/bin/sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"])


def _sha_in_guest(g: Any, path: str) -> str:
    return bytes(g.check(["sha256sum", path])).split()[0].decode()


def _assert_guest_files(g: Any, files: dict[str, str]) -> None:
    """Every file's SHA-256, computed in the guest after dropping its page cache."""
    _drop_caches(g)
    for path, digest in files.items():
        assert _sha_in_guest(g, path) == digest, f"{path} changed in the guest"


def _layered(g: Any, n: int, kib: int = 64) -> tuple[list[Path], dict[str, str]]:
    """n snapshots of vda, a distinct random file written into each layer before it is frozen."""
    files: dict[str, str] = {}
    snaps: list[Path] = []
    for i in range(n):
        path = f"/data/static-{i}-{os.urandom(4).hex()}"
        g.check(["dd", "if=/dev/urandom", f"of={path}", "bs=64k", f"count={kib // 64}"], 60)
        g.check(["/bin/sync"])
        files[path] = _sha_in_guest(g, path)
        snaps.append(snapshot_disk(g.dom, "vda", g.disks[0].volume_id))
    return snaps, files


def test_delete_middle_pull_newest(guest: Any, share: Any) -> None:
    g = guest
    roots = [str(share.root)]
    vol = g.disks[0].volume_id
    base = g.disks[0].path
    (s1, s2, s3, s4), files = _layered(g, 4)
    g.start_writers()
    assert live_paths(g) == real(s4, s3, s2, s1, base)

    # Delete a middle snapshot: commit S2 into S1. S3's view is not written by the guest,
    # so its checksum must be identical before and after, while the guest keeps writing.
    ref = image_sha256(s3, "qcow2")
    res = lo.commit(g.conn, g.dom, vol, top=s2.name, roots=roots)
    assert res.kind is lo.MergeKind.COMMIT and res.merged_away == real(s2)
    assert live_paths(g) == res.chain_after == real(s4, s3, s1, base)
    assert s2.exists()
    assert backing_name(s3) == s1.name
    assert image_sha256(s3, "qcow2") == ref
    qemu_img_check(s1)
    qemu_img_check(s3)

    # Rebase the active layer onto S1, pulling S3's data into it.
    res = lo.pull(g.conn, g.dom, "vda", base=s1.name, roots=roots)
    assert res.kind is lo.MergeKind.PULL and res.merged_away == real(s3)
    assert live_paths(g) == real(s4, s1, base)
    assert s3.exists() and backing_name(s4) == s1.name
    _assert_guest_files(g, files)

    # Delete the newest: active commit of S4 into S1 and pivot.
    res = lo.active_commit(g.conn, g.dom, vol, roots=roots)
    assert res.kind is lo.MergeKind.ACTIVE_COMMIT and res.merged_away == real(s4)
    assert live_paths(g) == real(s1, base)
    assert res.job_bytes is not None and res.job_bytes > 0
    assert s4.exists() and backing_name(s1) == base.name
    qemu_img_check(base)
    _assert_guest_files(g, files)

    # Once more with the guest frozen: the whole disk's checksum must not move at all,
    # and must still be the same after power-off.
    (s5,), more = _layered(g, 1)
    files.update(more)
    g.stop_writers()
    for mount in ("/data", "/data2"):
        log = g.records(mount)
        assert log.clean, (mount, log.problems)
        assert log.count > 10
    _assert_guest_files(g, files)
    # Stay frozen through power-off: a thaw would rewrite ext4's superblock.
    assert g.dom.fsFreeze() == 2
    ref = image_sha256(s5, "qcow2")
    res = lo.active_commit(g.conn, g.dom, vol, roots=roots)
    assert res.chain_after == real(s1, base)
    assert image_sha256(s1, "qcow2") == ref
    g.destroy()
    assert image_sha256(s1, "qcow2") == ref
    qemu_img_check(s1)
    qemu_img_check(base)
    fsck = fsck_clean(s1, "qcow2")
    assert fsck.ok and not fsck.needs_recovery, fsck.output
    for path, digest in files.items():
        data = read_guest_file(s1, "qcow2", path.removeprefix("/data"))
        assert hashlib.sha256(data).hexdigest() == digest


def _run_in_thread(fn: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def body() -> None:
        try:
            out["result"] = fn()
        except BaseException as exc:
            out["error"] = exc

    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t, out


def _wait_job(dom: Any, target: str, timeout: float = 30.0) -> dict[str, int]:
    """Test-side wait until libvirt shows a job (startup of a job in a thread)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = dom.blockJobInfo(target, 0)
        if info:
            return dict(info)
        time.sleep(0.05)
    raise AssertionError("block job did not appear")


#: Slow enough that a commit of a 2 MiB layer (4 chunks of 512 KiB) runs for minutes.
SLOW = 4096


def test_failure_busy_and_cancel(guest: Any, share: Any) -> None:
    g = guest
    roots = [str(share.root)]
    vol = g.disks[0].volume_id
    base = g.disks[0].path
    (s1, s2), files = _layered(g, 2, kib=2048)
    g.start_writers()
    before = live_paths(g)

    # A commit whose target QEMU cannot open for writing fails, and is reported as such.
    mode = base.stat().st_mode
    base.chmod(0o444)
    try:
        with pytest.raises(lo.BlockJobFailed):
            lo.commit(g.conn, g.dom, vol, top=s1.name, roots=roots)
    finally:
        base.chmod(mode & 0o7777)
    assert live_paths(g) == before
    assert not g.dom.blockJobInfo("vda", 0)

    # A job started by somebody else (plain libvirt) makes the disk busy at once.
    disk = lo.find_disk(g.dom, volume_id=vol)
    g.dom.blockCommit(
        "vda",
        disk.address(disk.layer(str(base))),
        disk.address(disk.layer(str(s1))),
        SLOW,
        libvirt.VIR_DOMAIN_BLOCK_COMMIT_BANDWIDTH_BYTES,
    )
    try:
        with pytest.raises(lo.DiskBusy):
            lo.active_commit(g.conn, g.dom, vol, roots=roots)
    finally:
        g.dom.blockJobAbort("vda", 0)
    assert live_paths(g) == before

    # Our own slow job: a second request is refused at once, then cancel ends the first.
    token = lo.CancelToken()
    seen: list[tuple[int, int]] = []
    opts = lo.JobOptions(
        bandwidth=SLOW, cancel=token, timeout=300, progress=lambda cur, end: seen.append((cur, end))
    )
    t, out = _run_in_thread(
        lambda: lo.commit(g.conn, g.dom, vol, top=s1.name, roots=roots, options=opts)
    )
    _wait_job(g.dom, "vda")
    with pytest.raises(lo.DiskBusy):
        lo.active_commit(g.conn, g.dom, vol, roots=roots)
    with pytest.raises(lo.DiskBusy):
        lo.pull(g.conn, g.dom, vol, base=base.name, roots=roots)
    token.cancel()
    t.join(60)
    assert not t.is_alive()
    assert isinstance(out.get("error"), lo.BlockJobFailed), out
    assert "CANCELED" in str(out["error"])
    assert seen and all(0 <= cur <= end for cur, end in seen)
    assert live_paths(g) == before
    assert not g.dom.blockJobInfo("vda", 0)

    # The disk is free again and the same merge now succeeds.
    res = lo.commit(g.conn, g.dom, vol, top=s1.name, roots=roots)
    assert res.chain_after == real(s2, base)
    _assert_guest_files(g, files)
    g.stop_writers()
    assert g.records("/data").clean


def test_libvirtd_restart_during_commit(guest: Any, share: Any, libvirt_host: Any) -> None:
    g = guest
    roots = [str(share.root)]
    vol = g.disks[0].volume_id
    base = g.disks[0].path
    conn = g.conn
    (s1, s2), files = _layered(g, 2, kib=2048)
    g.start_writers()

    opts = lo.JobOptions(bandwidth=SLOW, timeout=300)
    t, out = _run_in_thread(
        lambda: lo.commit(conn, g.dom, vol, top=s1.name, roots=roots, options=opts)
    )
    _wait_job(g.dom, "vda")
    gen = conn.generation
    libvirt_host.restart_daemon()
    deadline = time.monotonic() + 60
    while conn.generation == gen and time.monotonic() < deadline:
        time.sleep(0.05)
    assert conn.generation > gen, "connection did not reconnect"
    # The job survived the restart in QEMU and is still waited for; let it finish now.
    assert g.dom.blockJobInfo("vda", 0), "job vanished with the restart"
    assert t.is_alive()
    g.dom.blockJobSetSpeed("vda", 0, 0)
    t.join(120)
    assert not t.is_alive()
    assert "error" not in out, out
    res = out["result"]
    assert res.chain_after == real(s2, base) == live_paths(g)
    assert res.merged_away == real(s1)
    assert backing_name(s2) == base.name
    qemu_img_check(base)
    _assert_guest_files(g, files)
    g.stop_writers()
    assert g.records("/data").clean
