"""Checkpoint overlays of a guest that is destroyed (what a Nova stop or hard reboot does)
are merged into Cinder's active file at once, so a restart from Cinder's connection info
sees every write; an overlay outside a running guest's chain is reported, never touched.

One 2-disk guest per share kind (plain directory and GlusterFS FUSE mount), a real
libvirt event stream, the reaper the agent runs.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

import libvirt_ops as lo
from hostagent.backup.online import BackupRequest, backup_volume, is_backup_overlay, overlay_name
from hostagent.backup.reaper import OverlayReaper
from hostagent.backup.repo import Repository
from hostagent.inventory import read_attachments
from hostagent.journal.model import OperationKind, OperationState
from hostagent.journal.store import Journal
from hostagent.rpc.contract import Inventory
from testbed.disks import fsck_clean, read_guest_file

pytestmark = [pytest.mark.functional, pytest.mark.timeout(600)]


def _releases(journal: Journal, vol: str) -> list[Any]:
    return [
        op
        for op in journal.list_operations(kind=OperationKind.BACKUP, lock=f"volume:{vol}")
        if op.request.get("action") == "release"
    ]


def _stat(p: Path) -> tuple[int, int]:
    st = p.stat()
    return st.st_size, st.st_mtime_ns


def test_destroyed_guest_checkpoints_merged_stray_overlay_reported(
    guest_factory: Any, libvirt_host: Any, share: Any, bed_dir: Path
) -> None:
    conn: lo.Connection = libvirt_host.connection
    g = guest_factory(ndisks=2, share=share)
    vols = [d.volume_id for d in g.disks]
    repo = Repository.create(bed_dir / f"repo-{uuid.uuid4().hex[:6]}")
    journal = Journal(str(bed_dir / f"journal-{uuid.uuid4().hex[:6]}.sqlite"))
    reaper = OverlayReaper(conn, journal, roots=[str(share.root)])
    reaper.start()
    try:
        reaper.remember(Inventory("here", read_attachments(conn.get())))
        base = {v: g.chain(v) for v in vols}
        # 1. incremental backups leave a checkpoint overlay on top of both disks
        tops = {}
        for v in vols:
            r = backup_volume(conn, journal, BackupRequest(g.uuid, v, repo.path, incremental=True))
            assert r.checkpoint is not None and g.chain(v) == [r.checkpoint, *base[v]]
            tops[v] = r.checkpoint
        # 2. the guest writes after the backup: only the checkpoint overlays hold this
        want = {}
        for d in g.disks:
            g.check(["sh", "-c", f"head -c 3145728 /dev/urandom > {d.mountpoint}/after; sync"])
            out = g.check(["sha256sum", f"{d.mountpoint}/after"]).decode().split()[0]
            want[d.volume_id] = out
        # 3. a stray overlay outside the running chain: reported, nothing touched
        v1, d1 = vols[0], Path(g.dir)
        stray = d1 / overlay_name(v1, str(uuid.uuid4()))
        argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-b", base[v1][0], "-F", "qcow2"]
        subprocess.run([*argv, str(stray)], check=True)
        before = {n: _stat(d1 / n) for n in (stray.name, tops[v1], base[v1][0])}
        op = reaper.sweep(v1, "test")
        assert op is not None and op.state is OperationState.FAILED
        assert op.error is not None and op.error.type == "StrandedOverlay"
        assert stray.name in op.error.message
        assert {n: _stat(d1 / n) for n in before} == before
        assert g.chain(v1) == [tops[v1], *base[v1]]
        stray.unlink()
        # a running guest whose chain holds its checkpoint: nothing to do, no operation
        assert reaper.sweep(v1, "test") is None
        # 4. the domain is destroyed: both checkpoints merged into Cinder's files at once
        g.destroy()
        deadline = time.monotonic() + 180
        while any(
            not [o for o in _releases(journal, v) if o.state.value in ("succeeded", "failed")]
            for v in vols
        ):
            assert time.monotonic() < deadline, [_releases(journal, v) for v in vols]
            time.sleep(0.5)
        for d in g.disks:
            v = d.volume_id
            (rel,) = _releases(journal, v)[-1:]
            assert rel.state is OperationState.SUCCEEDED, rel.error
            assert rel.result["released"] == [tops[v]]
            assert rel.request["why"] == "stopped"
            assert not [n for n in os.listdir(g.dir) if is_backup_overlay(n, v)]
            active = Path(g.dir) / base[v][0]
            got = read_guest_file(active, d.fmt, "/after")
            assert hashlib.sha256(got).hexdigest() == want[v]
            fsck = fsck_clean(active, d.fmt)
            assert fsck.ok, fsck.output
    finally:
        reaper.stop()
        journal.close()
