"""Disks of a running domain and their current backing chains, read from the live XML.

The live XML is the only truth about which file QEMU writes to: Nova's and Cinder's
databases lag behind after every pivot. libvirt numbers backing-store elements with an
``index`` attribute that addresses ``vda[N]`` in block-job calls; it is not the chain
position, so both are kept.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import libvirt
from lxml import etree

from libvirt_ops.errors import DiskNotFound


@dataclass(frozen=True)
class ChainLayer:
    """One file of a disk's chain. ``index`` is libvirt's backingStore index (None for the top)."""

    path: str
    fmt: str
    index: int | None


@dataclass(frozen=True)
class Disk:
    """A file-backed disk of a domain: target (``vda``), serial, and its chain top first."""

    target: str
    serial: str | None
    bus: str
    chain: tuple[ChainLayer, ...]
    snapshot_capable: bool = True

    @property
    def source(self) -> str:
        """The active (top) file QEMU writes to."""
        return self.chain[0].path

    @property
    def fmt(self) -> str:
        return self.chain[0].fmt

    def layer(self, path: str) -> ChainLayer:
        """The chain layer for ``path`` (compared by realpath); DiskNotFound if absent."""
        want = os.path.realpath(path)
        for layer in self.chain:
            if os.path.realpath(layer.path) == want:
                return layer
        raise DiskNotFound(f"{path} is not in the chain of disk {self.target}")

    def address(self, layer: ChainLayer) -> str:
        """The libvirt disk string for block-job calls: ``vda`` or ``vda[N]``."""
        if layer.index is None:
            return self.target
        return f"{self.target}[{layer.index}]"


def _chain_of(disk_el: etree._Element) -> tuple[ChainLayer, ...]:
    layers: list[ChainLayer] = []
    src = disk_el.find("source")
    drv = disk_el.find("driver")
    if src is None or src.get("file") is None:
        return ()
    layers.append(
        ChainLayer(src.get("file", ""), drv.get("type", "raw") if drv is not None else "raw", None)
    )
    bs = disk_el.find("backingStore")
    while bs is not None and bs.get("type") is not None:
        bsrc = bs.find("source")
        bfmt = bs.find("format")
        if bsrc is None or bsrc.get("file") is None:
            break
        idx = bs.get("index")
        layers.append(
            ChainLayer(
                bsrc.get("file", ""),
                bfmt.get("type", "raw") if bfmt is not None else "raw",
                int(idx) if idx is not None else None,
            )
        )
        bs = bs.find("backingStore")
    return tuple(layers)


def parse_disks(xml: str) -> list[Disk]:
    """All file-backed ``<disk device='disk'>`` elements of a domain XML, in document order."""
    root = etree.fromstring(xml.encode())
    disks: list[Disk] = []
    for el in root.findall("./devices/disk"):
        if el.get("device", "disk") != "disk" or el.get("type") != "file":
            continue
        target = el.find("target")
        if target is None or target.get("dev") is None:
            continue
        chain = _chain_of(el)
        if not chain:
            continue
        serial_el = el.find("serial")
        disks.append(
            Disk(
                target=target.get("dev", ""),
                serial=serial_el.text.strip() if serial_el is not None and serial_el.text else None,
                bus=target.get("bus", "virtio"),
                chain=chain,
                snapshot_capable=el.find("readonly") is None and el.find("shareable") is None,
            )
        )
    return disks


def domain_disks(dom: libvirt.virDomain) -> list[Disk]:
    """Disks of a running domain from its live XML."""
    return parse_disks(dom.XMLDesc(0))


def find_disk(
    dom: libvirt.virDomain, *, volume_id: str | None = None, path: str | None = None
) -> Disk:
    """The disk whose ``<serial>`` is ``volume_id`` (as Nova sets it) or holding ``path``."""
    if (volume_id is None) == (path is None):
        raise ValueError("give exactly one of volume_id or path")
    disks = domain_disks(dom)
    for disk in disks:
        if volume_id is not None and disk.serial == volume_id:
            return disk
        if path is not None:
            want = os.path.realpath(path)
            if any(os.path.realpath(layer.path) == want for layer in disk.chain):
                return disk
    what = f"volume {volume_id}" if volume_id else f"file {path}"
    raise DiskNotFound(f"domain {dom.name()} has no disk for {what}")
