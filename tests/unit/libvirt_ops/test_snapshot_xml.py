"""Pure parts of the snapshot: the XML we send, the new_file rules, the freeze plan."""

from __future__ import annotations

import uuid
from pathlib import Path

import libvirt
import pytest
from lxml import etree

from libvirt_ops import SnapshotFailed
from libvirt_ops._agent import GuestFilesystem
from libvirt_ops._domain import ChainLayer, Disk
from libvirt_ops._quiesce import FreezeMethod, plan_freeze
from libvirt_ops._snapshot import BASE_FLAGS, snapshot_xml, validate_new_file
from qcow2.naming import CINDER

VOL = str(uuid.UUID(int=1))
SNAP = str(uuid.UUID(int=2))


def _disk(directory: Path, serial: str | None = VOL) -> Disk:
    base = directory / f"volume-{VOL}"
    base.write_bytes(b"")
    return Disk("vda", serial, "virtio", (ChainLayer(str(base), "qcow2", None),))


def test_xml_lists_every_disk_and_only_requested_are_external() -> None:
    xml = snapshot_xml(["vda", "vdb", "hdc"], {"vdb": "/s/volume-x.y"})
    root = etree.fromstring(xml)
    disks = {d.get("name"): d for d in root.findall("./disks/disk")}
    assert set(disks) == {"vda", "vdb", "hdc"}
    assert disks["vda"].get("snapshot") == "no"
    assert disks["hdc"].get("snapshot") == "no"
    vdb = disks["vdb"]
    assert vdb.get("snapshot") == "external"
    assert vdb.find("source").get("file") == "/s/volume-x.y"  # type: ignore[union-attr]
    assert vdb.find("driver").get("type") == "qcow2"  # type: ignore[union-attr]


def test_xml_escapes_paths() -> None:
    xml = snapshot_xml(["vda"], {"vda": "/s/a'b<c"})
    assert etree.fromstring(xml).find("./disks/disk/source").get("file") == "/s/a'b<c"  # type: ignore[union-attr]


def test_flags_are_one_atomic_disk_only_reuse_call_without_quiesce() -> None:
    for flag in ("DISK_ONLY", "NO_METADATA", "REUSE_EXT", "ATOMIC"):
        assert BASE_FLAGS & getattr(libvirt, f"VIR_DOMAIN_SNAPSHOT_CREATE_{flag}")
    assert not BASE_FLAGS & libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE


def test_new_file_accepted(tmp_path: Path) -> None:
    disk = _disk(tmp_path)
    path = validate_new_file(disk, f"volume-{VOL}.{SNAP}", naming=CINDER)
    assert path == str(tmp_path / f"volume-{VOL}.{SNAP}")


@pytest.mark.parametrize(
    "name",
    [
        f"../volume-{VOL}.{SNAP}",
        f"sub/volume-{VOL}.{SNAP}",
        "..",
        "",
        f"volume-{VOL}.{SNAP}.qcow2",
        f"/abs/volume-{VOL}.{SNAP}",
        f"volume-{SNAP}.{VOL}",  # another volume's file
        f"volume-{VOL}",  # the base itself (in chain)
    ],
)
def test_new_file_rejected(tmp_path: Path, name: str) -> None:
    with pytest.raises(SnapshotFailed):
        validate_new_file(_disk(tmp_path), name, naming=CINDER)


def test_new_file_that_exists_is_rejected(tmp_path: Path) -> None:
    disk = _disk(tmp_path)
    (tmp_path / f"volume-{VOL}.{SNAP}").symlink_to("/nonexistent")  # even a dangling link
    with pytest.raises(SnapshotFailed, match="exists"):
        validate_new_file(disk, f"volume-{VOL}.{SNAP}", naming=CINDER)


def _fs(mount: str, *targets: str, mapped: bool = True) -> GuestFilesystem:
    return GuestFilesystem(mount, "ext4", mount, targets, mapped)


def test_plan_freezes_only_filesystems_on_snapshotted_disks() -> None:
    fss = [_fs("/data3", "vdc"), _fs("/data2", "vdb"), _fs("/data", "vda")]
    plan = plan_freeze(fss, ["vdb"])
    assert plan.method is FreezeMethod.FREEZE_LIST
    assert plan.mountpoints == ("/data2",)
    assert plan_freeze(fss, ["vda", "vdc"]).mountpoints == ("/data3", "/data")


def test_plan_freezes_a_spanning_filesystem_whole() -> None:
    plan = plan_freeze([_fs("/lvm", "vda", "vdb"), _fs("/other", "vdc")], ["vdb"])
    assert plan.mountpoints == ("/lvm",)


def test_plan_with_nothing_mounted_freezes_nothing() -> None:
    plan = plan_freeze([_fs("/data", "vda")], ["vdb"])
    assert plan.method is FreezeMethod.FREEZE_LIST
    assert plan.mountpoints == ()


def test_plan_falls_back_to_libvirt_when_a_filesystem_is_unmapped() -> None:
    plan = plan_freeze([_fs("/data", "vda"), _fs("/mystery", mapped=False)], ["vda"])
    assert plan.method is FreezeMethod.LIBVIRT
    assert "/mystery" in plan.reason
