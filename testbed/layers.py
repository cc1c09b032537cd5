"""Chains of image layers seen from the host: an external snapshot of one disk done the
plain way, what the headers say (backing names, the chain, ``qemu-img check``), a layer's
own allocation, the live chain as full paths, and qemu-io into a running disk.

Why not L1's snapshot code: merge tests and benches must not depend on it; a pre-created
overlay plus ``snapshotCreateXML(DISK_ONLY|NO_METADATA|REUSE_EXT|ATOMIC)`` is what libvirt
does underneath anyway, and it keeps those tests about merges only.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any
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


def _qemu_img_json(*args: str) -> Any:
    """``qemu-img ARGS --output=json``, parsed; ``-U`` is the caller's (images in use)."""
    out = subprocess.run(
        ["qemu-img", *args, "--output=json"], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out)


def backing_name(path: Path) -> str | None:
    """The backing name exactly as written in the qcow2 header (via qemu-img, -U)."""
    name = _qemu_img_json("info", "-U", "-f", "qcow2", str(path)).get("backing-filename")
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


def qemu_chain(top: str, fmt: str) -> list[tuple[str, str]]:
    """(basename, format) top first, as qemu-img reads the headers; every backing format
    must be recorded (never probed) and match what the layer below really is."""
    layers = _qemu_img_json("info", "-U", "-f", fmt, "--backing-chain", top)
    chain = []
    for i, layer in enumerate(layers):
        chain.append((os.path.basename(layer["filename"]), layer["format"]))
        if "backing-filename" in layer:
            assert "/" not in layer["backing-filename"], layer  # Cinder's relative names
            assert layer.get("backing-filename-format") == layers[i + 1]["format"], layer
        else:
            assert i == len(layers) - 1, layers
    return chain


def allocated(img: Path) -> int:
    """Bytes allocated in this layer alone (qemu-img map of the top, backing excluded)."""
    extents = _qemu_img_json("map", "-U", "-f", "qcow2", str(img))
    return sum(e["length"] for e in extents if e["data"] and e["depth"] == 0)


def live_paths(g: Any) -> tuple[str, ...]:
    """The first disk's live chain (libvirt's XML) as real paths, top first."""
    disk = find_disk(g.dom, volume_id=g.disks[0].volume_id)
    return tuple(os.path.realpath(layer.path) for layer in disk.chain)


def real(*paths: Path) -> tuple[str, ...]:
    return tuple(os.path.realpath(p) for p in paths)
