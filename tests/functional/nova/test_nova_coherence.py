"""Issue 13's must-show: with a real Nova managing the guest, every chain change qsnap makes
reaches Nova's BDM and Cinder's records before it is reported done.

Per share kind (dir, GlusterFS): Nova 34 + Placement + Cinder 29 + RabbitMQ, nova-compute
running qsnap's driver (``compute_driver = qsnap.QsnapLibvirtDriver``), the qsnap agent with
``[nova] enabled``. A server boots from a Cinder volume through Nova's API; a raw and a qcow2
volume are attached through Nova, each with the guest's record writer on it. The tests of
this module run in order on that one server (each leaves it as the next expects).
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from hostagent.rpc import contract as api
from testbed.disks import fsck_clean
from testbed.guest import GuestError
from testbed.nova import NovaCloud
from tests.functional.nova.coherence import (
    MOUNTS,
    QSNAP_DRIVER,
    Incoherent,
    NovaBed,
    agent_beside_nova,
    agree,
    ensure_mounted,
    point_in_time,
    qemu_img_check,
    snapshot_beside_nova,
    stop_and_read,
    survived,
)

pytestmark = pytest.mark.functional

CTX = {"request_id": "req-nova-coherence"}
AGENT_HOST = f"qsnap-nova-agent-{uuid.uuid4().hex[:6]}"


@dataclass
class Bed(NovaBed):
    pit: dict[str, tuple[str, str]] = field(default_factory=dict)  # snapshot -> (vol, sha)

    def agree(self, when: str) -> None:
        agree(self.cloud, self.srv, self.all_volumes(), when)


@pytest.fixture(scope="module")
def nova_compute_driver() -> str:
    return QSNAP_DRIVER


@pytest.fixture(scope="module")
def nova_extra_conf() -> dict[str, dict[str, str]]:
    return {"qsnap": {"agent_host": AGENT_HOST, "rpc_timeout": "20"}}


@pytest.fixture(scope="module")
def bed(nova_cloud: NovaCloud) -> Iterator[Bed]:
    """The agent beside nova-compute, on Nova's RabbitMQ, ``[nova] enabled``."""
    with agent_beside_nova(nova_cloud, AGENT_HOST) as agent:
        yield Bed(nova_cloud, agent)


def test_boot_attach_and_write(bed: Bed) -> None:
    cloud = bed.cloud
    bed.server = cloud.boot_server()
    for kind in ("raw", "qcow2"):
        vid = cloud.create_volume(fmt=kind)
        cloud.attach(bed.srv, vid)
        cloud.mount_volume(bed.srv, vid, MOUNTS[kind])
        bed.vols[kind] = vid
    bed.srv.guest.start_writers(mounts=list(MOUNTS.values()))
    bed.agree("boot and attach")
    for kind, vid in bed.vols.items():  # the real formats, as created
        assert bed.cloud.live_top(bed.srv, vid)[1] == kind


def test_cinder_snapshots_go_through_nova_to_the_agent(bed: Bed) -> None:
    """Three forced creates, then delete middle, newest, oldest, per volume; the agent's
    journal shows each (reporter nova: Nova, not the agent, told Cinder)."""
    cloud, seen = bed.cloud, []
    for vid in bed.vols.values():
        sids = []
        for n in range(3):
            sids.append(cloud.snapshot(vid))
            bed.agree(f"Cinder snapshot {n + 1} of {vid}")
        order = (sids[1], sids[2], sids[0])
        for sid, what in zip(order, ("middle", "newest", "oldest"), strict=True):
            cloud.delete_snapshot(sid)
            bed.agree(f"Cinder delete of the {what} snapshot of {vid}")
        assert cloud.live_top(bed.srv, vid)[0] == f"volume-{vid}.{sids[2]}"
        seen += sids
    ops = bed.agent.api.list_operations(CTX, api.OperationFilters(limit=1000))
    by_kind = {(o.kind, o.snapshot_id) for o in ops if o.state is api.OperationState.SUCCEEDED}
    for sid in seen:
        assert (api.OperationKind.CREATE_ASSISTED, sid) in by_kind
        assert (api.OperationKind.DELETE_ASSISTED, sid) in by_kind
    one = next(o for o in ops if o.snapshot_id == seen[0])
    full = bed.agent.api.get_operation(CTX, one.id)
    notify = [s for s in full.result["steps"] if s["name"] == "notify"]
    assert notify and notify[-1]["data"]["delivered"] == "by nova"


def test_qsnap_instance_snapshot_owned_delete_and_backup(bed: Bed) -> None:
    agent, vols = bed.agent.api, list(bed.vols.values())
    op = bed.op(agent.snapshot_instance(CTX, bed.srv.id, vols))
    assert [s["name"] for s in op.result["steps"]][-1] == "nova_refresh"
    bed.agree("qsnap instance snapshot")
    snaps = {s["volume_id"]: s["snapshot_id"] for s in op.result["snapshots"]}
    for vid, sid in snaps.items():
        bed.pit[sid] = (vid, point_in_time(bed.cloud, vid, sid))
    raw = bed.vols["raw"]
    below = bed.cloud.live_top(bed.srv, raw)
    bed.op(agent.delete_snapshot(CTX, raw, snaps[raw]))  # the newest: active commit + pivot
    bed.pit.pop(snaps[raw])
    bed.agree("qsnap owned delete")
    top = bed.cloud.live_top(bed.srv, raw)
    assert top[0] != f"volume-{raw}.{snaps[raw]}" and top != below  # the file below is live
    started = agent.create_backup(CTX, volume_ids=vols, instance_uuid=None, incremental=False)
    assert bed.op(started).result is not None
    bed.agree("plain backup")
    # an incremental keeps its checkpoint, a snapshot recorded everywhere (test_nova_backups)
    inc = bed.op(agent.create_backup(CTX, volume_ids=vols, instance_uuid=None, incremental=True))
    bed.agree("incremental backup")
    for b in inc.result["backups"]:  # a user's delete of a checkpoint is an owned delete
        bed.op(agent.delete_snapshot(CTX, b["volume_id"], b["checkpoint"]))
    bed.agree("checkpoints deleted")


def test_a_kill_before_the_nova_refresh_converges_at_restart(bed: Bed) -> None:
    """kill -9 after the snapshot is taken and recorded in Cinder, before Nova heard of it:
    the records disagree (the hazard), and the restarted agent finishes the refresh before
    it reports the operation done."""
    cloud, agent, vid = bed.cloud, bed.agent, bed.vols["qcow2"]
    assert agent.stop() == 0
    agent.start(crash_at="nova_refresh:planned")
    started = agent.api.snapshot_instance(CTX, bed.srv.id, [vid])
    agent.wait_died()
    with pytest.raises(Incoherent, match="bdm"):
        agree(cloud, bed.srv, [vid], "a kill before the refresh")
    agent.start()
    done = bed.op(started)
    steps = [(s["name"], s["state"]) for s in done.result["steps"]]
    assert steps.count(("nova_refresh", "done")) == 1, steps
    bed.agree("the restart after a kill at nova_refresh")
    sid = done.result["snapshots"][0]["snapshot_id"]
    bed.pit[sid] = (vid, point_in_time(cloud, vid, sid))


def test_hard_reboot_and_stop_start_keep_every_write(bed: Bed) -> None:
    cloud, srv = bed.cloud, bed.srv
    before = stop_and_read(srv, MOUNTS.values())
    assert all(log.count > 0 for log in before.values())
    cloud.reboot_hard(srv)
    for kind, vid in bed.vols.items():
        ensure_mounted(srv, vid, MOUNTS[kind])
    survived(before, srv, "reboot --hard")
    bed.agree("reboot --hard")
    bed.restart_writers()

    before = stop_and_read(srv, MOUNTS.values())
    cloud.stop(srv)
    for vid in bed.vols.values():
        qemu_img_check(cloud, vid)
        name, fmt = cloud.views(srv, vid)["info"]
        fsck = fsck_clean(cloud.volume_path(vid, name), fmt)
        assert fsck.ok, fsck.output
    cloud.start(srv)
    bed.restart_writers()
    survived(before, srv, "stop + start")
    bed.agree("stop + start")
    assert bed.pit, "the instance snapshot of the qcow2 volume remains"
    for sid, (vid, sha) in bed.pit.items():
        assert point_in_time(cloud, vid, sid) == sha, f"snapshot {sid} changed"


def test_bad_input_agent_down_or_refusing(bed: Bed) -> None:
    """Nova reports error to Cinder as stock Nova does; nothing frozen, BDM unchanged."""
    cloud, vid = bed.cloud, bed.vols["qcow2"]
    bdm_before = cloud.bdm_connection_info(bed.srv.id, vid)["data"]["name"]
    # Nova's side gone (nova-compute down): qsnap's own chain changes are refused up front
    vols = list(bed.vols.values())
    tops = {v: cloud.live_top(bed.srv, v) for v in vols}
    known = len(bed.agent.api.list_operations(CTX, api.OperationFilters(limit=1000)))
    cloud.svc.stop("nova-compute", timeout=3.0)
    try:
        with pytest.raises(api.NovaUnavailable, match="cannot be reached"):
            bed.agent.api.snapshot_instance(CTX, bed.srv.id, vols)
    finally:
        cloud.restart_compute()
    assert {v: cloud.live_top(bed.srv, v) for v in vols} == tops
    assert len(bed.agent.api.list_operations(CTX, api.OperationFilters(limit=1000))) == known
    assert bed.agent.stop() == 0
    try:
        with pytest.raises(Exception, match="error"):
            cloud.snapshot(vid, timeout=120)
        frozen = bed.srv.guest.agent("guest-fsfreeze-status")
        assert frozen == "thawed"
        assert cloud.bdm_connection_info(bed.srv.id, vid)["data"]["name"] == bdm_before
    finally:
        bed.agent.start()
    bed.agree("agent down")
    # refusing: Cinder's ledger names a file that is not the live top, so new_file backs
    # onto the wrong file and the agent refuses it (nothing journaled, nothing touched)
    info = cloud.volume_path(vid, f"volume-{vid}.info")
    saved = info.read_bytes()
    decoy = cloud.volume_path(vid, f"volume-{vid}.{uuid.uuid4()}")
    try:
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", str(decoy), "1G"], check=True, timeout=60
        )
        ledger = json.loads(saved)
        ledger["active"] = decoy.name
        info.write_text(json.dumps(ledger, indent=1, sort_keys=True))
        with pytest.raises(Exception, match="error"):
            cloud.snapshot(vid, timeout=120)
    finally:
        info.write_bytes(saved)
        decoy.unlink(missing_ok=True)
    assert bed.srv.guest.agent("guest-fsfreeze-status") == "thawed"
    assert cloud.bdm_connection_info(bed.srv.id, vid)["data"]["name"] == bdm_before
    bed.agree("agent refusing")


def test_negative_control_a_snapshot_beside_nova_loses_writes(bed: Bed) -> None:
    """The pre-fix behaviour (an external snapshot Nova never hears of) must make the same
    checks fail: the record comparison at once, the data check after a hard reboot."""
    cloud, srv, vid = bed.cloud, bed.srv, bed.vols["raw"]
    bed.restart_writers()
    snapshot_beside_nova(cloud, srv, vid)
    with pytest.raises(Incoherent, match="bdm"):
        agree(cloud, srv, [vid], "a snapshot beside Nova")
    srv.guest.write_marker(f"{MOUNTS['raw']}/after-snapshot", "written into the overlay")
    before = stop_and_read(srv, [MOUNTS["raw"]])
    cloud.reboot_hard(srv)
    with pytest.raises((Incoherent, GuestError)):  # the records, or the disk, are gone
        ensure_mounted(srv, vid, MOUNTS["raw"])
        survived(before, srv, "reboot --hard after a snapshot beside Nova")
