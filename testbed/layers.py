"""Test-only helpers for merge tests: external snapshots of one disk, done the plain way.

Why not L1's snapshot code: the merge tests must not depend on it; a pre-created overlay
plus ``snapshotCreateXML(DISK_ONLY|NO_METADATA|REUSE_EXT|ATOMIC)`` is what libvirt does
underneath anyway, and it keeps these tests about merges only.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path
from xml.sax.saxutils import escape

import libvirt

from libvirt_ops import domain_disks, find_disk

SNAP_FLAGS = (
    libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
    | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
    | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT
    | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
)


def snapshot_disk(dom: libvirt.virDomain, target: str, volume_id: str) -> Path:
    """New overlay ``volume-<vol>.<uuid>`` on top of disk ``target``; returns its path."""
    disks = domain_disks(dom)
    disk = next(d for d in disks if d.target == target)
    top = Path(disk.source)
    new = top.parent / f"volume-{volume_id}.{uuid.uuid4()}"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", disk.fmt, "-b", top.name, str(new)],
        check=True,
        capture_output=True,
        cwd=top.parent,
    )
    os.chmod(new, 0o644)
    parts = []
    for d in disks:
        if d.target == target:
            parts.append(
                f"<disk name='{d.target}' snapshot='external' type='file'>"
                f"<driver type='qcow2'/><source file='{escape(str(new))}'/></disk>"
            )
        else:
            parts.append(f"<disk name='{d.target}' snapshot='no'/>")
    xml = f"<domainsnapshot><disks>{''.join(parts)}</disks></domainsnapshot>"
    dom.snapshotCreateXML(xml, SNAP_FLAGS)
    assert find_disk(dom, volume_id=volume_id).source == str(new)
    return new


def backing_name(path: Path) -> str | None:
    """The backing name exactly as written in the qcow2 header (via qemu-img, -U)."""
    import json

    out = subprocess.run(
        ["qemu-img", "info", "-U", "-f", "qcow2", "--output=json", str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    name = json.loads(out).get("backing-filename")
    return str(name) if name is not None else None


def qemu_img_check(path: Path) -> None:
    """``qemu-img check`` (pinned qcow2, -U); raises with its output on any error or leak."""
    res = subprocess.run(
        ["qemu-img", "check", "-U", "-f", "qcow2", str(path)], capture_output=True, text=True
    )
    assert res.returncode == 0, f"qemu-img check {path}: {res.stdout}{res.stderr}"


def hmp_write(dom: libvirt.virDomain, disk_index: int, cmd: str) -> str:
    """Run a qemu-io command on the running disk's backend from the host (no guest)."""
    import libvirt_qemu

    dev = f"/machine/peripheral/virtio-disk{disk_index}/virtio-backend"
    return str(
        libvirt_qemu.qemuMonitorCommand(
            dom, f'qemu-io -d {dev} "{cmd}"', libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
        )
    )
