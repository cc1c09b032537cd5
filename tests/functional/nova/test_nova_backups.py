"""Issue 15's must-show on a real Nova: online backups read at a RECORDED checkpoint snapshot
keep every record of the volume coherent, lose no write, and stay incremental across a hard
reboot, a stop/start and a Cinder snapshot create + delete.

Why on the Nova bed: the checkpoint is an agent-owned Cinder snapshot that Nova's BDM must
name (a hard reboot or a start rebuilds the domain from it), and Cinder's own snapshots go
through Nova to the agent on top of it. Per share kind (dir, GlusterFS): Nova 34 + Placement
+ Cinder 29 + RabbitMQ, nova-compute running qsnap's driver, the qsnap agent beside it with
``[nova] enabled``; a server boots from a Cinder volume, a raw and a qcow2 volume are
attached through Nova, each with the guest's record writer on it. The tests of this module
run in order on that one server (each leaves it as the next expects).

After every step: ``agree`` (BDM, attachment, os-initialize_connection, ledger, live XML),
every live layer is the base or a ledger file, no ``*.qsnap-bk-*`` file, no record lost.
Each backup is restored to a file and compared with what the guest held when it was taken
(records a clean prefix of the guest's later ones, files of known content by SHA-256).
At the end Cinder deletes the volumes: the checkpoint is a Cinder snapshot, the one cost of
this design on the volume's lifecycle (README, "What a checkpoint costs").
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cinderclient.exceptions import BadRequest

from hostagent.rpc import contract as api
from libvirt_ops import find_disk
from testbed.disks import fsck_clean, read_guest_file
from testbed.nova import NovaCloud
from testbed.records import RecordLog, parse_records
from tests.functional.nova.coherence import (
    MOUNTS,
    QSNAP_DRIVER,
    NovaBed,
    agent_beside_nova,
    agree,
    backup_temporaries,
    chain_recorded,
    ensure_mounted,
    ledger,
    qemu_img_check,
    records_now,
    stop_and_read,
    survived,
)

pytestmark = [pytest.mark.functional, pytest.mark.timeout(900)]

CTX = {"request_id": "req-nova-backups"}
AGENT_HOST = f"qsnap-nova-bk-agent-{uuid.uuid4().hex[:6]}"
CHECKPOINT_NAME = "qsnap-backup-checkpoint-"  # the Cinder record's name: + snapshot id[:8]
CHECKPOINT_WHY = "qsnap backup checkpoint (operation {})"  # its description
PIT_MIB = 4


@dataclass
class Taken:
    """One volume's backup and what the guest held when it was taken."""

    entry: dict[str, Any]  # the create operation's per-volume result
    pits: dict[str, str]  # file (path inside the volume's filesystem) -> the guest's sha256
    before: RecordLog  # the guest's records when the backup started: all must be in it
    restored: RecordLog | None = None  # the restore's /records, judged against later reads


@dataclass
class Bed(NovaBed):
    """The Nova cloud, the agent beside it, the server and what the tests learnt so far."""

    taken: dict[str, list[Taken]] = field(default_factory=dict)  # kind -> backups, in order
    pits: dict[str, dict[str, str]] = field(default_factory=dict)  # kind -> file -> sha256
    markers: dict[str, str] = field(default_factory=dict)  # guest path -> its text

    @property
    def share(self) -> Path:
        return self.cloud.volume_path(self.srv.root_volume_id).parent

    def check(self, when: str) -> None:
        """The records agree, every live layer is recorded, no old-design temporary."""
        agree(self.cloud, self.srv, self.all_volumes(), when)
        chain_recorded(self.cloud, self.srv, self.all_volumes(), when)
        assert backup_temporaries(self.share) == [], f"after {when}"

    def writes(self, tag: str) -> None:
        """A marker file per volume beside the running writers (checked at the end)."""
        for mount in MOUNTS.values():
            path, text = f"{mount}/marker-{tag}", f"written {tag}\n"
            self.srv.guest.write_marker(path, text)
            self.markers[path] = text

    def pit(self, n: int) -> None:
        """``pit-<n>`` of known content on each volume, its SHA-256 taken by the guest:
        never modified later, so every later backup's restore must hold exactly it."""
        for kind, mount in MOUNTS.items():
            path = f"{mount}/pit-{n}"
            out = self.srv.guest.check(
                ["/bin/sh", "-c", f"dd if=/dev/urandom of={path} bs=1M count={PIT_MIB} "
                 f"2>/dev/null && sync && sha256sum {path}"], timeout=120,
            ).decode()  # fmt: skip
            self.pits.setdefault(kind, {})[f"/pit-{n}"] = out.split()[0]

    def backup(self, when: str) -> dict[str, dict[str, Any]]:
        """An incremental-if-possible backup of both volumes while the writers run; each
        volume's entry, by kind. No record may be lost meanwhile."""
        before = records_now(self.srv, MOUNTS.values())
        started = self.agent.api.create_backup(
            CTX, volume_ids=list(self.vols.values()), instance_uuid=None, incremental=True
        )
        done = self.op(started)
        survived(before, self.srv, when)
        self.check(when)
        by_vid = {b["volume_id"]: b for b in done.result["backups"]}
        assert set(by_vid) == set(self.vols.values()), done.result
        out = {kind: by_vid[vid] for kind, vid in self.vols.items()}
        for kind, entry in out.items():
            taken = Taken(entry, dict(self.pits[kind]), before[MOUNTS[kind]])
            self.taken.setdefault(kind, []).append(taken)
        return out

    def checkpoints_in_cinder(self, vid: str) -> dict[str, str]:
        """Cinder's backup-checkpoint snapshot records of the volume: id -> description."""
        snaps = self.cloud.cinder.client().volume_snapshots.list(search_opts={"volume_id": vid})
        return {s.id: s.description for s in snaps if (s.name or "").startswith(CHECKPOINT_NAME)}

    def checkpoint_alone_in_cinder(self, vid: str, entry: dict[str, Any]) -> None:
        """Cinder lists exactly one checkpoint of the volume: this backup's, named for it."""
        cp, why = entry["checkpoint"], CHECKPOINT_WHY.format(entry["operation_id"])
        assert self.checkpoints_in_cinder(vid) == {cp: why}, entry
        snap = self.cloud.cinder.client().volume_snapshots.get(cp)
        assert snap.name == f"{CHECKPOINT_NAME}{cp[:8]}" and snap.status == "available"

    def restore_and_compare(self, kind: str) -> None:
        """Restore the volume's newest backup to a raw file on the share: a clean
        filesystem whose /records are clean and whose pit files hold what the guest had."""
        vid, taken = self.vols[kind], self.taken[kind][-1]
        top = find_disk(self.srv.guest.dom, volume_id=vid).chain[0].path
        out = Path(os.path.dirname(top)) / f"restore-{uuid.uuid4().hex[:8]}.raw"
        try:
            done = self.op(
                self.agent.api.restore_backup(
                    CTX, taken.entry["backup_id"], to_path=str(out), volume_id=None, fmt="raw"
                )
            )
            assert done.kind is api.OperationKind.RESTORE and done.result["path"] == str(out)
            fsck = fsck_clean(out, "raw")
            assert fsck.ok and not fsck.needs_recovery, fsck.output
            log = parse_records(read_guest_file(out, "raw", "/records"))
            assert log.clean and log.count > 0, (kind, log.problems)
            assert taken.before.is_prefix_of(log), f"{kind}: records written before are missing"
            for name, sha in taken.pits.items():
                got = hashlib.sha256(read_guest_file(out, "raw", name)).hexdigest()
                assert got == sha, f"{kind} backup {taken.entry['backup_id']}: {name} differs"
            taken.restored = log
        finally:
            out.unlink(missing_ok=True)

    def restored_are_prefixes(self, later: dict[str, RecordLog], when: str) -> None:
        """Every restore's records are a prefix of the guest's later ones (nothing the
        backup holds was invented or reordered)."""
        for kind, backups in self.taken.items():
            for t in backups:
                assert t.restored is not None, f"{kind} backup {t.entry['backup_id']} unrestored"
                assert t.restored.is_prefix_of(later[MOUNTS[kind]]), (
                    f"{kind} backup {t.entry['backup_id']}: {t.restored.count} restored "
                    f"records are not a prefix of the guest's {later[MOUNTS[kind]].count} {when}"
                )


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


def test_full_backup_while_the_guest_writes(bed: Bed) -> None:
    """``incremental: true`` with no previous backup: a full read, at a checkpoint snapshot
    recorded everywhere (the ledger, Cinder, Nova's BDM) and now the live top."""
    cloud = bed.cloud
    bed.server = cloud.boot_server()
    for kind in ("raw", "qcow2"):
        vid = cloud.create_volume(fmt=kind)
        cloud.attach(bed.srv, vid)
        cloud.mount_volume(bed.srv, vid, MOUNTS[kind])
        bed.vols[kind] = vid
    bed.srv.guest.start_writers(mounts=list(MOUNTS.values()))
    bed.check("boot and attach")
    bed.writes("before-full")
    bed.pit(1)
    full = bed.backup("the full backup")
    for kind, b in full.items():
        vid, cp = bed.vols[kind], b["checkpoint"]
        assert b["incremental"] is False and b["bytes_read"] > 0, b
        assert "no previous backup" in (b["fallback_reason"] or ""), b
        assert bed.agent.api.get_backup(CTX, b["backup_id"])["kind"] == "full"
        assert b["checkpoint_file"] == f"volume-{vid}.{cp}" == ledger(cloud, vid)[cp], b
        assert cloud.live_top(bed.srv, vid)[0] == b["checkpoint_file"]
        bed.checkpoint_alone_in_cinder(vid, b)
        bed.restore_and_compare(kind)
    bed.check("the restores of the full backups")


def test_hard_reboot_and_stop_start_keep_every_write(bed: Bed) -> None:
    """The domain rebuilt from Nova's BDM twice: nothing lost, the checkpoints still
    recorded (so still tracking the changes)."""
    cloud, srv = bed.cloud, bed.srv
    bed.writes("before-reboot")
    before = stop_and_read(srv, MOUNTS.values())
    bed.restored_are_prefixes(before, "before reboot --hard")
    cloud.reboot_hard(srv)
    for kind, vid in bed.vols.items():
        ensure_mounted(srv, vid, MOUNTS[kind])
    survived(before, srv, "reboot --hard")
    bed.check("reboot --hard")
    bed.restart_writers()
    bed.writes("after-reboot")

    before = stop_and_read(srv, MOUNTS.values())
    cloud.stop(srv)
    for vid in bed.vols.values():
        qemu_img_check(cloud, vid)
    bed.check("stop")
    cloud.start(srv)
    bed.restart_writers()
    survived(before, srv, "stop + start")
    bed.check("stop + start")
    bed.writes("after-start")
    for kind, vid in bed.vols.items():
        cp = bed.taken[kind][-1].entry["checkpoint"]
        assert cp in ledger(cloud, vid), f"{kind}: checkpoint {cp} gone after the restarts"


def test_a_cinder_snapshot_create_and_delete_on_top_of_the_checkpoint(bed: Bed) -> None:
    """Cinder's own snapshot (through Nova to the agent) goes on top of the checkpoint; its
    delete pulls the checkpoint's file into its own and re-points the checkpoint's id."""
    cloud, srv = bed.cloud, bed.srv
    for kind, vid in bed.vols.items():
        before = records_now(srv, MOUNTS.values())
        sid = cloud.snapshot(vid)
        bed.check(f"Cinder snapshot of the {kind} volume")
        assert cloud.live_top(srv, vid)[0] == f"volume-{vid}.{sid}"
        cloud.delete_snapshot(sid)
        bed.check(f"Cinder delete of the {kind} volume's snapshot")
        survived(before, srv, f"Cinder snapshot create + delete on the {kind} volume")
        cp = bed.taken[kind][-1].entry["checkpoint"]
        assert sid not in ledger(cloud, vid) and cp in ledger(cloud, vid)
    bed.writes("after-cinder-snapshot")


def test_incremental_backup_reads_only_the_changes_and_drops_the_old_checkpoint(
    bed: Bed,
) -> None:
    cloud = bed.cloud
    old = {kind: t[-1].entry for kind, t in bed.taken.items()}
    old_files = {
        kind: {e["checkpoint_file"], ledger(cloud, bed.vols[kind])[e["checkpoint"]]}
        for kind, e in old.items()
    }
    bed.pit(2)
    inc = bed.backup("the incremental backup")
    for kind, b in inc.items():
        vid, prev = bed.vols[kind], old[kind]
        # the hard reboot, stop/start and Cinder snapshot create+delete keep the tracking
        assert b["fallback_reason"] is None, f"{kind}: a full read: {b['fallback_reason']}"
        assert b["incremental"] is True, b
        got = bed.agent.api.get_backup(CTX, b["backup_id"])
        assert got["kind"] == "incremental" and got["parent"] == prev["backup_id"], got
        print(f"{cloud.share_kind} {kind}: full read {prev['bytes_read']} B, "
              f"incremental {b['bytes_read']} B")  # fmt: skip
        assert 0 < b["bytes_read"] < prev["bytes_read"], (prev, b)
        assert b["dropped"] == [prev["checkpoint"]], b
        recorded = ledger(cloud, vid)
        assert prev["checkpoint"] not in recorded, recorded
        assert recorded[b["checkpoint"]] == b["checkpoint_file"] == cloud.live_top(bed.srv, vid)[0]
        for name in old_files[kind]:
            assert not cloud.volume_path(vid, name).exists(), f"{name} left behind"
        bed.checkpoint_alone_in_cinder(vid, b)
        bed.restore_and_compare(kind)
    bed.check("the restores of the incremental backups")


def test_cinder_deletes_the_volumes_despite_their_checkpoints(bed: Bed) -> None:
    """What a checkpoint costs the volume's lifecycle (README): detach is unaffected; a
    plain delete of a volume whose only snapshots are backup checkpoints cascades over
    them (the Cinder extension asks for it), while a volume with any other snapshot is
    refused as ever until ``cascade``. Either way no file of the volume remains."""
    cloud, srv = bed.cloud, bed.srv
    later = stop_and_read(srv, MOUNTS.values())
    bed.restored_are_prefixes(later, "at the end")
    for path, text in bed.markers.items():
        assert srv.guest.read_file(path).decode() == text, path
    for kind in list(bed.vols):
        vid = bed.vols[kind]
        srv.guest.check(["/bin/umount", MOUNTS[kind]], timeout=60)
        cloud.detach(srv, vid)
        del bed.vols[kind]
        bed.check(f"detach of the {kind} volume")
        bed.checkpoint_alone_in_cinder(vid, bed.taken[kind][-1].entry)
        if kind == "raw":  # only its checkpoint: the plain delete cascades over it
            cloud.delete_volume(vid, cascade=False)
        else:  # a snapshot of the user's too: refused as ever, then --cascade
            cloud.snapshot(vid)
            with pytest.raises(BadRequest, match="snapshot"):
                cloud.delete_volume(vid, cascade=False)
            assert cloud.cinder.client().volumes.get(vid).status == "available"
            cloud.delete_volume(vid, cascade=True)
        left = sorted(p.name for p in bed.share.glob(f"volume-{vid}*"))
        assert left == [], f"{kind} volume {vid}: {left} remain on the share"
    bed.check("the deletes")
