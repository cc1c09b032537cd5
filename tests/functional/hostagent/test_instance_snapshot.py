"""Instance snapshots and agent-owned deletes, end to end with real peers.

A real Cinder 29 (PyPI, qsnap's extension loaded) owns three volumes whose files on a plain
directory share are the three disks of one TCG guest, attached through the attachments API;
``qsnap-agent`` runs as a separate process over the private RabbitMQ. One guest, one Cinder
and one agent for the module; the test walks them through many steps. Every step is judged
from every side: the operation, Cinder's records, the ``.info`` ledgers against the real
chains (``qemu-img info -U --backing-chain``, formats pinned) and libvirt's live XML,
``qemu-img check``, no stray file, and the guest's own view of its data.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from hostagent.rpc import contract as api
from testbed.agent import CTX, final
from testbed.shares import DirShare
from tests.functional.hostagent.instance_bed import MOUNTS, InstanceBed

pytestmark = pytest.mark.functional


@pytest.fixture(scope="module")
def ibed(
    dir_share: DirShare, rabbitmq: Any, libvirt_host: Any, guest_image: Any
) -> Iterator[InstanceBed]:
    """The dir share only: Cinder's NfsDriver mounts nothing, and recovery and ledgers are
    share-independent (both share kinds are covered by test_agent_assisted.py)."""
    b = InstanceBed(dir_share, rabbitmq, libvirt_host.connection, guest_image)
    try:
        yield b
    finally:
        b.close()


def _write(g: Any, mount: str) -> tuple[str, str]:
    path = f"{mount}/f-{uuid.uuid4().hex[:6]}"
    g.check(["dd", "if=/dev/urandom", f"of={path}", "bs=64k", "count=4"], 60)
    return path, g.sha256(path)


def test_instance_snapshots_then_owned_deletes(ibed: InstanceBed) -> None:
    b, g = ibed, ibed.guest
    b.start()
    client = b.client()
    data = [_write(g, m) for m in MOUNTS]

    # 1. all disks, quiesce required: ONE operation, three available snapshots in Cinder
    op = final(client, client.snapshot_instance(CTX, g.uuid, None, api.Quiesce.REQUIRED), 120)
    assert op.state is api.OperationState.SUCCEEDED, (op.error, b.log.read_text()[-3000:])
    assert op.result["quiesced"] is True and sorted(op.volume_ids) == sorted(b.vols)
    first = {s["volume_id"]: s["snapshot_id"] for s in op.result["snapshots"]}
    assert sorted(first) == sorted(b.vols)
    for s in op.result["snapshots"]:
        assert s["file"] == str(b.dir / f"volume-{s['volume_id']}.{s['snapshot_id']}")
    steps = [s["name"] for s in op.result["steps"]]
    assert steps == ["plan", "cinder_create", "overlays", "snapshot", "ledger", "cinder_finalize"]
    for vid, sid in first.items():
        assert b.status(sid) == ("available", vid)
        assert b.check(vid, [sid]) == [f"volume-{vid}.{sid}", f"volume-{vid}"]
    b.no_strays()
    assert g.agent("guest-fsfreeze-status") == "thawed"

    # 2. a subset (one volume), crash-consistent allowed
    later = _write(g, MOUNTS[1])
    v2 = b.vols[1]
    op = final(client, client.snapshot_instance(CTX, g.uuid, [v2], api.Quiesce.PREFERRED), 120)
    assert op.state is api.OperationState.SUCCEEDED, op.error
    (snap,) = op.result["snapshots"]
    assert snap["volume_id"] == v2 and b.status(snap["snapshot_id"]) == ("available", v2)
    b.check(v2, [first[v2], snap["snapshot_id"]])
    for vid in (b.vols[0], b.vols[2]):
        b.check(vid, [first[vid]])  # not listed: untouched

    # 3. refusals touch nothing
    before = sorted(os.listdir(b.dir))
    with pytest.raises(api.VolumeNotFound):
        client.snapshot_instance(CTX, g.uuid, [str(uuid.uuid4())], api.Quiesce.NONE)
    with pytest.raises(api.SnapshotNotFound):
        client.delete_snapshot(CTX, v2, str(uuid.uuid4()))
    assert sorted(os.listdir(b.dir)) == before

    # 4. delete the newest by the RPC: active commit + pivot, ledger's active moves back
    after_snap = _write(g, MOUNTS[1])
    op = final(client, client.delete_snapshot(CTX, v2, snap["snapshot_id"]), 120)
    assert op.state is api.OperationState.SUCCEEDED, (op.error, b.log.read_text()[-3000:])
    assert op.kind is api.OperationKind.DELETE_OWNED and op.result["kind"] == "active-commit"
    assert op.result["progress"]["end"] > 0
    assert b.status(snap["snapshot_id"]) is None  # Cinder's record is gone
    assert not (b.dir / f"volume-{v2}.{snap['snapshot_id']}").exists()
    assert b.check(v2, [first[v2]]) == [f"volume-{v2}.{first[v2]}", f"volume-{v2}"]
    assert b.ledger(v2) == {
        "active": f"volume-{v2}.{first[v2]}",
        first[v2]: f"volume-{v2}.{first[v2]}",
    }

    # 5. delete an all-disks snapshot on another volume (its file is the top there too)
    v3 = b.vols[2]
    op = final(client, client.delete_snapshot(CTX, v3, first[v3]), 120)
    assert op.state is api.OperationState.SUCCEEDED, op.error
    assert b.status(first[v3]) is None and b.check(v3, []) == [f"volume-{v3}"]
    assert b.ledger(v3) == {"active": f"volume-{v3}"}
    b.no_strays()

    # the guest sees every byte it wrote, before and after each snapshot and delete
    for path, digest in [*data, later, after_snap]:
        assert g.sha256(path) == digest, path
    assert g.agent("guest-fsfreeze-status") == "thawed"
    b.stop()
