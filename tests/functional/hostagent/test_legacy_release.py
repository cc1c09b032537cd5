"""An earlier qsnap's checkpoint overlays (``volume-<vid>.qsnap-bk-<key>``) at the first start
of this version: released once, from the journal, and only where that cannot lose a write.

A real guest on the dir share, two volumes, a real agent process (``[cinder] enabled =
false``). Volume 1's live top is a legacy overlay holding writes made after it was taken (as
an incremental backup of the old version left it); volume 2 has a legacy overlay file that is
NOT in its live chain (the guest was restarted below it, as a fast hard reboot does). The
journal names both, as the old version's backup operations did. At start the agent must
merge volume 1's overlay down (the writes stay readable, the file goes, the chain is the base
again) and leave volume 2's file byte for byte (merging it offline would overwrite the
guest's newer writes: the old reaper's data loss), reporting it; a second start does nothing.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

import libvirt_ops as lo
from hostagent.backup.legacy import ACTION, LEGACY_NAMING
from hostagent.journal.model import OperationKind, OperationState
from hostagent.journal.store import Journal
from hostagent.rpc import contract as api
from testbed.agent import AgentProcess
from testbed.guest import GuestFactory
from testbed.shares import DirShare

pytestmark = [pytest.mark.functional, pytest.mark.timeout(600)]
CTX: dict[str, Any] = {"request_id": "req-legacy-release"}


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _journal_old_backup(journal: Journal, domain: str, vid: str, overlay: str) -> None:
    """A backup operation as the earlier version journaled it (its request names overlays)."""
    request = {"domain": domain, "volume_id": vid, "overlay": overlay, "old_checkpoint": None,
               "incremental": True, "keep_checkpoint": True}  # fmt: skip
    op = journal.begin(OperationKind.BACKUP, request, locks=[f"volume:{vid}"]).operation
    journal.finish(op.id, OperationState.SUCCEEDED, result={"chain_after": [overlay]})


def _legacy_ops(agent: AgentProcess) -> list[api.Operation]:
    ops = agent.api.list_operations(CTX, api.OperationFilters(limit=1000))
    return [o for o in ops if o.result.get("released") is not None]


def test_legacy_overlays_released_once_and_only_when_live(
    dir_guests: GuestFactory, dir_share: DirShare, rabbitmq: Any, bed_dir: Path, libvirt_host: Any
) -> None:
    g = dir_guests(ndisks=2)
    (v1, m1), (v2, _) = ((d.volume_id, d.mountpoint) for d in g.disks[:2])
    d = Path(g.dir)
    base1, base2 = g.chain(v1)[0], g.chain(v2)[0]
    live = f"volume-{v1}.qsnap-bk-{uuid.uuid4()}"
    stray = d / f"volume-{v2}.qsnap-bk-{uuid.uuid4()}"
    spec = lo.DiskSnapshotSpec(new_file=live, volume_id=v1)
    req = lo.SnapshotRequest(domain=g.uuid, disks=(spec,), naming=LEGACY_NAMING)
    lo.take_snapshot(libvirt_host.connection, req, roots=[str(dir_share.root)])
    assert g.chain(v1) == [live, base1]
    marker = uuid.uuid4().hex
    g.check(["sh", "-c", f"echo {marker} > {m1}/after-overlay; sync"])
    # standalone (the guest holds base2's write lock); only its name and place matter here
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(stray), "16M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x77 0 1M", str(stray)], check=True,
                   capture_output=True)  # fmt: skip
    stray_sha, stray_mtime = _sha(stray), stray.stat().st_mtime_ns

    work = bed_dir / "agent"
    work.mkdir()
    conf = {"agent": {"workers": 2, "merge_timeout": 120}, "cinder": {"enabled": "false"}}
    agent = AgentProcess(work, rabbitmq.transport_url, dir_share.root, prefix="lg", conf=conf)
    agent.state.mkdir(parents=True, exist_ok=True)
    with Journal(str(agent.state / "journal.sqlite")) as j:
        _journal_old_backup(j, g.uuid, v1, live)
        _journal_old_backup(j, g.uuid, v2, stray.name)
    try:
        agent.start()
        assert g.chain(v1) == [base1], "the live legacy overlay was not merged down"
        assert not (d / live).exists()
        assert not g.dom.blockJobInfo(g.disks[0].target, 0)
        out = g.check(["/bin/cat", f"{m1}/after-overlay"]).decode().strip()
        assert out == marker  # the writes the overlay held are in Cinder's file now
        # negative control of the data-loss guard: the stray is never merged offline
        assert stray.exists() and _sha(stray) == stray_sha
        assert stray.stat().st_mtime_ns == stray_mtime
        assert g.chain(v2) == [base2]
        (marker_op,) = _legacy_ops(agent)
        assert marker_op.result["released"] == [live]
        assert list(marker_op.result["left"]) == [stray.name]
        assert "not the live top" in marker_op.result["left"][stray.name]
        agent.stop()
        agent.start()  # once: the marker is there, nothing runs again
        assert len(_legacy_ops(agent)) == 1
        assert stray.exists() and _sha(stray) == stray_sha
        assert ACTION == "legacy_release"
    finally:
        agent.close()
        if stray.exists():
            os.unlink(stray)
